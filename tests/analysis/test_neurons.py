"""FFN neuron statistics and the survey's neuron analyses (analysis/neurons.py): streamed statistics against numpy on
values captured from the same padded batches, streamed == one big batch == unpadded rows, per-example means,
average precision against hand-computed values (ties) and sklearn's algorithm, top-k sets and their overlap,
dynamic masking (p = 0 and p = 1) and neuron masking, on tiny random llama (SwiGLU) and gpt2 (GELU) models."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configurable_fm.analysis import TapError, capture, intervene, mask, replace
from configurable_fm.analysis.neurons import (
    ExampleActivations, NeuronStats, Specialisation, activation_stats, average_precision, log_edges,
    mask_low_activation, mask_neurons, partition_overlap, per_example_activations, specialisation_scores, top_mask,
    top_neurons)
from tests.analysis.tiny import GPT2, LLAMA, random_model

B, T = 3, 8
THRESHOLD = 0.0123


@pytest.fixture(scope="module")
def llama():
    return random_model(LLAMA, 0)


@pytest.fixture(scope="module")
def gpt2():
    return random_model(GPT2, 0)


def padded_batches(seed=1):
    """Three right-padded batches (B, T) with attention masks; row lengths between 1 and T."""
    rs = np.random.RandomState(seed)
    out = []
    for lengths in ([8, 5, 2], [3, 8, 1], [6, 6, 7]):
        ids = rs.randint(1, 32, (B, T)).astype(np.int32)
        am = (np.arange(T)[None, :] < np.asarray(lengths)[:, None]).astype(np.int32)
        out.append({"inputs": np.where(am > 0, ids, 0).astype(np.int32), "attention_mask": am})
    return out


def captured(model, batches, points="**.mlp.hidden"):
    """{point: (N, F) float64} values at the real tokens of every batch, by capture (the forward gets the mask)."""
    graphdef, state = nnx.split(model)
    run = jax.jit(lambda s, ids, am: capture(nnx.merge(graphdef, s), points,
                                             lambda m: m(ids, attention_mask=am))[1])
    got = {}
    for b in batches:
        for p, v in run(state, jnp.asarray(b["inputs"]), jnp.asarray(b["attention_mask"])).items():
            got.setdefault(p, []).append(np.asarray(v, np.float64)[b["attention_mask"] > 0])
    return {p: np.concatenate(v) for p, v in got.items()}


@pytest.fixture(scope="module")
def llama_stats(llama):
    return activation_stats(llama, padded_batches(), threshold=THRESHOLD, coactivation=True)


def test_stats_equal_numpy_on_captured_values(llama, llama_stats):
    s = llama_stats
    h = captured(llama, padded_batches())
    assert s.points == tuple(h) == ("layers.0.mlp.hidden", "layers.1.mlp.hidden", "layers.2.mlp.hidden")
    n = sum(int(b["attention_mask"].sum()) for b in padded_batches())
    assert s.tokens == n == 15 + 12 + 19
    for i, (p, x) in enumerate(h.items()):
        a = np.abs(x)
        np.testing.assert_allclose(s.mean_abs[i], a.mean(0), rtol=1e-5, atol=1e-8)
        np.testing.assert_allclose(s.mean[i], x.mean(0), rtol=1e-5, atol=1e-8)
        np.testing.assert_allclose(s.mean_square[i], (x * x).mean(0), rtol=1e-5, atol=1e-10)
        on = a > THRESHOLD
        assert 0 < on.mean() < 1  # the threshold splits the values
        np.testing.assert_array_equal(s.active[i], on.sum(0))
        np.testing.assert_allclose(s.frequency[i], on.mean(0))
        np.testing.assert_allclose(s.sparsity[i], 1 - on.mean())
        assert s.dead[i] == int((on.sum(0) == 0).sum())
        np.testing.assert_array_equal(s.coactivation[i], on.T.astype(np.int64) @ on.astype(np.int64))
        bins = np.searchsorted(s.edges, a.reshape(-1), side="right")
        np.testing.assert_array_equal(s.histogram[i], np.bincount(bins, minlength=len(s.edges) + 1))
        assert s.histogram[i].sum() == n * x.shape[1]
    text = s.summary()
    assert "layers.2.mlp.hidden" in text and "sparsity" in text and f"{n} tokens" in text


def test_shapes_and_dtypes(llama_stats):
    s = llama_stats
    L, F = 3, LLAMA["intermediate_size"]
    assert isinstance(s, NeuronStats)
    for name in ("mean_abs", "mean", "mean_square"):
        assert getattr(s, name).shape == (L, F) and getattr(s, name).dtype == np.float64
    assert s.active.shape == (L, F) and s.active.dtype == np.int64
    assert s.histogram.shape == (L, 48 + 2) and s.histogram.dtype == np.int64 and s.edges.shape == (49,)
    np.testing.assert_allclose(s.edges[[0, -1]], [1e-6, 1e2])
    assert s.coactivation.shape == (L, F, F) and s.coactivation.dtype == np.int64
    np.testing.assert_array_equal(np.diagonal(s.coactivation, axis1=1, axis2=2), s.active)
    assert s.sparsity.shape == (L,) and s.quantile(0.5).shape == (L,)


def test_streamed_equals_one_big_batch_and_unpadded_rows(llama, llama_stats):
    pb = padded_batches()
    big = {k: np.concatenate([b[k] for b in pb]) for k in pb[0]}
    one = activation_stats(llama, [big], threshold=THRESHOLD, coactivation=True)
    for name in ("mean_abs", "mean", "mean_square"):  # float32 sums in another order: the signed mean cancels, so
        # its error is relative to the mean magnitude (jax 0.12: 1.5e-5 of a 3.5e-4 mean among |h| ~ 2e-2)
        np.testing.assert_allclose(getattr(one, name), getattr(llama_stats, name), rtol=1e-5,
                                   atol=1e-6 * llama_stats.mean_abs.max())
    for name in ("active", "histogram", "coactivation"):
        np.testing.assert_array_equal(getattr(one, name), getattr(llama_stats, name))
    assert one.tokens == llama_stats.tokens and one.points == llama_stats.points
    # the rows of a padded batch, each on its own without padding or attention mask (plain id arrays)
    padded = activation_stats(llama, pb[:1], threshold=THRESHOLD, coactivation=True)  # llama_stats' program
    alone = activation_stats(llama, [pb[0]["inputs"][r:r + 1, :n] for r, n in enumerate([8, 5, 2])],
                             threshold=THRESHOLD)
    assert alone.tokens == padded.tokens == 15 and alone.coactivation is None
    for name in ("mean_abs", "mean", "mean_square"):
        np.testing.assert_allclose(getattr(alone, name), getattr(padded, name), rtol=1e-5, atol=1e-9)
    np.testing.assert_array_equal(alone.active, padded.active)
    np.testing.assert_array_equal(alone.histogram, padded.histogram)


def test_gpt2_default_points_and_explicit_edges(gpt2):
    s = activation_stats(gpt2, padded_batches()[:2], bins=[0.01, 0.1, 1.0], accumulate="float64")
    h = captured(gpt2, padded_batches()[:2])
    assert s.points == ("h.0.mlp.hidden", "h.1.mlp.hidden") and s.mean_abs.shape == (2, 4 * GPT2["n_embd"])
    for i, x in enumerate(h.values()):
        np.testing.assert_allclose(s.mean_abs[i], np.abs(x).mean(0), rtol=1e-6, atol=1e-9)
        np.testing.assert_array_equal(s.active[i], (np.abs(x) > 0).sum(0))
        a = np.abs(x).reshape(-1)
        np.testing.assert_array_equal(s.histogram[i], [(a < 0.01).sum(), ((a >= 0.01) & (a < 0.1)).sum(),
                                                       ((a >= 0.1) & (a < 1)).sum(), (a >= 1).sum()])
    with pytest.raises(TapError, match="matches no tap point"):
        activation_stats(gpt2, padded_batches()[:1], points="layers.*.mlp.hidden")
    with pytest.raises(ValueError, match="increasing"):
        activation_stats(gpt2, padded_batches()[:1], bins=[0.1, 0.01])


def test_per_example_activations(llama):
    rs = np.random.RandomState(3)
    examples = [rs.randint(1, 32, n).astype(np.int32) for n in (5, 1, 8, 3, 7)]
    got = per_example_activations(llama, examples, batch_size=2, pad_to=4)
    assert isinstance(got, ExampleActivations) and got.values.shape == (5, 3, 24) and got.values.dtype == np.float32
    np.testing.assert_array_equal(got.tokens, [5, 1, 8, 3, 7])
    # reference: all examples in one right-padded batch (T = 8), values of each row's real tokens
    ids = np.zeros((5, T), np.int32)
    am = np.zeros((5, T), np.int32)
    for n, ex in enumerate(examples):
        ids[n, :len(ex)], am[n, :len(ex)] = ex, 1
    h = captured(llama, [{"inputs": ids, "attention_mask": am}])  # (sum of lengths, F) per point
    starts = np.r_[0, np.cumsum(got.tokens)]
    for n in range(5):
        want = np.stack([np.abs(v[starts[n]:starts[n + 1]]).mean(0) for v in h.values()])
        np.testing.assert_allclose(got.values[n], want, rtol=1e-5, atol=1e-7)
    signed = per_example_activations(llama, examples[:2], absolute=False, batch_size=2, pad_to=4)
    np.testing.assert_allclose(signed.values[0, 1], h["layers.1.mlp.hidden"][:5].mean(0), rtol=1e-5, atol=1e-7)


def sklearn_ap(y_true, y_score):
    """sklearn.metrics.average_precision_score's algorithm (_binary_clf_curve, precision_recall_curve, the
    uninterpolated sum), transcribed."""
    y_true, y_score = np.asarray(y_true, np.float64), np.asarray(y_score, np.float64)
    desc = np.argsort(y_score, kind="mergesort")[::-1]
    y_score, y_true = y_score[desc], y_true[desc]
    idx = np.r_[np.where(np.diff(y_score))[0], y_true.size - 1]
    tps = np.cumsum(y_true)[idx]
    fps = 1 + idx - tps
    precision = tps / (tps + fps)
    recall = np.ones_like(tps) if tps[-1] == 0 else tps / tps[-1]
    precision, recall = np.r_[precision[::-1], 1], np.r_[recall[::-1], 0]
    return -np.sum(np.diff(recall) * precision[:-1])


def test_average_precision_hand_computed_with_ties():
    assert average_precision([0.9, 0.8, 0.7, 0.6], [1, 0, 1, 0]) == pytest.approx((1 + 2 / 3) / 2)
    # the tie {0.5, 0.5} enters at once: precision 1/2 there, then 2/3
    assert average_precision([0.5, 0.5, 0.2, 0.1], [0, 1, 1, 0]) == pytest.approx((1 / 2 + 2 / 3) / 2)
    assert average_precision([0.5, 0.5, 0.2, 0.1], [1, 0, 1, 0]) == pytest.approx((1 / 2 + 2 / 3) / 2)
    assert average_precision([3.0, 3.0, 3.0, 3.0], [1, 0, 0, 1]) == pytest.approx(0.5)  # constant: positive rate
    assert average_precision([0.1, 0.4, 0.2], [0, 0, 0]) == 0.0  # no positive: sklearn's 0
    assert average_precision([0.1, 0.4, 0.2], [1, 1, 1]) == pytest.approx(1.0)
    # columns and functions at once: (N, 2) scores x (N, 2) labels -> (2, 2)
    s = np.array([[0.9, 1.0], [0.8, 1.0], [0.7, 0.0], [0.6, 0.0]])
    y = np.array([[1, 0], [0, 0], [1, 1], [0, 1]])
    np.testing.assert_allclose(average_precision(s, y), [[(1 + 2 / 3) / 2, (1 / 2 + 1 / 3) / 2],
                                                         [0.5, 0.5]])


def test_average_precision_equals_sklearns_algorithm():
    rs = np.random.RandomState(0)
    scores = rs.randint(0, 4, (40, 30)).astype(np.float64)  # many ties
    scores[:, :10] = rs.rand(40, 10)
    labels = (rs.rand(40, 3) < [0.1, 0.5, 0.9]).astype(int)
    got = average_precision(scores, labels, chunk=200)  # several chunks
    want = np.array([[sklearn_ap(labels[:, k], scores[:, j]) for k in range(3)] for j in range(30)])
    np.testing.assert_allclose(got, want, rtol=1e-12)
    try:
        from sklearn.metrics import average_precision_score
    except ImportError:
        return
    np.testing.assert_allclose(got[:, 1], [average_precision_score(labels[:, 1], scores[:, j]) for j in range(30)])


def test_specialisation_top_neurons_and_overlap():
    rs = np.random.RandomState(0)
    n, L, F = 150, 2, 10
    labels = {"code": np.arange(n) < 50, "math": (np.arange(n) >= 50) & (np.arange(n) < 100)}
    acts = rs.rand(n, L, F) * 0.1
    acts[:50, 0, 3] += 1.0  # a code neuron, a math neuron, one neuron for both (AP about 1/2 each)
    acts[50:100, 1, 7] += 1.0
    acts[:100, 1, 2] += 0.5
    spec = specialisation_scores(acts, labels)
    assert spec.scores.shape == (2, L, F) and spec.functions == ("code", "math") and spec.points == (0, 1)
    assert spec.scores[0, 0, 3] == 1.0 and spec.scores[1, 1, 7] == 1.0
    np.testing.assert_allclose(spec.scores[0, 1, 2], average_precision(acts[:, 1, 2], labels["code"]))
    top = top_neurons(spec, "code", 0.1)  # round(0.1 * 20) = 2 neurons over the model
    assert {k: v.tolist() for k, v in top.items()} == {0: [3], 1: [2]}
    assert sorted(np.flatnonzero(top_mask(spec, "math", 0.1))) == [12, 17]
    assert top_mask(spec, 1, 0.2, per_layer=True).sum(axis=1).tolist() == [2, 2]
    np.testing.assert_allclose(partition_overlap(spec, 0.1), [[1.0, 0.5], [0.5, 1.0]])
    two = specialisation_scores(acts[:, 0], np.stack([labels["code"], labels["math"]], 1), two_sided=True)
    assert two.scores.shape == (2, 1, F) and two.functions == ("0", "1")
    assert np.all(two.scores >= specialisation_scores(acts[:, 0], np.stack([labels["code"], labels["math"]], 1)
                                                      ).scores - 1e-12)
    assert "code" in spec.summary() and "<0.2" in spec.summary()
    # random sets of 5% overlap by about 5%: the survey's baseline
    rnd = Specialisation(rs.rand(2, 4, 5000), ("a", "b"), (0, 1, 2, 3))
    assert abs(partition_overlap(rnd, 0.05)[0, 1] - 0.05) < 0.02
    with pytest.raises(KeyError, match="no function 'law'"):
        top_neurons(spec, "law", 0.05)
    with pytest.raises(ValueError, match="do not fit"):
        specialisation_scores(acts, np.ones((n - 1,)))


@pytest.mark.parametrize("family", ["llama", pytest.param("gpt2", marks=pytest.mark.slow)])  # gpt2: CI time (~2 s);
# the intervention does not depend on the family; GPT-2's hidden points: test_gpt2_default_points_and_explicit_edges
def test_mask_low_activation(family, llama, gpt2):
    model = llama if family == "llama" else gpt2
    ids = jnp.asarray(padded_batches()[2]["inputs"])
    base = model(ids)
    np.testing.assert_array_equal(intervene(model, {"**.mlp.hidden": mask_low_activation(0.0)}, ids), base)
    zero = intervene(model, {"**.mlp.hidden": replace(0.0)}, ids)
    np.testing.assert_array_equal(intervene(model, {"**.mlp.hidden": mask_low_activation(1.0)}, ids), zero)
    assert np.abs(np.asarray(zero) - np.asarray(base)).max() > 1e-3
    # p = 0.5: per token exactly floor(F / 2) zeros, and they are the smallest |a|
    point = "layers.1.mlp.hidden" if family == "llama" else "h.1.mlp.hidden"
    _, clean = capture(model, point, ids)
    _, masked = capture(model, point, ids, interventions={point: mask_low_activation(0.5)})
    x, y = np.abs(np.asarray(clean[point])), np.asarray(masked[point])
    f = x.shape[-1]
    assert np.all((y == 0).sum(-1) == f // 2)
    kept_min = np.where(y != 0, x, np.inf).min(-1)
    dropped_max = np.where(y == 0, x, -np.inf).max(-1)
    assert np.all(kept_min >= dropped_max)
    np.testing.assert_array_equal(y[y != 0], np.asarray(clean[point])[y != 0])
    with pytest.raises(ValueError, match="fraction"):
        mask_low_activation(1.5)


def test_mask_low_activation_ties_and_scale():
    x = jnp.asarray([[[0.0, 0.0, 1.0, -2.0, 0.0]]])
    np.testing.assert_array_equal(mask_low_activation(0.4).apply(x, "p"), x)  # 2 of the zeros: unchanged
    np.testing.assert_array_equal(mask_low_activation(0.8).apply(x, "p"), [[[0, 0, 0, -2.0, 0]]])
    scaled = mask_low_activation(0.2, scale=jnp.asarray([1.0, 1, 10, 0.1, 1])).apply(x + 0.5, "p")
    np.testing.assert_array_equal(scaled, [[[0.5, 0.5, 1.5, 0, 0.5]]])  # |a| scale: -1.5 * 0.1 is the lowest


def test_mask_neurons(llama):
    ids = jnp.asarray(padded_batches()[0]["inputs"])
    spec = {0: [1, 2], "layers.2.mlp.hidden": np.arange(24) % 5 == 0, -1: [3]}
    got = mask_neurons(llama, spec)
    assert sorted(got) == ["layers.0.mlp.hidden", "layers.2.mlp.hidden"]
    assert got["layers.2.mlp.hidden"].neurons.tolist() == [0, 3, 5, 10, 15, 20]
    want = intervene(llama, {"layers.0.mlp.hidden": mask([1, 2]),
                             "layers.2.mlp.hidden": mask([0, 3, 5, 10, 15, 20])}, ids)
    np.testing.assert_array_equal(intervene(llama, got, ids), want)
    assert np.abs(np.asarray(want) - np.asarray(llama(ids))).max() > 0
    with pytest.raises(TapError, match="outside the 24 neurons of layers.0.mlp.hidden"):
        mask_neurons(llama, {0: [24]})
    with pytest.raises(TapError, match="layer 3 is outside the 3 points"):
        mask_neurons(llama, {3: [0]})
    with pytest.raises(TapError, match="neither a layer index nor a tap point"):
        mask_neurons(llama, {"layers.0.mlp": [0]})


def test_mask_neurons_refuses_fractional_indices(llama):
    # float indices were cast to int: {0: [0.5, 2.7]} zeroed neurons 0 and 2 without a word
    with pytest.raises(TapError, match="layers.0.mlp.hidden must be integer indices or a boolean mask"):
        mask_neurons(llama, {0: [0.5, 2.7]})
    assert mask_neurons(llama, {0: []})["layers.0.mlp.hidden"].neurons.tolist() == []  # an empty list: no neuron


def test_mask_low_activation_scale_must_fit_each_token():
    # a (T, F) scale broadcast over the time axis: each token ranked by another scale row, no error
    x = jnp.asarray(np.random.RandomState(0).randn(2, 3, 4), jnp.float32)
    with pytest.raises(TapError, match=r"scale \(3, 4\) does not fit the 4 neurons of p \(2, 3, 4\)"):
        mask_low_activation(0.5, scale=np.ones((3, 4))).apply(x, "p")
    ones = mask_low_activation(0.5, scale=np.ones(4)).apply(x, "p")
    np.testing.assert_array_equal(ones, mask_low_activation(0.5).apply(x, "p"))
    moe = jnp.ones((1, 2, 3, 4))  # (B, T, E, F) with an (E, F) scale still fits
    assert mask_low_activation(0.5, scale=np.ones((3, 4))).apply(moe, "p").shape == moe.shape


def test_scalar_bins_that_are_not_ints_are_refused():
    # bins=48.0 became the single edge 48 (a two-bin histogram)
    for bins in (48.0, True, np.float64(3)):
        with pytest.raises(ValueError, match="bins is a number of bins"):
            log_edges(bins)
    assert log_edges([0.1, 1.0]).tolist() == [0.1, 1.0] and len(log_edges(np.int64(3))) == 4


def test_bad_batching_of_examples_names_the_argument(llama):
    # batch_size=0 / pad_to=0 raised IndexError / ZeroDivisionError from inside the batching
    for kwargs, name in (({"batch_size": 0}, "batch_size"), ({"pad_to": 0}, "pad_to"),
                         ({"batch_size": 2.5}, "batch_size")):
        with pytest.raises(ValueError, match=f"{name} must be an int >= 1"):
            per_example_activations(llama, [np.arange(1, 4)], **kwargs)


@pytest.mark.slow  # CI time (~5 s); an end-to-end repeat of test_per_example_activations,
# test_specialisation_top_neurons_and_overlap and test_mask_neurons
def test_survey_pipeline_on_tiny_llama(llama):
    rs = np.random.RandomState(5)
    examples = [rs.randint(1, 16, 6) for _ in range(6)] + [rs.randint(16, 32, 6) for _ in range(6)]
    acts = per_example_activations(llama, examples, batch_size=4, pad_to=8)
    spec = specialisation_scores(acts, {"low": np.arange(12) < 6, "high": np.arange(12) >= 6})
    assert spec.points == acts.points and spec.scores.shape == (2, 3, 24)
    assert np.all((spec.scores >= 0) & (spec.scores <= 1)) and spec.scores.max() > 0.9
    top = top_neurons(spec, "low", 0.05)
    assert sum(len(v) for v in top.values()) == round(0.05 * 72)
    out = intervene(llama, mask_neurons(llama, top), jnp.asarray(np.stack(examples[:2])))
    assert out.shape == (2, 6, LLAMA["vocab_size"])
