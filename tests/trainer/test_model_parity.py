"""DecoderLM against transformers: logits, loss and gradients on the same weights; presets; --init bit-exactness."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import transformers

from apr_format import ArchitectureConfig, open_apr, save_apr
from apr_format.errors import MissingTensor
from apr_format.init_tensors import expected_parameter_shapes, load_init_tensors
from apr_testing import apr_from_hf, build_hf_checkpoint, run_apr
from apr_trainer import model as model_module
from apr_trainer.model import DecoderLM, chunked_cross_entropy
from apr_trainer.presets import PRESETS, preset

TOLERANCE = 1e-4


def hf_model(folder: Path) -> torch.nn.Module:
    return transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def _batch(vocab: int, seed: int = 0, shape: tuple[int, int] = (2, 19)) -> torch.Tensor:
    return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(params=["qwen2", "llama"])
def family_checkpoint(request, tmp_path) -> tuple[str, Path, Path]:
    folder = request.getfixturevalue(f"hf_{request.param}")
    return request.param, folder, apr_from_hf(folder, tmp_path / f"{request.param}.apr", lm_head_copy=True)


def test_logits_and_loss_match_transformers(family_checkpoint):
    """FALSIFY-001: our logits and loss equal transformers' on the same weights (fp32)."""
    family, folder, apr_path = family_checkpoint
    ours, reference = DecoderLM.from_apr(apr_path), hf_model(folder)
    assert ours.config.family == family
    ids = _batch(ours.config.vocab_size)
    labels = ids.clone()
    labels[0, 5:9] = -100
    targets = torch.cat([labels[:, 1:], torch.full((ids.shape[0], 1), -100)], dim=1)  # shifted, nanoGPT style
    with torch.no_grad():
        logits, loss = ours(ids), ours(ids, targets)
        expected = reference(ids, labels=labels)
    assert logits.dtype == torch.float32 and logits.shape == expected.logits.shape
    assert (logits - expected.logits).abs().max().item() < TOLERANCE
    assert loss.shape == () and abs(loss.item() - expected.loss.item()) < TOLERANCE
    # The comparison is sharp enough to catch a RoPE slip (rope_theta off by 100x).
    wrong = DecoderLM(dataclasses.replace(ours.config, rope_theta=ours.config.rope_theta / 100))
    wrong.load_state_dict(ours.state_dict())
    with torch.no_grad():
        assert (wrong(ids) - expected.logits).abs().max().item() > 10 * TOLERANCE


@pytest.mark.parametrize(("family", "flags"), [("qwen2", ["--no-lm-head-copy"]), ("llama", [])])
def test_apr_convert_output_matches_transformers(request, tmp_path, family, flags):
    """The whole path: `apr convert` (real CLI), then from_apr gives transformers' logits, no unused tensors."""
    folder = request.getfixturevalue(f"hf_{family}")
    run_apr("convert", folder, "-o", tmp_path / "m.apr", "--quiet", *flags, check=True)
    assert load_init_tensors(tmp_path / "m.apr").unused == ()
    ours, reference = DecoderLM.from_apr(tmp_path / "m.apr"), hf_model(folder)
    ids = _batch(ours.config.vocab_size, seed=4)
    with torch.no_grad():
        assert (ours(ids) - reference(ids).logits).abs().max().item() < TOLERANCE


def test_gqa_7_to_1_forward_and_backward_match_transformers(tmp_path):
    """FALSIFY-004: 14 query heads on 2 kv heads (Qwen2.5-0.5B's ratio): logits and gradients match."""
    folder = build_hf_checkpoint(
        tmp_path / "hf", "qwen2", hidden_size=112, num_attention_heads=14, num_key_value_heads=2,
        intermediate_size=160, initializer_range=0.1, seed=3,
    )
    ours, reference = DecoderLM.from_apr(apr_from_hf(folder, tmp_path / "gqa.apr", lm_head_copy=True)), hf_model(folder)
    assert (ours.config.num_heads, ours.config.num_kv_heads, ours.config.head_dim) == (14, 2, 8)
    ids = _batch(ours.config.vocab_size, seed=2)
    logits, expected = ours(ids), reference(ids).logits
    assert (logits - expected).abs().max().item() < TOLERANCE
    ours(ids[:, :-1], ids[:, 1:]).backward()
    reference(ids, labels=ids).loss.backward()
    ours_params, ref_params = dict(ours.named_parameters()), dict(reference.named_parameters())
    for name in (
        "model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.k_proj.bias",
        "model.layers.1.self_attn.v_proj.weight", "model.layers.1.mlp.down_proj.weight",
        "model.embed_tokens.weight", "model.norm.weight",
    ):
        ours_grad, ref_grad = ours_params[name].grad, ref_params[name].grad
        assert ref_grad.abs().max() > 0
        assert (ours_grad - ref_grad).abs().max().item() < TOLERANCE, name


