"""Every `apr` command given bad input: missing files, folders where files belong, wrong formats,
unwritable or full outputs, conflicting or malformed flags. Each answer is one printable line
`apr: error: ...` on stderr, the documented exit code (2; `validate` says 1 for a file it can read but
finds broken), no traceback, nothing on stdout, and no output or temp file left behind."""

from __future__ import annotations

import os
import re
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from apr_cli.main import COMMANDS

from apr_testing import APR_COMMAND, FIXTURES, TEMP_NAME, apr_env, leftovers, one_line_error, run_apr


HF = FIXTURES / "tiny-qwen2-hf"
TOKENIZER = HF / "tokenizer.json"
CORPUS = FIXTURES / "tiny-corpus.txt"
TRAIN = ["--steps", "1", "--seq-len", "32", "--batch-size", "4", "--device", "cpu", "-q"]


@dataclass(frozen=True)
class Case:
    """One command line that must fail: `{name}` placeholders are files of the `files` fixture."""

    args: tuple[str, ...]
    names: str  # a placeholder (or text) the error line must contain
    code: int = 2
    outputs: tuple[str, ...] = ()  # must not exist afterwards
    words: str = ""  # more text the line must contain


@dataclass
class Files:
    root: Path
    paths: dict[str, Path] = field(default_factory=dict)

    def fill(self, text: str) -> str:
        return text.format(**{k: str(v) for k, v in self.paths.items()})


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> Files:
    """Valid inputs, broken ones, and places where nothing can be written."""
    import numpy as np
    from apr_trainer.data import write_token_file

    root = tmp_path_factory.mktemp("faults")
    f = Files(root)
    p = f.paths
    p["apr"] = root / "model.apr"
    assert run_apr("convert", HF, "-o", p["apr"], "-q").returncode == 0
    p["hf"] = HF
    p["tokenizer"] = TOKENIZER
    p["corpus"] = CORPUS
    p["tokens"] = root / "tokens.bin"
    write_token_file(p["tokens"], [np.random.default_rng(0).integers(0, 300, 5000)], 300)
    p["missing"] = root / "missing.apr"
    p["empty_dir"] = root / "empty"
    p["empty_dir"].mkdir()
    p["noise"] = root / "noise.apr"
    p["noise"].write_bytes(bytes(range(256)) * 12)
    p["noise_st"] = root / "noise.safetensors"
    p["noise_st"].write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!" + bytes(32))
    p["noise_gguf"] = root / "noise.gguf"
    p["noise_gguf"].write_bytes(b"GGUF" + bytes(range(200)))
    p["noise_json"] = root / "noise.json"
    p["noise_json"].write_bytes(bytes(range(128, 256)) * 4)
    p["noise_yaml"] = root / "noise.yaml"
    p["noise_yaml"].write_bytes(bytes(range(128, 256)) * 4)
    p["text"] = root / "notes.txt"
    p["text"].write_text("not a model\n")
    p["a_file"] = root / "a_file"
    p["a_file"].write_text("a file, not a folder\n")
    p["run"] = root / "run"  # a run folder as `apr plot` reads it
    p["run"].mkdir()
    (p["run"] / "metrics.jsonl").write_text('{"step": 0, "val_loss": 5.0, "tokens_seen": 0}\n{"step": 1, "loss": 4.0, '
                                            '"lr": 0.001, "tokens_per_s": 900.0, "tokens_seen": 64}\n')
    p["noise_run"] = root / "noise-run"
    p["noise_run"].mkdir()
    (p["noise_run"] / "metrics.jsonl").write_bytes(bytes(range(256)) + b"\n{}\n")
    p["out_dir"] = root / "outputs"  # writable; every failing case must leave it empty
    p["out_dir"].mkdir()
    p["under_file"] = p["a_file"] / "out"  # the parent is a regular file
    p["no_parent"] = root / "no" / "such" / "folder" / "out"
    p["readonly"] = _read_only_folder(root / "readonly")
    return f


def _read_only_folder(folder: Path) -> Path:
    """A folder nobody may write in: chmod for ordinary users, a read-only tmpfs for root (who ignores
    modes), and a path under a regular file when root cannot mount either."""
    folder.mkdir()
    if os.geteuid() != 0:
        folder.chmod(0o555)
        return folder
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(folder)],
                      capture_output=True, check=False).returncode == 0:
        return folder
    blocker = folder / "not-a-folder"
    blocker.write_text("")
    return blocker


