"""Sparsifiers of task vectors: hand-computed masks (ties, density 0 and 1), rescaling, DELLA probabilities
against mergekit 0.1.5's recorded ones, counts as mergekit computes them, jit."""
import functools
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file

from configurable_fm.ops.merge import (
    della_mask,
    della_probabilities,
    magnitude_mask,
    magnitude_outliers_mask,
    random_mask,
    rescale_masked,
    tensor_key,
)
from configurable_fm.ops.merge import sparsify as sp

GOLDEN = pathlib.Path(__file__).resolve().parents[2] / "golden" / "mergekit_0.1.5"
D5 = np.array([0.5, -2.0, 2.0, 0.0, -1.0], np.float32)  # |δ| = [.5, 2, 2, 0, 1]: a tie at the top


def arr(x):
    return np.asarray(x)


@pytest.mark.parametrize(
    "density, expected",
    [
        (0.4, [0, -2, 2, 0, 0]),  # k = 2: both tied 2s
        (0.2, [0, -2, 0, 0, 0]),  # k = 1: the tie goes to the lower index
        (0.01, [0, -2, 0, 0, 0]),  # k = max(1, int(0.05)) = 1
        (0.6, [0, -2, 2, 0, -1]),  # k = 3
        (0.8, [0.5, -2, 2, 0, -1]),  # k = 4
        (1.0, D5),
        (1.5, D5),
        (0.0, [0, 0, 0, 0, 0]),
        (-0.3, [0, 0, 0, 0, 0]),
    ],
)
def test_magnitude_hand(density, expected):
    y = sp.sparsify(jnp.asarray(D5), density, "magnitude")
    np.testing.assert_array_equal(arr(y), np.asarray(expected, np.float32))


def test_magnitude_ties_lower_index_first_above_16_entries():
    delta = np.ones(40, np.float32)
    delta[[3, 17, 30]] = 5.0
    m = arr(magnitude_mask(jnp.asarray(delta), 0.2))  # k = 8: the three 5s, then ones at 0, 1, 2, 4, 5
    assert sorted(np.flatnonzero(m).tolist()) == [0, 1, 2, 3, 4, 5, 17, 30]


def test_magnitude_rescale():
    y = sp.sparsify(jnp.asarray(D5), 0.4, "magnitude", rescale="l1")  # ‖δ‖₁ = 5.5, kept 4 -> x 1.375
    np.testing.assert_allclose(arr(y), [0, -2.75, 2.75, 0, 0], rtol=1e-6)
    y = sp.sparsify(jnp.asarray(D5), 0.4, "magnitude", rescale="inv_p")  # / 0.4
    np.testing.assert_allclose(arr(y), [0, -5, 5, 0, 0], rtol=1e-6)
    y = sp.sparsify(jnp.asarray(D5), 0.4, "magnitude", rescale=True)  # mergekit's bool -> l1
    np.testing.assert_allclose(arr(y), [0, -2.75, 2.75, 0, 0], rtol=1e-6)
    z = sp.sparsify(jnp.zeros(5), 0.4, "magnitude", rescale="l1")  # zero norm: no rescale, no NaN
    np.testing.assert_array_equal(arr(z), np.zeros(5))


D10 = np.array([0.1, -0.5, 0.3, -0.2, 0.4, 0.05, -0.6, 0.0, 0.25, 0.15], np.float32)


@pytest.mark.parametrize(
    "density, gamma, kept",
    [
        (0.5, 0.2, [9, 3, 8, 2, 4]),  # target 5, n_top 2, n_bot 3: ascending ranks 3..7
        (0.9, 0.2, [0, 1, 2, 3, 4, 5, 7, 8, 9]),  # n_bot = 0: drops only the largest (-0.6)
        (0.5, 0.01, [8, 2, 4, 1, 6]),  # n_top = int(0.1) = 0: the 5 largest
        (0.3, 0.7, [7, 5, 0]),  # n_bot = max(0, 10-3-7) = 0: ranks 0..2, the 3 smallest (0.0, 0.05, 0.1)
        (1.0, 0.2, list(range(10))),
        (0.0, 0.2, []),
    ],
)
def test_magnitude_outliers_hand(density, gamma, kept):
    y = arr(sp.sparsify(jnp.asarray(D10), density, "magnitude_outliers", gamma=gamma))
    expected = np.zeros(10, np.float32)
    expected[kept] = D10[kept]
    np.testing.assert_array_equal(y, D10 if density >= 1 else expected)


