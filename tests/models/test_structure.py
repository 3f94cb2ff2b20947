"""The module tree is the truth (models/structure.py): tree surgery that the config does not follow is caught by
to_hf, save_model, generate and the FLOP count; sync_config / rebuild make the model consistent again; extension
modules (not built by any config) describe themselves and round-trip through orbax checkpoints.

Tiny random float32 models; logits compared with max |diff| <= 1e-5.
"""
import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configurable_fm.bricks import flat_params, select, tree_at
from configurable_fm.interop import orbax_io
from configurable_fm.interop.hf import from_hf, to_hf
from configurable_fm.interop.safetensors_io import CheckpointError
from configurable_fm.models import (InconsistentModel, check_consistent, config_from_tree, extension_specs, generate,
                                    rebuild, register_extension, structure_problems, sync_config)
from configurable_fm.models.factory import build_model
from configurable_fm.models.layers import Linear
from configurable_fm.models.llama import LlamaConfig, LlamaDecoderLayer, LlamaMLP
from configurable_fm.models.structure import variables_of
from configurable_fm.train.flops import flops_per_token, flops_per_token_of_model
from tests.helpers import random_llama

CFG = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4, num_kv_heads=2,
                  max_position_embeddings=64)
IDS = jnp.array([[1, 5, 9, 2, 7, 3], [4, 4, 8, 1, 0, 6]], jnp.int32)


def max_diff(a, b):
    return float(jnp.max(jnp.abs(jnp.asarray(a, jnp.float32) - jnp.asarray(b, jnp.float32))))


def assert_same_variables(a, b):
    va, vb = variables_of(a), variables_of(b)
    assert list(va) == list(vb)
    for k in va:
        assert type(va[k]) is type(vb[k]), k
        x, y = va[k].get_value(), vb[k].get_value()
        if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
            x, y = jax.random.key_data(x), jax.random.key_data(y)
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=k)


@pytest.fixture(scope="module")
def model():
    return random_llama(CFG, 0)


def widen(mlp, factor=2, seed=1):
    """A function-preserving wider LlamaMLP: new gate/up columns random, new down rows zero."""
    d, f = mlp.up_proj.kernel.shape
    wide = LlamaMLP(dataclasses.replace(CFG, intermediate_size=factor * f), rngs=nnx.Rngs(seed))
    rs = np.random.RandomState(seed)
    for name in ("gate_proj", "up_proj"):
        old = np.asarray(getattr(mlp, name).kernel[...])
        getattr(wide, name).kernel.set_value(
            jnp.asarray(np.concatenate([old, rs.normal(0, 0.02, (d, (factor - 1) * f))], 1), jnp.float32))
    old = np.asarray(mlp.down_proj.kernel[...])
    wide.down_proj.kernel.set_value(jnp.asarray(np.concatenate([old, np.zeros(((factor - 1) * f, d))], 0),
                                                jnp.float32))
    return wide


def fresh_layer(seed):
    layer = LlamaDecoderLayer(CFG, rngs=nnx.Rngs(seed))
    return layer


# ====================================================================================== fresh models are consistent
SPECS = {
    "llama": dict(family="llama", vocab_size=40, hidden_size=16, intermediate_size=24, num_layers=2, num_heads=4,
                  num_kv_heads=2),
    "llama_tied": dict(family="llama", vocab_size=40, hidden_size=16, intermediate_size=24, num_layers=2,
                       num_heads=4, num_kv_heads=2, tie_word_embeddings=True),
    "llama_biases": dict(family="llama", vocab_size=40, hidden_size=16, intermediate_size=24, num_layers=2,
                         num_heads=4, num_kv_heads=1, attention_bias=True, o_proj_bias=True, mlp_bias=True,
                         head_dim=8),
    "llama_moe": dict(family="llama", vocab_size=40, hidden_size=16, intermediate_size=24, num_layers=2,
                      num_heads=4, num_kv_heads=2, num_experts=4, num_experts_per_tok=2,
                      architecture="MixtralForCausalLM"),
    "gpt2": dict(family="gpt2", vocab_size=40, n_positions=32, n_embd=16, n_layer=2, n_head=4),
    "gpt2_untied_inner": dict(family="gpt2", vocab_size=40, n_positions=32, n_embd=16, n_layer=2, n_head=4,
                              n_inner=24, tie_word_embeddings=False),
    "bert": dict(family="bert", vocab_size=40, hidden_size=16, num_layers=2, num_heads=4, intermediate_size=24,
                 max_position_embeddings=32),
    "bert_no_pooler": dict(family="bert", vocab_size=40, hidden_size=16, num_layers=2, num_heads=4,
                           intermediate_size=24, max_position_embeddings=32, add_pooling_layer=False),
}


