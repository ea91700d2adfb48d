"""`apr export --format gguf`: checked with gguf-py's own name map, transformers' GGUF loader and a round trip."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
import transformers
from tokenizers import Tokenizer

from apr_converters.apr_to_gguf import export_apr_to_gguf
from apr_converters.gguf_to_apr import convert_gguf, read_metadata
from apr_converters.hf_to_apr import convert_hf_to_apr
from apr_format import open_apr
from apr_format.errors import InvalidArgument, UnsupportedArchitecture
from apr_format.families import hf_to_gguf_name as gguf_name
from apr_testing import FIXTURES, build_hf_checkpoint, llama_permute, run_apr
from apr_trainer.model import DecoderLM

Q = gguf.GGMLQuantizationType
TOKENIZER = FIXTURES / "tiny-qwen2-hf"  # a byte-level BPE of 512 tokens with a chat template
SAMPLE = "Hello world, the fox jumps 2024 times!\n<|im_start|>user hi<|im_end|>"


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def hf_model_dir(request, tmp_path_factory) -> Path:
    """A tiny HF model with the fixture tokenizer, q/k scaled up so attention is sharp: a wrong q/k
    row order then changes the logits far beyond any tolerance below."""
    return _sharp_model_with_tokenizer(
        build_hf_checkpoint(tmp_path_factory.mktemp("hf") / request.param, request.param, vocab_size=512))


def _sharp_model_with_tokenizer(folder: Path) -> Path:
    """`folder`'s model with q/k scaled up 12x and the fixture tokenizer beside it."""
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(12.0)
            layer.self_attn.k_proj.weight.mul_(12.0)
    model.save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(TOKENIZER / name, folder / name)
    return folder


@pytest.fixture(scope="module")
def apr_model(hf_model_dir, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("apr") / "m.apr"
    convert_hf_to_apr(hf_model_dir, path)
    return path


def _load_gguf(path: Path) -> torch.nn.Module:
    return transformers.AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32
    ).eval()


def _ids() -> torch.Tensor:
    return torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(0))


def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out = model(ids)
    return out.logits if hasattr(out, "logits") else out


def _gguf_tensors(path: Path) -> dict[str, tuple[str, np.ndarray]]:
    reader = gguf.GGUFReader(path)
    return {t.name: (t.tensor_type.name, np.array(t.data)) for t in reader.tensors}


def test_f32_export_loads_in_transformers_with_the_same_logits(apr_model, tmp_path):
    out = tmp_path / "m.gguf"
    report = export_apr_to_gguf(apr_model, out, outtype="f32")
    ours = _logits(DecoderLM.from_apr(apr_model, dtype=torch.float32).eval(), _ids())
    theirs = _logits(_load_gguf(out), _ids())
    assert (theirs - ours).abs().max().item() < 1e-4
    assert set(report.types) == {"F32"} and report.tokenizer_pre == "gpt2"


def test_names_and_qk_rows_are_llama_cpps(apr_model, hf_model_dir, tmp_path):
    """Every name is what gguf-py's TensorNameMap gives the HF name; llama q/k rows are in
    llama.cpp's permuted order, qwen2's are not; a tied head is left out as llama.cpp does."""
    out = tmp_path / "m.gguf"
    report = export_apr_to_gguf(apr_model, out)
    model = transformers.AutoModelForCausalLM.from_pretrained(hf_model_dir, dtype=torch.float32)
    cfg = model.config
    arch = gguf.MODEL_ARCH.LLAMA if cfg.model_type == "llama" else gguf.MODEL_ARCH.QWEN2
    names = gguf.get_tensor_name_map(arch, cfg.num_hidden_layers)
    tensors = _gguf_tensors(out)
    state = {k: v for k, v in model.state_dict().items() if not (k == "lm_head.weight" and cfg.tie_word_embeddings)}
    assert sorted(tensors) == sorted(names.get_name(k, try_suffixes=(".weight", ".bias")) for k in state)
    assert report.dropped == (["lm_head.weight"] if cfg.tie_word_embeddings else [])
    for hf, value in state.items():
        expected = value.numpy()
        if cfg.model_type == "llama" and ".q_proj." in hf:
            expected = llama_permute(expected, cfg.num_attention_heads)
        if cfg.model_type == "llama" and ".k_proj." in hf:
            expected = llama_permute(expected, cfg.num_key_value_heads)
        kind, data = tensors[names.get_name(hf, try_suffixes=(".weight", ".bias"))]
        assert kind == "F32"  # the checkpoint is float32, and auto keeps it
        assert data.tobytes() == expected.tobytes(), hf


