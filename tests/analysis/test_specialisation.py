"""analysis/specialisation: the function data (splits disjoint by group, counts, missing sources, the .mo reader), the
encoding (spans are the prompt content, score tokens the response), the study's pieces against direct computations
(span means from a capture, response NLL from models.scoring, an empty neuron set changes nothing, the bootstrap's
point estimate) and the whole study on a tiny random llama; bad options name the problem."""
import dataclasses
import json
import struct

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configurable_fm.analysis.capture import capture
from configurable_fm.analysis.specialisation import (FUNCTIONS, SURVEY_OVERLAP, SURVEY_PRUNING, FunctionData,
                                                     FunctionDataError, Instance, StudyError, StudyOptions,
                                                     build_functions, encode, hidden_points, markdown,
                                                     neuron_interventions, ppl_change, prompt_activations, read_mo,
                                                     response_nll, specialisation_study, survey_matrix)
from configurable_fm.interop.tokenizers import ChatTokenizer
from configurable_fm.models.llama import LlamaConfig
from configurable_fm.models.scoring import token_nll
from tests.analysis.tiny import BERT, random_model
from tests.helpers import char_tokenizer, random_llama

CFG = LlamaConfig(vocab_size=104, hidden_size=16, intermediate_size=32, num_layers=2, num_heads=2, num_kv_heads=1,
                  max_position_embeddings=128)
FAST = ("math", "ethics", "translation")


@pytest.fixture(scope="module")
def model():
    return random_llama(CFG, 3)


@pytest.fixture(scope="module")
def tok():
    return char_tokenizer(special=("<pad>", "<eos>", "<bos>"))


def synthetic_data(n_score=4, n_eval=3, functions=("a_fn", "b_fn", "c_fn")):
    """FunctionData without corpora: function k's prompts repeat its own letter."""
    splits = {"score": [], "eval": []}
    for k, f in enumerate(functions):
        letter = "xyz"[k]
        for s, n in (("score", n_score), ("eval", n_eval)):
            for i in range(n):
                splits[s].append(Instance(f, f"{letter * (3 + i)} {i}?", f"{letter} answer {i}.", "synthetic",
                                          f"{s}{i}"))
    return FunctionData(splits, tuple(functions), {}, 0)


def write_mo(path, pairs, big_endian=False):
    """A GNU .mo file with the (msgid, msgstr) pairs (the layout gettext's msgfmt writes)."""
    order = ">" if big_endian else "<"
    ids = [a.encode() for a, _ in pairs]
    strs = [b.encode() for _, b in pairs]
    n = len(pairs)
    orig, trans = 28, 28 + 8 * n
    data_at = 28 + 16 * n
    blob, o_tab, t_tab = b"", [], []
    for s in ids:
        o_tab.append((len(s), data_at + len(blob)))
        blob += s + b"\0"
    for s in strs:
        t_tab.append((len(s), data_at + len(blob)))
        blob += s + b"\0"
    head = struct.pack(order + "7I", 0x950412DE, 0, n, orig, trans, 0, 0)
    tables = b"".join(struct.pack(order + "2I", *e) for e in o_tab + t_tab)
    path.write_bytes(head + tables + blob)


# ------------------------------------------------------------------------------------------------ data
def test_functions_from_handwritten_and_synthetic_sources(tmp_path):
    data = build_functions(6, 4, seed=0, functions=FAST, locale_root=tmp_path)
    man = data.manifest()
    assert man["missing"] == {"locale": f"no gettext catalogs of ['fr', 'de', 'es'] under {tmp_path}"}
    for f in FAST:
        assert man["functions"][f]["score"] == 6 and man["functions"][f]["eval"] == 4
        score = {i.group for i in data.split("score") if i.function == f}
        held = {i.group for i in data.split("eval") if i.function == f}
        assert score and held and not score & held  # no group (question, problem, sentence) in both splits
    assert man["functions"]["translation"]["sources"] == {"handwritten:translation": 10}
    labels = data.labels("score")
    assert labels.shape == (18, 3) and np.all(labels.sum(1) == 1)
    again = build_functions(6, 4, seed=0, functions=FAST, locale_root=tmp_path)
    assert again.splits == data.splits  # deterministic
    other = build_functions(6, 4, seed=1, functions=FAST, locale_root=tmp_path)
    assert other.splits != data.splits


