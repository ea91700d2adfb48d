"""Lazy access to an HF checkpoint (folder, sharded folder or bare .safetensors): headers parsed, tensors read on demand."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from apr_format.errors import CorruptSource, MissingTensor, from_os_error
from apr_format.fileio import CHUNK, FileRange
from apr_format.safetensors_reader import HeaderEntry, read_header
from apr_format.sniff import SNIFF_BYTES, describe, identify_bytes

from .source_files import SourceFiles

CONFIG_FILE = "config.json"
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
# Non-weight files carried inside the .apr so an export gives back a complete folder.
CARRIED_FILES = (
    "tokenizer.json", "tokenizer_config.json", "generation_config.json", "special_tokens_map.json",
    "chat_template.jinja",
)


@dataclass(frozen=True)
class SourceTensor:
    """One tensor of the source: APR dtype name, shape, file, absolute byte offset and size."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    file: str
    start: int
    nbytes: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


class HfSource:
    """An opened HF checkpoint: parsed config, every tensor's location, the open weight files."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = os.fspath(path)
        self.config: dict[str, Any] | None = None
        self.config_text: str | None = None
        self.files: list[str] = []
        self.tensors: dict[str, SourceTensor] = {}
        self.extra_files: dict[str, str] = {}
        self.index: dict[str, Any] | None = None
        self.ignored_files: list[str] = []  # .safetensors files in the folder that are not part of the model
        self.file_metadata: dict[str, dict[str, str]] = {}
        self._files = SourceFiles()
        try:
            self._open()
        except BaseException:
            self.close()
            raise

    # -- opening -------------------------------------------------------------------------
    def _open(self) -> None:
        if os.path.isdir(self.path):
            self._open_folder()
        elif os.path.isfile(self.path):
            self._add_files([self.path])
        elif not os.path.exists(self.path):
            raise from_os_error(self.path, FileNotFoundError(2, "No such file or directory", self.path))
        else:
            raise CorruptSource(self.path, "not a file or folder")

    def _open_folder(self) -> None:
        config_path = os.path.join(self.path, CONFIG_FILE)
        if os.path.isfile(config_path):
            self.config_text, self.config = read_config(config_path)
        for name in CARRIED_FILES:
            file = os.path.join(self.path, name)
            if os.path.isfile(file):
                self.extra_files[name] = _read_text(file)
        index_path = os.path.join(self.path, INDEX_FILE)
        single = os.path.join(self.path, SINGLE_FILE)
        found = sorted(f for f in os.listdir(self.path) if f.endswith(".safetensors"))
        if os.path.isfile(index_path) or os.path.isfile(single):
            if os.path.isfile(index_path):
                self._open_sharded(index_path)
            else:
                self._add_files([single])
            used = {os.path.basename(f) for f in self.files}
            self.ignored_files = [f for f in found if f not in used]
            return
        if len(found) == 1:
            self._add_files([os.path.join(self.path, found[0])])
        elif found:
            raise CorruptSource(self.path, f"{len(found)} .safetensors files but no {INDEX_FILE} to say how they fit")
        elif any(f.endswith(".bin") for f in os.listdir(self.path)):
            raise CorruptSource(self.path, "only PyTorch .bin weights found; re-save with safe_serialization=True")
        else:
            raise CorruptSource(self.path, f"no {SINGLE_FILE}, {INDEX_FILE} or other .safetensors file")

    def _open_sharded(self, index_path: str) -> None:
        weight_map, metadata = _read_index(index_path)
        total = metadata.get("total_size")
        total = total if isinstance(total, int) and not isinstance(total, bool) else None
        self.index = {"path": index_path, "weight_map": weight_map, "metadata": metadata, "total_size": total}
        shards = sorted(set(weight_map.values()))
        for shard in shards:
            if os.path.basename(shard) != shard or shard in ("", ".", ".."):
                raise CorruptSource(index_path, f"shard name {shard!r} is not a file name in the folder")
            file = os.path.join(self.path, shard)
            if not os.path.isfile(file):
                example = next(k for k, v in sorted(weight_map.items()) if v == shard)
                raise CorruptSource(index_path, f"shard {shard} (holding {example!r}) is missing")
        self._add_files([os.path.join(self.path, s) for s in shards])
        for name, shard in sorted(weight_map.items()):
            tensor = self.tensors.get(name)
            if tensor is None:
                raise CorruptSource(index_path, f"tensor {name!r} is listed in {shard} but no shard holds it")
            if os.path.basename(tensor.file) != shard:
                raise CorruptSource(
                    index_path, f"tensor {name!r} is listed in {shard} but found in {os.path.basename(tensor.file)}"
                )
        for name, tensor in self.tensors.items():
            if name not in weight_map:
                raise CorruptSource(
                    index_path, f"tensor {name!r} in {os.path.basename(tensor.file)} is not named by the index"
                )

    def _add_files(self, files: list[str]) -> None:
        found: dict[str, SourceTensor] = {}
        for file in files:
            entries, meta = self._read_header(file)
            self.files.append(file)
            self.file_metadata[file] = meta
            for e in entries:
                if e.name in found:
                    raise CorruptSource(
                        file, f"tensor {e.name!r} is also in {os.path.basename(found[e.name].file)}"
                    )
                found[e.name] = SourceTensor(e.name, e.dtype, e.shape, file, e.start, e.nbytes)
        self.tensors = dict(sorted(found.items()))

    def _read_header(self, file: str) -> tuple[list[HeaderEntry], dict[str, str]]:
        size = self._files.open(file)
        head = self._files.read(file, 0, min(size, SNIFF_BYTES))
        kind = identify_bytes(bytes(head))
        if kind not in ("safetensors", "binary", "empty"):  # let the header parser say what is wrong with those
            raise CorruptSource(file, f"is {describe(kind)}, not safetensors")
        return read_header(self._files.fd(file), file)

    # -- access --------------------------------------------------------------------------
    def raw(self, name: str) -> memoryview:
        """The tensor's bytes (a copy read from the file).

        Raises:
            Truncated: the file was cut short since it was opened.
        """
        tensor = self._tensor(name)
        return self._files.read(tensor.file, tensor.start, tensor.nbytes)

    def file_range(self, name: str) -> FileRange:
        """Where the tensor's bytes lie, for a kernel-side copy through the file this source opened."""
        tensor = self._tensor(name)
        return self._files.file_range(tensor.file, tensor.start, tensor.nbytes)

    def chunks(self, name: str, step: int = CHUNK) -> Iterator[memoryview]:
        """The tensor's bytes in chunks of `step` (copies): memory stays at one chunk."""
        tensor = self._tensor(name)
        return self._files.chunks(tensor.file, tensor.start, tensor.nbytes, step)

    def _tensor(self, name: str) -> SourceTensor:
        tensor = self.tensors.get(name)
        if tensor is None:
            raise MissingTensor(self.path, f"no tensor named {name!r}")
        return tensor

    @property
    def total_size(self) -> int:
        """Sum of every tensor's bytes."""
        return sum(t.nbytes for t in self.tensors.values())

    def close(self) -> None:
        """Close the weight files."""
        self._files.close()

    def __enter__(self) -> "HfSource":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"HfSource({self.path!r}, files={len(self.files)}, tensors={len(self.tensors)})"


