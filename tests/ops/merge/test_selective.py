"""nearswap, arcee_fusion, ram, ramplus_tl, passthrough: hand-computed values, invariants, mergekit goldens, jit."""
import functools

import jax
import numpy as np
import pytest

from configurable_fm.ops.merge import selective as s
from configurable_fm.ops.merge.keys import tensor_key
from configurable_fm.ops.merge.registry import METHODS, REQUIRED
from tests.ops.merge.goldens import golden_cases, kernel_and_golden

OURS = ["nearswap", "arcee_fusion", "ram", "ramplus_tl", "passthrough"]
f32 = functools.partial(np.asarray, dtype=np.float32)


def close(a, b, tol=1e-6):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b, np.float64), rtol=0, atol=tol)


def rand(seed, *shape):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


# ---------------------------------------------------------------------------------------------------- nearswap
def test_nearswap_hand():
    b = np.zeros(3, np.float32)
    x = f32([0.001, 0.5, -2.0])
    # w = clamp(0.01/|d|, 0, 1) = (1, 0.02, 0.005): y = w x
    close(s.nearswap(b, x[None], t=0.01), [0.001, 0.01, -0.01])
    close(s.nearswap(b, x[None], t=0.0), b)
    close(s.nearswap(b, x[None], t=5.0), x)


def test_nearswap_is_a_clipped_task_vector_and_identical():
    b, d = rand(0, 4, 5), rand(1, 4, 5)
    x = b + 0.1 * d
    close(s.nearswap(b, x[None], t=0.05), b + np.clip(x - b, -0.05, 0.05), 1e-6)
    close(s.nearswap(b, b[None], t=0.3), b)  # |b - x| = 0 -> w = 1, y = x = b


# ------------------------------------------------------------------------------------------------ arcee_fusion
def test_quantile_indices():
    assert s._quantile_indices(8).tolist() == [1, 3, 5]  # int(q (n-1)), no interpolation
    assert s._quantile_indices(5).tolist() == [1, 2, 3]
    assert s._quantile_indices(1).tolist() == [0, 0, 0]
    assert s._quantile_indices(10).tolist() == [2, 4, 6]


def test_arcee_fusion_hand():
    """One row: KL is one number, so the mask is |d| >= median + 1.5 IQR of |d| (sorted[1], [3], [5] of 8)."""
    b = np.zeros((1, 8), np.float32)
    x = f32([[1, -2, 3, 4, -5, 6, 7, -30]])
    # |d| sorted 1 2 3 4 5 6 7 30: q1 = 2, median = 4, q3 = 6, threshold = 4 + 1.5 * 4 = 10 (times KL)
    close(s.arcee_fusion(b, x[None]), [[0, 0, 0, 0, 0, 0, 0, -30]], 0)
    p = np.exp(x[0]) / np.exp(x[0]).sum() + 1e-8
    kl = np.sum(p * np.log(p / (1 / 8 + 1e-8)))
    close(s.arcee_importance(b, x), np.abs(x) * kl, 1e-5 * kl)


def test_arcee_fusion_rows_and_zero_threshold():
    # row 1 moves uniformly: softmax(x) = softmax(b), KL = 0, importance 0 although |d| = 2
    b = np.zeros((2, 4), np.float32)
    x = f32([[1, 2, 3, 40], [2, 2, 2, 2]])
    imp = np.asarray(s.arcee_importance(b, x))
    assert (imp[1] == 0).all() and (imp[0] > 0).all()
    # 8 scores, 4 of them 0: q1 = sorted[1] = 0, median = sorted[3] = 0, q3 = sorted[5]
    srt = np.sort(imp.ravel())
    thr = 0 + 1.5 * (srt[5] - 0)
    want = np.where(imp >= thr, x, 0)
    close(s.arcee_fusion(b, x[None]), want, 0)
    assert np.asarray(s.arcee_fusion(b, x[None]))[0, 3] == 40 and (np.asarray(s.arcee_fusion(b, x[None]))[1] == 0).all()
    # most scores 0 -> threshold 0 -> every entry passes (imp >= 0): mergekit keeps the whole model
    x2 = f32([[0, 0, 0, 5], [0, 0, 0, 0]])
    close(s.arcee_fusion(b, x2[None]), x2, 0)


