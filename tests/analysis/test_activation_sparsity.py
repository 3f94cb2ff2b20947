"""Training-free activation sparsity (configurable_fm/analysis/sparsity): the SparseLinear brick, its calibration
from streamed |x| histograms, the measurement of perplexity and achieved sparsity, TEAL's greedy allocation.

Invariants: thresholds 0 and -1 give the dense logits exactly (llama and gpt2); the masking of one Linear by hand;
calibrated thresholds zero the target fraction of the calibration data (exact fractions from captured inputs, and
the fraction `evaluate` measures when one Linear is sparsified); evaluate's counts and perplexity against direct
computations; orbax round trip; to_hf refuses by name; errors name their argument.
"""
import re
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configurable_fm.analysis import capture, intervene, replace
from configurable_fm.analysis.sparsity import (KIND, AbsHistogram, LogBins, SparseLinear, SparsityError, blocks_of,
                                               calibrate, desparsify, evaluate, fraction_from_counts,
                                               greedy_allocation, perplexity_change, resolve_targets, sparse_linears,
                                               sparsify_activations, threshold_from_counts, thresholds_of)
from configurable_fm.analysis.sparsity.module import module_paths
from configurable_fm.interop import orbax_io
from configurable_fm.interop.hf import UnsupportedModel, to_hf
from configurable_fm.models.layers import Linear
from configurable_fm.models.scoring import next_token_nll
from configurable_fm.models.structure import check_consistent, extension_specs
from tests.analysis.tiny import BERT, GPT2, LLAMA, random_model

T = 16


def windows(seed, n_batches=2, rows=4):
    rs = np.random.RandomState(seed)
    out = []
    for _ in range(n_batches):
        ids = rs.randint(0, 32, (rows, T + 1)).astype(np.int32)
        out.append({"inputs": ids[:, :-1], "targets": ids[:, 1:]})
    return out


@pytest.fixture(scope="module")
def dense():
    return random_model(LLAMA, 0)


@pytest.fixture(scope="module")
def gpt2():
    return random_model(GPT2, 1)


@pytest.fixture(scope="module")
def batches():
    return windows(0)


@pytest.fixture(scope="module")
def cal(dense, batches):
    return calibrate(dense, batches)


@pytest.fixture(scope="module")
def dense_inputs(dense, batches, cal):
    """{path: |x| of its input over every calibration token} (B*T, in), captured from the dense model."""
    got = {p: [] for p in cal.paths}
    for b in batches:
        _, values = capture(dense, [f"{p}.input" for p in cal.paths], jnp.asarray(b["inputs"]))
        for p in cal.paths:
            got[p].append(np.abs(np.asarray(values[f"{p}.input"])).reshape(-1, values[f"{p}.input"].shape[-1]))
    return {p: np.concatenate(v) for p, v in got.items()}


# ------------------------------------------------------------------------------------------------ the brick
@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("t", [0.0, -1.0])
def test_threshold_zero_or_negative_is_the_dense_model_exactly(dense, gpt2, family, t):
    model = dense if family == "llama" else gpt2
    ids = jnp.asarray(windows(3)[0]["inputs"])
    paths = resolve_targets(model)
    assert len(paths) == (7 * 3 if family == "llama" else 4 * 2)
    sparse = sparsify_activations(model, {p: t for p in paths})
    assert len(sparse_linears(sparse)) == len(paths) and not sparse_linears(model)  # the input is unchanged
    np.testing.assert_array_equal(np.asarray(sparse(ids)), np.asarray(model(ids)))