@pytest.mark.parametrize("name", sorted(SPECS))
def test_fresh_models_are_consistent_and_their_tree_gives_their_config(name):
    m = build_model(SPECS[name], seed=1)
    assert structure_problems(m) == []
    assert config_from_tree(m) == m.cfg
    synced = sync_config(m)
    assert synced.cfg == m.cfg
    np.testing.assert_array_equal(np.asarray(synced(IDS % 40)), np.asarray(m(IDS % 40)))


# ====================================================================================== the reviewer's probes
def test_widened_mlps_are_refused_and_nothing_is_written(model, tmp_path):
    wide = select(model).at("layers.*.mlp").apply(widen)
    assert max_diff(wide(IDS), model(IDS)) <= 1e-5  # function-preserving: the tree is fine, the config stale
    problems = structure_problems(wide)
    assert len(problems) == 6
    assert ("layers.1.mlp.up_proj.kernel is (32, 96) in the tree but (32, 48) from the config "
            "(intermediate_size=48)") in problems
    with pytest.raises(InconsistentModel, match=r"to_hf: the module tree disagrees with model.cfg at 6 paths:\n"
                                                r"  layers.0.mlp.down_proj.kernel is \(96, 32\) in the tree but "
                                                r"\(48, 32\)(.|\n)*sync_config") as e:
        to_hf(wide, tmp_path / "hf")
    assert len(e.value.problems) == 6
    with pytest.raises(InconsistentModel, match="save_model: the module tree disagrees"):
        orbax_io.save_model(wide, tmp_path / "orbax")
    with pytest.raises(InconsistentModel, match="generate: the module tree disagrees"):
        generate(wide, IDS, max_new_tokens=2)
    with pytest.raises(InconsistentModel, match="flops_per_token: the module tree disagrees"):
        flops_per_token_of_model(wide, 16)
    assert list(tmp_path.iterdir()) == []  # not even a temporary directory


def test_sync_config_of_widened_mlps_round_trips_through_hf(model, tmp_path):
    wide = select(model).at("layers.*.mlp").apply(widen)
    synced = sync_config(wide)
    assert synced.cfg == dataclasses.replace(CFG, intermediate_size=96)
    assert synced.layers[0].self_attn.cfg == synced.cfg  # sub-module configs follow the root
    assert structure_problems(synced) == []
    assert flat_params(synced).keys() == flat_params(wide).keys()
    assert all(flat_params(synced)[k] is v for k, v in flat_params(wide).items())  # the same arrays
    reloaded = from_hf(to_hf(synced, tmp_path / "hf"))
    assert reloaded.cfg.intermediate_size == 96
    assert max_diff(reloaded(IDS), wide(IDS)) <= 1e-5
    assert max_diff(reloaded(IDS), model(IDS)) <= 1e-5


