"""Test helpers importable from any test: tiny real HF checkpoints and their .apr, the one CLI runner (with
fault injection), leftover detection, token streams, run metrics, tokenizers trained on text with every
whitespace trap. Tests import this module, never conftest."""

from __future__ import annotations

import filecmp
import json
import os
import random
import re
import resource
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "fixtures"
GOLDEN = FIXTURES / "golden"
# The console script installed next to this interpreter (what users run); `-m` as a fallback.
_SCRIPT = Path(sys.executable).with_name("apr")
APR_COMMAND = [str(_SCRIPT)] if _SCRIPT.exists() else [sys.executable, "-m", "apr_cli.main"]
# The one temp name all our writers use, for files and folders alike: `.{destination name}.{8 chars}.apr-tmp`.
TEMP_NAME = re.compile(r"^\..+\.[a-z0-9_]{8}\.apr-tmp$")

# Small shapes with the features that matter: GQA, q/k/v biases (qwen2), tied and untied heads.
TINY_QWEN2 = dict(
    hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    intermediate_size=128, vocab_size=300, max_position_embeddings=128, rope_theta=1000000.0,
    rms_norm_eps=1e-6, tie_word_embeddings=True,
)
TINY_LLAMA = dict(
    hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    intermediate_size=128, vocab_size=320, max_position_embeddings=128, rope_theta=10000.0,
    rms_norm_eps=1e-5, tie_word_embeddings=False,
)

TINY_MISTRAL = {**TINY_LLAMA, "sliding_window": 128}  # a window >= the sequence: plain causal attention


def build_hf_checkpoint(
    folder: Path, family: str, *, dtype: str = "float32", seed: int = 0, max_shard_size: str | None = None, **overrides
) -> Path:
    """Save a randomly initialised transformers model of `family` ("qwen2", "llama" or "mistral") to `folder`."""
    import torch
    import transformers

    config_cls, model_cls, base = {
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM, TINY_QWEN2),
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM, TINY_LLAMA),
        "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM, TINY_MISTRAL),
    }[family]
    torch.manual_seed(seed)
    config = config_cls(**{**base, **overrides})
    model = model_cls(config).to(getattr(torch, dtype))
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(folder, **kwargs)
    return folder


def build_hf_checkpoint_with_tokenizer(folder: Path, family: str, **overrides) -> Path:
    """`build_hf_checkpoint` with 512 embedding rows plus the checked-in tiny BPE tokenizer (400 tokens,
    eos <|im_end|>, a ChatML chat template) from fixtures/tiny-qwen2-hf."""
    import shutil

    build_hf_checkpoint(folder, family, **{"vocab_size": 512, **overrides})
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(FIXTURES / "tiny-qwen2-hf" / name, folder / name)
    return folder


def transformers_greedy(reference, prompt_ids: list[int], n: int, **kwargs) -> list[int]:
    """The ids transformers' `generate(do_sample=False)` adds to `prompt_ids` (kwargs: e.g. eos_token_id)."""
    import torch

    ids = torch.tensor([list(prompt_ids)])
    kwargs.setdefault("pad_token_id", 0)
    out = reference.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False, **kwargs)
    return out[0, ids.shape[1]:].tolist()


def transformers_loss(reference, ids, seq_len: int, batch: int = 8) -> tuple[float, int]:
    """(mean next-token cross-entropy, windows) of a transformers model over the non-overlapping
    `seq_len` windows of `ids` (last partial window dropped): the perplexity definition of `apr eval`."""
    import torch
    import torch.nn.functional as F

    windows = len(ids) // seq_len
    rows = torch.as_tensor(np.asarray(ids[: windows * seq_len], dtype=np.int64)).view(windows, seq_len)
    total = 0.0
    with torch.no_grad():
        for chunk in rows.split(batch):
            logits = reference(chunk).logits[:, :-1].double()
            total += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), chunk[:, 1:].reshape(-1), reduction="sum"))
    return total / (windows * (seq_len - 1)), windows