def test_default_architecture_is_exactly_the_preset():
    """FALSIFY-002: without --init the model is llama-370m: its numbers and every parameter shape."""
    config = preset("llama-370m")
    assert (config.hidden_size, config.num_layers, config.num_heads, config.num_kv_heads) == (1024, 24, 16, 4)
    assert (config.intermediate_size, config.vocab_size, config.rope_theta) == (2816, 50257, 10000.0)
    assert config.tie_word_embeddings and not config.attention_bias and config.family == "llama"
    with torch.device("meta"):
        model = DecoderLM(config)
    shapes = {name: tuple(p.shape) for name, p in model.named_parameters()}
    assert shapes == expected_parameter_shapes(config)
    # 322M distinct parameters; "370m" counts the lm_head copy aprender stores for a tied head.
    assert model.num_parameters() == config.param_count() == 322_045_952
    assert model.num_parameters() + config.vocab_size * config.hidden_size == 373_509_120


def test_state_dict_names_are_the_hf_names(hf_qwen2, hf_llama):
    """Parameter names equal transformers' for both families, so strict loading catches any drift."""
    for folder in (hf_qwen2, hf_llama):
        reference = hf_model(folder)
        hf_config = reference.config.to_dict()
        config = ArchitectureConfig.from_metadata({"architecture": hf_config["model_type"], "hf_config": hf_config})
        ours = DecoderLM(config)
        hf_shapes = {n: tuple(p.shape) for n, p in reference.named_parameters()}
        assert {n: tuple(p.shape) for n, p in ours.named_parameters()} == hf_shapes


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_init_passes_every_tensor_bit_exactly(hf_qwen2, tmp_path, dtype):
    """FALSIFY-003: after from_apr every parameter is bit-identical to the file's tensor, dtype kept."""
    apr_path = apr_from_hf(hf_qwen2, tmp_path / "m.apr", dtype=dtype, lm_head_copy=True)
    model = DecoderLM.from_apr(apr_path)
    params = dict(model.named_parameters())
    with open_apr(apr_path) as f:
        assert set(params) == set(f.keys()) - {"lm_head.weight"}  # the tied copy is dropped
        for name, param in params.items():
            stored = f.torch(name)
            assert param.dtype == stored.dtype == dtype
            assert torch.equal(param.detach().view(torch.uint8), stored.view(torch.uint8)), name
            assert param.requires_grad


def test_init_with_dtype_casts_and_trains(hf_llama, tmp_path):
    """--init with another dtype: values are the file's values cast; a training step runs."""
    apr_path = apr_from_hf(hf_llama, tmp_path / "m.apr", dtype=torch.bfloat16, lm_head_copy=True)
    model = DecoderLM.from_apr(apr_path, dtype=torch.float32)
    with open_apr(apr_path) as f:
        assert torch.equal(model.lm_head.weight.detach(), f.torch("lm_head.weight").float())
    ids = _batch(model.config.vocab_size)
    before = model.model.layers[0].mlp.up_proj.weight.detach().clone()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    model(ids[:, :-1], ids[:, 1:]).backward()
    optimizer.step()
    assert not torch.equal(before, model.model.layers[0].mlp.up_proj.weight.detach())
    with open_apr(apr_path) as f:  # copy-on-write: the file is untouched by training
        assert torch.equal(before.bfloat16(), f.torch("model.layers.0.mlp.up_proj.weight"))


def test_zero_copy_init_never_writes_the_file(hf_qwen2, tmp_path):
    """Training a zero-copy model changes private pages only: the .apr's bytes stay the same."""
    apr_path = apr_from_hf(hf_qwen2, tmp_path / "m.apr", lm_head_copy=True)
    original = apr_path.read_bytes()
    model = DecoderLM.from_apr(apr_path)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    assert apr_path.read_bytes() == original


def test_from_apr_refuses_a_checkpoint_with_a_missing_tensor(hf_llama, tmp_path):
    """No random fallback: a missing tensor is an error naming it."""
    apr_path = apr_from_hf(hf_llama, tmp_path / "m.apr", lm_head_copy=True)
    with open_apr(apr_path) as f:
        tensors = {n: f.torch(n).clone() for n in f.keys() if n != "model.layers.1.mlp.up_proj.weight"}
        metadata = dict(f.metadata)
    save_apr(tmp_path / "holed.apr", tensors, metadata)
    with pytest.raises(MissingTensor, match=r"model\.layers\.1\.mlp\.up_proj\.weight"):
        DecoderLM.from_apr(tmp_path / "holed.apr")


def test_fresh_model_initialisation():
    """Random init: normal(0, 0.02) weights, zero biases, unit norms; logits are float32."""
    torch.manual_seed(0)
    config = dataclasses.replace(PRESETS["tiny"], attention_bias=True, family="qwen2", hidden_size=256, head_dim=64)
    model = DecoderLM(config)
    q = model.model.layers[0].self_attn.q_proj
    assert abs(q.weight.std().item() - 0.02) < 0.002 and abs(q.weight.mean().item()) < 0.002
    assert abs(model.model.embed_tokens.weight.std().item() - 0.02) < 0.002
    assert torch.count_nonzero(q.bias) == 0
    assert torch.all(model.model.norm.weight == 1)
    assert not hasattr(model, "lm_head") and model.head_weight is model.model.embed_tokens.weight
    assert model(torch.zeros(1, 4, dtype=torch.long)).dtype == torch.float32


