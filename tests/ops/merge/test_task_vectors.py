"""Task-vector merges (task arithmetic, TIES, DARE, Breadcrumbs, DELLA, SCE): hand-computed expectations on
2 models x 5 entries, invariants, goldens from mergekit 0.1.5 (scripts/mergekit_goldens.py), jit, errors."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configurable_fm.ops.merge import (
    METHODS,
    REQUIRED,
    breadcrumbs,
    breadcrumbs_ties,
    dare_linear,
    dare_ties,
    della,
    della_linear,
    generalized_task_arithmetic,
    sce,
    task_arithmetic,
    tensor_key,
    ties,
)
from tests.ops.merge.goldens import golden, golden_cases

NAMES = ["task_arithmetic", "ties", "dare_linear", "dare_ties", "breadcrumbs", "breadcrumbs_ties", "della",
         "della_linear", "sce"]
RANDOM = {"dare_linear", "dare_ties", "della", "della_linear"}

# 2 models x 5 entries, dyadic so that every expectation below is exact arithmetic
B = np.array([0.5, -1.0, 0.0, 2.0, 1.0], np.float32)
T1 = np.array([1.0, -2.0, 3.0, 0.0, 0.5], np.float32)  # a zero entry
T2 = np.array([-1.0, 1.0, 1.0, 2.0, -0.5], np.float32)  # three tied magnitudes
XS = np.stack([B + T1, B + T2])
MASKS = np.array([[1, 0, 1, 0, 1], [0, 1, 1, 1, 0]], bool)
L1 = np.array([1, 0, 3, 0, 0.5]) * 6.5 / 4.5 + np.array([0, 1, 1, 2, 0]) * 5.5 / 4  # masked, L1-rescaled sum


def close(y, expected, tol=1e-6):
    np.testing.assert_allclose(np.asarray(y), np.asarray(expected, np.float32), rtol=tol, atol=tol)


# ------------------------------------------------------------------------------------------------ hand-computed


def test_task_arithmetic_hand():
    close(task_arithmetic(B, XS, weight=[1.0, 0.5]), B + [0.5, -1.5, 3.5, 1.0, 0.25])
    close(task_arithmetic(B, XS, weight=[1.0, 0.5], normalize=True), B + np.array([0.5, -1.5, 3.5, 1, 0.25]) / 1.5)
    close(task_arithmetic(B, XS, weight=[1.0, 0.5], **{"lambda": 2.0}), B + [1.0, -3.0, 7.0, 2.0, 0.5])
    close(task_arithmetic(B, XS, weight=[1.0, 0.5], lambda_=2.0), B + [1.0, -3.0, 7.0, 2.0, 0.5])
    # weights summing to 0 with normalize: |Σw| < 1e-8 -> divisor 1
    close(task_arithmetic(B, XS, weight=[1.0, -1.0], normalize=True), B + T1 - T2)
    close(task_arithmetic(B, XS, weight=[1.0, 1.0], normalize=True, divisor="count"), B + (T1 + T2) / 2)
    # density is accepted and ignored (no sparsifier), as in mergekit
    close(task_arithmetic(B, XS, weight=[1.0, 0.5], density=0.2), B + [0.5, -1.5, 3.5, 1.0, 0.25])


def test_ties_hand():
    # k = 3: T1 keeps 3, -2, 1; T2 keeps 2 then the tied 1s at indices 0, 1 (lower index first)
    # sum [0, -1, 3, 2, 0] -> signs [+, -, +, +, +]; agreeing: T1 at 0, 1, 2; T2 at 3
    close(ties(B, XS, weight=[1.0, 1.0], density=0.6), B + [1, -2, 3, 2, 0])
    close(ties(B, XS, weight=[1.0, 1.0], density=0.0), B)
    # density 1, no trim: signs of T1 + T2 = [0, -1, 4, 2, 0] -> [+, -, +, +, +]
    close(ties(B, XS, weight=[1.0, 1.0], density=1.0), B + [1, -2, 2, 2, 0.5])
    close(ties(B, XS, weight=[1.0, 1.0], density=1.0, normalize=False), B + [1, -2, 4, 2, 0.5])


E1 = np.array([1, 1, -1, 2, 0], np.float32)
E2 = np.array([1, -1, -1, 1, 3], np.float32)


@pytest.mark.parametrize(
    "election, divisor, expected",
    [
        # D = w δ = [1,1,-1,2,0], [-2,2,2,-2,-6]; ΣD = [-1,3,1,0,-6]; M1 = [F,T,F,T,F], M2 = [T,T,T,F,T]
        ("weighted_sum", "weights", [1, -3, -1, 2, 3]),  # mixed [-2,3,2,2,-6] / Σ M w [-2,-1,-2,1,-2]
        ("weighted_sum", "count", [-2, 1.5, 2, 2, -6]),  # / Σ M [1,2,1,1,1]
        # Σδ = [2,0,-2,3,3]: M1 = [T,T,T,T,F], M2 = [T,F,T,T,T]; mixed [-1,1,1,0,-6]
        ("sum", "weights", [1, 1, -1, 0, 3]),  # / [-1,1,-1,-1,-2]
        ("sum", "count", [-0.5, 1, 0.5, 0, -6]),  # / [2,1,2,2,1]
        # Σ sign(D) = [0,2,0,0,-1]: M1 = [T,T,F,T,F], M2 = [F,T,T,F,T]; mixed [1,3,2,2,-6] / [1,-1,-2,1,-2]
        ("weighted_count", "weights", [1, -3, -1, 2, 3]),
        ("count", "weights", [1, 1, -1, 0, 3]),
    ],
)
def test_election_and_divisor_options(election, divisor, expected):
    xs = np.stack([E1, E2])
    y = ties(np.zeros(5, np.float32), xs, weight=[1.0, -2.0], density=1.0, election=election, divisor=divisor)
    close(y, expected)


def test_count_election_differs_from_sum():
    # δ = [3, -1, -1]: Σδ = 1 > 0 elects +, Σ sign = -1 elects -
    xs = np.array([[3.0, -3.0], [-1.0, 1.0], [-1.0, 1.0]], np.float32)
    w = [1.0, 1.0, 1.0]
    close(ties(np.zeros(2, np.float32), xs, weight=w, density=1.0, election="sum"), [3, -3])
    close(ties(np.zeros(2, np.float32), xs, weight=w, density=1.0, election="count"), [-1, 1])


def test_dare_hand_with_injected_masks():
    kw = dict(weight=[1.0, 1.0], density=0.5, masks=MASKS)
    close(dare_linear(B, XS, **kw), B + L1)  # rescale "l1" by default
    close(dare_linear(B, XS, rescale="inv_p", **kw), B + [2, 2, 8, 4, 1])  # / d
    close(dare_linear(B, XS, rescale=None, **kw), B + [1, 1, 4, 2, 0.5])
    close(dare_linear(B, XS, rescale=False, **kw), B + [1, 1, 4, 2, 0.5])
    # dare_ties: all sums >= 0 -> '+'; T1 counted at 0, 2, 4, T2 at 1, 2, 3 (masked zeros never count)
    close(dare_ties(B, XS, **kw), B + L1)
    l1_parts = np.array([1, 0, 3, 0, 0.5]) * 6.5 / 4.5, np.array([0, 1, 1, 2, 0]) * 5.5 / 4
    close(dare_ties(B, XS, normalize=True, **kw), B + (l1_parts[0] + l1_parts[1]) / [1, 1, 2, 1, 1])


def test_della_hand_with_injected_masks():
    kw = dict(weight=[1.0, 1.0], density=0.5, epsilon=0.1, masks=MASKS)
    close(della_linear(B, XS, **kw), B + L1)
    l1_parts = np.array([1, 0, 3, 0, 0.5]) * 6.5 / 4.5, np.array([0, 1, 1, 2, 0]) * 5.5 / 4
    close(della(B, XS, **kw), B + (l1_parts[0] + l1_parts[1]) / [1, 1, 2, 1, 1])  # normalize by default
    # inv_p divides by each entry's keep probability: T1 ranks [2,3,4,0,1] -> p = 0.4 + 0.05 r
    # T2 |δ| = [1,1,1,2,.5] ranks [1,2,3,4,0] -> p = [.45,.5,.55,.6,.4]
    y = della_linear(B, XS, rescale="inv_p", **kw)
    close(y, B + np.array([1 / 0.5, 0, 3 / 0.6, 0, 0.5 / 0.45]) + np.array([0, 1 / 0.5, 1 / 0.55, 2 / 0.6, 0]))


def test_breadcrumbs_hand():
    # n = 5, d = 0.6, γ = 0.2: target 3, n_top 1, n_bot 1 -> ascending ranks 1..3
    # T1 |δ| ascending: 0 (3), .5 (4), 1 (0), 2 (1), 3 (2) -> keeps 4, 0, 1 -> [1, -2, 0, 0, .5]
    # T2 |δ| ascending: .5 (4), 1 (0), 1 (1), 1 (2), 2 (3) -> keeps 0, 1, 2 -> [-1, 1, 1, 0, 0]
    kw = dict(weight=[1.0, 1.0], density=0.6, gamma=0.2)
    close(breadcrumbs(B, XS, **kw), B + [0, -1, 1, 0, 0.5])
    # signs of the sum [0, -1, 1, 0, .5] -> [+, -, +, +, +]: T1 at 0, 1, 4; T2 at 2
    close(breadcrumbs_ties(B, XS, **kw), B + [1, -2, 1, 0, 0.5])
    close(breadcrumbs(B, XS, weight=[1.0, 1.0], density=1.0), B + T1 + T2)  # d >= 1: no-op
    close(breadcrumbs(B, XS, weight=[1.0, 1.0], density=0.0, gamma=0.2), B)


def test_sce_hand():
    # election: Σ = [0,-1,4,2,0] -> [+,-,+,+,+]; M1 = [T,T,T,F,T], M2 = [F,F,T,T,F]
    # ω ∝ mean(τ²) = [2.85, 1.45]
    w1, w2 = 2.85 / 4.3, 1.45 / 4.3
    close(sce(B, XS), B + [1, -2, (3 * w1 + w2) / (w1 + w2), 2, 0.5], tol=1e-5)
    # select_topk 0.4 with T2[3] = 2.5: Var = [1, 2.25, .5625, 1.5625, .25] -> k = 2 keeps entries 1 and 3
    t2 = T2.copy()
    t2[3] = 2.5
    xs = np.stack([B + T1, B + t2])
    close(sce(B, xs, select_topk=0.4), B + [0, -2, 0, 2.5, 0])
    close(sce(B, xs, select_topk=0.0), B)
    close(sce(B, np.stack([B, B])), B)  # zero task vectors: uniform weights, nothing to add


def test_one_model():
    x = XS[:1]
    close(task_arithmetic(B, x, weight=1.0), XS[0])
    close(ties(B, x, weight=0.5, density=0.4), B + 0.5 * np.array([0, -2, 3, 0, 0]) / 0.5)  # k = 2, normalized
    close(ties(B, x, weight=0.5, density=0.4, normalize=False), B + 0.5 * np.array([0, -2, 3, 0, 0]))
    close(sce(B, x), XS[0])
    close(dare_linear(B, x, weight=1.0, density=0.5, masks=MASKS[:1], rescale=None), B + [1, 0, 3, 0, 0.5])
    close(ties(B, XS[:0], weight=np.zeros(0, np.float32)), B)  # no inputs: the base


# ------------------------------------------------------------------------------------------------ invariants


def _default_params(name):
    p = {"weight": [0.5, 0.5]} if name != "sce" else {}
    if name in RANDOM:
        p["key"] = tensor_key(0, "w")
    return p


@pytest.mark.parametrize("name", NAMES)
def test_merging_a_model_with_itself_returns_it(name):
    x = XS[0]
    xs = np.stack([x, x])
    p = _default_params(name)
    if name != "sce":
        p.update(density=1.0, normalize=True)
    close(METHODS[name].kernel(B, xs, **p), x)


@pytest.mark.parametrize("name", [n for n in NAMES if n != "sce"])
def test_weight_zero_and_density_zero_return_the_base(name):
    p = _default_params(name)
    close(METHODS[name].kernel(B, XS, **dict(p, weight=[0.0, 0.0])), B)
    if name != "task_arithmetic":
        close(METHODS[name].kernel(B, XS, **dict(p, density=0.0)), B)


@pytest.mark.parametrize("name", [n for n in NAMES if n != "sce"])
def test_zero_task_vectors_return_the_base(name):
    close(METHODS[name].kernel(B, np.stack([B, B]), **dict(_default_params(name), density=0.5)), B)


def test_density_one_equals_task_arithmetic_and_ties():
    rng = np.random.default_rng(0)
    base = rng.standard_normal(5).astype(np.float32)
    xs = base + 0.1 * rng.standard_normal((2, 5)).astype(np.float32)
    w = [0.5, -0.3]
    key = tensor_key(1, "x")
    ta = task_arithmetic(base, xs, weight=w)
    close(dare_linear(base, xs, weight=w, density=1.0, key=key), ta)
    close(della_linear(base, xs, weight=w, density=1.0, key=key), ta)
    close(breadcrumbs(base, xs, weight=w, density=1.0), ta)
    t = ties(base, xs, weight=w, density=1.0, normalize=False)
    close(dare_ties(base, xs, weight=w, density=1.0, key=key), t)
    close(breadcrumbs_ties(base, xs, weight=w, density=1.0), t)
    close(della(base, xs, weight=w, density=1.0, key=key, normalize=False), t)


def test_inputs_not_modified_and_low_precision_inputs():
    base, xs = B.copy(), XS.copy()
    ties(base, xs, weight=[1.0, 1.0], density=0.5)
    dare_ties(base, xs, weight=[1.0, 1.0], density=0.5, key=tensor_key(0, "a"))
    np.testing.assert_array_equal(base, B)
    np.testing.assert_array_equal(xs, XS)
    y = ties(jnp.asarray(B, jnp.bfloat16), jnp.asarray(XS, jnp.bfloat16), weight=[1.0, 1.0], density=0.6)
    assert y.dtype == jnp.float32
    close(y, B + [1, -2, 3, 2, 0])  # every value here is exact in bfloat16


def test_randomised_reproducible_and_key_dependent():
    rng = np.random.default_rng(1)
    base = rng.standard_normal(5).astype(np.float32)
    xs = base + rng.standard_normal((2, 5)).astype(np.float32)
    for f in (dare_ties, della):
        a = f(base, xs, weight=[1.0, 1.0], density=0.5, key=tensor_key(0, "layers.0.w"))
        b = f(base, xs, weight=[1.0, 1.0], density=0.5, key=tensor_key(0, "layers.0.w"))
        c = f(base, xs, weight=[1.0, 1.0], density=0.5, key=tensor_key(0, "layers.1.w"))
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        assert not np.array_equal(np.asarray(a), np.asarray(c))


# ------------------------------------------------------------------------------------------------ goldens


# Cases that take another case's path on other values or shapes (the sparsifiers rank the flattened task vector):
# slow (CI time, the eager kernels compile per shape). ties: a third model with a negative weight (per_model has
# three), 64 entries (basic), ties in a 2x8 tensor (ties16); the breadcrumbs: their default gamma on 64 entries
# (basic, the registry's defaults below); sce: another top-k on 10 entries (topk); DARE: 64 entries (basic).
REPEATS = {"ties": {"neg_weights", "norm64", "ties2x8"}, "breadcrumbs": {"norm64_default_gamma"},
           "breadcrumbs_ties": {"norm64_default_gamma"}, "sce": {"topk07_n10"}, "dare_linear": {"norm64"},
           "dare_ties": {"norm64"}}


def _golden(name):
    meta, arrays = golden(name)
    assert meta["mergekit"] == "0.1.5"
    return meta["cases"], arrays


def _kernel_params(info):
    """mergekit's parameters, with per-model ones as float32 (N,) arrays as the executor passes them."""
    p = dict(info["params"])
    for k in ("weight", "density", "gamma", "epsilon"):
        if k in p:
            p[k] = np.broadcast_to(np.asarray(p[k], np.float32), (info["n"],)).copy()
    return p


