"""Selectors and functional replacement on tiny Llama / MoE models (hand-checked path sets)."""
import dataclasses
import re

import jax.numpy as jnp
import numpy as np
import pytest
import treescope
from flax import nnx

from configurable_fm.bricks import SelectionError, flat_params, flat_state, select, tree_at
from configurable_fm.bricks.select import glob_to_regex
from configurable_fm.models.layers import Linear, RMSNorm
from configurable_fm.models.llama import Llama, LlamaConfig, LlamaMLP
from configurable_fm.models.moe import SparseMoE

CFG = LlamaConfig(vocab_size=32, hidden_size=8, intermediate_size=16, num_layers=3, num_heads=2, num_kv_heads=1)
IDS = jnp.array([[1, 5, 9, 2, 30, 7]])


@pytest.fixture(scope="module")
def model():
    return Llama(CFG, rngs=nnx.Rngs(0))


def snapshot(m):
    return {k: np.array(v) for k, v in flat_params(m).items()}


def assert_unchanged(m, snap):
    now = flat_params(m)
    assert list(now) == list(snap)
    for k, v in snap.items():
        assert np.array_equal(np.asarray(now[k]), v), k


# ---------------------------------------------------------------------------------------------- selecting
def test_glob_paths_on_three_layers(model):
    assert select(model).at("layers.*.mlp").paths == ("layers.0.mlp", "layers.1.mlp", "layers.2.mlp")
    assert select(model).at("layers.1.self_attn.?_proj").paths == tuple(
        f"layers.1.self_attn.{x}_proj" for x in "koqv")  # attribute order: sorted by name
    assert select(model).at("layers.[!0].mlp").paths == ("layers.1.mlp", "layers.2.mlp")
    # `*` stays inside one segment: 'layers.*' are the decoder layers, not everything below them.
    assert select(model).at("layers.*").paths == ("layers.0", "layers.1", "layers.2")
    kernels = select(model).at("**.kernel").paths
    assert len(kernels) == 3 * 7 + 1
    assert kernels[0] == "layers.0.mlp.down_proj.kernel" and kernels[-1] == "lm_head.kernel"
    # 'layers.2.**' is layer 2 and everything in it: 1 + 2 norms*2 + mlp(1+3+3) + attn(1+4+4).
    sub = select(model).at("layers.2.**").paths
    assert len(sub) == 21 and sub[0] == "layers.2" and "layers.2.mlp.up_proj.kernel" in sub
    assert select(model).at_regex(r"layers\.(0|2)\.mlp").paths == ("layers.0.mlp", "layers.2.mlp")
    with pytest.raises(SelectionError):  # fullmatch: 'layers.0' is not 'layers.0.mlp'
        select(model).at("layers.0").at_regex(r"layers\.0\.ml")


def test_glob_translation():
    assert glob_to_regex("layers.*.mlp") == r"layers\.[^.]*\.mlp"
    assert glob_to_regex("layers.1?.q") == r"layers\.1[^.]\.q"
    assert glob_to_regex("**.kernel") == r"(?:[^.]+\.)*kernel"
    assert glob_to_regex("a.[!0-2]") == r"a\.[^.0-2]"


def test_character_class_never_matches_the_dot(model):
    """A class whose range spans '.' (' -~' is every printable character) stays inside one segment, like `*`, and a
    negated class means what fnmatch means by it."""
    assert re.fullmatch(glob_to_regex("layers[ -~]0"), "layers.0") is None
    assert re.fullmatch(glob_to_regex("a.[+-0]"), "a..") is None
    assert re.fullmatch(glob_to_regex("a.[+-0]"), "a.0") is not None
    assert select(model).at("layers.[ -~].mlp").paths == ("layers.0.mlp", "layers.1.mlp", "layers.2.mlp")
    with pytest.raises(SelectionError):
        select(model).at("layers[ -~]0")
    # '[!-a]' is neither '-' nor 'a' (fnmatch), not the range '.'..'a' that the inserted '.' made of it
    assert re.fullmatch(glob_to_regex("[!-a]"), "5") is not None and re.fullmatch(glob_to_regex("[!-a]"), "-") is None
    assert select(model).at("layers.[!-a].mlp").paths == ("layers.0.mlp", "layers.1.mlp", "layers.2.mlp")