def test_magnitude_outliers_ties():
    # |δ| all equal: target 2, n_top 1, n_bot 1 -> ascending ranks 1, 2 -> indices 1, 2 (stable)
    m = arr(magnitude_outliers_mask(jnp.ones(4), 0.5, 0.25))
    np.testing.assert_array_equal(m, [False, True, True, False])


def test_rank_window_mask_matches_stable_argsort():
    rng = np.random.default_rng(0)
    for trial in range(30):
        n = (1, 7, 40)[trial % 3]  # few shapes: one compilation each
        v = rng.integers(-3, 4, size=(n,)).astype(np.float32)  # many ties
        v[rng.random(n) < 0.2] = -0.0  # -0.0 and 0.0 are one value
        lo, hi = sorted(rng.integers(-2, n + 3, size=2).tolist())
        ranks = np.empty(n, int)
        ranks[np.argsort(v, kind="stable")] = np.arange(n)
        expected = (ranks >= lo) & (ranks < hi)
        got = arr(sp.rank_window_mask(jnp.asarray(v.reshape(1, n)), lo, hi)).reshape(n)
        np.testing.assert_array_equal(got, expected, err_msg=f"trial {trial}: v={v}, window [{lo}, {hi})")


def test_counts_as_mergekit():
    # mergekit: int(d * n) in Python double precision
    assert int(sp.trunc_count(np.float32(0.58), 50)) == int(0.58 * 50) == 28
    assert int(sp.trunc_count(np.float32(0.7), 10)) == 7
    assert int(sp.trunc_count(0.29, 100)) == int(0.29 * 100) == 28
    assert arr(sp.trunc_count(np.array([0.3, 0.7, 0.58], np.float32), 50)).tolist() == [15, 35, 28]
    assert int(sp.trunc_count(-0.5, 10)) == -5  # truncation toward zero, as int()
    # traced (a jit argument): float32 arithmetic, documented to differ in rare cases such as this one
    assert int(jax.jit(lambda d: sp.trunc_count(d, 50))(jnp.float32(0.58))) == 29
    assert int(jax.jit(lambda d: sp.trunc_count(d, 10))(jnp.float32(0.7))) == 7


def test_random_mask_statistics_and_rescale():
    key = tensor_key(0, "w")
    m = arr(random_mask(key, 0.3, (100_000,)))
    assert abs(m.mean() - 0.3) < 0.01
    np.testing.assert_array_equal(m, arr(random_mask(key, 0.3, (100_000,))))  # deterministic
    delta = jnp.asarray(np.random.default_rng(1).standard_normal(1000).astype(np.float32))
    y = arr(sp.sparsify(delta, 0.3, "random", key=key, rescale="l1"))
    np.testing.assert_allclose(np.abs(y).sum(), np.abs(arr(delta)).sum(), rtol=1e-5)  # L1 preserved
    y = arr(sp.sparsify(delta, 0.3, "random", key=key, rescale="inv_p"))
    kept = y != 0
    np.testing.assert_allclose(y[kept], arr(delta)[kept] / 0.3, rtol=1e-6)
    mask = np.zeros(1000, bool)
    mask[:10] = True
    y = arr(sp.sparsify(delta, 0.3, "random", mask=mask))  # injected mask, no key needed
    np.testing.assert_array_equal(y, np.where(mask, arr(delta), 0))
    np.testing.assert_array_equal(arr(sp.sparsify(delta, 1.0, "random", key=key, rescale="l1")), arr(delta))
    np.testing.assert_array_equal(arr(sp.sparsify(delta, 0.0, "random", key=key, rescale="l1")), np.zeros(1000))


def test_rescale_masked_hand():
    delta = jnp.asarray([1.0, -2.0, 3.0, 0.0, 0.5])
    mask = jnp.asarray([1, 0, 1, 0, 1], bool)
    np.testing.assert_allclose(arr(rescale_masked(delta, mask, "l1")), np.array([1, 0, 3, 0, 0.5]) * 6.5 / 4.5,
                               rtol=1e-6)
    np.testing.assert_array_equal(arr(rescale_masked(delta, mask, None)), [1, 0, 3, 0, 0.5])
    p = jnp.asarray([0.5, 0.55, 0.6, 0.4, 0.45])
    np.testing.assert_allclose(arr(rescale_masked(delta, mask, "inv_p", p)), [2, 0, 5, 0, 0.5 / 0.45], rtol=1e-6)