@pytest.mark.parametrize("name, case", golden_cases(NAMES, REPEATS, 1))
def test_matches_mergekit(name, case):
    cases, t = _golden(name)
    p = _kernel_params(cases[case])
    if name in RANDOM:
        p["masks"] = t[f"{case}/masks"]  # the very masks mergekit drew (torch.bernoulli, recorded)
    y = np.asarray(METHODS[name].kernel(t[f"{case}/base"], t[f"{case}/xs"], key=None, **p))
    assert y.shape == t[f"{case}/y"].shape
    diff = float(np.max(np.abs(y - t[f"{case}/y"])))
    assert diff <= 1e-5, f"{name}/{case}: max |diff| {diff:.3g} vs mergekit 0.1.5"


def test_goldens_cover_the_edge_cases():
    """The golden set is not vacuous: exact magnitude ties at the cut, density 0 and 1, zero task vectors."""
    cases, t = _golden("ties")
    delta = t["ties16/xs"] - t["ties16/base"]
    k = int(0.4 * 16)
    tied_at_cut = [np.sort(np.abs(d))[::-1][k - 1] == np.sort(np.abs(d))[::-1][k] for d in delta]
    assert any(tied_at_cut)
    assert cases["density_1_0"]["params"]["density"] == [1.0, 0.0]
    assert np.all(t["zero_tv/xs"][0] == t["zero_tv/base"])
    cases, t = _golden("dare_ties")
    assert 0 < t["basic/masks"].mean() < 1  # real masks were recorded