def test_model_order_and_two_digit_indices():
    m = Llama(dataclasses.replace(CFG, num_layers=12), rngs=nnx.Rngs(1))
    assert select(m).at("layers.*").paths == tuple(f"layers.{i}" for i in range(12))  # 10 after 9, not after 1
    assert select(m).at("layers.1?.self_attn.q_proj").paths == ("layers.10.self_attn.q_proj",
                                                                "layers.11.self_attn.q_proj")


def test_chained_refinements_narrow(model):
    linears = select(model).at("layers.0").at_instances_of(Linear)
    assert linears.paths == tuple(f"layers.0.mlp.{x}_proj" for x in ("down", "gate", "up")) + tuple(
        f"layers.0.self_attn.{x}_proj" for x in "koqv")
    assert select(model).at("layers.*.mlp").at_instances_of(LlamaMLP).count() == 3  # intersect
    assert select(model).at("layers.*").where(lambda p, n: p.endswith("1")).paths == ("layers.1",)
    assert select(model).at_instances_of(RMSNorm).paths == (
        "layers.0.input_layernorm", "layers.0.post_attention_layernorm", "layers.1.input_layernorm",
        "layers.1.post_attention_layernorm", "layers.2.input_layernorm", "layers.2.post_attention_layernorm", "norm")
    assert select(model).at("layers.0.mlp").at_instances_of(nnx.Param).paths == (
        "layers.0.mlp.down_proj.kernel", "layers.0.mlp.gate_proj.kernel", "layers.0.mlp.up_proj.kernel")
    # the predicate sees the Variable, so metadata (logical axes) can drive a selection
    into_mlp = select(model).where(
        lambda p, n: isinstance(n, nnx.Param) and n.get_metadata()["out_sharding"][-1] == "mlp")
    assert into_mlp.paths == tuple(f"layers.{i}.mlp.{x}_proj.kernel" for i in range(3) for x in ("gate", "up"))


def test_moe_selection():
    m = Llama(dataclasses.replace(CFG, num_experts=4), rngs=nnx.Rngs(2))
    assert select(m).at_instances_of(SparseMoE).paths == ("layers.0.mlp", "layers.1.mlp", "layers.2.mlp")
    experts = select(m).at("layers.1.mlp.experts.*")
    assert experts.paths == tuple(f"layers.1.mlp.experts.{x}_proj" for x in ("down", "gate", "up"))
    assert {k: v.shape for k, v in experts.get().items()} == {
        "layers.1.mlp.experts.down_proj": (4, 16, 8), "layers.1.mlp.experts.gate_proj": (4, 8, 16),
        "layers.1.mlp.experts.up_proj": (4, 8, 16)}
    assert list(select(m).at("layers.1.mlp").params()) == [
        "layers.1.mlp.experts.down_proj", "layers.1.mlp.experts.gate_proj", "layers.1.mlp.experts.up_proj",
        "layers.1.mlp.router.kernel"]


def test_reading(model):
    sel = select(model).at("layers.*.mlp")
    got = sel.get()
    assert list(got) == list(sel.paths) and got["layers.1.mlp"] is model.layers[1].mlp
    arr = select(model).at("norm.weight").get()["norm.weight"]
    assert isinstance(arr, type(jnp.zeros(1))) and arr.shape == (8,)
    params = sel.params()
    all_params = flat_params(model)
    assert list(params) == [f"layers.{i}.mlp.{x}_proj.kernel" for i in range(3) for x in ("down", "gate", "up")]
    assert all(params[k] is all_params[k] for k in params)
    assert len(sel) == sel.count() == 3
    text = repr(sel)
    assert "Selection of 3 node(s) in Llama" in text and "at('layers.*.mlp')" in text
    assert "layers.2.mlp  LlamaMLP, 384 params" in text
    assert "Param (8,) float32" in repr(select(model).at("norm.weight"))


