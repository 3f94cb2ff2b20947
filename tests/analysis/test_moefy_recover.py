"""Recovery fine-tuning of MoEfied models through the trainer (experiments/analysis/moefy_recover.py).

A tiny random llama MoEfied (4 experts, top 2) and saved as an orbax checkpoint is the `init_from` of the `:test`
variants: router-only training changes the routers alone (experts and everything else bit-identical), LoRA training
the adapter alone (the base bit-identical), 'both' the union; the optimizer state holds only the selected leaves;
the loss on a fixed batch falls; the straight-through routing weights equal the hard mask in value and give the
router a gradient; 'eval' leaves the model unchanged. LoRA cannot attach to the stacked experts (an error naming
the target).
"""
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configurable_fm.analysis import moefication as mf
from configurable_fm.bricks import adapters
from configurable_fm.bricks.paths import flat_params, with_params
from configurable_fm.interop.orbax_io import save_model
from configurable_fm.models.llama import LlamaConfig
from configurable_fm.train.data import TokenData
from configurable_fm.train.task import next_token_loss
from configurable_fm.train.trainer import train
from experiments.analysis import moefy_recover
from tests.helpers import random_llama

CFG = LlamaConfig(vocab_size=32, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                  max_position_embeddings=64)
SEQ = 16


def stream_data(batch=4) -> TokenData:
    """A periodic token stream (period 7): every batch is a shift of the same pattern."""
    tokens = np.tile(np.asarray([3, 9, 4, 17, 4, 25, 11], np.int32), 400)
    return TokenData(tokens, tokens[:200], SEQ, batch, 0, batch, max_eval_batches=1, manifest={"kind": "periodic"})


def fixed_batch():
    tokens = np.tile(np.asarray([3, 9, 4, 17, 4, 25, 11], np.int32), 20)
    rows = np.stack([tokens[i:i + SEQ + 1] for i in range(4)])
    return {"inputs": jnp.asarray(rows[:, :-1]), "targets": jnp.asarray(rows[:, 1:])}


@nnx.jit
def fixed_loss(model):
    """The token-mean NLL of `model` on `fixed_batch()` (one compilation, not one per operation)."""
    return next_token_loss(model, fixed_batch())[0]


@pytest.fixture(scope="module")
def moefied(tmp_path_factory):
    """(the MoEfied tiny model, its orbax checkpoint): 4 experts of 16 neurons, top 2, centroid routers; weights
    scaled x10 so that the routing matters to the loss."""
    base = random_llama(CFG, 0)
    base = with_params(base, {k: (v if "norm" in k else 10 * v) for k, v in flat_params(base).items()})
    moe = mf.moefy(base, num_experts=4, num_experts_per_tok=2, split="kmeans", router="centroid", key=0)
    path = save_model(moe, tmp_path_factory.mktemp("moefied") / "ckpt")
    return moe, path


def run(tmp_path, variant, init, steps=8, **updates):
    cfg = moefy_recover.get_config(variant)
    cfg.init_from = str(init)
    cfg.steps, cfg.log_every, cfg.eval_every, cfg.checkpoint_every = steps, steps, steps, steps
    cfg.optimizer.warmup_steps = 0
    cfg.update(updates)
    workdir = Path(tmp_path) / variant.replace(",", "_")
    return train(cfg, workdir, data=stream_data(), log=lambda s: None), workdir


def saved_leaves(item_dir: Path) -> dict[str, tuple]:
    """{leaf path: shape} of a pytree item of an orbax training checkpoint (its metadata; nothing restored)."""
    import orbax.checkpoint as ocp

    meta = ocp.StandardCheckpointer().metadata(item_dir)
    tree = getattr(getattr(meta, "item_metadata", meta), "tree", meta)
    return {jax.tree_util.keystr(p): tuple(x.shape) for p, x in jax.tree_util.tree_leaves_with_path(tree)}