def test_sparse_linear_masks_by_hand():
    lin = Linear(4, 3, axes=("embed", "mlp"), use_bias=True, rngs=nnx.Rngs(0))
    w = np.arange(12, dtype=np.float32).reshape(4, 3) / 10
    b = np.asarray([1.0, -2.0, 0.5], np.float32)
    lin.kernel.set_value(jnp.asarray(w))
    lin.bias.set_value(jnp.asarray(b))
    sl = SparseLinear(lin, threshold=0.5)
    x = np.asarray([[[0.3, -1.2, 0.5, 2.0], [-0.51, 0.0, 0.49, -7.0]]], np.float32)  # |x| = t is zeroed (<=)
    keep = np.asarray([[[0, 1, 0, 1], [1, 0, 0, 1]]], np.float32)
    np.testing.assert_allclose(np.asarray(sl(jnp.asarray(x))), (x * keep) @ w + b, rtol=1e-6)
    _, values = capture(sl, "kept", lambda m: m(jnp.asarray(x)))
    np.testing.assert_array_equal(np.asarray(values["kept"]), keep.astype(bool))
    # A NaN input entry is kept (it stays visible in the output), a zero threshold zeroes nothing else.
    y = np.asarray(SparseLinear(lin, threshold=0.5)(jnp.asarray([[np.nan, 0.0, 0.0, 0.0]], jnp.float32)))
    assert np.isnan(y).all()
    np.testing.assert_array_equal(np.asarray(SparseLinear(lin)(jnp.asarray(x))), np.asarray(lin(jnp.asarray(x))))
    # bf16 activations: the mask compares |x| in float32 with the float32 threshold.
    xb = jnp.asarray(x, jnp.bfloat16)
    expected = np.asarray(lin(jnp.where(jnp.asarray(keep, bool), xb, 0)), np.float32)
    np.testing.assert_array_equal(np.asarray(sl(xb), np.float32), expected)


def test_weighted_score_masks_by_hand_and_round_trips_its_option(dense):
    """score='weighted': kept = |x_i| * ||W_i|| > t (W_i the row x_i multiplies); the option is in the structure."""
    lin = Linear(4, 3, axes=("embed", "mlp"), use_bias=False, rngs=nnx.Rngs(0))
    w = np.asarray([[0.1, 0.0, 0.0], [3.0, 4.0, 0.0], [0.0, 0.0, 2.0], [1.0, 0.0, 0.0]], np.float32)  # norms .1 5 2 1
    lin.kernel.set_value(jnp.asarray(w))
    sl = SparseLinear(lin, threshold=1.0, score="weighted")
    x = np.asarray([[5.0, 0.1, 0.6, 1.0]], np.float32)  # scores 0.5, 0.5, 1.2, 1.0 (= t: zeroed)
    keep = np.asarray([[0, 0, 1, 0]], np.float32)
    np.testing.assert_allclose(np.asarray(sl(jnp.asarray(x))), (x * keep) @ w, rtol=1e-6)
    _, values = capture(sl, ["score", "kept"], lambda m: m(jnp.asarray(x)))
    np.testing.assert_allclose(np.asarray(values["score"]), [[0.5, 0.5, 1.2, 1.0]], rtol=1e-6)
    assert sl.structure_spec() == {"kind": KIND, "options": {"score": "weighted"}}
    path = "layers.1.mlp.down_proj"
    weighted = sparsify_activations(dense, {path: 0.2}, score="weighted")
    assert [s["options"] for s in extension_specs(weighted)] == [{"score": "weighted"}]
    assert sparse_linears(sparsify_activations(weighted, {path: 0.2}))[path].score == "magnitude"
    with pytest.raises(SparsityError, match=r"score must be one of \['magnitude', 'weighted', 'scaled'\], "
                                            r"got 'wina'"):
        sparsify_activations(dense, {path: 0.2}, score="wina")


def test_weighted_calibration_zeroes_the_target_fraction_of_each_linear(dense, batches, dense_inputs):
    """Weighted scores are histogrammed per Linear (q/k/v share an input, not a scale): the thresholds zero the
    fraction p of |x_i| * ||W_i|| of each Linear's calibration inputs."""
    paths = ["layers.0.self_attn.q_proj", "layers.0.self_attn.k_proj", "layers.1.mlp.down_proj"]
    wcal = calibrate(dense, batches, paths, score="weighted")
    assert wcal.score == "weighted" and wcal.shared == {p: p for p in paths}
    modules = module_paths(dense)
    norms = {p: np.linalg.norm(np.asarray(modules[p].kernel.get_value()), axis=1) for p in paths}
    t = wcal.thresholds(0.5)
    for p in paths:
        assert abs(float(np.mean(dense_inputs[p] * norms[p] <= t[p])) - 0.5) <= 0.005, p
    assert t[paths[0]] != t[paths[1]]  # one input, two scales
    ev = evaluate(sparsify_activations(dense, {paths[2]: t[paths[2]]}, score="weighted"), batches)
    assert abs(ev.sparsity()[paths[2]] - 0.5) <= 0.02