# ------------------------------------------------------------------------------------------------ jit, vmap


def test_jit_with_traced_parameters_matches_eager():
    rng = np.random.default_rng(2)
    base = rng.standard_normal(5).astype(np.float32)
    xs = base + 0.1 * rng.standard_normal((2, 5)).astype(np.float32)
    w = jnp.asarray([0.5, 1.0])
    d = jnp.asarray([0.5, 0.4])  # int(d·5) is the same in float32 and float64: traced counts agree
    key = tensor_key(0, "w")
    f = jax.jit(lambda b, x, w, d: ties(b, x, weight=w, density=d))
    close(f(base, xs, w, d), ties(base, xs, weight=w, density=d))
    g = jax.jit(lambda b, x, w, d, k: dare_ties(b, x, weight=w, density=d, key=k, normalize=True))
    close(g(base, xs, w, d, key), dare_ties(base, xs, weight=w, density=d, key=key, normalize=True))
    h = jax.jit(lambda b, x, w, d, k: della(b, x, weight=w, density=d, epsilon=0.1, key=k))
    close(h(base, xs, w, d, key), della(base, xs, weight=w, density=d, epsilon=0.1, key=key))
    s = jax.jit(functools.partial(sce, select_topk=0.5))
    close(s(base, xs), sce(base, xs, select_topk=0.5))


