"""Tree-level merges on tiny llama models: invariants, depth gradients, filters, reproducible DARE, input checks."""
import re

import jax.numpy as jnp
import numpy as np
import pytest

from configurable_fm.bricks.paths import flat_params
from configurable_fm.models.factory import build_model
from configurable_fm.ops.merge import tree
from configurable_fm.ops.merge.params import ParameterError

SPEC = {"family": "llama", "vocab_size": 16, "hidden_size": 16, "intermediate_size": 16, "num_layers": 3,
        "num_heads": 2, "num_kv_heads": 1}
TOKENS = jnp.array([[1, 5, 7, 2]], jnp.int32)


@pytest.fixture(scope="module")
def models():
    return [build_model(SPEC, seed=s) for s in range(3)]


@pytest.fixture(scope="module")
def flats(models):
    return [{k: np.asarray(v) for k, v in flat_params(m).items()} for m in models]


def _close(a, b, atol=1e-6):
    assert set(a) == set(b)
    for k in a:
        np.testing.assert_allclose(np.asarray(a[k]), np.asarray(b[k]), atol=atol, rtol=0, err_msg=k)


def test_merging_a_model_with_itself_returns_it(models, flats):
    _close(tree.linear([flats[0], flats[0]], weights=[0.3, 0.7]), flats[0])
    same = tree.ties(models[0], [models[0], models[0]], weights=[1.0, 0.5], density=0.5)
    _close(flat_params(same), flats[0], atol=0)
    np.testing.assert_allclose(same(TOKENS), models[0](TOKENS), atol=1e-6)


def test_task_arithmetic_weight_zero_returns_base(flats):
    out = tree.task_arithmetic(flats[0], flats[1:], weights=0.0)
    _close(out, flats[0], atol=0)


def test_linear_of_two_models_is_the_hand_average(flats):
    out = tree.linear(flats[1:], weights=[1.0, 3.0])
    _close(out, {k: 0.25 * flats[1][k] + 0.75 * flats[2][k] for k in flats[1]})


def test_merged_module_is_a_new_callable_model_with_finite_logits(models, flats):
    before = [{k: v.copy() for k, v in f.items()} for f in flats]
    out = tree.ties(models[0], models[1:], weights=[1.0, 0.7], density=0.5)
    assert type(out) is type(models[0]) and out is not models[0]
    logits = out(TOKENS)
    assert logits.shape == (1, 4, SPEC["vocab_size"]) and bool(jnp.all(jnp.isfinite(logits)))
    for m, f in zip(models, before):  # inputs untouched
        _close(flat_params(m), f, atol=0)
    out_d = tree.dare_ties(flats[0], flats[1:], weights=[1.0, 0.7], density=0.5, seed=0)
    for f, g in zip(flats, before):
        _close(f, g, atol=0)
    assert all(isinstance(v, jnp.ndarray) or hasattr(v, "shape") for v in out_d.values())


def test_gradient_over_depth_and_embeddings_at_t0(flats):
    base, ft = flats[0], flats[1]
    out = tree.task_arithmetic(base, [ft], weights=[[0.0, 1.0]])
    for i, w in enumerate([0.0, 0.5, 1.0]):
        p = f"layers.{i}.mlp.up_proj.kernel"
        np.testing.assert_allclose(out[p], base[p] + w * (ft[p] - base[p]), atol=1e-6, err_msg=p)
    for p in ("embed_tokens.embedding", "norm.weight", "lm_head.kernel"):
        np.testing.assert_array_equal(out[p], base[p])  # t = 0 -> weight 0


def test_filters_and_per_model_over_global(flats):
    base, ft = flats[0], flats[1]
    out = tree.merge("task_arithmetic", base, {"ft": ft}, parameters={"weight": 0.0},
                     model_parameters=[{"weight": [{"filter": "mlp", "value": 1.0}]}])
    for p in base:
        np.testing.assert_allclose(out[p], ft[p] if ".mlp." in p else base[p], atol=1e-6, err_msg=p)
    by_name = tree.merge("task_arithmetic", base, {"ft": ft}, parameters={"weight": 0.0},
                         model_parameters={"ft": {"weight": [{"filter": "mlp", "value": 1.0}]}})
    _close(by_name, out, atol=0)
    with pytest.raises(ParameterError, match=r"model_parameters for unknown model\(s\) \['fx'\]; models: \['ft'\]"):
        tree.merge("task_arithmetic", base, {"ft": ft}, model_parameters={"fx": {"weight": 1.0}})