def assert_state_only(checkpoint: Path, shapes: dict[str, tuple]) -> None:
    """The checkpoint's trainable params are exactly `shapes`' leaves, and every non-scalar leaf of the optimizer
    state (Adam's mu and nu) is one of them, of the same shape."""
    assert saved_leaves(checkpoint / "params") == {f"['{k}']": s for k, s in shapes.items()}
    per_param = {k: s for k, s in saved_leaves(checkpoint / "opt_state").items() if s != ()}
    assert len(per_param) == 2 * len(shapes), sorted(per_param)
    for k, shape in per_param.items():
        assert shapes[k.rsplit("['", 1)[1][:-2]] == shape, k


def split_changed(before: dict, after: dict) -> tuple[list, list]:
    """(paths whose arrays differ, paths bit-identical) over `before`'s paths."""
    changed = [k for k in before if not np.array_equal(np.asarray(before[k]), np.asarray(after[k]))]
    return changed, [k for k in before if k not in changed]


def test_routing_weights_are_the_mask_in_value_with_a_router_gradient(moefied):
    moe, _ = moefied
    graphdef, params, rest = nnx.split(moe.layers[0].mlp, nnx.Param, ...)
    x = jax.random.normal(jax.random.key(2), (2, 5, CFG.hidden_size))

    @jax.jit
    def check(params, x):
        mlp = nnx.merge(graphdef, params, rest)
        h = mlp.expert_hidden(x)
        s = mlp.router_scores(x, h)
        hard = mlp.combine(h, mlp.expert_mask(s))
        grads = jax.grad(lambda st: jnp.sum(nnx.merge(graphdef, st, rest)(x) ** 2))(params)
        # dL/ds_j = p_j (g_j - sum_e p_e g_e), g_e = dL/dc_e (module.py)
        g = jax.grad(lambda c: jnp.sum(mlp.combine(h, c) ** 2))(mlp.expert_mask(s))[..., mlp.num_shared:]
        p = jax.nn.softmax(s, axis=-1)
        expected = p * (g - jnp.sum(p * g, axis=-1, keepdims=True))
        got = jax.grad(lambda s_: jnp.sum(mlp.combine(h, mlp.routing_weights(s_)) ** 2))(s)
        return mlp(x), hard, mlp.routing_weights(s), mlp.expert_mask(s), grads["router"]["kernel"], got, expected

    y, hard, weights, mask, kernel_grad, got, expected = check(params, x)
    np.testing.assert_array_equal(np.asarray(weights), np.asarray(mask))  # the same values
    np.testing.assert_array_equal(np.asarray(y), np.asarray(hard))  # the forward of the hard mask
    assert float(jnp.abs(kernel_grad.get_value() if hasattr(kernel_grad, "get_value") else kernel_grad).max()) > 0
    np.testing.assert_allclose(np.asarray(got), np.asarray(expected), rtol=1e-5, atol=1e-6)


def test_router_only_recovery(moefied, tmp_path):
    moe, path = moefied
    start = flat_params(moe)
    loss0 = float(fixed_loss(moe))
    result, workdir = run(tmp_path, "router,test", path, steps=4, eval_every=0)  # no eval: fast
    changed, same = split_changed(start, flat_params(result.model))
    routers = [k for k in start if ".mlp.router." in k]
    assert sorted(changed) == sorted(routers) and routers
    assert any(".mlp.up_proj" in k for k in same) and "embed_tokens.embedding" in same
    assert_state_only(workdir / "checkpoints" / "4", {k: tuple(start[k].shape) for k in routers})
    assert float(fixed_loss(result.model)) < loss0


@pytest.mark.slow
def test_lora_recovery(moefied, tmp_path):
    moe, path = moefied
    start = flat_params(moe)
    loss0 = float(fixed_loss(moe))
    result, workdir = run(tmp_path, "lora,test", path)
    lora = adapters.adapter_state(result.model)
    assert sorted({k.rsplit(".", 1)[0] for k in lora}) == [f"layers.{i}.self_attn.{p}_proj" for i in range(2)
                                                           for p in "koqv"]
    base = adapters.detach(result.model)
    changed, _ = split_changed(start, flat_params(base))
    assert changed == []  # the MoEfied base, routers included, is bit-identical
    assert_state_only(workdir / "checkpoints" / "8", {k: tuple(v.shape) for k, v in lora.items()})
    assert float(fixed_loss(result.model)) < loss0
    assert (workdir / "adapter").is_dir()


