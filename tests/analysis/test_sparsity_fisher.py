"""The 'scaled' activation-sparsity score (a_i = |x_i| s_i) and its Fisher scales (analysis/sparsity/fisher.py).

Invariants: the mask by hand; the scale is a variable of the model that sparsify/desparsify/orbax carry and drop;
fisher_scales against central finite differences of the summed loss (every input entry of two Linears, one of
which shares its input with others); tokens outside the loss mask add nothing; the sampled (true) Fisher against
its expectation enumerated over the vocabulary; calibrated scaled thresholds zero the target fraction of each
Linear's calibration scores; errors name their argument.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configurable_fm.analysis import add, capture, intervene
from configurable_fm.analysis.sparsity import (KIND, SparseLinear, SparsityError, calibrate, desparsify, evaluate,
                                               fisher_scales, scales_of, sparse_linears, sparsify_activations,
                                               thresholds_of)
from configurable_fm.interop import orbax_io
from configurable_fm.models.layers import Linear
from configurable_fm.models.scoring import next_token_nll
from configurable_fm.models.structure import extension_specs
from tests.analysis.test_activation_sparsity import windows
from tests.analysis.tiny import LLAMA, random_model

DOWN, Q = "layers.1.mlp.down_proj", "layers.0.self_attn.q_proj"


@pytest.fixture(scope="module")
def dense():
    return random_model(LLAMA, 0)


@pytest.fixture(scope="module")
def batches():
    return windows(0)


def test_scaled_score_masks_by_hand_and_the_scale_travels_with_the_model(dense):
    """kept = |x_i| s_i > t; the scale is the module's variable; re-sparsifying with another score or desparsifying
    drops it."""
    lin = Linear(4, 3, axes=("embed", "mlp"), use_bias=False, rngs=nnx.Rngs(0))
    w = np.asarray(lin.kernel.get_value())
    sl = SparseLinear(lin, threshold=1.0, score="scaled", scale=np.asarray([0.1, 5.0, 2.0, 1.0], np.float32))
    x = np.asarray([[5.0, 0.1, 0.6, 1.0]], np.float32)  # scores 0.5, 0.5, 1.2, 1.0 (= t: zeroed)
    np.testing.assert_allclose(np.asarray(sl(jnp.asarray(x))), (x * [[0, 0, 1, 0]]) @ w, rtol=1e-6)
    _, values = capture(sl, ["score"], lambda m: m(jnp.asarray(x)))
    np.testing.assert_allclose(np.asarray(values["score"]), [[0.5, 0.5, 1.2, 1.0]], rtol=1e-6)
    assert sl.structure_spec() == {"kind": KIND, "options": {"score": "scaled"}}

    s = np.linspace(0.5, 2.0, 24).astype(np.float32)
    scaled = sparsify_activations(dense, {DOWN: 0.1}, score="scaled", scales={DOWN: s, "unused.path": None})
    assert [e["options"] for e in extension_specs(scaled)] == [{"score": "scaled"}]
    np.testing.assert_array_equal(scales_of(scaled)[DOWN], s)
    ids = jnp.asarray(windows(5)[0]["inputs"])
    by_hand = intervene(dense, {f"{DOWN}.input": lambda h: jnp.where(jnp.abs(h) * s > 0.1, h, 0.0)}, ids)
    np.testing.assert_allclose(np.asarray(scaled(ids)), np.asarray(by_hand), rtol=1e-6, atol=1e-6)
    assert scales_of(sparsify_activations(scaled, {DOWN: 0.1})) == {}  # magnitude now: the old scale is gone
    assert not sparse_linears(desparsify(scaled))


@pytest.mark.slow  # CI time
def test_scaled_model_round_trips_through_orbax(dense, tmp_path):
    s = np.linspace(0.5, 2.0, 24).astype(np.float32)
    scaled = sparsify_activations(dense, {DOWN: 0.1}, score="scaled", scales={DOWN: s})
    restored = orbax_io.load_model(orbax_io.save_model(scaled, tmp_path / "scaled"))
    np.testing.assert_array_equal(scales_of(restored)[DOWN], s)
    assert thresholds_of(restored) == thresholds_of(scaled)
    ids = jnp.asarray(windows(4)[0]["inputs"])
    np.testing.assert_array_equal(np.asarray(restored(ids)), np.asarray(scaled(ids)))


def summed_loss_of_addition(model, path, ids, targets, m):
    """jitted e (B, T, in) -> sum_bt m_bt nll_bt with e added at path's input."""
    graphdef, state = nnx.split(model)

    @jax.jit
    def loss(e):
        logits = intervene(nnx.merge(graphdef, state), {f"{path}.input": add(e)}, lambda mm: mm(ids))
        return jnp.sum(next_token_nll(logits, targets) * m)
    return loss