def test_sparsify_replaces_updates_and_keeps_other_extensions(dense):
    from configurable_fm.bricks import adapters

    lora = adapters.attach(dense, "lora", "layers.0.self_attn.q_proj", rank=2, alpha=4, seed=0)
    sparse = sparsify_activations(lora, {"layers.1.mlp.down_proj": 0.3, "layers.0.self_attn.k_proj": 0.1})
    kinds = {s["path"]: s["kind"] for s in extension_specs(sparse)}
    assert kinds == {"layers.0.self_attn.q_proj": "lora", "layers.1.mlp.down_proj": KIND,
                     "layers.0.self_attn.k_proj": KIND}
    check_consistent(sparse, "test")
    again = sparsify_activations(sparse, {"layers.1.mlp.down_proj": 0.7})
    assert thresholds_of(again) == pytest.approx({"layers.1.mlp.down_proj": 0.7, "layers.0.self_attn.k_proj": 0.1})
    assert thresholds_of(sparse)["layers.1.mlp.down_proj"] == pytest.approx(0.3)  # the input is unchanged
    with pytest.raises(SparsityError, match=r"layers\.0\.self_attn\.q_proj is a LoRALinear \(an extension of kind "
                                            r"'lora'\), not a Linear"):
        sparsify_activations(lora, {"layers.0.self_attn.q_proj": 0.1})
    back = desparsify(again, ["layers.1.mlp.down_proj"])
    assert list(thresholds_of(back)) == ["layers.0.self_attn.k_proj"]


@pytest.mark.slow  # CI time
def test_orbax_round_trip_to_hf_refusal_and_desparsify(dense, cal, tmp_path):
    ids = jnp.asarray(windows(4)[0]["inputs"])
    sparse = sparsify_activations(dense, cal.thresholds(0.5))
    logits = np.asarray(sparse(ids))
    assert not np.array_equal(logits, np.asarray(dense(ids)))
    restored = orbax_io.load_model(orbax_io.save_model(sparse, tmp_path / "sparse"))
    assert thresholds_of(restored) == thresholds_of(sparse)
    np.testing.assert_array_equal(np.asarray(restored(ids)), logits)
    assert (tmp_path / "sparse" / "variables").is_dir()  # the thresholds are not parameters
    with pytest.raises(UnsupportedModel, match=r"layers\.0\.mlp\.down_proj \(activation_sparsity\)"):
        to_hf(sparse, tmp_path / "hf")
    back = desparsify(restored)
    assert extension_specs(back) == [] and not sparse_linears(back)
    np.testing.assert_array_equal(np.asarray(back(ids)), np.asarray(dense(ids)))


# ------------------------------------------------------------------------------------------------ calibration
def test_histogram_and_quantiles_by_hand():
    bins = LogBins(lo=0, hi=2, per_octave=1)  # bins: [0, 1), [1, 2), [2, 4), [4, inf)
    x = jnp.asarray([[[0.0, -0.5, 1.0, -1.5, 2.0, 3.9, 4.0, -100.0, np.nan, 1.2]]], jnp.float32)
    m = jnp.ones((1, 1), jnp.float32)
    np.testing.assert_array_equal(np.asarray(AbsHistogram(bins).batch(x, m)), [2, 3, 2, 2])
    np.testing.assert_array_equal(np.asarray(AbsHistogram(bins).batch(x, jnp.zeros((1, 1)))), [0, 0, 0, 0])
    counts = np.asarray([2, 4, 2, 0])
    assert threshold_from_counts(counts, bins, 0.5) == pytest.approx(2 ** 0.5)  # half-way through [1, 2) in log2
    assert threshold_from_counts(counts, bins, 0.125) == pytest.approx(0.5)  # bin 0 is linear in [0, 1)
    assert threshold_from_counts(counts, bins, 0.75) == pytest.approx(2.0)
    assert threshold_from_counts(counts, bins, 0.0) == 0.0
    for p in (0.1, 0.3, 0.5, 0.6, 0.9):
        assert fraction_from_counts(counts, bins, threshold_from_counts(counts, bins, p)) == pytest.approx(p)
    assert fraction_from_counts(counts, bins, -1.0) == 0.0
    with pytest.raises(SparsityError, match=r"lies above 2\^2 \(LogBins.hi\)"):
        threshold_from_counts(np.asarray([1, 0, 0, 3]), bins, 0.5, "layers.0.mlp.down_proj")


