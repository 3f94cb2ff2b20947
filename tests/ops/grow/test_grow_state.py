"""The optimizer state grown with the parameters (ops/grow/state.py): after two real AdamW steps on a tiny llama,
every operator's grown state has the structure, shapes and dtypes of a fresh init on the grown model, copied
entries hold the source moments, new entries are zero, and the counts are kept."""
import jax
import ml_collections
import numpy as np
import optax
import pytest

from configurable_fm.bricks.paths import flat_params
from configurable_fm.models.llama import LlamaConfig
from configurable_fm.ops.grow import GrowthError, depth_sources, drop_sets, grow_opt_state, grow_steps
from configurable_fm.train.optim import make_optimizer
from configurable_fm.prng import path_key
from tests.ops.grow.grow_helpers import grads, random_model

CFG = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                  max_position_embeddings=32)
OPT = ml_collections.ConfigDict(dict(name="adamw", lr=1e-2, schedule="cosine", warmup_steps=1, min_lr_ratio=0.1,
                                     b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.1, grad_clip=1.0))


@pytest.fixture(scope="module")
def trained():
    """(model, AdamW state) after two steps on random tokens."""
    model = random_model(CFG, 0)
    tx, _ = make_optimizer(OPT, 10)
    params = {k: np.asarray(v) for k, v in flat_params(model).items()}
    state = tx.init(params)
    ids = np.random.RandomState(0).randint(0, 64, (2, 9))
    update = jax.jit(tx.update)  # one program (eagerly, each of its operations compiles per shape: ~3x longer)
    for _ in range(2):
        from configurable_fm.bricks.paths import with_params

        updates, state = update(grads(with_params(model, params), ids), state, params)
        params = {k: np.asarray(v) for k, v in optax.apply_updates(params, updates).items()}
    return with_params(model, params), state, tx


def adam(state):
    return next(s for s in jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, optax.ScaleByAdamState))
                if isinstance(s, optax.ScaleByAdamState))


def counts(state):
    return [int(x) for x in jax.tree.leaves(state) if np.ndim(x) == 0]


def grown_state(trained, steps):
    model, state, tx = trained
    g = grow_steps(model, steps, seed=0)
    fresh = tx.init(flat_params(g.model))
    new = grow_opt_state(state, fresh, g.moments)
    assert jax.tree.structure(new) == jax.tree.structure(fresh)
    for a, b in zip(jax.tree.leaves(new), jax.tree.leaves(fresh)):
        assert a.shape == b.shape and a.dtype == b.dtype
    assert counts(new) == counts(state) == [2, 2]  # Adam's count and the schedule's
    old, grown = adam(state), adam(new)
    for m in ("mu", "nu"):
        assert any(np.abs(np.asarray(v)).max() > 0 for v in getattr(old, m).values())
    return g, old, grown


@pytest.mark.parametrize("kw", [dict(hidden_size=48, num_heads=6, num_kv_heads=3, intermediate_size=96),
                                dict(hidden_size=40, intermediate_size=80, noise=0.1)])
def test_width_exact_copies_the_old_slice_and_zeros_the_rest(trained, kw):
    _, old, new = grown_state(trained, [("width", kw)])
    for m in ("mu", "nu"):
        for path, x in getattr(old, m).items():
            y = np.asarray(getattr(new, m)[path])
            corner = tuple(slice(0, n) for n in x.shape)
            np.testing.assert_array_equal(y[corner], np.asarray(x), err_msg=path)
            rest = y.copy()
            rest[corner] = 0
            assert not rest.any(), path  # new units, heads, kv head, stream entries and readers' new rows


