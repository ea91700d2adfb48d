"""`apr convert --quantize q8|q4`: which tensors aprender quantizes, packing them, and the error each got."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from apr_format.constants import DTYPE_BY_NAME
from apr_format.errors import InvalidArgument
from apr_format.quants import dequantize_q4, dequantize_q8, quantize_q4, quantize_q8

QUANT_KINDS = ("q8", "q4")
# aprender's rule (src/format/converter/write.rs `should_skip_quantization`, GH-237 and GH-88):
# a name containing one of these, or a tensor under MIN_ELEMENTS values, stays float. Embeddings
# and lm_head ARE quantized since GH-88 (realizar's kernels expect them quantized).
KEEP_FLOAT_PATTERNS = ("bias", "layernorm", "layer_norm", "norm.weight")
MIN_ELEMENTS = 1024
# Custom metadata key listing the quantized tensors (spec keys stay in `quantization`).
QUANTIZED_TENSORS = "quantized_tensors"

_PACK = {"q8": quantize_q8, "q4": quantize_q4}
_UNPACK = {"q8": dequantize_q8, "q4": dequantize_q4}
_SPEC = {  # spec "Metadata": quantization {quant_type, bits, block_size, symmetric}
    "q8": {"quant_type": "q8", "bits": 8, "block_size": None, "symmetric": True},  # one scale per tensor
    "q4": {"quant_type": "q4", "bits": 4, "block_size": DTYPE_BY_NAME["q4"].block_values, "symmetric": True},
}


def check_kind(kind: str | None, where: str | None = None) -> None:
    """Raises InvalidArgument unless `kind` is None or one of QUANT_KINDS."""
    if kind is not None and kind not in QUANT_KINDS:
        raise InvalidArgument(where, f"--quantize {kind!r} is not one of {', '.join(QUANT_KINDS)}")


def quantizes(name: str, numel: int) -> bool:
    """Whether aprender quantizes the tensor `name` of `numel` values (else it stays float)."""
    return numel >= MIN_ELEMENTS and not any(pattern in name for pattern in KEEP_FLOAT_PATTERNS)


@dataclass
class TensorError:
    """How far one quantized tensor is from the float values it was made from."""

    max_abs: float
    rel_l2: float  # ||dequantized - x|| / ||x||


@dataclass
class QuantReport:
    """What `--quantize` did, for the conversion report."""

    kind: str
    quantized: list[str] = field(default_factory=list)
    kept_float: list[str] = field(default_factory=list)
    errors: dict[str, TensorError] = field(default_factory=dict)
    _sq_error: float = 0.0
    _sq_norm: float = 0.0

    @classmethod
    def for_plan(cls, kind: str | None, planned: Iterable[tuple[str, str]]) -> "QuantReport | None":
        """The report of a conversion whose planned (name, output dtype) pairs are `planned`; None
        when nothing is quantized (`kind` None)."""
        if kind is None:
            return None
        planned = list(planned)
        return cls(kind, [n for n, d in planned if d == kind], [n for n, d in planned if d != kind])

    def metadata(self) -> dict[str, Any]:
        """The metadata keys saying the file is quantized and which tensors are."""
        return {"quantization": dict(_SPEC[self.kind]), QUANTIZED_TENSORS: sorted(self.quantized)}

    def pack(self, name: str, values: np.ndarray, where: str | None = None) -> bytes:
        """The packed bytes of `values`; records the tensor's error after a dequantizing check."""
        flat = np.asarray(values, dtype=np.float32).reshape(-1)
        packed = _PACK[self.kind](flat, where=f"{where}: tensor {name!r}" if where else name)
        diff = _UNPACK[self.kind](packed, flat.size) - flat
        sq_error, sq_norm = float(np.dot(diff, diff)), float(np.dot(flat, flat))
        self._sq_error += sq_error
        self._sq_norm += sq_norm
        self.errors[name] = TensorError(
            max_abs=float(np.abs(diff).max()) if diff.size else 0.0,
            rel_l2=(sq_error / sq_norm) ** 0.5 if sq_norm else 0.0,
        )
        return packed

    def producer(self, name: str, values: Callable[[], np.ndarray], where: str | None = None) -> Callable[[], bytes]:
        """A zero-argument producer of the packed tensor, for AprWriter.add."""
        return lambda: self.pack(name, values(), where)

    def summary(self) -> dict[str, Any]:
        """JSON-ready: counts, names, the worst tensor errors and the whole-model relative L2."""
        worst = max(self.errors.items(), key=lambda item: item[1].rel_l2, default=None)
        return {
            "kind": self.kind,
            "quantized": sorted(self.quantized),
            "kept_float": sorted(self.kept_float),
            "max_abs_error": max((e.max_abs for e in self.errors.values()), default=0.0),
            "rel_l2_error": (self._sq_error / self._sq_norm) ** 0.5 if self._sq_norm else 0.0,
            "worst_tensor": {"name": worst[0], **asdict(worst[1])} if worst else None,
            "tensor_errors": {name: asdict(e) for name, e in sorted(self.errors.items())},
        }
