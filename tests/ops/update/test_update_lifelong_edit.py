"""Sequential editing end to end on a tiny llama trained in-test (world.py): 20 edits in 10 steps through an
EditSession with AlphaEdit, sequential MEMIT and the RLS editor; FT-L on one layer. The key statistics come from
the texts about subjects that are not edited (the preserved knowledge), so the edited subjects' keys reach into
the statistics' null space as they do with a large corpus. The same checks on world.py's tiny gpt2 (Conv1D layout, a
biased c_proj): AlphaEdit and RLS sessions (16 edits in 4 steps) and FT-L."""
import dataclasses

import jax
import numpy as np
import pytest

from configurable_fm.bricks import deltas
from configurable_fm.bricks.deltas import Dense
from configurable_fm.bricks.paths import flat_params
from configurable_fm.ops.update import (AlphaEditHparams, EditSession, Encoder, FTHparams, MEMITHparams,
                                        RLSEditHparams, ROMEHparams, edit_site, edit_step, ft, memit, second_moments)
from configurable_fm.ops.update.finetune import ft_rows
from tests.ops.update import world as W
from tests.ops.update.test_update_edit import facts, gpt2  # noqa: F401  (module-scoped fixtures: the tiny gpt2)
from tests.ops.update.test_update_edit import requests as make_requests

BARE = (("{}",),)
EDITED = 10  # entities 0..9, two relations each: 20 edits
STEPS = dict(context=BARE, batch_size=2, v_num_grad_steps=15)


def edit_setup(corpus, tok, model, n_edited):
    """(corpus, tok, model, stats, requests, other prompts) for editing the first `n_edited` entities: key
    statistics of layers 0-1 over the facts about the other entities, the requests (two relations each) and the
    training-template prompts about the other subjects."""
    edited = corpus.entities[:n_edited]
    kept = [t for t in corpus.training_texts() if not any(e in t for e in edited)]
    stats = second_moments(model, W.corpus_batches(tok, kept), [0, 1], corpus="kept facts")
    reqs = make_requests(corpus, list(range(n_edited)))
    others = [q.prompt for q in corpus.queries("train_template") if q.subject not in edited]
    return corpus, tok, model, stats, reqs, others


@pytest.fixture(scope="module")
def world():
    corpus, tok, model = W.trained_world(16)
    return edit_setup(corpus, tok, model, EDITED)


def outcome(model, edited, tok, reqs, others):
    """(p(target_new) before, after, whether it is the argmax after, KL(edited || model) on the other subjects'
    queries, whether those keep their argmax)."""
    ids = np.asarray([W.token_id(tok, r.target_new) for r in reqs])
    rows = np.arange(len(reqs))
    p0, p1 = (W.next_token_probs(m, tok, [r.text for r in reqs])[rows, ids] for m in (model, edited))
    top = W.next_token_probs(edited, tok, [r.text for r in reqs]).argmax(-1) == ids
    q0, q1 = W.next_token_probs(model, tok, others), W.next_token_probs(edited, tok, others)
    kl = np.sum(q1 * (np.log(q1) - np.log(q0)), -1)
    return p0, p1, top, kl, q1.argmax(-1) == q0.argmax(-1)


def preserved_change(model, stats, delta, layer, threshold=2e-2):
    """||K0 dW|| / ||K0 W|| for 300 keys drawn from the statistics' principal subspace (eigenvalues >= threshold),
    weighted by the square roots of the eigenvalues (keys distributed like the corpus keys, minus the null space)."""
    site = edit_site(model, layer)
    dw = np.asarray(delta[site.kernel].materialize(), np.float64)
    w = np.asarray(flat_params(model)[site.kernel], np.float64)
    ev, u = np.linalg.eigh(stats[layer].second_moment.astype(np.float64))
    big = ev >= threshold
    k0 = np.random.RandomState(0).normal(size=(300, big.sum())) * np.sqrt(ev[big]) @ u[:, big].T
    return np.linalg.norm(k0 @ dw) / np.linalg.norm(k0 @ w)