def test_architecture_and_tokenizer_keys(apr_model, hf_model_dir, tmp_path):
    out = tmp_path / "m.gguf"
    export_apr_to_gguf(apr_model, out)
    meta = read_metadata(gguf.GGUFReader(out), str(out))
    cfg = json.loads((hf_model_dir / "config.json").read_text())
    arch = cfg["model_type"]
    assert meta["general.architecture"] == arch and meta["general.file_type"] == 0
    assert {k: meta[f"{arch}.{k}"] for k in (
        "context_length", "embedding_length", "block_count", "feed_forward_length", "attention.head_count",
        "attention.head_count_kv", "vocab_size", "rope.dimension_count")} == {
        "context_length": cfg["max_position_embeddings"], "embedding_length": 64, "block_count": 2,
        "feed_forward_length": 128, "attention.head_count": 4, "attention.head_count_kv": 2, "vocab_size": 512,
        "rope.dimension_count": 16}
    assert meta[f"{arch}.rope.freq_base"] == cfg["rope_parameters"]["rope_theta"]
    assert meta[f"{arch}.attention.layer_norm_rms_epsilon"] == cfg["rms_norm_eps"]
    tokenizer = json.loads((TOKENIZER / "tokenizer.json").read_text())
    tok_config = json.loads((TOKENIZER / "tokenizer_config.json").read_text())
    vocab = {**tokenizer["model"]["vocab"], **{t["content"]: t["id"] for t in tokenizer["added_tokens"]}}
    assert meta["tokenizer.ggml.model"] == "gpt2" and meta["tokenizer.ggml.pre"] == "gpt2"
    padding = [f"[PAD{i}]" for i in range(len(vocab), 512)]  # up to the model's rows, as llama.cpp pads
    assert meta["tokenizer.ggml.tokens"] == sorted(vocab, key=vocab.get) + padding
    types = meta["tokenizer.ggml.token_type"]  # added specials CONTROL (3), normal 1, padding UNUSED (5)
    assert types == [3, 3, 3] + [1] * (len(vocab) - 3) + [5] * len(padding)
    assert meta["tokenizer.ggml.merges"] == [m if isinstance(m, str) else " ".join(m) for m in tokenizer["model"]["merges"]]
    # tokenizer_config.json's tokens win over config.json's ids (llama's config says bos 1), as in
    # llama.cpp's SpecialVocab
    assert (meta["tokenizer.ggml.bos_token_id"], meta["tokenizer.ggml.eos_token_id"]) == (0, 2)
    assert meta["tokenizer.ggml.padding_token_id"] == vocab[tok_config["pad_token"]]
    assert meta["tokenizer.chat_template"] == tok_config["chat_template"]


def test_transformers_tokenizer_from_the_gguf_encodes_like_tokenizer_json(apr_model, tmp_path):
    out = tmp_path / "m.gguf"
    export_apr_to_gguf(apr_model, out)
    from_gguf = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file=out.name)
    original = Tokenizer.from_file(str(TOKENIZER / "tokenizer.json"))
    assert from_gguf(SAMPLE, add_special_tokens=False).input_ids == original.encode(SAMPLE).ids


# GGUF type -> max |logit diff| / max |logit| against the .apr model (f32 weights).
OUTTYPE_TOLERANCE = {"f16": 2e-3, "bf16": 2e-2, "q8_0": 5e-2}


@pytest.mark.parametrize("outtype", sorted(OUTTYPE_TOLERANCE))
def test_outtypes_load_with_close_logits(apr_model, outtype, tmp_path):
    out = tmp_path / "m.gguf"
    report = export_apr_to_gguf(apr_model, out, outtype=outtype)
    one_d = 11 if report.architecture == "qwen2" else 5  # norms (and qwen2's q/k/v biases) stay F32
    assert report.types == {"F32": one_d, outtype.upper(): report.tensor_count - one_d}
    ours = _logits(DecoderLM.from_apr(apr_model, dtype=torch.float32).eval(), _ids())
    theirs = _logits(_load_gguf(out), _ids())
    diff = (theirs - ours).abs().max().item()
    assert 0 < diff <= OUTTYPE_TOLERANCE[outtype] * ours.abs().max().item()


