"""`apr inspect`: header, flags, metadata, parameter count and dtype breakdown of a checkpoint."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from typing import Any, NamedTuple

import click

from apr_format import Flag, open_apr
from apr_format.param_count import count_parameters

from .render import echo_json, human_bytes, human_count, table
from .sources import NO_CHECKSUM, NOT_VERIFIED, input_kind, local_path

# The transformer config keys, shown first (spec: "Metadata").
ARCH_KEYS = (
    "architecture", "model_type", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim",
    "intermediate_size", "vocab_size", "max_position_embeddings", "rope_theta", "rope_type", "rms_norm_eps",
    "num_experts", "num_experts_per_tok", "moe_intermediate_size",
)
# Promoted to the top level of the JSON document.
SUMMARY_KEYS = ("architecture", "num_layers", "num_heads", "num_kv_heads", "hidden_size", "vocab_size")
_HEADER_FIELDS = (  # spec order
    "version_major", "version_minor", "flags", "tensor_count", "metadata_offset", "metadata_size",
    "tensor_index_offset", "data_offset", "checksum",
)
_SHORT = 60  # longest metadata value shown whole in human output


class Entry(NamedTuple):
    """What inspect needs of one tensor, whatever the format."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    numel: int
    nbytes: int  # bytes it takes in the file


@click.command("inspect")
@click.argument("path", metavar="FILE")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document on stdout.")
def inspect_cmd(path: str, as_json: bool) -> None:
    """Summarise FILE: an .apr, .safetensors or GGUF file, an HF model folder or hf://ORG/NAME[@REVISION].

    Reads the header, metadata and tensor index only: an .apr's footer checksum is not verified
    (`apr validate` does that); bytes appended after its data are reported.

    \b
    Examples:
      apr inspect model.apr
      apr inspect SmolLM2-135M.Q8_0.gguf --json
      apr inspect hf://HuggingFaceTB/SmolLM2-135M
    """
    path = local_path(path)
    kind = input_kind(path)
    summary = {"apr": summarize_apr, "gguf": summarize_gguf, "hf": summarize_hf}[kind](path)
    if as_json:
        echo_json(summary)
    else:
        click.echo(render_summary(summary))


def summarize_apr(path: str) -> dict[str, Any]:
    """The `apr inspect --json` document of an .apr file (reads header, metadata and index only)."""
    with open_apr(path, use_mmap=False) as apr:
        entries = [Entry(t.name, t.dtype, t.shape, t.numel, t.size) for t in apr.tensors()]
        header = {field: getattr(apr.header, field) for field in _HEADER_FIELDS}
        return {
            "format": "apr",
            "path": path,
            "version": f"{apr.header.version_major}.{apr.header.version_minor}",
            "file_size": apr.file_size,
            "checksum": NOT_VERIFIED,
            "trailing_bytes": apr.trailing_bytes,
            "tensor_count": len(entries),
            **param_fields(apr.metadata, entries),
            **{key: apr.metadata.get(key) for key in SUMMARY_KEYS},
            "flags": [flag.name for flag in Flag if apr.header.flags & flag],
            "header": header,
            "dtypes": dtype_histogram(entries),
            "patterns": name_patterns(entries),
            "metadata": arch_first(apr.metadata),
        }


def summarize_hf(path: str) -> dict[str, Any]:
    """The same document for a .safetensors file or HF folder, config.json keys renamed to ours."""
    from apr_converters.hf_source import open_hf_source

    with open_hf_source(path) as source:
        entries = [Entry(t.name, t.dtype, t.shape, t.numel, t.nbytes) for t in source.tensors.values()]
        config = canonical_config(source.config or {})
        return {
            "format": "safetensors",
            "path": path,
            "file_size": sum(os.path.getsize(f) for f in source.files),
            "files": [os.path.basename(f) for f in source.files],
            "checksum": NO_CHECKSUM,
            "tensor_count": len(entries),
            **param_fields(config, entries),
            **{key: config.get(key) for key in SUMMARY_KEYS},
            "dtypes": dtype_histogram(entries),
            "patterns": name_patterns(entries),
            "metadata": config,
            "safetensors_metadata": {os.path.basename(f): m for f, m in source.file_metadata.items()},
        }


def summarize_gguf(path: str) -> dict[str, Any]:
    """The same document for a GGUF file: its key/values (long arrays summarised) and tensor table."""
    from apr_converters.gguf_source import canonical_summary, read_gguf

    meta, tensors = read_gguf(path)
    entries = [Entry(t.name, t.dtype, t.shape, t.numel, t.nbytes) for t in tensors]
    config = canonical_config(canonical_summary(meta, tensors))
    return {
        "format": "gguf",
        "path": path,
        "version": meta.get("GGUF.version"),
        "file_size": os.path.getsize(path),
        "checksum": NO_CHECKSUM,
        "tensor_count": len(entries),
        **param_fields({}, entries),
        **{key: config.get(key) for key in SUMMARY_KEYS},
        "dtypes": dtype_histogram(entries),
        "patterns": name_patterns(entries),
        "metadata": meta,
    }


def param_fields(metadata: dict[str, Any], entries: list[Entry]) -> dict[str, Any]:
    """`total_params` (distinct parameters, as convert, pretrain and metadata count them) and
    `stored_params` (values in the file, with a tied lm_head copy), one definition everywhere."""
    count = count_parameters(metadata, {e.name: e.shape for e in entries})
    return {"total_params": count.distinct, "stored_params": count.stored, "tied_copy": count.tied_copy}