@pytest.fixture(scope="module")
def sessions(world):
    """AlphaEdit, sequential MEMIT and RLS sessions, 20 edits each in steps of 2 (AlphaEdit also keeps the
    state before its last step, for the rollback test)."""
    corpus, tok, model, stats, reqs, others = world
    calls = []
    out = {}
    hp = {"alphaedit": AlphaEditHparams(L2=1.0, **STEPS),  # L2 ~ the squared norm of the keys' null-space parts
          "memit": MEMITHparams(mom2_update_weight=16.0, **STEPS),  # lambda ~ F / 8 (memit.py)
          "rlsedit": RLSEditHparams(mom2_update_weight=16.0, **STEPS)}
    for name, h in hp.items():
        on_edit = (lambda s, d: calls.append((s.edits, d.kind)) or s.edits) if name == "rlsedit" else None
        s = EditSession(model, tok, name, layers=[0, 1], stats=stats, hparams=h, on_edit=on_edit, every=4)
        s.edit_all(reqs[:-2], batch_size=2)
        before_last = s.current
        s.edit(reqs[-2:])
        out[name] = (s, before_last)
    return out, calls


def test_alphaedit_session_preserves_keys_and_edits(world, sessions):
    corpus, tok, model, stats, reqs, others = world
    session, before_last = sessions[0]["alphaedit"]
    assert (session.edits, session.steps, len(session.deltas)) == (20, 10, 10)
    total = session.total()
    assert list(total) == ["layers.0.mlp.down_proj.kernel", "layers.1.mlp.down_proj.kernel"]
    # preserved keys keep their outputs through all 20 edits (dW = P dW per step, and so for the sum)
    for layer in (0, 1):
        assert preserved_change(model, stats, total, layer) <= 1e-3
    p0, p1, top, kl, kept = outcome(model, session.model, tok, reqs, others)
    assert np.all(p1 > 10 * p0 + 1e-3), (p0, p1)  # every edit lifts its target
    assert top.mean() >= 0.5, p1
    assert kl.max() < 0.02 and kept.all(), kl  # other subjects' predictions do not move
    # the state: per layer, the history is the sum of K^T K of every step's keys
    st = session.state
    assert st.edits == 20 and set(st.histories) == {0, 1}
    assert np.trace(st.histories[0]) > np.trace(before_last.method_state.histories[0]) > 0
    # the deltas' sum applied to the base is the session's model
    again = flat_params(deltas.apply(model, total))
    now = flat_params(session.model)
    for p in total:
        np.testing.assert_allclose(np.asarray(again[p]), np.asarray(now[p]), rtol=0, atol=1e-5)


def test_sequential_memit_moves_preserved_keys_alphaedit_does_not(world, sessions):
    """Sequential MEMIT (no history, no projection) over the same 20 edits: preserved keys move orders of
    magnitude more, other subjects' predictions move, and early edits are lost."""
    corpus, tok, model, stats, reqs, others = world
    alpha, memit_s = sessions[0]["alphaedit"][0], sessions[0]["memit"][0]
    for layer in (0, 1):
        a = preserved_change(model, stats, alpha.total(), layer)
        m = preserved_change(model, stats, memit_s.total(), layer)
        assert m > 100 * a, (layer, a, m)
    _, _, top_a, kl_a, _ = outcome(model, alpha.model, tok, reqs, others)
    _, _, top_m, kl_m, _ = outcome(model, memit_s.model, tok, reqs, others)
    assert kl_m.max() > 10 * kl_a.max(), (kl_m.max(), kl_a.max())
    assert top_m.mean() < top_a.mean(), (top_m.mean(), top_a.mean())


