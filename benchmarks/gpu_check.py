"""`make gpu-check`: the trainer's GPU path in a few minutes, against transformers' Qwen2ForCausalLM in the same loop.

Usage: .venv/bin/python benchmarks/gpu_check.py [--tiny] [--steps 10] [--batch 8] [--out gpu-check.json]
                                                [--md gpu-check.md]

A Qwen2.5-0.5B-shaped model at seq 2048 under bf16-mixed (fp32 master weights, bf16 autocast,
fused AdamW, clipping), built and wrapped by the trainer's own `parallel.wrap`: eager, with
torch.compile, with activation checkpointing, both, and FSDP over one rank; then
`Qwen2ForCausalLM` holding the same weights. For each: tokens/s, MFU (model FLOPs per token =
6 N + 12 L d T, N the parameters in matmuls, over the GPU's dense bf16 peak) and peak memory.
Writes one JSON document and one markdown table. --tiny runs every variant on a tiny shape on
whatever device is present (CPU in CI): the figures then mean nothing, the code paths are the GPU's.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from workload import QWEN25_05B, qwen2_architecture  # noqa: E402

SEQ = 2048
PEAK_BF16 = {"H200": 989e12, "H100": 989e12}  # dense bf16 FLOP/s, SXM parts (the reference)
TINY = dict(
    hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=128,
    vocab_size=512, tie_word_embeddings=True, max_position_embeddings=256, rope_theta=1000000.0, rms_norm_eps=1e-6,
)
TINY_SEQ = 64
# name -> (strategy, torch.compile, activation checkpointing); None = transformers' model
# (the compiled variants last: they take the longest, and a run cut short keeps the others' rows)
VARIANTS = {
    "DecoderLM": ("single", False, False),
    "DecoderLM + act. ckpt": ("single", False, True),
    "DecoderLM FSDP x1": ("fsdp", False, False),
    "Qwen2ForCausalLM": None,
    "DecoderLM + compile": ("single", True, False),
    "DecoderLM + compile + act. ckpt": ("single", True, True),
}


def flops_per_token(arch, seq: int) -> float:
    """Training FLOPs per token: 6 N (N = parameters in matmuls: all but an untied input embedding)
    plus the attention term 12 L (heads * head_dim) T (PaLM appendix B)."""
    embedding = 0 if arch.tie_word_embeddings else arch.vocab_size * arch.hidden_size
    matmul_params = arch.param_count() - embedding
    return 6 * matmul_params + 12 * arch.num_layers * arch.num_heads * arch.head_dim * seq


def _peak_memory(device) -> int:
    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # process lifetime on CPU


def _run_variant(name, spec, shape, weights, ctx, batches, warmup: int, steps: int, backend: str) -> dict:
    """Train `warmup + steps` steps of one variant and time the last `steps`."""
    import torch
    import torch.nn.functional as F

    from apr_trainer import parallel
    from apr_trainer.config import TrainConfig
    from apr_trainer.model import DecoderLM
    from apr_trainer.optim import build_optimizer
    from apr_trainer.precision import Precision

    device = ctx.device
    precision = Precision.for_run(device, "bf16-mixed", "f32", "f32")
    if spec is None:
        from transformers import Qwen2Config, Qwen2ForCausalLM

        config = Qwen2Config(**shape, attn_implementation="sdpa", use_cache=False)
        model = Qwen2ForCausalLM(config)
        missing, unexpected = model.load_state_dict(weights, strict=False)
        assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)  # the tied head
        model.to(device)

        def loss_of(x, y):
            logits = model(input_ids=x).logits
            return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), y.reshape(-1))

        params = list(model.parameters())
        optimizer = build_optimizer(model, TrainConfig(data="-"), device)

        def clip():
            return torch.nn.utils.clip_grad_norm_(params, 1.0)
    else:
        strategy, compile_model, checkpointing = spec
        with torch.device("meta"):
            model = DecoderLM(qwen2_architecture(shape))
        par = parallel.wrap(model, weights, ctx, precision, strategy, activation_checkpointing=checkpointing)
        loss_of = torch.compile(par.forward, backend=backend) if compile_model else par.forward
        optimizer = build_optimizer(par.module, TrainConfig(data="-"), device)

        def clip():
            return par.clip_grad_norm_(1.0)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    losses, began = [], None
    for i in range(warmup + steps):
        if i == warmup:
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            began = time.perf_counter()
        x, y = batches[i % len(batches)]
        with precision.autocast():
            loss = loss_of(x, y)
        loss.backward()
        clip()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    elapsed = time.perf_counter() - began
    tokens = batches[0][0].numel() * steps
    return {"name": name, "tokens_per_s": tokens / elapsed, "peak_memory_gib": _peak_memory(device) / 2**30,
            "first_loss": losses[0], "last_loss": losses[-1], "master_dtype": str(next(iter(
                optimizer.param_groups[0]["params"])).dtype)}


def run(tiny: bool, steps: int, batch: int, backend: str = "inductor", warmup: int = 3,
        on_row: Callable[[dict], None] = lambda report: None) -> dict:
    """Every variant in this process, one after another (a failing one is reported, not fatal).

    `on_row` receives the report so far after each variant (written out, it survives a run cut short)."""
    import torch

    from apr_trainer import distributed

    shape, seq = (TINY, TINY_SEQ) if tiny else (QWEN25_05B, SEQ)
    ctx = distributed.setup("auto", group_of_one=True)  # FSDP over one rank needs a process group
    try:
        arch = qwen2_architecture(shape)
        torch.manual_seed(0)
        from apr_trainer.model import DecoderLM

        weights = DecoderLM(arch).state_dict()  # fp32 on the CPU: every variant starts from these
        gen = torch.Generator().manual_seed(1)
        batches = []
        for _ in range(4):
            window = torch.randint(0, shape["vocab_size"], (batch, seq + 1), generator=gen).to(ctx.device)
            batches.append((window[:, :-1], window[:, 1:]))
        name = torch.cuda.get_device_name(ctx.device) if ctx.device.type == "cuda" else "cpu"
        peak = next((v for k, v in PEAK_BF16.items() if k in name), None)
        per_token = flops_per_token(arch, seq)
        results = []
        report = {"device": name, "peak_bf16_flops": peak, "shape": "tiny" if tiny else "Qwen2.5-0.5B",
                  "params": arch.param_count(), "flops_per_token": per_token, "seq_len": seq, "batch": batch,
                  "steps": steps, "warmup": warmup, "compile_backend": backend, "torch": torch.__version__,
                  "variants": results}
        for variant, spec in VARIANTS.items():
            torch._dynamo.reset()
            try:
                row = _run_variant(variant, spec, shape, weights, ctx, batches, warmup, steps, backend)
                row["mfu"] = per_token * row["tokens_per_s"] / peak if peak else None
            except Exception as exc:  # noqa: BLE001 - reported in the table; the other variants still run
                row = {"name": variant, "error": f"{type(exc).__name__}: {exc}"[:300]}
            results.append(row)
            on_row(report)
            if ctx.device.type == "cuda":
                torch.cuda.empty_cache()
        return report
    finally:
        distributed.teardown(ctx)


def markdown(report: dict) -> str:
    """One table: a row per variant."""
    lines = [f"`make gpu-check` on {report['device']}: {report['shape']} shape ({report['params']:,} parameters), "
             f"batch {report['batch']} x seq {report['seq_len']}, bf16-mixed, {report['steps']} timed steps, "
             f"torch {report['torch']}", "",
             "| variant | tokens/s | MFU | peak memory (GiB) | loss first -> last |",
             "| --- | ---: | ---: | ---: | --- |"]
    for row in report["variants"]:
        if "error" in row:
            lines.append(f"| {row['name']} | failed: {row['error']} | | | |")
            continue
        mfu = f"{row['mfu']:.1%}" if row.get("mfu") is not None else "n/a"
        lines.append(f"| {row['name']} | {row['tokens_per_s']:,.0f} | {mfu} | {row['peak_memory_gib']:.2f} | "
                     f"{row['first_loss']:.3f} -> {row['last_loss']:.3f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="tiny shape on any device (CI: CPU)")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per variant (after 3 warm-up steps)")
    parser.add_argument("--batch", type=int, default=8, help="sequences per step")
    parser.add_argument("--compile-backend", default="inductor",
                        help="torch.compile backend (CI on CPU: aot_eager, which skips C++ code generation)")
    parser.add_argument("--out", default="gpu-check.json", help="JSON report")
    parser.add_argument("--md", default="gpu-check.md", help="markdown table")
    args = parser.parse_args()

    def write(report: dict) -> None:
        Path(args.out).write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
        Path(args.md).write_text(markdown(report), encoding="utf-8")
        print(f"{report['variants'][-1]['name']}: done", flush=True)

    report = run(args.tiny, args.steps, args.batch, args.compile_backend, on_row=write)
    print(markdown(report))
    if any("error" in row for row in report["variants"]):
        sys.exit(1)


if __name__ == "__main__":
    main()