def test_vmap_over_stacked_layers():
    rng = np.random.default_rng(3)
    base = rng.standard_normal((4, 5, 6)).astype(np.float32)  # 4 layers
    xs = base[:, None] + 0.1 * rng.standard_normal((4, 2, 5, 6)).astype(np.float32)
    f = jax.vmap(lambda b, x: breadcrumbs_ties(b, x, weight=[1.0, 0.5], density=0.5, gamma=0.1))
    y = f(base, xs)
    for layer in range(4):
        close(y[layer], breadcrumbs_ties(base[layer], xs[layer], weight=[1.0, 0.5], density=0.5, gamma=0.1))


# ------------------------------------------------------------------------------------------------ registry, errors


def test_registry_defaults_follow_mergekit():
    expected = {  # (normalize, rescale, sparsification-specific per-model parameter)
        "task_arithmetic": (False, None, None), "ties": (True, None, None), "dare_linear": (False, "l1", None),
        "dare_ties": (False, "l1", None), "breadcrumbs": (False, None, "gamma"),
        "breadcrumbs_ties": (False, None, "gamma"), "della": (True, "l1", "epsilon"),
        "della_linear": (False, "l1", "epsilon"),
    }
    for name, (normalize, rescale, extra) in expected.items():
        m = METHODS[name]
        assert m.base == "required" and m.per_model["weight"] is REQUIRED and m.per_model["density"] == 1.0
        assert m.shared["normalize"] is normalize and m.shared["rescale"] == rescale and m.shared["lambda"] == 1.0
        assert m.randomized == (name in RANDOM)
        assert ("election" in m.shared) == (name in ("ties", "dare_ties", "breadcrumbs_ties", "della"))
        if extra:
            assert m.per_model[extra] == {"gamma": 0.01, "epsilon": 0.15}[extra]
    assert METHODS["sce"].shared == {"select_topk": 1.0, "int8_mask": False} and METHODS["sce"].per_model == {}