def test_rls_session_keeps_earlier_edits_and_calls_back(world, sessions):
    corpus, tok, model, stats, reqs, others = world
    (session, _), calls = sessions[0]["rlsedit"], sessions[1]
    p0, p1, top, kl, kept = outcome(model, session.model, tok, reqs, others)
    assert np.all(p1 > 10 * p0 + 1e-3), (p0, p1)
    assert top.mean() >= 0.75, p1  # after 20 sequential edits, the early ones included
    assert kl.max() < 0.2 and kept.all(), kl
    assert session.state.steps == 10 and session.state.edits == 20
    # every=4 requests in steps of 2: after edits 4, 8, ..., 20; the results are logged
    assert calls == [(e, "rlsedit") for e in (4, 8, 12, 16, 20)]
    assert [row[0] for row in session.log] == [4, 8, 12, 16, 20] and session.log[-1][2] == 20
    assert session.finish() is None  # already ran at 20 edits
    # the first step of a fresh session is MEMIT with the same lambda (the recursion starts at lambda C)
    memit_first = sessions[0]["memit"][0].deltas[0]
    rls_first = session.deltas[0]
    for p in memit_first:
        np.testing.assert_allclose(np.asarray(rls_first[p].materialize()), np.asarray(memit_first[p].materialize()),
                                   rtol=1e-3, atol=1e-4)


def test_rollback_restores_model_and_state(world, sessions):
    corpus, tok, model, stats, reqs, others = world
    session, before = sessions[0]["alphaedit"]
    last = session.current
    session.rollback(1)
    assert (session.edits, session.steps, len(session.deltas)) == (18, 9, 9)
    for layer in (0, 1):
        np.testing.assert_allclose(session.state.histories[layer], before.method_state.histories[layer],
                                   rtol=1e-9, atol=1e-9)
    a, b = flat_params(session.model), flat_params(before.model)
    for p in a:
        np.testing.assert_allclose(np.asarray(a[p]), np.asarray(b[p]), rtol=0, atol=1e-6)
    # the functional core: the step from `before` again gives the same delta; `before` itself is not modified
    again, delta = edit_step(session.config, before, reqs[-2:])
    np.testing.assert_allclose(np.asarray(delta["layers.1.mlp.down_proj.kernel"].materialize()),
                               np.asarray(last.deltas[-1]["layers.1.mlp.down_proj.kernel"].materialize()),
                               rtol=1e-4, atol=1e-6)
    assert before.edits == 18 and again.edits == 20
    with pytest.raises(ValueError, match="cannot undo 10 steps of 9"):
        session.rollback(10)
    session.current = last  # leave the session as the other tests expect


def test_ft_l_single_layer_clamped(world):
    corpus, tok, model, stats, reqs, others = world
    eps = 5e-2
    d = ft(model, tok, reqs[:2], layer=0, hparams=FTHparams(norm_constraint=eps, lr=1e-2, num_steps=25))
    assert d.kind == "ft" and list(d) == ["layers.0.mlp.down_proj.kernel"]
    term = d["layers.0.mlp.down_proj.kernel"]
    assert isinstance(term, Dense) and float(np.abs(np.asarray(term.value)).max()) <= eps + 1e-7
    assert d.metadata["loss"][-1] < d.metadata["loss"][0]
    compiled = []  # another norm constraint reuses the compiled loop (eps is traced), and clamps at its own radius

    def listener(event, seconds, **kw):
        if event == "/jax/core/compile/backend_compile_duration":
            compiled.append(kw.get("fun_name"))

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        tight = ft(model, tok, reqs[:2], layer=0, hparams=FTHparams(norm_constraint=eps / 4, lr=1e-2, num_steps=25))
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    assert "jit(_finetune)" not in compiled, compiled
    change = np.abs(np.asarray(tight["layers.0.mlp.down_proj.kernel"].value))
    assert change.max() <= eps / 4 + 1e-7 and np.isclose(change.max(), eps / 4)
    p0, p1, top, kl, kept = outcome(model, deltas.apply(model, d), tok, reqs[:2], others)
    assert np.all(p1 > 0.5) and np.all(p0 < 0.01) and top.all(), (p0, p1)
    # the objectives' rows: 'target' feeds prompt + target[:-1] and scores the target tokens from the prompt's
    # last position on; 'prompt_last' scores every target token at the prompt's last position
    enc = Encoder(tok)
    two = [dataclasses.replace(reqs[0], target_new=reqs[0].target_new + "."), reqs[1]]
    ids, pos, tgt, mask = ft_rows(enc, two, "target")
    n = len(enc.ids(two[0].text))
    assert list(pos[0]) == [n - 1, n] and list(mask[0]) == [1, 1] and list(mask[1]) == [1, 0]
    assert list(ids[0, :n + 1]) == enc.ids(two[0].text) + enc.target(two[0].target_new)[:1]
    _, pos_last, tgt_last, _ = ft_rows(enc, two, "prompt_last")
    assert list(pos_last[0]) == [n - 1, n - 1] and (tgt_last == tgt).all()
    with pytest.raises(ValueError, match="objective must be one of"):
        FTHparams(objective="nll")


