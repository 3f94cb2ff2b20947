"""MoE routing rules (models/moe.py): hand-computed routings on small logits for every rule (ties, capacity overflow
in the (position, rank) order, expert-choice picks and drops), SparseMoE outputs against a numpy reference of the
experts, noisy top-k (the noise formula and key per call, none at evaluation = plain top-k, remat draws the same),
config validation, HF export refusals and the orbax / structure round trip of the new configs."""
import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configurable_fm.analysis import capture
from configurable_fm.bricks import flat_params
from configurable_fm.interop import orbax_io
from configurable_fm.interop.hf import UnsupportedModel
from configurable_fm.interop.hf_llama import config_to_hf
from configurable_fm.models import from_hf, to_hf
from configurable_fm.models.factory import build_model
from configurable_fm.models.llama import LlamaConfig
from configurable_fm.models.moe import (SparseMoE, expert_capacity, route, routing, routing_noise, within_capacity)
from configurable_fm.models.structure import check_consistent, rebuild

CFG = LlamaConfig(vocab_size=40, hidden_size=16, intermediate_size=12, num_layers=2, num_heads=4, num_kv_heads=2,
                  num_experts=4, num_experts_per_tok=2, architecture="MixtralForCausalLM")
IDS = np.random.RandomState(0).randint(0, 40, (2, 7)).astype(np.int32)


def softmax(v):
    e = np.exp(np.asarray(v, np.float64) - np.max(v))
    return e / e.sum()


def close(a, b, tol=1e-6):
    np.testing.assert_allclose(np.asarray(a, np.float64), np.asarray(b, np.float64), atol=tol, rtol=0)


# ------------------------------------------------------------------------------------------ token choice
TIES = np.array([[[2.0, 1.0, 0.0, -1.0], [1.0, 1.0, 1.0, 0.0]]], np.float32)  # (1, 2, 4); token 1 ties 3 ways


def test_topk_softmax_renormalises_and_breaks_ties_to_the_lower_expert():
    r = routing(jnp.asarray(TIES), 2, "topk_softmax")
    e = math.e
    close(r.combine_BxTxE[0], [[e / (e + 1), 1 / (e + 1), 0, 0], [0.5, 0.5, 0, 0]])
    assert np.array_equal(r.chosen_BxTxE[0], [[1, 1, 0, 0], [1, 1, 0, 0]])
    assert np.array_equal(r.dispatch_BxTxE, r.chosen_BxTxE)
    # noisy_topk without noise is the same rule on the same logits
    assert np.array_equal(routing(jnp.asarray(TIES), 2, "noisy_topk").combine_BxTxE, r.combine_BxTxE)


def test_softmax_topk_keeps_the_probabilities():
    r = routing(jnp.asarray(TIES), 2, "softmax_topk")
    p0, p1 = softmax(TIES[0, 0]), softmax(TIES[0, 1])
    close(r.combine_BxTxE[0], [[p0[0], p0[1], 0, 0], [p1[0], p1[1], 0, 0]])
    close(p1[0], math.e / (3 * math.e + 1))


def test_route_is_unchanged_for_the_existing_rules():
    w, i = route(jnp.asarray(TIES), 2, "topk_softmax")
    assert np.array_equal(i[0], [[0, 1], [0, 1]])
    with pytest.raises(ValueError, match="not a token-choice rule"):
        route(jnp.asarray(TIES), 2, "expert_choice")
    with pytest.raises(ValueError, match="unknown routing rule 'nope'"):
        route(jnp.asarray(TIES), 2, "nope")


def test_expert_capacity_rounds_up():
    assert expert_capacity(8, 2, 4, 1.0) == 4
    assert expert_capacity(5, 2, 4, 1.0) == 3  # ceil(2.5)
    assert expert_capacity(10, 1, 3, 0.3) == 1  # 0.3 * 10 / 3 = 1.0000000000000002 in floats
    assert expert_capacity(4, 1, 8, 0.1) == 1  # at least one
    with pytest.raises(ValueError, match="must be > 0"):
        expert_capacity(4, 1, 2, 0.0)