def test_arcee_fusion_identical_and_1d():
    b = rand(2, 16)
    close(s.arcee_fusion(b, b[None]), b, 0)
    x = b.copy()
    x[3] += 5.0
    y = np.asarray(s.arcee_fusion(b, x[None]))
    close(y, x, 0)  # only entry 3 changed: 15 scores 0, threshold 0, all kept (b + 0 = b elsewhere)


def test_arcee_fusion_subsample_needs_key_and_is_reproducible():
    b, x = rand(3, 8, 8), rand(4, 8, 8)
    msg = r"arcee_fusion: a tensor of 64 elements \(> sample_size=10\) needs a PRNG key"
    with pytest.raises(ValueError, match=msg):
        s.arcee_fusion(b, x[None], sample_size=10)
    k = tensor_key(0, "layers.0.mlp.up_proj.kernel")
    y1 = s.arcee_fusion(b, x[None], key=k, sample_size=10)
    y2 = s.arcee_fusion(b, x[None], key=tensor_key(0, "layers.0.mlp.up_proj.kernel"), sample_size=10)
    close(y1, y2, 0)
    ys = {np.asarray(s.arcee_fusion(b, x[None], key=tensor_key(0, f"p{i}"), sample_size=10)).tobytes()
          for i in range(8)}
    assert len(ys) > 1  # the subsample (hence the threshold) depends on the key
    exact = s.arcee_fusion(b, x[None])  # n <= 10^6: no subsample, the key is not used
    close(exact, s.arcee_fusion(b, x[None], key=k), 0)


# -------------------------------------------------------------------------------------------- ram, ramplus_tl
def test_ram_hand():
    b = np.zeros(4, np.float32)
    xs = f32([[1, 0, 2, 0], [0, 0, 4, 3]])
    # counts (1, 0, 2, 1): unique entries summed, shared entries averaged
    close(s.ram(b, xs), [1, 0, 3, 3])
    close(s.ram(b, xs, epsilon=1.5), [0, 0, 3, 3])  # |tau| <= eps: unchanged (entry 0), entry 2 shared still
    close(s.ram(b, xs, epsilon=2.5), [0, 0, 4, 3])  # now entry 2 has one contributor: taken whole
    close(s.ram(b, xs[:1]), xs[0])  # one model: y = x (changes above eps)
    close(s.ram(b, np.zeros((0, 4), np.float32)), b)


def test_ramplus_tl_hand():
    b = np.zeros(4, np.float32)
    xs = f32([[1, 0, 2, 0], [0, 0, 4, 3]])
    # model 1: shared 1, unique 1 -> rho 1 -> lambda = 1 + 0.1 min(1, 0.2) = 1.02; model 2 the same
    close(s.ramplus_tl(b, xs), [1.02, 0, 3, 3.06])
    close(s.ramplus_tl(b, xs, r=0.5, alpha=2.0), [1.5, 0, 3, 4.5])
    # a model without unique entries: rho = shared / eps (clamped to alpha), but it has nothing to scale
    xs2 = f32([[1, 0, 2, 0], [1, 0, 4, 0], [0, 5, 0, 0]])
    close(s.ramplus_tl(b, xs2), [1, 5, 3, 0])  # model 3: shared 0, unique 1 -> rho 0 -> lambda 1
    close(s.ramplus_tl(b, xs2, r=0.0), s.ram(b, xs2))  # r = 0 is plain RAM


def test_ram_invariants():
    b, d = rand(5, 3, 4), rand(6, 3, 4)
    close(s.ram(b, np.stack([b, b])), b)
    close(s.ram(b, np.stack([b + d, b + d, b + d])), b + d, 1e-6)  # all shared: their average
    close(s.ramplus_tl(b, np.stack([b + d, b + d])), b + d, 1e-6)


# ------------------------------------------------------------------------------------------------- passthrough
def test_passthrough():
    x = rand(7, 3, 4)
    close(s.passthrough(None, x[None]), x, 0)
    close(s.passthrough(None, x[None], scale=f32([0.5])), 0.5 * x, 0)
    close(s.passthrough(None, x[None], scale=0.0), np.zeros_like(x), 0)
    with pytest.raises(ValueError, match="passthrough: parameter 'scale' must be one value"):
        s.passthrough(None, x[None], scale=f32([1, 2]))
    with pytest.raises(ValueError, match="passthrough: needs exactly 1 non-base"):
        s.passthrough(None, np.stack([x, x]))


