"""Write chat-template goldens from mergekit 0.1.5's named chat templates, for tests/ops/merge/test_chat_templates.py.

Run ONLY by hand, in the throwaway virtualenv that has mergekit 0.1.5 + transformers (never a project dependency):

    /tmp/mk/bin/python scripts/mergekit_chat_goldens.py

It renders each of mergekit's templates (the files mergekit/_data/chat_templates/<name>.jinja of the installed
package: alpaca, chatml, exaone, llama3, mistral) over the message lists of MESSAGES, with and without
add_generation_prompt, and writes

    tests/golden/mergekit_0.1.5/chat_templates.json
        {"mergekit": version, "jinja2": version, "transformers": version or null,
         "renderer": how the templates were rendered, "bos_token": "<s>", "eos_token": "</s>",
         "cases": [{"template": name, "name": message-list name, "messages": [...],
                    "add_generation_prompt": bool, "text": the render} or {..., "error": "Type: message"}]}

Rendering: transformers' own `render_jinja_template` (transformers.utils.chat_template_utils, what
`tokenizer.apply_chat_template(..., tokenize=False)` calls) when it is importable, else a jinja2
ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True) with `raise_exception`; `renderer` says which.
Variables: messages, add_generation_prompt, bos_token, eos_token. A message list may hold a None content or miss a
key (JSON null / an absent key), as transformers passes them through unchanged.
"""
from __future__ import annotations

import importlib.metadata
import json
import os
from pathlib import Path

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "golden", "mergekit_0.1.5",
                   "chat_templates.json")
TEMPLATES = ("alpaca", "chatml", "exaone", "llama3", "mistral")
BOS, EOS = "<s>", "</s>"


def _m(role, content):
    return {"role": role, "content": content}


SYS, USER, ASSISTANT = _m("system", "Be brief."), _m("user", "hi there"), _m("assistant", "hello")
TURNS = [_m("user", "first question"), _m("assistant", "first answer"), _m("user", "second: héllo ✓"),
         _m("assistant", "second answer"), _m("user", "third question"), _m("assistant", "third answer")]
MESSAGES = {
    "system_user": [SYS, USER],
    "user": [USER],
    "system_user_assistant": [SYS, USER, ASSISTANT],
    "multi_turn": TURNS,                                                         # user/assistant x3
    "system_multi_turn_open": [SYS, USER, ASSISTANT, _m("user", "what is it")],  # tests/ops/merge/test_stream_vocab
    "whitespace": [_m("system", "  Be brief.\n"), _m("user", "\n hi\nthere \n\n"), _m("assistant", "\thello  \n"),
                   _m("user", " what\n\nis it ")],
    "empty_content": [_m("system", ""), _m("user", ""), _m("assistant", ""), _m("user", "")],
    "no_messages": [],
    "system_only": [SYS],
    "user_context": [SYS, USER, _m("user_context", "  the input\n"), ASSISTANT],
    "user_context_last": [USER, _m("user_context", "the input")],
    "two_systems": [SYS, USER, _m("system", " Be briefer. "), _m("user", "again")],
    "system_last": [USER, SYS],
    "assistant_first": [ASSISTANT, USER],
    "repeated_user": [USER, _m("user", "hello?")],
    "tool_role": [USER, _m("tool", "42")],
    "content_none": [USER, _m("assistant", None)],
    "content_missing": [USER, {"role": "assistant"}],
    "system_content_none": [_m("system", None), USER],
    "system_content_missing": [{"role": "system"}, USER],
    "content_parts": [_m("user", [{"type": "text", "text": "hi there"}])],
    "role_missing": [{"content": "hi there"}],
}


def _renderer():
    """(render(template_text, messages, add_generation_prompt) -> str, description)."""
    try:
        from transformers.utils.chat_template_utils import render_jinja_template
    except ImportError:
        render_jinja_template = None
    if render_jinja_template is not None:
        def render(text, messages, add_generation_prompt):
            rendered, _ = render_jinja_template([messages], chat_template=text,
                                                add_generation_prompt=add_generation_prompt,
                                                bos_token=BOS, eos_token=EOS)
            return rendered[0]
        return render, "transformers.utils.chat_template_utils.render_jinja_template"

    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception

    def render(text, messages, add_generation_prompt):
        return env.from_string(text).render(messages=messages, add_generation_prompt=add_generation_prompt,
                                            bos_token=BOS, eos_token=EOS)
    return render, "jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)"


def _version(package):
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def main():
    import mergekit

    directory = Path(mergekit.__file__).parent / "_data" / "chat_templates"
    render, renderer = _renderer()
    cases = []
    for template in TEMPLATES:
        text = (directory / f"{template}.jinja").read_text()
        for name, messages in MESSAGES.items():
            for add_generation_prompt in (False, True):
                case = {"template": template, "name": name, "messages": messages,
                        "add_generation_prompt": add_generation_prompt}
                try:
                    case["text"] = render(text, json.loads(json.dumps(messages)), add_generation_prompt)
                except Exception as e:  # recorded: the tests expect ours to raise in the same cases
                    case["error"] = f"{type(e).__name__}: {e}"
                cases.append(case)
    golden = {"mergekit": _version("mergekit"), "jinja2": _version("jinja2"), "transformers": _version("transformers"),
              "renderer": renderer, "bos_token": BOS, "eos_token": EOS, "cases": cases}
    with open(OUT, "w") as f:
        json.dump(golden, f, indent=1, ensure_ascii=False)
        f.write("\n")
    errors = sum("error" in c for c in cases)
    print(f"wrote {os.path.normpath(OUT)}: {len(cases)} cases ({errors} errors), rendered with {renderer}")


if __name__ == "__main__":
    main()