def test_della_probabilities_hand():
    # one row: ranks of |δ| ascending 0..4 -> p = (d - ε) + 2ε r/4
    p = arr(della_probabilities(jnp.asarray([1.0, -2.0, 3.0, 0.0, 0.5]), 0.5, 0.1))
    np.testing.assert_allclose(p, [0.5, 0.55, 0.6, 0.4, 0.45], rtol=1e-6)
    # 2-D: per row (axis 1)
    p = arr(della_probabilities(jnp.asarray([[0.3, -0.1, 0.2, 0.0], [1.0, 2.0, 3.0, 4.0]]), 0.5, 0.1))
    np.testing.assert_allclose(p, [[0.6, 0.4 + 0.2 / 3, 0.4 + 0.4 / 3, 0.4], [0.4, 0.4 + 0.2 / 3, 0.4 + 0.4 / 3, 0.6]],
                               rtol=1e-6)
    # 3-D: along axis 1, for every (i, k)
    x = np.random.default_rng(0).standard_normal((2, 3, 4)).astype(np.float32)
    p = arr(della_probabilities(jnp.asarray(x), 0.4, 0.2))
    for i in range(2):
        for k in range(4):
            np.testing.assert_allclose(p[i, :, k], arr(della_probabilities(jnp.asarray(x[i, :, k]), 0.4, 0.2)))
    # ties: stable, the lower index ranks first
    np.testing.assert_allclose(arr(della_probabilities(jnp.ones(3), 0.5, 0.1)), [0.4, 0.5, 0.6], rtol=1e-6)


@pytest.mark.parametrize("method", ["della", "della_linear"])
def test_della_probabilities_match_mergekit(method):
    meta = json.loads((GOLDEN / f"{method}.json").read_text())["cases"]
    t = load_file(str(GOLDEN / f"{method}.safetensors"))
    checked = 0
    for case, info in meta.items():
        n = info["n"]
        dens = np.broadcast_to(np.asarray(info["params"].get("density", 1.0), np.float64), (n,))
        eps = np.broadcast_to(np.asarray(info["params"].get("epsilon", 0.15), np.float64), (n,))
        for i in range(n):
            if not 0 < dens[i] < 1:
                continue
            delta = t[f"{case}/xs"][i] - t[f"{case}/base"]
            p = arr(della_probabilities(jnp.asarray(delta), np.float32(dens[i]), np.float32(eps[i])))
            np.testing.assert_allclose(p, t[f"{case}/probs"][i], atol=1e-6, err_msg=f"{method}/{case} model {i}")
            checked += 1
    assert checked >= 8


def test_della_mask_and_checks():
    delta = jnp.asarray(np.random.default_rng(2).standard_normal((50, 40)).astype(np.float32))
    m = arr(della_mask(tensor_key(1, "w"), delta, 0.5, 0.2))
    small = np.abs(arr(delta)) < np.median(np.abs(arr(delta)), axis=1, keepdims=True)
    assert m[small].mean() < m[~small].mean()  # large magnitudes kept more often
    assert 0.45 < m.mean() < 0.55
    with pytest.raises(ValueError, match=r"model 0: density ± epsilon must lie in \(0, 1\), got density=0.1"):
        sp.sparsify(delta, 0.1, "della_magprune", epsilon=0.15, key=tensor_key(1, "w"))
    np.testing.assert_array_equal(arr(sp.sparsify(delta, 0.0, "della_magprune", key=tensor_key(1, "w"))), 0)
    np.testing.assert_array_equal(arr(sp.sparsify(delta, 1.0, "della_magprune", epsilon=0.5, key=tensor_key(1, "w"))),
                                  arr(delta))


def test_errors():
    with pytest.raises(ValueError, match="needs key= .* or mask="):
        sp.sparsify(jnp.ones(3), 0.5, "random")
    with pytest.raises(ValueError, match="unknown sparsification method 'topk'"):
        sp.sparsify(jnp.ones(3), 0.5, "topk")
    with pytest.raises(ValueError, match="parameter rescale must be"):
        sp.sparsify(jnp.ones(3), 0.5, "magnitude", rescale="l2")
    with pytest.raises(ValueError, match=r"mask has shape \(2,\) but the task vector has \(3,\)"):
        sp.sparsify(jnp.ones(3), 0.5, "random", mask=np.ones(2, bool))


