"""linear, slerp, nuslerp, multislerp, karcher, model_stock: hand-computed values, invariants, mergekit goldens, jit."""
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configurable_fm.ops.merge import geometric as g
from configurable_fm.ops.merge.registry import METHODS, REQUIRED
from tests.ops.merge.goldens import golden_cases, kernel_and_golden

OURS = ["linear", "slerp", "nuslerp", "multislerp", "karcher", "model_stock"]
f32 = functools.partial(np.asarray, dtype=np.float32)


def close(a, b, tol=1e-6):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b, np.float64), rtol=0, atol=tol)


def rand(seed, *shape):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def slerp_ref(v0, v1, t):
    """Textbook slerp of two vectors (float64), for the hand-computed expectations."""
    v0, v1 = np.asarray(v0, np.float64), np.asarray(v1, np.float64)
    c = np.dot(v0, v1) / (np.linalg.norm(v0) * np.linalg.norm(v1))
    th = math.acos(np.clip(c, -1, 1))
    return (math.sin((1 - t) * th) * v0 + math.sin(t * th) * v1) / math.sin(th)


# ------------------------------------------------------------------------------------------------------ linear
def test_linear_hand():
    xs = f32([[1, 2], [3, 4]])
    close(g.linear(None, xs, weight=f32([1, 3])), [2.5, 3.5])
    close(g.linear(None, xs, weight=f32([1, 3]), normalize=False), [10, 14])
    close(g.linear(None, xs, weight=f32([2, -1])), [-1, 0])  # Σw = 1: extrapolation


def test_linear_self_and_dtype():
    x = rand(0, 3, 4)
    y = g.linear(None, np.stack([x, x, x]), weight=f32([0.2, 0.3, 0.5]))
    close(y, x, 1e-6)
    yb = g.linear(None, jnp.asarray(np.stack([x, x]), jnp.bfloat16), weight=f32([1, 1]))
    assert yb.dtype == jnp.float32
    close(yb, x.astype(jnp.bfloat16).astype(np.float32), 0)


def test_linear_errors():
    with pytest.raises(ValueError, match="linear: parameter 'weight' must have one value per model"):
        g.linear(None, np.zeros((2, 3), np.float32), weight=f32([1, 2, 3]))
    with pytest.raises(ValueError, match="linear: needs at least 1 non-base"):
        g.linear(None, np.zeros((0, 3), np.float32), weight=f32([]))


# ------------------------------------------------------------------------------------------------------- slerp
def test_slerp_endpoints_and_identical():
    b, x = rand(1, 4, 5), rand(2, 4, 5)
    close(g.slerp(b, x[None], t=0.0), b)
    close(g.slerp(b, x[None], t=1.0), x, 2e-6)
    close(g.slerp(b, b[None], t=0.3), b)


def test_slerp_hand():
    e1, e2 = f32([1, 0]), f32([0, 1])
    s = math.sin(math.pi / 4)
    close(g.slerp(e1, e2[None], t=0.5), [s, s])
    # norms are kept as they are (un-normalised tensors): |v0| = 2, |v1| = 1 at 90 degrees
    t = 0.25
    close(g.slerp(2 * e1, e2[None], t=t), [2 * math.cos(t * math.pi / 2), math.sin(t * math.pi / 2)])
    # 60 degrees between unit vectors
    v1 = f32([0.5, math.sqrt(3) / 2])
    close(g.slerp(e1, v1[None], t=0.3), slerp_ref(e1, v1, 0.3))