def test_causality():
    """A later token never changes earlier logits."""
    torch.manual_seed(0)
    model = DecoderLM(PRESETS["tiny"]).eval()
    ids = _batch(PRESETS["tiny"].vocab_size, shape=(1, 12))
    changed = ids.clone()
    changed[0, 8] = (ids[0, 8] + 1) % PRESETS["tiny"].vocab_size
    with torch.no_grad():
        a, b = model(ids), model(changed)
    assert torch.equal(a[:, :8], b[:, :8])
    assert (a[:, 8:] - b[:, 8:]).abs().max() > 1e-6


def test_chunked_cross_entropy_equals_full_cross_entropy(monkeypatch):
    """Several chunks (one partial): same loss and gradients as F.cross_entropy on full logits."""
    monkeypatch.setattr(model_module, "LOSS_CHUNK_LOGITS", 7 * 50)  # 7 rows of a 50-wide vocab per chunk
    generator = torch.Generator().manual_seed(0)
    h = torch.randn(30, 16, generator=generator, requires_grad=True)
    weight = torch.randn(50, 16, generator=generator, requires_grad=True)
    targets = torch.randint(0, 50, (30,), generator=generator)
    targets[[0, 7, 8, 29]] = -100
    loss = chunked_cross_entropy(h, weight, targets)
    grads = torch.autograd.grad(loss, (h, weight))
    expected = F.cross_entropy(h @ weight.T, targets, ignore_index=-100)
    expected_grads = torch.autograd.grad(expected, (h, weight))
    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=1e-6)
    for got, want in zip(grads, expected_grads):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        torch.testing.assert_close(chunked_cross_entropy(h, weight, targets), expected, rtol=1e-6, atol=1e-6)


def test_loss_path_never_holds_full_logits(monkeypatch):
    """The loss never materialises a [B*T, vocab] logits tensor: every head matmul is chunk-sized."""
    monkeypatch.setattr(model_module, "LOSS_CHUNK_LOGITS", 8 * PRESETS["tiny"].vocab_size)
    seen_rows = []
    real_linear = F.linear

    def spy(x, w, b=None):
        if w.shape[0] == PRESETS["tiny"].vocab_size:
            seen_rows.append(x.shape[0])
        return real_linear(x, w, b)

    torch.manual_seed(0)
    model = DecoderLM(PRESETS["tiny"])
    monkeypatch.setattr(model_module.F, "linear", spy)
    ids = _batch(PRESETS["tiny"].vocab_size, shape=(2, 16))
    model(ids, ids).backward()
    assert seen_rows and max(seen_rows) <= 8
    assert sum(seen_rows) == 2 * ids.numel()  # forward once, recomputed once in backward


def test_load_init_tensors_reports_source_dtypes(hf_qwen2, tmp_path):
    """The returned mapping says what the file stored and that the tied copy was dropped."""
    tensors = load_init_tensors(apr_from_hf(hf_qwen2, tmp_path / "m.apr", dtype=torch.bfloat16, lm_head_copy=True))
    assert tensors.dropped_tied_head and "lm_head.weight" not in tensors
    assert set(tensors.source_dtypes.values()) == {"bf16"} and tensors.unused == ()


def test_bf16_model_and_autocast_train(hf_qwen2, tmp_path):
    """A bf16 --init model and fp32 under bf16 autocast both give finite losses near the fp32 one, with gradients."""
    apr_path = apr_from_hf(hf_qwen2, tmp_path / "m.apr", dtype=torch.bfloat16, lm_head_copy=True)
    bf16 = DecoderLM.from_apr(apr_path)
    fp32 = DecoderLM.from_apr(apr_path, dtype=torch.float32)
    ids = _batch(bf16.config.vocab_size)
    reference = fp32(ids[:, :-1], ids[:, 1:])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = fp32(ids[:, :-1], ids[:, 1:])
    low = bf16(ids[:, :-1], ids[:, 1:])
    for loss in (mixed, low):
        assert loss.dtype == torch.float32 and abs(loss.item() - reference.item()) < 0.05
        loss.backward()
    assert bf16.model.embed_tokens.weight.grad.dtype == torch.bfloat16
    assert torch.isfinite(fp32.model.layers[0].self_attn.q_proj.bias.grad).all()


def test_mixed_dtype_file_is_promoted_losslessly(hf_llama, tmp_path):
    """A file with bf16 weights and f32 norms loads as one f32 model holding exactly the stored values."""
    with open_apr(apr_from_hf(hf_llama, tmp_path / "m.apr", lm_head_copy=True)) as f:
        tensors = {n: f.torch(n).clone() if "norm" in n else f.torch(n).bfloat16() for n in f.keys()}
        metadata = dict(f.metadata)
    save_apr(tmp_path / "mixed.apr", tensors, metadata)
    model = DecoderLM.from_apr(tmp_path / "mixed.apr")
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert torch.equal(model.lm_head.weight.detach(), tensors["lm_head.weight"].float())
    assert torch.equal(model.model.norm.weight.detach(), tensors["model.norm.weight"])
    assert torch.isfinite(model(_batch(model.config.vocab_size))).all()