def test_inputs_read_by_several_linears_are_histogrammed_once(dense, gpt2, cal):
    assert cal.shared["layers.1.self_attn.k_proj"] == cal.shared["layers.1.self_attn.v_proj"] \
        == "layers.1.self_attn.q_proj"
    assert cal.shared["layers.1.mlp.up_proj"] == "layers.1.mlp.gate_proj"
    assert all(cal.shared[p] == p for p in cal.paths if p.endswith(("o_proj", "down_proj", "q_proj", "gate_proj")))
    assert cal.counts["layers.2.self_attn.v_proj"] is cal.counts["layers.2.self_attn.q_proj"]
    assert cal.tokens == 2 * 4 * T
    assert cal.counts["layers.0.mlp.down_proj"].sum() == 2 * 4 * T * LLAMA["intermediate_size"]
    g = calibrate(gpt2, windows(1, 1))
    assert all(g.shared[p] == p for p in g.paths) and len(g.paths) == 8


@pytest.mark.parametrize("p", [0.25, 0.5, 0.75])
def test_calibrated_thresholds_zero_the_target_fraction_of_the_calibration_data(cal, dense_inputs, p):
    thresholds = cal.thresholds(p)
    achieved = {q: float(np.mean(dense_inputs[q] <= thresholds[q])) for q in cal.paths}
    worst = max(abs(a - p) for a in achieved.values())
    assert worst <= 0.005, achieved  # 2048 values per Linear: a few values off at most
    assert cal.fraction_below(thresholds) == pytest.approx({q: p for q in cal.paths}, abs=1e-9)


@pytest.mark.parametrize("path", [  # CI: a Linear reading its own input and one sharing it (gate/up); o_proj slow
    "layers.1.mlp.down_proj", pytest.param("layers.2.self_attn.o_proj", marks=pytest.mark.slow),
    "layers.0.mlp.gate_proj"])
def test_one_sparsified_linear_achieves_the_target_on_the_calibration_data(dense, batches, cal, path):
    p = 0.6
    ev = evaluate(sparsify_activations(dense, {path: cal.thresholds(p)[path]}), batches)
    assert list(ev.sparsity()) == [path]
    assert abs(ev.sparsity()[path] - p) <= 0.02
    assert ev.entries[path] == 2 * 4 * T * cal.shapes[path][0]


def test_evaluate_counts_and_perplexity_against_direct_computation(dense, batches, cal):
    sparse = sparsify_activations(dense, cal.thresholds(0.5))
    ev = evaluate(sparse, batches)
    thresholds = thresholds_of(sparse)
    zeroed = {p: 0 for p in thresholds}
    nll = []
    for b in batches:
        logits, values = capture(sparse, [f"{p}.input" for p in thresholds], jnp.asarray(b["inputs"]))
        for p, t in thresholds.items():
            zeroed[p] += int(np.sum(np.abs(np.asarray(values[f"{p}.input"])) <= np.float32(t)))
        nll.append(np.asarray(next_token_nll(logits, jnp.asarray(b["targets"]))))
    for p in thresholds:
        assert ev.sparsity()[p] == pytest.approx(zeroed[p] / ev.entries[p], abs=1e-12)
    assert ev.perplexity() == pytest.approx(float(np.exp(np.mean(np.concatenate(nll)))), rel=1e-6)
    assert ev.scored_tokens() == 2 * 4 * T
    # The inputs of the first layer's q/k/v do not depend on any other sparsified Linear: the target holds there.
    assert all(abs(ev.sparsity()[f"layers.0.self_attn.{n}_proj"] - 0.5) <= 0.02 for n in "qkv")
    weights = {p: np.prod(cal.shapes[p]) for p in thresholds}
    expected = sum(weights[p] * ev.sparsity()[p] for p in thresholds) / sum(weights.values())
    assert ev.mean_sparsity(weighted=True) == pytest.approx(expected)
    dense_ev = evaluate(dense, batches)
    assert dense_ev.sparsity() == {} and np.isnan(dense_ev.mean_sparsity())
    assert dense_ev.perplexity() < ev.perplexity()


