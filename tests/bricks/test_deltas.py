"""Deltas: terms, diff/apply/rollback, the algebra (add, scale, restrict, norms, low_rank), disk, jit/vmap, errors."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from configurable_fm.bricks import (Delta, DeltaError, Dense, LowRank, Masked, SelectionError, deltas, flat_params,
                                    flat_state, load_bricks, load_delta, save_delta, with_params)
from configurable_fm.interop.safetensors_io import CheckpointError
from tests.analysis.tiny import random_model

SPEC = {"family": "llama", "vocab_size": 16, "hidden_size": 8, "intermediate_size": 12, "num_layers": 2,
        "num_heads": 2, "num_kv_heads": 1}
UP0 = "layers.0.mlp.up_proj.kernel"  # (8, 12)
TOKENS = jnp.array([[1, 5, 7, 2]], jnp.int32)

A = np.array([[1.0, 0.0], [2.0, 1.0], [0.0, -1.0]], np.float32)  # (3, 2)
B = np.array([[1.0, 2.0, 0.0, 1.0], [0.0, 1.0, 3.0, -2.0]], np.float32)  # (2, 4)
AB = np.array([[1, 2, 0, 1], [2, 5, 3, 0], [0, -1, -3, 2]], np.float32)  # A @ B by hand


@pytest.fixture(scope="module")
def models():
    """Two tiny llamas of SPEC with numpy-drawn weights (no per-shape compilation of the random initialisers)."""
    return [random_model(SPEC, s) for s in range(2)]


def _np(x):
    return np.asarray(x, np.float32)


def _bits(x):
    x = np.asarray(x)
    return x.view({1: np.uint8, 2: np.uint16, 4: np.uint32}[x.dtype.itemsize])


# ---------------------------------------------------------------------- terms
def test_terms_materialize_to_hand_computed_values():
    dense = Dense(jnp.asarray(AB))
    assert dense.shape == (3, 4) and dense.num_params == 12
    np.testing.assert_array_equal(dense.materialize(), AB)
    assert dense.materialize(jnp.bfloat16).dtype == jnp.bfloat16

    lr = LowRank(jnp.asarray(A), jnp.asarray(B), scale=0.5)
    assert (lr.shape, lr.rank, lr.num_params, lr.scale) == ((3, 4), 2, 6 + 8, 0.5)
    np.testing.assert_array_equal(lr.materialize(), 0.5 * AB)
    assert lr.materialize(jnp.float16).dtype == jnp.float16

    masked = Masked(jnp.array([[True, False], [False, True]]), jnp.array([[1.0, 2.0], [3.0, 4.0]]))
    assert masked.shape == (2, 2) and masked.num_params == 4
    np.testing.assert_array_equal(masked.materialize(), [[1.0, 0.0], [0.0, 4.0]])

    np.testing.assert_array_equal(dense.scaled(-2.0).materialize(), -2 * AB)
    assert lr.scaled(4).scale == 2.0 and lr.scaled(4).a is lr.a  # a Python number changes the static scale only
    np.testing.assert_array_equal(masked.scaled(3.0).materialize(), [[3.0, 0.0], [0.0, 12.0]])
    assert "rank=2" in repr(lr) and "scale=0.5" in repr(lr)


def test_low_rank_over_a_stack_of_experts():
    rs = np.random.RandomState(0)
    a, b = rs.normal(size=(3, 5, 2)).astype(np.float32), rs.normal(size=(3, 2, 4)).astype(np.float32)
    lr = LowRank(jnp.asarray(a), jnp.asarray(b), 2.0)  # experts (E, D, F) = (3, 5, 4)
    assert lr.shape == (3, 5, 4) and lr.rank == 2
    for e in range(3):
        np.testing.assert_allclose(lr.materialize()[e], 2.0 * a[e] @ b[e], rtol=1e-6, atol=1e-6)


def test_bad_terms_are_clear_errors():
    with pytest.raises(DeltaError, match=r"a is \(3, 2\) and b is \(3, 4\).*same rank r"):
        LowRank(jnp.zeros((3, 2)), jnp.zeros((3, 4)))
    with pytest.raises(DeltaError, match=r"same leading \(stack\) axes"):
        LowRank(jnp.zeros((2, 3, 2)), jnp.zeros((3, 2, 4)))
    with pytest.raises(DeltaError, match=r"a is \(3,\)"):
        LowRank(jnp.zeros(3), jnp.zeros(3))
    with pytest.raises(TypeError, match="scale must be a Python number"):
        LowRank(jnp.zeros((3, 2)), jnp.zeros((2, 4)), scale=jnp.float32(2.0))
    with pytest.raises(DeltaError, match=r"mask is \(2,\) but value is \(3,\)"):
        Masked(jnp.ones(2, bool), jnp.zeros(3))
    with pytest.raises(DeltaError, match="mask must be a bool array, got float32"):
        Masked(jnp.ones(3), jnp.zeros(3))
    with pytest.raises(DeltaError, match="floating array, got .*int32"):
        Dense(jnp.zeros(3, jnp.int32))
    with pytest.raises(DeltaError, match=r"w is a str, not a term.*; x is given twice"):
        Delta([("w", "oops"), ("x", Dense(jnp.zeros(2))), ("x", Dense(jnp.zeros(2)))])
    with pytest.raises(ValueError, match="metadata must be JSON data"):
        Delta({}, metadata={"f": object()})
    with pytest.raises(KeyError, match=r"no term at 'layers.0.mlp.up_proj.kernal'.*did you mean"):
        Delta({UP0: jnp.zeros((8, 12))})["layers.0.mlp.up_proj.kernal"]


def test_delta_is_an_ordered_mapping_with_json_metadata():
    d = Delta({"b": jnp.ones(2), "a": LowRank(jnp.asarray(A), jnp.asarray(B))}, kind="rome", source="edit-1",
              metadata={"layer": 3, "key": (1, 2)})
    assert list(d) == ["b", "a"] and d.paths == ("b", "a") and isinstance(d["b"], Dense)  # arrays become Dense
    assert (d.kind, d.source, dict(d.metadata)) == ("rome", "edit-1", {"layer": 3, "key": [1, 2]})
    assert d.num_params == 2 + 14 and "2 terms" in repr(d)
    with pytest.raises(TypeError):
        d.metadata["layer"] = 4  # read-only


# ---------------------------------------------------------------------- diff / apply / rollback
def test_diff_and_apply_round_trip_on_flat_dicts():
    a = {"w": jnp.array([[1.0, 2.0], [3.0, 4.0]]), "n": jnp.array([1.0, 1.0]), "z": jnp.zeros(2)}
    b = {"w": jnp.array([[1.5, 2.0], [0.0, 4.0]]), "n": jnp.array([1.0, 3.0]), "z": jnp.zeros(2)}
    d = deltas.diff(a, b, source="ft")
    assert list(d) == ["w", "n", "z"] and d.kind == "task_vector" and d.source == "ft"
    np.testing.assert_array_equal(d["w"].materialize(), [[0.5, 0.0], [-3.0, 0.0]])
    np.testing.assert_array_equal(d["n"].materialize(), [0.0, 2.0])
    out = deltas.apply(a, d)
    assert list(out) == list(a)
    for k in a:
        np.testing.assert_allclose(out[k], b[k], atol=1e-6, rtol=0)
    np.testing.assert_array_equal(a["w"], [[1.0, 2.0], [3.0, 4.0]])  # the input is untouched
    np.testing.assert_allclose(deltas.apply(a, d, 0.5)["w"], [[1.25, 2.0], [1.5, 4.0]])
    assert list(deltas.diff(a, b, skip_zero=True)) == ["w", "n"]
    assert list(deltas.diff(a, b, paths="n")) == ["n"] and list(deltas.diff(a, b, paths=["[nz]"])) == ["n", "z"]


def test_apply_keeps_the_parameter_dtype():
    w = jnp.array([1.0, 2.0, 3.0], jnp.bfloat16)
    out = deltas.apply({"w": w}, Delta({"w": jnp.array([0.5, 0.25, -1.0])}))
    assert out["w"].dtype == jnp.bfloat16
    np.testing.assert_array_equal(_np(out["w"]), [1.5, 2.25, 2.0])


def test_apply_to_a_model_leaves_the_input_unchanged(models):
    base, other = models
    before = {k: np.array(v) for k, v in flat_params(base).items()}
    lr = LowRank(jnp.ones((8, 1)), jnp.arange(12.0)[None, :], scale=0.1)
    d = Delta({UP0: lr, "norm.weight": jnp.full((8,), 0.5)})
    new = deltas.apply(base, d)
    assert type(new) is type(base) and new is not base
    after = flat_params(base)
    for k, v in before.items():
        np.testing.assert_array_equal(after[k], v, err_msg=k)
    got = flat_params(new)
    np.testing.assert_allclose(got[UP0], before[UP0] + 0.1 * np.ones((8, 1)) @ np.arange(12.0)[None, :], atol=1e-6)
    np.testing.assert_allclose(got["norm.weight"], before["norm.weight"] + 0.5, atol=1e-6)
    assert got["lm_head.kernel"] is flat_params(base)["lm_head.kernel"]  # untouched parameters are shared
    # a task vector between two models moves one onto the other, logits included
    moved = deltas.apply(base, deltas.diff(base, other))
    np.testing.assert_allclose(moved(TOKENS), other(TOKENS), atol=1e-5)


def test_apply_returns_a_model_that_shares_no_variable_with_the_input():
    """Writing into the result in place (an optimizer step, `var[...] = x`) must not reach the input model: the
    arrays may be shared (immutable), the nnx Variables may not (bricks.paths.with_params, as select's clone)."""
    base = random_model(SPEC, 0)
    before = {k: np.array(v) for k, v in flat_params(base).items()}
    d = Delta({UP0: jnp.ones((8, 12))})
    for new in (deltas.apply(base, d), deltas.rollback(base, d), with_params(base, {"norm.weight": jnp.ones(8)})):
        old_vars, new_vars = flat_state(base), flat_state(new)
        assert not [k for k in old_vars if new_vars[k] is old_vars[k]]
        new.embed_tokens.embedding[...] = jnp.zeros_like(new.embed_tokens.embedding[...])
        new.layers[0].mlp.up_proj.kernel[...] = jnp.zeros((8, 12))
        for k, v in before.items():
            np.testing.assert_array_equal(flat_params(base)[k], v, err_msg=k)


def test_rollback_is_exact_up_to_float_rounding(models):
    rs = np.random.RandomState(0)
    w = {"w": jnp.asarray(rs.normal(size=(64, 64)), jnp.float32)}
    d = Delta({"w": jnp.asarray(rs.normal(scale=3.0, size=(64, 64)), jnp.float32)})
    back = deltas.rollback(deltas.apply(w, d), d)["w"]
    wv, dv = np.asarray(w["w"], np.float64), np.asarray(d["w"].value, np.float64)
    u = 2.0 ** -24  # float32 unit roundoff: one rounding in apply, one in rollback
    bound = u * (np.abs(wv + dv) + np.abs(wv)) * (1 + 1e-6)
    assert np.all(np.abs(np.asarray(back, np.float64) - wv) <= bound)
    assert np.max(np.abs(np.asarray(back) - np.asarray(w["w"]))) < 1e-6
    # on a model: edit, then roll back
    base = models[0]
    edit = deltas.low_rank(deltas.diff(base, models[1], paths="**.mlp.*.kernel"), 2)
    restored = deltas.rollback(deltas.apply(base, edit), edit)
    for k, v in flat_params(base).items():
        np.testing.assert_allclose(flat_params(restored)[k], v, atol=1e-6, rtol=0, err_msg=k)


def test_diff_names_every_mismatch_at_once():
    a = {"w": jnp.zeros((2, 3)), "only_a": jnp.zeros(2), "i": jnp.array([1, 2])}
    b = {"w": jnp.zeros((3, 2)), "only_b": jnp.zeros(2), "i": jnp.array([1, 3])}
    with pytest.raises(DeltaError) as err:
        deltas.diff(a, b)
    msg = str(err.value)
    assert "4 problem(s)" in msg and r"w is (2, 3) in model_a but (3, 2) in model_b" in msg
    assert "only_a is in model_a only" in msg and "only_b is in model_b only" in msg
    assert "i is not floating (int32, int32) and differs" in msg
    with pytest.raises(SelectionError, match=r"\['nope\.\*'\] match no path"):
        deltas.diff(a, a, paths=["w", "nope.*"])
    with pytest.raises(TypeError, match="got a Delta"):
        deltas.diff(Delta({}), a)


def test_apply_names_unknown_paths_and_shape_mismatches_together(models):
    d = Delta({"layers.0.mlp.up_proj.kernal": jnp.zeros((8, 12)), UP0: jnp.zeros((12, 8)),
               "norm.weight": jnp.zeros(8)})
    with pytest.raises(DeltaError) as err:
        deltas.apply(models[0], d)
    msg = str(err.value)
    assert "2 problem(s)" in msg and "no parameter at layers.0.mlp.up_proj.kernal (did you mean" in msg
    assert f"{UP0} is (8, 12) in the model but (12, 8) in the delta" in msg
    with pytest.raises(DeltaError, match=r"i is int32 in the model, not floating"):
        deltas.apply({"i": jnp.zeros(2, jnp.int32)}, Delta({"i": jnp.zeros(2)}))


# ---------------------------------------------------------------------- algebra
def test_add_concatenates_low_rank_factors():
    rs = np.random.RandomState(1)
    a1, b1 = rs.normal(size=(5, 2)).astype(np.float32), rs.normal(size=(2, 4)).astype(np.float32)
    a2, b2 = rs.normal(size=(5, 3)).astype(np.float32), rs.normal(size=(3, 4)).astype(np.float32)
    d1 = Delta({"w": LowRank(a1, b1, 0.5), "only1": jnp.ones(2)}, kind="lora", source="x")
    d2 = Delta({"w": LowRank(a2, b2, 0.5), "only2": jnp.ones(3)}, kind="lora", source="y")
    s = d1 + d2
    assert list(s) == ["w", "only1", "only2"] and s["only1"] is d1["only1"]
    assert isinstance(s["w"], LowRank) and s["w"].rank == 5 and s["w"].scale == 0.5
    np.testing.assert_allclose(s["w"].materialize(), 0.5 * (a1 @ b1 + a2 @ b2), atol=1e-5)
    assert (s.kind, s.source) == ("lora", "x + y")
    # different scales are folded into a; the rank still adds up
    s2 = d1 + Delta({"w": LowRank(a2, b2, 3.0)}, kind="rome")
    assert s2["w"].rank == 5 and s2["w"].scale == 1.0 and s2.kind == "sum"
    np.testing.assert_allclose(s2["w"].materialize(), 0.5 * a1 @ b1 + 3.0 * a2 @ b2, atol=1e-5)
    # anything else combines densely
    mixed = d1 + Delta({"w": Masked(np.eye(5, 4, dtype=bool), np.full((5, 4), 2.0, np.float32))})
    assert isinstance(mixed["w"], Dense)
    np.testing.assert_allclose(mixed["w"].materialize(), 0.5 * a1 @ b1 + 2 * np.eye(5, 4), atol=1e-5)
    # sum(), subtraction and metadata
    total = sum([d1, d1, d1])
    np.testing.assert_allclose(total["w"].materialize(), 1.5 * a1 @ b1, atol=1e-5)
    np.testing.assert_allclose((d1 - d1)["w"].materialize(), np.zeros((5, 4)), atol=1e-5)
    m = Delta({}, metadata={"a": 1}) + Delta({}, metadata={"b": 2})
    assert dict(m.metadata) == {"operands": [{"a": 1}, {"b": 2}]}
    with pytest.raises(DeltaError, match=r"w is \(5, 4\) in the first delta but \(4, 5\) in the second"):
        d1 + Delta({"w": jnp.zeros((4, 5))})


def test_scale_negate_restrict():
    d = Delta({"layers.0.w": LowRank(A, B, 2.0), "layers.1.w": jnp.array([1.0, -2.0]), "norm": jnp.ones(2)},
              kind="tv", metadata={"k": 1})
    half = deltas.scale(d, 0.5)
    assert half["layers.0.w"].scale == 1.0 and (half.kind, dict(half.metadata)) == ("tv", {"k": 1})
    np.testing.assert_array_equal(half["layers.1.w"].materialize(), [0.5, -1.0])
    np.testing.assert_array_equal((-d)["layers.0.w"].materialize(), -2.0 * AB)
    np.testing.assert_array_equal(deltas.negate(d)["layers.1.w"].materialize(), [-1.0, 2.0])
    assert (3 * d)["layers.0.w"].scale == 6.0
    assert list(deltas.restrict(d, "layers.*.w")) == ["layers.0.w", "layers.1.w"]
    assert list(deltas.restrict(d, ["norm", "layers.1.*"])) == ["layers.1.w", "norm"]
    with pytest.raises(SelectionError, match=r"restrict: \['mlp'\] match no path; the paths are e\.g\. \['layers\.0\.w', 'layers\.1\.w', 'norm'\]"):
        deltas.restrict(d, ["norm", "mlp"])


def test_norms_equal_dense_norms_without_materialising_low_rank():
    rs = np.random.RandomState(2)
    d = Delta({"lr": LowRank(rs.normal(size=(6, 3)).astype(np.float32), rs.normal(size=(3, 5)).astype(np.float32),
                             -0.7),
               "stack": LowRank(rs.normal(size=(2, 4, 2)).astype(np.float32),
                                rs.normal(size=(2, 2, 3)).astype(np.float32)),
               "dense": jnp.array([3.0, 4.0]),
               "masked": Masked(np.array([True, False, True]), np.array([1.0, 100.0, 2.0], np.float32))})
    got = deltas.norms(d)
    assert float(got["dense"]) == 5.0 and np.isclose(float(got["masked"]), np.sqrt(5.0))
    for k, v in deltas.materialize(d).items():
        np.testing.assert_allclose(float(got[k]), np.linalg.norm(np.asarray(v)), rtol=1e-5, err_msg=k)


def test_column_norms_of_base_plus_low_rank_equal_the_formed_sum():
    """DoRA's ||W + s A B|| per output column from the identity, against the sum formed in float64; a stack of
    experts; a bfloat16 base (its float32 values are what both sides read)."""
    rs = np.random.RandomState(3)
    for shape, rank, scale in (((7, 5), 3, -0.7), ((2, 6, 4), 2, 2.5)):
        a = rs.normal(size=(*shape[:-1], rank)).astype(np.float32)
        b = rs.normal(size=(*shape[:-2], rank, shape[-1])).astype(np.float32)
        for w in (rs.normal(size=shape).astype(np.float32), jnp.asarray(rs.normal(size=shape), jnp.bfloat16)):
            got = LowRank(a, b, scale).column_norms(w)
            w64 = np.asarray(jnp.asarray(w, jnp.float32), np.float64)
            want = np.linalg.norm(w64 + scale * np.matmul(a.astype(np.float64), b.astype(np.float64)), axis=-2)
            assert got.dtype == jnp.float32 and got.shape == want.shape
            np.testing.assert_allclose(np.asarray(got), want, rtol=2e-6)


def test_shifted_and_column_norms_refuse_a_weight_of_another_shape():
    """A weight whose shape is not the change's is an error, not a broadcast: (4, 5) moved by a stack of three
    (4, 5) changes came back (3, 4, 5), and a (4, 1) weight by a (4, 5) change came back (4, 5)."""
    stack = LowRank(jnp.ones((3, 4, 2)), jnp.ones((3, 2, 5)))
    with pytest.raises(DeltaError, match=r"weight is \(4, 5\) but the change is \(3, 4, 5\)"):
        deltas.shifted(jnp.zeros((4, 5)), stack)
    with pytest.raises(DeltaError, match=r"weight is \(4, 1\) but the change is \(4, 5\)"):
        deltas.shifted(jnp.zeros((4, 1)), Dense(jnp.ones((4, 5))))
    with pytest.raises(DeltaError, match=r"base is \(4, 5\) but the change is \(3, 4, 5\)"):
        stack.column_norms(jnp.zeros((4, 5)))
    with pytest.raises(DeltaError, match=r"base is \(4, 1\) but the change is \(4, 5\)"):
        LowRank(jnp.ones((4, 2)), jnp.ones((2, 5))).column_norms(jnp.zeros((4, 1)))
    assert deltas.shifted(jnp.zeros((3, 4, 5), jnp.bfloat16), stack).dtype == jnp.bfloat16


def test_low_rank_svd_is_exact_for_a_rank_2_matrix():
    rs = np.random.RandomState(3)
    m = (rs.normal(size=(6, 2)) @ rs.normal(size=(2, 5))).astype(np.float32)  # rank 2
    d = Delta({"w": m, "bias": jnp.ones(5), "lr": LowRank(A, B)}, kind="task_vector", metadata={"k": 1})
    lr = deltas.low_rank(d, 2)
    assert isinstance(lr["w"], LowRank) and lr["w"].rank == 2 and lr["w"].shape == (6, 5)
    np.testing.assert_allclose(lr["w"].materialize(), m, atol=1e-5)
    assert lr["bias"] is d["bias"] and lr["lr"] is d["lr"]  # 1-D terms and low enough ranks are kept
    assert lr.metadata["k"] == 1 and lr.metadata["low_rank"]["rank"] == 2
    assert set(lr.metadata["low_rank"]["relative_error"]) == {"w"}
    assert lr.metadata["low_rank"]["relative_error"]["w"] < 1e-6
    # rank 1: the best rank-1 approximation, relative error sigma_2 / sqrt(sigma_1^2 + sigma_2^2)
    s = np.linalg.svd(m.astype(np.float64), compute_uv=False)
    r1 = deltas.low_rank(d, 1)
    assert np.isclose(r1.metadata["low_rank"]["relative_error"]["w"], s[1] / np.hypot(s[0], s[1]), rtol=1e-4)
    assert np.isclose(float(deltas.norms(Delta({"e": m}) - Delta({"e": r1["w"]}))["e"]), s[1], rtol=1e-3)
    assert r1["lr"].rank == 1  # a LowRank of a higher rank is truncated too
    assert deltas.low_rank(d, 50)["w"].rank == 5  # the rank is capped at min(D_in, D_out)
    # a stack of matrices is factored per matrix
    stack = np.stack([m, 2 * m])
    np.testing.assert_allclose(deltas.low_rank(Delta({"s": stack}), 2)["s"].materialize(), stack, atol=1e-4)
    with pytest.raises(ValueError, match="rank must be an int >= 1, got 0"):
        deltas.low_rank(d, 0)


# ---------------------------------------------------------------------- jit / vmap
def test_deltas_pass_through_jit_and_vmap():
    d = Delta({"lr": LowRank(A, B, 0.5), "dense": jnp.ones((3, 4)), "m": Masked(np.eye(3, 4, dtype=bool),
                                                                                   np.full((3, 4), 2.0, np.float32))},
              kind="k", metadata={"x": [1]})

    @jax.jit
    def total(delta, s):
        return sum(deltas.materialize(deltas.scale(delta, s)).values())

    np.testing.assert_allclose(total(d, jnp.float32(2.0)), 2 * (0.5 * AB + 1.0 + 2 * np.eye(3, 4)), atol=1e-5)
    out = jax.jit(lambda delta: delta + delta)(d)  # a Delta comes back, metadata included
    assert isinstance(out, Delta) and out["lr"].rank == 4 and dict(out.metadata) == {"x": [1]} and out.kind == "k"
    applied = jax.jit(deltas.apply)({"lr": jnp.zeros((3, 4))}, deltas.restrict(d, "lr"), 2.0)
    np.testing.assert_allclose(applied["lr"], AB, atol=1e-6)
    stacked = jax.tree.map(lambda *xs: jnp.stack(xs), d, deltas.scale(d, jnp.float32(3.0)))
    n = jax.vmap(deltas.norms)(stacked)
    np.testing.assert_allclose(n["lr"], [np.linalg.norm(0.5 * AB), np.linalg.norm(1.5 * AB)], rtol=1e-5)
    keys = [jax.tree_util.keystr(k) for k, _ in jax.tree_util.tree_flatten_with_path(d)[0]]
    assert keys[:3] == ["['lr'].a", "['lr'].b", "['dense'].value"]


# ---------------------------------------------------------------------- disk
def _sample_delta():
    rs = np.random.RandomState(4)
    return Delta({
        "layers.0.mlp.up_proj.kernel": LowRank(jnp.asarray(rs.normal(size=(8, 2)), jnp.bfloat16),
                                               jnp.asarray(rs.normal(size=(2, 12)), jnp.bfloat16), 0.25),
        "layers.0.mlp.down_proj.kernel": Dense(jnp.asarray(rs.normal(size=(12, 8)), jnp.float32)),
        "norm.weight": Dense(jnp.asarray(rs.normal(size=(8,)), jnp.bfloat16)),
        "experts.kernel": LowRank(rs.normal(size=(3, 4, 1)).astype(np.float32),
                                  rs.normal(size=(3, 1, 5)).astype(np.float32)),
        "lm_head.kernel": Masked(rs.uniform(size=(8, 16)) < 0.3, rs.normal(size=(8, 16)).astype(np.float32)),
    }, kind="task_vector", source="tiny-ft", metadata={"note": "test", "steps": [1, 2]})


def test_save_load_round_trip_bit_exact(tmp_path):
    d = _sample_delta()
    out = save_delta(d, tmp_path / "tv")
    assert sorted(p.name for p in out.iterdir()) == [".configurable_fm_output.json", "bricks.json", "bricks.safetensors", "delta.json"]
    assert [p.name for p in tmp_path.iterdir()] == ["tv"]  # no temporary directory left behind
    back = load_delta(out)
    assert list(back) == list(d) and (back.kind, back.source, dict(back.metadata)) == (
        "task_vector", "tiny-ft", {"note": "test", "steps": [1, 2]})
    for p, t in d.items():
        assert type(back[p]) is type(t) and back[p].shape == t.shape, p
        for name, x in t.tensors().items():
            y = back[p].tensors()[name]
            assert y.dtype == x.dtype, (p, name)
            np.testing.assert_array_equal(_bits(y), _bits(x), err_msg=f"{p}/{name}")
    up = back["layers.0.mlp.up_proj.kernel"]
    assert up.scale == 0.25 and up.a.dtype == jnp.bfloat16
    header = json.loads((out / "delta.json").read_text())
    assert header == {"format": "configurable_fm.delta", "version": 1, "kind": "task_vector", "source": "tiny-ft",
                      "metadata": {"note": "test", "steps": [1, 2]}}
    # the tensors and per-path terms are an ordinary brick set
    bricks = load_bricks(out)
    lr = bricks["layers.0.mlp.up_proj.kernel"]
    assert (lr.kind, lr.source) == ("low_rank", "tiny-ft")
    assert dict(lr.metadata) == {"shape": [8, 12], "rank": 2, "scale": 0.25}
    assert list(lr.params) == ["a", "b"] and bricks["lm_head.kernel"].kind == "masked"
    assert dict(bricks["experts.kernel"].metadata)["shape"] == [3, 4, 5]
    with pytest.raises(FileExistsError):
        save_delta(d, out)
    save_delta(Delta({}), out, overwrite=True)
    assert len(load_delta(out)) == 0


def test_load_errors_name_the_file_and_the_tensor(tmp_path):
    d = _sample_delta()
    with pytest.raises(CheckpointError, match=r"nowhere/delta\.json: no such file"):
        load_delta(tmp_path / "nowhere")
    out = save_delta(d, tmp_path / "tv")

    corrupt = save_delta(d, tmp_path / "corrupt")
    (corrupt / "bricks.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(CheckpointError, match=r"corrupt/bricks\.safetensors: cannot read"):
        load_delta(corrupt)

    bad_json = save_delta(d, tmp_path / "bad_json")
    (bad_json / "delta.json").write_text("{")
    with pytest.raises(CheckpointError, match=r"bad_json/delta\.json: not valid JSON"):
        load_delta(bad_json)

    newer = save_delta(d, tmp_path / "newer")
    (newer / "delta.json").write_text(json.dumps({**json.loads((out / "delta.json").read_text()), "version": 9}))
    with pytest.raises(CheckpointError, match="version 9 is not supported"):
        load_delta(newer)

    # a factor missing from both files: the term is incomplete
    missing = save_delta(d, tmp_path / "missing")
    index = json.loads((missing / "bricks.json").read_text())
    del index["bricks"]["layers.0.mlp.up_proj.kernel"]["params"]["b"]
    (missing / "bricks.json").write_text(json.dumps(index))
    tensors = load_file(str(missing / "bricks.safetensors"))
    del tensors["layers.0.mlp.up_proj.kernel/b"]
    save_file(tensors, str(missing / "bricks.safetensors"))
    with pytest.raises(CheckpointError,
                       match=r"(?s)missing/bricks\.json: .*missing \['layers\.0\.mlp\.up_proj\.kernel/b'\]"):
        load_delta(missing)

    # a tensor listed in bricks.json but absent from bricks.safetensors (load_bricks' check)
    absent = save_delta(d, tmp_path / "absent")
    tensors = load_file(str(absent / "bricks.safetensors"))
    del tensors["norm.weight/value"]
    save_file(tensors, str(absent / "bricks.safetensors"))
    with pytest.raises(CheckpointError, match=r"tensor 'norm\.weight/value' is listed in bricks\.json but missing"):
        load_delta(absent)

    # metadata that disagrees with the tensors
    wrong = save_delta(d, tmp_path / "wrong")
    index = json.loads((wrong / "bricks.json").read_text())
    index["bricks"]["layers.0.mlp.up_proj.kernel"]["metadata"]["rank"] = 3
    index["bricks"]["lm_head.kernel"]["kind"] = "sparse"
    (wrong / "bricks.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError) as err:
        load_delta(wrong)
    msg = str(err.value)
    assert "wrong/bricks.json: 2 brick(s) are not delta terms" in msg
    assert "metadata rank 3 but tensor 'layers.0.mlp.up_proj.kernel/a' is (8, 2) (rank 2)" in msg
    assert "brick 'lm_head.kernel': kind 'sparse' is not a delta term" in msg