def test_stateless_sessions_ft_and_rome(world):
    """FT-L and ROME through a session: deltas per step, on_edit only on finish (every=None), rollback to the
    base; ROME edits the requests of a step one after another (each on the model edited by the previous)."""
    corpus, tok, model, stats, reqs, others = world
    seen = []
    s = EditSession(model, tok, "ft", layers=[0], hparams=FTHparams(norm_constraint=5e-2, lr=1e-2),
                    on_edit=lambda s, d: seen.append(s.edits), every=None)
    s.edit(reqs[0:2])
    s.edit(reqs[2:4])
    assert seen == [] and s.finish() is None and seen == [4] and s.finish() is None and seen == [4]
    assert [d.kind for d in s.deltas] == ["ft", "ft"] and s.state is None
    s.rollback(2)
    assert s.edits == 0 and s.deltas == () and s.total().paths == ()
    for p, v in flat_params(s.model).items():
        np.testing.assert_allclose(np.asarray(v), np.asarray(flat_params(model)[p]), rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="ft edits one layer"):
        EditSession(model, tok, "ft", layers=[0, 1]).edit(reqs[0])
    with pytest.raises(ValueError, match="unknown editing method 'grace'"):
        EditSession(model, tok, "grace", layers=[0])
    with pytest.raises(TypeError, match="hparams must be ROMEHparams"):
        EditSession(model, tok, "rome", layers=[0], hparams=FTHparams())
    r = EditSession(model, tok, "rome", layers=[0], stats=stats,
                    hparams=ROMEHparams(context=BARE, v_num_grad_steps=15, batch_size=2))
    d = r.edit(reqs[:2])
    term = d["layers.0.mlp.down_proj.kernel"]
    assert d.kind == "rome" and term.rank == 2 and d.metadata["edits"] == 2 and len(d.metadata["operands"]) == 2
    p0, p1, top, kl, kept = outcome(model, r.model, tok, reqs[:2], others)
    assert np.all(p1 > 10 * p0 + 1e-3) and top.all(), (p0, p1)


# ------------------------------------------------------------------------------------------------ gpt2
# The same checks on world.py's tiny gpt2 (the module-scoped fixture of test_update_edit; pytest builds it once per
# module that uses it, so this module trains its own copy, 200 steps as there): its c_proj
# has a bias (y = k @ W + b) and the Conv1D layout (kernel (F, D)); the editors write the kernel only.
GPT2_EDITED = 8  # entities 0..7, two relations each: 16 edits in 4 steps of 4


@pytest.fixture(scope="module")
def gpt2_world(facts, gpt2):  # noqa: F811  (the imported fixtures)
    corpus, tok = facts
    model, _ = gpt2
    return edit_setup(corpus, tok, model, GPT2_EDITED)


GPT2_RIDGE = 0.1
GPT2_STEPS = dict(STEPS, clamp_norm_factor=4.0)


@pytest.fixture(scope="module")
def gpt2_sessions(gpt2_world):
    """AlphaEdit and RLS on gpt2. Two differences from the llama sessions, both about gpt2's keys: the value clamp
    is 4 (ROME's) instead of MEMIT's 0.75 (with 0.75 the optimised z cannot lift the target in this model), and
    the RLS editor has a ridge mu = 0.1: the gelu keys of 360 tokens give a near-singular C (smallest eigenvalues
    ~1e-6, F = 128), and without the ridge the solve writes along those directions (other subjects' KL > 1)."""
    corpus, tok, model, stats, reqs, others = gpt2_world
    hp = {"alphaedit": AlphaEditHparams(L2=1.0, **GPT2_STEPS),
          "rlsedit": RLSEditHparams(mom2_update_weight=16.0, ridge=GPT2_RIDGE, **GPT2_STEPS)}
    out = {}
    for name, h in hp.items():
        s = EditSession(model, tok, name, layers=[0, 1], stats=stats, hparams=h)
        s.edit_all(reqs, batch_size=4)
        out[name] = s
    return out