def test_capacity_overflow_drops_the_later_tokens():
    # k = 1, E = 2, T = 4, cf = 1: C = 2; tokens 0, 1, 2 want expert 0, token 3 expert 1 -> token 2 dropped.
    logits = jnp.asarray([[[1.0, 0.0], [2.0, 0.0], [3.0, 0.0], [0.0, 1.0]]])
    r = routing(logits, 1, "topk_softmax", capacity_factor=1.0)
    assert np.array_equal(r.combine_BxTxE[0], [[1, 0], [1, 0], [0, 0], [0, 1]])
    assert np.array_equal(r.dispatch_BxTxE[0], [[1, 0], [1, 0], [0, 0], [0, 1]])
    assert np.array_equal(r.chosen_BxTxE[0], [[1, 0], [1, 0], [1, 0], [0, 1]])
    # each row is its own group: a second row is routed on its own
    both = routing(jnp.concatenate([logits, logits[:, ::-1]]), 1, "topk_softmax", capacity_factor=1.0)
    assert np.array_equal(both.combine_BxTxE[0], r.combine_BxTxE[0])
    assert np.array_equal(both.combine_BxTxE[1], [[0, 1], [1, 0], [1, 0], [0, 0]])  # reversed row: its token 3 drops


def test_capacity_serves_positions_before_ranks():
    # k = 2, E = 3, T = 3, cf = 0.5: C = 1. Choices: t0 (0, 1), t1 (1, 2), t2 (1, 0). In the order (t, j):
    # (0,0)->e0 kept, (0,1)->e1 kept, (1,0)->e1 dropped, (1,1)->e2 kept, (2,0)->e1 dropped, (2,1)->e0 dropped.
    # (GShard's rank-first order would keep t1's first choice e1 and drop t0's second instead.)
    logits = jnp.asarray([[[2.0, 1.0, 0.0], [0.0, 2.0, 1.0], [1.0, 2.0, 0.0]]])
    _, idx = route(logits, 2, "topk_softmax")
    assert np.array_equal(within_capacity(idx, 3, 1)[0], [[1, 1], [0, 1], [0, 0]])
    r = routing(logits, 2, "topk_softmax", capacity_factor=0.5)
    a, b = softmax([2.0, 1.0])
    close(r.combine_BxTxE[0], [[a, b, 0], [0, 0, b], [0, 0, 0]])  # dropped shares are not renormalised
    assert np.array_equal(r.dispatch_BxTxE[0], [[1, 1, 0], [0, 0, 1], [0, 0, 0]])
    assert np.array_equal(r.chosen_BxTxE[0], [[1, 1, 0], [0, 1, 1], [1, 1, 0]])


def test_a_large_capacity_is_no_capacity():
    logits = jax.random.normal(jax.random.key(0), (2, 9, 4))
    for rule in ("topk_softmax", "softmax_topk"):
        plain = routing(logits, 2, rule)
        assert np.array_equal(routing(logits, 2, rule, capacity_factor=2.0).combine_BxTxE, plain.combine_BxTxE)  # C = T


# ------------------------------------------------------------------------------------------ expert choice
EC = np.array([[[3.0, 0.0, 0.0], [2.0, 2.0, 0.0], [0.0, 0.0, 0.0], [0.0, 1.0, 3.0]]], np.float32)  # (1, 4, 3)


def test_expert_choice_picks_each_experts_top_tokens():
    # k = 1, cf = 1: C = ceil(4 / 3) = 2. Columns of s = softmax(rows): e0 takes t0, t1; e1 t1, t2; e2 t3, t2.
    s = np.stack([softmax(row) for row in EC[0]])
    r = routing(jnp.asarray(EC), 1, "expert_choice")
    picked = np.array([[1, 0, 0], [1, 1, 0], [0, 1, 1], [0, 0, 1]], bool)
    assert np.array_equal(r.dispatch_BxTxE[0], picked)
    assert np.array_equal(r.chosen_BxTxE, r.dispatch_BxTxE)
    close(r.combine_BxTxE[0], np.where(picked, s, 0.0))  # the weight is the probability, not renormalised


def test_expert_choice_capacity_can_leave_a_token_to_no_expert():
    # cf = 0.5: C = ceil(0.5 * 4 / 3) = 1: e0 takes t0, e1 t1, e2 t3; t2 is dropped.
    r = routing(jnp.asarray(EC), 1, "expert_choice", capacity_factor=0.5)
    assert np.array_equal(r.dispatch_BxTxE[0], [[1, 0, 0], [0, 1, 0], [0, 0, 0], [0, 0, 1]])
    # k scales C: k = 3, cf = 1 gives C = 4 = T, every expert takes every token
    assert bool(jnp.all(routing(jnp.asarray(EC), 3, "expert_choice").dispatch_BxTxE))