def test_three_layers_in_a_two_layer_config(model, tmp_path):
    three = tree_at(model, "layers", nnx.List([nnx.clone(model.layers[0]), nnx.clone(model.layers[1]),
                                               fresh_layer(5)]))
    logits = three(IDS)
    assert structure_problems(three) == [
        "layers.2 (LlamaDecoderLayer, 9 variables) is in the tree but not in the model the config builds "
        "(num_layers=2)"]
    for action, call in [("to_hf", lambda: to_hf(three, tmp_path / "hf")),
                         ("save_model", lambda: orbax_io.save_model(three, tmp_path / "orbax")),
                         ("generate", lambda: generate(three, IDS, max_new_tokens=3))]:
        with pytest.raises(InconsistentModel, match=rf"{action}: (.|\n)*layers\.2 \(LlamaDecoderLayer"):
            call()
    assert list(tmp_path.iterdir()) == []

    synced = sync_config(three)
    assert synced.cfg.num_layers == 3 and structure_problems(synced) == []
    assert max_diff(synced(IDS), logits) <= 1e-5
    from_orbax = orbax_io.load_model(orbax_io.save_model(synced, tmp_path / "orbax"))
    from_hf_dir = from_hf(to_hf(synced, tmp_path / "hf"))
    for reloaded in (from_orbax, from_hf_dir):
        assert reloaded.cfg.num_layers == 3 and len(reloaded.layers) == 3
        assert max_diff(reloaded(IDS), logits) <= 1e-5
    np.testing.assert_array_equal(np.asarray(generate(synced, IDS, max_new_tokens=3)),
                                  np.asarray(generate(from_orbax, IDS, max_new_tokens=3)))


def test_one_widened_layer_cannot_be_one_config(model):
    one = tree_at(model, "layers.1.mlp", widen(model.layers[1].mlp))
    assert structure_problems(one)[0].startswith("layers.1.mlp.down_proj.kernel is (96, 32) in the tree")
    with pytest.raises(InconsistentModel, match=r"one llama config cannot express this tree(.|\n)*"
                                                r"intermediate_size is 48 at layers.0.mlp but 96 at layers.1.mlp"):
        config_from_tree(one)
    with pytest.raises(InconsistentModel, match="layers.1.mlp"):
        sync_config(one)


def test_more_than_eight_problems_are_counted_and_cut():
    cfg = dataclasses.replace(CFG, num_layers=3)
    m = random_llama(cfg, 1)
    wide = select(m).at("layers.*.mlp").apply(widen)
    with pytest.raises(InconsistentModel, match=r"at 9 paths:(.|\n)*\(first 8 of 9 listed\)") as e:
        check_consistent(wide, "to_hf")
    assert len(e.value.problems) == 9 and str(e.value).count("in the tree but") == 8


def test_sub_module_config_and_module_class_disagreements(model):
    theta = nnx.clone(model)
    theta.layers[1].self_attn.cfg = dataclasses.replace(CFG, rope_theta=500.0)
    assert structure_problems(theta) == [
        "layers.1.self_attn.cfg disagrees with model.cfg: rope_theta=500.0 there but 10000.0 in model.cfg"]
    with pytest.raises(InconsistentModel, match=r"rope_theta is 10000.0 at layers.0.self_attn but 500.0 at "
                                                r"layers.1.self_attn"):
        config_from_tree(theta)
    theta.layers[0].self_attn.cfg = dataclasses.replace(CFG, rope_theta=500.0)
    fixed = sync_config(theta)  # every layer agrees: the tree's value wins
    assert fixed.cfg.rope_theta == 500.0 and structure_problems(fixed) == []
    assert max_diff(fixed(IDS), theta(IDS)) <= 1e-5

    class OtherMLP(nnx.Module):  # same parameter names, another computation
        def __init__(self, mlp):
            self.gate_proj, self.up_proj, self.down_proj = mlp.gate_proj, mlp.up_proj, mlp.down_proj

        def __call__(self, x):
            return self.down_proj(jax.nn.relu(self.up_proj(x)))

    other = tree_at(model, "layers.0.mlp", OtherMLP(nnx.clone(model.layers[0].mlp)))
    assert structure_problems(other) == [
        "layers.0.mlp is a OtherMLP in the tree but a LlamaMLP from the config (intermediate_size=48)"]
    with pytest.raises(InconsistentModel, match="sync_config: (.|\n)*layers.0.mlp is a OtherMLP"):
        sync_config(other)  # rebuilding it as a LlamaMLP would change what it computes

    class Mask(nnx.Variable):
        pass

    masked = nnx.clone(model)
    masked.layers[0].mlp.mask = Mask(jnp.ones((48,)))
    assert structure_problems(masked) == [
        "layers.0.mlp.mask (Mask (48,)) is in the tree but not in the model the config builds (intermediate_size=48)"]