def test_dense_prefix_keeps_the_first_positions_dense(dense, batches, cal):
    sparse = sparsify_activations(dense, cal.thresholds(0.6))
    prefix = 6
    ev = evaluate(sparse, batches, dense_prefix=prefix)
    full = evaluate(dense, batches)
    np.testing.assert_allclose(ev.nll[:prefix], full.nll[:prefix], rtol=1e-5)  # causal: the prefix is dense
    assert not np.allclose(ev.nll[prefix:], full.nll[prefix:], rtol=1e-3)
    assert ev.scored_tokens() == 2 * 4 * (T - prefix)
    assert ev.perplexity() == pytest.approx(np.exp(ev.nll[prefix:].sum() / ev.tokens[prefix:].sum()))
    path = "layers.0.self_attn.q_proj"  # its input is dense up to the mask: count the zeroed entries at t >= prefix
    t = thresholds_of(sparse)[path]
    zeroed = sum(int(np.sum(np.abs(np.asarray(capture(sparse, f"{path}.input", jnp.asarray(b["inputs"]))[1][
        f"{path}.input"]))[:, prefix:] <= np.float32(t))) for b in batches)
    assert ev.sparsity()[path] == pytest.approx(zeroed / ev.entries[path], abs=1e-12)
    logits = intervene(sparse, {"**.kept": replace(True, positions=list(range(prefix)))},
                       jnp.asarray(batches[0]["inputs"]))
    np.testing.assert_allclose(np.asarray(logits)[:, :prefix], np.asarray(dense(jnp.asarray(batches[0]["inputs"])))[
        :, :prefix], rtol=1e-5, atol=1e-6)


def test_perplexity_change_and_its_standard_error_by_hand(dense, batches, cal):
    """The paired change against the two models' per-window NLL computed directly, with the ratio estimator's SE
    written out; a reference over other windows is refused."""
    sparse = sparsify_activations(dense, cal.thresholds(0.5))
    ev, ref = evaluate(sparse, batches, dense_prefix=3), evaluate(dense, batches)
    assert ev.window_nll.shape == ev.window_tokens.shape == (8, T)
    a = np.concatenate([np.asarray(next_token_nll(intervene(sparse, {"**.kept": replace(True, positions=[0, 1, 2])},
                                                            jnp.asarray(b["inputs"])), jnp.asarray(b["targets"])))
                        for b in batches])[:, 3:].sum(axis=1)
    b_ = np.concatenate([np.asarray(next_token_nll(dense(jnp.asarray(b["inputs"])), jnp.asarray(b["targets"])))
                         for b in batches])[:, 3:].sum(axis=1)
    n = np.full(8, T - 3.0)
    d = (a - b_).sum() / n.sum()
    se = np.sqrt(8 / 7 * np.sum((a - b_ - d * n) ** 2)) / n.sum()
    change, change_se = perplexity_change(ev, ref)  # start defaults to ev's dense_prefix, 3
    assert change == pytest.approx(ev.perplexity() / ref.perplexity(3) - 1, rel=1e-9)
    assert change == pytest.approx(np.expm1(d), rel=1e-4) and change_se == pytest.approx(np.exp(d) * se, rel=1e-3)
    assert change != 0 and change_se > 0
    assert perplexity_change(ref, ref) == (0.0, 0.0)
    with pytest.raises(SparsityError, match="scored different windows"):
        perplexity_change(ev, evaluate(dense, batches[:1]))
    one = [{**batches[0], "mask": np.array([1, 0, 0, 0], np.int32)}]  # a short last batch: rows 1-3 padding
    lone = evaluate(dense, one)
    assert lone.window_nll.shape[0] == 4 and lone.scored_windows() == 1 and ev.scored_windows() == 8
    with pytest.raises(SparsityError, match="1 scored window"):
        perplexity_change(lone, lone)


# ------------------------------------------------------------------------------------------------ greedy
def test_greedy_allocation_reaches_each_level(dense, batches, cal):
    levels = (0.3, 0.5)
    alloc = greedy_allocation(dense, cal, batches[:1], levels=levels, step=0.1)
    groups = blocks_of(cal.paths)
    assert list(groups) == ["layers.0", "layers.1", "layers.2"]
    for lv in levels:
        assert set(alloc[lv]) == set(cal.paths)
        for block, paths in groups.items():
            w = np.asarray([np.prod(cal.shapes[p]) for p in paths], np.float64)
            s = float(np.dot(w, [alloc[lv][p] for p in paths]) / w.sum())
            assert lv - 1e-9 <= s <= lv + 0.1 / len(paths) + 1e-9  # one step raises it by step / units


