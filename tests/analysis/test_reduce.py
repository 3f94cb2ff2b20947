"""Streamed reductions (analysis/reduce.py): every reduction against numpy on the concatenated masked-in values of
several batches (loss_mask, row mask, attention_mask rules), float64 host accumulation, interventions during the
reduction, a mesh of 8 fake CPU devices against the unsharded result, the token mask, progress lines, errors."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configurable_fm import sharding as shd
from configurable_fm.analysis import (
    CountAbove, Gram, Histogram, Mean, MeanSquare, Sum, TapError, add, capture, mask, progress_bar, reduce_over, token_mask)
from tests.analysis.tiny import BERT, LLAMA, random_model

B, L = 3, 6


@pytest.fixture(scope="module")
def llama():
    return random_model(LLAMA, 0)


def batches():
    """Three batches: task rows (loss_mask, last row padding), an attention_mask, plain packed rows."""
    rs = np.random.RandomState(1)
    ids = [rs.randint(0, 32, (B, L)).astype(np.int32) for _ in range(3)]
    loss_mask = np.zeros((B, L), np.float32)
    loss_mask[0, 2:4] = loss_mask[1, 4:6] = loss_mask[2, 1:3] = 1.0
    attention = np.ones((B, L), np.int32)
    attention[0, 4:] = attention[2, 1:] = 0
    return [{"inputs": ids[0], "targets": ids[0], "loss_mask": loss_mask, "mask": np.array([1, 1, 0], np.float32)},
            {"inputs": ids[1], "targets": ids[1], "attention_mask": attention},
            {"inputs": ids[2], "targets": ids[2]}]


def masked_values(model, point):
    """Concatenated values at `point` of the masked-in tokens of every batch (float64), by capture."""
    graphdef, state = nnx.split(model)
    run = jax.jit(lambda s, ids: capture(nnx.merge(graphdef, s), point, ids)[1][point])
    return np.concatenate([np.asarray(run(state, jnp.asarray(b["inputs"])), np.float64)[token_mask(b) > 0]
                           for b in batches()])


def test_token_mask_rules():
    b0, b1, b2 = batches()
    np.testing.assert_array_equal(token_mask(b0), [[1, 1, 1, 1, 0, 0], [1] * 6, [0] * 6])  # up to the last scored
    np.testing.assert_array_equal(token_mask(b1), b1["attention_mask"])
    np.testing.assert_array_equal(token_mask(b2), np.ones((B, L)))
    with pytest.raises(ValueError, match=r"batch 3: attention_mask is \(3, 5\) but inputs are \(3, 6\)"):
        token_mask({**b2, "attention_mask": np.ones((3, 5))}, "batch 3")
    with pytest.raises(KeyError, match="batch 0 lacks 'inputs'"):
        token_mask({"targets": b2["targets"]}, "batch 0")
    # 'token_mask' picks positions on top of the other rules (the forward does not see it)
    picked = np.zeros((B, L))
    picked[:, 2] = 1
    np.testing.assert_array_equal(token_mask({**b0, "token_mask": picked}), [[0, 0, 1, 0, 0, 0], [0, 0, 1, 0, 0, 0],
                                                                            [0] * 6])
    with pytest.raises(ValueError, match=r"batch 2: token_mask is \(3, 5\) but inputs are \(3, 6\)"):
        token_mask({**b2, "token_mask": np.ones((3, 5))}, "batch 2")


def test_reductions_equal_numpy_over_masked_batches(llama):
    hist = Histogram(-0.2, 0.2, 8)
    per_feature = Histogram(-0.1, 0.1, 4, per_feature=True, name="histogram_per_feature")
    spec = {"layers.*.mlp.hidden": ["sum", "mean", "mean_square", "gram", CountAbove(0.05), hist, per_feature,
                                    "values"],
            "layers.0.self_attn.heads": [Gram(normalize=True), Mean()]}
    got = reduce_over(llama, batches(), spec, progress=False)
    n = sum(int(token_mask(b).sum()) for b in batches())
    assert got.tokens == n == 4 + 6 + (6 + 4 + 1) + 18 and got.batches == 3
    assert list(got) == ["layers.0.self_attn.heads", "layers.0.mlp.hidden", "layers.1.mlp.hidden",
                         "layers.2.mlp.hidden"] and set(got.visits.values()) == {1}

    h = masked_values(llama, "layers.1.mlp.hidden")  # (N, F)
    r = got["layers.1.mlp.hidden"]
    np.testing.assert_allclose(r["sum"], h.sum(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(r["mean"], h.mean(0), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(r["mean_square"], (h * h).mean(0), rtol=1e-5, atol=1e-8)
    np.testing.assert_allclose(r["gram"], h.T @ h, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(r["count_above"], (h > 0.05).sum(0))
    np.testing.assert_array_equal(r["histogram"], np.histogram(h, bins=8, range=(-0.2, 0.2))[0])
    np.testing.assert_array_equal(r["histogram_per_feature"],
                                  [np.histogram(h[:, j], bins=4, range=(-0.1, 0.1))[0] for j in range(h.shape[1])])
    np.testing.assert_allclose(r["values"], h, rtol=1e-6)
    heads = masked_values(llama, "layers.0.self_attn.heads")  # (N, heads, head dim): per-head Grams
    np.testing.assert_allclose(got["layers.0.self_attn.heads"]["second_moment"],
                               np.einsum("nhi,nhj->hij", heads, heads) / n, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(got["layers.0.self_attn.heads"]["mean"], heads.mean(0), rtol=1e-5, atol=1e-7)

    host = reduce_over(llama, batches(), {"layers.1.mlp.hidden": ["gram", CountAbove(0.05), "mean"]},
                       accumulate="float64", progress=False)["layers.1.mlp.hidden"]
    assert host["gram"].dtype == np.float64 and host["count_above"].dtype == np.int64
    np.testing.assert_allclose(host["gram"], h.T @ h, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(host["count_above"], r["count_above"])
    np.testing.assert_allclose(host["mean"], h.mean(0), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("shape", [(2, 3, 4), (2, 3, 2, 4)])
def test_non_finite_values_at_masked_out_tokens_do_not_reach_the_sums(shape):
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    m = np.array([[1, 1, 0], [1, 0, 0]], np.float32)
    x[0, 2], x[1, 1] = np.nan, np.inf  # e.g. padded rows
    kept = x[m > 0]  # (N, ...)
    for r, want in [(Sum(), kept.sum(0)), (Mean(), kept.sum(0)), (MeanSquare(), (kept * kept).sum(0)),
                    (Gram(), np.einsum("n...i,n...j->...ij", kept, kept))]:
        np.testing.assert_allclose(np.asarray(r.batch(jnp.asarray(x), jnp.asarray(m))), want, rtol=1e-6,
                                   atol=1e-6, err_msg=type(r).__name__)


def test_float64_totals_gather_device_runs_of_batches(llama, monkeypatch):
    """accumulate='float64': runs of HOST_FLUSH_BATCHES batches summed on the device, then on the host; the same
    totals whether each batch, two, or all three (the remainder flushed at the end) make a run."""
    import configurable_fm.analysis.reduce as R

    h = masked_values(llama, "layers.1.mlp.hidden")
    for flush in (1, 2, 3, 16):
        monkeypatch.setattr(R, "HOST_FLUSH_BATCHES", flush)
        got = reduce_over(llama, batches(), {"layers.1.mlp.hidden": ["gram", CountAbove(0.05)]},
                          accumulate="float64", progress=False)
        r = got["layers.1.mlp.hidden"]
        assert got.batches == 3 and r["gram"].dtype == np.float64 and r["count_above"].dtype == np.int64
        np.testing.assert_allclose(r["gram"], h.T @ h, rtol=1e-5, atol=1e-6, err_msg=str(flush))
        np.testing.assert_array_equal(r["count_above"], (h > 0.05).sum(0))


def test_interventions_apply_during_reductions(llama):
    zeroed = np.array([0, 3, 7])
    got = reduce_over(llama, batches()[2:], {"layers.1.mlp.hidden": "mean", "layers.2.input": "mean"},
                      interventions={"layers.1.mlp.hidden": mask(zeroed), "layers.0.output": add(jnp.ones(16))},
                      progress=False)
    assert np.all(np.asarray(got["layers.1.mlp.hidden"]["mean"])[zeroed] == 0)
    plain = reduce_over(llama, batches()[2:], {"layers.1.mlp.hidden": "mean"}, progress=False)
    assert not np.allclose(got["layers.1.mlp.hidden"]["mean"], plain["layers.1.mlp.hidden"]["mean"])


def test_reduce_over_on_a_mesh_equals_unsharded(llama):
    mesh = shd.make_mesh((2, 2, 2))
    rs = np.random.RandomState(2)
    data = [{"inputs": rs.randint(0, 32, (4, L)).astype(np.int32)} for _ in range(2)]
    spec = {"layers.*.mlp.down_proj.input": "gram", "layers.2.output": ["mean", CountAbove(0.0)]}
    sharded = reduce_over(llama, data, spec, mesh=mesh, progress=False)
    plain = reduce_over(llama, data, spec, progress=False)
    assert sharded.tokens == plain.tokens == 48
    for point in plain:
        for name, value in plain[point].items():
            np.testing.assert_allclose(sharded[point][name], value, rtol=1e-5, atol=1e-6, err_msg=f"{point} {name}")


def test_progress_lines_without_a_terminal():
    lines = []
    assert list(progress_bar(range(3), total=3, desc="grams", log=lines.append)) == [0, 1, 2]
    assert len(lines) == 1 and lines[0].startswith("grams: 3/3 batch done")


def test_reduce_errors_name_the_point(llama):
    with pytest.raises(TapError, match=r"reduce_over: pattern 'layers.\*.mlp.hiden' matches no tap point.*"
                                       r"'layers.\*.mlp.hidden'"):
        reduce_over(llama, batches()[2:], {"layers.*.mlp.hiden": "mean"}, progress=False)
    bert = random_model(BERT, 3)
    with pytest.raises(TapError, match=r"embeddings.position_embeddings.input is \(6,\); reductions need values whose "
                                       r"leading axes are the batch's \(B, L\) = \(3, 6\)"):
        reduce_over(bert, batches()[2:], {"embeddings.position_embeddings.input": "sum"}, progress=False)
    with pytest.raises(ValueError, match="reduce_over: no batches"):
        reduce_over(llama, [], {"layers.0.output": "mean"}, progress=False)
    with pytest.raises(TypeError, match="'median' .* is not a Reduction"):
        reduce_over(llama, batches(), {"layers.0.output": "median"}, progress=False)
    with pytest.raises(TapError, match="layers.0.output gets two different reductions named 'count_above'"):
        reduce_over(llama, batches()[2:], {"layers.0.output": CountAbove(0.0), "layers.*.output": CountAbove(1.0)},
                    progress=False)
    with pytest.raises(ValueError, match="Histogram: need finite lo < hi"):
        Histogram(1.0, -1.0, 4)


def test_the_step_computes_the_forward_only_up_to_the_last_reduced_point(llama):
    """The reduction step discards the forward's output, so XLA drops every layer after the last reduced point
    (the edit statistics of layer 0 cost one layer, not the model): the compiled step for a point in layer 0 has
    fewer matmuls than the one for the same point in the last layer."""
    from configurable_fm.analysis import reduce as reduce_module

    graphdef, state = nnx.split(llama)
    ids, mask = jnp.zeros((B, L), jnp.int32), jnp.ones((B, L), jnp.float32)

    def dots(layer):
        point = f"layers.{layer}.mlp.down_proj.input"
        plan = reduce_module._Plan((point,), ((reduce_module._as_reduction("gram", point),),),
                                   reduce_module.model_inputs, jax.tree.structure([]), ())
        compiled = reduce_module._step.lower(graphdef, plan, state, {"inputs": ids}, mask, [], None).compile()
        return compiled.as_text().count(" dot(")

    first, last = dots(0), dots(LLAMA["num_layers"] - 1)
    assert 0 < first < last / 2, (first, last)