@pytest.mark.slow  # trains its own tiny gpt2 (~30-40 s on 2 cores)
def test_gpt2_alphaedit_session(gpt2_world, gpt2_sessions):
    corpus, tok, model, stats, reqs, others = gpt2_world
    session = gpt2_sessions["alphaedit"]
    assert (session.edits, session.steps) == (16, 4)
    total = session.total()
    assert list(total) == ["h.0.mlp.c_proj.kernel", "h.1.mlp.c_proj.kernel"]  # the bias is not edited
    before, after = flat_params(model), flat_params(session.model)
    for layer in (0, 1):
        assert preserved_change(model, stats, total, layer) <= 1e-3
        np.testing.assert_array_equal(np.asarray(after[f"h.{layer}.mlp.c_proj.bias"]),
                                      np.asarray(before[f"h.{layer}.mlp.c_proj.bias"]))
    p0, p1, top, kl, kept = outcome(model, session.model, tok, reqs, others)
    assert np.all(p1 > 10 * p0 + 1e-3), (p0, p1)
    assert top.mean() >= 0.5, p1
    assert kl.max() < 0.1 and kept.all(), kl
    again = flat_params(deltas.apply(model, total))
    for p in total:
        np.testing.assert_allclose(np.asarray(again[p]), np.asarray(after[p]), rtol=0, atol=1e-5)


@pytest.mark.slow  # trains its own tiny gpt2 (~30-40 s on 2 cores)
def test_gpt2_rls_session_starts_as_memit(gpt2_world, gpt2_sessions):
    corpus, tok, model, stats, reqs, others = gpt2_world
    session = gpt2_sessions["rlsedit"]
    p0, p1, top, kl, kept = outcome(model, session.model, tok, reqs, others)
    assert np.all(p1 > 10 * p0 + 1e-3), (p0, p1)
    assert top.mean() >= 0.75, p1
    assert kl.max() < 0.2 and kept.all(), kl
    assert session.state.steps == 4 and session.state.edits == 16
    # the first step is MEMIT with the same lambda and C + (mu / lambda) I (lambda C + mu I + K^T K: the ridge
    # enters as a multiple of I in C); the bias enters the residuals the same way in both
    ridged = {l: stats[l].second_moment.astype(np.float64) + GPT2_RIDGE / 16.0 * np.eye(128) for l in (0, 1)}
    first = memit(model, tok, reqs[:4], layers=[0, 1], stats=ridged,
                  hparams=MEMITHparams(mom2_update_weight=16.0, **GPT2_STEPS))
    for p in first:
        np.testing.assert_allclose(np.asarray(session.deltas[0][p].materialize()),
                                   np.asarray(first[p].materialize()), rtol=1e-3, atol=1e-4)


@pytest.mark.slow  # trains its own tiny gpt2 (~30-40 s on 2 cores)
def test_gpt2_ft_l(gpt2_world):
    corpus, tok, model, stats, reqs, others = gpt2_world
    eps = 5e-2
    d = ft(model, tok, reqs[:2], layer=0, hparams=FTHparams(norm_constraint=eps, lr=1e-2, num_steps=25))
    assert list(d) == ["h.0.mlp.c_proj.kernel"]
    term = d["h.0.mlp.c_proj.kernel"]
    assert isinstance(term, Dense) and term.value.shape == (128, 64)
    assert float(np.abs(np.asarray(term.value)).max()) <= eps + 1e-7
    p0, p1, top, kl, kept = outcome(model, deltas.apply(model, d), tok, reqs[:2], others)
    assert np.all(p1 > 0.5) and np.all(p0 < 0.01) and top.all(), (p0, p1)
    assert d.metadata["loss"][-1] < d.metadata["loss"][0]
