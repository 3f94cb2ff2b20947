"""The named chat templates (ops/merge/chat_templates.py) render exactly as mergekit 0.1.5's.

Goldens: tests/golden/mergekit_0.1.5/chat_templates.json (scripts/mergekit_chat_goldens.py), mergekit's own
template files rendered by transformers' `render_jinja_template`; ours are rendered by the same function with the
same variables. Where mergekit's template fails (TypeError, UndefinedError or its raise_exception), ours must raise a
TemplateError naming the template.
"""
import json
from pathlib import Path

import jinja2
import pytest
from transformers.utils.chat_template_utils import render_jinja_template

from configurable_fm.ops.merge import chat_templates, mergekit_yaml

GOLDEN = json.loads((Path(__file__).resolve().parents[2] / "golden" / "mergekit_0.1.5" / "chat_templates.json")
                    .read_text())
CASES = GOLDEN["cases"]


def _render(template, messages, add_generation_prompt):
    rendered, _ = render_jinja_template([messages], chat_template=chat_templates.CHAT_TEMPLATES[template],
                                        add_generation_prompt=add_generation_prompt,
                                        bos_token=GOLDEN["bos_token"], eos_token=GOLDEN["eos_token"])
    return rendered[0]


def test_goldens_cover_every_named_template():
    assert GOLDEN["mergekit"] == "0.1.5" and "render_jinja_template" in GOLDEN["renderer"]
    assert {c["template"] for c in CASES} == set(chat_templates.CHAT_TEMPLATES)
    assert mergekit_yaml.CHAT_TEMPLATES is chat_templates.CHAT_TEMPLATES  # the YAML route uses these


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c['template']}-{c['name']}-{int(c['add_generation_prompt'])}")
def test_renders_as_mergekit(case):
    args = case["template"], case["messages"], case["add_generation_prompt"]
    if "error" in case:
        with pytest.raises(jinja2.exceptions.TemplateError, match=f"^{case['template']} chat template: "):
            _render(*args)
    else:
        assert _render(*args) == case["text"]


def test_llama3_ends_every_message_with_a_newline():
    messages = [{"role": "system", "content": " Be brief.\n"}, {"role": "user", "content": "hi"}]
    assert _render("llama3", messages, True) == (
        "<s><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>\n"
        "<|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|>\n<|start_header_id|>assistant<|end_header_id|>\n\n")


@pytest.mark.parametrize("template, token", [("llama3", "bos_token"), ("mistral", "eos_token")])
@pytest.mark.parametrize("value", [None, "absent"])
def test_special_tokens_that_are_not_strings_are_refused_where_mergekit_fails(template, token, value):
    # mergekit's llama3 adds bos_token to a string, its mistral eos_token: a TypeError (None) or UndefinedError
    kw = {"bos_token": GOLDEN["bos_token"], "eos_token": GOLDEN["eos_token"], token: value}
    if value == "absent":
        del kw[token]
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    with pytest.raises(jinja2.exceptions.TemplateError, match=f"^{template} chat template: {token} must be a string"):
        render_jinja_template([messages], chat_template=chat_templates.CHAT_TEMPLATES[template], **kw)
