"""One CLI grammar: -o/--output everywhere, defaults and required flags shown by click, an example in every help,
errors as `apr: error: <path or flag>: <problem>`, quiet broken pipes, no binary on a terminal."""

from __future__ import annotations

import importlib
import os
import pty
import subprocess

import click
import pytest

from apr_cli.main import COMMANDS
from apr_testing import APR_COMMAND, FIXTURES, GOLDEN, run_apr

TINY = GOLDEN / "tiny-qwen2.apr"


def _commands() -> dict[str, click.Command]:
    out = {}
    for name, (target, _) in COMMANDS.items():
        module, attr = target.split(":")
        command = getattr(importlib.import_module(module), attr)
        if isinstance(command, click.Group):
            out.update({f"{name} {sub}": c for sub, c in command.commands.items()})
        else:
            out[name] = command
    return out


def test_apr_alone_prints_the_help_and_exits_0():
    proc = run_apr()
    assert proc.returncode == 0 and proc.stderr == ""
    assert proc.stdout.startswith("Usage: apr") and "convert" in proc.stdout and "\\n" not in proc.stdout


@pytest.mark.parametrize("name", sorted(_commands()))
def test_every_help_has_an_example_and_every_option_says_its_default(name):
    command = _commands()[name]
    assert "Example" in (command.help or ""), name
    for param in command.params:
        if not isinstance(param, click.Option) or param.hidden:
            continue
        assert param.help, (name, param.name)
        unset = param.default is None or param.default is getattr(click.core, "UNSET", None)  # click >= 8.3
        has_default = not unset and not param.is_flag and not param.multiple
        assert not has_default or param.show_default, (name, param.name)
    proc = run_apr(*name.split(), "-h")
    assert proc.returncode == 0 and "Example" in proc.stdout


def test_output_flag_is_spelled_one_way_with_old_spellings_hidden():
    for name, command in _commands().items():
        for param in command.params:
            if isinstance(param, click.Option) and param.name in ("output", "out", "out_dir"):
                assert param.opts[:2] == ["-o", "--output"], (name, param.opts)
    for name in ("tokenize", "pretrain"):
        shown = run_apr(name, "-h").stdout
        assert "-o, --output" in shown and "--out " not in shown and "--out," not in shown


def test_old_output_spelling_still_works(tmp_path):
    proc = run_apr("tokenize", FIXTURES / "tiny-corpus.txt", "--from", TINY, "--out", tmp_path / "t.bin")
    assert proc.returncode == 0 or "tokenizer" in proc.stderr, proc.stderr  # the flag itself is accepted
    assert "no such option" not in proc.stderr


@pytest.mark.parametrize("args,expected", [
    (("convert", "x"), "apr: error: -o/--output: missing (required) (see 'apr convert -h')"),
    (("convert", "x", "-o", "y", "--dtype", "q"),
     "apr: error: --dtype: 'q' is not one of 'f32', 'f16', 'bf16' (see 'apr convert -h')"),
    (("inspect", "x", "--jsn"), "apr: error: --jsn: no such option; did you mean --json? (see 'apr inspect -h')"),
    (("convert", "x", "-o"), "apr: error: -o: needs a value (see 'apr convert -h')"),
    (("inpsect",), "apr: error: inpsect: no such command; did you mean inspect? (see 'apr -h')"),
])
def test_usage_errors_name_the_flag_in_one_line(args, expected):
    proc = run_apr(*args)
    assert proc.returncode == 2 and proc.stderr == expected + "\n" and proc.stdout == ""


def test_convert_says_what_a_wrong_input_is(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "llama"}')
    (tmp_path / "notes.txt").write_text("hello\n")
    for path, what in ((tmp_path / "config.json", "a JSON file"), (tmp_path / "notes.txt", "a text file")):
        proc = run_apr("convert", path, "-o", tmp_path / "m.apr")
        assert proc.returncode == 2
        assert proc.stderr == (f"apr: error: {path}: is {what}; apr convert reads HF model folders, .safetensors, "
                               "GGUF and .apr files\n")
    proc = run_apr("inspect", FIXTURES / "tiny-qwen2-hf" / "config.json")
    assert proc.stderr.endswith("config.json: is a JSON file, not an APR file\n") and proc.returncode == 2


def test_export_to_a_closed_pipe_exits_0_quietly():
    proc = subprocess.Popen([*APR_COMMAND, "export", str(TINY), "-o", "-"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    assert proc.stdout.read(10)  # like `| head -c 10`: read a little, then go away
    proc.stdout.close()
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0 and b"Traceback" not in err and b"error" not in err, err


def test_export_refuses_binary_to_a_terminal():
    main, secondary = pty.openpty()
    try:
        proc = subprocess.run([*APR_COMMAND, "export", str(TINY), "-o", "-"], stdout=secondary,
                              stderr=subprocess.PIPE, timeout=120, env={**os.environ, "NO_COLOR": "1"})
    finally:
        os.close(secondary)
        os.close(main)
    assert proc.returncode == 2
    assert proc.stderr.decode() == "apr: error: -o -: refusing to write binary safetensors to a terminal; " \
                                   "redirect or pipe it\n"