def assert_same_folder(source: Path, copy: Path) -> None:
    """Every file of the `source` folder is in `copy` byte for byte, and nothing else is."""
    assert sorted(os.listdir(copy)) == sorted(os.listdir(source))
    for name in os.listdir(source):
        assert filecmp.cmp(source / name, copy / name, shallow=False), name


def apr_from_hf(folder: Path, out: Path, dtype=None, *, lm_head_copy: bool = False) -> Path:
    """Write an HF folder's model.safetensors as .apr without the converter: HF names, canonical
    architecture metadata, tensors cast to the torch `dtype` if given. `lm_head_copy` stores a tied
    model's head as a copy of the embedding with `tied_embeddings: true`, the way aprender's importer does."""
    from safetensors.torch import load_file

    from apr_format import save_apr
    from apr_format.architecture import ArchitectureConfig

    arch = ArchitectureConfig.from_metadata({"hf_config": json.loads((folder / "config.json").read_text())})
    tensors = load_file(folder / "model.safetensors")
    if dtype is not None:
        tensors = {name: t.to(dtype) for name, t in tensors.items()}
    metadata = arch.to_metadata()
    if lm_head_copy and arch.tie_word_embeddings:
        tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"].clone()
        metadata["tied_embeddings"] = True
    save_apr(out, tensors, metadata)
    return out


def apr_env() -> dict[str, str]:
    """The environment CLI subprocesses run in: no colour, no debug tracebacks, one thread."""
    env = {**os.environ, "NO_COLOR": "1", "OMP_NUM_THREADS": "1"}
    env.pop("APR_DEBUG", None)
    return env


def _limits(fsize: int | None):
    """preexec_fn: cap the size of any file the child writes; writes past it fail with EFBIG."""
    def apply() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of death by SIGXFSZ
        resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))
    return apply if fsize is not None else None


def _command(args, prelude: str | None) -> list[str]:
    """The command line of `apr ARGS`; with `prelude`, Python run in the same process before the CLI."""
    if prelude is None:
        return [*APR_COMMAND, *map(str, args)]
    code = f"{prelude}\nimport sys\nfrom apr_cli.main import main\nsys.argv = ['apr', *sys.argv[1:]]\nmain()"
    return [sys.executable, "-c", code, *map(str, args)]


def _text(proc_args, returncode: int, stdout: bytes, stderr: bytes) -> subprocess.CompletedProcess:
    return subprocess.CompletedProcess(proc_args, returncode, stdout.decode("utf-8", "replace"),
                                       stderr.decode("utf-8", "replace"))


def run_apr(*args: str | os.PathLike, check: bool = False, input: bytes | None = None, fsize: int | None = None,
            prelude: str | None = None, timeout: float = 600, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """Run the installed `apr` CLI in a subprocess and capture its output as text.

    `fsize` caps the size of any file it writes (EFBIG past it); `prelude` is Python run before the
    CLI in the same process (for injected faults).
    """
    proc = subprocess.run(_command(args, prelude), capture_output=True, env=apr_env(), input=input, timeout=timeout,
                          cwd=cwd, preexec_fn=_limits(fsize), check=False)
    out = _text(proc.args, proc.returncode, proc.stdout, proc.stderr)
    if check and out.returncode != 0:
        raise AssertionError(f"apr {' '.join(map(str, args))} exited {out.returncode}:\n{out.stderr}")
    return out


def torchrun_command(*args: str | os.PathLike, nproc: int = 2) -> list[str]:
    """`torchrun --standalone --nproc_per_node N -m apr_cli.main ...` (the same command users run)."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            "-m", "apr_cli.main", *map(str, args)]


def torchrun(*args: str | os.PathLike, nproc: int = 2, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run `torchrun_command(...)` to the end, output captured as text."""
    return subprocess.run(torchrun_command(*args, nproc=nproc), capture_output=True, text=True, env=apr_env(),
                          timeout=timeout, check=False)


def popen_apr(*args: str | os.PathLike, cwd: Path | None = None, prelude: str | None = None, capture: bool = False,
              env: dict[str, str] | None = None) -> subprocess.Popen:
    """Start `apr ARGS` without waiting (for the kill and race tests); output is discarded unless
    `capture` (then text pipes: read them with `communicate()` or `finish`). `prelude` as for
    `run_apr`; `env`: extra environment variables."""
    out = subprocess.PIPE if capture else subprocess.DEVNULL
    return subprocess.Popen(_command(args, prelude), stdout=out, stderr=out, env={**apr_env(), **(env or {})},
                            cwd=cwd, text=capture, errors="replace" if capture else None)


def finish(proc: subprocess.Popen, timeout: float = 300) -> subprocess.CompletedProcess:
    """Wait for a `popen_apr(..., capture=True)` process; its result with text output."""
    stdout, stderr = proc.communicate(timeout=timeout)
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout or "", stderr or "")