def test_sync_config_keeps_the_build_options():
    m = build_model(CFG, seed=2, dtype=jnp.bfloat16, remat="full")
    wide = select(m).at("layers.*.mlp").apply(lambda mlp: widen(mlp))
    synced = sync_config(wide)
    assert synced.remat == "full" and synced.layers[0].mlp.up_proj.dtype == jnp.bfloat16
    assert structure_problems(synced) == []
    plain = rebuild(m, {}, options={"remat": "none", "dtype": None})  # same tree and arrays, other options
    assert plain.remat == "none" and plain.layers[0].mlp.up_proj.dtype is None
    assert all(flat_params(plain)[k] is v for k, v in flat_params(m).items())


# ====================================================================================== rebuild
def padded_mlp_params(m, f_new):
    """{path: array} for every MLP kernel of `m` widened to f_new (function-preserving)."""
    out, rs = {}, np.random.RandomState(3)
    for i, layer in enumerate(m.layers):
        d, f = layer.mlp.up_proj.kernel.shape
        for name in ("gate_proj", "up_proj"):
            old = np.asarray(getattr(layer.mlp, name).kernel[...])
            out[f"layers.{i}.mlp.{name}.kernel"] = jnp.asarray(
                np.concatenate([old, rs.normal(0, 0.02, (d, f_new - f))], 1), jnp.float32)
        old = np.asarray(layer.mlp.down_proj.kernel[...])
        out[f"layers.{i}.mlp.down_proj.kernel"] = jnp.asarray(np.concatenate([old, np.zeros((f_new - f, d))], 0),
                                                              jnp.float32)
    return out


def test_rebuild_width_and_depth(model, tmp_path):
    wide = rebuild(model, {"intermediate_size": 96}, params=padded_mlp_params(model, 96))
    assert wide.cfg.intermediate_size == 96 and structure_problems(wide) == []
    assert max_diff(wide(IDS), model(IDS)) <= 1e-5
    assert wide.embed_tokens.embedding[...] is model.embed_tokens.embedding[...]  # unchanged arrays are kept
    assert max_diff(from_hf(to_hf(wide, tmp_path / "hf"))(IDS), model(IDS)) <= 1e-5

    with pytest.raises(ValueError, match=r"needs values for 6 new or re-shaped variable\(s\): "
                                          r"layers.0.mlp.down_proj.kernel \(96, 32\), was \(48, 32\)"):
        rebuild(model, {"intermediate_size": 96})
    with pytest.raises(ValueError, match=r"unknown llama config field\(s\) \['width'\]; valid fields: \[.*"
                                         r"'intermediate_size'"):
        rebuild(model, {"width": 96})
    with pytest.raises(KeyError, match="no variable at layers.5.mlp.up_proj.kernel"):
        rebuild(model, {}, params={"layers.5.mlp.up_proj.kernel": jnp.zeros((32, 48))})
    with pytest.raises(ValueError, match=r"layers.0.mlp.up_proj.kernel is \(32, 48\) in params but the new model "
                                         r"needs \(32, 96\)"):
        rebuild(model, {"intermediate_size": 96},
                params={**padded_mlp_params(model, 96), "layers.0.mlp.up_proj.kernel": jnp.zeros((32, 48))})

    extra = {k.replace("layers.0.", "layers.2."): v for k, v in flat_params(model).items() if k.startswith("layers.0.")}
    deeper = rebuild(model, {"num_layers": 3}, params=extra)
    assert deeper.cfg.num_layers == 3 and structure_problems(deeper) == []
    shallower = rebuild(model, {"num_layers": 1})
    assert len(shallower.layers) == 1 and "layers.1.mlp.up_proj.kernel" not in flat_params(shallower)


