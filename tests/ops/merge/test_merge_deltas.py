"""merge_deltas: task-vector merges of deltas equal tree.merge of the models, hand-computed cases, refusals."""
import jax.numpy as jnp
import numpy as np
import pytest

from configurable_fm.bricks import Delta, Dense, LowRank, deltas, flat_params
from configurable_fm.ops.merge import TASK_VECTOR_METHODS, MergeInputError, ParameterError, get_method, merge_deltas
from configurable_fm.ops.merge import tree
from tests.ops.merge import test_tree
from tests.ops.merge.test_tree import TOKENS

models = test_tree.models  # its fixture: the same three random llamas


@pytest.fixture(scope="module")
def tvs(models):
    base, a, b = models
    return [deltas.diff(base, a, source="a"), deltas.diff(base, b, source="b")]


def _close(got, want, atol=1e-6):
    assert list(got) == list(want)
    for k in want:
        np.testing.assert_allclose(np.asarray(got[k]), np.asarray(want[k]), atol=atol, rtol=0, err_msg=k)


def test_task_arithmetic_on_deltas_equals_tree_merge(models, tvs):
    base, a, b = models
    mp = [{"weight": 0.7}, {"weight": [0.2, 1.0]}]  # a depth gradient, resolved per tensor as tree.merge does
    tv = merge_deltas("task_arithmetic", tvs, parameters={"lambda": 0.9}, model_parameters=mp)
    assert all(isinstance(t, Dense) and t.value.dtype == jnp.float32 for t in tv.values())
    want = tree.merge("task_arithmetic", base, [a, b], parameters={"lambda": 0.9}, model_parameters=mp)
    merged = deltas.apply(base, tv)
    _close(flat_params(merged), flat_params(want))
    np.testing.assert_allclose(merged(TOKENS), want(TOKENS), atol=1e-5)
    assert tv.kind == "task_vector" and tv.source == "task_arithmetic(delta_0, delta_1)"
    assert tv.metadata["merge"] == {"method": "task_arithmetic", "inputs": ["delta_0", "delta_1"],
                                    "sources": ["a", "b"], "seed": 0, "parameters": {"lambda": 0.9},
                                    "model_parameters": mp}


@pytest.mark.parametrize("method,params", [
    ("ties", {"density": 0.5}),
    ("dare_ties", {"density": 0.6}),
    ("breadcrumbs_ties", {"density": 0.7, "gamma": 0.1}),
    ("della", {"density": 0.6, "epsilon": 0.2}),
    ("sce", {"select_topk": 0.5}),
])
def test_sparsifying_methods_on_deltas_equal_tree_merge(models, tvs, method, params):
    """Same task vectors, same masks (magnitude ranks, sign election, and the random ones from the same seed)."""
    base, a, b = models
    per_model = {k: v for k, v in params.items() if k in get_method(method).per_model}
    shared = {k: v for k, v in params.items() if k not in per_model}
    mp = None if method == "sce" else [{"weight": 1.0, **per_model}, {"weight": 0.5, **per_model}]
    flats = [flat_params(m) for m in models]
    want = tree.merge(method, flats[0], flats[1:], parameters=shared, model_parameters=mp, seed=7)
    got = deltas.apply(flats[0], merge_deltas(method, tvs, parameters=shared, model_parameters=mp, seed=7))
    _close(got, want)


def test_ties_by_hand_and_named_deltas():
    """TIES with density 0.5: keep the larger half of each task vector, elect the sign of the weighted sum,
    average the agreeing entries (normalize by the agreeing weights)."""
    d1 = Delta({"w": jnp.array([4.0, -1.0, 2.0, 0.5])})
    d2 = Delta({"w": jnp.array([-1.0, -3.0, 0.25, 2.0])})
    # trimmed: d1 -> [4, 0, 2, 0], d2 -> [0, -3, 0, 2]; weights 1, 1: signs +, -, +, + (no conflicts left)
    out = merge_deltas("ties", {"x": d1, "y": d2}, parameters={"density": 0.5},
                       model_parameters={"x": {"weight": 1.0}, "y": {"weight": 1.0}})
    np.testing.assert_allclose(out["w"].materialize(), [4.0, -3.0, 2.0, 2.0])
    assert out.metadata["merge"]["inputs"] == ["x", "y"] and out.source == "ties(x, y)"


