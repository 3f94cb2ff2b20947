"""Vocabulary alignment (ops/merge/vocab.py, tree.merge(embed_alignment='union' | model | alignment)).

Goldens: tests/golden/mergekit_0.1.5/vocab_* from scripts/mergekit_vocab_goldens.py (mergekit 0.1.5's full merge of
three tiny Llama checkpoints whose tokenizers differ). mergekit's ids for the union's non-base plain tokens
("qu", "que") follow a Rust HashMap's random order, so rows are compared by token; every other id must match.
"""
import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file
from tokenizers import AddedToken, Tokenizer, models

from configurable_fm.ops.merge import tree
from configurable_fm.ops.merge import vocab as V

GOLDEN = Path(__file__).resolve().parents[2] / "golden" / "mergekit_0.1.5"
INPUTS = GOLDEN / "vocab_inputs"
META = json.loads((GOLDEN / "vocab_cases.json").read_text())
CASES = sorted(META["cases"])
KEYS = ("model.embed_tokens.weight", "lm_head.weight")
HASH_ORDERED = {"qu", "que"}  # mergekit adds these in a random order (module docstring)
SAMPLES = ["the quest is what the queen ate", "<|im_start|>user\nas it is<|im_end|>", "<tool> and <new> the",
           "Quick brown 42 foxes!", "</s><s> q u e"]


def _tensors(name):
    return load_file(INPUTS / name / "vocab.safetensors")


def _setup(case):
    cfg = META["cases"][case]["config"]
    tk = cfg.get("tokenizer") or {"source": cfg["tokenizer_source"]}
    dirs = {m["model"]: INPUTS / m["model"] for m in cfg["models"]}
    base_dir = INPUTS / cfg["base_model"] if "base_model" in cfg else None
    al = V.alignment_for_checkpoints(tk["source"], base_dir, dirs, tokens=tk.get("tokens"),
                                     pad_to_multiple_of=tk.get("pad_to_multiple_of"))
    return cfg, al


def _merge(cfg, flats, **kw):
    weights = {m["model"]: {"weight": m["parameters"]["weight"]} for m in cfg["models"]}
    models = {m["model"]: flats[m["model"]] for m in cfg["models"]}
    base = flats["base"] if "base_model" in cfg else None
    return tree.merge(cfg["merge_method"], base, models, model_parameters=weights, **kw)


def _compare_by_token(ours_vocab, mk_vocab, ours, gold, size):
    assert set(ours_vocab) == set(mk_vocab)
    assert ours.shape == gold.shape
    toks = list(mk_vocab)
    np.testing.assert_allclose(ours[[ours_vocab[t] for t in toks]], gold[[mk_vocab[t] for t in toks]], rtol=0,
                               atol=1e-5)
    np.testing.assert_allclose(ours[size:], gold[size:], rtol=0, atol=1e-5)  # padding rows: means


@pytest.mark.parametrize("case", CASES)
def test_alignment_then_merge_reproduces_mergekit(case):
    cfg, al = _setup(case)
    gold = load_file(GOLDEN / f"vocab_{case}.safetensors")
    mk_vocab = Tokenizer.from_file(str(GOLDEN / f"vocab_{case}.tokenizer.json")).get_vocab(with_added_tokens=True)
    flats = {n: _tensors(n) for n in ("base", "ft_b", "ft_c")}
    out = _merge(cfg, flats, embed_alignment=al)
    for key in KEYS:
        _compare_by_token(al.vocab, mk_vocab, np.asarray(out[key]), gold[key], al.size)
    assert al.padded_size == gold[KEYS[0]].shape[0]
    differ = {t for t in mk_vocab if mk_vocab[t] != al.vocab[t]}
    assert differ <= HASH_ORDERED
    if "qu" in al.vocab and al.vocab["qu"] >= 100:  # ours: ft_c's order (ascending ids there)
        assert al.vocab["qu"] < al.vocab["que"]


@pytest.mark.parametrize("case", CASES)
def test_output_tokenizer_encodes_and_decodes_like_mergekit(case):
    _, al = _setup(case)
    mk = Tokenizer.from_file(str(GOLDEN / f"vocab_{case}.tokenizer.json"))
    ours = al.tokenizer
    for s in SAMPLES:
        a, b = ours.encode(s), mk.encode(s)
        assert a.tokens == b.tokens, s
        if not HASH_ORDERED & set(a.tokens):
            assert a.ids == b.ids, s
        for skip in (True, False):
            assert ours.decode(a.ids, skip_special_tokens=skip) == mk.decode(b.ids, skip_special_tokens=skip)
    ours_added = {t.content: (t.special, t.normalized) for t in ours.get_added_tokens_decoder().values()}
    mk_added = {t.content: (t.special, t.normalized) for t in mk.get_added_tokens_decoder().values()}
    assert ours_added == mk_added