def one_line_error(proc: subprocess.CompletedProcess) -> str:
    """The single `apr: error: ...` line of a failed command (asserting there is nothing else)."""
    lines = proc.stderr.strip().splitlines()
    assert "Traceback" not in proc.stderr, proc.stderr
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("apr: error: "), proc.stderr
    return lines[0]


def leftovers(folder: Path) -> list[str]:
    """Hidden files or folders in `folder` (recursively), sorted: our temps, or any other writer's."""
    return sorted(os.path.relpath(os.path.join(root, name), folder)
                  for root, dirs, files in os.walk(folder) for name in dirs + files if name.startswith("."))


def run_apr_json(*args: str | os.PathLike) -> dict:
    """Run `apr ... --json` expecting success, return the parsed JSON."""
    proc = run_apr(*args, "--json", check=True)
    return json.loads(proc.stdout)


def tiny_training_inputs(root: Path, tokens: int = 20_000) -> tuple[Path, Path]:
    """`root/init.apr` (the tiny preset, seed 0) and `root/tokens.bin` (a learnable stream of `tokens` ids
    over its 512-token vocabulary): what `apr pretrain --init ... --data ...` tests start from."""
    import torch

    from apr_format import save_apr
    from apr_trainer.data import write_token_file
    from apr_trainer.model import DecoderLM
    from apr_trainer.presets import preset

    torch.manual_seed(0)
    save_apr(root / "init.apr", DecoderLM(preset("tiny")).state_dict(), preset("tiny").to_metadata())
    write_token_file(root / "tokens.bin", [learnable_tokens(tokens, 512, step=5, offset=1, noise=4)], 512)
    return root / "init.apr", root / "tokens.bin"


def learnable_tokens(n: int, vocab: int, *, step: int = 7, offset: int = 3, noise: int = 3, seed: int = 0) -> np.ndarray:
    """A token stream a model can learn: each id is (previous * step + offset + a little noise) % vocab."""
    rng = np.random.default_rng(seed)
    ids = np.zeros(n, dtype=np.int64)
    for i in range(1, n):
        ids[i] = (ids[i - 1] * step + offset + rng.integers(0, noise)) % vocab
    return ids


def read_metrics(run_dir: str | os.PathLike) -> list[dict]:
    """Every record of a training run's metrics.jsonl."""
    return [json.loads(line) for line in Path(run_dir, "metrics.jsonl").read_text().splitlines()]


def env_cases(name: str, default: int) -> int:
    """A case count from the environment (APR_FUZZ_CASES, APR_CRASH_CASES), else `default`."""
    return int(os.environ.get(name, default))


def record(test: str, **numbers) -> None:
    """Append a test's case counts to the file named by APR_RELIABILITY_STATS (for the README table)."""
    target = os.environ.get("APR_RELIABILITY_STATS")
    if target:
        with open(target, "a", encoding="utf-8") as fh:
            fh.write(json.dumps({"test": test, **numbers}) + "\n")


# A tiny Qwen2 (q/k/v biases, GQA, tied head) small enough to build in numpy in microseconds.
TINY_CONFIG = {
    "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": 8, "num_hidden_layers": 1,
    "num_attention_heads": 2, "num_key_value_heads": 1, "intermediate_size": 16, "vocab_size": 16,
    "max_position_embeddings": 32, "rope_theta": 10000.0, "rms_norm_eps": 1e-6, "tie_word_embeddings": True,
    "hidden_act": "silu", "torch_dtype": "float32",
}