def test_slerp_colinear_antipodal_zero_threshold():
    b = f32([1, 2, 2])
    close(g.slerp(b, (2 * b)[None], t=0.25), 0.75 * b + 0.25 * 2 * b)  # colinear: lerp
    close(g.slerp(b, (-2 * b)[None], t=0.5), 0.5 * b - b)  # antipodal: lerp
    # zero base: its norm counts as 1, dot = 0, theta = pi/2: y = sin(t pi/2) x (mergekit quirk, not t x)
    q = math.sin(math.pi / 4)
    close(g.slerp(np.zeros(2, np.float32), f32([[3, 4]]), t=0.5), [3 * q, 4 * q])
    close(g.slerp(np.zeros(3, np.float32), np.zeros((1, 3), np.float32), t=0.5), [0, 0, 0])
    # the 0.9995 threshold: cos 0.9996 -> lerp, cos 0.999 -> slerp
    for c, lerp in ((0.9996, True), (0.999, False)):
        v1 = f32([c, math.sqrt(1 - c * c)])
        want = 0.6 * f32([1, 0]) + 0.4 * v1 if lerp else slerp_ref([1, 0], v1, 0.4)
        close(g.slerp(f32([1, 0]), v1[None], t=0.4), want, 1e-6)
    # the two branches differ measurably near the threshold only beyond 1e-7; check the slerp branch is taken
    v1 = f32([0.999, math.sqrt(1 - 0.999**2)]) * 100
    assert abs(float(g.slerp(f32([1, 0]) * 100, v1[None], t=0.5)[0]) - float((100 + v1[0]) / 2)) > 1e-3


def test_slerp_errors():
    with pytest.raises(ValueError, match="slerp: needs exactly 1 non-base"):
        g.slerp(np.zeros(3, np.float32), np.zeros((2, 3), np.float32), t=0.5)
    with pytest.raises(ValueError, match="slerp: needs a base"):
        g.slerp(None, np.zeros((1, 3), np.float32), t=0.5)
    with pytest.raises(ValueError, match=r"slerp: base has shape \(4,\) but the inputs have \(3,\)"):
        g.slerp(np.zeros(4, np.float32), np.zeros((1, 3), np.float32), t=0.5)


# ----------------------------------------------------------------------------------------------------- nuslerp
def test_nuslerp_t_from_weights():
    e = f32([[1, 0], [0, 1]])
    t = 0.75
    close(g.nuslerp(None, e, weight=f32([1, 3])), [math.sin((1 - t) * math.pi / 2), math.sin(t * math.pi / 2)])
    s = math.sin(math.pi / 4)
    close(g.nuslerp(None, e, weight=f32([1, -1])), [s, s])  # |Σw| < 1e-6 -> t = 0.5
    x1, x2, b = rand(3, 3, 4), rand(4, 3, 4), rand(5, 3, 4)
    close(g.nuslerp(b, np.stack([x1, x2]), weight=f32([1, 0])), x1, 1e-6)  # t = 0
    close(g.nuslerp(b, np.stack([x1, x2]), weight=f32([0, 5])), x2, 2e-6)  # t = 1
    close(g.nuslerp(None, np.stack([x1, x1]), weight=f32([1, 2])), x1, 1e-6)  # identical


def test_nuslerp_base_subtraction():
    b, x1, x2 = rand(6, 8), rand(7, 8), rand(8, 8)
    want = b + slerp_ref(x1 - b, x2 - b, 0.25)
    close(g.nuslerp(b, np.stack([x1, x2]), weight=f32([3, 1])), want, 2e-6)


def test_nuslerp_layouts():
    """flatten (one vector), rows W[i, :] (row_wise=False) and columns W[:, j] (row_wise=True), as in the code."""
    v0 = f32([[1, 0], [1, 0]])
    v1 = f32([[1, 0], [0, 1]])
    xs, w, t = np.stack([v0, v1]), f32([1, 1]), 0.5
    close(g.nuslerp(None, xs, weight=w), slerp_ref(v0.ravel(), v1.ravel(), t).reshape(2, 2))
    rows = np.stack([[1, 0], slerp_ref(v0[1], v1[1], t)])  # row 0 colinear: lerp
    close(g.nuslerp(None, xs, weight=w, nuslerp_flatten=False), rows)
    # columns: col 0 (1,1) vs (1,0) at 45 degrees; col 1 (0,0) vs (0,1): a zero vector gives theta = pi/2
    cols = np.stack([slerp_ref(v0[:, 0], v1[:, 0], t), [0, math.sin(t * math.pi / 2)]], axis=1)
    close(g.nuslerp(None, xs, weight=w, nuslerp_flatten=False, nuslerp_row_wise=True), cols)
    # row_wise is ignored when flattening
    close(g.nuslerp(None, xs, weight=w, nuslerp_row_wise=True), g.nuslerp(None, xs, weight=w))


