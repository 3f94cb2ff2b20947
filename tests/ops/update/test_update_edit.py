"""ROME and MEMIT end to end on tiny llama and gpt2 models trained in-test on a synthetic facts corpus (world.py):
the edit makes target_new the argmax continuation of the prompt (efficacy), prompts about other subjects keep
their next-token distributions (specificity), the closed forms hold on the model's own keys and values, the
model is not modified and rollback undoes the edit."""
import jax
import numpy as np
import pytest

from configurable_fm.bricks import deltas
from configurable_fm.bricks.deltas import LowRank
from configurable_fm.bricks.paths import flat_params
from configurable_fm.ops.update import (MEMITHparams, ROME_CONTEXT, ROMEHparams, Generated, Request, compute_keys,
                                        context_templates, edit_site, memit, optimize_values, rome,
                                        second_moments, values_at_subject)
from tests.ops.update import world as W

BARE = (("{}",),)  # keys and values at the bare prompt (see test_rome_llama)


@pytest.fixture(scope="module")
def facts():
    corpus = W.corpus(16)
    return corpus, W.word_tokenizer(W.all_texts(corpus))


def trained(spec, facts, model=None):
    """The model trained 200 steps (batch 32) on the facts (`model`: one trained so already), checked to know them,
    and its key statistics of layers 0-1."""
    corpus, tok = facts
    if model is None:
        model, loss = W.train(W.random_model(spec, tok.get_vocab_size(), 0), tok, corpus.training_texts(),
                              steps=200, batch=32)
    queries = corpus.queries("train_template")
    p = W.next_token_probs(model, tok, [q.prompt for q in queries])
    recall = np.mean([p[i].argmax() == W.token_id(tok, q.target) for i, q in enumerate(queries)])
    assert recall > 0.95, recall  # the model knows the facts before they are edited
    stats = second_moments(model, W.corpus_batches(tok, corpus.training_texts()), [0, 1], corpus="facts")
    return model, stats


@pytest.fixture(scope="module")
def llama(facts):
    # W.trained_world(16) is this very training (the same spec, seed, corpus, tokenizer, steps and batch), cached per
    # process: the modules that use it (test_evaluate, test_update_lifelong_edit) share one training
    return trained(dict(W.LLAMA, num_layers=2), facts, W.trained_world(16)[2])


@pytest.fixture(scope="module")
def gpt2(facts):
    return trained(dict(W.GPT2, n_layer=2), facts)


def requests(corpus, entities, relations=("birth_city", "sport")):
    return [Request.from_edit_request(corpus.edit_request(corpus.fact(corpus.entities[e], r), seed=1), case_id=i)
            for i, (e, r) in enumerate((e, r) for e in entities for r in relations)]


def effects(model, edited, tok, corpus, req, edited_subjects=()):
    """(p(target_new | prompt) before and after the edit, whether it is the argmax after, the KL(edited || model)
    of the next-token distributions of every query about a subject not edited, whether each keeps its argmax)."""
    skip = {req.subject, *edited_subjects}
    others = [q.prompt for q in corpus.queries("train_template") if q.subject not in skip]
    p0 = W.next_token_probs(model, tok, [req.text] + others)
    p1 = W.next_token_probs(edited, tok, [req.text] + others)
    new = W.token_id(tok, req.target_new)
    kl = np.sum(p1[1:] * (np.log(p1[1:]) - np.log(p0[1:])), axis=-1)
    return p0[0, new], p1[0, new], p1[0].argmax() == new, kl, p1[1:].argmax(-1) == p0[1:].argmax(-1)


def check_edits(model, tok, corpus, reqs, edited_models):
    subjects = {r.subject for r in reqs} if len({id(m) for m in edited_models}) == 1 else ()  # one edit of all
    rows = [effects(model, edited, tok, corpus, req, subjects) for req, edited in zip(reqs, edited_models)]
    before, after, top = (np.asarray([r[i] for r in rows]) for i in range(3))
    kl_mean, kept = [r[3].mean() for r in rows], [r[4].mean() for r in rows]
    assert np.all(after > 10 * before + 0.01) and np.all(before < 0.05), (before, after)  # every edit lifts the target
    assert top.sum() >= len(reqs) - 1, (top, after)  # ... to the top (efficacy), allowing one borderline case
    assert max(kl_mean) < 0.1, kl_mean  # other subjects' predictions barely move (specificity)
    assert min(kept) >= 0.95, kept