def test_gguf_apr_gguf_apr_gives_identical_tensors(apr_model, tmp_path):
    """Our GGUF -> APR (import) -> GGUF (export, auto) -> APR: both .apr files hold the same bytes,
    and both GGUF files the same tensors."""
    first = tmp_path / "1.gguf"
    export_apr_to_gguf(apr_model, first, outtype="f32")
    convert_gguf(first, tmp_path / "1.apr", dtype="f32")
    export_apr_to_gguf(tmp_path / "1.apr", tmp_path / "2.gguf")
    convert_gguf(tmp_path / "2.gguf", tmp_path / "2.apr", dtype="f32")
    with open_apr(tmp_path / "1.apr") as a, open_apr(tmp_path / "2.apr") as b:
        assert a.keys() == b.keys()
        for name in a.keys():
            assert (a.info(name).dtype, a.info(name).shape) == (b.info(name).dtype, b.info(name).shape)
            assert bytes(a.raw(name)) == bytes(b.raw(name)), name
        assert a.metadata["hf_files"]["tokenizer.json"] == b.metadata["hf_files"]["tokenizer.json"]
    one, two = _gguf_tensors(first), _gguf_tensors(tmp_path / "2.gguf")
    assert sorted(one) == sorted(two)
    for name, (kind, data) in one.items():
        assert two[name][0] == kind and two[name][1].tobytes() == data.tobytes(), name
    with open_apr(apr_model) as original, open_apr(tmp_path / "2.apr") as back:
        for name in original.keys():  # and the weights are the source's (f32 in, f32 out)
            assert bytes(original.raw(name)) == bytes(back.raw(name)), name


def test_bf16_model_exports_losslessly_under_auto(hf_qwen2_bf16, tmp_path):
    convert_hf_to_apr(hf_qwen2_bf16, tmp_path / "m.apr")
    report = export_apr_to_gguf(tmp_path / "m.apr", tmp_path / "m.gguf")
    tensors = _gguf_tensors(tmp_path / "m.gguf")
    with open_apr(tmp_path / "m.apr") as f:
        assert report.types == {"BF16": 15, "F32": 11}
        for hf in f.keys():
            if hf in report.dropped:
                continue
            kind, data = tensors[gguf_name(hf)]
            if kind == "BF16":
                assert data.tobytes() == bytes(f.raw(hf)), hf
            else:  # 1-D bf16 widened to F32: exact
                assert np.array_equal(data.reshape(-1), f.to_float32(hf).reshape(-1)), hf


@pytest.mark.parametrize("kind,outtype,ggml", [("q8", "auto", "F32"), ("q4", "f16", "F16"), ("q4", "auto", "Q4_0")])
def test_quantized_source(hf_llama, kind, outtype, ggml, tmp_path):
    """q8 (and q4 under a float --outtype) is dequantized with a note; q4 under auto moves into
    GGML Q4_0 blocks that decode to exactly the same values."""
    convert_hf_to_apr(hf_llama, tmp_path / "q.apr", quantize=kind)
    result = run_apr("export", tmp_path / "q.apr", "-o", tmp_path / "q.gguf", "--outtype", outtype, check=True)
    assert ("note: dequantized 16 quantized tensors" in result.stdout) is (ggml != "Q4_0")
    assert "warning: no tokenizer.json in the .apr" in result.stdout
    tensors = _gguf_tensors(tmp_path / "q.gguf")
    with open_apr(tmp_path / "q.apr") as f:
        cfg = f.metadata
        for name in cfg["quantized_tensors"]:
            if name == "lm_head.weight" and "output.weight" not in tensors:
                continue
            kind_found, data = tensors[gguf_name(name)]
            assert kind_found == ggml, name
            values = gguf.quants.dequantize(data, Q[ggml]).reshape(f.info(name).shape)
            expected = f.to_float32(name)
            heads = {"q_proj": cfg["num_heads"], "k_proj": cfg["num_kv_heads"]}.get(name.split(".")[-2])
            if heads:
                expected = llama_permute(expected, heads)
            if ggml == "F16":
                expected = expected.astype(np.float16).astype(np.float32)
            assert np.array_equal(values, expected), name
    ours = _logits(DecoderLM.from_apr(tmp_path / "q.apr", dtype=torch.float32).eval(), _ids() % 320)
    theirs = _logits(_load_gguf(tmp_path / "q.gguf"), _ids() % 320)
    assert (theirs - ours).abs().max().item() < (1e-4 if ggml != "F16" else 1e-2)