def test_nuslerp_colinear_antipodal():
    e = np.full(4, 0.5, np.float32)  # unit norm exactly: cos is exactly +-1
    close(g.nuslerp(None, np.stack([e, 3 * e]), weight=f32([1, 1])), 2 * e)
    close(g.nuslerp(None, np.stack([e, -e]), weight=f32([1, 3])), 0.25 * e - 0.75 * e)


def test_nuslerp_errors():
    with pytest.raises(ValueError, match="nuslerp: needs exactly 2 non-base"):
        g.nuslerp(None, np.zeros((3, 2), np.float32), weight=f32([1, 1, 1]))
    with pytest.raises(ValueError, match="nuslerp: parameter 'weight' is required"):
        g.nuslerp(None, np.zeros((2, 2), np.float32), weight=None)


# -------------------------------------------------------------------------------------------------- multislerp
def test_multislerp_hand():
    e = f32([[1, 0], [0, 1]])
    s = 1 / math.sqrt(2)
    close(g.multislerp(None, e, weight=f32([1, 1])), [s, s])  # symmetric: the mean direction, norm 1
    # weights (1, 3): one tangent step from m = normalised (0.25, 0.75), not the exact slerp
    w = np.array([0.25, 0.75])
    m = w / np.linalg.norm(w)
    tan = sum(wi * (ei - np.dot(ei, m) * m) for wi, ei in zip(w, np.eye(2)))
    n = np.linalg.norm(tan)
    want = m * math.cos(n) + tan * math.sin(n) / n
    close(g.multislerp(None, e * 2, weight=f32([1, 3])), 2 * want, 1e-6)
    b = f32([1, 1])
    close(g.multislerp(b, b + e * 2, weight=f32([1, 3])), b + 2 * want, 1e-6)


def test_multislerp_special_cases():
    x, b = rand(9, 3, 4), rand(10, 3, 4)
    close(g.multislerp(b, x[None], weight=f32([0.3])), x, 0)  # one model: returned as it is
    close(g.multislerp(b, np.stack([x, x, x]), weight=f32([1, 2, 3])), x, 2e-6)  # identical models
    # two antipodal task vectors with balanced weights: lerp fallback, = base
    b, d = np.round(b * 8) / 8, np.round(rand(11, 3, 4) * 4) / 4  # dyadic: x - b is exactly +-d
    close(g.multislerp(b, f32(np.stack([b + d, b - d])), weight=f32([1, 1])), b, 1e-6)
    # three: mergekit raises; eager raises, jit gives NaN
    e = f32([[1, 0], [-1, 0], [0, 0]])
    with pytest.raises(ValueError, match="multislerp: the weighted sum of the unit input tensors is zero"):
        g.multislerp(None, e, weight=f32([1, 1, 1]))
    assert np.isnan(np.asarray(jax.jit(lambda xs: g.multislerp(None, xs, weight=f32([1, 1, 1])))(e))).all()


# ----------------------------------------------------------------------------------------------------- karcher
def test_karcher_hand():
    e1, e2 = f32([1, 0]), f32([0, 1])
    s = 1 / math.sqrt(2)
    close(g.karcher(None, np.stack([e1, e2])), [s, s])
    close(g.karcher(None, np.stack([e1, 3 * e2])), [2 * s, 2 * s])  # scale = mean norm
    ang = np.deg2rad([0, 60, 120])
    close(g.karcher(None, f32(np.stack([np.cos(ang), np.sin(ang)], 1))), [0.5, math.sqrt(3) / 2], 1e-6)