def qwen2_shapes(config: dict) -> dict[str, tuple[int, ...]]:
    """HF tensor name -> shape of a tied Qwen2 with `config`'s sizes."""
    h, heads, kv = config["hidden_size"], config["num_attention_heads"], config["num_key_value_heads"]
    hd, inter, vocab = h // heads, config["intermediate_size"], config["vocab_size"]
    shapes = {"model.embed_tokens.weight": (vocab, h), "model.norm.weight": (h,)}
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shapes.update({
            p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,),
            p + "self_attn.q_proj.weight": (heads * hd, h), p + "self_attn.q_proj.bias": (heads * hd,),
            p + "self_attn.k_proj.weight": (kv * hd, h), p + "self_attn.k_proj.bias": (kv * hd,),
            p + "self_attn.v_proj.weight": (kv * hd, h), p + "self_attn.v_proj.bias": (kv * hd,),
            p + "self_attn.o_proj.weight": (h, heads * hd),
            p + "mlp.gate_proj.weight": (inter, h), p + "mlp.up_proj.weight": (inter, h),
            p + "mlp.down_proj.weight": (h, inter),
        })
    return shapes


def qwen2_tensors(config: dict = TINY_CONFIG, seed: int = 0, dtype=np.float32) -> dict[str, np.ndarray]:
    """Random weights for every tensor of `qwen2_shapes(config)`."""
    rng = np.random.default_rng(seed)
    return {name: (rng.standard_normal(shape, dtype=np.float32) * 0.02).astype(dtype)
            for name, shape in qwen2_shapes(config).items()}


def write_hf_folder(folder: Path, config: dict = TINY_CONFIG, seed: int = 0) -> Path:
    """An HF-style folder (config.json + model.safetensors) written without transformers."""
    from safetensors.numpy import save_file

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    save_file(qwen2_tensors(config, seed), folder / "model.safetensors", metadata={"format": "pt"})
    return folder


# Text that hits the traps: runs of newlines and spaces, tabs, CRLF, digits, punctuation before
# newlines (merged with them by the Qwen/Llama 3 pre-tokenizer), CJK, combining marks, emoji.
_LINES = [
    "The miller walked to the river.", "", "   indented by three", "\t\ttabbed", "x", "12345678901",
    "ends with punctuation!!!", "日本語のテキスト", "e\u0301t\u0301e\u0301 combining", "🙂 emoji 🙂", "",
    "", "", "    ", "trailing spaces   ", "CRLF line\r", "'s 've 'll contractions", "a\u00a0nbsp", "--",
]


def tricky_text(n_chars: int, seed: int = 0) -> str:
    """About `n_chars` of random lines from _LINES, joined by one to five newlines."""
    rng = random.Random(seed)
    out, size = [], 0
    while size < n_chars:
        line = rng.choice(_LINES) + " " * rng.choice([0, 0, 1, 4]) + "\n" * rng.choice([1, 1, 1, 2, 5])
        out.append(line)
        size += len(line)
    return "".join(out)


def build_bpe_tokenizer(path: Path, style: str) -> Path:
    """A real BPE tokenizer.json: GPT-2 byte level, Qwen/Llama 3 split regex, or a prefix-space variant."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    if style == "qwen":
        pattern = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                   r"|\s*[\r\n]+|\s+(?!\S)|\s+")
        tok.normalizer = normalizers.NFC()
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
    else:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=style == "prefix-space")
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=500, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([tricky_text(200_000)], trainer)
    tok.save(str(path))
    return path


# What a new user's data folder held (issue 15): text under .md and upper-case names, nested, and a table.
MIXED_FOLDER = {"README.md": "# readme\n", "b.TXT": "upper case suffix\n", "sub/a.txt": "a\n", "table.csv": "a,b\n"}


def mixed_text_folder(root: Path) -> Path:
    """`root` holding MIXED_FOLDER's files."""
    for name, text in MIXED_FOLDER.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return root


def llama_permute(weights: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's LlamaModel.permute (convert_hf_to_gguf.py): HF rotate-half q/k rows -> GGML adjacent pairs."""
    grouped = weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
    return grouped.swapaxes(1, 2).reshape(weights.shape)