def read_config(path: str | os.PathLike) -> tuple[str, dict[str, Any]]:
    """The text and parsed object of an HF config.json.

    Raises:
        CorruptSource: not UTF-8 JSON, or not a JSON object.
    """
    text = _read_text(os.fspath(path))
    return text, json_object(text, os.fspath(path))


def json_object(text: str, where: str) -> dict[str, Any]:
    """Parse `text` as a JSON object. Raises CorruptSource naming `where`."""
    try:
        value = json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise CorruptSource(where, f"not valid JSON ({exc})") from None
    if not isinstance(value, dict):
        raise CorruptSource(where, f"is a JSON {type(value).__name__}, expected an object")
    return value


def _read_text(path: str) -> str:
    try:
        with open(path, encoding="utf-8", newline="") as fh:
            return fh.read()
    except UnicodeDecodeError:
        raise CorruptSource(path, "is not UTF-8 text") from None


def _read_index(path: str) -> tuple[dict[str, str], dict[str, Any]]:
    _, index = read_config(path)
    weight_map = index.get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise CorruptSource(path, "has no weight_map object")
    for name, shard in weight_map.items():
        if not isinstance(shard, str):
            raise CorruptSource(path, f"weight_map entry {name!r} is not a file name")
    meta = index.get("metadata")
    return weight_map, meta if isinstance(meta, dict) else {}


def open_hf_source(path: str | os.PathLike) -> HfSource:
    """Open an HF folder (single or sharded; the index is checked against every shard's header)
    or a bare .safetensors file, lazily.

    Raises:
        CorruptSource, Truncated, UnknownDType: for broken configs, indexes or weight files.
    """
    return HfSource(path)
