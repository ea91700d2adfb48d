"""`apr convert --quantize q8|q4`: aprender's skip rule, metadata that says what was packed, bounded error, real logits."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import transformers

from apr_converters.gguf_to_apr import convert_gguf
from apr_converters.hf_to_apr import convert_hf_to_apr
from apr_converters.quantize import quantizes
from apr_format import Flag, open_apr
from apr_format.errors import InvalidArgument
from apr_format.quants import quantize_q4, quantize_q8
from apr_testing import run_apr, run_apr_json
from apr_trainer.model import DecoderLM

# max |logit difference| / max |logit| of the quantized model against the float one.
LOGIT_TOLERANCE = {"q8": 0.02, "q4": 0.25}


def test_skip_rule_is_aprenders():
    """Norms, biases and tensors under 1024 values stay float; embeddings and lm_head do not (GH-88)."""
    assert quantizes("model.layers.0.self_attn.q_proj.weight", 4096)
    assert quantizes("model.embed_tokens.weight", 100_000) and quantizes("lm_head.weight", 100_000)
    assert quantizes("model.layers.0.self_attn.o_proj.weight", 1024)
    assert not quantizes("model.layers.0.self_attn.q_proj.weight", 1023)
    for name in ("model.layers.0.self_attn.q_proj.bias", "model.layers.0.input_layernorm.weight",
                 "model.layers.0.post_attention_layernorm.weight", "model.norm.weight", "blk.0.attn_norm.weight"):
        assert not quantizes(name, 10_000), name


@pytest.mark.parametrize("kind", ["q8", "q4"])
@pytest.mark.parametrize("family", ["qwen2", "llama"])
def test_quantized_conversion(family, kind, request, tmp_path):
    folder = request.getfixturevalue(f"hf_{family}")
    report = convert_hf_to_apr(folder, tmp_path / "q.apr", quantize=kind)
    convert_hf_to_apr(folder, tmp_path / "f.apr")
    summary = report.quantization
    with open_apr(tmp_path / "q.apr") as q, open_apr(tmp_path / "f.apr") as f:
        packed = sorted(n for n in q.keys() if q.info(n).dtype == kind)
        assert packed == summary["quantized"] == q.metadata["quantized_tensors"]
        assert packed == sorted(n for n in f.keys() if quantizes(n, f.info(n).numel))
        assert "model.embed_tokens.weight" in packed and "model.norm.weight" not in packed
        assert sorted(summary["kept_float"]) == sorted(set(f.keys()) - set(packed))
        assert q.flags & Flag.QUANTIZED and q.metadata["quantization"]["quant_type"] == kind
        assert q.metadata["quantization"]["block_size"] == (32 if kind == "q4" else None)
        for name in f.keys():
            original = f.to_float32(name)
            if name in packed:  # bytes are exactly the packing of the float values
                pack = quantize_q4 if kind == "q4" else quantize_q8
                assert bytes(q.raw(name)) == pack(original), name
                err = np.abs(q.to_float32(name) - original).max()
                assert err == pytest.approx(summary["tensor_errors"][name]["max_abs"], rel=1e-6)
                assert 0 < err <= np.abs(original).max() / (7 if kind == "q4" else 127), name
            else:
                assert bytes(q.raw(name)) == bytes(f.raw(name)), name
    assert 0 < summary["rel_l2_error"] < (0.15 if kind == "q4" else 0.01)
    ids = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = DecoderLM.from_apr(tmp_path / "f.apr", dtype=torch.float32)(ids)
        got = DecoderLM.from_apr(tmp_path / "q.apr", dtype=torch.float32)(ids)
    diff = (got - expected).abs().max().item()
    assert 0 < diff <= LOGIT_TOLERANCE[kind] * expected.abs().max().item()


def test_tied_head_copy_is_the_quantized_embedding(hf_qwen2, tmp_path):
    convert_hf_to_apr(hf_qwen2, tmp_path / "q.apr", quantize="q4")
    with open_apr(tmp_path / "q.apr") as f:
        assert f.info("lm_head.weight").dtype == "q4"
        assert bytes(f.raw("lm_head.weight")) == bytes(f.raw("model.embed_tokens.weight"))
        model = transformers.AutoModelForCausalLM.from_pretrained(hf_qwen2)
        assert model.config.tie_word_embeddings


def test_gguf_source_is_quantized_from_its_float_values(hf_llama, tmp_path):
    from test_gguf import write_gguf
    import gguf

    model = transformers.AutoModelForCausalLM.from_pretrained(hf_llama, dtype=torch.float32)
    src = write_gguf(tmp_path / "m.gguf", model, gguf.GGMLQuantizationType.F32)
    report = convert_gguf(src, tmp_path / "q.apr", quantize="q8")
    convert_gguf(src, tmp_path / "f.apr", dtype="f32")
    assert report.dtypes == {"bf16": len(report.quantization["kept_float"]), "q8": len(report.quantization["quantized"])}
    with open_apr(tmp_path / "q.apr") as q, open_apr(tmp_path / "f.apr") as f:
        for name in report.quantization["quantized"]:
            assert bytes(q.raw(name)) == quantize_q8(f.to_float32(name)), name
    with pytest.raises(InvalidArgument, match="--keep-quant and --quantize contradict each other"):
        convert_gguf(src, tmp_path / "x.apr", quantize="q4", keep_quant=True)


def test_cli_prints_what_was_quantized_and_import_is_convert(hf_qwen2, tmp_path):
    out = run_apr("import", hf_qwen2, "-o", tmp_path / "q.apr", "--quantize", "q4", check=True).stdout
    assert "quantized 16 tensors to q4 (max |error| " in out
    assert "kept 11 in float (norms, biases, tensors under 1024 values)" in out
    report = run_apr_json("convert", hf_qwen2, "-o", tmp_path / "q8.apr", "--quantize", "q8")
    assert report["quantization"]["kind"] == "q8" and len(report["quantization"]["quantized"]) == 16
    bad = run_apr("convert", hf_qwen2, "-o", tmp_path / "x.apr", "--quantize", "int3")
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1
    assert "Invalid value for '--quantize': 'int3' is not one of 'q8', 'q4'" in bad.stderr
    assert not (tmp_path / "x.apr").exists()
    assert "apr import" in run_apr("import", "-h", check=True).stdout


def test_nan_weight_is_refused_and_nothing_is_written(tmp_path):
    from apr_testing import build_hf_checkpoint

    folder = build_hf_checkpoint(tmp_path / "nan", "llama")
    model = transformers.AutoModelForCausalLM.from_pretrained(folder)
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight[3, 5] = float("nan")
    model.save_pretrained(folder)
    result = run_apr("convert", folder, "-o", tmp_path / "x.apr", "--quantize", "q8")
    assert result.returncode == 2
    assert result.stderr == (f"apr: error: {folder}: tensor 'model.layers.0.mlp.up_proj.weight': "
                             "1 of 8192 values are NaN or Inf; they cannot be quantized\n")
    assert not (tmp_path / "x.apr").exists()