@pytest.fixture(scope="module", autouse=True)
def _unmount(files):
    yield
    subprocess.run(["umount", "-l", str(files.paths["readonly"])], capture_output=True, check=False)


def writer_faults(build, out_name: str, extra: tuple[str, ...] = ()) -> dict[str, Case]:
    """The unwritable-output faults of a command writing `out_name`; `build(out)` gives its arguments."""
    return {
        "output under a file": Case(build("{under_file}/" + out_name), "{a_file}"),
        "output folder missing": Case(build("{no_parent}/" + out_name), "{no_parent}"),
        "output folder read-only": Case(build("{readonly}/" + out_name), "{readonly}"),
        **{k: v for k, v in extra},
    }


MATRIX: dict[str, dict[str, Case]] = {
    "inspect": {
        "missing file": Case(("inspect", "{missing}"), "{missing}", words="No such file or directory"),
        "empty folder": Case(("inspect", "{empty_dir}"), "{empty_dir}"),
        "wrong format": Case(("inspect", "{noise}"), "{noise}", words="not an APR file"),
        "broken safetensors": Case(("inspect", "{noise_st}", "--json"), "{noise_st}"),
        "broken gguf": Case(("inspect", "{noise_gguf}"), "{noise_gguf}", words="GGUF"),
        "unknown flag": Case(("inspect", "{apr}", "--frobnicate"), "--frobnicate", words="no such option"),
    },
    "tensors": {
        "missing file": Case(("tensors", "{missing}"), "{missing}"),
        "empty folder": Case(("tensors", "{empty_dir}"), "{empty_dir}"),
        "wrong format": Case(("tensors", "{noise}", "--json"), "{noise}"),
        "filter without pattern": Case(("tensors", "{apr}", "--filter"), "--filter", words="needs a value"),
    },
    "validate": {
        "missing file": Case(("validate", "{missing}"), "{missing}"),
        "folder": Case(("validate", "{empty_dir}"), "{empty_dir}", words="is a folder"),
        "two files": Case(("validate", "{apr}", "{apr}"), "apr validate", words="unexpected extra argument"),
    },
    "convert": {
        "missing source": Case(("convert", "{missing}", "-o", "{out_dir}/m.apr"), "{missing}"),
        "empty folder": Case(("convert", "{empty_dir}", "-o", "{out_dir}/m.apr"), "{empty_dir}"),
        "text as source": Case(("convert", "{text}", "-o", "{out_dir}/m.apr"), "{text}", words="is a text file"),
        "broken safetensors": Case(("convert", "{noise_st}", "-o", "{out_dir}/m.apr"), "{noise_st}"),
        "broken gguf": Case(("convert", "{noise_gguf}", "-o", "{out_dir}/m.apr"), "{noise_gguf}"),
        "output is a folder": Case(("convert", "{hf}", "-o", "{out_dir}"), "{out_dir}", words="is a folder"),
        "output exists": Case(("convert", "{hf}", "-o", "{apr}"), "{apr}", words="--force"),
        "keep-quant on HF": Case(("convert", "{hf}", "-o", "{out_dir}/m.apr", "--keep-quant"), "{hf}",
                                 words="does not apply to HF input"),
        "config on GGUF": Case(("convert", "{noise_gguf}", "-o", "{out_dir}/m.apr", "--config", "{text}"),
                               "{noise_gguf}", words="does not apply"),
        "bad dtype": Case(("convert", "{hf}", "-o", "{out_dir}/m.apr", "--dtype", "q9"), "apr convert"),
        "no output": Case(("convert", "{hf}"), "-o/--output", words="missing (required)"),
        **writer_faults(lambda out: ("convert", "{hf}", "-o", out), "m.apr"),
    },
    "export": {
        "missing model": Case(("export", "{missing}", "-o", "{out_dir}/hf"), "{missing}"),
        "folder as model": Case(("export", "{empty_dir}", "-o", "{out_dir}/hf"), "{empty_dir}"),
        "wrong format": Case(("export", "{noise_st}", "-o", "{out_dir}/hf"), "{noise_st}", words="not an APR file"),
        "output exists": Case(("export", "{apr}", "-o", "{hf}"), "{hf}", words="--force"),
        "hf to stdout": Case(("export", "{apr}", "-o", "-", "--format", "hf"), "-", words="stdout"),
        "shard size for one file": Case(("export", "{apr}", "-o", "{out_dir}/m.safetensors", "--max-shard-size",
                                         "1GB"), "--max-shard-size", words="applies to --format hf only"),
        "json with stdout": Case(("export", "{apr}", "-o", "-", "--json"), "--json", words="needs stdout"),
        "bad shard size": Case(("export", "{apr}", "-o", "{out_dir}/hf", "--max-shard-size", "lots"),
                               "{out_dir}/hf", words="'lots'"),
        **writer_faults(lambda out: ("export", "{apr}", "-o", out), "hf"),
        "file output under a file": Case(("export", "{apr}", "-o", "{under_file}/m.safetensors"), "{a_file}"),
    },
    "diff": {
        "missing first": Case(("diff", "{missing}", "{apr}"), "{missing}"),
        "missing second": Case(("diff", "{apr}", "{missing}"), "{missing}"),
        "empty folder": Case(("diff", "{apr}", "{empty_dir}"), "{empty_dir}"),
        "wrong format": Case(("diff", "{noise}", "{apr}", "--json"), "{noise}"),
        "one argument": Case(("diff", "{apr}"), "B", words="missing (required)"),
    },
    "pretrain": {
        "missing init": Case(("pretrain", "--init", "{missing}", "--data", "{tokens}", "--out", "{out_dir}/run",
                              *TRAIN), "{missing}", outputs=("{out_dir}/run",)),
        "missing data": Case(("pretrain", "--arch", "tiny", "--data", "{missing}", "--out", "{out_dir}/run", *TRAIN),
                             "{missing}", outputs=("{out_dir}/run",)),
        "folder as init": Case(("pretrain", "--init", "{empty_dir}", "--data", "{tokens}", "--out", "{out_dir}/run",
                                *TRAIN), "{empty_dir}", outputs=("{out_dir}/run",)),
        "wrong format init": Case(("pretrain", "--init", "{noise}", "--data", "{tokens}", "--out", "{out_dir}/run",
                                   *TRAIN), "{noise}", outputs=("{out_dir}/run",)),
        "data not tokens": Case(("pretrain", "--arch", "tiny", "--data", "{noise_gguf}", "--out", "{out_dir}/run",
                                 *TRAIN), "{noise_gguf}", outputs=("{out_dir}/run",)),
        "init with arch": Case(("pretrain", "--init", "{apr}", "--arch", "tiny", "--data", "{tokens}", "--out",
                                "{out_dir}/run", *TRAIN), "--init", words="conflicts", outputs=("{out_dir}/run",)),
        "resume with init": Case(("pretrain", "--resume", "{empty_dir}", "--init", "{apr}", *TRAIN), "{empty_dir}"),
        "resume nothing": Case(("pretrain", "--resume", "{empty_dir}", *TRAIN), "{empty_dir}",
                               words="no complete checkpoint"),
        "no data": Case(("pretrain", "--arch", "tiny", "--out", "{out_dir}/run"), "--data", words="missing"),
        "negative steps": Case(("pretrain", "--arch", "tiny", "--data", "{tokens}", "--out", "{out_dir}/run",
                                "--steps", "-1", "-q"), "--steps", outputs=("{out_dir}/run",)),
        # A missing run folder is created (with its parents, like mkdir -p): not a fault.
        **{k: v for k, v in writer_faults(lambda out: ("pretrain", "--arch", "tiny", "--data", "{tokens}", "--out",
                                                       out, *TRAIN), "run").items() if k != "output folder missing"},
    },
    "eval": {
        "missing model": Case(("eval", "{missing}", "--data", "{corpus}"), "{missing}"),
        "missing data": Case(("eval", "{apr}", "--data", "{missing}"), "{missing}"),
        "binary model": Case(("eval", "{noise}", "--data", "{corpus}"), "{noise}"),
        "broken gguf": Case(("eval", "{noise_gguf}", "--data", "{corpus}"), "{noise_gguf}"),
        "broken tokenizer": Case(("eval", "{apr}", "--data", "{corpus}", "--tokenizer", "{noise_json}"),
                                 "{noise_json}"),
        "malformed model id": Case(("eval", "hf://x", "--data", "{corpus}"), "hf://x", words="not a model id"),
    },
    "run": {
        "missing model": Case(("run", "{missing}", "-p", "hi"), "{missing}"),
        "binary model": Case(("run", "{noise}", "-p", "hi"), "{noise}"),
        "broken safetensors": Case(("run", "{noise_st}", "-p", "hi"), "{noise_st}"),
        "missing tokenizer": Case(("run", "{apr}", "-p", "hi", "--tokenizer", "{missing}"), "{missing}"),
        "no tokens asked": Case(("run", "{apr}", "-p", "hi", "-n", "0"), "-n", words="at least 1"),
    },
    "plot": {
        "missing run": Case(("plot", "{missing}", "-o", "{out_dir}/c.png"), "{missing}"),
        "not a run folder": Case(("plot", "{empty_dir}", "-o", "{out_dir}/c.png"), "{empty_dir}"),
        "broken metrics": Case(("plot", "{noise_run}", "-o", "{out_dir}/c.png"), "{noise_run}", words="line 1"),
        "unknown metric": Case(("plot", "{run}", "-o", "{out_dir}/c.png", "--metric", "loss,bogus"), "--metric",
                               words="bogus"),
        "bad x": Case(("plot", "{run}", "-o", "{out_dir}/c.png", "--x", "time"), "apr plot", words="--x"),
        "output not png": Case(("plot", "{run}", "-o", "{out_dir}/c.apr"), "{out_dir}/c.apr", words=".png"),
        "output folder missing": Case(("plot", "{run}", "-o", "{no_parent}.png"), "{no_parent}.png"),
        "no run": Case(("plot", "-o", "{out_dir}/c.png"), "apr plot", words="RUN_DIR"),
    },
    "tokenize": {
        "missing input": Case(("tokenize", "{missing}", "-o", "{out_dir}/t", "--tokenizer", "{tokenizer}"),
                              "{missing}"),
        "empty folder": Case(("tokenize", "{empty_dir}", "-o", "{out_dir}/t", "--tokenizer", "{tokenizer}"),
                             "{empty_dir}"),
        "binary input": Case(("tokenize", "{noise}", "-o", "{out_dir}/t", "--tokenizer", "{tokenizer}"),
                             "{noise}"),
        "broken tokenizer": Case(("tokenize", "{corpus}", "-o", "{out_dir}/t", "--tokenizer", "{noise_json}"),
                                 "{noise_json}"),
        "missing tokenizer": Case(("tokenize", "{corpus}", "-o", "{out_dir}/t", "--tokenizer", "{missing}"),
                                  "{missing}"),
        "both tokenizers": Case(("tokenize", "{corpus}", "-o", "{out_dir}/t", "--tokenizer", "{tokenizer}",
                                 "--from", "{apr}"), "--tokenizer", words="exactly one"),
        "no tokenizer": Case(("tokenize", "{corpus}", "-o", "{out_dir}/t"), "--tokenizer", words="exactly one"),
        "output exists": Case(("tokenize", "{corpus}", "-o", "{hf}", "--tokenizer", "{tokenizer}"), "{hf}",
                              words="--force"),
        "output is a token file": Case(("tokenize", "{corpus}", "-o", "{out_dir}/t.bin", "--tokenizer", "{tokenizer}"),
                                       "{out_dir}/t.bin", words="writes a folder of shards"),
        "bad shard size": Case(("tokenize", "{corpus}", "-o", "{out_dir}/t", "--tokenizer", "{tokenizer}",
                                "--shard-tokens", "lots"), "--shard-tokens", words="expected a count like 100M"),
        # A missing output folder is created (with its parents, like mkdir -p): not a fault.
        **{k: v for k, v in writer_faults(lambda out: ("tokenize", "{corpus}", "-o", out, "--tokenizer", "{tokenizer}",
                                                       "-q"), "t").items() if k != "output folder missing"},
    },
    "contract": {
        "missing file": Case(("contract", "check", "{missing}"), "apr contract check", words="does not exist"),
        "folder": Case(("contract", "check", "{empty_dir}"), "apr contract check", words="is a directory"),
        "binary file": Case(("contract", "check", "{noise_yaml}"), "{noise_yaml}"),
        "unknown subcommand": Case(("contract", "frobnicate"), "frobnicate", words="no such command"),
    },
}
# `apr train` is an alias of `apr pretrain` (same callback): a few of its faults show the alias answers alike.
MATRIX["train"] = {name: Case(("train", *case.args[1:]), case.names.replace("apr pretrain", "apr train"),
                              case.code, case.outputs, case.words) for name, case in MATRIX["pretrain"].items()
                   if name in ("missing data", "init with arch", "no data", "output folder read-only")}