def test_slerp_gradient_endpoints(flats):
    q = [f"layers.{i}.self_attn.q_proj.kernel" for i in range(3)]  # the depth; one shape: one kernel for t 0, .5, 1
    base, other = ({k: f[k] for k in q} for f in flats[:2])
    out = tree.slerp(base, other, t=[0.0, 1.0])
    np.testing.assert_allclose(out["layers.0.self_attn.q_proj.kernel"], flats[0]["layers.0.self_attn.q_proj.kernel"],
                               atol=1e-6)
    np.testing.assert_allclose(out["layers.2.self_attn.q_proj.kernel"], flats[1]["layers.2.self_attn.q_proj.kernel"],
                               atol=1e-6)


def test_dare_ties_is_reproducible_and_order_independent(flats):
    kw = dict(weights=[1.0, 0.5], density=0.5)
    a = tree.dare_ties(flats[0], flats[1:], seed=7, **kw)
    _close(tree.dare_ties(flats[0], flats[1:], seed=7, **kw), a, atol=0)
    rev = [dict(reversed(list(f.items()))) for f in flats]
    _close(tree.dare_ties(rev[0], rev[1:], seed=7, **kw), a, atol=0)
    one = "layers.1.mlp.down_proj.kernel"
    sub = tree.dare_ties({one: flats[0][one]}, [{one: f[one]} for f in flats[1:]], seed=7, **kw)
    np.testing.assert_array_equal(sub[one], a[one])
    b = tree.dare_ties(flats[0], flats[1:], seed=8, **kw)
    assert not np.array_equal(a[one], b[one])


def test_mismatches_are_reported_together(flats):
    ft = dict(flats[1])
    del ft["norm.weight"]
    ft["layers.0.mlp.up_proj.kernel"] = np.zeros((16, 8), np.float32)
    with pytest.raises(tree.MergeInputError) as e:
        tree.task_arithmetic(flats[0], [flats[2], ft], weights=1.0)
    msg = str(e.value)
    assert "tensor norm.weight is missing in model_1 (present in base, model_0)" in msg
    assert "shape mismatch: layers.0.mlp.up_proj.kernel is (16, 16) in base, (16, 16) in model_0, (16, 8) in model_1" \
        in msg


def _vocab(f, v, seed):
    rng = np.random.default_rng(seed)
    g = dict(f)
    g["embed_tokens.embedding"] = rng.normal(size=(v, 16)).astype(np.float32)
    g["lm_head.kernel"] = rng.normal(size=(16, v)).astype(np.float32)
    return g


def test_vocabulary_mismatch_refused_unless_aligned_to_base(flats):
    big, small = _vocab(flats[1], 24, 1), _vocab(flats[2], 8, 2)
    with pytest.raises(tree.MergeInputError, match=r"vocabulary mismatch: embed_tokens.embedding is \(16, 16\) in "
                                                   r"base, \(24, 16\) in big, \(8, 16\) in small \(axis 0\); pass "
                                                   r"embed_alignment='base'"):
        tree.merge("task_arithmetic", flats[0], {"big": big, "small": small}, parameters={"weight": 1.0})
    base = flats[0]
    for ft in (big, small):
        out = tree.merge("task_arithmetic", base, [ft], parameters={"weight": 1.0}, embed_alignment="base")
        n = min(16, ft["embed_tokens.embedding"].shape[0])
        e, h = out["embed_tokens.embedding"], out["lm_head.kernel"]
        assert e.shape == (16, 16) and h.shape == (16, 16)
        np.testing.assert_allclose(e[:n], ft["embed_tokens.embedding"][:n], atol=1e-6)
        np.testing.assert_allclose(e[n:], base["embed_tokens.embedding"][n:], atol=1e-6)  # pad rows: the base's
        np.testing.assert_allclose(h[:, :n], ft["lm_head.kernel"][:, :n], atol=1e-6)
    with pytest.raises(tree.MergeInputError, match="embed_alignment='base' needs a base model"):
        tree.merge("linear", None, [flats[0], big], parameters={"weight": 1.0}, embed_alignment="base")


