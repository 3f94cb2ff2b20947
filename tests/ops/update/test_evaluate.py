"""The edit evaluation harness (ops/update/evaluate.py).

Hand-computed expectations on a bigram model whose next-token probabilities are set by hand (so P(new), P(true)
and every argmax are known), ROME's n-gram entropy on small texts, and the tiny trained llama of world.py: the
unedited model prefers the true targets, the exact-match accuracy equals greedy generation, a ROME edit raises
efficacy, subsets and a reused Evaluator agree with a full evaluation."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configurable_fm.bricks import deltas
from configurable_fm.models.generation import generate
from configurable_fm.ops.update import (EditMetrics, EvaluationError, Evaluator, ROMEHparams, Request,
                                        evaluate_requests, ngram_entropy, rome, second_moments, summarize)
from configurable_fm.ops.update.evaluate import score_items, stat, summarize_rows
from tests.ops.update import world as W

WORDS = "A B is was x y z ."


class Bigram(nnx.Module):
    """Logits of the next token depend only on the current one: logits[b, t] = table[ids[b, t]]."""

    def __init__(self, table):
        self.table = nnx.Param(jnp.asarray(table, jnp.float32))

    def __call__(self, ids, attention_mask=None, positions=None, cache=None):
        logits = self.table[...][ids]
        return logits if cache is None else (logits, cache)

    def init_cache(self, batch, max_len):
        return jnp.zeros((), jnp.float32)


@pytest.fixture(scope="module")
def tok():
    return W.word_tokenizer([WORDS, " " + WORDS])


def bigram(tok, rows):
    """rows: {previous token text: {next token text: probability}} (other rows uniform; missing entries 0)."""
    v = tok.get_vocab_size()
    table = np.zeros((v, v))
    for prev, dist in rows.items():
        table[W.token_id(tok, prev)] = -1e9
        for nxt, p in dist.items():
            table[W.token_id(tok, prev), W.token_id(tok, nxt)] = math.log(p)
    return Bigram(table)


EDITED = {" is": {" x": .5, " y": .3, " z": .2}, " was": {" x": .2, " y": .6, " z": .2},
          " x": {" y": .125, " z": .875}}
REFERENCE = dict(EDITED, **{" is": {" x": .2, " y": .2, " z": .6}})


def reqs():
    return [Request("{} is", "A", " x", " y", paraphrase_prompts=("{} was", "{} is"),
                    neighborhood_prompts=("B was", "B is"), neighborhood_targets=(" y", " z"), case_id="a"),
            Request("{} is", "A", " x y", " z", case_id="b"),
            Request("{} was", "B", " x", None, paraphrase_prompts=("B is",), case_id="c")]


def test_score_items_exact(tok):
    model = bigram(tok, EDITED)
    ids = lambda s: tuple(tok.encode(s).ids)
    items = [(ids("A is"), ids(" x y")), (ids("A was"), ids(" y")), (ids("B was A is"), ids(" z"))]
    out = score_items(model, items, batch_size=2)  # two batches, two length buckets
    np.testing.assert_allclose(out[0][0], [-math.log(.5), -math.log(.125)], rtol=1e-6)
    assert list(out[0][1]) == [W.token_id(tok, " x"), W.token_id(tok, " z")]
    np.testing.assert_allclose(out[1][0], [-math.log(.6)], rtol=1e-6)
    np.testing.assert_allclose(out[2][0], [-math.log(.2)], rtol=1e-6)
    assert list(out[2][1]) == [W.token_id(tok, " x")]


def test_hand_computed_metrics(tok):
    m = evaluate_requests(bigram(tok, EDITED), tok, reqs(), reference=bigram(tok, REFERENCE), batch_size=4)
    a, b, c = m.rows
    assert [r["case_id"] for r in m.rows] == ["a", "b", "c"]
    # case a: rewrite P(x)=.5 > P(y)=.3; paraphrases 'A was' (.2 vs .6) and 'A is'; neighbours 'B was' -> y
    # (.6 vs P(x)=.2) and 'B is' -> z (.2 vs .5)
    expect_a = dict(efficacy_score=1, efficacy_magnitude=.2, paraphrase_score=.5, paraphrase_magnitude=-.1,
                    neighborhood_score=.5, neighborhood_magnitude=.05, efficacy_score_first=1,
                    efficacy_magnitude_first=.2, rewrite_acc=1, paraphrase_acc=.5, neighborhood_acc=.5,
                    rewrite_gen_acc=1, paraphrase_gen_acc=.5, neighborhood_gen_acc=.5,
                    locality=.5)  # reference argmax after ' is' is ' z': 'B is' changes, 'B was' does not
    for k, v in expect_a.items():
        assert a[k] == pytest.approx(v, abs=1e-6), k
    # case b: whole target ' x y': mean NLL = (log 2 + log 8) / 2, P = 1/4 > P(z) = .2; first token .5 vs .2
    assert b["efficacy_score"] == 1 and b["efficacy_magnitude"] == pytest.approx(.05, abs=1e-6)
    assert b["efficacy_magnitude_first"] == pytest.approx(.3, abs=1e-6)
    assert b["rewrite_acc"] == pytest.approx(.5) and b["rewrite_gen_acc"] == 0  # argmax after ' x' is ' z'
    assert math.isnan(b["paraphrase_score"]) and math.isnan(b["neighborhood_score"]) and math.isnan(b["locality"])
    # case c: no target_true -> no comparison; accuracies still defined
    assert math.isnan(c["efficacy_score"]) and math.isnan(c["paraphrase_magnitude"])
    assert c["rewrite_acc"] == 0 and c["paraphrase_acc"] == 1  # after ' was' argmax ' y'; after ' is' ' x'
    s = m.summary
    assert s["efficacy_score"] == (1.0, 0.0, 2)
    assert s["efficacy_magnitude"].mean == pytest.approx(.125) and s["efficacy_magnitude"].n == 2
    assert s["efficacy_magnitude"].stderr == pytest.approx(np.std([.2, .05], ddof=1) / math.sqrt(2))
    assert s["paraphrase_score"].n == 1 and s["neighborhood_score"].n == 1
    assert s["score"].mean == pytest.approx(3 / (1 + 2 + 2))  # harmonic mean of 1, .5, .5
    assert s["rewrite_acc"].mean == pytest.approx(.5)
    # the reference given as its metrics gives the same locality; subsets give the same rows
    ref = evaluate_requests(bigram(tok, REFERENCE), tok, reqs(), metrics=("accuracy",))
    again = evaluate_requests(bigram(tok, EDITED), tok, reqs(), reference=ref)
    assert again.rows[0]["locality"] == pytest.approx(.5)
    # ... and so does the reference model given at call time to an Evaluator built without one
    assert Evaluator(tok, reqs())(bigram(tok, EDITED), reference=bigram(tok, REFERENCE)).rows[0]["locality"] == \
        pytest.approx(.5)
    ev = Evaluator(tok, reqs(), reference=ref)
    sub = ev(bigram(tok, EDITED), which=[2, 0])
    assert [r["case_id"] for r in sub.rows] == ["c", "a"]
    for k in expect_a:
        assert sub.rows[1][k] == pytest.approx(a[k]), k
    session = type("Session", (), {"model": bigram(tok, EDITED), "edits": 1})()
    assert [r["case_id"] for r in ev.on_edit(session, None).rows] == ["a"]
    table = summarize({"unedited": ref, "edited": m})
    assert table.splitlines()[0].startswith("| | ES | PS | NS | S |")
    assert "| edited | 100.0 ± 0.0 | 50.0 | 50.0 | 60.0 |" in table
    assert "| unedited | – |" in table  # accuracy only: no probability metrics
    assert m.to_json()["summary"]["paraphrase_score"] == {"mean": .5, "stderr": None, "n": 1}


def test_the_score_is_over_the_cases_that_have_all_three():
    """S, the harmonic mean of ES, PS and NS, takes the three means over the same cases: a case without target_true
    (ES and PS NaN) counts in NS's own mean but not in S."""
    full = {"efficacy_score": 1.0, "paraphrase_score": 1.0, "neighborhood_score": 1.0}
    ns_only = {"efficacy_score": math.nan, "paraphrase_score": math.nan, "neighborhood_score": 0.0}
    s = summarize_rows([full] + [ns_only] * 3)
    assert s["neighborhood_score"].mean == .25 and s["neighborhood_score"].n == 4
    assert s["score"].mean == 1.0 and s["score"].n == 1
    assert "score" not in summarize_rows([ns_only])


