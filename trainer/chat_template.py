"""Chat prompts: the checkpoint's Jinja chat template rendered in a sandbox, as transformers renders it."""

from __future__ import annotations

import json
from collections.abc import Mapping
from datetime import datetime
from typing import Any

from apr_format.errors import CorruptSource, InvalidArgument

CHAT_TEMPLATE_KEY = "chat_template"
SPECIAL_TOKENS_KEY = "special_tokens"


def chat_template(metadata: Mapping[str, Any], where: str) -> str:
    """The chat template a checkpoint carries.

    Raises:
        InvalidArgument: it carries none.
    """
    template = metadata.get(CHAT_TEMPLATE_KEY)
    if not isinstance(template, str) or not template:
        raise InvalidArgument(where, "carries no chat template, so --chat cannot be used (drop --chat)")
    return template


def render_chat(template: str, messages: list[dict[str, str]], special_tokens: Mapping[str, Any], where: str) -> str:
    """`template` rendered for `messages` with add_generation_prompt, in jinja2's
    ImmutableSandboxedEnvironment with transformers' settings (trim_blocks, lstrip_blocks,
    loop controls, `tojson`, `raise_exception`, `strftime_now`): a template read from a downloaded
    file can call no Python beyond what the sandbox allows.

    Raises:
        CorruptSource: the template does not parse, raises, or tries something the sandbox forbids.
    """
    from jinja2 import TemplateError
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    tokens = {k: v for k, v in special_tokens.items() if isinstance(v, str)}
    try:
        return env.from_string(template).render(messages=messages, add_generation_prompt=True, **tokens)
    except Exception as exc:  # an untrusted program: whatever it raises (SecurityError too) is its failure
        problem = (str(exc).splitlines() or [type(exc).__name__])[0][:200]
        raise CorruptSource(where, f"chat template failed: {type(exc).__name__}: {problem}") from None


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None, separators=None,
            sort_keys: bool = False) -> str:
    """transformers' `tojson` filter: json.dumps without HTML escaping."""
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)