def test_expert_choice_ties_go_to_the_earlier_position():
    r = routing(jnp.zeros((1, 4, 2)), 1, "expert_choice")  # C = 2, all scores 0.5
    assert np.array_equal(r.dispatch_BxTxE[0], [[1, 1], [1, 1], [0, 0], [0, 0]])
    close(r.combine_BxTxE[0], [[0.5, 0.5], [0.5, 0.5], [0, 0], [0, 0]])


# ------------------------------------------------------------------------------------------ SparseMoE outputs
def numpy_moe(layer: SparseMoE, x, combine) -> np.ndarray:
    """sum_e combine[t, e] * down_e(silu(x gate_e) * (x up_e)) in float64."""
    x = np.asarray(x, np.float64)
    g, u, d = (np.asarray(layer.experts.gate_proj[...], np.float64), np.asarray(layer.experts.up_proj[...], np.float64),
               np.asarray(layer.experts.down_proj[...], np.float64))
    out = np.zeros_like(x)
    for e in range(g.shape[0]):
        a = x @ g[e]
        out += np.asarray(combine, np.float64)[..., e:e + 1] * (((a / (1 + np.exp(-a))) * (x @ u[e])) @ d[e])
    return out


@pytest.fixture(scope="module")
def layer_input():
    return jax.random.normal(jax.random.key(1), (2, 8, CFG.hidden_size))


def test_capacity_drops_whole_tokens_to_zero(layer_input):
    # k = 1, E = 4, T = 8, cf = 0.25: C = 1, so each expert keeps the first token of each row that chose it.
    cfg = dataclasses.replace(CFG, num_experts_per_tok=1)
    plain = SparseMoE(cfg, rngs=nnx.Rngs(0))
    capped = SparseMoE(dataclasses.replace(cfg, router_capacity_factor=0.25), rngs=nnx.Rngs(0))
    run = jax.jit(lambda x: (plain(x), capped(x), plain.router(x)))
    y_plain, y_capped, r = (np.asarray(a) for a in run(layer_input))
    top = np.argmax(r, axis=-1)
    for b in range(2):
        seen = set()
        for t in range(8):
            if top[b, t] in seen:
                assert np.all(y_capped[b, t] == 0)
            else:
                assert np.array_equal(y_capped[b, t], y_plain[b, t])
            seen.add(top[b, t])
    assert 0 < sum(len(set(row)) for row in top) < 16  # some kept, some dropped


@pytest.mark.parametrize("router,cf", [("topk_softmax", 0.5), ("softmax_topk", 0.75), ("expert_choice", None),
                                       ("expert_choice", 0.5)])
def test_layer_output_equals_the_numpy_reference(layer_input, router, cf):
    layer = SparseMoE(dataclasses.replace(CFG, router=router, router_capacity_factor=cf), rngs=nnx.Rngs(3))
    logits = np.asarray(layer.router(layer_input), np.float64)
    c = math.ceil((1.0 if cf is None else cf) * 8 * 2 / 4)
    combine = np.zeros_like(logits)
    for b in range(2):
        if router == "expert_choice":  # each expert's top-C tokens by probability, by a stable sort
            s = np.stack([softmax(row) for row in logits[b]])
            for e in range(4):
                chosen = np.argsort(-s[:, e], kind="stable")[:c]
                combine[b, chosen, e] = s[chosen, e]
            continue
        used = np.zeros(4, int)
        for t in range(8):
            order = np.argsort(-logits[b, t], kind="stable")[:2]
            w = softmax(logits[b, t, order]) if router == "topk_softmax" else softmax(logits[b, t])[order]
            for e, wj in zip(order, w):  # position-major, rank-minor
                if used[e] < c:
                    combine[b, t, e] = wj
                used[e] += 1
    close(layer(layer_input), numpy_moe(layer, layer_input, combine), 1e-5)


# ------------------------------------------------------------------------------------------ noisy top-k
@pytest.fixture(scope="module")
def noisy():
    return build_model(dataclasses.replace(CFG, router="noisy_topk"), seed=2)


def test_noisy_topk_adds_softplus_scaled_gaussian_noise_per_call(noisy):
    key = jax.random.key(7)
    points = ["layers.*.mlp.input", "layers.*.mlp.router_logits"]
    with routing_noise(key):
        _, v = capture(noisy, points, IDS)
    for i in range(CFG.num_layers):
        mlp = noisy.layers[i].mlp
        x = v[f"layers.{i}.mlp.input"]
        clean = np.asarray(mlp.router(x), np.float64)
        std = np.log1p(np.exp(np.asarray(mlp.noise(x), np.float64)))
        eps = np.asarray(jax.random.normal(jax.random.fold_in(key, i), clean.shape, jnp.float32), np.float64)
        close(v[f"layers.{i}.mlp.router_logits"], clean + eps * std, 1e-5)