def test_karcher_iterates_to_the_riemannian_mean():
    """Two copies of e1 and one e2: the Euclidean start is atan(1/2) = 26.57 degrees; the Karcher mean
    minimises 2 phi^2 + (90 - phi)^2, phi = 30 degrees."""
    xs = f32([[1, 0], [1, 0], [0, 1]])
    start = math.atan(0.5)
    close(g.karcher(None, xs, max_iter=0), [math.cos(start), math.sin(start)], 1e-6)
    close(g.karcher(None, xs, max_iter=50, tol=1e-7), [math.cos(math.pi / 6), math.sin(math.pi / 6)], 1e-5)
    one = g.karcher(None, xs, max_iter=1)
    assert math.atan2(one[1], one[0]) > start + 0.01


def test_karcher_zero_identical_single():
    e1, e2 = f32([2, 0]), f32([0, 2])
    z = np.zeros(2, np.float32)
    s = 1 / math.sqrt(2)
    close(g.karcher(None, np.stack([e1, z, e2])), [4 / 3 * s, 4 / 3 * s])  # zero input: no direction, counts in scale
    close(g.karcher(None, np.zeros((3, 4), np.float32)), np.zeros(4))
    x = rand(12, 4, 3)
    close(g.karcher(None, np.stack([x, x, x])), x, 2e-6)
    close(g.karcher(None, x[None]), x, 0)


# ------------------------------------------------------------------------------------------------- model_stock
def test_model_stock_hand():
    b = np.zeros(2, np.float32)
    xs = f32([[1, 0], [1, 1]])
    c = 1 / math.sqrt(2)
    t = 2 * c / (1 + c)
    close(g.model_stock(b, xs), t * f32([1, 0.5]))
    close(g.model_stock(b, f32([[1, 0], [0, 1]])), [0, 0])  # orthogonal: t = 0
    # three models (1,0), (0,1), (1,1): cos = mean of the pairwise cosines (0, 1/sqrt2, 1/sqrt2)
    xs3 = f32([[1, 0], [0, 1], [1, 1]])
    c3 = (0 + c + c) / 3
    t3 = 3 * c3 / (1 + 2 * c3)
    close(g.model_stock(b, xs3), t3 * xs3.mean(0))


def test_model_stock_guards_and_identical():
    b, d = rand(13, 3, 4), rand(14, 3, 4)
    close(g.model_stock(b, np.stack([b + d, b - d])), b)  # cos = -1: 1 + cos = 0 -> t = 0
    close(g.model_stock(b, np.stack([b + d, b + d])), b + d, 1e-6)  # cos = 1 -> t = 1
    close(g.model_stock(b, np.stack([b, b])), b)  # zero offsets: cos = 0 -> t = 0


def test_model_stock_filter_wise():
    b = np.zeros((2, 2), np.float32)
    xs = f32([[[1, 0], [1, 0]], [[1, 0], [0, 1]]])  # row 0 identical offsets (t=1), row 1 orthogonal (t=0)
    close(g.model_stock(b, xs, filter_wise=True), [[1, 0], [0, 0]])
    c = 0.5  # flattened offsets (1,0,1,0), (1,0,0,1): cos = 1 / (sqrt2 sqrt2)
    close(g.model_stock(b, xs), (2 * c / (1 + c)) * xs.mean(0))
    v = rand(15, 6)
    vs = np.stack([v + rand(16, 6), v + rand(17, 6)])
    close(g.model_stock(v, vs, filter_wise=True), g.model_stock(v, vs))  # 1-D: one row either way


def test_model_stock_errors():
    with pytest.raises(ValueError, match="model_stock: needs at least 2 non-base"):
        g.model_stock(np.zeros(2, np.float32), np.zeros((1, 2), np.float32))


# ------------------------------------------------------------------------------------------------ registration
def test_registered_contracts():
    want = {  # mergekit 0.1.5 (merging.md 1.2), counts of non-base inputs
        "linear": ("ignored", 1, None, {"weight": REQUIRED}, {"normalize": True}),
        "slerp": ("required", 1, 1, {}, {"t": REQUIRED}),
        "nuslerp": ("optional", 2, 2, {"weight": REQUIRED}, {"nuslerp_row_wise": False, "nuslerp_flatten": True}),
        "multislerp": ("optional", 1, None, {"weight": REQUIRED}, {"normalize_weights": True, "eps": 1e-8}),
        "karcher": ("ignored", 1, None, {}, {"max_iter": 10, "tol": 1e-5}),
        "model_stock": ("required", 2, None, {}, {"filter_wise": False}),
    }
    for name, (base, lo, hi, per_model, shared) in want.items():
        m = METHODS[name]
        assert (m.base, m.min_inputs, m.max_inputs, dict(m.per_model), dict(m.shared)) == (base, lo, hi, per_model,
                                                                                              shared), name
        assert not m.randomized and m.doc


