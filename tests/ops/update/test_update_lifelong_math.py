"""The closed forms of AlphaEdit (null-space projection) and the RLS lifelong editor on random matrices, checked
against independent NumPy float64 computations: projector properties, preserved keys untouched, the paper's and the
code's forms, sequential RLS = batch least squares over all edits, undo."""
import numpy as np
import pytest

from configurable_fm.bricks.deltas import Dense, LowRank
from configurable_fm.ops.update import (AlphaEditState, StatsError, alphaedit_init, alphaedit_undo, alphaedit_update,
                                        memit_update, null_space_projector,
                                        nullspace_threshold_for_energy, rls_init, rls_undo, rls_update)
from configurable_fm.ops.update.rlsedit import RLSState

rs = np.random.RandomState(0)


def second_moment(f, rank, n=2000, scale=3.0):
    """E[k k^T] of n keys that live (up to noise 1e-3) in a random `rank`-dimensional subspace, and its basis."""
    basis = np.linalg.qr(rs.normal(size=(f, f)))[0]
    big = basis[:, :rank]
    keys = rs.normal(size=(n, rank)) * np.linspace(0.5, scale, rank) @ big.T + 1e-3 * rs.normal(size=(n, f))
    return keys.T @ keys / n, big, basis[:, rank:]


# ------------------------------------------------------------------------------------------------ AlphaEdit
def test_projector_matches_the_authors_rule():
    f, rank = 40, 28
    c, big, small = second_moment(f, rank)
    p = null_space_projector(c, 2e-2)
    np.testing.assert_allclose(p, p.T, atol=1e-12)  # symmetric
    np.testing.assert_allclose(p @ p, p, atol=1e-10)  # idempotent
    # get_project: U[:, S < threshold] from the SVD of C; the count is the trace of P
    u, s, _ = np.linalg.svd(c)
    assert round(np.trace(p)) == int((s < 2e-2).sum()) == f - rank
    np.testing.assert_allclose(p, u[:, s < 2e-2] @ u[:, s < 2e-2].T, atol=1e-10)
    np.testing.assert_allclose(big.T @ p, 0, atol=1e-4)  # the preserved subspace is projected away
    with pytest.raises(StatsError, match="no eigenvalue .* below nullspace_threshold=1e-09"):
        null_space_projector(c, 1e-9)


def test_threshold_for_an_energy_share():
    # eigenvalues 1..10 (trace 55) in a random basis: the 4 smallest hold 10 <= 0.2 x 55 = 11, the 5 smallest 15
    basis = np.linalg.qr(rs.normal(size=(10, 10)))[0]
    c = basis @ np.diag(np.arange(1.0, 11.0)) @ basis.T
    thr = nullspace_threshold_for_energy(c, 0.2)
    assert thr == pytest.approx(4.5)
    p = null_space_projector(c, thr)
    assert round(np.trace(p)) == 4 and np.trace(p @ c) == pytest.approx(10.0)
    assert round(np.trace(null_space_projector(c, nullspace_threshold_for_energy(c, 15.5 / 55)))) == 5
    with pytest.raises(StatsError, match="smallest eigenvalue .* holds 0.0182 of its trace, more than share=0.01"):
        nullspace_threshold_for_energy(c, 0.01)
    with pytest.raises(ValueError, match="share must be in"):
        nullspace_threshold_for_energy(c, 1.0)


def test_alphaedit_closed_form_preserves_keys_and_writes_the_edit():
    f, d, rank, e, l2 = 48, 16, 30, 6, 10.0
    c, big, small = second_moment(f, rank)
    p = null_space_projector(c, 2e-2)
    # new keys with a large part outside the preserved subspace; a history of earlier keys
    k1 = rs.normal(size=(e, rank)) @ big.T + 10.0 * rs.normal(size=(e, f - rank)) @ small.T
    kp = rs.normal(size=(12, f))
    hist = kp.T @ kp
    r = rs.normal(size=(e, d))
    term = alphaedit_update(k1, r, p, hist, l2)
    assert isinstance(term, LowRank) and term.rank == e and term.shape == (f, d)
    dw = np.asarray(term.materialize(), np.float64)
    # the paper's form (layout (D, F), keys as columns), computed independently, with I -> L2 I:
    # Delta = R K1 P (Kp Kp^T P + K1 K1^T P + L2 I)^-1 ... transposed into our (F, D)
    R, K1, Kp = r.T, k1.T, kp.T
    paper = R @ K1.T @ p @ np.linalg.inv(Kp @ Kp.T @ p + K1 @ K1.T @ p + l2 * np.eye(f))
    np.testing.assert_allclose(dw, paper.T, rtol=1e-4, atol=1e-6)
    # the authors' code form: solve(P (K1 K1^T + cache) + L2 I, P K1 R^T)
    code = np.linalg.solve(p @ (K1 @ K1.T + hist) + l2 * np.eye(f), p @ K1 @ R.T)
    np.testing.assert_allclose(dw, code, rtol=1e-4, atol=1e-6)
    # dW = P dW: keys in the preserved (principal) subspace keep their outputs
    k0 = rs.normal(size=(200, rank)) * 3.0 @ big.T
    w = rs.normal(size=(f, d))
    rel = np.linalg.norm(k0 @ dw) / np.linalg.norm(k0 @ w)
    assert rel <= 1e-5, rel
    # ... and so do the statistics' own keys, to the threshold's accuracy
    evals, evecs = np.linalg.eigh(c)
    k_stats = rs.normal(size=(500, f)) * np.sqrt(np.maximum(evals, 0)) @ evecs.T
    assert np.linalg.norm(k_stats @ dw) / np.linalg.norm(k_stats @ w) <= 1e-3
    # the edit is written approximately (the keys reach far into the null space, the ridge is small against them)
    fit = np.linalg.norm(k1 @ dw - r) / np.linalg.norm(r)
    assert fit < 0.1, fit
    # one more key than fits a Dense is cheaper: Dense with the same values
    many = alphaedit_update(rs.normal(size=(20, 8)), rs.normal(size=(20, 4)), np.eye(8), None, 1.0)
    assert isinstance(many, Dense)