@pytest.mark.slow
def test_both_trains_routers_and_adapter(moefied, tmp_path):
    moe, path = moefied
    start = flat_params(moe)
    result, workdir = run(tmp_path, "both,test", path, steps=4)
    lora = adapters.adapter_state(result.model)
    changed, _ = split_changed(start, flat_params(adapters.detach(result.model)))
    routers = [k for k in start if ".mlp.router." in k]
    assert sorted(changed) == sorted(routers)
    shapes = {**{k: tuple(start[k].shape) for k in routers}, **{k: tuple(v.shape) for k, v in lora.items()}}
    assert_state_only(workdir / "checkpoints" / "4", shapes)


@pytest.mark.slow
def test_eval_variant_leaves_the_model_unchanged(moefied, tmp_path):
    moe, path = moefied
    result, _ = run(tmp_path, "eval,test", path, steps=1)
    changed, _ = split_changed(flat_params(moe), flat_params(result.model))
    assert changed == []
    batch = next(iter(stream_data().eval_batches(0, 1)))
    loss, m = next_token_loss(moe, {k: jnp.asarray(v) for k, v in batch.items()})
    np.testing.assert_allclose(result.best_val_loss, float(loss), rtol=1e-5)


def test_experts_and_ffn_train_the_ffn_weights(moefied, tmp_path):
    """'experts': the routers and the stacked expert weights train, nothing else; 'ffn' on the dense model (the
    control): its MLP kernels only."""
    moe, path = moefied
    start = flat_params(moe)
    result, _ = run(tmp_path, "experts,test", path, steps=2, eval_every=0)
    changed, _ = split_changed(start, flat_params(result.model))
    want = [k for k in start if ".mlp.router." in k or k.split(".")[-1] in ("gate_proj", "up_proj", "down_proj")]
    assert sorted(changed) == sorted(want) and any(k.endswith("mlp.up_proj") for k in want)
    dense = random_llama(CFG, 2)
    before = flat_params(dense)
    cfg = moefy_recover.get_config("ffn,test")
    cfg.steps, cfg.log_every, cfg.eval_every, cfg.checkpoint_every = 2, 2, 0, 2
    out = train(cfg, tmp_path / "ffn", model=dense, data=stream_data(), log=lambda s: None)
    changed, _ = split_changed(before, flat_params(out.model))
    assert sorted(changed) == sorted(k for k in before if ".mlp." in k and k.endswith("_proj.kernel"))
    assert moefy_recover.get_config("experts").optimizer.lr == moefy_recover.get_config("ffn").optimizer.lr == 1e-4


def test_config_variants_and_errors(moefied):
    assert moefy_recover.get_config("").trainable == ("**.mlp.router.**",)
    assert moefy_recover.get_config("both,code").data.dir == "data/code"
    c = moefy_recover.get_config("lora")
    assert c.adapter.kind == "lora" and c.trainable == ("AdapterParam:**",) and c.init_from
    with pytest.raises(ValueError, match="unknown: \\['bogus'\\]"):
        moefy_recover.get_config("router,bogus")
    with pytest.raises(ValueError, match="one mode"):
        moefy_recover.get_config("router,lora")
    moe, _ = moefied
    # the experts are stacked (E, D, m) parameters, not Linear modules: attach refuses, attach_experts serves them
    with pytest.raises(adapters.AdapterError, match="layers.0.mlp.up_proj is a Param, not a Linear \\(a stacked"):
        adapters.attach(moe, "lora", "layers.*.mlp.up_proj", rank=2)
    c = moefy_recover.get_config("lora_experts")
    assert c.adapter.target_parameters == ("layers.*.mlp.*_proj",) and c.adapter.lora.expert_rank == 4
    assert moefy_recover.get_config("lora_mlp").adapter.targets[-1] == "layers.*.mlp.[gud]*_proj"


