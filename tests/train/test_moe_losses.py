"""MoE router losses and statistics (train/moe.py): the load-balancing loss equals transformers'
load_balancing_loss_func on the same router logits (and a tiny HF Mixtral's own aux_loss), the z-loss and the
statistics by hand, the task's objective and errors, and a few trainer steps on a tiny MoE llama with every metric
logged."""
import dataclasses
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configurable_fm.analysis import capture
from configurable_fm.bricks import flat_params
from configurable_fm.errors import ConfigError
from configurable_fm.models import from_hf
from configurable_fm.models.factory import build_model
from configurable_fm.models.llama import LlamaConfig
from configurable_fm.train.moe import (MoETask, load_balancing_loss, moe_layers, router_statistics, router_z_loss)
from configurable_fm.train.task import AnchoredTask, NextTokenTask, next_token_loss
from configurable_fm.train.trainer import train
from tests.train.test_trainer import tiny_config, tiny_data

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func  # noqa: E402

CFG = LlamaConfig(vocab_size=40, hidden_size=16, intermediate_size=12, num_layers=2, num_heads=4, num_kv_heads=2,
                  num_experts=4, num_experts_per_tok=2, architecture="MixtralForCausalLM")
IDS = np.random.RandomState(0).randint(0, 40, (2, 7)).astype(np.int32)
BATCH = {"inputs": IDS, "targets": np.roll(IDS, -1, axis=1)}


def theirs(logits, k, mask=None) -> float:
    """transformers' load_balancing_loss_func on layers' logits (B*T, E) and an attention mask (B, T)."""
    gate = tuple(torch.tensor(np.asarray(x)) for x in logits)
    return float(load_balancing_loss_func(gate, gate[0].shape[-1], k, None if mask is None else torch.tensor(mask)))


@pytest.mark.parametrize("k", [1, 2, 3])
def test_load_balancing_loss_equals_transformers(k):
    rs = np.random.RandomState(k)
    b, t, e = 3, 5, 6
    logits = [rs.randn(b * t, e).astype(np.float32) * 2 for _ in range(4)]
    mask = (rs.rand(b, t) > 0.3).astype(np.int64)
    ours = load_balancing_loss([jnp.asarray(x) for x in logits], k)
    assert abs(float(ours) - theirs(logits, k)) <= 1e-6
    ours = load_balancing_loss([jnp.asarray(x).reshape(b, t, e) for x in logits], k, mask)  # (B, T, E) + mask
    assert abs(float(ours) - theirs(logits, k, mask)) <= 1e-6
    # layer_mean: the mean of each layer's own loss
    mean = np.mean([theirs([x], k, mask) for x in logits])
    ours = load_balancing_loss([jnp.asarray(x) for x in logits], k, mask.reshape(-1), reduction="layer_mean")
    assert abs(float(ours) - mean) <= 1e-6 and abs(mean - theirs(logits, k, mask)) > 1e-4


def test_load_balancing_loss_by_hand():
    # E = 2, k = 1, one layer: tokens [2, 0] and [0, 0] (a tie: expert 0) -> f = (1, 0);
    # P = ((sigmoid(2) + 1/2) / 2, (sigmoid(-2) + 1/2) / 2); L = 2 * f . P = sigmoid(2) + 1/2.
    logits = jnp.asarray([[2.0, 0.0], [0.0, 0.0]])
    assert abs(float(load_balancing_loss([logits], 1)) - (1 / (1 + math.exp(-2)) + 0.5)) <= 1e-6
    # balanced routing with uniform probabilities gives k
    assert abs(float(load_balancing_loss([jnp.asarray([[1.0, 0.0], [0.0, 1.0]])], 1)) - 1.0) <= 1e-6
    g = jax.grad(lambda x: load_balancing_loss([x], 1))(logits)  # only P carries a gradient
    s = 1 / (1 + math.exp(-2))
    np.testing.assert_allclose(g, [[s * (1 - s), -s * (1 - s)], [0.25, -0.25]], atol=1e-6)
    with pytest.raises(ValueError, match="reduction='sum' is not one of"):
        load_balancing_loss([logits], 1, reduction="sum")
    with pytest.raises(ValueError, match=r"token mask of shape \(3,\) does not fit"):
        load_balancing_loss([logits], 1, np.ones(3))