def test_neighbourhood_score_without_the_neighbours_the_run_edits(tok):
    """NS-u leaves out the neighbourhood prompts that name another edited subject (whole word): 'B was' (y .6 >
    x .2: 1) and 'B is' (z .2 < x .5: 0) name B; ' x' -> z (.875 > P(x | x) = 0: 1) names none."""
    r = Request("{} is", "A", " x", " y", neighborhood_prompts=("B was", "B is", " x"),
                neighborhood_targets=(" y", " z", " z"), case_id="d")
    model = bigram(tok, EDITED)
    plain = evaluate_requests(model, tok, [r]).rows[0]
    assert plain["neighborhood_score"] == pytest.approx(2 / 3) and "neighborhood_unedited_score" not in plain
    both = evaluate_requests(model, tok, [r], edited_subjects=("A", "B")).rows[0]
    assert both["neighborhood_score"] == pytest.approx(2 / 3)
    assert both["neighborhood_unedited_score"] == 1 and both["neighborhood_unedited_magnitude"] == pytest.approx(.875)
    own = evaluate_requests(model, tok, [r], edited_subjects=("A", "BB")).rows[0]  # only its own subject; no 'BB'
    assert own["neighborhood_unedited_score"] == pytest.approx(2 / 3)
    only_b = Request("{} was", "B", " y", " x", neighborhood_prompts=("B is",), neighborhood_targets=(" z",))
    m = evaluate_requests(model, tok, [r, only_b], edited_subjects=("A", "B"))
    assert m.rows[1]["neighborhood_unedited_score"] == pytest.approx(0.0)  # its own subject B is kept
    assert m.summary["neighborhood_unedited_score"].n == 2
    assert summarize(m).startswith("| | ES | PS | NS | NS-u |")


