"""Any model argument (.apr, HF folder or .safetensors, .gguf, hf:// id) as a local .apr path, losslessly."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from apr_format import tempfiles
from apr_format.architecture import architecture_of
from apr_format.errors import AprError

from .hf_source import CONFIG_FILE, read_config
from .hub import download_model, is_hub_id
from .metadata import HF_CONFIG

Warn = Callable[[str], None]


@contextmanager
def model_as_apr(model: str | os.PathLike, warn: Warn) -> Iterator[str]:
    """Yield an .apr path for `model`; HF and GGUF sources are converted to a temporary .apr first.

    The conversion is the one `apr convert` does, without narrowing casts: HF tensors keep their
    bytes and GGUF tensors are dequantized to f32, the precision llama.cpp dequantizes in. The temporary file lives in
    $TMPDIR and is removed on exit (or by the next call, after a kill). Conversion warnings go to `warn`; errors about the temporary
    file are re-raised naming `model`.

    Raises:
        What `download_model`, `convert_hf_to_apr` and `convert_gguf` raise, and what the caller
        raises while reading the yielded file.
    """
    source = os.fspath(model)
    local = download_model(source) if is_hub_id(source) else source
    if not os.path.exists(local):
        raise FileNotFoundError(2, "No such file or directory", local)
    if not (os.path.isdir(local) or local.lower().endswith((".safetensors", ".gguf"))):
        yield local
        return
    with _scratch_folder() as tmp:
        converted = os.path.join(tmp, "model.apr")
        try:
            if local.lower().endswith(".gguf"):
                from .gguf_to_apr import convert_gguf

                report = convert_gguf(local, converted, dtype="f32", lm_head_copy=False)
            else:
                from .hf_to_apr import convert_hf_to_apr

                _check_architecture(local)
                report = convert_hf_to_apr(local, converted, lm_head_copy=False)
            for warning in report.warnings:
                warn(f"{source}: {warning}")
            yield converted
        except AprError as exc:
            if exc.path is None or not exc.path.startswith(tmp):
                raise
            raise type(exc)(source, exc.problem) from None


@contextmanager
def _scratch_folder() -> Iterator[str]:
    """A new folder in $TMPDIR, locked while this process uses it and removed after. A process killed
    meanwhile (kill -9, power loss) cannot remove it: the next call removes every such folder whose
    lock is free, so a converted model (possibly many GB) is never left behind for good."""
    anchor = os.path.join(tempfile.gettempdir(), "apr-model")
    tempfiles.remove_stale(anchor)
    lock, tmp = tempfiles.create_temp_dir(anchor)
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        os.close(lock)


def _check_architecture(folder: str) -> None:
    """Refuse an encoder or incomplete config before converting anything (the model could be big)."""
    config_file = os.path.join(folder, CONFIG_FILE)
    if os.path.isfile(config_file):
        architecture_of({HF_CONFIG: read_config(config_file)[1]}, (), folder)