def test_noise_is_off_outside_the_context_and_equals_plain_topk(noisy):
    plain = rebuild(noisy, {"router": "topk_softmax"})  # drops layers.*.mlp.noise
    assert not any(".noise." in p for p in flat_params(plain))
    out = np.asarray(noisy(IDS))
    assert np.array_equal(out, np.asarray(noisy(IDS)))  # deterministic
    assert np.array_equal(out, np.asarray(plain(IDS)))
    with routing_noise(jax.random.key(0)):
        a = np.asarray(noisy(IDS))
    with routing_noise(jax.random.key(0)):
        b = np.asarray(noisy(IDS))
    with routing_noise(jax.random.key(1)):
        c = np.asarray(noisy(IDS))
    assert np.array_equal(a, b) and np.abs(a - out).max() > 1e-4 and np.abs(a - c).max() > 1e-4
    with routing_noise(jax.random.key(0)):  # the context only concerns noisy layers
        assert np.array_equal(np.asarray(plain(IDS)), out)


def test_noise_under_jit_and_remat_is_the_same(noisy):
    remat = rebuild(noisy, {}, options={"remat": "full"})
    key = jax.random.key(3)
    with routing_noise(key):
        eager = np.asarray(noisy(IDS))

    @jax.jit
    def forward(state, key):
        with routing_noise(key):
            return nnx.merge(graphdef, state)(IDS)

    graphdef, state = nnx.split(remat)
    close(forward(state, key), eager, 1e-5)
    with pytest.raises(RuntimeError, match="already active"):
        with routing_noise(key), routing_noise(key):
            pass


# ------------------------------------------------------------------------------------------ config and formats
def test_config_validation():
    with pytest.raises(ValueError, match=r"router must be one of \['topk_softmax', 'softmax_topk', 'noisy_topk', "
                                         r"'expert_choice'\], got 'sinkhorn'"):
        dataclasses.replace(CFG, router="sinkhorn")
    for bad in (0, -1.0, True, "1"):
        with pytest.raises(ValueError, match="router_capacity_factor must be None or a number > 0"):
            dataclasses.replace(CFG, router_capacity_factor=bad)
    assert CFG.router == "topk_softmax" and CFG.router_capacity_factor is None  # the defaults: today's models


def test_hf_export_refuses_what_mixtral_cannot_express():
    assert config_to_hf(CFG)["num_local_experts"] == 4
    for changes, message in [
        ({"router": "noisy_topk"}, r"no noisy top-k gating .*rebuild\(model, \{'router': 'topk_softmax'\}\)"),
        ({"router": "expert_choice"}, r"routes top-k then softmax; this model uses router='expert_choice'"),
        ({"router": "softmax_topk"}, r"this model uses router='softmax_topk'"),
        ({"router_capacity_factor": 1.25}, r"no expert capacity .* router_capacity_factor=1.25"),
    ]:
        with pytest.raises(UnsupportedModel, match=message):
            config_to_hf(dataclasses.replace(CFG, **changes))


def test_the_suggested_export_of_a_noisy_model_round_trips(noisy, tmp_path):
    check_consistent(noisy, "test")
    with pytest.raises(UnsupportedModel, match="noisy"):
        to_hf(noisy, tmp_path / "refused")
    back = from_hf(to_hf(rebuild(noisy, {"router": "topk_softmax"}), tmp_path / "hf"))
    assert (back.cfg.router, back.cfg.router_capacity_factor, back.cfg.num_experts) == ("topk_softmax", None, 4)
    close(back(IDS), noisy(IDS), 1e-5)


@pytest.mark.slow  # CI time
def test_orbax_keeps_the_routing_config_and_noise_weights(tmp_path):
    model = build_model(dataclasses.replace(CFG, router="noisy_topk", router_capacity_factor=1.5), seed=4)
    restored = orbax_io.load_model(orbax_io.save_model(model, tmp_path / "orbax"))
    assert restored.cfg == model.cfg and restored.layers[0].mlp.capacity_factor == 1.5
    assert all(np.array_equal(np.asarray(v), np.asarray(flat_params(restored)[k])) for k, v in flat_params(model).items())
    with routing_noise(jax.random.key(0)):
        a = model(IDS)
    with routing_noise(jax.random.key(0)):  # one context per forward: its calls are numbered on
        b = restored(IDS)
    assert np.array_equal(np.asarray(a), np.asarray(b))
