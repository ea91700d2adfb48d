"""`apr convert model.apr`: re-encode an .apr (dtype, compression, the tied lm_head copy) and nothing else."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from apr_converters.apr_to_apr import reencode_apr
from apr_format import Flag, open_apr
from apr_format.errors import InvalidArgument
from apr_testing import run_apr, run_apr_json


def test_cast_to_bf16_rounds_floats_like_torch_and_keeps_the_rest(qwen_apr, tmp_path):
    report = run_apr_json("convert", qwen_apr, "-o", tmp_path / "b.apr", "--dtype", "bf16")
    assert report["dtypes"] == {"bf16": report["tensor_count"]}
    with open_apr(qwen_apr) as f, open_apr(tmp_path / "b.apr") as g:
        assert g.keys() == f.keys()
        for name in f.keys():
            assert torch.equal(g.torch(name), f.torch(name).to(torch.bfloat16)), name
        config = g.metadata["hf_config"]
        assert config.get("dtype", config.get("torch_dtype")) == "bfloat16"  # transformers 5 / 4 spelling
        kept = {k: v for k, v in f.metadata.items() if k not in ("hf_config", "hf_config_text", "total_size")}
        assert {k: g.metadata[k] for k in kept} == kept
        assert g.metadata["total_size"] == sum(t.size for t in g.tensors())


def test_compress_and_decompress_give_back_the_same_bytes(qwen_apr, tmp_path):
    run_apr("convert", qwen_apr, "-o", tmp_path / "z.apr", "--compress", "zstd", check=True)
    run_apr("convert", tmp_path / "z.apr", "-o", tmp_path / "plain.apr", "--compress", "none", check=True)
    same = run_apr_json("convert", tmp_path / "z.apr", "-o", tmp_path / "still-z.apr")
    assert same["tensor_count"] > 0
    with open_apr(tmp_path / "z.apr") as z, open_apr(tmp_path / "still-z.apr") as kept:
        assert z.flags & Flag.ZSTD and kept.flags & Flag.ZSTD  # default: as the input is
    assert (tmp_path / "plain.apr").read_bytes() == qwen_apr.read_bytes()  # the original, byte for byte
    assert run_apr("diff", qwen_apr, tmp_path / "z.apr", "-q").returncode == 0


def test_drop_and_add_the_tied_lm_head_copy(qwen_apr, tmp_path):
    with open_apr(qwen_apr) as f:
        assert "lm_head.weight" in f and f.metadata["tied_embeddings"] is True
    dropped = run_apr_json("convert", qwen_apr, "-o", tmp_path / "no-head.apr", "--no-lm-head-copy")
    assert dropped["lm_head_copy"] is False
    with open_apr(tmp_path / "no-head.apr") as g:
        assert "lm_head.weight" not in g
    added = run_apr_json("convert", tmp_path / "no-head.apr", "-o", tmp_path / "head.apr", "--lm-head-copy")
    assert added["lm_head_copy"] is True and added["param_count"] == dropped["param_count"]
    with open_apr(tmp_path / "head.apr") as h:
        assert np.array_equal(h["lm_head.weight"], h["model.embed_tokens.weight"])
    assert (tmp_path / "head.apr").read_bytes() == qwen_apr.read_bytes()


def test_an_untied_head_is_never_dropped(hf_llama, tmp_path):
    run_apr("convert", hf_llama, "-o", tmp_path / "l.apr", check=True)
    with pytest.raises(InvalidArgument, match="not tied"):
        reencode_apr(tmp_path / "l.apr", tmp_path / "x.apr", lm_head_copy=False)
    assert not (tmp_path / "x.apr").exists()


def test_flags_for_other_inputs_are_refused(qwen_apr, tmp_path):
    proc = run_apr("convert", qwen_apr, "-o", tmp_path / "x.apr", "--keep-quant")
    assert proc.returncode == 2 and proc.stderr.startswith("apr: error: --keep-quant: does not apply to .apr input")