def test_width_hypercloning_tiles_the_moments(trained):
    _, old, new = grown_state(trained, [("width", dict(hidden_size=64, num_heads=8, intermediate_size=128,
                                                       method="hypercloning", noise=0.1))])
    for m in ("mu", "nu"):
        for path, x in getattr(old, m).items():
            y, x = np.asarray(getattr(new, m)[path]), np.asarray(x)
            np.testing.assert_array_equal(y, np.tile(x, np.asarray(y.shape) // np.asarray(x.shape)), err_msg=path)


@pytest.mark.parametrize("kw", [dict(method="identity", positions=[0, 2]), dict(method="llama_pro", num_layers=4),
                                dict(method="stack", factor=2), dict(method="dus", drop=0)])
def test_depth_copies_copied_layers_and_zeros_new_blocks(trained, kw):
    _, old, new = grown_state(trained, [("depth", kw)])
    plan = depth_sources(2, **kw)
    for m in ("mu", "nu"):
        o, n = getattr(old, m), getattr(new, m)
        for path, y in n.items():
            if not path.startswith("layers."):
                np.testing.assert_array_equal(np.asarray(y), np.asarray(o[path]))
                continue
            i, rel = path.split(".", 2)[1:]
            src, zeroed = plan[int(i)]
            if zeroed:
                assert not np.asarray(y).any(), path
            else:
                np.testing.assert_array_equal(np.asarray(y), np.asarray(o[f"layers.{src}.{rel}"]), err_msg=path)


@pytest.mark.parametrize("drop", [0.0, 0.5])
def test_upcycle_experts_copy_the_mlp_router_zero(trained, drop):
    kw = dict(num_experts=4, num_experts_per_tok=2, router_init="normal", drop_fraction=drop)
    _, old, new = grown_state(trained, [("upcycle", kw)])
    key = jax.random.fold_in(jax.random.key(0), 0)  # grow_steps' key of step 0
    for m in ("mu", "nu"):
        o, n = getattr(old, m), getattr(new, m)
        for i in range(2):
            pre = f"layers.{i}.mlp"
            assert np.asarray(n[f"{pre}.router.kernel"]).shape == (32, 4)
            assert not np.asarray(n[f"{pre}.router.kernel"]).any()
            sets = drop_sets(path_key(key, pre, "drop_upcycling"), 4, 64, drop)
            for name, axis in (("gate_proj", 1), ("up_proj", 1), ("down_proj", 0)):
                x = np.asarray(o[f"{pre}.{name}.kernel"])
                y = np.asarray(n[f"{pre}.experts.{name}"])
                for e in range(4):
                    keep = np.ones(64, bool)
                    keep[sets[e]] = False
                    ye, xe = np.moveaxis(y[e], axis, 0), np.moveaxis(x, axis, 0)
                    np.testing.assert_array_equal(ye[keep], xe[keep])
                    assert not ye[~keep].any() and (~keep).sum() == int(drop * 64)
        for path in o:
            if ".mlp." not in path:
                np.testing.assert_array_equal(np.asarray(n[path]), np.asarray(o[path]))


def test_composed_steps_and_a_parameter_with_no_source(trained):
    """width then depth compose; a grown parameter the map does not produce takes the fresh state's value; another
    optimizer's state is refused."""
    model, state, tx = trained
    g = grow_steps(model, [("width", dict(hidden_size=48, num_heads=6, num_kv_heads=3)),
                           ("depth", dict(method="llama_pro", num_layers=3))])
    params = flat_params(g.model)
    fresh = tx.init(params)
    only = {k: v for k, v in adam(state).mu.items() if not k.startswith("layers.1.")}
    partial = lambda m: g.moments({k: v for k, v in m.items() if k in only})
    new = adam(grow_opt_state(state, fresh, partial))
    assert not np.asarray(new.mu["layers.2.mlp.down_proj.kernel"]).any()  # from layers.1, not mapped: fresh zeros
    np.testing.assert_array_equal(np.asarray(new.mu["layers.0.mlp.up_proj.kernel"])[:32, :64],
                                  np.asarray(adam(state).mu["layers.0.mlp.up_proj.kernel"]))
    with pytest.raises(GrowthError, match="structure"):
        grow_opt_state(state, optax.sgd(0.1, momentum=0.9).init(params), g.moments)
    with pytest.raises(GrowthError, match="embed_tokens.embedding"):
        grow_opt_state(state, fresh, lambda m: {**g.moments(m), "embed_tokens.embedding": np.zeros((1, 1))})