@pytest.mark.parametrize("score", [  # weighted: slow (CI time ~7 s); 'scaled' takes greedy_allocation's path of a
    # calibration whose score is not the magnitude (score and scales from the calibration), and the weighted
    # calibration is test_weighted_calibration_zeroes_the_target_fraction_of_each_linear's
    "magnitude", pytest.param("weighted", marks=pytest.mark.slow), "scaled"])
def test_greedy_allocations_first_step_is_the_least_error(dense, batches, cal, score):
    """The first step of each block, by brute force: sparsify each Linear alone by its step, run the block on the
    dense input, and compare the output error; the greedy must have picked the least one. The thresholds of a
    'weighted' or 'scaled' calibration are on its scores' scale: the candidates are built with that score. 'scaled'
    multiplies the magnitude's choice in each block by 1000 (the same entries dropped, so the same errors), which
    the greedy once applied to |x|: that Linear then zeroed its whole input and was never chosen."""
    step = 0.1 / 7
    if score == "weighted":
        cal = calibrate(dense, batches, score=score)
    elif score == "scaled":
        chosen = {p for p, v in greedy_allocation(dense, cal, batches[:1], levels=(step,), step=0.1)[step].items()
                  if v > 0}
        scales = {p: np.full(cal.shapes[p][0], 1000.0 if p in chosen else 1.0, np.float32) for p in cal.paths}
        cal = calibrate(dense, batches, score=score, scales=scales)
    groups = blocks_of(cal.paths)
    first = greedy_allocation(dense, cal, batches[:1], levels=(step,), step=0.1)[step]
    ids = jnp.asarray(batches[0]["inputs"])
    _, ref = capture(dense, [f"{b}.{k}" for b in groups for k in ("input", "output")], ids)
    for block, paths in groups.items():
        w = np.asarray([np.prod(cal.shapes[p]) for p in paths], np.float64)
        errors = {}
        for p, wp in zip(paths, w):
            d = 0.1 * w.mean() / wp
            model = sparsify_activations(dense, {p: cal.thresholds({p: d})[p]}, score=cal.score, scales=cal.scales)
            _, out = capture(model, f"{block}.output", ids,
                             interventions={f"{block}.input": replace(ref[f"{block}.input"])})
            errors[p] = float(np.sum((np.asarray(out[f"{block}.output"]) - np.asarray(ref[f"{block}.output"])) ** 2))
        chosen = [p for p in paths if first[p] > 0]
        assert chosen == [min(errors, key=errors.get)], (block, errors, first)


def test_greedy_allocation_reads_the_attention_mask(dense, batches, cal):
    """Left-padded rows with their attention_mask give the allocation of the same rows unpadded (RoPE is relative, so
    the shifted positions change nothing; without the mask the real tokens would attend to the pads)."""
    pad = 5
    ids = np.asarray(batches[0]["inputs"])
    padded = {"inputs": np.concatenate([np.zeros((ids.shape[0], pad), ids.dtype), ids], 1),
              "attention_mask": np.concatenate([np.zeros((ids.shape[0], pad), np.int32),
                                                np.ones(ids.shape, np.int32)], 1)}
    levels = (0.2, 0.4, 0.6)
    want = greedy_allocation(dense, cal, [{"inputs": ids}], levels=levels, step=0.1)
    assert greedy_allocation(dense, cal, [padded], levels=levels, step=0.1) == want


