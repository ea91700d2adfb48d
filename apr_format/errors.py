"""The library's error types: one subclass per failure, message "{path, flag or variable}: {problem}"."""

from __future__ import annotations

import os


class AprError(Exception):
    """Base of every error apr raises for bad input or unusable files.

    It is about one thing, named in the field that says what it is: `path` (a file or folder),
    `flag` (a command-line option, "--seq-len") or `variable` (an environment variable, "RANK").
    The message starts with that name.
    """

    def __init__(
        self, path: str | os.PathLike | None, problem: str, *, flag: str | None = None, variable: str | None = None
    ) -> None:
        self.path = os.fspath(path) if path is not None else None
        self.flag, self.variable, self.problem = flag, variable, problem
        subject = next((s for s in (self.path, flag, variable) if s is not None), None)
        super().__init__(f"{subject}: {problem}" if subject is not None else problem)

    def __str__(self) -> str:  # KeyError / OSError bases would otherwise quote or reformat the message
        return str(self.args[0]) if self.args else ""


class BadMagic(AprError):
    """The file does not start with "APR\\0"."""


class LegacyFormat(AprError):
    """An APR v1 ("APRN") file: recognised, not supported."""


class UnsupportedVersion(AprError):
    """Version major is not 2."""


class HeaderChecksum(AprError):
    """Header CRC-32 does not match."""


class FooterChecksum(AprError):
    """Footer CRC-32 of the whole file does not match."""


class NonFiniteWeights(AprError):
    """Weights hold NaN or Inf where finite values are required (e.g. `--init`)."""


class Truncated(AprError):
    """The file ends before a section or tensor it declares."""


class CorruptMetadata(AprError):
    """Metadata is out of bounds, not UTF-8, not JSON, or not a JSON object."""


class CorruptIndex(AprError):
    """The tensor index is malformed: bounds, names, order, sizes or offsets."""


class CorruptTensorData(AprError):
    """A tensor's stored bytes cannot be decoded (a bad zstd frame, a wrong inflated size)."""


class UnknownDType(AprError):
    """A dtype code or name this library does not know."""


class ColumnMajor(AprError):
    """The forbidden LAYOUT_COLUMN_MAJOR flag is set."""


class UnsupportedFeature(AprError):
    """A valid file uses something we do not implement (LZ4, encryption, q4_k dequant...)."""


class NotQuantizable(AprError):
    """Values that a quantized dtype cannot represent (NaN, Inf, beyond the scale's range)."""


class UnsupportedArchitecture(AprError):
    """A model family we cannot build or train."""


class MissingTensor(AprError, KeyError):
    """A tensor the architecture needs, or a name asked of `AprFile[...]`, is absent (also a KeyError)."""


class ShapeMismatch(AprError):
    """A tensor has a shape other than the architecture requires."""


class MissingConfigKey(AprError):
    """An architecture key is missing and has no well-defined default."""


class VocabMismatch(AprError):
    """Tokenizer or token file does not fit the model's vocabulary."""


class OutputExists(AprError):
    """The destination exists and overwriting was not asked for."""


class CorruptSource(AprError):
    """An input in another format (safetensors, GGUF, HF folder) is broken."""


class InvalidArgument(AprError):
    """Arguments that contradict each other or the input."""


class ModelUnavailable(AprError):
    """A model id (hf://ORG/NAME) could not be resolved: unknown repo or revision, no network, not cached."""


class MissingDependency(AprError):
    """An optional package a command needs is not installed (the message says how to install it)."""


class InvalidArchitectureConfig(AprError):
    """A user's architecture JSON (`--arch-config`) is not a usable architecture description."""


class FileMissing(AprError, FileNotFoundError):
    """The path does not exist (also a FileNotFoundError)."""


class NotAFile(AprError, IsADirectoryError):
    """A folder where a file was expected (also an IsADirectoryError)."""


class Unreadable(AprError, PermissionError):
    """The file exists but cannot be read: permissions or an I/O error (also an OSError)."""


def from_os_error(path: str | os.PathLike, exc: OSError) -> AprError:
    """The AprError subclass for an OSError met while opening `path` (errno and filename kept).

    Returns:
        FileMissing, NotAFile or Unreadable, ready to raise.
    """
    if isinstance(exc, FileNotFoundError):
        error: AprError = FileMissing(path, "No such file or directory")
    elif isinstance(exc, IsADirectoryError):
        error = NotAFile(path, "is a folder, expected a file")
    else:
        error = Unreadable(path, f"cannot be read: {exc.strerror or exc}")
    error.errno, error.strerror, error.filename = exc.errno, exc.strerror, error.path  # type: ignore[attr-defined]
    return error


def json_problem(exc: Exception, offset: int = 0) -> str:
    """Why bytes are not UTF-8 JSON, in words and file offsets (`offset`: where the JSON starts)."""
    if isinstance(exc, UnicodeDecodeError):
        return f"not UTF-8 text (byte {offset + exc.start})"
    if isinstance(exc, RecursionError):
        return "nested too deeply"
    pos = getattr(exc, "pos", None)
    msg = getattr(exc, "msg", None) or str(exc)
    return f"{msg[:1].lower()}{msg[1:]} at byte {offset + pos}" if pos is not None else msg
