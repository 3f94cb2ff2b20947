"""Depth growth (ops/grow/depth.py): identity and LLaMA-Pro blocks are exact, stacking and SOLAR's DUS copy the
layers they should, new blocks learn, grown models export, bad arguments are named."""
import dataclasses

import jax
import numpy as np
import pytest

from configurable_fm.bricks.paths import flat_params
from configurable_fm.interop.hf import from_hf, to_hf
from configurable_fm.models import RopeScaling, check_consistent
from configurable_fm.models.llama import LlamaConfig
from configurable_fm.ops.grow import GrowthError, depth_sources, grow_depth
from tests.ops.grow.grow_helpers import (assert_unchanged, grads, logits, max_diff, random_model, reference_logits,
                                         snapshot)

IDS = np.random.RandomState(0).randint(0, 37, (2, 9))
CFG = LlamaConfig(vocab_size=37, hidden_size=24, num_heads=3, num_kv_heads=1, intermediate_size=40, num_layers=2,
                  max_position_embeddings=64, attention_bias=True, o_proj_bias=True, mlp_bias=True,
                  rope_scaling=RopeScaling("llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                           original_max_position_embeddings=8))  # as test_grow_width's GQA_BIASES
OUTPUTS = ("self_attn.o_proj.kernel", "self_attn.o_proj.bias", "mlp.down_proj.kernel", "mlp.down_proj.bias")


def layer(params, i):
    return {k.split(".", 2)[2]: v for k, v in params.items() if k.startswith(f"layers.{i}.")}


def assert_layer_is(grown, i, source, j, zeroed=False):
    a, b = layer(flat_params(grown), i), layer(flat_params(source), j)
    assert a.keys() == b.keys()
    for k in a:
        if zeroed and k in OUTPUTS:
            assert not np.asarray(a[k]).any(), f"layer {i} {k} should be zero"
        else:
            np.testing.assert_array_equal(np.asarray(a[k]), np.asarray(b[k]), err_msg=f"layer {i} {k} vs {j}")


@pytest.fixture(scope="module")
def model():
    return random_model(CFG, seed=3)


def test_plans_follow_the_papers():
    # LLaMA-Pro block_expansion.py, Llama-2-7B 32 -> 40: a zeroed copy after every 4th layer.
    pro = depth_sources(32, method="llama_pro", num_layers=40)
    assert len(pro) == 40 and [s for s, z in pro if z] == [3, 7, 11, 15, 19, 23, 27, 31]
    assert [i for i, (_, z) in enumerate(pro) if z] == [4, 9, 14, 19, 24, 29, 34, 39]
    # SOLAR 10.7B: 32 layers, drop 8 at the seam -> 48 = [0, 24) + [8, 32).
    assert depth_sources(32, method="dus", drop=8) == [(i, False) for i in list(range(24)) + list(range(8, 32))]
    # G_stack: the whole stack, g times.
    assert depth_sources(6, method="stack", factor=4) == [(i % 6, False) for i in range(24)]
    # Positions: p = before source layer p (repeats allowed, n = at the end).
    assert depth_sources(3, method="identity", positions=[3, 0, 1, 1]) == [
        (None, True), (0, False), (None, True), (None, True), (1, False), (2, False), (None, True)]
    assert depth_sources(3, method="llama_pro", positions=[0, 2]) == [(0, True), (0, False), (1, False), (1, True),
                                                                      (2, False)]
    assert [s for s, z in depth_sources(5, method="identity", num_layers=7)] == [0, 1, None, 2, 3, 4, None]


def test_identity_and_llama_pro_blocks_are_exact(model):
    before = snapshot(model)
    ref = logits(model, IDS)
    identity = grow_depth(model, method="identity", positions=[0, 2], key=jax.random.key(1))
    pro = grow_depth(model, method="llama_pro", num_layers=4)
    for grown in (identity, pro):
        check_consistent(grown, "test")
        assert grown.cfg == dataclasses.replace(CFG, num_layers=4)
        assert max_diff(logits(grown, IDS), ref) == 0.0  # x + 0: bit for bit
    assert_layer_is(identity, 1, model, 0)
    assert_layer_is(identity, 2, model, 1)
    fresh = layer(flat_params(identity), 0)
    assert np.all(np.asarray(fresh["input_layernorm.weight"]) == 1.0)
    assert not np.asarray(fresh["self_attn.q_proj.bias"]).any()
    assert 0.01 < np.asarray(fresh["self_attn.q_proj.kernel"]).std() < 0.03  # the family's N(0, 0.02) init
    for k in OUTPUTS:
        assert not np.asarray(fresh[k]).any()
    for i, j, zeroed in [(0, 0, False), (1, 0, True), (2, 1, False), (3, 1, True)]:
        assert_layer_is(pro, i, model, j, zeroed)
    assert_unchanged(model, before)


def test_new_blocks_receive_gradients_on_their_outputs(model):
    grown = grow_depth(model, method="identity", positions=[0, 2], key=jax.random.key(1))
    g = grads(grown, IDS)
    for i in (0, 3):  # the new blocks
        assert np.abs(g[f"layers.{i}.self_attn.o_proj.kernel"]).sum() > 0
        assert np.abs(g[f"layers.{i}.mlp.down_proj.kernel"]).sum() > 0
        for name in ("self_attn.q_proj.kernel", "self_attn.v_proj.kernel", "mlp.up_proj.kernel"):
            assert not g[f"layers.{i}.{name}"].any()  # behind a zero matrix until the first update
    assert np.abs(g["layers.1.mlp.up_proj.kernel"]).sum() > 0  # the old blocks learn as before


def test_stack_and_dus_copy_the_right_layers(model):
    stacked = grow_depth(model, method="stack", factor=3)
    check_consistent(stacked, "test")
    assert stacked.cfg.num_layers == 6
    for i in range(6):
        assert_layer_is(stacked, i, model, i % 2)
    six = random_model(dataclasses.replace(CFG, num_layers=6), seed=4)
    dus = grow_depth(six, method="dus", drop=2)
    assert dus.cfg.num_layers == 8
    for i, j in enumerate([0, 1, 2, 3, 2, 3, 4, 5]):
        assert_layer_is(dus, i, six, j)
    for name in ("embed_tokens.embedding", "norm.weight", "lm_head.kernel"):
        np.testing.assert_array_equal(np.asarray(flat_params(dus)[name]), np.asarray(flat_params(six)[name]))


def test_moe_layers_grow_exactly():
    moe_cfg = dataclasses.replace(CFG, attention_bias=False, o_proj_bias=False, mlp_bias=False, num_experts=4,
                                  architecture="MixtralForCausalLM")
    moe = random_model(moe_cfg, seed=5)
    grown = grow_depth(moe, method="llama_pro", positions=[1])
    check_consistent(grown, "test")
    assert not np.asarray(flat_params(grown)["layers.1.mlp.experts.down_proj"]).any()
    ref = reference_logits(flat_params(moe), moe_cfg, IDS)
    assert max_diff(reference_logits(flat_params(grown), grown.cfg, IDS), ref) <= 1e-10


def test_deeper_model_round_trips_through_hf(model, tmp_path):
    grown = grow_depth(model, method="llama_pro", num_layers=4)
    reloaded = from_hf(to_hf(grown, tmp_path / "hf"))
    assert reloaded.cfg.num_layers == 4
    a, b = flat_params(grown), flat_params(reloaded)
    assert list(a) == list(b)
    for k in a:
        np.testing.assert_array_equal(np.asarray(a[k]), np.asarray(b[k]), err_msg=k)


ERRORS = {
    "unknown-method": (dict(method="interpolate", num_layers=4), r"method='interpolate' is unknown; choose one of "
                                                                 r"\['identity', 'llama_pro', 'stack', 'dus'\]"),
    "not-larger": (dict(method="llama_pro", num_layers=2), r"num_layers=2 is not larger than the model's 2 layers"),
    "no-target": (dict(method="llama_pro"), r"pass num_layers \(new layers spread evenly\) or positions"),
    "bad-position": (dict(method="llama_pro", positions=[1, 3]), r"positions \[3\] are not insertion points 0..2"),
    "disagree": (dict(method="llama_pro", positions=[1], num_layers=5),
                 r"num_layers=5 disagrees with 1 positions on 2 layers \(3\)"),
    "identity-key": (dict(method="identity", num_layers=3), r"method='identity' \(fresh weights for the new blocks\) "
                                                             r"needs a PRNG key"),
    "wrong-argument": (dict(method="stack", num_layers=4), r"method='stack' takes \['factor'\], not \['num_layers'\]"),
    "stack-factor": (dict(method="stack", factor=1), r"factor must be an int >= 2, got 1"),
    "dus-drop": (dict(method="dus", drop=1), r"dus with drop=1 on 2 layers gives 2\*\(2-1\) = 2 layers, not more "
                                             r"than 2; drop must be < 1"),
}


@pytest.mark.parametrize("name", sorted(ERRORS))
def test_errors_name_the_problem(model, name):
    kwargs, message = ERRORS[name]
    with pytest.raises(GrowthError, match=message):
        grow_depth(model, **kwargs)