@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda: ties(B, XS, density=0.5), ValueError, "ties: parameter 'weight' is required"),
        (lambda: ties(B, XS[:, :4], weight=[1.0, 1.0]), ValueError, r"stacked as \(2, 4\) but the base is \(5,\)"),
        (lambda: ties(B, XS, weight=[1.0, 1.0, 1.0]), ValueError, r"'weight' has shape \(3,\), expected \(2,\)"),
        (lambda: ties(B, XS, weight=[1.0, 1.0], density=[0.5]), ValueError, "'density' has shape"),
        (lambda: ties(B, XS, weight=[1.0, 1.0], election="mass"), ValueError, "parameter election must be"),
        (lambda: ties(B, XS, weight=[1.0, 1.0], divisor="n"), ValueError, "parameter divisor must be"),
        (lambda: dare_linear(B, XS, weight=[1.0, 1.0], rescale="l2"), ValueError, "parameter rescale must be"),
        (lambda: dare_ties(B, XS, weight=[1.0, 1.0], density=0.5), ValueError, "dare_ties: .* needs key= or masks="),
        (lambda: della(B, XS, weight=[1.0, 1.0], density=[0.5, 0.9], key=tensor_key(0, "a")), ValueError,
         r"della: model 1: density ± epsilon must lie in \(0, 1\), got density=0.9, epsilon=0.15"),
        (lambda: dare_ties(B, XS, weight=[1.0, 1.0], masks=MASKS[:, :3]), ValueError, r"masks have shape \(2, 3\)"),
        (lambda: ties(B, XS, weight=[1.0, 1.0], lamda=2.0), TypeError, r"ties: unknown parameter\(s\) \['lamda'\]"),
        (lambda: ties(None, XS, weight=[1.0, 1.0]), ValueError, "ties: a base tensor is required"),
        (lambda: task_arithmetic(B, XS, weight=[1.0, 1.0], masks=MASKS), ValueError, "has no sparsifier"),
        (lambda: dare_linear(B, XS, weight=[1.0, 1.0], election="sum", masks=MASKS), ValueError,
         "dare_linear: has no sign election"),
        (lambda: generalized_task_arithmetic(B, XS, weight=1.0, sparsification="topk"), ValueError,
         "unknown sparsification 'topk'"),
    ],
)
def test_errors_name_the_parameter(call, error, match):
    with pytest.raises(error, match=match):
        call()