def test_bad_input_is_one_line_and_leaves_nothing(apr_model, hf_bert, tmp_path):
    out = tmp_path / "m.gguf"
    bad = run_apr("export", apr_model, "-o", out, "--outtype", "q4_k")
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1
    assert "apr: error: --outtype: 'q4_k' is not one of 'auto', 'f32', 'f16', 'bf16', 'q8_0'" in bad.stderr
    with pytest.raises(InvalidArgument, match="--outtype 'q4' is not one of auto, f32, f16, bf16, q8_0"):
        export_apr_to_gguf(apr_model, out, outtype="q4")
    wrong = run_apr("export", apr_model, "-o", tmp_path / "folder", "--outtype", "f16")
    assert wrong.returncode == 2 and "--outtype: applies to --format gguf only" in wrong.stderr
    convert_hf_to_apr(hf_bert, tmp_path / "bert.apr")
    with pytest.raises(UnsupportedArchitecture, match="architecture 'bert' cannot be exported to GGUF"):
        export_apr_to_gguf(tmp_path / "bert.apr", out)
    encoder = run_apr("export", tmp_path / "bert.apr", "-o", out)
    assert encoder.returncode == 2 and encoder.stderr.startswith("apr: error: ") and encoder.stderr.count("\n") == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bert.apr"]


def test_kept_k_quant_blocks_go_back_to_gguf_unchanged(tmp_path):
    """GGUF (Q4_K / Q6_K) -> APR --keep-quant -> GGUF auto: every tensor's bytes as in the source,
    llama q/k rows permuted back as whole rows of blocks."""
    from test_gguf import write_k_quant_gguf

    raw = write_k_quant_gguf(tmp_path / "k.gguf")
    convert_gguf(tmp_path / "k.gguf", tmp_path / "k.apr", keep_quant=True, dtype="f32")
    report = export_apr_to_gguf(tmp_path / "k.apr", tmp_path / "back.gguf")
    assert report.types == {"F32": 3, "Q4_K": 7, "Q6_K": 2} and report.dequantized == []
    source, back = _gguf_tensors(tmp_path / "k.gguf"), _gguf_tensors(tmp_path / "back.gguf")
    assert sorted(source) == sorted(back)
    for name, (kind, data) in source.items():
        assert back[name][0] == kind and back[name][1].tobytes() == data.tobytes(), name
    assert all(back[name][1].tobytes() == blocks.tobytes() for name, blocks in raw.items())


def test_mistral_is_written_as_llama_like_llama_cpp_and_says_so(tmp_path):
    """llama.cpp has no "mistral" GGUF architecture: a Mistral model goes out as "llama" (q/k rows in
    its order), transformers' GGUF loader gives the logits of the original MistralForCausalLM, and the
    report says what is lost (the family name and the sliding window)."""
    folder = _sharp_model_with_tokenizer(build_hf_checkpoint(tmp_path / "hf", "mistral", vocab_size=512))
    convert_hf_to_apr(folder, tmp_path / "m.apr")
    out = tmp_path / "m.gguf"
    report = export_apr_to_gguf(tmp_path / "m.apr", out, outtype="f32")
    assert report.architecture == "llama"
    window = json.loads((folder / "config.json").read_text())["sliding_window"]
    assert (f"mistral is written as GGUF architecture 'llama', as llama.cpp does; reading it back gives a llama "
            f"model; its sliding_window {window} has no GGUF key, so llama.cpp attends to the whole context"
            ) in report.warnings
    assert read_metadata(gguf.GGUFReader(out), str(out))["general.architecture"] == "llama"
    original = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    assert (_logits(_load_gguf(out), _ids()) - _logits(original, _ids())).abs().max().item() < 1e-4
