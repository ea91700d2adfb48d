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


class MissingTensor(AprError):
    """A tensor the architecture needs is absent."""


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


class MissingDependency(AprError):
    """An optional package a command needs is not installed (the message says how to install it)."""


class InvalidArchitectureConfig(AprError):
    """A user's architecture JSON (`--arch-config`) is not a usable architecture description."""
