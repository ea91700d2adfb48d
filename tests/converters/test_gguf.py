"""GGUF -> .apr: GGUFs written here the way llama.cpp writes them, converted back and compared with the HF original."""

from __future__ import annotations

import json
import os
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
import transformers
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

from apr_format import Flag, open_apr
from apr_testing import llama_permute, run_apr, run_apr_json
from apr_format.errors import (
    AprError, CorruptSource, MissingConfigKey, MissingTensor, OutputExists, Truncated, UnsupportedArchitecture,
)
from apr_converters.gguf_to_apr import convert_gguf
from apr_trainer.model import DecoderLM

Q = gguf.GGMLQuantizationType
SAMPLE = "The quick brown fox jumps over the lazy dog. It's 2024, isn't it?\n<|im_start|>user hi<|im_end|>"
CORPUS = [
    "the quick brown fox jumps over the lazy dog and the dog sleeps in the sun",
    "it is what it is, isn't it? numbers like 2024 and 1999 appear here and there",
    "hello world, hello there; the fox and the dog are friends",
] * 20
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
PRE_OF = {"llama": "gpt2", "qwen2": "qwen2"}  # tokenizer.ggml.pre written for each family


# -- GGUF writing, as llama.cpp's convert_hf_to_gguf.py does it ----------------------------------
# Pre-tokenization as the HF tokenizer.json of each model spells it, by tokenizer.ggml.pre.
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
               r"|\s*[\r\n]+|\s+(?!\S)|\s+")
PRE_TOKENIZERS = {
    "gpt2": lambda: pre_tokenizers.ByteLevel(add_prefix_space=False),
    "qwen2": lambda: pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ]),
}