def test_z_loss_by_hand():
    # logsumexp([0, 0]) = ln 2, logsumexp([ln 3, 0]) = ln 4 = 2 ln 2 -> mean of squares = 2.5 (ln 2)^2
    a = jnp.asarray([[0.0, 0.0], [math.log(3.0), 0.0]])
    assert abs(float(router_z_loss([a])) - 2.5 * math.log(2) ** 2) <= 1e-6
    assert abs(float(router_z_loss([a], np.array([0.0, 1.0]))) - 4 * math.log(2) ** 2) <= 1e-6
    # pooled over layers: (ln2^2 + 4 ln2^2 + 4 * (ln 2 + 1)^2) / 4
    b = a + 1.0
    want = (math.log(2) ** 2 + 4 * math.log(2) ** 2 + (math.log(2) + 1) ** 2 + (2 * math.log(2) + 1) ** 2) / 4
    assert abs(float(router_z_loss([a, b])) - want) <= 1e-6
    g = jax.grad(lambda x: router_z_loss([x]))(a)  # d/dr (lse^2)/N = 2 lse softmax / N
    np.testing.assert_allclose(g, [[math.log(2) / 2, math.log(2) / 2], [2 * math.log(2) * 0.75, 2 * math.log(2) * 0.25]],
                               atol=1e-6)


def test_router_statistics_by_hand():
    # k = 1, E = 2, one row of T = 4, cf = 1 (C = 2): tokens 0, 1, 2 choose expert 0, token 3 expert 1; token 2 drops
    logits = jnp.asarray([[[1.0, 0.0], [2.0, 0.0], [3.0, 0.0], [0.0, 0.0]]])
    logits = logits.at[0, 3].set(jnp.asarray([0.0, 1.0]))
    stats = jax.jit(router_statistics, static_argnums=(1, 2, 3))  # a compilation per call, not per operation
    s = stats(logits, 1, "topk_softmax", 1.0)
    np.testing.assert_allclose(s["load"], [0.5, 0.25])  # processed: t0, t1 by e0; t3 by e1
    assert float(s["dropped"]) == 0.25
    h = lambda z: -sum(p * math.log(p) for p in (1 / (1 + math.exp(-z)), 1 / (1 + math.exp(z))))
    assert abs(float(s["entropy"]) - np.mean([h(1), h(2), h(3), h(1)])) <= 1e-6
    s = stats(logits, 1, "topk_softmax", None)
    np.testing.assert_allclose(s["load"], [0.75, 0.25])
    assert "dropped" not in s
    masked = stats(logits, 1, "topk_softmax", 1.0, np.array([[1, 1, 1, 0]]))  # routing of all 4
    np.testing.assert_allclose(masked["load"], [2 / 3, 0])
    assert abs(float(masked["dropped"]) - 1 / 3) <= 1e-6
    # expert choice: C = ceil(1 * 4 * 1 / 2) = 2, e0 takes t2, t1; e1 takes t3, t0 (its top two 1 - s0): nothing dropped
    s = stats(logits, 1, "expert_choice", None)
    np.testing.assert_allclose(s["load"], [0.5, 0.5])
    assert float(s["dropped"]) == 0.0
    s = stats(jnp.zeros((1, 4, 2)), 1, "expert_choice", 0.5)  # C = 1, ties: both take t0
    np.testing.assert_allclose(s["load"], [0.25, 0.25])
    assert float(s["dropped"]) == 0.75


