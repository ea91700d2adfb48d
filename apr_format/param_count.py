"""One definition of a checkpoint's parameter count: distinct parameters (a tied head's stored copy counts once)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

HEAD, EMBED = "lm_head.weight", "model.embed_tokens.weight"


@dataclass(frozen=True)
class ParamCount:
    """`distinct`: parameters of the model; `stored`: values the file holds (with a tied copy);
    `tied_copy`: the name of the copy, None when there is none."""

    distinct: int
    stored: int
    tied_copy: str | None


def says_tied(metadata: Mapping[str, Any]) -> bool | None:
    """Whether metadata (aprender's or HF's spelling, or the carried hf_config) says the embeddings are tied."""
    hf_config = metadata.get("hf_config")
    for source, key in ((metadata, "tied_embeddings"), (metadata, "tie_word_embeddings"),
                        (hf_config if isinstance(hf_config, Mapping) else {}, "tie_word_embeddings")):
        if isinstance(source.get(key), bool):
            return source[key]
    return None


def count_parameters(metadata: Mapping[str, Any], shapes: Mapping[str, tuple[int, ...]]) -> ParamCount:
    """The parameter count of a checkpoint with these tensor `shapes` (name -> shape).

    A stored `lm_head.weight` of a model whose metadata says the embeddings are tied is aprender's
    copy of the embedding: counted in `stored`, not in `distinct`.
    """
    stored = sum(math.prod(shape) for shape in shapes.values())
    tied = says_tied(metadata) and HEAD in shapes and shapes.get(EMBED) == shapes[HEAD]
    distinct = stored - math.prod(shapes[HEAD]) if tied else stored
    return ParamCount(distinct, stored, HEAD if tied else None)
