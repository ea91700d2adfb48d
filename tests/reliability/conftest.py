"""Helpers of the reliability tests: tiny models as plain files, leftover detection, fault-injecting runners."""

from __future__ import annotations

import json
import os
import re
import resource
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from apr_testing import APR_COMMAND


# The one temp name all our writers use, for files and folders alike: `.{destination name}.{8 chars}.apr-tmp`.
TEMP_NAME = re.compile(r"^\..+\.[a-z0-9_]{8}\.apr-tmp$")

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


def leftovers(folder: Path) -> list[str]:
    """Hidden files or folders in `folder` (recursively), sorted: our temps, or any other writer's."""
    return sorted(os.path.relpath(os.path.join(root, name), folder)
                  for root, dirs, files in os.walk(folder) for name in dirs + files if name.startswith("."))


def _limits(fsize: int | None):
    """preexec_fn: cap the size of any file the child writes; writes past it fail with EFBIG."""
    def apply() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of death by SIGXFSZ
        resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))
    return apply if fsize is not None else None


def apr_env() -> dict[str, str]:
    """The environment CLI subprocesses run in: no colour, no debug tracebacks, one thread."""
    env = {**os.environ, "NO_COLOR": "1", "OMP_NUM_THREADS": "1"}
    env.pop("APR_DEBUG", None)
    return env


def cli_command(args, prelude: str | None = None) -> list[str]:
    """The command line of `apr ARGS`; with `prelude`, Python run in the same process before the CLI
    (for injected faults or pauses)."""
    if prelude is None:
        return [*APR_COMMAND, *map(str, args)]
    code = f"{prelude}\nimport sys\nfrom apr_cli.main import main\nsys.argv = ['apr', *sys.argv[1:]]\nmain()"
    return [sys.executable, "-c", code, *map(str, args)]


def run_cli(*args, fsize: int | None = None, prelude: str | None = None, timeout: float = 300,
            cwd: Path | None = None) -> subprocess.CompletedProcess:
    """Run `apr ARGS` in a subprocess, optionally with a file-size cap or Python run before the CLI
    (`prelude`, for injected faults), and return it with text output."""
    proc = subprocess.run(cli_command(args, prelude), capture_output=True, env=apr_env(), timeout=timeout, cwd=cwd,
                          preexec_fn=_limits(fsize), check=False)
    return subprocess.CompletedProcess(proc.args, proc.returncode, proc.stdout.decode("utf-8", "replace"),
                                       proc.stderr.decode("utf-8", "replace"))


def popen_cli(*args, cwd: Path | None = None, prelude: str | None = None, capture: bool = False) -> subprocess.Popen:
    """Start `apr ARGS` without waiting (for the kill and race tests); output is discarded unless `capture`
    (then read it with `finish`)."""
    out = subprocess.PIPE if capture else subprocess.DEVNULL
    return subprocess.Popen(cli_command(args, prelude), stdout=out, stderr=out, env=apr_env(), cwd=cwd)


def finish(proc: subprocess.Popen, timeout: float = 300) -> subprocess.CompletedProcess:
    """Wait for a `popen_cli(..., capture=True)` process; its result with text output."""
    stdout, stderr = proc.communicate(timeout=timeout)
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout.decode("utf-8", "replace"),
                                       stderr.decode("utf-8", "replace"))


def one_line_error(proc: subprocess.CompletedProcess) -> str:
    """The single `apr: error: ...` line of a failed command (asserting there is nothing else)."""
    lines = proc.stderr.strip().splitlines()
    assert "Traceback" not in proc.stderr, proc.stderr
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("apr: error: "), proc.stderr
    return lines[0]


def env_cases(name: str, default: int) -> int:
    """A case count from the environment (APR_FUZZ_CASES, APR_CRASH_CASES), else `default`."""
    return int(os.environ.get(name, default))


@pytest.fixture(scope="session")
def hf_tiny(tmp_path_factory) -> Path:
    """The numpy-built tiny Qwen2 HF folder."""
    return write_hf_folder(tmp_path_factory.mktemp("tiny") / "hf")


def record(test: str, **numbers) -> None:
    """Append a test's case counts to the file named by APR_RELIABILITY_STATS (for the README table)."""
    target = os.environ.get("APR_RELIABILITY_STATS")
    if target:
        with open(target, "a", encoding="utf-8") as fh:
            fh.write(json.dumps({"test": test, **numbers}) + "\n")