# ------------------------------------------------------------------------------------------ against HF Mixtral
def test_aux_loss_equals_a_tiny_hf_mixtrals(tmp_path):
    torch.manual_seed(0)
    hf_cfg = transformers.MixtralConfig(vocab_size=40, hidden_size=16, intermediate_size=12, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
                                        num_experts_per_tok=2, max_position_embeddings=64, output_router_logits=True)
    hf = transformers.MixtralForCausalLM(hf_cfg).eval()
    with torch.no_grad():
        for p in hf.parameters():
            if p.dim() == 2 and p.shape[0] == 4:  # routers: sharper than the 0.02 init, so routing matters
                p.normal_(0, 1.0)
        out = hf(torch.tensor(IDS))
    hf.save_pretrained(tmp_path)
    model = from_hf(tmp_path)
    task = MoETask(aux_loss_coef=0.0, z_loss_coef=0.0)
    # compiled, as in the trainer (and the capture below): two compilations instead of ~4 s of eager MoE ops
    _, m = nnx.jit(lambda model: task.loss(model, BATCH, 1, jax.random.key(0)))(model)
    assert abs(float(m["aux_loss"]) - float(out.aux_loss)) <= 1e-5
    hf_logits = [x.numpy() for x in out.router_logits]
    _, v = nnx.jit(lambda model: capture(model, "layers.*.mlp.router_logits", IDS))(model)
    assert max(np.abs(np.asarray(v[f"layers.{i}.mlp.router_logits"]).reshape(-1, 4) - hf_logits[i]).max()
               for i in range(2)) <= 1e-5
    assert abs(float(load_balancing_loss([jnp.asarray(x) for x in hf_logits], 2)) - theirs(hf_logits, 2)) <= 1e-6


# ------------------------------------------------------------------------------------------ the task
@pytest.fixture(scope="module")
def moe():
    return build_model(dataclasses.replace(CFG, router="noisy_topk", router_capacity_factor=1.0), seed=1)


def test_the_objective_adds_the_weighted_router_losses(moe):
    task = MoETask(aux_loss_coef=0.5, z_loss_coef=0.25).setup(moe, [])

    # compiled, as in the trainer: one program for the three objectives (eager MoE ops: ~150 compilations, ~4 s)
    @nnx.jit
    def objectives(model, key):
        return task.loss(model, BATCH, 1, key), task.eval_loss(model, BATCH, 1), next_token_loss(model, BATCH)

    (loss, m), (ev, me), (nll, _) = objectives(moe, jax.random.key(3))
    assert abs(float(loss) - (float(m["base_loss"]) + 0.5 * float(m["aux_loss"]) + 0.25 * float(m["z_loss"]))) <= 1e-6
    assert float(m["weight"]) == IDS.size  # the inner task's metrics pass through
    assert set(m) >= {"aux_loss", "z_loss", "router_entropy", "dropped_fraction", "router/layers.1.mlp/entropy",
                      "router/layers.0.mlp/dropped"} | {f"router/layers.0.mlp/load_{e}" for e in range(4)}
    # the metrics are those of the logits the (noisy) forward used
    (again, m2), _, _ = objectives(moe, jax.random.key(3))
    assert float(again) == float(loss)
    with pytest.raises(AssertionError):  # another key, other noise
        assert float(objectives(moe, jax.random.key(4))[0][0]) == float(loss)
    # evaluation (ev, me): no noise; val_loss = the inner loss (nll); the router losses as metrics
    assert float(ev) == float(me["base_loss"]) == pytest.approx(float(nll), abs=1e-6)
    assert float(ev) != float(m["base_loss"])
    assert 0 < float(me["dropped_fraction"]) < 1 and abs(sum(float(me[f"router/layers.0.mlp/load_{e}"])
                                                             for e in range(4)) - 2 * (1 - float(
                                                                 me["router/layers.0.mlp/dropped"]))) <= 1e-6


def test_the_router_gets_the_aux_gradient():
    plain = build_model(CFG, seed=1)
    aux_only = MoETask(inner=AnchoredTask(strength=0.0), aux_loss_coef=1.0, z_loss_coef=0.0)
    aux_only = aux_only.setup(plain, list(flat_params(plain)))  # sets up the inner task too
    assert aux_only.inner.anchor is not None
    graphdef, state = nnx.split(plain)

    def objective(state):
        m = nnx.merge(graphdef, state)
        loss, metrics = aux_only.loss(m, BATCH, 1, jax.random.key(0))
        return loss - metrics["base_loss"]

    grads = nnx.to_flat_state(jax.jit(jax.grad(objective))(state))
    norms = {".".join(map(str, p)): float(jnp.abs(v.get_value()).max()) for p, v in grads}
    assert norms["layers.0.mlp.router.kernel"] > 0 and norms["layers.1.mlp.router.kernel"] > 0
    assert norms["layers.1.mlp.experts.gate_proj"] == 0  # the aux loss reaches the router and what feeds it only