def test_lora_experts_trains_routers_and_both_adapters(moefied, tmp_path):
    """'lora_experts': the routers, the attention LoRA and the expert LoRA train; the MoEfied base, detached, is
    bit-identical apart from the routers; the brick set holds both kinds."""
    moe, path = moefied
    start = flat_params(moe)
    result, workdir = run(tmp_path, "lora_experts,test", path, steps=2, eval_every=0)
    kinds = {v["kind"] for v in adapters.adapters(result.model).values()}
    assert kinds == {"lora", "expert_lora"}
    assert adapters.adapters(result.model)["layers.1.mlp.down_proj"]["rank"] == 4
    changed, _ = split_changed(start, flat_params(adapters.detach(result.model)))
    assert sorted(changed) == sorted(k for k in start if ".mlp.router." in k)
    state = adapters.adapter_state(result.model)
    assert any(float(np.abs(np.asarray(v)).max()) > 0 for k, v in state.items() if "up_proj_lora.lora_b" in k)
    loaded = adapters.load_adapter(moe, workdir / "adapter")
    assert sorted(adapters.adapters(loaded)) == sorted(adapters.adapters(result.model))


def test_router_only_needs_router_parameters(tmp_path):
    base = random_llama(CFG, 1)
    oracle = mf.moefy(base, num_experts=4, num_experts_per_tok=2, split="kmeans", router="oracle", key=0)
    cfg = moefy_recover.get_config("router,test")
    with pytest.raises(ValueError, match=r"\*\*\.mlp\.router\.\*\*"):
        train(cfg, tmp_path / "w", model=oracle, data=stream_data(), log=lambda s: None)


def test_lora_sparse_trains_the_attention_and_ffn_input_adapters_of_a_sparse_model(tmp_path):
    """'lora_sparse' from an activation-sparse checkpoint (down_proj zeroing 75% of its inputs): LoRA on q/k/v/o and
    gate/up, none on down_proj; the base (kernels and thresholds) is bit-identical; the loss falls."""
    from configurable_fm.analysis import sparsity as sp

    base = random_llama(CFG, 4)
    base = with_params(base, {k: (v if "norm" in k else 10 * v) for k, v in flat_params(base).items()})
    down = [f"layers.{i}.mlp.down_proj" for i in range(CFG.num_layers)]
    cal = sp.calibrate(base, [{"inputs": fixed_batch()["inputs"]}], down)
    sparse = sp.sparsify_activations(base, cal.thresholds(0.75))
    path = save_model(sparse, tmp_path / "sparse")
    loss0 = float(fixed_loss(sparse))
    result, workdir = run(tmp_path, "lora_sparse,test", path, steps=4, eval_every=0)
    targets = sorted({k.rsplit(".", 1)[0] for k in adapters.adapter_state(result.model)})
    assert targets == sorted(f"layers.{i}.{p}" for i in range(2) for p in
                             ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                              "mlp.gate_proj", "mlp.up_proj"))
    detached = adapters.detach(result.model)
    changed, _ = split_changed(flat_params(sparse), flat_params(detached))
    assert changed == []
    assert sp.thresholds_of(detached) == sp.thresholds_of(sparse)
    assert float(fixed_loss(result.model)) < loss0


def test_kd_option_distils_from_the_dense_model():
    c = moefy_recover.get_config("lora_sparse,code,kd")
    assert c.task.to_dict() == {"kind": "distill", "teacher": "smollm2-135m-instruct", "alpha": 1.0,
                                "temperature": 1.0}
    assert "task" not in moefy_recover.get_config("lora_sparse,code")
    with pytest.raises(ValueError, match="optionally test / kd / track"):
        moefy_recover.get_config("lora,distil")


def test_track_option_keeps_the_thresholds_at_the_quarter_level():
    from configurable_fm.train.distill import DistillTask
    from configurable_fm.train.ramp import task_from_config
    from configurable_fm.train.sparsity_tracking import SparsityTrackingTask
    from configurable_fm.train.task import NextTokenTask

    c = moefy_recover.get_config("lora_sparse,code,kd,track")
    assert c.task.track_sparsity == 0.75 and c.task.kind == "distill"
    task = task_from_config(c.task)
    assert isinstance(task, SparsityTrackingTask) and isinstance(task.inner, DistillTask) and task.level == 0.75
    task = task_from_config(moefy_recover.get_config("lora_sparse,track").task)
    assert isinstance(task, SparsityTrackingTask) and isinstance(task.inner, NextTokenTask)
    with pytest.raises(ValueError, match="goes with the mode lora_sparse"):
        moefy_recover.get_config("lora,track")