def canonical_config(config: dict[str, Any]) -> dict[str, Any]:
    """An HF config.json under our metadata names (model_type -> architecture, num_hidden_layers ->
    num_layers, ...), with the HF spelling of each mapped key dropped, architecture keys first."""
    from apr_format.families import CONFIG_KEYS, map_config

    canonical = map_config(config)
    if isinstance(config.get("model_type"), str):
        canonical = {"architecture": config["model_type"], **canonical}
    replaced = {"model_type"} if "architecture" in canonical else set()
    replaced |= {hf for hf, apr in CONFIG_KEYS.items() if "." not in hf and apr in canonical}
    return arch_first({**canonical, **{k: v for k, v in config.items() if k not in replaced}})


def arch_first(metadata: dict[str, Any]) -> dict[str, Any]:
    """`metadata` with the architecture keys first (in spec order), then the rest as stored."""
    ordered = {key: metadata[key] for key in ARCH_KEYS if key in metadata}
    ordered.update((k, v) for k, v in metadata.items() if k not in ordered)
    return ordered


def dtype_histogram(entries: Iterable[Entry]) -> dict[str, dict[str, int]]:
    """dtype -> tensor count, parameter count and bytes, largest share first."""
    hist: dict[str, dict[str, int]] = {}
    for e in entries:
        row = hist.setdefault(e.dtype, {"tensors": 0, "params": 0, "bytes": 0})
        row["tensors"] += 1
        row["params"] += e.numel
        row["bytes"] += e.nbytes
    return dict(sorted(hist.items(), key=lambda item: -item[1]["bytes"]))


def name_patterns(entries: Iterable[Entry]) -> list[dict[str, Any]]:
    """Tensor names with layer numbers collapsed to `#` (llama.cpp style), in first-seen order."""
    groups: dict[str, dict[str, Any]] = {}
    for e in entries:
        pattern = ".".join("#" if part.isascii() and part.isdigit() else part for part in e.name.split("."))
        group = groups.setdefault(pattern, {"pattern": pattern, "count": 0, "dtypes": [], "shapes": []})
        group["count"] += 1
        if e.dtype not in group["dtypes"]:
            group["dtypes"].append(e.dtype)
        if list(e.shape) not in group["shapes"]:
            group["shapes"].append(list(e.shape))
    return list(groups.values())


def render_summary(summary: dict[str, Any]) -> str:
    """Human-readable inspect output: overview, metadata, dtype histogram, name patterns."""
    parts = [table(_overview(summary), tablefmt="plain")]
    if summary["metadata"]:
        title = {"apr": "metadata", "gguf": "GGUF key/values"}.get(summary["format"], "config.json (canonical names)")
        parts.append(table([(k, abbreviate(v)) for k, v in summary["metadata"].items()], (title, "value")))
    parts.append(table(
        [(d, h["tensors"], human_count(h["params"]), human_bytes(h["bytes"])) for d, h in summary["dtypes"].items()],
        ("dtype", "tensors", "params", "bytes"),
    ))
    parts.append(table(
        [(p["pattern"], p["count"], ", ".join(p["dtypes"]), " | ".join(map(_shape, p["shapes"])))
         for p in summary["patterns"]],
        ("tensor pattern", "count", "dtype", "shape"),
    ))
    return "\n\n".join(parts)


def _overview(s: dict[str, Any]) -> list[tuple[str, str]]:
    rows = [("path", s["path"])]
    if s["format"] == "apr":
        h = s["header"]
        rows += [
            ("format", f"APR v{s['version']}"),
            ("flags", f"{', '.join(s['flags']) or 'none'} ({h['flags']:#06x})"),
            ("header", f"metadata {h['metadata_size']} bytes at {h['metadata_offset']}, index at "
                       f"{h['tensor_index_offset']}, data at {h['data_offset']}, checksum {h['checksum']:#010x}"),
        ]
    elif s["format"] == "gguf":
        rows += [("format", f"GGUF v{s['version']}")]
    else:
        rows += [("format", "safetensors"), ("files", ", ".join(s["files"]))]
    rows += [
        ("file size", f"{human_bytes(s['file_size'])} ({s['file_size']:,} bytes)"),
        ("footer CRC" if s["format"] == "apr" else "checksum", _checksum_note(s)),
        ("tensors", f"{s['tensor_count']:,}"),
        ("parameters", _params_note(s)),
    ]
    return rows


def _checksum_note(s: dict[str, Any]) -> str:
    if s["format"] != "apr":
        return s["checksum"]
    note = f"{s['checksum']} (apr validate checks it)"
    if s["trailing_bytes"]:
        note += f"; {s['trailing_bytes']:,} bytes after the data section (appended to the file?)"
    return note


def _params_note(s: dict[str, Any]) -> str:
    text = f"{human_count(s['total_params'])} ({s['total_params']:,})"
    if s["tied_copy"]:
        text += f"; {human_count(s['stored_params'])} stored ({s['tied_copy']} is a copy of the tied embedding)"
    return text


def abbreviate(value: Any) -> str:
    """A metadata value for a terminal: long strings cut, long lists and objects summarised."""
    if isinstance(value, str):
        return value if len(value) <= _SHORT else f"{value[:_SHORT - 20]}... ({len(value):,} chars)"
    text = json.dumps(value, ensure_ascii=False)
    if len(text) <= _SHORT:
        return text
    if isinstance(value, list):
        return f"[list of {len(value):,} items]"
    return f"{{object with {len(value):,} keys: {', '.join(list(value)[:4])}{', ...' if len(value) > 4 else ''}}}"


def _shape(shape: list[int]) -> str:
    return "[" + ", ".join(map(str, shape)) + "]"
