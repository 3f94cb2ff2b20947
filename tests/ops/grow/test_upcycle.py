"""Sparse upcycling (ops/grow/upcycle.py): exact for top-k-then-softmax routing, scaled by k/E for
softmax-then-top-k with a zero router, Drop-Upcycling re-initialises the stated units, the result exports as
Mixtral that transformers loads, and bad arguments are named."""
import dataclasses

import jax
import numpy as np
import pytest

from configurable_fm.bricks.paths import flat_params
from configurable_fm.interop import orbax_io
from configurable_fm.interop.hf import to_hf
from configurable_fm.models import check_consistent
from configurable_fm.models.llama import LlamaConfig
from configurable_fm.ops.grow import GrowthError, upcycle
from tests.ops.grow.grow_helpers import (assert_unchanged, grads, logits, max_diff, random_model, reference_logits,
                                         snapshot)

IDS = np.random.RandomState(0).randint(0, 37, (2, 9))
DENSE = LlamaConfig(vocab_size=37, hidden_size=32, num_heads=4, num_kv_heads=2, intermediate_size=24, num_layers=2,
                    max_position_embeddings=64)


@pytest.fixture(scope="module")
def dense():
    return random_model(DENSE, seed=6)


def test_upcycled_model_computes_the_dense_function(dense):
    before = snapshot(dense)
    ref = logits(dense, IDS)
    for router_init, key in (("zeros", None), ("normal", jax.random.key(0))):
        moe = upcycle(dense, num_experts=4, num_experts_per_tok=2, router_init=router_init, key=key)
        check_consistent(moe, "test")
        assert moe.cfg == dataclasses.replace(DENSE, num_experts=4, num_experts_per_tok=2,
                                              architecture="MixtralForCausalLM")
        params = flat_params(moe)
        for e in range(4):
            np.testing.assert_array_equal(np.asarray(params["layers.1.mlp.experts.up_proj"][e]),
                                          np.asarray(flat_params(dense)["layers.1.mlp.up_proj.kernel"]))
        router = np.asarray(params["layers.0.mlp.router.kernel"])
        assert (router == 0).all() if router_init == "zeros" else 0.01 < router.std() < 0.03
        assert max_diff(logits(moe, IDS), ref) <= 1e-5
    assert_unchanged(dense, before)


def test_a_dense_capacity_factor_is_not_carried_over():
    """A dense config may hold router_capacity_factor (inert there); with it the MoE would drop the assignments over
    each expert's capacity (uneven under a normal router) and not be exact, so upcycle leaves it out."""
    cfg = dataclasses.replace(DENSE, router_capacity_factor=1.0)
    dense = random_model(cfg, seed=6)
    moe = upcycle(dense, num_experts=4, key=jax.random.key(0))
    assert moe.cfg.router_capacity_factor is None
    assert max_diff(logits(moe, IDS), logits(dense, IDS)) <= 1e-5


def test_the_default_router_is_normal_and_exact(dense):
    """router_init defaults to 'normal' (a zero router is a symmetric saddle): a nonzero router, still exact."""
    moe = upcycle(dense, num_experts=4, key=jax.random.key(3))
    assert 0.01 < np.asarray(flat_params(moe)["layers.0.mlp.router.kernel"]).std() < 0.03
    ref = reference_logits(flat_params(dense), DENSE, IDS)
    assert max_diff(reference_logits(flat_params(moe), moe.cfg, IDS), ref) <= 1e-10
    assert max_diff(logits(moe, IDS), logits(dense, IDS)) <= 1e-5


@pytest.mark.parametrize("experts,k", [(2, 1), (3, 3), (8, 3)])
def test_topk_softmax_is_exact_for_any_k_in_float64(experts, k):
    model = random_model(DENSE, seed=7)
    moe = upcycle(model, num_experts=experts, num_experts_per_tok=k, router_init="normal", key=jax.random.key(1))
    ref = reference_logits(flat_params(model), DENSE, IDS)
    assert max_diff(reference_logits(flat_params(moe), moe.cfg, IDS), ref) <= 1e-10


def test_softmax_topk_with_a_zero_router_scales_the_mlp_by_k_over_e(dense):
    moe = upcycle(dense, num_experts=4, num_experts_per_tok=3, router="softmax_topk", router_init="zeros")
    assert moe.cfg.router == "softmax_topk"
    scaled = {k: np.asarray(v, np.float64) * (0.75 if k.endswith("mlp.down_proj.kernel") else 1.0)
              for k, v in flat_params(dense).items()}
    assert max_diff(reference_logits(flat_params(moe), moe.cfg, IDS), reference_logits(scaled, DENSE, IDS)) <= 1e-10
    assert max_diff(reference_logits(flat_params(moe), moe.cfg, IDS), reference_logits(flat_params(dense), DENSE,
                                                                                        IDS)) > 1e-2