def test_low_rank_inputs_and_missing_paths_count_as_zero_change():
    lr = LowRank(jnp.array([[1.0], [2.0]]), jnp.array([[1.0, -1.0, 0.5]]), 2.0)  # 2 * [[1,-1,.5],[2,-2,1]]
    d1 = Delta({"w": lr, "only1": jnp.array([1.0, 1.0])})
    d2 = Delta({"w": jnp.ones((2, 3)), "only2": jnp.array([3.0])})
    out = merge_deltas("task_arithmetic", [d1, d2], model_parameters=[{"weight": 0.5}, {"weight": 2.0}])
    assert list(out) == ["w", "only1", "only2"]
    np.testing.assert_allclose(out["w"].materialize(), [[3.0, 1.0, 2.5], [4.0, 0.0, 3.0]])
    np.testing.assert_allclose(out["only1"].materialize(), [0.5, 0.5])
    np.testing.assert_allclose(out["only2"].materialize(), [6.0])


def test_restricted_deltas_equal_tree_merge_of_the_edited_models(models, tvs):
    """A delta that skips some tensors merges like a model in which those tensors are unchanged."""
    base = models[0]
    mlp_only = deltas.restrict(tvs[1], "**.mlp.**")
    mp = [{"weight": 1.0}, {"weight": 1.0}]
    want = tree.merge("ties", base, [models[1], deltas.apply(base, mlp_only)], parameters={"density": 0.4},
                      model_parameters=mp)
    got = deltas.apply(base, merge_deltas("ties", [tvs[0], mlp_only], parameters={"density": 0.4},
                                          model_parameters=mp))
    _close(flat_params(got), flat_params(want))


def test_refusals_and_errors_are_clear(tvs):
    for method in ("linear", "slerp", "passthrough"):
        with pytest.raises(ValueError, match=rf"'{method}' is not a task-vector method.*task_arithmetic, ties, "):
            merge_deltas(method, tvs, parameters={"t": 0.5})
    with pytest.raises(ValueError, match="unknown merge method 'tie'"):
        merge_deltas("tie", tvs)
    with pytest.raises(ValueError, match="needs at least one delta"):
        merge_deltas("ties", [])
    with pytest.raises(TypeError, match="delta_1 is a dict"):
        merge_deltas("ties", [tvs[0], {"w": 1}])
    with pytest.raises(TypeError, match="not one Delta"):
        merge_deltas("ties", tvs[0])
    bad = [Delta({"w": jnp.zeros((2, 3)), "v": jnp.zeros(2)}), Delta({"w": jnp.zeros((3, 2)), "v": jnp.zeros(3)})]
    with pytest.raises(MergeInputError) as err:
        merge_deltas("task_arithmetic", bad, parameters={"weight": 1.0})
    msg = str(err.value)
    assert "w is (2, 3) in delta_0, (3, 2) in delta_1" in msg and "v is (2,) in delta_0, (3,) in delta_1" in msg
    with pytest.raises(ParameterError, match="missing required parameter 'weight' of model 'delta_0'"):
        merge_deltas("task_arithmetic", tvs)
    with pytest.raises(ParameterError, match="unknown parameter.*'densty'"):
        merge_deltas("ties", tvs, parameters={"weight": 1.0, "densty": 0.5})
    with pytest.raises(ParameterError, match=r"model_parameters for unknown delta\(s\) \['z'\]"):
        merge_deltas("ties", {"x": tvs[0]}, model_parameters={"z": {"weight": 1.0}})


def test_every_task_vector_method_is_registered_and_runs(tvs):
    """Every method on the three MLP tensors of one layer (one shape: one kernel compilation per method; the whole
    models are merged by the tests above)."""
    params = {"weight": 1.0, "density": 0.5}
    mlp = [deltas.restrict(t, "layers.1.mlp.**") for t in tvs]
    assert len(mlp[0]) == 3
    for method in TASK_VECTOR_METHODS:
        m = get_method(method)
        given = {k: v for k, v in params.items() if k in m.per_model}
        out = merge_deltas(method, mlp, parameters=given, seed=1)
        assert list(out) == list(mlp[0]), method