@pytest.mark.parametrize("path", [pytest.param(DOWN, marks=pytest.mark.slow), Q])  # DOWN: slow (CI time ~2 s),
# the same computation as q_proj's, whose input the other attention projections share
def test_fisher_scales_equal_central_differences(dense, path):
    """s_i^2 = sum_t (dL/dx_t,i)^2 / T with each derivative by central differences of the float32 loss (eps 3e-2:
    the differences' float32 rounding, ~1e-4 on derivatives of ~0.01, is what the 1% tolerance allows for; a
    gradient of the loss at t alone, without the later positions, or a sum in place of the mean is far off)."""
    batch = windows(7, n_batches=1, rows=1)[0]
    batch = {k: v[:, :6] for k, v in batch.items()}
    ids, targets = jnp.asarray(batch["inputs"]), jnp.asarray(batch["targets"])
    n_in = 24 if path == DOWN else 16
    loss = summed_loss_of_addition(dense, path, ids, targets, jnp.ones((1, 6)))
    eps = 3e-2
    g = np.zeros((6, n_in))
    for t in range(6):
        for i in range(n_in):
            e = np.zeros((1, 6, n_in), np.float32)
            e[0, t, i] = eps
            g[t, i] = (float(loss(jnp.asarray(e))) - float(loss(jnp.asarray(-e)))) / (2 * eps)
    s = fisher_scales(dense, [batch], [path])[path]
    assert s.shape == (n_in,) and s.dtype == np.float32
    np.testing.assert_allclose(s, np.sqrt(np.mean(g ** 2, axis=0)), rtol=1e-2)


def test_rows_outside_the_token_mask_count_nothing(dense, batches):
    """Another batch whose rows are all masked out changes no scale; scoring fewer tokens' losses changes them."""
    s = fisher_scales(dense, batches[:1], [DOWN, Q])
    silent = {**batches[1], "mask": np.zeros(4, np.float32)}
    again = fisher_scales(dense, [batches[0], silent], [DOWN, Q])
    for p in s:
        np.testing.assert_array_equal(again[p], s[p])
    half = {**batches[0], "loss_mask": (np.arange(16) >= 8)[None].repeat(4, 0).astype(np.float32)}
    assert not np.allclose(fisher_scales(dense, [half], [DOWN])[DOWN], s[DOWN])


def test_sampled_fisher_converges_to_its_expectation_over_the_vocabulary(dense):
    """With only the last of T = 5 positions scored, sampled=True estimates sum_y p(y) sum_t (d log p(y)/dx_t,i)^2
    / T (every position is a token of the mean), which the test enumerates over the 32 tokens (each log p(y)'s
    gradient by jax.grad); 400 rows, a draw each: the mean of the squared ratios within 5%. The empirical Fisher of the
    batch's own target differs."""
    ids = np.asarray(windows(8, n_batches=1, rows=1)[0]["inputs"][:, :5])
    m = np.zeros((1, 5), np.float32)
    m[0, -1] = 1.0
    rows = {"inputs": ids.repeat(400, 0), "targets": np.zeros((400, 5), np.int32), "loss_mask": m.repeat(400, 0)}
    sampled = fisher_scales(dense, [rows], [DOWN], sampled=True, seed=3)[DOWN]  # 400 rows, 400 draws
    batch = {"inputs": ids, "targets": np.zeros_like(ids), "loss_mask": m}
    graphdef, state = nnx.split(dense)

    def log_p(e, y):
        logits = intervene(nnx.merge(graphdef, state), {f"{DOWN}.input": add(e)}, lambda mm: mm(jnp.asarray(ids)))
        return jax.nn.log_softmax(logits[0, -1])[y]

    zero = jnp.zeros((1, 5, 24), jnp.float32)
    p = np.exp(np.asarray(jax.jit(jax.vmap(lambda y: log_p(zero, y)))(jnp.arange(32))))
    g = np.asarray(jax.jit(jax.vmap(jax.grad(log_p), in_axes=(None, 0)))(zero, jnp.arange(32)))[:, 0]  # V, T, in
    expected = np.sqrt(np.einsum("v,vti->i", p, g ** 2) / 5)
    ratio = sampled / expected
    assert abs(float(np.mean(ratio ** 2)) - 1.0) < 0.05, ratio
    empirical = fisher_scales(dense, [batch], [DOWN])[DOWN]
    assert not np.allclose(empirical, sampled, rtol=0.05)