# ------------------------------------------------------------------------------------------------------ goldens
# Cases whose setting runs in CI on another shape: slow (CI time, the eager kernels compile per shape). linear
# (elementwise), slerp, multislerp, karcher and model_stock without filter_wise flatten the tensor; nuslerp's rows
# and columns (flatten off) keep their 1-, 2- and 3-D cases with a base, its flattened ones one shape each;
# model_stock's filter_wise keeps a 1-D, a 2-D and a 3-D case.
SHAPE_REPEATS = {
    "linear": {"no_normalize_1d", "no_normalize_3d", "three_1d", "three_3d", "weights_sum_2.5_1d",
               "weights_sum_2.5_3d"},
    "slerp": {f"random_{d}_t{t}" for d in ("1d", "3d") for t in ("0.0", "0.3", "0.5", "1.0")},
    "nuslerp": {"base_1d_flat1_row0", "base_3d_flat1_row0", "nobase_3d_flat1_row0", "nobase_3d_flat0_row0",
                "nobase_3d_flat0_row1"},
    "multislerp": {f"{s}_{d}" for s in ("base_three", "nobase_three", "nobase_two") for d in ("1d", "3d")},
    "karcher": {"n2_2d", "n3_1d", "n3_2d"},
    "model_stock": ({f"n{n}_{d}" for n in (2, 3) for d in ("1d", "2d", "3d")}
                    | {"n2_3d_filter_wise", "n3_1d_filter_wise", "n3_2d_filter_wise"}),
}


@pytest.mark.parametrize("method, case", golden_cases(OURS, SHAPE_REPEATS, 10))
def test_golden_mergekit(method, case):
    """Each case of the method vs mergekit 0.1.5 (scripts/mergekit_goldens.py), max |diff| <= 1e-5 in float32."""
    y, want = kernel_and_golden(method, case)
    assert y.shape == want.shape and y.dtype == np.float32, case
    assert np.max(np.abs(y - want), initial=0.0) <= 1e-5, (case, np.max(np.abs(y - want)))


# ---------------------------------------------------------------------------------------------------------- jit
def test_jit_matches_eager():
    b, x1, x2, x3 = (rand(20 + i, 4, 6) for i in range(4))
    xs = np.stack([x1, x2, x3])
    w = f32([0.2, 0.5, 0.3])
    calls = [
        (g.linear, None, xs, dict(weight=w), dict(normalize=True)),
        (g.slerp, b, xs[:1], dict(t=f32(0.3)), {}),
        (g.nuslerp, b, xs[:2], dict(weight=w[:2]), dict(nuslerp_flatten=False, nuslerp_row_wise=True)),
        (g.multislerp, b, xs, dict(weight=w), dict(normalize_weights=True)),
        (g.karcher, None, xs, dict(tol=f32(1e-5)), dict(max_iter=10)),
        (g.model_stock, b, xs, {}, dict(filter_wise=True)),
    ]
    for fn, base, x, traced, static in calls:
        eager = fn(base, x, key=None, **traced, **static)
        jitted = jax.jit(lambda base, x, tr, fn=fn, st=static: fn(base, x, key=None, **tr, **st))(base, x, traced)
        close(jitted, eager, 1e-6)
    # vmap over stacked layers (slerp with one t per layer, as a depth gradient gives)
    bl, xl = rand(30, 3, 5), rand(31, 3, 1, 5)
    ts = f32([0.0, 0.5, 1.0])
    y = jax.vmap(lambda b, x, t: g.slerp(b, x, t=t))(bl, xl, ts)
    close(y[0], bl[0])
    close(y[2], xl[2, 0], 2e-6)