# ---------------------------------------------------------------------------------------------- replacing
def test_apply_doubles_exactly_one_mlp(model):
    before = snapshot(model)
    logits = np.asarray(model(IDS))
    new = select(model).at("layers.1.mlp.**.kernel").apply(lambda w: 2 * w)
    changed = {f"layers.1.mlp.{x}_proj.kernel" for x in ("down", "gate", "up")}
    new_params = flat_params(new)
    assert list(new_params) == list(before)
    for k, v in before.items():
        expect = 2 * v if k in changed else v
        assert np.array_equal(np.asarray(new_params[k]), expect), k
    # the Param wrapper and its logical axes survive
    var = flat_state(new)["layers.1.mlp.down_proj.kernel"]
    assert type(var) is nnx.Param and var.get_metadata()["out_sharding"] == ("mlp", "embed")
    assert np.abs(np.asarray(new(IDS)) - logits).max() > 1e-4
    assert_unchanged(model, before)
    assert np.array_equal(np.asarray(model(IDS)), logits)


def test_apply_on_modules_gets_a_clone(model):
    before = snapshot(model)

    def zero_in_place(mlp):  # a careless fn that mutates its argument: the input model must not see it
        mlp.down_proj.kernel[...] = jnp.zeros_like(mlp.down_proj.kernel[...])
        return mlp
    new = select(model).at("layers.*.mlp").apply(zero_in_place)
    assert_unchanged(model, before)
    assert all(not np.asarray(new.layers[i].mlp.down_proj.kernel[...]).any() for i in range(3))
    # the same model reached through .set on the down_proj kernels
    ref = select(model).at("layers.*.mlp.down_proj.kernel").set(jnp.zeros((16, 8)))
    np.testing.assert_array_equal(np.asarray(new(IDS)), np.asarray(ref(IDS)))


def widen(mlp: LlamaMLP, extra: int, seed: int) -> LlamaMLP:
    """A function-preserving wider SwiGLU: the new hidden units get random gate/up columns and zero
    down_proj rows, so down(act(gate x) * up x) is unchanged."""
    d, f = mlp.up_proj.kernel.shape
    wide = LlamaMLP(dataclasses.replace(CFG, intermediate_size=f + extra), rngs=nnx.Rngs(seed))
    return select(wide).at("*.kernel").set({
        "gate_proj.kernel": jnp.concatenate([mlp.gate_proj.kernel[...], wide.gate_proj.kernel[...][:, f:]], axis=1),
        "up_proj.kernel": jnp.concatenate([mlp.up_proj.kernel[...], wide.up_proj.kernel[...][:, f:]], axis=1),
        "down_proj.kernel": jnp.concatenate([mlp.down_proj.kernel[...], jnp.zeros((extra, d))], axis=0),
    })


def test_tree_at_with_a_wider_mlp(model):
    before = snapshot(model)
    logits = np.asarray(model(IDS))
    wide = widen(model.layers[1].mlp, extra=16, seed=3)
    new = tree_at(model, "layers.1.mlp", wide)
    p = flat_params(new)
    assert p["layers.1.mlp.up_proj.kernel"].shape == (8, 32) and p["layers.1.mlp.down_proj.kernel"].shape == (32, 8)
    assert p["layers.0.mlp.up_proj.kernel"].shape == (8, 16)
    assert new.layers[1].mlp is not wide  # the replacement is cloned: nothing shared with the caller's module
    np.testing.assert_allclose(np.asarray(new(IDS)), logits, atol=1e-6, rtol=0)  # function preserved
    # random down rows instead of zeros: a valid model that computes something else
    other = tree_at(new, "layers.1.mlp.down_proj.kernel", jnp.ones((32, 8)))
    assert np.abs(np.asarray(other(IDS)) - logits).max() > 1e-3
    assert_unchanged(model, before)


def test_apply_widens_every_mlp(model):
    logits = np.asarray(model(IDS))
    new = select(model).at_instances_of(LlamaMLP).apply(lambda mlp: widen(mlp, extra=8, seed=4))
    assert {v.shape for k, v in select(new).at("layers.*.mlp.up_proj.kernel").get().items()} == {(8, 24)}
    np.testing.assert_allclose(np.asarray(new(IDS)), logits, atol=1e-6, rtol=0)