def test_ngram_entropy():
    # bigrams (a,b),(b,a),(a,b): H2 = H(2/3, 1/3); trigrams (a,b,a),(b,a,b): H3 = 1 bit
    h2 = -(2 / 3 * math.log2(2 / 3) + 1 / 3 * math.log2(1 / 3))
    assert ngram_entropy("a b a b") == pytest.approx((2 / 3 * h2 + 4 / 3 * 1) / 2)
    assert ngram_entropy("a a a a a") == 0
    assert ngram_entropy("word") == 0  # no n-grams
    # punctuation marks are words: 'x, y.' -> x , y . : 3 distinct bigrams, 2 distinct trigrams
    assert ngram_entropy("x, y.") == pytest.approx((2 / 3 * math.log2(3) + 4 / 3 * 1) / 2)


def test_fluency_on_bigram(tok):
    """Greedy decoding of the bigram model from 'A is' cycles x z z z ...: low entropy, computed as ROME does
    on prompt + continuation."""
    rows = dict(EDITED, **{" z": {" z": .9, " y": .1}})
    m = evaluate_requests(bigram(tok, rows), tok, reqs()[:1], metrics=("fluency",), fluency_tokens=6,
                          generation_prompts=[["A is"]])
    assert set(m.rows[0]) == {"case_id", "fluency"}
    assert m.rows[0]["fluency"] == pytest.approx(ngram_entropy("A is x z z z z z"))
    sampled = evaluate_requests(bigram(tok, rows), tok, reqs()[:1], metrics=("fluency",), fluency_tokens=6,
                                key=jax.random.key(0))  # generation prompts: rewrite + paraphrases
    assert np.isfinite(sampled.rows[0]["fluency"])


