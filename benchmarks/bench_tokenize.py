"""Benchmark `apr tokenize`: peak RSS on a big .txt and a big .jsonl, and tokens/s against `tokenizers`' own encode_batch.

Usage: .venv/bin/python benchmarks/bench_tokenize.py [--runs 3] [--quick] [--json] [--mb 1000]

Inputs are generated once into $APR_BENCH_DIR/tokenize (Python's own documentation text, when the
interpreter ships it, else the README, repeated): one single-document .txt and one .jsonl of
~4 KB documents, `--mb` MB each. Tokenizer: fixtures/tiny-qwen2-hf/tokenizer.json (Qwen2's
pre-tokenizer, a small vocabulary). RSS rows: `apr tokenize` in a fresh process against the
issue's 500 MB budget. Throughput row: in one process, alternating, `tokenize_corpus` on the
.jsonl (read, encode, write shards) against `Tokenizer.encode_batch` (and `encode_batch_fast`, which
apr calls) on the same documents already in memory, batched the same way, on the first 100 MB
(`--quick`: 20 MB).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import APR, PYTHON, ROOT, Summary, cache_dir, measure  # noqa: E402
from table import Row, render  # noqa: E402

GROUP = "apr tokenize"
TOKENIZER = ROOT / "fixtures" / "tiny-qwen2-hf" / "tokenizer.json"
BUDGET_MIB = 500
SIZES = {False: (1000, 100), True: (50, 20)}  # --quick -> (MB per input, MB of the throughput sample)
DOC_CHARS = 4000
_CHILD = r"""
import json, shutil, statistics, sys, time
from pathlib import Path
from apr_trainer.pretokenize import TokenizeOptions, tokenize_corpus
from apr_trainer.tokenization import BATCH_CHARS, load_tokenizer
jsonl, tokenizer, out, runs = Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3]), int(sys.argv[4])
info = load_tokenizer(tokenizer)
docs = [json.loads(line)["text"] for line in jsonl.open(encoding="utf-8")]
batches, batch, size = [], [], 0
for doc in docs:
    batch.append(doc)
    size += len(doc)
    if size >= BATCH_CHARS:
        batches.append(batch)
        batch, size = [], 0
batches.append(batch)

def raw():
    return sum(len(e.ids) for b in batches for e in info.tokenizer.encode_batch(b, add_special_tokens=False))

def raw_fast():
    return sum(len(e.ids) for b in batches for e in info.tokenizer.encode_batch_fast(b, add_special_tokens=False))

def ours():
    shutil.rmtree(out, ignore_errors=True)
    return tokenize_corpus([jsonl], out, info, TokenizeOptions())["num_tokens"]

rates = {"raw": [], "raw_fast": [], "apr": []}
for round in range(runs + 1):  # round 0 warms up the page cache and the tokenizer
    for name, fn in (("raw", raw), ("raw_fast", raw_fast), ("apr", ours)):
        start = time.perf_counter()
        tokens = fn()
        if round:
            rates[name].append(tokens / (time.perf_counter() - start))
print(json.dumps(rates))
"""


def _source_text() -> str:
    docs = Path(sys.base_prefix) / "share" / "doc"
    texts = [p.read_text("utf-8", "replace") for p in sorted(docs.rglob("*.txt"))[:200]] if docs.is_dir() else []
    return "\n\n".join(texts) if sum(map(len, texts)) > 1_000_000 else (ROOT / "README.md").read_text()


def inputs(mb: int) -> tuple[Path, Path]:
    """A single-document .txt and a .jsonl of ~4 KB documents, `mb` MB each (built once)."""
    folder = cache_dir("tokenize")
    txt, jsonl = folder / f"big-{mb}mb.txt", folder / f"big-{mb}mb.jsonl"
    if not (txt.exists() and jsonl.exists()):
        text = _source_text()
        target = mb * 1_000_000
        with open(txt, "w", encoding="utf-8") as t, open(jsonl, "w", encoding="utf-8") as j:
            written = 0
            while written < target:
                t.write(text)
                for start in range(0, len(text), DOC_CHARS):
                    j.write(json.dumps({"text": text[start : start + DOC_CHARS]}) + "\n")
                written += len(text)
    return txt, jsonl


def _head(jsonl: Path, mb: int) -> Path:
    """The first `mb` MB of documents of `jsonl` (the throughput sample)."""
    sample = jsonl.with_name(f"sample-{mb}mb.jsonl")
    if not sample.exists():
        with open(jsonl, encoding="utf-8") as src, open(sample, "w", encoding="utf-8") as dst:
            size = 0
            for line in src:
                if size >= mb * 1_000_000:
                    break
                dst.write(line)
                size += len(line)
    return sample


def run(runs: int, mb: int, sample_mb: int) -> list[Row]:
    txt, jsonl = inputs(mb)
    out = cache_dir("tokenize-out")
    rows = []
    for path in (txt, jsonl):
        m = measure([APR, "tokenize", str(path), "-o", str(out / path.stem), "--tokenizer", str(TOKENIZER),
                     "--force", "-q"])
        rss = m.peak_rss / 2**20
        row = Row(GROUP, f"{path.suffix} {path.stat().st_size / 1e6:,.0f} MB peak RSS", "budget", "MiB", rss,
                  BUDGET_MIB, f"<= {BUDGET_MIB} MiB", rss <= BUDGET_MIB, rss, note=f"{m.wall_s:.0f} s")
        rows.append(row)
    proc = subprocess.run([PYTHON, "-c", _CHILD, str(_head(jsonl, sample_mb)), str(TOKENIZER),
                           str(out / "throughput"), str(runs)], capture_output=True, text=True, check=True)
    rates = json.loads(proc.stdout.strip().splitlines()[-1])
    s = {k: Summary(k, runs, sorted(v)[len(v) // 2], 0.0, [round(x) for x in v]) for k, v in rates.items()}
    for ref, name, note in (("raw", "Tokenizer.encode_batch (text in memory)", "the issue's reference"),
                            ("raw_fast", "Tokenizer.encode_batch_fast (text in memory)", "the call apr uses")):
        row = Row(GROUP, f"tokenize_corpus, {sample_mb} MB .jsonl", name, "tok/s", s["apr"].wall_s, s[ref].wall_s,
                  ">= 0.9x", None, note=f"reads, encodes, writes shards; {note}", runs=s["apr"].walls,
                  ref_runs=s[ref].walls)
        row.met = row.ratio >= 0.9
        rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="50 MB inputs, 20 MB throughput sample")
    parser.add_argument("--mb", type=int, default=None, help="size of each generated input (default 1000)")
    parser.add_argument("--json", action="store_true", help="print one JSON document")
    args = parser.parse_args()
    mb, sample_mb = SIZES[args.quick]
    rows = run(args.runs, args.mb or mb, sample_mb)
    print(json.dumps([r.to_dict() for r in rows], indent=1) if args.json else render(rows))


if __name__ == "__main__":
    main()