@pytest.mark.slow  # CI time (~3 s); covered by test_traced_windows_match_reference (traced densities) and
# test_task_vectors' test_jit_with_traced_parameters_matches_eager (della's and DARE's sparsifiers under jit)
def test_jit_with_traced_density():
    delta = jnp.asarray(np.random.default_rng(3).standard_normal((6, 7)).astype(np.float32))
    for method in ("magnitude", "magnitude_outliers"):
        f = jax.jit(lambda x, d: sp.sparsify(x, d, method, gamma=0.1, rescale="l1"))
        np.testing.assert_allclose(arr(f(delta, jnp.float32(0.5))),
                                   arr(sp.sparsify(delta, 0.5, method, gamma=0.1, rescale="l1")), rtol=1e-6)
    f = jax.jit(lambda x, d, k: sp.sparsify(x, d, "della_magprune", epsilon=0.1, key=k))
    np.testing.assert_array_equal(arr(f(delta, jnp.float32(0.5), tensor_key(0, "a"))),
                                  arr(sp.sparsify(delta, 0.5, "della_magprune", epsilon=0.1, key=tensor_key(0, "a"))))


# ------------------------------------------------------------------ selection kernels vs a stable-argsort reference
def stable_window_ref(v, lo, hi):
    """Reference rank_window_mask: ranks from numpy's stable argsort of v.ravel() (-0.0 == 0.0 as in numpy)."""
    flat = v.reshape(-1)
    ranks = np.empty(flat.size, np.int64)
    ranks[np.argsort(flat, kind="stable")] = np.arange(flat.size)
    return ((ranks >= lo) & (ranks < hi)).reshape(v.shape)


def tied_values(rng, shape, kind):
    """Random float32 tensors with many ties: bf16-rounded normals over several scales (ties inside and across
    the 2^16-key radix buckets), or small integers with signed zeros."""
    if kind == "bf16":
        x = rng.standard_normal(shape) * 10.0 ** rng.integers(-4, 2, size=shape)
        return np.asarray(jnp.asarray(x, jnp.float32).astype(jnp.bfloat16).astype(jnp.float32))
    x = rng.integers(-3, 4, size=shape).astype(np.float32)
    x[rng.random(shape) < 0.2] = -0.0
    return x


# 300 and 4096: one block; (70, 130) = 9100: two full 4096-blocks and a short last one. 4096 is slow (CI time,
# ~3 s): covered by the full blocks of (70, 130) and the single block of 300
@pytest.mark.parametrize("shape", [(300,), pytest.param((4096,), marks=pytest.mark.slow), (70, 130)])
def test_window_kernels_match_stable_argsort(shape):
    rng = np.random.default_rng(sum(shape))
    n = int(np.prod(shape))
    cpu = jax.jit(lambda k, lo, hi: sp._window_radix(k, lo, hi))  # the CPU kernel (what rank_window_mask runs here)
    gpu = jax.jit(lambda k, lo, hi: sp._window_refine(k, lo, hi))  # the GPU kernel, run on CPU
    for trial in range(12):
        v = tied_values(rng, shape, ("bf16", "int")[trial % 2])
        lo, hi = sorted(rng.integers(0, n + 1, size=2).tolist())
        if trial == 0:
            lo, hi = 0, n
        expected = stable_window_ref(v, lo, hi)
        keys = sp._order_keys(jnp.asarray(v).reshape(-1))
        lo_, hi_ = jnp.int32(lo), jnp.int32(hi)
        msg = f"shape {shape}, trial {trial}, window [{lo}, {hi})"
        np.testing.assert_array_equal(arr(sp.rank_window_mask(jnp.asarray(v), lo, hi)), expected, err_msg=msg)
        np.testing.assert_array_equal(arr(cpu(keys, lo_, hi_)).reshape(shape), expected, err_msg=msg)
        np.testing.assert_array_equal(arr(gpu(keys, lo_, hi_)).reshape(shape), expected, err_msg=msg)