def test_alphaedit_state_init_and_undo():
    c, _, _ = second_moment(16, 10)
    state = alphaedit_init({0: c, 2: c}, [0, 2], nullspace_threshold=2e-2)
    assert state.layers == [0, 2] and state.nullspace_dims() == {0: 6, 2: 6}
    assert np.all(state.histories[0] == 0) and state.edits == 0
    k = {0: rs.normal(size=(3, 16)), 2: rs.normal(size=(3, 16))}
    grown = AlphaEditState(state.projectors, {l: state.histories[l] + k[l].T @ k[l] for l in k}, 3, k)
    back = alphaedit_undo(grown, k, 3)
    assert back.edits == 0 and back.projectors is state.projectors
    np.testing.assert_allclose(back.histories[2], 0, atol=1e-12)
    assert grown.histories[2].any()  # the input state is not modified
    with pytest.raises(StatsError, match=r"no key statistics for layer\(s\) \[2\]"):
        alphaedit_init({0: c}, [0, 2])
    with pytest.raises(StatsError, match="needs the key statistics"):
        alphaedit_init(None, [0])


# ------------------------------------------------------------------------------------------------ RLS
def test_rls_sequential_equals_batch_least_squares():
    """T steps of rls_update, each on the residual of the current weights, give exactly the batch solution of
    min sum_t ||K_t W - V_t||^2 + lambda tr(dW^T C dW) + mu ||dW||^2; the first step is MEMIT's update."""
    f, d, lam, mu = 24, 8, 5.0, 0.1
    c, _, _ = second_moment(f, f, n=400)
    w0 = rs.normal(size=(f, d))
    state = rls_init({1: c}, [1], mom2_update_weight=lam, ridge=mu)
    np.testing.assert_allclose(state.inverses[1] @ state.grams[1], np.eye(f), atol=1e-9)
    w, ks, vs = w0.copy(), [], []
    for t in range(30):
        e = 1 + t % 4
        k, v = rs.normal(size=(e, f)), rs.normal(size=(e, d)) * 2
        term, inv, gram = rls_update(k, v - k @ w, state.inverses[1], state.grams[1], refresh=(t == 17))
        if t == 0:  # step 1 = MEMIT with (lambda C + mu I) as the preserved term
            np.testing.assert_allclose(np.asarray(term.materialize(), np.float64),
                                       np.asarray(memit_update(k, v - k @ w, c + mu / lam * np.eye(f), lam)
                                                  .materialize(), np.float64), rtol=1e-4, atol=1e-6)
        step = np.linalg.solve(gram, k.T @ (v - k @ w))  # dW_T = H_T^-1 K_T^T R_T, independently
        np.testing.assert_allclose(np.asarray(term.materialize(), np.float64), step, rtol=1e-4, atol=1e-6)
        w = w + step  # carried in float64 (the term is stored float32)
        state = RLSState({1: gram}, {1: inv}, state.edits + e, state.steps + 1, {1: k})
        ks.append(k)
        vs.append(v)
    K, V = np.concatenate(ks), np.concatenate(vs)
    h = lam * c + mu * np.eye(f) + K.T @ K
    batch = w0 + np.linalg.solve(h, K.T @ (V - K @ w0))
    np.testing.assert_allclose(w, batch, rtol=1e-8, atol=1e-9)
    np.testing.assert_allclose(state.grams[1], h, rtol=1e-10, atol=1e-9)
    np.testing.assert_allclose(state.inverses[1], np.linalg.inv(h), rtol=1e-6, atol=1e-9)  # Woodbury drift
    # undo the last step: the Gram and inverse before it
    back = rls_undo(state, {1: ks[-1]}, len(ks[-1]))
    np.testing.assert_allclose(back.grams[1], h - ks[-1].T @ ks[-1], atol=1e-9)
    np.testing.assert_allclose(back.inverses[1] @ back.grams[1], np.eye(f), atol=1e-8)
    assert back.steps == state.steps - 1 and back.edits == state.edits - len(ks[-1])


def test_rls_errors():
    with pytest.raises(StatsError, match="not positive definite"):
        rls_init({0: np.zeros((4, 4))}, [0], mom2_update_weight=1.0)
    assert rls_init({0: np.zeros((4, 4))}, [0], ridge=1.0).inverses[0].shape == (4, 4)  # the ridge makes it PD
    with pytest.raises(ValueError, match="keys have 5 features"):
        rls_update(np.ones((2, 5)), np.ones((2, 3)), np.eye(4))