def test_errors_name_the_method():
    with pytest.raises(ValueError, match="nearswap: needs a base"):
        s.nearswap(None, np.zeros((1, 3), np.float32), t=0.1)
    with pytest.raises(ValueError, match="arcee_fusion: needs exactly 1 non-base"):
        s.arcee_fusion(np.zeros(3, np.float32), np.zeros((2, 3), np.float32))
    with pytest.raises(ValueError, match=r"ram: base has shape \(3,\) but the inputs have \(4,\)"):
        s.ram(np.zeros(3, np.float32), np.zeros((2, 4), np.float32))


def test_registered_contracts():
    want = {  # mergekit 0.1.5 (merging.md 1.2), counts of non-base inputs
        "nearswap": ("required", 1, 1, {}, {"t": REQUIRED}, False),
        "arcee_fusion": ("required", 1, 1, {}, {}, True),
        "ram": ("required", 0, None, {}, {"epsilon": 1e-5}, False),
        "ramplus_tl": ("required", 0, None, {}, {"r": 0.1, "alpha": 0.2, "epsilon": 1e-5}, False),
        "passthrough": ("ignored", 1, 1, {"scale": None}, {}, False),
    }
    for name, (base, lo, hi, per_model, shared, randomized) in want.items():
        m = METHODS[name]
        got = (m.base, m.min_inputs, m.max_inputs, dict(m.per_model), dict(m.shared), m.randomized)
        assert got == (base, lo, hi, per_model, shared, randomized), name
        assert m.doc


# ------------------------------------------------------------------------------------------------------ goldens
# Cases whose setting runs in CI on another shape: slow (CI time, the eager kernels compile per shape). nearswap
# and passthrough are elementwise, ram and ramplus_tl flatten the task vectors (their 2-D cases stay);
# arcee_fusion's importance is per row: its 1-, 2- (16x8) and 3-D shapes stay.
SHAPE_REPEATS = {
    "nearswap": {f"{d}_t{t}" for d in ("1d", "3d") for t in ("0.0", "0.01", "0.05", "1.0")},
    "passthrough": {f"{d}_{s}" for d in ("1d", "3d") for s in ("noscale", "scale", "scale0")},
    "ram": {f"{s}_{d}" for s in ("eps", "n1", "n2", "n3") for d in ("1d", "3d")},
    "ramplus_tl": {f"{s}_{d}" for s in ("eps", "n1", "n2", "n3", "r_alpha") for d in ("1d", "3d")},
    "arcee_fusion": {f"{shape}_scale{s}" for shape in ("3x50", "6x32") for s in ("0.05", "0.5")},
}


@pytest.mark.parametrize("method, case", golden_cases(OURS, SHAPE_REPEATS, 5))
def test_golden_mergekit(method, case):
    """Each case of the method vs mergekit 0.1.5, max |diff| <= 1e-5. The arcee_fusion inputs were drawn so that
    no importance score lies within a relative 1e-3 of the threshold (see scripts/mergekit_goldens.py)."""
    y, want = kernel_and_golden(method, case)
    assert y.shape == want.shape and y.dtype == np.float32, case
    assert np.max(np.abs(y - want), initial=0.0) <= 1e-5, (case, np.max(np.abs(y - want)))


# ---------------------------------------------------------------------------------------------------------- jit
def test_jit_matches_eager():
    b, x1, x2 = rand(10, 4, 6), rand(11, 4, 6), rand(12, 4, 6)
    xs = np.stack([x1, x2])
    key = tensor_key(1, "w")
    calls = [
        (s.nearswap, b, xs[:1], dict(t=f32(0.2)), {}),
        (s.arcee_fusion, b, xs[:1], {}, {}),
        (s.arcee_fusion, b, xs[:1], dict(key=key), dict(sample_size=7)),
        (s.ram, b, xs, dict(epsilon=f32(0.5)), {}),
        (s.ramplus_tl, b, xs, dict(r=f32(0.3), alpha=f32(0.5), epsilon=f32(0.5)), {}),
        (s.passthrough, None, xs[:1], dict(scale=f32([0.25])), {}),
    ]
    for fn, base, x, traced, static in calls:
        eager = fn(base, x, **traced, **static)
        jitted = jax.jit(lambda base, x, tr, fn=fn, st=static: fn(base, x, **tr, **st))(base, x, traced)
        close(jitted, eager, 1e-6)