def test_models_of_different_sizes_give_a_short_error_naming_the_difference(models):
    """Different widths and depths: one line saying what differs (from the modules' configs), a capped list of
    tensors after it, and no vocabulary-alignment hint (the vocabulary is not the problem)."""
    other = build_model({**SPEC, "hidden_size": 8, "num_layers": 2, "num_heads": 1, "vocab_size": 16}, seed=5)
    with pytest.raises(tree.MergeInputError) as e:
        tree.task_arithmetic(models[0], [models[1], other], weights=1.0)
    msg = str(e.value)
    lines = msg.splitlines()
    assert len(lines) < 15, msg
    assert lines[0] == ("cannot merge base, model_0, model_1: model_1 has hidden size 8 but base has 16, "
                        "2 layers but base has 3, 1 attention head but base has 2"), msg
    assert re.fullmatch(r"\d+ tensor\(s\) differ \(\d+ missing, \d+ of other shapes\); the first 10:", lines[1]), msg
    assert sum(line.startswith("  ") and "... and" not in line for line in lines) == 10
    assert re.search(r"\.\.\. and \d+ more", msg)
    assert "embed_alignment" not in msg and "only models of one architecture" in lines[-1]


def test_flat_dicts_of_different_depths_derive_the_difference_from_the_tensors(flats):
    """Without configs: layer count, hidden size and vocabulary come from the tensors' paths and shapes."""
    shallow = {k: v for k, v in flats[1].items() if not k.startswith("layers.2.")}
    with pytest.raises(tree.MergeInputError) as e:
        tree.linear([flats[0], shallow], weights=1.0)
    lines = str(e.value).splitlines()
    assert lines[0] == "cannot merge model_0, model_1: model_1 has 2 layers but model_0 has 3", lines
    assert lines[1].startswith("9 tensor(s) differ (9 missing)") and len(lines) == 2 + 9 + 1
    big = build_model({**SPEC, "hidden_size": 32, "intermediate_size": 48}, seed=1)
    with pytest.raises(tree.MergeInputError, match=r"model_1 has hidden size 32 but model_0 has 16, intermediate "
                                                   r"size 48 but model_0 has 16\n"):
        tree.linear([flats[0], {k: np.asarray(v) for k, v in flat_params(big).items()}], weights=1.0)


def test_vocabulary_only_difference_names_the_knob(flats):
    big = _vocab(flats[1], 24, 1)
    with pytest.raises(tree.MergeInputError) as e:
        tree.merge("task_arithmetic", flats[0], [big], parameters={"weight": 1.0})
    lines = str(e.value).splitlines()
    assert lines[0] == "cannot merge base, model_0: model_0 has vocabulary 24 but base has 16"
    assert len(lines) == 4 and all("--config.embed_alignment=base" in line for line in lines[2:]), lines
    assert "only models of one architecture" not in str(e.value)


def test_integer_tensors_copied_only_if_identical(flats):
    ids = np.arange(4, dtype=np.int32)
    a = dict(flats[0], **{"buffers.ids": ids})
    b = dict(flats[1], **{"buffers.ids": ids.copy()})
    out = tree.linear([a, b], weights=1.0)
    np.testing.assert_array_equal(out["buffers.ids"], ids)
    c = dict(flats[1], **{"buffers.ids": ids[::-1].copy()})
    with pytest.raises(tree.MergeInputError, match=r"buffers.ids is a int32 tensor .* differs between model_0 and "
                                                   r"model_1"):
        tree.linear([a, c], weights=1.0)


def test_contract_and_parameter_errors(flats):
    with pytest.raises(ValueError, match="linear: the method ignores the base model"):
        tree.merge("linear", flats[0], [flats[1]], parameters={"weight": 1.0})
    with pytest.raises(ValueError, match="ties: needs a base model"):
        tree.merge("ties", None, [flats[1]], parameters={"weight": 1.0})
    with pytest.raises(ValueError, match="slerp: needs exactly 1 non-base model"):
        tree.merge("slerp", flats[0], flats[1:], parameters={"t": 0.5})
    with pytest.raises(ParameterError, match=r"unknown parameter\(s\) 'weigth' \(model 'model_0'\)"):
        tree.merge("ties", flats[0], [flats[1]], model_parameters=[{"weigth": 1.0}])
    with pytest.raises(ParameterError, match=r"weight has 1 entries for 2 models"):
        tree.ties(flats[0], flats[1:], weights=[1.0], density=0.5)


def test_out_dtype(flats):
    out = tree.linear(flats[1:], weights=1.0, out_dtype=jnp.bfloat16)
    assert all(v.dtype == jnp.bfloat16 for v in out.values())