def train_tokenizer(pre: str = "gpt2", vocab_size: int = 300) -> Tokenizer:
    """A byte-level BPE tokenizer (GPT-2's or Qwen2's pre-tokenization) trained on CORPUS."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = PRE_TOKENIZERS[pre]()
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIALS, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(CORPUS, trainer)
    return tok


def add_bpe_tokenizer(w: gguf.GGUFWriter, tok: Tokenizer, n_vocab: int, pre: str) -> None:
    """tokenizer.ggml.* keys of a byte-level BPE, padded with [PAD{i}] like llama.cpp."""
    state = json.loads(tok.to_str())
    by_id = {i: t for t, i in tok.get_vocab(with_added_tokens=True).items()}
    tokens = [by_id[i] for i in range(len(by_id))]
    types = [3 if t in SPECIALS else 1 for t in tokens]
    tokens += [f"[PAD{i}]" for i in range(len(tokens), n_vocab)]
    types += [5] * (n_vocab - len(types))
    merges = [m if isinstance(m, str) else " ".join(m) for m in state["model"]["merges"]]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(tokens.index("<|im_start|>"))
    w.add_eos_token_id(tokens.index("<|im_end|>"))


def write_gguf(
    path: Path, model: torch.nn.Module, qtype: Q, *, tokenizer: Tokenizer | None = None,
    drop: tuple[str, ...] = (), arch: str | None = None, block_count: int | None = None,
    extra: dict[str, np.ndarray] | None = None, name: str | None = None,
) -> Path:
    """Write an HF Llama / Qwen2 model as llama.cpp would: GGUF names (gguf's own TensorNameMap),
    q/k rows permuted for llama, 1-D tensors in F32, 2-D tensors in `qtype`."""
    cfg = model.config
    family = cfg.model_type
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    w = gguf.GGUFWriter(str(path), arch or family)
    if name is not None:
        w.add_name(name)
    w.add_block_count(block_count or cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_vocab_size(cfg.vocab_size)
    w.add_rope_dimension_count(head_dim)
    if tokenizer is not None:
        add_bpe_tokenizer(w, tokenizer, cfg.vocab_size, PRE_OF[family])
    gguf_arch = gguf.MODEL_ARCH.LLAMA if family == "llama" else gguf.MODEL_ARCH.QWEN2
    names = gguf.get_tensor_name_map(gguf_arch, cfg.num_hidden_layers)
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        data = tensor.float().numpy()
        if family == "llama" and ".q_proj." in name:
            data = llama_permute(data, cfg.num_attention_heads)
        if family == "llama" and ".k_proj." in name:
            data = llama_permute(data, cfg.num_key_value_heads)
        gguf_name = names.get_name(name, try_suffixes=(".weight", ".bias"))
        if gguf_name in drop:
            continue
        if data.ndim == 1 or qtype == Q.F32:
            w.add_tensor(gguf_name, np.ascontiguousarray(data, dtype=np.float32))
        elif qtype == Q.F16:
            w.add_tensor(gguf_name, data.astype(np.float16))
        else:
            w.add_tensor(gguf_name, gguf.quants.quantize(data, qtype), raw_dtype=qtype)
    for name, data in (extra or {}).items():
        w.add_tensor(name, data)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="module")
def tokenizer(hf_model) -> Tokenizer:
    """Trained with the pre-tokenization real GGUFs of that family state (gpt2 / qwen2)."""
    return train_tokenizer(PRE_OF[hf_model.config.model_type])


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def hf_model(request) -> torch.nn.Module:
    """The tiny HF model with q/k scaled up so attention is sharp: a wrong q/k row order then
    changes the logits by far more than any tolerance below."""
    folder = request.getfixturevalue(f"hf_{request.param}")
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(12.0)
            layer.self_attn.k_proj.weight.mul_(12.0)
    return model


def _ids(vocab: int) -> torch.Tensor:
    return torch.randint(0, vocab, (2, 24), generator=torch.Generator().manual_seed(0))


def _load_into_transformers(apr_path: Path) -> torch.nn.Module:
    """A transformers model built from the .apr's hf_config with its tensors, strict."""
    with open_apr(apr_path) as f:
        hf_config = {k: v for k, v in f.metadata["hf_config"].items() if k != "torch_dtype"}
        config = transformers.AutoConfig.for_model(**hf_config)
        model = transformers.AutoModelForCausalLM.from_config(config).eval()
        state = {name: f.torch(name).float() for name in f.keys()}
    model.load_state_dict(state, strict=True)
    return model.float()


# -- tests -------------------------------------------------------------------------------------
def test_f32_gguf_gives_the_hf_tensors_bit_for_bit(hf_model, tokenizer, tmp_path):
    """F32 in, f32 out: every tensor equals the HF original byte for byte (q/k permutation undone)."""
    src = write_gguf(tmp_path / "m.gguf", hf_model, Q.F32, tokenizer=tokenizer)
    report = convert_gguf(src, tmp_path / "m.apr", dtype="f32")
    cfg = hf_model.config
    expected = dict(hf_model.state_dict())
    with open_apr(tmp_path / "m.apr") as f:
        assert sorted(f.keys()) == sorted(expected)
        for name, tensor in expected.items():
            assert f.info(name).dtype == "f32"
            assert f.info(name).shape == tuple(tensor.shape), name
            assert f[name].tobytes() == tensor.numpy().tobytes(), name
        meta = f.metadata
    assert report.tensor_count == len(expected)
    assert report.lm_head_copy is cfg.tie_word_embeddings
    assert meta["tied_embeddings"] is cfg.tie_word_embeddings
    assert meta["architecture"] == cfg.model_type and meta["original_format"] == "gguf"
    assert (meta["num_layers"], meta["num_heads"], meta["num_kv_heads"]) == (2, 4, 2)
    assert (meta["hidden_size"], meta["vocab_size"], meta["intermediate_size"]) == (64, cfg.vocab_size, 128)
    assert meta["rope_theta"] == cfg.rope_parameters["rope_theta"] and meta["rms_norm_eps"] == cfg.rms_norm_eps
    assert meta["rope_type"] == 2


def test_bf16_output_is_torch_rounding_of_the_source(hf_model, tmp_path):
    src = write_gguf(tmp_path / "m.gguf", hf_model, Q.F32)
    report = convert_gguf(src, tmp_path / "m.apr", dtype="bf16")
    assert report.dtype == "bf16" and set(report.dtypes) == {"bf16"}
    assert {c["reason"] for c in report.dtype_choices} == {"cast to bf16 (--dtype bf16: values rounded)"}
    with open_apr(tmp_path / "m.apr") as f:
        for name, tensor in hf_model.state_dict().items():
            assert torch.equal(f.torch(name), tensor.to(torch.bfloat16)), name
        assert f.metadata["hf_config"]["torch_dtype"] == "bfloat16"
        assert f.flags == Flag.LAYOUT_ROW_MAJOR  # no tokenizer, no quantized tensor


@pytest.mark.parametrize("qtype", [Q.F16, Q.Q8_0, Q.Q4_1], ids=lambda q: q.name)
def test_default_output_is_lossless_and_says_so(hf_llama, qtype, tmp_path):
    """No --dtype: F16 stays f16 byte for byte, quantized blocks become exactly gguf's f32 values (never bf16)."""
    model = transformers.AutoModelForCausalLM.from_pretrained(hf_llama, dtype=torch.float32)
    src = write_gguf(tmp_path / "m.gguf", model, qtype)
    report = convert_gguf(src, tmp_path / "m.apr")
    reader = gguf.GGUFReader(src)
    stored = {t.name: (t.tensor_type, np.asarray(t.data)) for t in reader.tensors}
    with open_apr(tmp_path / "m.apr") as f:
        kind, data = stored["blk.0.ffn_down.weight"]
        down = f["model.layers.0.mlp.down_proj.weight"]
        if qtype == Q.F16:
            assert down.dtype == np.float16 and down.tobytes() == data.tobytes()
        else:
            assert down.dtype == np.float32
            np.testing.assert_array_equal(down, gguf.quants.dequantize(data, kind))
        assert f.info("model.norm.weight").dtype == "f32"  # F32 norms kept
        assert "bf16" not in {t.dtype for t in f.tensors()}
    choices = {c["source_type"]: c for c in report.dtype_choices}
    assert choices["F32"]["output"] == "f32" and "kept as it is" in choices["F32"]["reason"]
    if qtype != Q.F16:
        assert choices[qtype.name]["output"] == "f32"
        assert "every value exact" in choices[qtype.name]["reason"] and "--dtype bf16" in choices[qtype.name]["reason"]
    proc = run_apr("convert", src, "-o", tmp_path / "cli.apr", check=True)
    assert f"{qtype.name}: " in proc.stdout and "lossless default" in proc.stdout


def test_keep_quant_says_which_blocks_it_could_not_keep(hf_llama, tmp_path):
    """--keep-quant on a Q4_1 file: nothing can be kept; the report says so and why, per type."""
    model = transformers.AutoModelForCausalLM.from_pretrained(hf_llama, dtype=torch.float32)
    src = write_gguf(tmp_path / "m.gguf", model, Q.Q4_1)
    proc = run_apr("convert", src, "-o", tmp_path / "m.apr", "--keep-quant", check=True)
    line = next(line for line in proc.stdout.splitlines() if line.strip().startswith("Q4_1:"))
    assert "-> f32" in line and "APR keeps only Q4_K and Q6_K blocks" in line


# Tolerances on max |logit difference| sized for each GGUF type (relative to max |logit|).
QUANT_CASES = [(Q.F32, "f32", 1e-5), (Q.F16, "f32", 5e-3), (Q.BF16, "bf16", 3e-2), (Q.Q8_0, "bf16", 6e-2)]


@pytest.mark.parametrize("qtype,dtype,tolerance", QUANT_CASES, ids=[c[0].name for c in QUANT_CASES])
def test_logits_match_the_hf_model(hf_model, qtype, dtype, tolerance, tmp_path):
    """Our DecoderLM on the converted file, and transformers on its tensors, give the original's logits."""
    src = write_gguf(tmp_path / "m.gguf", hf_model, qtype)
    convert_gguf(src, tmp_path / "m.apr", dtype=dtype)
    ids = _ids(hf_model.config.vocab_size)
    with torch.no_grad():
        expected = hf_model(ids).logits
        ours = DecoderLM.from_apr(tmp_path / "m.apr", dtype=torch.float32)(ids)
        theirs = _load_into_transformers(tmp_path / "m.apr")(ids).logits
        scale = expected.abs().max().item()
        # The test can fail: the same weights with q/k left in GGUF's order are far off.
        scrambled = _with_gguf_qk_order(hf_model)(ids).logits if hf_model.config.model_type == "llama" else None
    assert (ours - expected).abs().max().item() <= tolerance * scale
    assert (theirs - expected).abs().max().item() <= tolerance * scale
    if scrambled is not None:
        assert (scrambled - expected).abs().max().item() > 10 * tolerance * scale


def _with_gguf_qk_order(model: torch.nn.Module) -> torch.nn.Module:
    import copy

    cfg = model.config
    scrambled = copy.deepcopy(model)
    with torch.no_grad():
        for layer in scrambled.model.layers:
            q, k = layer.self_attn.q_proj.weight, layer.self_attn.k_proj.weight
            q.copy_(torch.from_numpy(llama_permute(q.numpy(), cfg.num_attention_heads)))
            k.copy_(torch.from_numpy(llama_permute(k.numpy(), cfg.num_key_value_heads)))
    return scrambled


@pytest.mark.parametrize("qtype", [Q.Q4_0, Q.Q4_1, Q.Q5_0], ids=lambda q: q.name)
def test_4_and_5_bit_types_dequantize_to_what_gguf_says(hf_llama, qtype, tmp_path):
    """Each tensor equals gguf's dequantization of the stored blocks, rows back in HF order."""
    model = transformers.AutoModelForCausalLM.from_pretrained(hf_llama, dtype=torch.float32)
    src = write_gguf(tmp_path / "m.gguf", model, qtype)
    convert_gguf(src, tmp_path / "m.apr", dtype="f32")
    cfg = model.config
    reader = gguf.GGUFReader(src)
    stored = {t.name: gguf.quants.dequantize(np.asarray(t.data), t.tensor_type) for t in reader.tensors}
    order = np.argsort(llama_permute(np.arange(cfg.hidden_size), cfg.num_attention_heads))
    kv_order = np.argsort(llama_permute(np.arange(cfg.num_key_value_heads * 16), cfg.num_key_value_heads))
    with open_apr(tmp_path / "m.apr") as f:
        np.testing.assert_array_equal(f["model.layers.1.self_attn.q_proj.weight"], stored["blk.1.attn_q.weight"][order])
        k = f["model.layers.0.self_attn.k_proj.weight"]
        np.testing.assert_array_equal(k, stored["blk.0.attn_k.weight"][kv_order])
        np.testing.assert_array_equal(f["model.layers.0.mlp.down_proj.weight"], stored["blk.0.ffn_down.weight"])
        np.testing.assert_array_equal(f["lm_head.weight"], stored["output.weight"])
        original = model.state_dict()["model.layers.0.mlp.up_proj.weight"].numpy()
        error = np.abs(f["model.layers.0.mlp.up_proj.weight"] - original).max()
        assert 0 < error < 0.25 * np.abs(original).max()  # lossy, but the same tensor


def test_tokenizer_round_trips_token_ids(hf_model, tokenizer, tmp_path):
    src = write_gguf(tmp_path / "m.gguf", hf_model, Q.F16, tokenizer=tokenizer)
    report = convert_gguf(src, tmp_path / "m.apr")
    assert report.tokenizer == "gpt2"
    assert report.carried_files == ["generation_config.json", "tokenizer.json", "tokenizer_config.json"]
    with open_apr(tmp_path / "m.apr") as f:
        meta, flags = f.metadata, f.flags
    rebuilt = Tokenizer.from_str(meta["hf_files"]["tokenizer.json"])
    expected = tokenizer.encode(SAMPLE).ids
    assert rebuilt.encode(SAMPLE).ids == expected
    assert rebuilt.decode(expected, skip_special_tokens=False) == SAMPLE
    assert flags & Flag.HAS_VOCAB
    assert meta["tokenizer.vocabulary"][: tokenizer.get_vocab_size()] == [
        tokenizer.id_to_token(i) for i in range(tokenizer.get_vocab_size())
    ]
    assert meta["tokenizer.vocab_size"] == hf_model.config.vocab_size  # padded like llama.cpp
    config = json.loads(meta["hf_files"]["tokenizer_config.json"])
    assert (config["bos_token"], config["eos_token"]) == ("<|im_start|>", "<|im_end|>")
    assert meta["hf_config"]["bos_token_id"] == tokenizer.token_to_id("<|im_start|>")


def test_sentencepiece_vocabulary_is_rebuilt_with_merges_and_byte_fallback():
    """tokenizer.ggml.model "llama": merges come from the scores, unknown bytes fall back to <0xNN>."""
    from apr_converters.gguf_tokenizer import tokenizer_files

    pieces = ["\u2581", "t", "h", "e", "c", "a", "\u2581t", "he", "\u2581the", "at", "\u2581c", "\u2581cat"]
    tokens = ["<unk>", "<s>", "</s>", *[f"<0x{b:02X}>" for b in range(256)], *pieces]
    scores = [0.0] * 259 + [-100.0] * 6 + [-1.0, -2.0, -3.0, -4.0, -5.0, -6.0]
    types = [2, 3, 3] + [6] * 256 + [1] * len(pieces)
    meta = {
        "tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": tokens, "tokenizer.ggml.scores": scores,
        "tokenizer.ggml.token_type": types, "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2,
        "tokenizer.ggml.unknown_token_id": 0,
    }
    files = tokenizer_files(meta, "x.gguf")
    tok = Tokenizer.from_str(files.files["tokenizer.json"])
    ids = tok.encode("the cat").ids
    assert ids == [1, tokens.index("\u2581the"), tokens.index("\u2581cat")]  # add_bos defaults on for "llama"
    assert tok.decode(ids, skip_special_tokens=True) == "the cat"
    accented = tok.encode("the caté").ids
    assert tokens.index("<0xC3>") in accented and tokens.index("<0xA9>") in accented
    assert tok.decode(accented, skip_special_tokens=True) == "the caté"


K_QUANT_SIZES = dict(hidden=256, heads=4, kv_heads=2, ffn=256, vocab=64)


def write_k_quant_gguf(path: Path) -> dict[str, np.ndarray]:
    """A one-layer llama GGUF of random Q4_K / Q6_K matrices (F32 norms); returns the raw blocks."""
    hidden, heads, kv_heads, ffn, vocab = K_QUANT_SIZES.values()
    rng = np.random.default_rng(0)
    w = gguf.GGUFWriter(str(path), "llama")
    for add, value in ((w.add_block_count, 1), (w.add_context_length, 64), (w.add_embedding_length, hidden),
                       (w.add_feed_forward_length, ffn), (w.add_head_count, heads), (w.add_head_count_kv, kv_heads),
                       (w.add_layer_norm_rms_eps, 1e-5), (w.add_rope_freq_base, 10000.0)):
        add(value)
    raw = {}
    shapes = {"token_embd.weight": (vocab, hidden), "output.weight": (vocab, hidden),
              "blk.0.attn_q.weight": (hidden, hidden), "blk.0.attn_k.weight": (kv_heads * 64, hidden),
              "blk.0.attn_v.weight": (kv_heads * 64, hidden), "blk.0.attn_output.weight": (hidden, hidden),
              "blk.0.ffn_gate.weight": (ffn, hidden), "blk.0.ffn_up.weight": (ffn, hidden),
              "blk.0.ffn_down.weight": (hidden, ffn)}
    for name, (rows, cols) in shapes.items():
        qtype = Q.Q6_K if name in ("token_embd.weight", "blk.0.ffn_down.weight") else Q.Q4_K
        raw[name] = _random_k_blocks(rng, qtype, rows, cols)
        w.add_tensor(name, raw[name], raw_dtype=qtype)
    for name in ("blk.0.attn_norm.weight", "blk.0.ffn_norm.weight", "output_norm.weight"):
        w.add_tensor(name, rng.standard_normal(hidden).astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return raw


def test_keep_quant_copies_k_quant_rows_raw(tmp_path):
    """--keep-quant: Q4_K / Q6_K bytes stored as APR q4_k / q6_k, q/k rows un-permuted as whole rows."""
    hidden, heads, kv_heads = K_QUANT_SIZES["hidden"], K_QUANT_SIZES["heads"], K_QUANT_SIZES["kv_heads"]
    path = tmp_path / "k.gguf"
    raw = write_k_quant_gguf(path)
    report = convert_gguf(path, tmp_path / "raw.apr", keep_quant=True)
    convert_gguf(path, tmp_path / "f32.apr", dtype="f32")
    assert report.kept_quantized == 9 and report.dtypes == {"f32": 3, "q4_k": 7, "q6_k": 2}
    assert {c["source_type"]: c["reason"] for c in report.dtype_choices} == {
        "Q4_K": "kept as quantized blocks (--keep-quant)", "Q6_K": "kept as quantized blocks (--keep-quant)",
        "F32": "kept as it is (lossless default)"}
    q_order = np.argsort(llama_permute(np.arange(hidden), heads))
    k_order = np.argsort(llama_permute(np.arange(kv_heads * 64), kv_heads))
    with open_apr(tmp_path / "raw.apr") as f, open_apr(tmp_path / "f32.apr") as g:
        assert f.flags & Flag.QUANTIZED and f.metadata["quantization"]["block_size"] == 256
        q = f["model.layers.0.self_attn.q_proj.weight"]
        assert f.info("model.layers.0.self_attn.q_proj.weight").dtype == "q4_k"
        assert f.info("model.embed_tokens.weight").dtype == "q6_k"
        assert q.tobytes() == raw["blk.0.attn_q.weight"][q_order].tobytes()
        assert f["model.layers.0.self_attn.k_proj.weight"].tobytes() == raw["blk.0.attn_k.weight"][k_order].tobytes()
        assert f["model.layers.0.mlp.down_proj.weight"].tobytes() == raw["blk.0.ffn_down.weight"].tobytes()
        # The raw rows dequantize to exactly what the dequantizing conversion wrote.
        for name, qtype in (("model.layers.0.self_attn.q_proj.weight", Q.Q4_K), ("model.embed_tokens.weight", Q.Q6_K)):
            rows = g.info(name).shape[0]
            values = gguf.quants.dequantize(np.asarray(f[name]).reshape(rows, -1), qtype)
            np.testing.assert_array_equal(values, g[name])


def _random_k_blocks(rng: np.random.Generator, qtype: Q, rows: int, cols: int) -> np.ndarray:
    """Valid Q4_K / Q6_K rows: random quants with small finite f16 scales."""
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    data = rng.integers(0, 256, (rows, cols // block, size), dtype=np.uint8)
    if qtype == Q.Q4_K:  # d, dmin first
        data[:, :, 0:4] = np.array([0.01, 0.005], dtype="<f2").view(np.uint8)
    else:  # Q6_K: d last
        data[:, :, size - 2 : size] = np.array([0.001], dtype="<f2").view(np.uint8)
    return data.reshape(rows, -1)


# -- bad input ---------------------------------------------------------------------------------
def _leftovers(folder: Path) -> list[str]:
    return sorted(p for p in os.listdir(folder) if p.endswith((".apr", ".apr-tmp")))


def test_unknown_architecture_is_refused(hf_llama, tmp_path):
    model = transformers.AutoModelForCausalLM.from_pretrained(hf_llama, dtype=torch.float32)
    src = write_gguf(tmp_path / "m.gguf", model, Q.F32, arch="phi3")
    with pytest.raises(UnsupportedArchitecture) as exc:
        convert_gguf(src, tmp_path / "m.apr")
    assert str(exc.value) == f"{src}: GGUF architecture 'phi3' is not supported (supported: llama, qwen2)"
    assert _leftovers(tmp_path) == []


@pytest.mark.parametrize("keep", [0.5, 0.98, 100 / 1e9], ids=["in-tensors", "last-bytes", "in-header"])
def test_truncated_gguf_is_corrupt_source_and_leaves_nothing(hf_llama, keep, tmp_path):
    model = transformers.AutoModelForCausalLM.from_pretrained(hf_llama, dtype=torch.float32)
    src = write_gguf(tmp_path / "m.gguf", model, Q.Q8_0)
    data = src.read_bytes()
    src.write_bytes(data[: max(24, int(len(data) * keep))])
    with pytest.raises(CorruptSource) as exc:
        convert_gguf(src, tmp_path / "m.apr")
    assert str(exc.value).startswith(f"{src}: ")
    assert "\n" not in str(exc.value)
    assert _leftovers(tmp_path) == []


def test_not_a_gguf_file(tmp_path):
    src = tmp_path / "m.gguf"
    src.write_bytes(b"PK\x03\x04" + bytes(100))
    with pytest.raises(CorruptSource, match=r"not a GGUF file: magic is b'PK\\x03\\x04'"):
        convert_gguf(src, tmp_path / "m.apr")


def test_missing_layer_tensor_and_missing_key(hf_llama, tmp_path):
    model = transformers.AutoModelForCausalLM.from_pretrained(hf_llama, dtype=torch.float32)
    src = write_gguf(tmp_path / "a.gguf", model, Q.F32, drop=("blk.1.ffn_up.weight",))
    with pytest.raises(MissingTensor, match=r"model.layers.1.mlp.up_proj.weight"):
        convert_gguf(src, tmp_path / "a.apr")
    src = write_gguf(tmp_path / "b.gguf", model, Q.F32, block_count=3)
    with pytest.raises(MissingTensor, match=r"model.layers.2"):
        convert_gguf(src, tmp_path / "b.apr")
    assert _leftovers(tmp_path) == []


def test_rope_freqs_is_dropped_with_a_warning_and_unknown_tensors_refused(hf_llama, tmp_path):
    model = transformers.AutoModelForCausalLM.from_pretrained(hf_llama, dtype=torch.float32)
    src = write_gguf(tmp_path / "a.gguf", model, Q.F32, extra={"rope_freqs.weight": np.ones(8, np.float32)})
    report = convert_gguf(src, tmp_path / "a.apr")
    assert report.skipped == ["rope_freqs.weight"]
    assert report.warnings == [
        "rope_freqs.weight dropped: llama3-style rope scaling is not supported, plain RoPE is used",
        "the GGUF has no tokenizer (tokenizer.ggml.model absent)",
    ]
    src = write_gguf(tmp_path / "b.gguf", model, Q.F32, extra={"blk.0.attn_q_norm.weight": np.ones(16, np.float32)})
    with pytest.raises(UnsupportedArchitecture, match=r"tensor 'blk.0.attn_q_norm.weight' has no HF name"):
        convert_gguf(src, tmp_path / "b.apr")


def test_output_exists_needs_force(hf_qwen2, tmp_path):
    model = transformers.AutoModelForCausalLM.from_pretrained(hf_qwen2, dtype=torch.float32)
    src = write_gguf(tmp_path / "m.gguf", model, Q.F32)
    (tmp_path / "m.apr").write_bytes(b"keep me")
    with pytest.raises(OutputExists):
        convert_gguf(src, tmp_path / "m.apr")
    assert (tmp_path / "m.apr").read_bytes() == b"keep me"
    convert_gguf(src, tmp_path / "m.apr", force=True)
    with open_apr(tmp_path / "m.apr") as f:
        assert "lm_head.weight" in f.keys()


def test_tied_model_without_head_copy(hf_qwen2, tmp_path):
    model = transformers.AutoModelForCausalLM.from_pretrained(hf_qwen2, dtype=torch.float32)
    src = write_gguf(tmp_path / "m.gguf", model, Q.F32)
    report = convert_gguf(src, tmp_path / "m.apr", lm_head_copy=False)
    with open_apr(tmp_path / "m.apr") as f:
        assert "lm_head.weight" not in f.keys() and f.metadata["tied_embeddings"] is True
    assert report.lm_head_copy is False and report.tensor_count == len(model.state_dict()) - 1


def test_missing_required_metadata_key(tmp_path):
    w = gguf.GGUFWriter(str(tmp_path / "m.gguf"), "llama")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((8, 4), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(MissingConfigKey, match=r"metadata lacks llama.embedding_length, llama.feed_forward_length"):
        convert_gguf(tmp_path / "m.gguf", tmp_path / "m.apr")


def test_row_chunks_give_the_same_bytes(hf_llama, tmp_path, monkeypatch):
    """Dequantizing a few rows at a time (as for big tensors) changes nothing."""
    from apr_converters import gguf_to_apr

    model = transformers.AutoModelForCausalLM.from_pretrained(hf_llama, dtype=torch.float32)
    src = write_gguf(tmp_path / "m.gguf", model, Q.Q8_0)
    convert_gguf(src, tmp_path / "whole.apr")
    monkeypatch.setattr(gguf_to_apr, "CHUNK_VALUES", 3 * 64)  # 3 rows of 64 per chunk: ragged last chunk
    convert_gguf(src, tmp_path / "chunked.apr")
    with open_apr(tmp_path / "whole.apr") as a, open_apr(tmp_path / "chunked.apr") as b:
        assert a.keys() == b.keys()
        for name in a.keys():
            assert a[name].tobytes() == b[name].tobytes(), name


def test_cli_convert_validate_export_then_transformers_loads_it(hf_model, tokenizer, tmp_path):
    """The installed `apr`: convert a GGUF, validate it, export it; transformers loads the folder
    (model and tokenizer) and gives the original logits."""
    src = write_gguf(tmp_path / "m.gguf", hf_model, Q.F32, tokenizer=tokenizer)
    report = run_apr_json("convert", src, "-o", tmp_path / "m.apr", "--dtype", "f32")
    assert report["family"] == hf_model.config.model_type
    assert report["source_types"] == {"F32": len(hf_model.state_dict()) - (1 if report["lm_head_copy"] else 0)}
    assert run_apr("validate", tmp_path / "m.apr").returncode == 0
    run_apr("export", tmp_path / "m.apr", "-o", tmp_path / "hf", check=True)
    exported = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    ids = _ids(hf_model.config.vocab_size)
    with torch.no_grad():
        torch.testing.assert_close(exported(ids).logits, hf_model(ids).logits, rtol=0, atol=1e-5)
    assert hf_tokenizer(SAMPLE)["input_ids"] == tokenizer.encode(SAMPLE).ids
    generation = json.loads((tmp_path / "hf" / "generation_config.json").read_text())
    assert generation["eos_token_id"] == tokenizer.token_to_id("<|im_end|>")


def test_cli_truncated_gguf_is_one_line_exit_2(hf_qwen2, tmp_path):
    model = transformers.AutoModelForCausalLM.from_pretrained(hf_qwen2, dtype=torch.float32)
    src = write_gguf(tmp_path / "m.gguf", model, Q.F16)
    src.write_bytes(src.read_bytes()[:-1000])
    proc = run_apr("convert", src, "-o", tmp_path / "m.apr")
    assert proc.returncode == 2
    assert proc.stderr.startswith(f"apr: error: {src}: ") and proc.stderr.count("\n") == 1, proc.stderr
    assert _leftovers(tmp_path) == []


def test_mutated_headers_give_apr_errors_or_a_valid_file(hf_qwen2, tmp_path):
    """Random byte and length corruption of the header, key/values and tensor table: every outcome is
    a converted file or an AprError (never another exception, never a hang)."""
    import random

    model = transformers.AutoModelForCausalLM.from_pretrained(hf_qwen2, dtype=torch.float32)
    src = write_gguf(tmp_path / "m.gguf", model, Q.F32, tokenizer=train_tokenizer("qwen2"))
    original = src.read_bytes()
    header_end = gguf.GGUFReader(src).data_offset
    rng = random.Random(0)
    outcomes = {"converted": 0, "refused": 0}
    for case in range(150):
        data = bytearray(original)
        at = rng.randrange(header_end - 8)
        if case % 3 == 0:  # a huge or odd length / count / type field
            data[at : at + 8] = rng.choice([2**63, 2**32 - 1, 2**40, 7, 0]).to_bytes(8, "little")
        else:
            for _ in range(rng.randint(1, 4)):
                data[rng.randrange(header_end)] = rng.randrange(256)
        bad = tmp_path / "bad.gguf"
        bad.write_bytes(bytes(data))
        try:
            convert_gguf(bad, tmp_path / "bad.apr", force=True)
            with open_apr(tmp_path / "bad.apr") as f:
                f.verify()
            outcomes["converted"] += 1
        except AprError:
            outcomes["refused"] += 1
    assert outcomes["refused"] > 50, outcomes


# -- GGUF in inspect, tensors and diff, under any name ------------------------------------------
def test_inspect_and_tensors_read_gguf_whatever_its_name(hf_llama, tmp_path):
    model = transformers.AutoModelForCausalLM.from_pretrained(hf_llama, dtype=torch.float32)
    src = write_gguf(tmp_path / "m.gguf", model, Q.Q8_0)
    renamed = tmp_path / "weights.bin"
    os.rename(src, renamed)
    doc = run_apr_json("inspect", renamed)
    assert (doc["format"], doc["architecture"], doc["num_layers"], doc["vocab_size"]) == ("gguf", "llama", 2, 320)
    assert doc["metadata"]["general.architecture"] == "llama" and doc["checksum"] == "none in this format"
    assert doc["total_params"] == sum(p.numel() for p in model.parameters())
    assert set(doc["dtypes"]) == {"Q8_0", "F32"}
    listing = run_apr_json("tensors", renamed)
    reader = gguf.GGUFReader(renamed)
    assert listing["count"] == len(reader.tensors)
    by_name = {t["name"]: t for t in listing["tensors"]}
    embd = next(t for t in reader.tensors if t.name == "token_embd.weight")
    assert by_name["token_embd.weight"] == {"name": "token_embd.weight", "dtype": "Q8_0", "shape": [320, 64],
                                            "nbytes": int(embd.n_bytes), "offset": int(embd.data_offset)}
    names = [t["name"] for t in listing["tensors"]]
    assert names.index("blk.0.attn_k.weight") < names.index("blk.1.attn_k.weight")
    out = tmp_path / "m.apr"
    run_apr("convert", renamed, "-o", out, check=True)
    with open_apr(out) as f:
        assert f.metadata["original_format"] == "gguf"


def test_diff_compares_a_gguf_with_its_conversion(hf_llama, tmp_path):
    model = transformers.AutoModelForCausalLM.from_pretrained(hf_llama, dtype=torch.float32)
    src = write_gguf(tmp_path / "m.gguf", model, Q.Q8_0)
    convert_gguf(src, tmp_path / "lossless.apr")
    convert_gguf(src, tmp_path / "small.apr", dtype="bf16")
    same = json.loads(run_apr("diff", src, tmp_path / "lossless.apr", "--json").stdout)
    assert same["only_in_a"] == [] and same["only_in_b"] == []
    assert all(t["max_abs_diff"] == 0.0 for t in same["tensors"]), same["tensors"]
    rounded = json.loads(run_apr("diff", src, tmp_path / "small.apr", "--json").stdout)
    down = next(t for t in rounded["tensors"] if t["name"] == "model.layers.0.mlp.down_proj.weight")
    assert down["dtype"] == ["Q8_0", "bf16"] and down["max_abs_diff"] > 0


def test_name_comes_from_general_name_not_the_file_name(hf_llama, tmp_path):
    model = transformers.AutoModelForCausalLM.from_pretrained(hf_llama, dtype=torch.float32)
    src = write_gguf(tmp_path / "smollm2-135m-instruct-q8_0.gguf", model, Q.Q8_0, name="SmolLM2 135M Instruct")
    convert_gguf(src, tmp_path / "m.apr")
    unnamed = write_gguf(tmp_path / "plain.gguf", model, Q.Q8_0)
    convert_gguf(unnamed, tmp_path / "p.apr")
    with open_apr(tmp_path / "m.apr") as f, open_apr(tmp_path / "p.apr") as g:
        assert f.metadata["name"] == "SmolLM2 135M Instruct"
        assert g.metadata["name"] == "plain"


def test_source_cut_short_mid_convert_is_truncated_not_sigbus(hf_model, tmp_path):
    """Another program truncates the GGUF while tensors are read: a `Truncated` error naming it (tensor
    bytes are read with pread, not through gguf-py's map, which would kill this test process by SIGBUS)."""
    src = write_gguf(tmp_path / "m.gguf", hf_model, Q.F32)
    size = src.stat().st_size

    def cut_after_first(name: str, done: int, total: int) -> None:
        if src.stat().st_size == size:
            os.truncate(src, size // 2)

    with pytest.raises(Truncated, match=str(src)):
        convert_gguf(src, tmp_path / "m.apr", dtype="f32", progress=cut_after_first)
    assert not (tmp_path / "m.apr").exists() and _leftovers(tmp_path) == []