# n > 2^16: the GPU kernel's bracket comes from a sample. Three rows (float32 normals: wide brackets, many
# rounds; bf16 ties; small integers), vmapped (a batched while loop), a window per row; sigmas -1 puts every
# bracket off its rank, so each selection starts from the whole key range; splits: thresholds per round (the
# package's 7, and a bisection: slow, CI time ~3 s, the narrowing loop of (6.0, 7) with other constants).
@pytest.mark.parametrize("sigmas,splits", [(6.0, 7), (-1.0, 7), pytest.param(6.0, 1, marks=pytest.mark.slow)])
def test_gpu_window_from_sampled_brackets_matches_stable_argsort(monkeypatch, sigmas, splits):
    monkeypatch.setattr(sp, "_BRACKET_SIGMAS", sigmas)
    monkeypatch.setattr(sp, "_SPLITS", splits)
    rng = np.random.default_rng(5)
    n = 70_000
    vs = np.stack([rng.standard_normal(n).astype(np.float32), tied_values(rng, (n,), "bf16"),
                   tied_values(rng, (n,), "int")])
    keys = jax.vmap(sp._order_keys)(jnp.asarray(vs))
    for lo_is_zero in (False, True):
        kernel = jax.jit(jax.vmap(functools.partial(sp._window_refine, lo_is_zero=lo_is_zero)))
        windows = ([(0, 7_000), (0, n), (0, 1)] if lo_is_zero else
                   [(12_345, 60_001), (n - 1, n), (40_000, 40_000)])
        for shift in range(3):  # each row gets each window
            lo, hi = (np.asarray([windows[(i + shift) % 3][j] for i in range(3)], np.int32) for j in (0, 1))
            got = arr(kernel(keys, jnp.asarray(lo), jnp.asarray(hi)))
            for i in range(3):
                np.testing.assert_array_equal(got[i], stable_window_ref(vs[i], lo[i], hi[i]),
                                              err_msg=f"row {i}, window [{lo[i]}, {hi[i]}), lo_is_zero {lo_is_zero}")

def test_selects_match_sorted_keys():
    rng = np.random.default_rng(7)
    for kind in ("bf16", "int"):
        v = tied_values(rng, (9100,), kind)
        keys = sp._order_keys(jnp.asarray(v))
        ks = np.sort(arr(keys))
        radix, refine = jax.jit(sp._select_radix), jax.jit(sp._select_refine)
        for r in ([0, 9099], [17, 17], [4500, 8000], [9099, 0]):
            r = np.asarray(r, np.int32)
            for select in (radix, jax.jit(sp._select_sorted)):
                t, below = select(keys, jnp.asarray(r))
                np.testing.assert_array_equal(arr(t), ks[r])
                np.testing.assert_array_equal(arr(below), np.searchsorted(ks, ks[r], side="left"))
            t, below = refine(keys, jnp.asarray(r), jnp.zeros(2, bool))
            np.testing.assert_array_equal(arr(t), ks[r])
            np.testing.assert_array_equal(arr(below), np.searchsorted(ks, ks[r], side="left"))


@pytest.mark.parametrize("density", [0.001, 0.1, 0.37, 0.5, 0.9])
def test_magnitude_and_outliers_masks_match_reference(density):
    rng = np.random.default_rng(int(density * 1000))
    gammas = (0.0, 0.01, 0.2)
    for kind in ("bf16", "int"):
        delta = tied_values(rng, (70, 130), kind)
        n = delta.size
        a = np.abs(delta)
        k = max(1, int(density * n))  # mergekit: int(d·n) in double precision
        np.testing.assert_array_equal(arr(magnitude_mask(jnp.asarray(delta), np.float32(density))),
                                      stable_window_ref(-a, 0, k), err_msg=f"magnitude {kind} d={density}")
        for gamma in gammas:
            target, n_top = int(density * n), int(gamma * n)
            n_bot = max(0, n - target - n_top)
            got = arr(magnitude_outliers_mask(jnp.asarray(delta), np.float32(density), np.float32(gamma)))
            np.testing.assert_array_equal(got, stable_window_ref(a, n_bot, n_bot + target),
                                          err_msg=f"outliers {kind} d={density} g={gamma}")


def test_traced_windows_match_reference():
    # densities traced by jit: counts in float32 (trunc_count), the window itself exact
    rng = np.random.default_rng(11)
    delta = tied_values(rng, (70, 130), "bf16")
    n = delta.size
    f = jax.jit(lambda x, d: magnitude_mask(x, d))
    g = jax.jit(lambda x, d, gm: magnitude_outliers_mask(x, d, gm))
    for d, gm in ((0.3, 0.01), (0.75, 0.1)):
        k = max(1, int(np.trunc(np.float32(d) * np.float32(n))))
        np.testing.assert_array_equal(arr(f(jnp.asarray(delta), jnp.float32(d))),
                                      stable_window_ref(-np.abs(delta), 0, k))
        target, n_top = (int(np.trunc(np.float32(x) * np.float32(n))) for x in (d, gm))
        n_bot = max(0, n - target - n_top)
        np.testing.assert_array_equal(arr(g(jnp.asarray(delta), jnp.float32(d), jnp.float32(gm))),
                                      stable_window_ref(np.abs(delta), n_bot, n_bot + target))