def test_task_errors(moe):
    with pytest.raises(ConfigError, match=r"the model has no SparseMoE layers"):
        MoETask().setup(build_model(dataclasses.replace(CFG, num_experts=0), seed=0), [])
    ec = build_model(dataclasses.replace(CFG, router="expert_choice"), seed=0)
    with pytest.raises(ConfigError, match=r"layers.0.mlp uses expert-choice routing, .* set aux_loss_coef=0"):
        MoETask().setup(ec, [])
    ec_task = MoETask(aux_loss_coef=0.0).setup(ec, [])
    _, m = nnx.jit(lambda model: ec_task.loss(model, BATCH, 1, jax.random.key(0)))(ec)  # one compilation
    assert float(m["aux_loss"]) == 0 and "dropped_fraction" in m
    with pytest.raises(ConfigError, match=r"aux_loss_coef=-1 must be a number >= 0"):
        MoETask(aux_loss_coef=-1)
    with pytest.raises(ConfigError, match=r"aux_loss_reduction='sum' is not one of \['pooled', 'layer_mean'\]"):
        MoETask(aux_loss_reduction="sum")
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['coef'\]; valid keys"):
        MoETask.from_config({"coef": 1})
    task = MoETask.from_config({"aux_loss_coef": 0.02, "per_layer": False})
    assert (task.aux_loss_coef, task.z_loss_coef, task.per_layer, type(task.inner)) == (0.02, 1e-3, False,
                                                                                      NextTokenTask)
    _, m = nnx.eval_shape(lambda model: task.loss(model, BATCH, 1, jax.random.key(0)), moe)  # the names only
    assert not any(k.startswith("router/") for k in m)

    class Clashing(NextTokenTask):
        def loss(self, model, batch, step, rng):
            loss, metrics = super().loss(model, batch, step, rng)
            return loss, {**metrics, "z_loss": loss}

    with pytest.raises(ConfigError, match=r"inner task returns metric\(s\) \['z_loss'\]"):  # raised while traced
        nnx.eval_shape(lambda model: MoETask(inner=Clashing()).loss(model, BATCH, 1, jax.random.key(0)), moe)
    assert list(moe_layers(moe)) == ["layers.0.mlp", "layers.1.mlp"]


# ------------------------------------------------------------------------------------------ the trainer
@pytest.fixture(scope="module")
def moe_run(tmp_path_factory):
    cfg = tiny_config(steps=8, eval_every=8, checkpoint_every=8)
    cfg.model.update(num_experts=4, num_experts_per_tok=2, router="noisy_topk", router_capacity_factor=1.25,
                     intermediate_size=32)
    workdir = tmp_path_factory.mktemp("moe")
    task = MoETask(aux_loss_coef=1e-2, z_loss_coef=1e-3)
    result = train(cfg, workdir, task=task, data=tiny_data(cfg), log=lambda s: None)
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    return cfg, workdir, result, records


def test_the_trainer_logs_the_router_losses_and_statistics(moe_run):
    cfg, workdir, result, records = moe_run
    assert [r["step"] for r in records] == list(range(1, 9))
    for r in records:
        assert all(math.isfinite(r[k]) for k in ("loss", "base_loss", "aux_loss", "z_loss"))
        assert r["loss"] == pytest.approx(r["base_loss"] + 1e-2 * r["aux_loss"] + 1e-3 * r["z_loss"], rel=1e-6)
        for layer in ("layers.0.mlp", "layers.1.mlp"):
            loads = [r[f"router/{layer}/load_{e}"] for e in range(4)]
            assert sum(loads) == pytest.approx(2 * (1 - r[f"router/{layer}/dropped"]), abs=1e-5)
        assert 0 <= r["dropped_fraction"] < 1 and 0 < r["router_entropy"] <= math.log(4) + 1e-6
    assert records[-1]["base_loss"] < records[0]["base_loss"]
    last = records[-1]
    assert {"val_loss", "val_aux_loss", "val_z_loss", "val_router/layers.0.mlp/load_0"} <= set(last)
    assert last["val_loss"] == pytest.approx(last["val_base_loss"])
    info = json.loads((workdir / "run_info.json").read_text())
    assert info["task"] == "MoETask" and info["model"]["router"] == "noisy_topk"
    assert result.model.cfg.router_capacity_factor == 1.25
