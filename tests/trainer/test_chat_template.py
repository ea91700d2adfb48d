"""Chat templates render as transformers renders them, inside jinja2's sandbox."""

from __future__ import annotations

import json

import jinja2
import pytest
import transformers

from apr_format.errors import CorruptSource, InvalidArgument
from apr_trainer.chat_template import chat_template, render_chat

from apr_testing import FIXTURES

MESSAGES = [{"role": "user", "content": "What is 2+2?"}]
# A classic server-side template injection: from jinja's default global `cycler` to os.popen.
INJECTION = "{{ cycler.__init__.__globals__.os.popen('touch %s').read() }}"


def test_renders_like_transformers_apply_chat_template():
    folder = FIXTURES / "tiny-qwen2-hf"
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    expected = tokenizer.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    ours = render_chat(config["chat_template"], MESSAGES, {"eos_token": "<|im_end|>"}, "m")
    assert ours == expected and ours.endswith("<|im_start|>assistant\n")


def test_transformers_helpers_are_available():
    template = "{{ messages | tojson }}{% for m in messages %}{% if m.role == 'x' %}{% break %}{% endif %}{% endfor %}" \
               "{% if false %}{{ raise_exception('no') }}{% endif %}{{ bos_token }}"
    assert render_chat(template, MESSAGES, {"bos_token": "<s>"}, "m") == json.dumps(MESSAGES) + "<s>"
    with pytest.raises(CorruptSource, match="^m: chat template failed: TemplateError: only user turns"):
        render_chat("{{ raise_exception('only user turns') }}", MESSAGES, {}, "m")


def test_template_injection_cannot_reach_python(tmp_path):
    marker = tmp_path / "pwned"
    payload = INJECTION % marker
    jinja2.Environment().from_string(payload).render()  # the payload is real: unsandboxed, it runs a shell
    assert marker.exists()
    marker.unlink()
    with pytest.raises(CorruptSource, match="^m: chat template failed: SecurityError: "):
        render_chat(payload, MESSAGES, {}, "m")
    assert not marker.exists()


def test_a_checkpoint_without_template_is_refused():
    with pytest.raises(InvalidArgument, match="^m: carries no chat template, so --chat cannot be used"):
        chat_template({}, "m")