def test_rome_llama(llama, facts):
    """Keys and values at the bare prompt (context '{}'): in a model this small, prefixes change the subject's
    key a lot (a 2-layer model has no room to forget them), so the averaged key generalises poorly."""
    model, stats = llama
    corpus, tok = facts
    before = flat_params(model)
    reqs = requests(corpus, [1, 2, 3])
    hp = ROMEHparams(context=BARE)
    edits = [rome(model, tok, r, layer=0, stats=stats, hparams=hp) for r in reqs]
    after = flat_params(model)
    assert list(after) == list(before) and all(after[p] is before[p] for p in before)  # the model is not modified
    d = edits[0]
    assert d.kind == "rome" and list(d) == ["layers.0.mlp.down_proj.kernel"]
    term = d["layers.0.mlp.down_proj.kernel"]
    assert isinstance(term, LowRank) and term.rank == 1 and term.shape == (128, 64)
    assert d.metadata["layer"] == 0 and d.metadata["stats"] == {"corpus": "facts", "tokens": stats[0].tokens}
    assert d.metadata["value_loss"][-1] < d.metadata["value_loss"][0]
    assert d.metadata["bare_prompt_share"] == pytest.approx(1.0, abs=1e-9)  # k* is the bare prompt's key
    edited = [deltas.apply(model, e) for e in edits]
    check_edits(model, tok, corpus, reqs, edited)
    # the constraint on the model: at the subject's last token the edited projection outputs v*
    site = edit_site(model, 0)
    k = compute_keys(model, tok, reqs[:1], site, BARE)[0]
    v = optimize_values(model, tok, reqs[:1], point=site.value_point, templates=["{}"], hparams=hp).values[0]
    out = values_at_subject(edited[0], tok, reqs[:1], [site.value_point, site.key_point])
    np.testing.assert_allclose(out[site.key_point][0, 0], k, rtol=1e-5, atol=1e-6)  # keys are upstream
    assert np.linalg.norm(out[site.value_point][0, 0] - v) / np.linalg.norm(v) < 1e-4
    # rollback undoes it
    back = flat_params(deltas.rollback(edited[0], d))
    for p in before:
        np.testing.assert_allclose(np.asarray(back[p]), np.asarray(before[p]), rtol=0, atol=1e-6)


def test_rome_gpt2(gpt2, facts):
    """gpt2's c_proj has a bias: v* = W^T k* + b + dW^T k*."""
    model, stats = gpt2
    corpus, tok = facts
    reqs = requests(corpus, [1, 2])
    hp = ROMEHparams(context=BARE)
    edits = [rome(model, tok, r, layer=0, stats=stats[0], hparams=hp) for r in reqs]
    assert list(edits[0]) == ["h.0.mlp.c_proj.kernel"]
    edited = [deltas.apply(model, e) for e in edits]
    check_edits(model, tok, corpus, reqs, edited)
    site = edit_site(model, 0)
    v = optimize_values(model, tok, reqs[:1], point=site.value_point, templates=["{}"], hparams=hp).values[0]
    out = values_at_subject(edited[0], tok, reqs[:1], [site.value_point])[site.value_point][0, 0]
    assert np.linalg.norm(out - v) / np.linalg.norm(v) < 1e-4


def test_memit_llama(llama, facts):
    """Three edits spread over both layers: one LowRank term of rank 3 per layer; the first layer's update solves
    MEMIT's normal equations with the keys and residuals read from the model."""
    model, stats = llama
    corpus, tok = facts
    reqs = requests(corpus, [4, 5, 6], relations=("birth_city",))
    hp = MEMITHparams(context=BARE, batch_size=2, mom2_update_weight=16.0)  # lambda ~ F / 8 (module docstring)
    d = memit(model, tok, reqs, layers=[0, 1], stats=stats, hparams=hp)
    assert d.kind == "memit" and list(d) == ["layers.0.mlp.down_proj.kernel", "layers.1.mlp.down_proj.kernel"]
    assert all(isinstance(t, LowRank) and t.rank == 3 for t in d.values())
    edited = deltas.apply(model, d)
    check_edits(model, tok, corpus, reqs, [edited] * len(reqs))
    # normal equations of the first layer: (lambda C + K^T K) dW = K^T R, R = (z - h_L) / 2
    site, top = edit_site(model, 0), edit_site(model, 1)
    z = optimize_values(model, tok, reqs, point=top.layer_output, templates=["{}"], hparams=hp).values
    vals = values_at_subject(model, tok, reqs, [site.key_point, top.layer_output])
    k, r = vals[site.key_point][:, 0].astype(np.float64), (z - vals[top.layer_output][:, 0]) / 2.0
    dw = np.asarray(d[site.kernel].materialize(), np.float64)
    lhs = (hp.mom2_update_weight * stats[0].second_moment.astype(np.float64) + k.T @ k) @ dw
    rhs = k.T @ r
    assert np.linalg.norm(lhs - rhs) / np.linalg.norm(rhs) < 1e-3