# `apr import` is aprender's name for `apr convert` (same callback): its missing-input fault answers alike.
MATRIX["import"] = {name: Case(("import", *case.args[1:]), case.names, case.code, case.outputs, case.words)
                    for name, case in MATRIX["convert"].items() if "missing" in name}
CASES = [(command, fault) for command in sorted(MATRIX) for fault in MATRIX[command]]


def test_every_command_has_fault_cases():
    assert set(MATRIX) == set(COMMANDS)
    for command, faults in MATRIX.items():
        assert any("missing" in fault for fault in faults), command


@pytest.mark.parametrize("command,fault", CASES, ids=[f"{c}: {f}" for c, f in CASES])
def test_bad_input_gives_one_line_and_exit_code(command, fault, files):
    case = MATRIX[command][fault]
    proc = run_apr(*(files.fill(a) for a in case.args), cwd=files.root)
    line = one_line_error(proc)
    assert proc.returncode == case.code, proc.stderr
    assert proc.stdout == "" and line.isprintable(), (proc.stdout, line)
    assert files.fill(case.names) in line and case.words in line, line
    assert not any(TEMP_NAME.match(part) for part in re.split(r"[/: ]", line)), f"names a temp file: {line}"
    for output in case.outputs:
        assert not Path(files.fill(output)).exists(), output
    assert os.listdir(files.paths["out_dir"]) == [] and leftovers(files.root) == []


