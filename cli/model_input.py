"""Options and loading shared by the commands that run a model (eval, run): any MODEL opened ready to run."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

import click

from .render import escape

if TYPE_CHECKING:
    from apr_trainer.inference import LoadedModel


def model_options(command):
    """--tokenizer, --device and --dtype, shared by the commands that load a model to run it."""
    options = [
        click.option("--tokenizer", metavar="tokenizer.json", default=None,
                     help="Tokenizer to use (default: the one carried by MODEL)."),
        click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True,
                     help="auto = cuda if available."),
        click.option("--dtype", type=click.Choice(["auto", "f32", "bf16", "f16"]), default="auto",
                     show_default=True, help="Compute dtype; auto = f32 on CPU, the checkpoint's float dtype on CUDA."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def warn(message: str) -> None:
    """One `apr: warning:` line on stderr."""
    click.echo(f"apr: warning: {escape(message)}", err=True)


@contextmanager
def open_model(model: str, *, device: str, dtype: str) -> Iterator[LoadedModel]:
    """The model named by MODEL (.apr, HF folder, .gguf or hf:// id), loaded for inference."""
    from apr_converters.as_apr import model_as_apr
    from apr_trainer.inference import load_model

    with model_as_apr(model, warn) as apr_path:
        yield load_model(apr_path, device=device, dtype=dtype, label=model, warn=warn)