def test_generated_context_templates(llama, facts):
    """Context templates: '{}' plus prefixes the model generates (top-k sampled with a key, or greedy)."""
    model, _ = llama
    _, tok = facts
    # ROME's default: '{}' + 10 sampled prefixes of 5 tokens + 10 of 10 tokens, one group
    assert [len(ROME_CONTEXT), ROME_CONTEXT[0][0]] == [1, "{}"]
    assert sum(i.per_start * len(i.starts) for i in ROME_CONTEXT[0][1:]) == 20
    context = (("{}", Generated(5, per_start=2)),)
    (group,) = context_templates(model, tok, context, key=jax.random.key(0))
    assert len(group) == 11 and group[0] == "{}"
    assert all(t.endswith(". {}") and t.count("{}") == 1 for t in group[1:])
    assert group[1].startswith("The") and group[3].startswith("Therefore")  # per_start=2: two per start word
    assert context_templates(model, tok, context, key=jax.random.key(0)) == ((group,))  # reproducible
    assert context_templates(model, tok, context, key=jax.random.key(1)) != ((group,))
    with pytest.raises(ValueError, match="pass key="):
        context_templates(model, tok, context)
    (greedy,) = context_templates(model, tok, ((Generated(5, top_k=None), "{}"),))
    assert len(greedy) == 6 and greedy[-1] == "{}"
    # keys average within a group, then over groups (MEMIT's weighting)
    reqs = requests(facts[0], [0], relations=("sport",))
    site = edit_site(model, 0)
    parts = values_at_subject(model, tok, reqs, [site.key_point], ["{}", greedy[0], greedy[1]])[site.key_point][0]
    chunked = values_at_subject(model, tok, reqs, [site.key_point], ["{}", greedy[0], greedy[1]], rows_per_call=2)
    np.testing.assert_allclose(chunked[site.key_point][0], parts, rtol=1e-6, atol=1e-7)  # chunks of 2 rows, padded
    k = compute_keys(model, tok, reqs, site, (("{}",), (greedy[0], greedy[1])))[0]
    np.testing.assert_allclose(k, 0.5 * parts[0] + 0.25 * parts[1] + 0.25 * parts[2], rtol=1e-5, atol=1e-6)


def test_rome_bare_prompt_share(llama, facts):
    """With the key averaged over groups, the update writes bare_prompt_share * r at the bare prompt's key (and r
    at k*): the edited projection's output there moves by exactly that share of the intended change."""
    model, stats = llama
    corpus, tok = facts
    (req,) = requests(corpus, [2], relations=("sport",))
    context = (("{}",), ("It is known. {}", "Yesterday I read that. {}"))
    d = rome(model, tok, req, layer=0, stats=stats, hparams=ROMEHparams(context=context, v_num_grad_steps=3))
    site = edit_site(model, 0)
    share = d.metadata["bare_prompt_share"]
    k_star = compute_keys(model, tok, [req], site, context)[0]
    r = d.metadata["residual_norm"]
    before = values_at_subject(model, tok, [req], [site.value_point])[site.value_point][0, 0]
    after = values_at_subject(deltas.apply(model, d), tok, [req], [site.value_point])[site.value_point][0, 0]
    intended = (np.asarray(d[site.kernel].materialize(), np.float64).T @ k_star)  # = r (the change at k*)
    assert np.linalg.norm(intended) == pytest.approx(r, rel=1e-4)
    np.testing.assert_allclose(after - before, share * intended, rtol=1e-3, atol=1e-4 * r)
    assert 0 < abs(share - 1) and np.isfinite(share)  # the prefixes change the key: not the bare prompt's own