@pytest.mark.parametrize("method, extra", [("ties", {}), ("breadcrumbs", {"gamma": 0.0})])
def test_tree_merge_keeps_mergekits_count_with_traced_densities(method, extra):
    """The kernel cache traces per-model densities; a traced count trunc(f32(0.58)·f32(50)) is 29 where mergekit
    keeps int(0.58·50) = 28 entries, so such densities reach the kernel as constants (also in a batched merge)."""
    from configurable_fm.ops.merge import tree
    from configurable_fm.ops.merge.execute import KernelCache, merge_stacked
    from configurable_fm.ops.merge.registry import get_method

    base = np.zeros(50, np.float32)
    x = (np.random.default_rng(0).permutation(50) + 1).astype(np.float32)
    params = {"weight": 1.0, "density": 0.58, **extra}
    out = tree.merge(method, {"w": base}, [{"w": x}], parameters=params)
    assert int(np.count_nonzero(np.asarray(out["w"]))) == int(0.58 * 50) == 28
    resolved = {"weight": np.ones(1), "density": np.full(1, 0.58), **{k: np.full(1, v) for k, v in extra.items()}}
    ys = merge_stacked(get_method(method), np.stack([base, base]), [np.stack([x, x])], [resolved, resolved],
                       out_dtype=np.float32, cache=KernelCache())
    assert [int(np.count_nonzero(np.asarray(y))) for y in ys] == [28, 28]


def test_tree_merge_refuses_della_density_plus_minus_epsilon_outside_0_1():
    """mergekit raises for density ± epsilon outside (0, 1); the kernel's check was skipped for traced values."""
    from configurable_fm.ops.merge import tree

    b = {"w": np.zeros((4, 4), np.float32)}
    with pytest.raises(ValueError, match="density ± epsilon"):
        tree.merge("della", b, [{"w": np.ones((4, 4), np.float32)}],
                   parameters={"weight": 1.0, "density": 0.5, "epsilon": 0.6})
