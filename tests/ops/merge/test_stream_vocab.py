"""mergekit's `tokenizer_source` / `tokenizer:` / `chat_template` through the streamed YAML route (scripts/merge.py
--mergekit_yaml): the vocabulary goldens of mergekit 0.1.5 end to end, the written tokenizer loading in transformers,
`slices:` plans against hand-written references, and the chat templates rendered by transformers (as
mergekit's own, tests/golden/mergekit_0.1.5/chat_templates.json).

Goldens: tests/golden/mergekit_0.1.5/vocab_* (scripts/mergekit_vocab_goldens.py). mergekit's ids for the union's
non-base plain tokens follow a Rust HashMap's order, so rows are compared by token (tolerance 1e-5).
"""
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
import yaml
from safetensors.numpy import load_file
from tokenizers import Tokenizer

from configurable_fm.interop.safetensors_io import TensorStore
from configurable_fm.ops.merge import stream
from configurable_fm.ops.merge.mergekit_yaml import CHAT_TEMPLATES, load_mergekit_yaml
from configurable_fm.ops.merge.vocab import VocabularyError
from tests.helpers import load_script

ROOT = Path(__file__).resolve().parents[3]
GOLDEN = ROOT / "tests" / "golden" / "mergekit_0.1.5"
META = json.loads((GOLDEN / "vocab_cases.json").read_text())
KEYS = ("model.embed_tokens.weight", "lm_head.weight")
SAMPLES = ["the quest is what the queen ate", "<|im_start|>user\nas it is<|im_end|>", "<tool> and <new> the",
           "Quick brown 42 foxes!", "</s><s> q u e"]
MSGS = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi there"},
        {"role": "assistant", "content": "hello"}, {"role": "user", "content": "what is it"}]


def _script():
    return load_script("merge")


@pytest.fixture(scope="module")
def golden_dirs(tmp_path_factory):
    """The golden inputs as HF directories (their vocab.safetensors as model.safetensors)."""
    root = tmp_path_factory.mktemp("vocab_inputs")
    for n in ("base", "ft_b", "ft_c"):
        (root / n).mkdir()
        for f in ("config.json", "tokenizer.json", "tokenizer_config.json"):
            shutil.copy(GOLDEN / "vocab_inputs" / n / f, root / n / f)
        shutil.copy(GOLDEN / "vocab_inputs" / n / "vocab.safetensors", root / n / "model.safetensors")
    return root


def _vocab(path):
    """{token: id} of a tokenizer.json, in id order."""
    return dict(sorted(Tokenizer.from_file(str(path)).get_vocab(with_added_tokens=True).items(), key=lambda kv: kv[1]))


def _yaml(root, name, config):
    path = root / f"{name}.yml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


@pytest.mark.parametrize("case", sorted(META["cases"]))
def test_yaml_route_reproduces_mergekit_vocab_goldens(case, golden_dirs, tmp_path):
    yml = _yaml(golden_dirs, case, META["cases"][case]["config"])  # model names relative to the YAML
    out = tmp_path / "out"
    assert _script().main(["--mergekit_yaml", str(yml), "--output", str(out), "--no_progress"]) == 0
    gold = load_file(GOLDEN / f"vocab_{case}.safetensors")
    mk, ours = _vocab(GOLDEN / f"vocab_{case}.tokenizer.json"), _vocab(out / "tokenizer.json")
    assert set(ours) == set(mk)
    got = load_file(out / "model.safetensors")
    toks = list(mk)
    for key in KEYS:
        assert got[key].shape == gold[key].shape, key
        np.testing.assert_allclose(got[key][[ours[t] for t in toks]], gold[key][[mk[t] for t in toks]], rtol=0,
                                   atol=1e-5, err_msg=key)
        np.testing.assert_allclose(got[key][len(mk):], gold[key][len(mk):], rtol=0, atol=1e-5)  # padding rows
    config = json.loads((out / "config.json").read_text())
    assert config["vocab_size"] == gold[KEYS[0]].shape[0]  # mergekit: len(vocab) padded to the multiple