def test_translation_reads_gettext_catalogs(tmp_path):
    (tmp_path / "fr" / "LC_MESSAGES").mkdir(parents=True)
    write_mo(tmp_path / "fr" / "LC_MESSAGES" / "tar.mo",
             [("", "Content-Type: text/plain\n"), ("Cannot open the archive file.", "Impossible d'ouvrir l'archive."),
              ("%s: bad value", "%s : mauvaise valeur"), ("Done", "Fini")])
    assert read_mo(tmp_path / "fr" / "LC_MESSAGES" / "tar.mo") == {
        "Cannot open the archive file.": "Impossible d'ouvrir l'archive.", "%s: bad value": "%s : mauvaise valeur",
        "Done": "Fini"}
    write_mo(tmp_path / "be.mo", [("Hello there my friend.", "Salut.")], big_endian=True)
    assert read_mo(tmp_path / "be.mo") == {"Hello there my friend.": "Salut."}
    data = build_functions(6, 4, functions=FAST, locale_root=tmp_path)
    assert data.manifest()["functions"]["translation"]["sources"].get("locale:tar", 0) <= 1  # one plain message
    (tmp_path / "x.mo").write_bytes(b"not a catalog at all, no magic number here")
    with pytest.raises(ValueError, match="not a .mo file"):
        read_mo(tmp_path / "x.mo")


@pytest.mark.parametrize("kwargs, message", [
    (dict(n_score=1000, n_eval=4, functions=("math", "ethics")), "function 'ethics' has 200 instances in 50 groups, "
                                                                 "too few for 1000 scoring"),
    (dict(n_score=0, n_eval=4), "n_score must be an int >= 1, got 0"),
    (dict(n_score=2, n_eval=2, functions=("math", "poetry")), "at least two distinct names"),
    (dict(n_score=2, n_eval=2, functions=("math", "ethics"), facts="/no/such/facts.jsonl"), "does not exist"),
])
def test_bad_data_options_name_the_problem(kwargs, message):
    with pytest.raises(FunctionDataError, match=message.replace("(", r"\(").replace(")", r"\)")):
        build_functions(**kwargs)


# ------------------------------------------------------------------------------------------------ encoding
def test_spans_are_the_prompt_content_and_scores_the_response(tok):
    chat = ChatTokenizer(tok, special_tokens={"eos": "<eos>"}, chat_template=(
        "{% for m in messages %}<{{ m.role }}>{{ m.content }}\n{% endfor %}"
        "{% if add_generation_prompt %}<assistant>{% endif %}"))
    inst = [Instance("math", "What is 2+2?", "It is 4.", "s", "g"), Instance("ethics", "Is it fair?", "No.", "s", "h")]
    for t, end in ((tok, []), (chat, [chat.eos_token_id])):
        enc = encode(t, inst, ("math", "ethics"), max_len=64, min_response=4)
        for i, x in enumerate(inst):
            ids = enc.ids[i]
            assert t.decode([int(j) for j in ids[enc.span[i] > 0]]) == x.prompt
            resp = [int(j) for j in ids[enc.score[i] > 0]]
            assert t.decode(resp[:len(resp) - len(end)]).strip() == x.response and resp[len(resp) - len(end):] == end
        assert list(enc.function) == [0, 1]
    cut = encode(tok, [Instance("math", "q" * 100, "r" * 100, "s", "g")], ("math",), max_len=40, min_response=8)
    assert len(cut.ids[0]) == 40 and cut.score[0].sum() >= 8


# ------------------------------------------------------------------------------------------------ pieces
def padded(enc, rows, t=48):
    """(ids, attention mask) (len(rows), t) of the chosen sequences, right-padded."""
    ids, am = np.zeros((len(rows), t), np.int32), np.zeros((len(rows), t), np.int32)
    for j, i in enumerate(rows):
        ids[j, :len(enc.ids[i])], am[j, :len(enc.ids[i])] = enc.ids[i], 1
    return ids, am


def test_prompt_activations_are_span_means_of_a_capture(model, tok):
    data = synthetic_data()
    enc = encode(tok, data.split("score"), data.functions, max_len=48, min_response=4)
    names = hidden_points(model)
    acts = prompt_activations(model, enc, names, batch_size=4, pad_to=48)
    assert acts.shape == (len(enc), 2, 32)
    rows = [0, 5, len(enc) - 1]
    ids, am = padded(enc, rows)
    graphdef, state = nnx.split(model)
    hidden = jax.jit(lambda s, x, m: capture(nnx.merge(graphdef, s), list(names),
                                             lambda mm: mm(x, attention_mask=m))[1])(state, ids, am)
    for j, i in enumerate(rows):
        span = np.zeros(48, bool)
        span[:len(enc.span[i])] = enc.span[i] > 0
        want = np.stack([np.abs(np.asarray(hidden[p][j]))[span].mean(0) for p in names])
        np.testing.assert_allclose(acts[i], want, rtol=1e-5, atol=1e-6)


