"""Benchmark training throughput: our DecoderLM against transformers' Qwen2ForCausalLM in the same AdamW loop.

Usage: .venv/bin/python benchmarks/bench_train.py [--rounds 7] [--quick] [--json] [--cuda-batch 4]

CPU row: a tiny Qwen2 config, fp32, both models holding the same weights and fed the same
batches. CUDA row (only where CUDA is available): the Qwen2.5-0.5B shape at seq 2048, fp32
master weights under bf16 autocast, fused AdamW, SDPA attention, with MFU. Each model is timed
in alternating rounds of a few steps; the figure is the median over rounds of tokens/s.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import PYTHON  # noqa: E402
from table import Row, render, skipped  # noqa: E402
from workload import QWEN25_05B, qwen2_architecture  # noqa: E402

GROUP_CPU = "trainer step, CPU, tiny model"
GROUP_CUDA = "trainer, CUDA, Qwen2.5-0.5B shape, seq 2048, bf16"
# A tiny Qwen2 (biases, GQA, tied head): per-step cost is dominated by framework overhead, as in tests.
TINY = dict(
    hidden_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=512,
    vocab_size=4096, tie_word_embeddings=True, max_position_embeddings=1024, rope_theta=10000.0, rms_norm_eps=1e-6,
)
CPU_BATCH, CPU_SEQ = 8, 128
CUDA_SEQ = 2048
# Dense bf16 tensor-core peak FLOP/s by device name (vendor data sheets, SXM parts).
PEAK_BF16 = {"H200": 989.4e12, "H100": 989.4e12, "A100": 312e12, "L40S": 362e12, "L4": 121e12, "A10": 125e12}


# -- child side (imports torch) ------------------------------------------------------------
def _models(shape: dict, device: str):
    """(ours, transformers') on `device` in fp32 holding identical weights."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from apr_trainer.model import DecoderLM

    torch.manual_seed(0)
    config = Qwen2Config(**shape, attn_implementation="sdpa", use_cache=False)
    hf = Qwen2ForCausalLM(config).to(device)
    arch = qwen2_architecture(shape)
    with torch.device(device):
        ours = DecoderLM(arch)
    state = {k: v for k, v in hf.state_dict().items() if k in ours.state_dict()}
    ours.load_state_dict(state, strict=True)
    return ours, hf


def _stepper(model, hf: bool, device: str, compile_model: bool = False):
    """One training step as the trainer does it: forward, loss, backward, clip, AdamW, zero_grad, loss.item()."""
    import contextlib

    import torch
    import torch.nn.functional as F

    params = list(model.parameters())
    opt = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1, fused=device == "cuda" or None)
    forward = torch.compile(model) if compile_model else model
    cast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if device == "cuda" else contextlib.nullcontext

    def step(x, y) -> float:
        with cast():
            if hf:
                logits = forward(input_ids=x).logits
                loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), y.reshape(-1))
            else:
                loss = forward(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    return step


def _race(steppers: dict, batches: list, rounds: int, steps_per_round: int, warmup: int) -> dict:
    """tokens/s per round for each stepper, rounds alternating which goes first."""
    import torch

    tokens = batches[0][0].numel()
    for step in steppers.values():
        for i in range(warmup):
            step(*batches[i % len(batches)])
    rates: dict[str, list[float]] = {name: [] for name in steppers}
    first_loss = {}
    order = list(steppers)
    for r in range(rounds):
        for name in order if r % 2 == 0 else order[::-1]:
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            began = time.perf_counter()
            for i in range(steps_per_round):
                loss = steppers[name](*batches[(r * steps_per_round + i) % len(batches)])
                first_loss.setdefault(name, loss)
            rates[name].append(tokens * steps_per_round / (time.perf_counter() - began))
    return {"rates": rates, "first_loss": first_loss, "tokens_per_step": tokens}


def _batches(vocab: int, batch: int, seq: int, count: int, device: str) -> list:
    import torch

    gen = torch.Generator().manual_seed(1)
    out = []
    for _ in range(count):
        window = torch.randint(0, vocab, (batch, seq + 1), generator=gen)
        if device == "cuda":
            window = window.pin_memory().to(device, non_blocking=True)
        out.append((window[:, :-1], window[:, 1:]))
    return out


def child_cpu(rounds: int) -> dict:
    """Our model and transformers' on the tiny config, fp32 on CPU."""
    import torch

    ours, hf = _models(TINY, "cpu")
    batches = _batches(TINY["vocab_size"], CPU_BATCH, CPU_SEQ, 8, "cpu")
    with torch.no_grad():  # same weights, same data: the losses must agree before any step
        x, y = batches[0]
        a = ours(x, y).item()
        b = torch.nn.functional.cross_entropy(hf(input_ids=x).logits.reshape(-1, TINY["vocab_size"]), y.reshape(-1))
    # Single steps alternating between the models: background load on a shared machine hits both alike.
    result = _race({"DecoderLM": _stepper(ours, False, "cpu"), "Qwen2ForCausalLM": _stepper(hf, True, "cpu")},
                   batches, rounds * 5, steps_per_round=1, warmup=3)
    result.update(threads=torch.get_num_threads(), initial_loss_gap=abs(a - b.item()))
    return result


def child_cuda(rounds: int, batch: int) -> dict:
    """The 0.5B shape at seq 2048 under bf16 autocast: ours eager, ours compiled, transformers eager."""
    import torch

    ours, hf = _models(QWEN25_05B, "cuda")
    torch.backends.cuda.matmul.allow_tf32 = True
    batches = _batches(QWEN25_05B["vocab_size"], batch, CUDA_SEQ, 4, "cuda")
    steppers = {"DecoderLM": _stepper(ours, False, "cuda"), "Qwen2ForCausalLM": _stepper(hf, True, "cuda")}
    result: dict = {"device": torch.cuda.get_device_name(), "params": sum(p.numel() for p in ours.parameters())}
    result.update(_race(steppers, batches, rounds, steps_per_round=5, warmup=3))
    try:
        compiled = {"DecoderLM + torch.compile": _stepper(ours, False, "cuda", compile_model=True)}
        extra = _race(compiled, batches, max(3, rounds // 2), steps_per_round=5, warmup=3)
        result["rates"].update(extra["rates"])
    except Exception as exc:  # noqa: BLE001 - reported in the table, the eager rows still stand
        result["compile_error"] = f"{type(exc).__name__}: {exc}"[:200]
    result["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return result


# -- parent side (no torch) ----------------------------------------------------------------
def _child(kind: str, rounds: int, batch: int = 4) -> dict:
    cmd = [PYTHON, __file__, "--child", kind, "--rounds", str(rounds), "--cuda-batch", str(batch)]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"bench_train --child {kind} exited {out.returncode}: {out.stderr.strip()[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _cuda_available() -> bool:
    probe = "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"
    return subprocess.run([PYTHON, "-c", probe], capture_output=True).returncode == 0


def _rate_row(group: str, name: str, ref: str, result: dict, target: str, limit: float | None, note: str) -> Row:
    mine, theirs = result["rates"][name], result["rates"][ref]
    row = Row(group, f"{name} tokens/s", f"{ref} tokens/s", "tok/s", statistics.median(mine),
              statistics.median(theirs), target, None, note=note,
              runs=[round(v) for v in mine], ref_runs=[round(v) for v in theirs])
    if limit is not None:
        row.met = row.ratio >= limit
    return row


def run(rounds: int, cuda_batch: int = 4) -> list[Row]:
    """The CPU row always; the CUDA rows when this machine has CUDA, else a skipped row."""
    cpu = _child("cpu", rounds)
    note = (f"batch {CPU_BATCH} x seq {CPU_SEQ}, fp32, {cpu['threads']} threads; same weights and data "
            f"(initial losses differ by {cpu['initial_loss_gap']:.1e})")
    rows = [_rate_row(GROUP_CPU, "DecoderLM", "Qwen2ForCausalLM", cpu, ">= 1.0x", 1.0, note)]
    if not _cuda_available():
        return rows + [skipped(GROUP_CUDA, "DecoderLM tokens/s", "Qwen2ForCausalLM tokens/s", "no CUDA", ">= 1.3x")]
    cuda = _child("cuda", rounds, cuda_batch)
    peak = next((v for k, v in PEAK_BF16.items() if k in cuda["device"]), None)
    for name in ("DecoderLM", "DecoderLM + torch.compile"):
        if name not in cuda["rates"]:
            rows.append(skipped(GROUP_CUDA, f"{name} tokens/s", "Qwen2ForCausalLM tokens/s",
                                cuda.get("compile_error", "did not run"), ">= 1.3x"))
            continue
        rate = statistics.median(cuda["rates"][name])
        mfu = f"MFU {6 * cuda['params'] * rate / peak:.1%}" if peak else "MFU: unknown peak for this device"
        note = (f"{cuda['device']}, batch {cuda_batch} x {CUDA_SEQ}, {mfu} (6*N*tok/s / {peak or 0:.3g} FLOP/s), "
                f"peak mem {cuda['peak_memory_gib']:.1f} GiB")
        rows.append(_rate_row(GROUP_CUDA, name, "Qwen2ForCausalLM", cuda, ">= 1.3x", 1.3, note))
    ref = statistics.median(cuda["rates"]["Qwen2ForCausalLM"])
    if peak:
        rows[-1].note += f"; Qwen2ForCausalLM MFU {6 * cuda['params'] * ref / peak:.1%}"
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--cuda-batch", type=int, default=4, help="sequences of 2048 tokens per CUDA step")
    parser.add_argument("--quick", action="store_true", help="fewer rounds")
    parser.add_argument("--json", action="store_true", help="print one JSON document")
    parser.add_argument("--child", choices=["cpu", "cuda"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child == "cpu":
        print(json.dumps(child_cpu(args.rounds)))
        return
    if args.child == "cuda":
        print(json.dumps(child_cuda(args.rounds, args.cuda_batch)))
        return
    rows = run(3 if args.quick else args.rounds, args.cuda_batch)
    print(json.dumps([r.to_dict() for r in rows], indent=1) if args.json else render(rows))


if __name__ == "__main__":
    main()