def test_tree_merge_union_with_tokenizers_in_our_flat_layout():
    """Our paths: embed_tokens.embedding (V, D) and lm_head.kernel (D, V); a non-vocabulary tensor merges as usual."""
    case = "task_union"
    cfg = META["cases"][case]["config"]
    gold = load_file(GOLDEN / f"vocab_{case}.safetensors")
    mk_vocab = Tokenizer.from_file(str(GOLDEN / f"vocab_{case}.tokenizer.json")).get_vocab(with_added_tokens=True)
    flats, toks = {}, {}
    for i, n in enumerate(("base", "ft_b", "ft_c")):
        t = _tensors(n)
        flats[n] = {"embed_tokens.embedding": t["model.embed_tokens.weight"], "lm_head.kernel": t["lm_head.weight"].T,
                    "norm.scale": np.full((16,), float(i + 1), np.float32)}
        toks[n] = Tokenizer.from_file(str(INPUTS / n / "tokenizer.json"))
    out, tok = _merge(cfg, flats, embed_alignment="union", tokenizers=toks)
    vocab = tok.get_vocab(with_added_tokens=True)
    _compare_by_token(vocab, mk_vocab, np.asarray(out["embed_tokens.embedding"]), gold[KEYS[0]], len(vocab))
    _compare_by_token(vocab, mk_vocab, np.asarray(out["lm_head.kernel"]).T, gold[KEYS[1]], len(vocab))
    np.testing.assert_allclose(out["norm.scale"], 1.0 + 0.7 * 1.0 + 0.4 * 2.0, atol=1e-6)
    # config vocab sizes differ from tokenizer sizes for ft_c (104 rows, 102 tokens): taken from the tensors
    assert np.asarray(out["embed_tokens.embedding"]).shape == (105, 16)


# ------------------------------------------------------------------------------------------- hand-made cases
def _word_level(tokens, added=()):
    tok = Tokenizer(models.WordLevel({t: i for i, t in enumerate(tokens)}, unk_token=tokens[0]))
    for content, special in added:
        (tok.add_special_tokens if special else tok.add_tokens)([AddedToken(content, special=special,
                                                                            normalized=not special)])
    return tok


def _hand():
    toks = {"m1": _word_level(["a", "c", "e", "b"]), "m2": _word_level(["b", "a", "e", "f"]),
            "base": _word_level(["a", "b", "c", "d"])}
    rows = {"m1": 4, "m2": 4, "base": 4}
    # row r of input n is (100 n_index + r) in both columns: every row identifiable
    arrays = {n: np.stack([np.full(2, 100.0 * k + r) for r in range(rows[n])]).astype(np.float32)
              for k, n in enumerate(("m1", "m2", "base"))}
    return toks, arrays


def test_union_rules_by_hand_with_base():
    toks, x = _hand()
    al = V.vocabulary_alignment("union", toks, base="base")
    assert al.vocab == {"a": 0, "b": 1, "c": 2, "d": 3, "e": 4, "f": 5}
    added = {t.content: (t.special, t.normalized) for t in al.tokenizer.get_added_tokens_decoder().values()}
    assert added == {"e": (False, True), "f": (False, True)}
    np.testing.assert_array_equal(al.index["m1"], [0, 3, 1, -1, 2, -1])
    out = al.align_all(x, axis=0)
    m1, m2, b = x["m1"][:, 0], x["m2"][:, 0], x["base"][:, 0]
    # a, b: own rows; c: base's row where missing; d: the only holder (base); e: average of m1, m2; f: m2's
    np.testing.assert_array_equal(out["m2"][:, 0], [m2[1], m2[0], b[2], b[3], m2[2], m2[3]])
    np.testing.assert_array_equal(out["base"][:, 0], [b[0], b[1], b[2], b[3], (m1[2] + m2[2]) / 2, m2[3]])
    np.testing.assert_array_equal(out["m1"][:, 0], [m1[0], m1[3], m1[1], b[3], m1[2], m2[3]])
    for n in x:  # align one input from only the tensors it needs
        only = {k: x[k] for k in al.needed(n)}
        np.testing.assert_array_equal(al.align(n, only, axis=0), out[n])
    assert set(al.needed("m2")) == {"m2", "base"}


def test_rules_without_base_average_and_padding_and_axis():
    toks, x = _hand()
    al = V.vocabulary_alignment("union", toks, base=None, pad_to_multiple_of=4)  # tokenizer base: m1
    assert al.vocab == {"a": 0, "c": 1, "e": 2, "b": 3, "f": 4, "d": 5} and al.padded_size == 8  # inputs' order
    out = al.align_all(x, axis=0)
    m1, m2, b = x["m1"][:, 0], x["m2"][:, 0], x["base"][:, 0]
    # c is in m1 and base (no merge base): m2 gets their average
    np.testing.assert_array_equal(out["m2"][:6, 0], [m2[1], (m1[1] + b[2]) / 2, m2[2], m2[0], m2[3], b[3]])
    np.testing.assert_allclose(out["m2"][6:], np.broadcast_to(out["m2"][:6].mean(0), (2, 2)), rtol=1e-6)
    # the kernel layout (D, V): detected by the input's vocabulary size, or given
    xt = {n: v.T.copy() for n, v in x.items()}
    np.testing.assert_array_equal(al.align("m2", xt), out["m2"].T)
    np.testing.assert_array_equal(al.align("m2", xt, axis=1), out["m2"].T)
    square = {n: np.zeros((4, 4), np.float32) for n in x}
    with pytest.raises(V.VocabularyError, match="cannot tell its vocabulary axis"):
        al.align("m2", square)