@pytest.mark.parametrize("command", sorted(set(MATRIX) - {"pretrain", "train", "import", "contract", "tokenize"}))
def test_stdout_on_a_full_disk(command, files):
    """Output that cannot be written (stdout on a full disk) is an error too: exit 2, one line."""
    args = {"inspect": ("{apr}",), "tensors": ("{apr}",), "validate": ("{apr}",), "diff": ("{apr}", "{hf}"),
            "convert": ("{hf}", "-o", "{out_dir}/m.apr", "--json"), "export": ("{apr}", "-o", "-"),
            "import": ("{hf}", "-o", "{out_dir}/m.apr", "--json"),
            "eval": ("{apr}", "--data", "{corpus}", "--seq-len", "32", "--max-tokens", "64"),
            "run": ("{apr}", "-p", "hi", "-n", "2"),
            "plot": ("{run}", "-o", "{out_dir}/c.png")}[command]
    with open("/dev/full", "wb") as full:
        proc = subprocess.run([*APR_COMMAND, command, *(files.fill(a) for a in args)], stdout=full,
                              stderr=subprocess.PIPE, env=apr_env(), text=True, check=False)
    assert proc.returncode == 2 and one_line_error(proc).endswith("No space left on device"), proc.stderr
    for name in os.listdir(files.paths["out_dir"]):  # convert (plot) wrote its file before the report failed
        (files.paths["out_dir"] / name).unlink()