def test_bad_arguments(tok):
    with pytest.raises(EvaluationError, match="subset of"):
        Evaluator(tok, reqs(), metrics=("efficacy",))
    with pytest.raises(EvaluationError, match="2 lists of generation_prompts for 3 requests"):
        Evaluator(tok, reqs(), generation_prompts=[["a"], ["b"]])
    with pytest.raises(EvaluationError, match=r"requests\[0\] is a dict"):
        Evaluator(tok, [{"prompt": "{} is"}])
    ref = evaluate_requests(bigram(tok, REFERENCE), tok, reqs()[1:], metrics=("accuracy",))
    with pytest.raises(EvaluationError, match="reference has no prediction"):
        evaluate_requests(bigram(tok, EDITED), tok, reqs(), reference=ref)
    with pytest.raises(TypeError, match="reference must be None, False, EditMetrics or a model, got str"):
        Evaluator(tok, reqs())(bigram(tok, EDITED), reference="unedited")
    assert stat([math.nan]).n == 0 and math.isnan(stat([]).mean) and math.isnan(stat([1.0]).stderr)


# ------------------------------------------------------------------------------ the tiny trained world model
@pytest.fixture(scope="module")
def world():
    corpus, tok, model = W.trained_world(16)
    requests = [Request.from_edit_request(corpus.edit_request(corpus.fact(corpus.entities[e], r), seed=1),
                                          case_id=f"{e}/{r}") for e in range(6) for r in ("birth_city", "sport")]
    return corpus, tok, model, requests


def test_world_unedited_and_rome(world):
    corpus, tok, model, requests = world
    m0 = evaluate_requests(model, tok, requests, reference=model, batch_size=16)
    s = m0.summary
    assert s["efficacy_score"].n == len(requests)
    assert s["efficacy_score"].mean <= 0.1 and s["neighborhood_score"].mean >= 0.9  # the model knows the facts
    assert s["neighborhood_acc"].mean >= 0.9 and s["locality"].mean == 1.0
    # exact-match accuracy == greedy generation of len(target) tokens
    for r, row in zip(requests, m0.rows):
        for prompt, target, acc in ((r.text, r.target_new, row["rewrite_gen_acc"]),
                                    (r.neighborhood_prompts[0], r.neighborhood_targets[0], None)):
            p = tok.encode(prompt).ids
            t = tok.encode(target).ids
            out = np.asarray(generate(model, jnp.asarray([p]), max_new_tokens=len(t)))[0, len(p):]
            single = evaluate_requests(model, tok, [Request("{}", prompt, target)], metrics=("accuracy",))
            assert single.rows[0]["rewrite_gen_acc"] == float(list(out) == t)
            if acc is not None:
                assert acc == float(list(out) == t)
    # a ROME edit of the first request: efficacy up, the others' neighbourhoods mostly intact
    stats = second_moments(model, W.corpus_batches(tok, corpus.training_texts()), [0], corpus="facts")
    delta = rome(model, tok, requests[0], layer=0, stats=stats, hparams=ROMEHparams(context=(("{}",),)))
    edited = deltas.apply(model, delta)
    ev = Evaluator(tok, requests, reference=m0)
    m1 = ev(edited, which=[0])
    assert m1.rows[0]["efficacy_score"] == 1 and m1.rows[0]["rewrite_gen_acc"] == 1
    assert m1.rows[0]["efficacy_magnitude"] > m0.rows[0]["efficacy_magnitude"] + 0.5
    assert m1.rows[0]["locality"] >= 0.5
    full = ev(model)  # the same Evaluator on the unedited model reproduces the first evaluation
    for k in ("efficacy_magnitude", "paraphrase_magnitude", "neighborhood_acc"):
        np.testing.assert_allclose([r[k] for r in full.rows], [r[k] for r in m0.rows], atol=1e-6)
    assert isinstance(full, EditMetrics)