@pytest.mark.parametrize("case", ["task_union_tokens", "task_model_ft_c", "linear_union_pad8"])
def test_written_tokenizer_loads_in_transformers_and_encodes_like_mergekit(case, golden_dirs, tmp_path):
    out = stream.merge_checkpoints(load_mergekit_yaml(_yaml(golden_dirs, case, META["cases"][case]["config"])),
                                   tmp_path / "out", progress=False)
    tok = transformers.AutoTokenizer.from_pretrained(out)
    mk = Tokenizer.from_file(str(GOLDEN / f"vocab_{case}.tokenizer.json"))
    ours = _vocab(out / "tokenizer.json")
    assert len(tok) == len(ours) and (tok.bos_token, tok.eos_token, tok.unk_token) == ("<s>", "</s>", "<unk>")
    for s in SAMPLES:
        ids = tok(s, add_special_tokens=False)["input_ids"]
        assert tok.convert_ids_to_tokens(ids) == mk.encode(s).tokens, s
        assert ids == [ours[t] for t in mk.encode(s).tokens]
        assert tok.decode(ids, skip_special_tokens=True) == mk.decode(mk.encode(s).ids, skip_special_tokens=True)


# ------------------------------------------------------------------------------------------------------ slices
def _llamas(root):
    """Tiny 2-layer llamas with the golden tokenizers (vocab sizes 100, 103, 104)."""
    for seed, (n, v) in enumerate((("base", 100), ("ft_b", 103), ("ft_c", 104))):
        cfg = transformers.LlamaConfig(vocab_size=v, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                                       num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32,
                                       tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
        torch.manual_seed(seed)
        transformers.LlamaForCausalLM(cfg).save_pretrained(root / n, safe_serialization=True)
        for f in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(GOLDEN / "vocab_inputs" / n / f, root / n / f)
    return root


@pytest.fixture(scope="module")
def llamas(tmp_path_factory):
    return _llamas(tmp_path_factory.mktemp("llamas"))


def _rows(root, model, key, vocab):
    """{token: the model's row of `key`} for the tokens of `vocab` that the model has (within its vocab_size)."""
    x = np.array(TensorStore(root / model)[key])
    own = _vocab(root / model / "tokenizer.json")
    return {t: x[own[t]] for t in vocab if t in own and own[t] < x.shape[0]}


def test_slices_frankenmerge_takes_rows_from_each_outer_tensors_sources_only(llamas, tmp_path):
    """passthrough: the embedding comes from the first slice (ft_b), lm_head from the last (ft_c); a token the
    tensor's source lacks gets a zero row (mergekit: no input of that tensor has it), not the other model's."""
    yml = _yaml(llamas, "franken", {"merge_method": "passthrough", "tokenizer_source": "union", "slices": [
        {"sources": [{"model": "ft_b", "layer_range": [0, 2]}]},
        {"sources": [{"model": "ft_c", "layer_range": [1, 2]}]}]})
    out = stream.merge_checkpoints(load_mergekit_yaml(yml), tmp_path / "out", progress=False)
    vocab = _vocab(out / "tokenizer.json")
    assert len(vocab) == 105 and {"qu", "que", "<|im_start|>", "<tool>"} <= set(vocab)  # ft_b's + ft_c's
    got = load_file(out / "model.safetensors")
    for key, src in (("model.embed_tokens.weight", "ft_b"), ("lm_head.weight", "ft_c")):
        own = _rows(llamas, src, key, vocab)
        expected = np.stack([own.get(t, np.zeros(16, np.float32)) for t in vocab])
        assert got[key].shape == (105, 16)
        np.testing.assert_array_equal(got[key], expected, err_msg=key)
    np.testing.assert_array_equal(got["model.layers.2.mlp.up_proj.weight"],
                                  TensorStore(llamas / "ft_c")["model.layers.1.mlp.up_proj.weight"])
    config = json.loads((out / "config.json").read_text())
    assert (config["vocab_size"], config["num_hidden_layers"]) == (105, 3)
    model = transformers.LlamaForCausalLM.from_pretrained(out)
    assert model.get_input_embeddings().weight.shape == (105, 16)
    assert transformers.AutoTokenizer.from_pretrained(out)("the queen")["input_ids"] == \
        [vocab[t] for t in Tokenizer.from_file(str(out / "tokenizer.json")).encode("the queen").tokens]


def test_slices_linear_rows_follow_the_slice_sources(llamas, tmp_path):
    """linear over ft_b and ft_c in one slice: a token of both -> 0.5 (x_b + x_c); of one -> that row."""
    yml = _yaml(llamas, "lin", {"merge_method": "linear", "tokenizer": {"source": "union", "pad_to_multiple_of": 4},
                                "slices": [{"sources": [
                                    {"model": "ft_b", "layer_range": [0, 2], "parameters": {"weight": 0.5}},
                                    {"model": "ft_c", "layer_range": [0, 2], "parameters": {"weight": 0.5}}]}]})
    out = stream.merge_checkpoints(load_mergekit_yaml(yml), tmp_path / "out", progress=False)
    vocab = _vocab(out / "tokenizer.json")
    got = load_file(out / "model.safetensors")
    for key in KEYS:
        b, c = _rows(llamas, "ft_b", key, vocab), _rows(llamas, "ft_c", key, vocab)
        expected = np.stack([0.5 * (b.get(t, c.get(t)) + c.get(t, b.get(t))) for t in vocab])
        assert got[key].shape == (108, 16)
        np.testing.assert_allclose(got[key][:105], expected, rtol=0, atol=1e-6, err_msg=key)
        np.testing.assert_allclose(got[key][105:], np.broadcast_to(got[key][:105].mean(0), (3, 16)), atol=1e-6)


def test_slices_override_from_a_model_outside_the_tensor_fails_before_writing(llamas, tmp_path):
    yml = _yaml(llamas, "bad", {"merge_method": "passthrough", "slices": [
        {"sources": [{"model": "ft_b", "layer_range": [0, 2]}]},
        {"sources": [{"model": "ft_c", "layer_range": [1, 2]}]}],
        "tokenizer": {"tokens": {"qu": {"source": "ft_c", "force": True}}}})
    with pytest.raises(VocabularyError, match=r"model.embed_tokens.weight: tokens\['qu'\] needs a vocabulary row "
                                              r"from model 'ft_c', which is not an input"):
        stream.merge_checkpoints(load_mergekit_yaml(yml), tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------- chat templates
def _with_templates(root, templates, copy=True):
    """A copy of the golden inputs with chat templates: {model: (file, template)}."""
    for n in ("base", "ft_b", "ft_c") if copy else ():
        shutil.copytree(GOLDEN / "vocab_inputs" / n, root / n)
        (root / n / "vocab.safetensors").rename(root / n / "model.safetensors")
    for n, (f, t) in templates.items():
        if f == "chat_template.jinja":
            (root / n / f).write_text(t)
        else:
            cfg = json.loads((root / n / "tokenizer_config.json").read_text())
            cfg["chat_template"] = t
            (root / n / "tokenizer_config.json").write_text(json.dumps(cfg))
    return root


T1 = "{% for m in messages %}[1:{{ m['role'] }}]{{ m['content'] }}{% endfor %}"
T2 = "{% for m in messages %}[2:{{ m['role'] }}]{{ m['content'] }}{% endfor %}"
TASK = {"merge_method": "task_arithmetic", "base_model": "base", "dtype": "float32",
        "models": [{"model": "ft_b", "parameters": {"weight": 0.5}}, {"model": "ft_c", "parameters": {"weight": 0.5}}]}


def _render(out, messages=MSGS, **kw):
    tok = transformers.AutoTokenizer.from_pretrained(out)
    return tok.apply_chat_template(messages, tokenize=False, **kw)


def _mergekit_render(name, messages, add_generation_prompt):
    """mergekit 0.1.5's render of its template `name` (chat_templates.json; bos <s>, eos </s> as the inputs')."""
    golden = json.loads((GOLDEN / "chat_templates.json").read_text())
    return next(c["text"] for c in golden["cases"] if c["template"] == name and c["messages"] == messages
                and c["add_generation_prompt"] == add_generation_prompt)


@pytest.mark.parametrize("name", ["chatml", "llama3", "alpaca", "mistral", "exaone"])
def test_named_chat_templates_render_as_mergekit(name, tmp_path):
    root = _with_templates(tmp_path / "in", {"base": ("chat_template.jinja", T1)})  # replaced by the named one
    yml = _yaml(root, "m", dict(TASK, tokenizer_source="union", chat_template=name))
    out = stream.merge_checkpoints(load_mergekit_yaml(yml), tmp_path / "out", progress=False)
    assert json.loads((out / "tokenizer_config.json").read_text())["chat_template"] == CHAT_TEMPLATES[name]
    assert not (out / "chat_template.jinja").exists()
    for prompt in (True, False):
        assert _render(out, add_generation_prompt=prompt) == _mergekit_render(name, MSGS, prompt)


def test_auto_literal_and_kept_chat_templates(tmp_path):
    # auto: the most common among the inputs (a chat_template.jinja counts as the model's template)
    root = _with_templates(tmp_path / "in", {"base": ("chat_template.jinja", T1), "ft_b": ("config", T2),
                                             "ft_c": ("chat_template.jinja", T2)})
    for n, t in (("b1", ("config", T2)), ("b2", ("chat_template.jinja", T2))):  # same vocabulary as base
        shutil.copytree(root / "base", root / n)
        (root / n / "chat_template.jinja").unlink()
        _with_templates(root, {n: t}, copy=False)
    same_vocab = {"merge_method": "linear", "dtype": "float32", "models": [
        {"model": n, "parameters": {"weight": 1.0}} for n in ("base", "b1", "b2")]}
    msgs = MSGS[1:3]
    for i, (config, want) in enumerate([(dict(TASK, tokenizer_source="union", chat_template="auto"), "2"),
                                        (dict(same_vocab, chat_template="auto"), "2"),  # copied tokenizer files
                                        (dict(same_vocab, chat_template=T1.replace("[1:", "[L:")), "L"),
                                        (dict(TASK, tokenizer_source="base"), "1"),  # the donor's, kept
                                        (same_vocab, "1")]):
        out = stream.merge_checkpoints(load_mergekit_yaml(_yaml(root, f"c{i}", config)), tmp_path / f"out{i}",
                                       progress=False)
        assert _render(out, msgs) == f"[{want}:user]hi there[{want}:assistant]hello", config
    # auto without any input template: nothing written (mergekit leaves the tokenizer's own)
    plain = _with_templates(tmp_path / "plain", {})
    out = stream.merge_checkpoints(load_mergekit_yaml(_yaml(plain, "a", dict(TASK, chat_template="auto",
                                                                             tokenizer_source="union"))),
                                   tmp_path / "out_plain", progress=False)
    assert "chat_template" not in json.loads((out / "tokenizer_config.json").read_text())


def test_stale_added_tokens_decoder_of_the_donor_is_rebuilt(tmp_path):
    root = _with_templates(tmp_path / "in", {})
    cfg = json.loads((root / "base" / "tokenizer_config.json").read_text())
    cfg["added_tokens_decoder"] = {"7": {"content": "<stale>", "lstrip": False, "normalized": False, "rstrip": False,
                                         "single_word": False, "special": True}}
    (root / "base" / "tokenizer_config.json").write_text(json.dumps(cfg))
    out = stream.merge_checkpoints(load_mergekit_yaml(_yaml(root, "m", dict(TASK, tokenizer_source="union"))),
                                   tmp_path / "out", progress=False)
    written = json.loads((out / "tokenizer_config.json").read_text())["added_tokens_decoder"]
    vocab = _vocab(out / "tokenizer.json")
    assert {v["content"]: int(k) for k, v in written.items()} == {
        t: vocab[t] for t in ("<unk>", "<s>", "</s>", "qu", "que", "<|im_start|>", "<|im_end|>", "<tool>")}
    # (the union's tokens from ft_c are plain added tokens, as mergekit adds them)
    tok = transformers.AutoTokenizer.from_pretrained(out)
    assert tok.convert_tokens_to_ids(["<tool>", "<|im_end|>", "qu"]) == [vocab["<tool>"], vocab["<|im_end|>"],
                                                                         vocab["qu"]]
