"""`hf://ORG/NAME[@REVISION]` model ids through the real huggingface_hub client and a local Hub on 127.0.0.1."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from apr_converters.hub import download_model, parse_hub_id
from apr_format.errors import InvalidArgument

from apr_testing import FIXTURES, one_line_error, run_apr, run_apr_json
from hub_server import LocalHub

REPO = "tiny-org/tiny-qwen2"


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """A local Hub serving the checked-in tiny Qwen2 (plus files apr must not download); HF_HOME in tmp_path."""
    folder = tmp_path / "repo"
    shutil.copytree(FIXTURES / "tiny-qwen2-hf", folder)
    (folder / "pytorch_model.bin").write_bytes(b"a pickle apr must never fetch")
    (folder / "model.Q4_K.gguf").write_bytes(b"GGUF not wanted either")
    server = LocalHub({REPO: folder})
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.setenv("HF_ENDPOINT", server.endpoint)
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    yield server
    server.close()


def _one_line(proc, text: str) -> None:
    assert proc.returncode == 2 and proc.stdout == "", proc.stderr
    assert one_line_error(proc) == f"apr: error: {text}"


def test_download_then_offline_from_the_cache(hub, tmp_path, monkeypatch):
    model = f"hf://{REPO}"
    online = run_apr_json("run", model, "-p", "hello", "-n", "6", "--ignore-eos")
    local = run_apr_json("run", FIXTURES / "tiny-qwen2-hf", "-p", "hello", "-n", "6", "--ignore-eos")
    assert online["tokens"] == local["tokens"]
    fetched = {r.split("/")[-1] for r in hub.requests if r.startswith("GET /tiny-org/tiny-qwen2/resolve/")}
    assert fetched == {p.name for p in (FIXTURES / "tiny-qwen2-hf").iterdir()}  # no .bin, no .gguf
    snapshots = list((tmp_path / "hf-home" / "hub" / "models--tiny-org--tiny-qwen2" / "snapshots").iterdir())
    assert len(snapshots) == 1 and not (snapshots[0] / "pytorch_model.bin").exists()

    hub.close()  # nothing answers any more: only the cache can serve the model
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    before = len(hub.requests)
    assert run_apr_json("run", model, "-p", "hello", "-n", "6", "--ignore-eos")["tokens"] == local["tokens"]
    assert run_apr_json("inspect", model)["architecture"] == "qwen2"
    assert run_apr_json("tensors", model)["count"] == 26
    assert run_apr_json("eval", model, "--data", FIXTURES / "tiny-corpus.txt", "--seq-len", "64")["windows"] > 0
    report = run_apr_json("convert", model, "-o", tmp_path / "m.apr")
    assert report["family"] == "qwen2" and (tmp_path / "m.apr").exists()
    assert len(hub.requests) == before
    _one_line(run_apr("inspect", "hf://tiny-org/not-cached"),
              "hf://tiny-org/not-cached: not in the local Hugging Face cache and HF_HUB_OFFLINE=1 forbids downloading it")


def test_typo_revision_and_network_failure_are_one_line(hub, tmp_path, monkeypatch):
    _one_line(run_apr("run", "hf://tiny-org/tiny-qwen", "-p", "hi"),
              "hf://tiny-org/tiny-qwen: no such model on the Hub (check the spelling; a private model needs HF_TOKEN)")
    _one_line(run_apr("inspect", f"hf://{REPO}@v2"), f"hf://{REPO}@v2: revision 'v2' does not exist in {REPO}")
    _one_line(run_apr("convert", "hf://tiny-org", "-o", tmp_path / "x.apr"),
              "hf://tiny-org: is not a model id of the form hf://ORG/NAME[@REVISION]")
    hub.close()
    _one_line(run_apr("eval", f"hf://{REPO}", "--data", FIXTURES / "tiny-corpus.txt"),
              f"hf://{REPO}: the Hub cannot be reached and the model is not in the local Hugging Face cache "
              "(check the network or HF_ENDPOINT)")
    assert not (tmp_path / "x.apr").exists()


@pytest.mark.parametrize("text, expected", [
    ("hf://Org/Name", ("Org/Name", None)), ("hf://a-b/c.d_e@main", ("a-b/c.d_e", "main")),
    ("hf://o/n@0123abc", ("o/n", "0123abc")),
])
def test_model_ids_parse(text, expected):
    assert parse_hub_id(text) == expected


@pytest.mark.parametrize("text", ["hf://name-only", "hf://o/n/extra", "hf://o/n@", "hf://../x", "hf://o/.."])
def test_malformed_model_ids_are_refused(text):
    with pytest.raises(InvalidArgument, match="is not a model id of the form"):
        parse_hub_id(text)


def test_ids_the_hub_refuses_are_invalid_arguments():
    with pytest.raises(InvalidArgument, match=r"^hf://a--b/c: is not a valid model id: Cannot have -- or \.\."):
        download_model("hf://a--b/c")