# ------------------------------------------------------------------------------------------------ errors
@pytest.mark.parametrize("case, pattern", [
    (lambda m, c: sparsify_activations(m, {"layers.1.mlp.down_prj": 0.1}),
     r"no module at 'layers\.1\.mlp\.down_prj'; close matches: \['layers\.1\.mlp\.down_proj'"),
    (lambda m, c: sparsify_activations(m, {"layers.0.mlp": 0.1}), r"layers\.0\.mlp is a LlamaMLP, not a Linear"),
    (lambda m, c: sparsify_activations(m, {"layers.*.mlp.down_proj": 0.1}), r"is not a module path"),
    (lambda m, c: sparsify_activations(m, {"layers.0.mlp.down_proj": float("nan")}),
     r"the threshold for layers\.0\.mlp\.down_proj is nan"),
    (lambda m, c: sparsify_activations(m, {"layers.0.mlp.down_proj": "0.1"}), r"must be a number, got '0\.1'"),
    (lambda m, c: sparsify_activations(m, {}), r"non-empty mapping"),
    (lambda m, c: c.thresholds(-0.1), r"sparsity must be a number in \[0, 1\).*got -0\.1"),
    (lambda m, c: c.thresholds(1.0), r"sparsity must be a number in \[0, 1\).*got 1\.0"),
    (lambda m, c: c.thresholds(float("nan")), r"got nan"),
    (lambda m, c: c.thresholds("half"), r"got 'half'"),
    (lambda m, c: c.thresholds({"layers.0.mlp.down_proj": 1.5}), r"sparsity for layers\.0\.mlp\.down_proj must"),
    (lambda m, c: c.thresholds({"layers.7.mlp.down_proj": 0.5}), r"\['layers\.7\.mlp\.down_proj'\] not calibrated"),
    (lambda m, c: calibrate(m, windows(0, 1), ["layers.0.mlp"]), r"layers\.0\.mlp is a LlamaMLP, not a Linear"),
    (lambda m, c: calibrate(m, windows(0, 1), ["layers.*.attn.*"]), r"no module at 'layers\.\*\.attn\.\*'"),
    (lambda m, c: calibrate(m, [], None), r"calibrate: no batches"),
    (lambda m, c: desparsify(m), r"has no activation-sparsity module \(kind 'activation_sparsity'\)"),
    (lambda m, c: desparsify(sparsify_activations(m, {"layers.0.mlp.up_proj": 0.1}), ["layers.0.mlp.down_proj"]),
     r"\['layers\.0\.mlp\.down_proj'\] is not activation-sparsity"),
    (lambda m, c: evaluate(m, windows(0, 1), dense_prefix=T), r"dense_prefix=16 leaves no position"),
    (lambda m, c: evaluate(m, windows(0, 1), dense_prefix=-1), r"dense_prefix must be an int >= 0"),
    (lambda m, c: greedy_allocation(m, c, windows(0, 1), levels=(0.5,), max_sparsity=0.4),
     r"levels must lie in \(0, max_sparsity=0\.4\]"),
    (lambda m, c: greedy_allocation(m, c, windows(0, 1), step=0.0), r"step must be a number in \(0, 1\)"),
    (lambda m, c: LogBins(lo=3, hi=1), r"need -126 < lo < hi < 128"),
    (lambda m, c: SparseLinear.from_options(m.layers[0].mlp.down_proj, {"threshold": 1}),
     r"takes only the option .score."),
])
def test_errors_name_their_argument(dense, cal, case, pattern):
    with pytest.raises(SparsityError, match=pattern):
        case(dense, cal)


def test_models_without_default_targets_are_named():
    bert = random_model(BERT, 0)
    with pytest.raises(SparsityError, match=r"no default targets for a BertConfig model; name the Linear paths"):
        resolve_targets(bert)
    assert resolve_targets(bert, ["encoder.layer.*.intermediate.dense"]) == [
        "encoder.layer.0.intermediate.dense", "encoder.layer.1.intermediate.dense"]


# ------------------------------------------------------------------------------------------------ the study
@pytest.mark.slow
@pytest.mark.real_model
def test_the_study_runs_on_smollm2(tmp_path):
    from configurable_fm.models import registry

    if not registry.is_installed("smollm2-135m-instruct"):
        pytest.skip("smollm2-135m-instruct is not installed")
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from experiments.analysis.activation_sparsity import get_config, run

    config = get_config("test")
    config.results_dir = str(tmp_path)
    config.teal_protocol = ()
    config.greedy.levels = ()
    results = run(config)
    rows = {(r["kind"], r["domain"]): r for r in results["rows"]}
    assert abs(rows[("uniform", "english")]["sparsity_weighted"] - 0.5) < 0.1
    assert rows[("uniform", "english")]["perplexity"] > rows[("dense", "english")]["perplexity"]
    assert re.search(r"\| dense \| 0\.00 \| all \| code \|", (tmp_path / "results.md").read_text())
    weighted = rows[("ffn_weighted", "english")]  # the down_proj-only rows, scored |h_i| * ||W_i||
    assert abs(weighted["sparsity_down_proj"] - 0.5) < 0.1 and weighted["sparsity_weighted"] < 0.2
    for kind in ("ffn_fisher", "ffn_fisher_allocated"):  # scored |h_i| s_i (uniform, then the allocated levels)
        row = rows[(kind, "english")]
        assert abs(row["sparsity_down_proj"] - 0.5) < 0.1 and abs(row["calibration_fraction"] - 0.5) < 0.05, kind
