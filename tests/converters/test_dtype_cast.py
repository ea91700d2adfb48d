"""numpy float casts agree bit for bit with torch, including rounding ties, NaN, inf and subnormals."""

from __future__ import annotations

import numpy as np
import pytest

from apr_converters.dtype_cast import cast, to_float


def special_values() -> np.ndarray:
    rng = np.random.default_rng(0)
    values = rng.standard_normal(5000).astype(np.float32) * np.float32(10.0) ** rng.integers(-40, 38, 5000)
    ties = (np.arange(1, 200, dtype=np.uint32) << 16 | 0x8000).view(np.float32)  # exactly half-way for bf16
    specials = np.array([0.0, -0.0, np.inf, -np.inf, np.nan, -np.nan, 1e-45, -1e-45, 3.4e38, -3.4e38, 65504, 65520,
                         6e-8, 1e-8], dtype=np.float32)
    return np.concatenate([values.astype(np.float32), ties, specials])


@pytest.mark.parametrize("dst,torch_name", [("bf16", "bfloat16"), ("f16", "float16"), ("f32", "float32")])
def test_cast_from_f32_matches_torch(dst, torch_name):
    import torch

    values = special_values()
    ours = cast(memoryview(values.tobytes()), "f32", dst)
    theirs = torch.from_numpy(values).to(getattr(torch, torch_name))
    bits = {"bfloat16": torch.int16, "float16": torch.int16, "float32": torch.int32}[torch_name]
    expected = theirs.view(bits).numpy().view(ours.dtype)
    np.testing.assert_array_equal(ours, expected)


def test_bf16_to_float_is_exact():
    import torch

    values = torch.from_numpy(special_values()).to(torch.bfloat16)
    raw = values.view(torch.int16).numpy().tobytes()
    np.testing.assert_array_equal(to_float(raw, "bf16"), values.float().numpy())
    np.testing.assert_array_equal(cast(raw, "bf16", "f32"), values.float().numpy())