def test_token_overrides_force_zero_model_token():
    toks, x = _hand()
    tokens = {"a": {"source": "m2", "force": True}, "c": {"source": {"kind": "zero"}},
              "new": {"source": {"kind": "model_token", "model": "m1", "token": "b"}},
              "f": {"source": {"kind": "model_token", "model": "base", "token_id": 0}, "force": True},
              "b": {"source": "m1"}}  # every input has b and nothing is forced: own rows
    al = V.vocabulary_alignment("base", toks, base="base", tokens=tokens)
    assert al.vocab == {"a": 0, "b": 1, "c": 2, "d": 3, "new": 4, "f": 5}  # base vocab, then missing tokens
    out = al.align_all(x, axis=0)
    m1, m2, b = x["m1"][:, 0], x["m2"][:, 0], x["base"][:, 0]
    np.testing.assert_array_equal(out["m1"][:, 0], [m2[1], m1[3], m1[1], b[3], m1[3], b[0]])
    np.testing.assert_array_equal(out["m2"][:, 0], [m2[1], m2[0], 0.0, b[3], m1[3], b[0]])


def test_strip_unused_and_base_source():
    tok = Tokenizer(models.BPE({"a": 0, "b": 1, "ab": 2, "c": 3}, [("a", "b")]))
    tok.add_tokens(["zz"])
    stripped = V.strip_unused(tok, 2, name="m")
    assert stripped.get_vocab(with_added_tokens=True) == {"a": 0, "b": 1}
    assert json.loads(stripped.to_str())["model"]["merges"] == []
    assert tok.get_vocab_size(with_added_tokens=True) == 5  # input untouched
    vocab, out = V.build_vocabulary("base", tok, {"m": tok}, base_name="b", vocab_sizes={"b": 3, "m": 5})
    assert vocab == {"a": 0, "b": 1, "ab": 2}
    vocab, _ = V.build_vocabulary("m", tok, {"m": tok}, base_name="b", vocab_sizes={"b": 3, "m": 5})
    assert len(vocab) == 5
    with pytest.raises(V.VocabularyError, match="only BPE ones can be stripped"):
        V.strip_unused(_word_level(["a", "b", "c"]), 2, name="wl")


def test_checkpoint_without_tokenizer_shares_the_base_one(tmp_path, caplog):
    for n in ("base", "ft_b"):
        shutil.copytree(INPUTS / n, tmp_path / n)
    (tmp_path / "ft_b" / "tokenizer.json").unlink()
    with caplog.at_level(logging.WARNING):
        al = V.alignment_for_checkpoints("union", tmp_path / "base", [tmp_path / "ft_b"])
    assert "assuming the base's tokenizer" in caplog.text
    assert al.names == ("ft_b", "base") and al.size == 100 and al.input_sizes["ft_b"] == 103
    np.testing.assert_array_equal(al.index["ft_b"], np.arange(100))


def test_errors_name_the_thing():
    toks, x = _hand()
    with pytest.raises(V.VocabularyError, match="tokenizer source 'nope'"):
        V.vocabulary_alignment("nope", toks, base="base")
    with pytest.raises(V.VocabularyError, match=r"tokens\['a'\] needs a vocabulary row from model 'zz'"):
        V.vocabulary_alignment("union", toks, base="base", tokens={"a": {"source": "zz", "force": True}})
    with pytest.raises(V.VocabularyError, match=r"token 'd' is not in model 'm1'"):
        V.vocabulary_alignment("union", toks, base="base", tokens={"d": {"source": "m1"}})
    with pytest.raises(V.VocabularyError, match=r"'q' is not in the tokenizer of 'm2'"):
        V.vocabulary_alignment("union", toks, base="base",
                               tokens={"d": {"source": {"kind": "model_token", "model": "m2", "token": "q"}}})
    with pytest.raises(V.VocabularyError, match="exactly one of token, token_id"):
        V.parse_token_overrides({"d": {"source": {"kind": "model_token", "model": "m2"}}})
    with pytest.raises(V.VocabularyError, match="pad_to_multiple_of must be a positive integer"):
        V.vocabulary_alignment("union", toks, base="base", pad_to_multiple_of=0)
    al = V.vocabulary_alignment("union", toks, base="base",
                                tokens={"d": {"source": {"kind": "model_token", "model": "m2", "token_id": 9}}})
    with pytest.raises(V.VocabularyError, match="lm_head.weight of m2 has 4 vocabulary rows but row 9"):
        al.align("m1", x, axis=0, tensor="lm_head.weight")
    flats = {n: {"lm_head.weight": v} for n, v in x.items()}
    with pytest.raises(ValueError, match="needs tokenizers="):
        tree.merge("linear", None, flats, parameters={"weight": 1.0}, embed_alignment="union")
    with pytest.raises(ValueError, match="tokenizers for"):
        tree.merge("linear", None, flats, parameters={"weight": 1.0}, embed_alignment="union",
                   tokenizers={"m1": toks["m1"]})
