"""LoRA on stacked expert weights (bricks/adapters/experts.py): on a Mixtral-style MoE model and on a MoEfied model.

The adapted forward equals the base model whose expert weights are set by hand to W_e + s A_e B_e (numpy, float64
product); a fresh (kaiming) adapter is the identity; merge / unmerge / detach / as_delta round trips; the brick set,
orbax and structure round trips; the gather dispatch of a MoEfied FFN sees the change; refusals name the paths
(to_hf, to_peft of a MoEfied model, mix, combine, demoefy, attach on a stacked weight, unmatched globs, a second
LoRA). PEFT parity for Mixtral experts: tests/interop/test_peft_experts.py."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configurable_fm.analysis import moefication as mf
from configurable_fm.analysis.moefication.dispatch import with_dispatch
from configurable_fm.bricks import adapters, deltas
from configurable_fm.bricks.paths import flat_params, with_params
from configurable_fm.interop import orbax_io
from configurable_fm.interop.hf import UnsupportedModel
from configurable_fm.models import to_hf
from configurable_fm.models.llama import LlamaConfig
from configurable_fm.models.structure import check_consistent
from tests.helpers import random_llama

MOE = LlamaConfig(vocab_size=40, hidden_size=16, intermediate_size=12, num_layers=2, num_heads=4, num_kv_heads=2,
                  num_experts=4, num_experts_per_tok=2, architecture="MixtralForCausalLM")
DENSE = dataclasses.replace(MOE, intermediate_size=32, num_experts=0, num_experts_per_tok=0,
                            architecture="LlamaForCausalLM")
IDS = jnp.asarray(np.random.RandomState(0).randint(0, 40, (2, 7)).astype(np.int32))
TARGETS = "layers.*.mlp.experts.*_proj"


def close(a, b, tol=1e-5):
    np.testing.assert_allclose(np.asarray(a, np.float64), np.asarray(b, np.float64), atol=tol, rtol=0)


def by_hand(model, adapted):
    """`model` with every adapted stacked weight W replaced by W_e + s A_e B_e computed in numpy (float64)."""
    values = {}
    for path, a in adapters.expert_loras(adapted).items():
        w = np.asarray(flat_params(model)[path], np.float64)
        change = np.einsum("eir,ero->eio", np.asarray(a.lora_a[...], np.float64), np.asarray(a.lora_b[...], np.float64))
        values[path] = jnp.asarray(w + a.scale * change, jnp.float32)
    return with_params(model, values)


@pytest.fixture(scope="module")
def moe():
    return random_llama(MOE, 0)


@pytest.fixture(scope="module")
def adapted(moe):
    return adapters.attach_experts(moe, TARGETS, rank=3, alpha=6, init="random", seed=1)


def test_attach_lists_every_expert_weight_and_the_forward_is_the_adapted_weights(moe, adapted):
    listed = adapters.adapters(adapted)
    assert sorted(listed) == [f"layers.{i}.mlp.experts.{n}_proj" for i in range(2) for n in ("down", "gate", "up")]
    assert listed["layers.0.mlp.experts.gate_proj"] == {"kind": "expert_lora", "rank": 3, "alpha": 6.0,
                                                        "rslora": False, "merged": False}
    state = adapters.adapter_state(adapted)
    assert state["layers.0.mlp.experts.gate_proj_lora.lora_a"].shape == (4, 16, 3)
    assert state["layers.0.mlp.experts.down_proj_lora.lora_b"].shape == (4, 3, 16)
    y = adapted(IDS)
    assert float(jnp.abs(y - moe(IDS)).max()) > 1e-3  # the random init changes the function
    close(y, by_hand(moe, adapted)(IDS))
    check_consistent(adapted, "test")
    fresh = adapters.attach_experts(moe, "layers.1.mlp.experts.up_proj", rank=2)  # kaiming: B = 0
    np.testing.assert_array_equal(np.asarray(fresh(IDS)), np.asarray(moe(IDS)))
    a = adapters.expert_loras(adapters.attach_experts(moe, TARGETS, rank=4, alpha=8, rslora=True))
    assert a["layers.0.mlp.experts.up_proj"].scale == 4.0  # alpha / sqrt(r)


def test_merge_unmerge_detach_and_delta(moe, adapted):
    y = adapted(IDS)
    merged = adapters.merge(adapted)
    assert adapters.adapters(merged) == {}
    close(merged(IDS), y)
    kept = adapters.merge(adapted, keep=True)
    assert all(v["merged"] for v in adapters.adapters(kept).values())
    close(kept(IDS), y)
    close(flat_params(kept)["layers.0.mlp.experts.gate_proj"], flat_params(merged)["layers.0.mlp.experts.gate_proj"],
          0)
    back = adapters.unmerge(kept)
    close(back(IDS), y)
    close(flat_params(back)["layers.1.mlp.experts.down_proj"], flat_params(moe)["layers.1.mlp.experts.down_proj"],
          1e-6)
    for m in (adapted, kept):
        base = adapters.detach(m)
        assert adapters.adapters(base) == {}
        close(base(IDS), moe(IDS), 1e-6)
    delta = adapters.as_delta(adapted)
    assert isinstance(delta.get("layers.0.mlp.experts.up_proj"), deltas.LowRank)
    close(deltas.apply(moe, delta)(IDS), merged(IDS), 1e-6)
    for m in (merged, kept, back):
        check_consistent(m, "test")


def test_bricks_orbax_and_with_linear_lora(moe, adapted, tmp_path):
    both = adapters.attach(adapted, "lora", "layers.*.self_attn.q_proj", rank=2, init="random")
    y = both(IDS)
    saved = adapters.save_adapter(both, tmp_path / "brick")
    loaded = adapters.load_adapter(moe, saved)
    assert adapters.adapters(loaded) == adapters.adapters(both)
    close(loaded(IDS), y, 0)
    restored = orbax_io.load_model(orbax_io.save_model(both, tmp_path / "ckpt"))
    close(restored(IDS), y, 0)
    close(adapters.merge(both)(IDS), y)
    close(adapters.detach(both)(IDS), moe(IDS), 1e-6)
    bricks = adapters.adapter_bricks(adapted)
    with pytest.raises(adapters.AdapterError, match="no stacked expert weight at layers.0.mlp.experts.gate_proj"):
        adapters.attach_bricks(random_llama(DENSE, 0), bricks)


def test_refusals_name_the_paths(moe, adapted, tmp_path):
    with pytest.raises(UnsupportedModel, match="gate_proj_lora \\(expert_lora\\)"):
        to_hf(adapted, tmp_path / "hf")
    with pytest.raises(adapters.AdapterError, match="stacked expert weights"):
        adapters.mix(moe, [adapted])
    with pytest.raises(adapters.AdapterError, match="input 0: LoRA on stacked expert weights"):
        adapters.combine([adapted, adapted], [0.5, 0.5], "linear")
    with pytest.raises(adapters.AdapterError, match="match no stacked expert weight; the model's are "
                                                    "layers.\\*.mlp.experts.gate_proj"):
        adapters.attach_experts(moe, "layers.*.mlp.gate_proj")
    with pytest.raises(adapters.AdapterError, match="already have a LoRA"):
        adapters.attach_experts(adapted, "layers.0.mlp.experts.up_proj")
    with pytest.raises(adapters.AdapterError, match="stacked expert weight: bricks.adapters.attach_experts"):
        adapters.attach(moe, "lora", "layers.0.mlp.experts.up_proj")
    with pytest.raises(adapters.AdapterError, match="none \\(no MoE or MoEfied FFN\\)"):
        adapters.attach_experts(random_llama(DENSE, 0), "layers.*.mlp.*")


def test_moefied_ffn_takes_expert_lora(tmp_path):
    base = random_llama(DENSE, 3)
    moe = mf.moefy(base, num_experts=4, num_experts_per_tok=2, split="kmeans", router="centroid", key=0)
    adapted = adapters.attach_experts(moe, "layers.*.mlp.*_proj", rank=2, init="random")
    assert sorted(adapters.adapters(adapted))[:3] == ["layers.0.mlp.down_proj", "layers.0.mlp.gate_proj",
                                                       "layers.0.mlp.up_proj"]
    y = adapted(IDS)
    assert float(jnp.abs(y - moe(IDS)).max()) > 1e-4
    close(y, by_hand(moe, adapted)(IDS))
    close(with_dispatch(adapted, "gather")(IDS), y)  # the gather path reads the adapted weights
    with pytest.raises(mf.MoefyError, match="merge them into the experts first"):
        mf.demoefy(adapted)
    with pytest.raises(UnsupportedModel, match="not adapters: layers.0.mlp \\(moefied_mlp\\)"):  # no PEFT form
        adapters.to_peft(adapted, tmp_path / "peft")
    assert not (tmp_path / "peft").exists()
    dense = mf.demoefy(adapters.merge(adapted))  # merged: the dense FFN of the adapted experts
    all_on = mf.moefy(base, num_experts=4, num_experts_per_tok=4, split="kmeans", router="centroid", key=0)
    adapted_all = adapters.attach_experts(all_on, "layers.*.mlp.*_proj", rank=2, init="random")
    close(mf.demoefy(adapters.merge(adapted_all))(IDS), adapted_all(IDS))  # all experts on: dense = MoEfied
    assert dense.layers[0].mlp.up_proj.kernel.shape == (16, 32)


def test_training_reaches_the_factors_only(moe, adapted):
    graphdef, lora, rest = nnx.split(adapted, adapters.AdapterParam, ...)

    def loss(lora_state):
        return jnp.mean(nnx.merge(graphdef, lora_state, rest)(IDS) ** 2)

    grads = jax.jit(jax.grad(loss))(lora)  # one compilation, not an op-by-op backward
    flat = {jax.tree_util.keystr(p): v for p, v in jax.tree_util.tree_leaves_with_path(grads)}
    assert len(flat) == 12 and all(float(jnp.abs(v).max()) > 0 for v in flat.values())


def test_trainer_section_attaches_them_and_checks_the_peft_form(moe):
    """config.adapter.target_parameters (train/adapters.py): expert_rank applies; save 'peft' is refused when the
    attached model has no PEFT form (a MoEfied one), before any training."""
    import ml_collections

    from configurable_fm.errors import ConfigError
    from configurable_fm.train.adapters import adapter_config, attach_configured

    cfg = ml_collections.ConfigDict({"adapter": adapter_config("lora", targets=(), target_parameters=(TARGETS,),
                                                               rank=4, expert_rank=2, save=("brick", "peft"))})
    listed = adapters.adapters(attach_configured(moe, cfg))  # a Mixtral model: PEFT's target_parameters
    assert {v["rank"] for v in listed.values()} == {2} and len(listed) == 6
    moefied = mf.moefy(random_llama(DENSE, 3), num_experts=4, num_experts_per_tok=2, split="kmeans",
                       router="centroid", key=0)
    cfg.adapter.target_parameters = ("layers.*.mlp.*_proj",)
    with pytest.raises(ConfigError, match="Mixtral experts only.*adapter.save=\\('brick',\\)"):
        attach_configured(moefied, cfg)