def test_scaled_calibration_zeroes_the_target_fraction_of_each_linear(dense, batches):
    """Calibrated on |x_i| s_i, the thresholds zero the fraction p of each Linear's calibration scores, and the
    calibration keeps the scales for sparsify_activations."""
    paths = [Q, "layers.0.self_attn.k_proj", DOWN]
    s = fisher_scales(dense, batches, paths)
    cal = calibrate(dense, batches, paths, score="scaled", scales=s)
    assert cal.score == "scaled" and cal.shared == {p: p for p in paths} and set(cal.scales) == set(paths)
    t = cal.thresholds(0.5)
    scores = {p: [] for p in paths}
    for b in batches:
        _, values = capture(dense, [f"{p}.input" for p in paths], jnp.asarray(b["inputs"]))
        for p in paths:
            scores[p].append((np.abs(np.asarray(values[f"{p}.input"])) * s[p]).reshape(-1))
    for p in paths:
        assert abs(float(np.mean(np.concatenate(scores[p]) <= t[p])) - 0.5) <= 0.005, p
    ev = evaluate(sparsify_activations(dense, {DOWN: t[DOWN]}, score="scaled", scales=cal.scales), batches)
    assert abs(ev.sparsity()[DOWN] - 0.5) <= 0.02


@pytest.mark.parametrize("case, pattern", [
    (lambda m: sparsify_activations(m, {DOWN: 0.1}, score="scaled"), r"score 'scaled' needs scales"),
    (lambda m: sparsify_activations(m, {DOWN: 0.1}, score="scaled", scales={Q: np.ones(16)}),
     r"no scale for \['layers\.1\.mlp\.down_proj'\]"),
    (lambda m: sparsify_activations(m, {DOWN: 0.1}, score="scaled", scales={DOWN: np.ones(16)}),
     r"the scale for layers\.1\.mlp\.down_proj has shape \(16,\); its Linear takes 24 inputs"),
    (lambda m: sparsify_activations(m, {DOWN: 0.1}, score="scaled", scales={DOWN: -np.ones(24)}),
     r"negative or non-finite"),
    (lambda m: sparsify_activations(m, {DOWN: 0.1}, scales={DOWN: np.ones(24)}), r"scales are for score 'scaled'"),
    (lambda m: calibrate(m, windows(0, 1), [DOWN], score="scaled"), r"calibrate: score 'scaled' needs scales"),
    (lambda m: calibrate(m, windows(0, 1), [DOWN], scales={DOWN: np.ones(24)}), r"calibrate: scales are for"),
    (lambda m: fisher_scales(m, [], [DOWN]), r"fisher_scales: no batches"),
    (lambda m: fisher_scales(m, windows(0, 1), ["layers.0.mlp"]), r"layers\.0\.mlp is a LlamaMLP, not a Linear"),
    (lambda m: fisher_scales(m, windows(0, 1), [DOWN], sampled="yes"), r"sampled must be True or False"),
    (lambda m: fisher_scales(m, [{**windows(0, 1)[0], "loss_mask": np.zeros((4, 16))}], [DOWN]),
     r"no scored tokens"),
    (lambda m: SparseLinear(m.layers[0].mlp.down_proj, score="weighted", scale=np.ones(24)),
     r"a scale is for score 'scaled'"),
])
def test_errors_name_their_argument(dense, case, pattern):
    with pytest.raises(SparsityError, match=pattern):
        case(dense)