def test_drop_upcycling_reinitialises_a_fraction_of_each_expert(dense):
    moe = upcycle(dense, num_experts=4, drop_fraction=0.5, key=jax.random.key(2))
    params, base = flat_params(moe), flat_params(dense)
    dense_down = np.asarray(base["layers.0.mlp.down_proj.kernel"])
    sets = []
    for e in range(4):
        gate = np.asarray(params["layers.0.mlp.experts.gate_proj"][e])
        up = np.asarray(params["layers.0.mlp.experts.up_proj"][e])
        down = np.asarray(params["layers.0.mlp.experts.down_proj"][e])
        changed = [np.any(gate[:, j] != np.asarray(base["layers.0.mlp.gate_proj.kernel"])[:, j]) for j in range(24)]
        assert sum(changed) == 12  # floor(0.5 * 24) units
        for j in range(24):  # a unit is re-initialised as a whole (gate and up columns, down row) or not at all
            assert changed[j] == np.any(up[:, j] != np.asarray(base["layers.0.mlp.up_proj.kernel"])[:, j])
            assert changed[j] == np.any(down[j] != dense_down[j])
        s = np.flatnonzero(changed)
        sets.append(tuple(s))
        # drawn from the statistics of the dense entries they replace
        assert abs(down[s].std() - dense_down[s].std()) < 0.3 * dense_down[s].std()
    assert len(set(sets)) == 4  # a different set per expert
    assert max_diff(reference_logits(params, moe.cfg, IDS), reference_logits(base, DENSE, IDS)) > 1e-2  # not exact
    again = upcycle(dense, num_experts=4, drop_fraction=0.5, key=jax.random.key(2))
    assert all(np.array_equal(np.asarray(v), np.asarray(flat_params(again)[k])) for k, v in params.items())


def test_a_zero_router_is_a_symmetric_saddle_and_a_normal_router_is_not(dense):
    """Identical experts: the router gets no gradient; a zero router trains experts 0 and 1 identically and no
    other, a random router sends tokens to different experts, whose gradients differ."""
    zero = grads(upcycle(dense, num_experts=4, num_experts_per_tok=2, router_init="zeros"), IDS)
    normal = grads(upcycle(dense, num_experts=4, num_experts_per_tok=2, key=jax.random.key(0)), IDS)  # the default
    for g in (zero, normal):
        assert np.abs(g["layers.0.mlp.router.kernel"]).max() < 1e-7
    up = zero["layers.0.mlp.experts.up_proj"]
    np.testing.assert_array_equal(up[0], up[1])
    assert np.abs(up[0]).max() > 0 and not up[2:].any()
    up = normal["layers.0.mlp.experts.up_proj"]
    assert min(max_diff(up[i], up[j]) for i in range(4) for j in range(i)) > 1e-3 * np.abs(up).max()


def test_upcycled_model_loads_in_transformers_as_mixtral(dense, tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    moe = upcycle(dense, num_experts=4, num_experts_per_tok=2, router_init="normal", key=jax.random.key(0))
    to_hf(moe, tmp_path / "hf")
    hf = transformers.MixtralForCausalLM.from_pretrained(tmp_path / "hf").eval()
    with torch.no_grad():
        theirs = hf(torch.tensor(IDS)).logits.numpy()
    assert max_diff(theirs, logits(dense, IDS)) <= 1e-4
    restored = orbax_io.load_model(orbax_io.save_model(moe, tmp_path / "orbax"))
    assert restored.cfg == moe.cfg
    assert all(np.array_equal(np.asarray(v), np.asarray(flat_params(restored)[k]))
               for k, v in flat_params(moe).items())


ERRORS = {
    "experts": (dict(num_experts=1), r"num_experts must be an int >= 2, got 1"),
    "k": (dict(num_experts=4, num_experts_per_tok=5), r"num_experts_per_tok must be an int in 1..4, got 5"),
    "router": (dict(num_experts=4, router="sinkhorn"), r"router='sinkhorn' is unknown; choose one of "
                                                       r"\['topk_softmax', 'softmax_topk'\]"),
    "router-init": (dict(num_experts=4, router_init="uniform"), r"router_init='uniform' is unknown"),
    "router-key": (dict(num_experts=4, router_init="normal"), r"router_init='normal' needs a PRNG key"),
    "drop-key": (dict(num_experts=4, router_init="zeros", drop_fraction=0.5), r": drop_fraction=0.5 needs a PRNG key"),
    "default-key": (dict(num_experts=4), r"router_init='normal' needs a PRNG key"),  # the default router_init
    "both-key": (dict(num_experts=4, drop_fraction=0.5), r"router_init='normal' and drop_fraction=0.5 needs a PRNG"),
    "drop-range": (dict(num_experts=4, drop_fraction=1.5), r"drop_fraction=1.5 must lie in \[0, 1\]"),
    # once float(True) = 1.0 (every unit re-initialised) and a ValueError from float('half')
    "drop-bool": (dict(num_experts=4, drop_fraction=True, key=0), r"drop_fraction must be a number in \[0, 1\], "
                                                                  r"got True"),
    "drop-string": (dict(num_experts=4, drop_fraction="half", key=0), r"drop_fraction must be a number in \[0, 1\], "
                                                                      r"got 'half'"),
}


@pytest.mark.parametrize("name", sorted(ERRORS))
def test_errors_name_the_problem(dense, name):
    kwargs, message = ERRORS[name]
    with pytest.raises(GrowthError, match=message):
        upcycle(dense, **kwargs)


def test_moe_and_biased_mlps_are_refused(dense):
    moe = upcycle(dense, num_experts=2, key=jax.random.key(0))
    with pytest.raises(GrowthError, match="already a mixture of 2 experts; upcycle takes a dense model"):
        upcycle(moe, num_experts=4)
    biased = random_model(dataclasses.replace(DENSE, mlp_bias=True), seed=0)
    with pytest.raises(GrowthError, match=r"MLP biases \(mlp_bias=True\) but SparseMoE experts have none"):
        upcycle(biased, num_experts=4)