# ====================================================================================== extensions
class Scale(nnx.Variable):
    """A variable that is not a parameter (e.g. a frozen per-channel scale)."""


class ScaledLinear(nnx.Module):
    """Test-only extension: y = base(x) * scale + shift, wrapping the Linear the config built."""

    def __init__(self, base: Linear, *, init: float = 1.0):
        out = base.kernel.shape[1]
        self.base = base
        self.scale = Scale(jnp.full((out,), init, jnp.float32))
        self.shift = nnx.Param(jnp.zeros((out,), jnp.float32))
        self.init = init

    def __call__(self, x):
        return self.base(x) * self.scale[...] + self.shift[...]

    def structure_spec(self):
        return {"kind": "test_scaled_linear", "options": {"init": self.init}}

    def structure_base(self):
        return self.base


class Adapter(nnx.Module):
    """Test-only extension that adds a new attribute (no base) and holds an RNG stream (key + count variables)."""

    def __init__(self, dim: int, seed: int):
        self.dim, self.seed = dim, seed
        self.rngs = nnx.Rngs(seed)
        self.gain = nnx.Param(jnp.ones((dim,), jnp.float32))

    def structure_spec(self):
        return {"kind": "test_adapter", "options": {"dim": self.dim, "seed": self.seed}}


register_extension("test_scaled_linear", lambda base, options, *, rngs: ScaledLinear(base, **options), replace=True)
register_extension("test_adapter", lambda base, options, *, rngs: Adapter(**options), replace=True)


def scaled(model, seed=0):
    rs = np.random.RandomState(seed)

    def wrap(lin):
        ext = ScaledLinear(lin, init=0.5)
        ext.scale.set_value(jnp.asarray(rs.normal(1.0, 0.3, ext.scale.shape), jnp.float32))
        ext.shift.set_value(jnp.asarray(rs.normal(0.0, 0.1, ext.shift.shape), jnp.float32))
        return ext

    return select(model).at("layers.*.mlp.up_proj").apply(wrap)