def test_response_nll_agrees_with_token_nll_and_empty_sets_change_nothing(model, tok):
    data = synthetic_data()
    enc = encode(tok, data.split("eval"), data.functions, max_len=48, min_response=4)
    nll, count = response_nll(model, enc, batch_size=4, pad_to=48)
    rows = [0, 4]
    ids, am = padded(enc, rows)
    per_token = token_nll(model, ids, am)
    for j, i in enumerate(rows):
        np.testing.assert_allclose(nll[i], per_token[j, :len(enc.ids[i]) - 1][enc.score[i][1:] > 0].sum(), rtol=1e-5)
        assert count[i] == enc.score[i][1:].sum()
    names = hidden_points(model)
    none, every = np.zeros((2, 32), bool), np.ones((2, 32), bool)
    same, _ = response_nll(model, enc, neuron_interventions(names, none), batch_size=4, pad_to=48)
    np.testing.assert_allclose(same, nll, rtol=1e-6)
    zeroed, _ = response_nll(model, enc, neuron_interventions(names, every), batch_size=4, pad_to=48)
    assert not np.allclose(zeroed, nll)


def test_ppl_change_by_hand():
    base, pruned = np.array([2.0, 4.0, 1.0]), np.array([3.0, 4.0, 1.0])
    count, groups = np.array([2.0, 2.0, 5.0]), np.array([0, 0, 1])
    change, ci = ppl_change(base, pruned, count, groups, 2, bootstrap=200, seed=0)
    np.testing.assert_allclose(change, [np.exp(1 / 4) - 1, 0.0])
    assert ci[0, 0] <= change[0] <= ci[0, 1] and np.all(ci[1] == 0)
    assert np.isnan(ppl_change(base, pruned, count, groups, 2)[1]).all()


def test_survey_tables_follow_our_function_order():
    m = survey_matrix(SURVEY_PRUNING["Llama-3-8B-Instruct"], FUNCTIONS)
    i = FUNCTIONS.index
    assert m[i("coding"), i("coding")] == 112 and m[i("knowledge"), i("ethics")] == 296
    assert m[i("translation"), i("translation")] == 444
    o = survey_matrix(SURVEY_OVERLAP["Mistral-7B-Instruct-v0.3"], FUNCTIONS)
    assert o[i("linguistic"), i("translation")] == o[i("translation"), i("linguistic")] == 0.09
    np.testing.assert_array_equal(o, o.T)


# ------------------------------------------------------------------------------------------------ the study
def test_study_on_a_tiny_llama(model, tok):
    data = synthetic_data(n_score=6, n_eval=3)
    opts = StudyOptions(max_len=48, min_response=4, batch_size=4, pad_to=48, fraction=0.1, mask_levels=(0.5,),
                        n_mask=2, magnitude=True, random_rows=1, bootstrap=20, bins=10)
    r = specialisation_study(model, tok, data, options=opts)
    k = 3
    assert r["scores"].shape == (k, 2, 32) and r["null_scores"].shape == (k, 2, 32)
    # the prompts differ by letter: some neuron ranks a function's instances first
    assert all(r["score_distribution"][f]["max"] > r["score_distribution"][f]["chance"] for f in data.functions)
    assert r["score_distribution"]["a_fn"]["chance"] == pytest.approx(1 / 3)
    assert np.asarray(r["indicators"]["counts"]).sum(-1).tolist() == [[r["tokens"]["eval"] * 32] * 2] * 2
    assert r["indicators"]["magnitude_available"] and set(r["masking"]["loss"]) == {"activation", "magnitude"}
    assert len(r["masking"]["loss"]["activation"]) == 2
    assert r["pruning"]["rows"] == ["a_fn", "b_fn", "c_fn", "random 1"] and r["pruning"]["neurons"] == 6
    ov = np.asarray(r["overlap"]["matrix"])
    np.testing.assert_allclose(np.diag(ov), 1.0)
    scores, null = r.pop("scores"), r.pop("null_scores")
    json.dumps(r)  # the rest is JSON
    text = markdown(r)  # the figures are drawn in tests/cli/test_analyze_neurons_cli.py
    assert "rises most in" in text and "| a_fn |" in text


def test_models_and_options_the_study_refuses(tok):
    with pytest.raises(StudyError, match="no FFN hidden tap point matching"):
        hidden_points(random_model(BERT, 0))
    for change, message in ((dict(fraction=0.7), "`fraction` must be in"), (dict(mask_levels=(1.2,)), "mask_levels"),
                            (dict(max_len=16, min_response=16), "must be below `max_len`"),
                            (dict(batch_size=0), "`batch_size` must be an int >= 1")):
        with pytest.raises(StudyError, match=message):
            dataclasses.replace(StudyOptions(), **change).check()