def test_plot_without_matplotlib_says_how_to_install_it(files):
    """matplotlib is an optional extra: blocked from import, `apr plot` answers with the pip command."""
    blocked = "import sys\nsys.modules['matplotlib'] = sys.modules['matplotlib.figure'] = None"
    proc = run_apr("plot", files.paths["run"], "-o", files.paths["out_dir"] / "c.png", prelude=blocked)
    assert proc.returncode == 2 and one_line_error(proc) == (
        "apr: error: apr plot needs matplotlib, which is not installed: pip install 'apr-toolkit[plot]'")
    assert os.listdir(files.paths["out_dir"]) == []


def test_validate_of_a_broken_file_is_a_check_failure_not_an_error(files):
    """The one documented exit 1: validate read the file and found it broken (the report is the output)."""
    proc = run_apr("validate", files.paths["noise"])
    assert proc.returncode == 1 and proc.stderr == "" and "INVALID" in proc.stdout


def test_interrupt_is_one_line_and_exit_130(files, tmp_path):
    """Ctrl-C (SIGINT) in the middle of training: the run stops after the current step (with a checkpoint when
    a step was done) and says so in one line, exit 130, no traceback, no temp file."""
    import signal
    import time

    out = tmp_path / "run"
    proc = subprocess.Popen([*APR_COMMAND, "pretrain", "--arch", "tiny", "--data", str(files.paths["tokens"]),
                             "--out", str(out), "--steps", "100000", "--seq-len", "32", "--batch-size", "4",
                             "--device", "cpu", "-q"], stderr=subprocess.PIPE, text=True, env=apr_env())
    while not (out / "run.json").exists() and proc.poll() is None:
        time.sleep(0.01)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and err.strip().startswith("apr: stopped by SIGINT "), err
    assert len(err.strip().splitlines()) == 1 and leftovers(out) == []