def test_set(model):
    before = snapshot(model)
    new = select(model).at("**.input_layernorm.weight").set(jnp.full((8,), 2.0))
    assert all(np.array_equal(np.asarray(new.layers[i].input_layernorm.weight[...]), np.full(8, 2.0)) for i in range(3))
    assert np.array_equal(np.asarray(new.norm.weight[...]), before["norm.weight"])
    shared = model.layers[0].mlp
    copies = select(model).at("layers.*.mlp").set(shared)
    mlps = [copies.layers[i].mlp for i in range(3)]
    assert len({id(m) for m in mlps}) == 3 and shared not in mlps  # no shared references in the result
    assert all(np.array_equal(np.asarray(m.up_proj.kernel[...]), before["layers.0.mlp.up_proj.kernel"]) for m in mlps)
    assert_unchanged(model, before)


def test_tree_mode():
    m = Llama(CFG, rngs=nnx.Rngs(0))
    with nnx.set_graph_mode(False):
        new = select(m).at("layers.1.mlp.**.kernel").apply(lambda w: 2 * w)
        assert np.array_equal(np.asarray(new.layers[1].mlp.up_proj.kernel[...]),
                              2 * np.asarray(m.layers[1].mlp.up_proj.kernel[...]))


# ---------------------------------------------------------------------------------------------- errors
def test_no_match_errors_list_valid_paths(model):
    with pytest.raises(SelectionError) as e:
        select(model).at("layers.*.mpl")
    msg = str(e.value)
    assert "at('layers.*.mpl') selects nothing under the model" in msg
    assert "did you mean ['layers.0.mlp'" in msg and "layers.*.mlp.down_proj.kernel" in msg
    with pytest.raises(SelectionError, match=r"layers\.1\?.*selects nothing.*layers\.\*\.self_attn\.q_proj"):
        select(model).at("layers.1?.self_attn.q_proj")  # only 3 layers
    with pytest.raises(SelectionError, match=r"at_regex\('attn'\) selects nothing"):
        select(model).at_regex("attn")
    with pytest.raises(SelectionError, match=r"at_instances_of\(SparseMoE\) selects nothing under 1 selected node\(s\) "
                                             r"\(layers\.0\); the types there are \['Linear', 'LlamaAttention'"):
        select(model).at("layers.0").at_instances_of(SparseMoE)
    with pytest.raises(SelectionError, match="predicate was false on all"):
        select(model).where(lambda p, n: False)
    with pytest.raises(SelectionError,
                       match=r"tree_at: no node at path 'layers.0.mpl' in Llama; did you mean \[[^]]*'layers.0.mlp'"):
        tree_at(model, "layers.0.mpl", None)
    with pytest.raises(TypeError, match="select\\(\\) needs an nnx Module, got dict"):
        select({"a": 1})


def test_apply_wrong_kind_names_the_path(model):
    before = snapshot(model)
    with pytest.raises(TypeError,
                       match=r"module layers\.0\.mlp \(LlamaMLP\) must be replaced by an nnx Module, got ArrayImpl"):
        select(model).at("layers.*.mlp").apply(lambda mlp: jnp.zeros(3))
    with pytest.raises(TypeError, match=r"parameter norm\.weight \(Param\) must be replaced by an array .* got Linear"):
        tree_at(model, "norm.weight", model.lm_head)
    with pytest.raises(ValueError,
                       match=r"new value for norm\.weight has shape \(2, 4\) but its logical axes \('norm',\)"):
        select(model).at("norm.weight").apply(lambda w: w.reshape(2, 4))
    with pytest.raises(SelectionError, match=r"must be disjoint.*inside layers\.0"):
        select(model).at("layers.0.**").apply(lambda x: x)
    with pytest.raises(SelectionError, match="cannot replace the root"):
        select(model).apply(lambda x: x)
    with pytest.raises(SelectionError, match=r"missing \['layers\.2\.mlp'\], not selected \['layers\.3\.mlp'\]"):
        select(model).at("layers.*.mlp").set({"layers.0.mlp": 1, "layers.1.mlp": 1, "layers.3.mlp": 1})
    assert_unchanged(model, before)


def test_treescope_renders_model_and_selection(model):
    assert "Llama(" in treescope.render_to_text(model)
    text = treescope.render_to_text(select(model).at("layers.1.mlp.*"))
    assert "Selection(" in text and "'layers.1.mlp.down_proj': Linear(" in text