def test_extension_round_trips_through_orbax(model, tmp_path):
    ext = scaled(model)
    ext.layers[0].adapter = Adapter(8, seed=3)
    assert max_diff(ext(IDS), model(IDS)) > 1e-3  # the extension changes the function
    assert structure_problems(ext) == []
    assert extension_specs(ext) == [
        {"path": "layers.0.adapter", "kind": "test_adapter", "options": {"dim": 8, "seed": 3}},
        {"path": "layers.0.mlp.up_proj", "kind": "test_scaled_linear", "options": {"init": 0.5}},
        {"path": "layers.1.mlp.up_proj", "kind": "test_scaled_linear", "options": {"init": 0.5}}]
    assert config_from_tree(ext) == CFG  # read through structure_base()

    path = orbax_io.save_model(ext, tmp_path / "ckpt")
    spec = json.loads((path / orbax_io.MODEL_CONFIG).read_text())
    assert spec["family"] == "llama" and spec["intermediate_size"] == 48 and len(spec["extensions"]) == 3
    assert (path / orbax_io.VARIABLES_DIR).is_dir()
    loaded = orbax_io.load_model(path)
    assert isinstance(loaded.layers[1].mlp.up_proj, ScaledLinear) and isinstance(loaded.layers[0].adapter, Adapter)
    assert_same_variables(loaded, ext)
    np.testing.assert_array_equal(np.asarray(loaded(IDS)), np.asarray(ext(IDS)))
    assert structure_problems(loaded) == []

    synced = sync_config(ext)  # keeps the extensions
    assert_same_variables(synced, ext)

    with pytest.raises(NotImplementedError, match=r"to_hf: an HF llama checkpoint cannot express the extension "
                                                  r"module\(s\) at layers.0.adapter \(test_adapter\), "
                                                  r"layers.0.mlp.up_proj \(test_scaled_linear\)"):
        to_hf(ext, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()

    spec["extensions"][1]["kind"] = "unknown_kind"
    (path / orbax_io.MODEL_CONFIG).write_text(json.dumps(spec))
    with pytest.raises(CheckpointError, match="kind 'unknown_kind', which is not registered"):
        orbax_io.load_model(path)


def test_extension_problems_are_reported(model):
    ext = scaled(model)
    bad = nnx.clone(ext)
    bad.layers[0].mlp.up_proj.scale = Scale(jnp.ones((3,)))
    assert structure_problems(bad) == [
        "layers.0.mlp.up_proj.scale is (3,) in the tree but (48,) from the config (extension 'test_scaled_linear' "
        'at layers.0.mlp.up_proj, options {"init": 0.5})']

    class Unregistered(ScaledLinear):
        def structure_spec(self):
            return {"kind": "nobody_registered_this", "options": {}}

    odd = tree_at(model, "layers.0.mlp.up_proj", Unregistered(nnx.clone(model.layers[0].mlp.up_proj)))
    problems = structure_problems(odd)
    assert problems[0].startswith("layers.0.mlp.up_proj (Unregistered) is an extension of kind "
                                  "'nobody_registered_this', which is not registered")
    with pytest.raises(InconsistentModel):
        check_consistent(odd, "save_model")


# ====================================================================================== generate and FLOPs
def test_consistent_models_still_generate_and_count(model):
    out = generate(model, IDS, max_new_tokens=2)
    assert out.shape == (2, 8)
    assert flops_per_token_of_model(model, 16) == flops_per_token(CFG, 16) == flops_per_token(model, 16)


def test_the_package_extension_kinds_load_in_a_fresh_interpreter(model, tmp_path):
    """A checkpoint with this package's extensions (an activation-sparse Linear, LoRA) loads in an interpreter that
    imported neither operation: PACKAGE_EXTENSIONS names the module that registers each kind."""
    import subprocess
    import sys

    from configurable_fm.analysis.sparsity import SparseLinear
    from configurable_fm.bricks.adapters import attach
    from configurable_fm.models.structure import PACKAGE_EXTENSIONS

    ext = tree_at(model, "layers.0.mlp.down_proj", SparseLinear(model.layers[0].mlp.down_proj, threshold=0.05))
    ext = attach(ext, "lora", "layers.*.self_attn.q_proj", rank=2, init="random", seed=1)
    path = orbax_io.save_model(ext, tmp_path / "ckpt")
    # one interpreter for both checks: the load first, then (the same process) every module PACKAGE_EXTENSIONS names
    script = ("import importlib, json, sys, numpy as np; from configurable_fm.interop import orbax_io; "
              "from configurable_fm.models.structure import PACKAGE_EXTENSIONS, registered_extensions; "
              "before = sorted(registered_extensions()); m = orbax_io.load_model(sys.argv[1]); "
              "print(before, type(m.layers[0].mlp.down_proj).__name__, type(m.layers[1].self_attn.q_proj).__name__); "
              "np.save(sys.argv[2], np.asarray(m(np.asarray(sys.argv[3].split(','), dtype=np.int32)[None]))); "
              "[importlib.import_module(mod) for mod in set(PACKAGE_EXTENSIONS.values())]; "
              "print(json.dumps(sorted(registered_extensions())))")
    ids = ",".join(str(i) for i in np.asarray(IDS[0]))
    out, listing = subprocess.run([sys.executable, "-c", script, str(path), str(tmp_path / "y.npy"), ids], text=True,
                                  capture_output=True, check=True).stdout.splitlines()
    assert "activation_sparsity" not in out.split("]")[0] and "lora" not in out.split("]")[0]
    assert out.split("]")[1].split() == ["SparseLinear", "LoRALinear"]
    np.testing.assert_allclose(np.load(tmp_path / "y.npy"), np.asarray(ext(IDS[:1])), rtol=1e-6, atol=1e-6)

    registered = json.loads(listing)  # after importing every module the table names
    assert registered == sorted(PACKAGE_EXTENSIONS)  # every kind the modules register is in the table, and back
