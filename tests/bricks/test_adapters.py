"""Adapters as bricks (bricks/adapters): attach / merge / unmerge / detach / as_delta / save and load, on tiny random
llama and gpt2 models; no torch needed (PEFT parity is tests/interop/test_peft.py).

Invariants: a fresh adapter (B = 0, IA3 scales 1) leaves the logits bit-identical; merged logits equal unmerged ones
(max |diff| <= 1e-5, float32); unmerge(merge(keep=True)) and detach give the base weights back (detach: the same
arrays; unmerge: within 1e-6); deltas.apply(detach(m), as_delta(m)) is merge(m) (bit for bit for LoRA); saved
adapters load back bit for bit. Every documented error is triggered and its message checked.
"""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configurable_fm.bricks import adapters, deltas, flat_params, load_bricks
from configurable_fm.bricks.deltas import LowRank
from configurable_fm.models import check_consistent, extension_specs
from configurable_fm.models.factory import with_compute_dtype
from configurable_fm.models.gpt2 import GPT2, GPT2Config
from configurable_fm.models.layers import Linear
from configurable_fm.models.llama import LlamaConfig
from tests.helpers import assert_params_equal, random_llama

TOL = 1e-5
CFG = LlamaConfig(vocab_size=61, hidden_size=24, intermediate_size=40, num_layers=2, num_heads=4, num_kv_heads=2,
                  max_position_embeddings=32)
IDS = jnp.asarray(np.random.RandomState(0).randint(0, 61, (2, 7)))
ATTN = "layers.*.self_attn.[qv]_proj"
TARGETS = [ATTN, "layers.*.mlp.down_proj"]


@pytest.fixture(scope="module")
def base():
    return random_llama(CFG, 0)


@pytest.fixture(scope="module")
def base_logits(base):
    return np.asarray(base(IDS))


def logits(model):
    return np.asarray(model(IDS))


KINDS = {"lora": dict(rank=4, alpha=8, init="random"), "rslora": dict(rank=4, alpha=8, rslora=True, init="random"),
         "dora": dict(rank=4, alpha=8, init="random"), "ia3": dict(init="random")}


def attached(base, case, targets=TARGETS, seed=0):
    kind = "lora" if case == "rslora" else case
    model = adapters.attach(base, kind, targets, seed=seed, **KINDS[case])
    if kind == "dora":  # a fresh DoRA magnitude is ||W + sAB||: scale it so that the magnitude matters
        state = adapters.adapter_state(model)
        model = deltas.apply(model, deltas.Delta({k: 0.3 * v for k, v in state.items() if k.endswith("magnitude")}))
    return model


@pytest.fixture(scope="module")
def models(base):
    return {case: attached(base, case) for case in KINDS}


# ------------------------------------------------------------------------------------------ attach
def test_attach_adds_leaves_at_the_module_paths(base, models):
    model = models["dora"]
    assert base.layers[0].self_attn.q_proj.__class__ is Linear  # the input is untouched
    q = model.layers[0].self_attn.q_proj
    assert isinstance(q, adapters.DoRALinear) and isinstance(q, Linear)
    params = flat_params(model)
    d, kv = CFG.hidden_size, CFG.num_kv_heads * CFG.dim_per_head
    assert params["layers.0.self_attn.q_proj.kernel"].shape == (d, d)
    assert params["layers.0.self_attn.v_proj.lora_a"].shape == (d, 4)
    assert params["layers.0.self_attn.v_proj.lora_b"].shape == (4, kv)
    assert params["layers.1.mlp.down_proj.lora_magnitude"].shape == (d,)
    np.testing.assert_array_equal(params["layers.0.self_attn.q_proj.kernel"],
                                  flat_params(base)["layers.0.self_attn.q_proj.kernel"])
    state = adapters.adapter_state(model)
    assert list(state) == [k for k in params if k.rsplit(".", 1)[1].startswith("lora_")]
    assert len(state) == 2 * 3 * 3  # 2 layers x 3 modules x (a, b, magnitude)
    assert type(nnx.state(model, adapters.LoRAParam)["layers"][0]["self_attn"]["q_proj"]["lora_a"]) is \
        adapters.LoRAParam
    assert q.lora_a.get_metadata()["out_sharding"] == ("embed", None)
    check_consistent(model, "test")  # registered extensions: the tree agrees with model.cfg
    assert [s["kind"] for s in extension_specs(model)] == ["dora"] * 6
    assert adapters.adapters(model)["layers.1.self_attn.v_proj"] == {
        "kind": "dora", "rank": 4, "alpha": 8.0, "rslora": False, "merged": False}


def test_scale_is_alpha_over_r_or_sqrt_r(models):
    assert models["lora"].layers[0].self_attn.q_proj.scale == 2.0
    assert models["rslora"].layers[0].self_attn.q_proj.scale == 4.0


@pytest.mark.parametrize("kind, init", [("lora", "kaiming"), ("lora", "gaussian"), ("dora", "kaiming"),
                                        ("ia3", "ones")])
def test_a_fresh_adapter_leaves_the_logits_unchanged(base, base_logits, kind, init):
    model = adapters.attach(base, kind, TARGETS, init=init, seed=3)
    np.testing.assert_array_equal(logits(model), base_logits)
    a = np.asarray(adapters.adapter_state(model).get("layers.0.self_attn.q_proj.lora_a", np.ones(1)))
    assert np.abs(a).max() > 0  # A is random, B is zero


def test_random_values_come_from_seed_and_path(base):
    one = adapters.adapter_state(adapters.attach(base, "lora", "layers.0.self_attn.q_proj", init="random", seed=5))
    two = adapters.adapter_state(adapters.attach(base, "lora", ["layers.*.self_attn.q_proj", "layers.0.mlp.up_proj"],
                                                 init="random", seed=5))
    other = adapters.adapter_state(adapters.attach(base, "lora", "layers.0.self_attn.q_proj", init="random", seed=6))
    for k, v in one.items():
        np.testing.assert_array_equal(v, two[k])
        assert not np.array_equal(v, other[k])
    a = one["layers.0.self_attn.q_proj.lora_a"]
    assert np.abs(a).max() <= 1 / np.sqrt(CFG.hidden_size)  # kaiming-uniform bound 1/sqrt(in)


def test_ia3_feedforward_defaults_to_the_down_projections(base, models):
    specs = adapters.adapters(models["ia3"])
    assert specs["layers.0.mlp.down_proj"]["feedforward"] and not specs["layers.0.self_attn.q_proj"]["feedforward"]
    assert adapters.adapter_state(models["ia3"])["layers.0.mlp.down_proj.ia3_scale"].shape == (CFG.intermediate_size,)
    none = adapters.attach(base, "ia3", "layers.0.mlp.down_proj", feedforward=())
    assert not adapters.adapters(none)["layers.0.mlp.down_proj"]["feedforward"]


@pytest.fixture(scope="module")
def gpt2():
    """A tiny GPT-2 (Conv1D-style biased projections) with non-zero biases; built once for the tests below."""
    cfg = GPT2Config(vocab_size=61, n_positions=16, n_embd=24, n_layer=2, n_head=4)
    model = GPT2(cfg, rngs=nnx.Rngs(0))
    return deltas.apply(model, deltas.Delta({k: 0.1 * jax.random.normal(jax.random.key(1), v.shape)
                                             for k, v in flat_params(model).items() if k.endswith("bias")}))


def test_gpt2_adapters_with_biases(gpt2):
    ia3 = adapters.attach(gpt2, "ia3", ["h.*.attn.c_attn", "h.*.mlp.c_proj"], init="random")
    assert adapters.adapters(ia3)["h.1.mlp.c_proj"]["feedforward"]
    np.testing.assert_allclose(logits(adapters.merge(ia3)), logits(ia3), atol=TOL)
    delta = adapters.as_delta(ia3)
    assert "h.0.attn.c_attn.bias" in delta and "h.0.mlp.c_proj.bias" not in delta  # output side scales the bias


# ------------------------------------------------------------------------------------------ merge, unmerge, detach
@pytest.mark.parametrize("case", sorted(KINDS))
def test_merge_unmerge_detach(case, base, base_logits, models):
    model = models[case]
    out = logits(model)
    assert np.abs(out - base_logits).max() > 1e-2  # the adapter matters
    merged = adapters.merge(model)
    assert not adapters.adapters(merged) and type(merged.layers[0].self_attn.q_proj) is Linear
    assert set(flat_params(merged)) == set(flat_params(base))
    check_consistent(merged, "test")
    np.testing.assert_allclose(logits(merged), out, atol=TOL)
    kept = adapters.merge(model, keep=True)
    assert all(s["merged"] for s in adapters.adapters(kept).values())
    np.testing.assert_allclose(logits(kept), out, atol=TOL)
    check_consistent(kept, "test")
    back = adapters.unmerge(kept)
    np.testing.assert_allclose(logits(back), out, atol=TOL)
    for k, v in flat_params(back).items():
        np.testing.assert_allclose(v, flat_params(model)[k], atol=1e-6, err_msg=k)
    assert_params_equal(adapters.detach(model), base)  # the same arrays
    np.testing.assert_array_equal(logits(adapters.detach(model)), base_logits)
    for k, v in flat_params(adapters.detach(kept)).items():
        np.testing.assert_allclose(v, flat_params(base)[k], atol=1e-6, err_msg=k)
    np.testing.assert_allclose(logits(adapters.merge(kept)), out, atol=TOL)


@pytest.mark.parametrize("case", sorted(KINDS))
def test_as_delta_applied_to_the_base_is_the_merge(case, models):
    model = models[case]
    delta = adapters.as_delta(model, source="test")
    assert delta.kind == "adapter" and set(delta.metadata["adapters"].values()) == {"dora" if case == "dora" else
                                                                                   "ia3" if case == "ia3" else "lora"}
    applied, merged = flat_params(deltas.apply(adapters.detach(model), delta)), flat_params(adapters.merge(model))
    if case in ("lora", "rslora"):
        term = delta["layers.0.self_attn.q_proj.kernel"]
        assert isinstance(term, LowRank) and term.rank == 4
        assert term.scale == model.layers[0].self_attn.q_proj.scale  # folded in, not materialised
        for k in merged:
            np.testing.assert_array_equal(applied[k], merged[k], err_msg=k)
    else:
        assert all(isinstance(t, deltas.Dense) for t in delta.values())
        for k in merged:
            np.testing.assert_allclose(applied[k], merged[k], atol=1e-6, err_msg=k)
    np.testing.assert_allclose(logits(adapters.merge(models[case])),
                               np.asarray(deltas.apply(adapters.detach(model), delta)(IDS)), atol=TOL)


def test_dora_gradients_treat_the_norm_as_a_constant(models):
    """PEFT (and DoRA §4.3) detach ||W + sAB|| from the graph: with L = Σ w ⊙ y and y = f ⊙ (x W + s (x A) B) + b,
    f = m / n, the gradients are dL/dm = Σ_batch w ⊙ (x (W + sAB)) / n and dL/dB = s (x A)ᵀ (w ⊙ f) exactly."""
    q = models["dora"].layers[0].self_attn.q_proj
    rs = np.random.RandomState(1)
    x = jnp.asarray(rs.normal(size=(3, CFG.hidden_size)), jnp.float32)
    w = jnp.asarray(rs.normal(size=(3, q.out_features)), jnp.float32)
    graphdef, lora, rest = nnx.split(q, adapters.AdapterParam, ...)
    grads = jax.grad(lambda st: jnp.sum(nnx.merge(graphdef, st, rest)(x) * w))(lora)
    a, b, m, s = q.lora_a[...], q.lora_b[...], q.lora_magnitude[...], q.scale
    n = jnp.linalg.norm(q.kernel[...] + s * a @ b, axis=0)
    np.testing.assert_allclose(grads["lora_magnitude"][...], jnp.sum(w * (x @ (q.kernel[...] + s * a @ b)), 0) / n,
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(grads["lora_b"][...], s * (x @ a).T @ (w * (m / n)), rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------ save / load
def test_save_and_load_an_adapter(base, models, tmp_path):
    model = models["dora"]
    path = adapters.save_adapter(model, tmp_path / "a", source="unit")
    bricks = load_bricks(path)
    assert list(bricks) == list(adapters.adapters(model))
    b = bricks["layers.0.self_attn.q_proj"]
    assert b.kind == "dora" and b.source == "unit" and set(b.params) == {"lora_a", "lora_b", "lora_magnitude"}
    assert b.metadata == {"options": {"rank": 4, "alpha": 8.0, "rslora": False}}
    again = adapters.load_adapter(base, path)
    assert_params_equal(again, model)
    np.testing.assert_array_equal(logits(again), logits(model))
    # a merged adapter saves the same adapter, and loads unmerged
    adapters.save_adapter(adapters.merge(model, keep=True), tmp_path / "m")
    assert_params_equal(adapters.load_adapter(base, tmp_path / "m"), model)
    with pytest.raises(FileExistsError):
        adapters.save_adapter(model, path)


def test_orbax_round_trip_of_an_adapted_model(models, tmp_path):
    from configurable_fm.interop.orbax_io import load_model, save_model

    kept = adapters.merge(models["dora"], keep=True)  # DoRA's kept norm is a non-parameter variable
    restored = load_model(save_model(kept, tmp_path / "ckpt"))
    assert adapters.adapters(restored) == adapters.adapters(kept)
    np.testing.assert_array_equal(logits(adapters.unmerge(restored)), logits(adapters.unmerge(kept)))


def test_load_refuses_what_does_not_fit(models, tmp_path):
    path = adapters.save_adapter(models["lora"], tmp_path / "a")
    small = random_llama(LlamaConfig(vocab_size=61, hidden_size=16, intermediate_size=40, num_layers=1, num_heads=4,
                                     num_kv_heads=2, max_position_embeddings=32), 1)
    with pytest.raises(adapters.AdapterError) as e:
        adapters.load_adapter(small, path)
    msg = str(e.value)
    assert "brick 'layers.1.self_attn.q_proj': the model has no module at layers.1.self_attn.q_proj" in msg
    assert "layers.0.self_attn.q_proj/lora_a is (24, 4) but the module needs (16, 4)" in msg
    with pytest.raises(adapters.AdapterError, match=r"the model has a LoRALinear, not a plain Linear at"):
        adapters.load_adapter(models["lora"], path)


# ------------------------------------------------------------------------------------------ errors
@pytest.mark.parametrize("args, kw, match", [
    (("lora", "layers.*.self_attn.x_proj"), {}, r"\['layers.\*.self_attn.x_proj'\] match no module; did you mean"),
    (("lora", ["layers.*.mlp"]), {}, r"layers.0.mlp is a LlamaMLP, not a Linear"),
    (("lora", "layers.0.self_attn.q_proj.*"), {}, r"layers.0.self_attn.q_proj.kernel is a Param, not a Linear"),
    (("lora", "layers.0.mlp.up_proj"), {"rank": 0}, r"rank must be an int >= 1, got 0"),
    (("lora", "layers.0.mlp.up_proj"), {"init": "pissa"}, r"init='pissa' is not a lora initialisation"),
    (("lora", "layers.0.mlp.up_proj"), {"feedforward": "x"}, r"feedforward is an ia3 option"),
    (("ia3", "layers.0.mlp.up_proj"), {"rank": 4}, r"\['rank'\] are LoRA/DoRA options"),
    (("ia3", "layers.0.mlp.up_proj"), {"feedforward": "layers.0.mlp.down_proj"}, r"matches none of the targets"),
    (("prefix", "layers.0.mlp.up_proj"), {}, r"unknown adapter kind 'prefix'"),
    (("lora", []), {}, r"give a module path glob"),
    (("lora", "layers.0.mlp.up_proj"), {"alpha": float("nan")}, r"alpha must be a finite number, got nan"),
    (("dora", "layers.0.mlp.up_proj"), {"alpha": float("inf")}, r"alpha must be a finite number, got inf"),
])
def test_attach_errors(base, args, kw, match):
    with pytest.raises(adapters.AdapterError, match=match):
        adapters.attach(base, *args, **kw)


def test_load_refuses_a_non_finite_alpha_naming_the_brick(base, models):
    """A brick whose metadata holds alpha NaN is refused naming the module, not loaded
    as an adapter whose every output is NaN."""
    bricks = adapters.adapter_bricks(models["lora"])
    name = "layers.0.self_attn.q_proj"
    brick = bricks[name]
    bad = dataclasses.replace(brick, metadata={"options": {**brick.metadata["options"], "alpha": float("nan")}})
    with pytest.raises(adapters.AdapterError, match=rf"brick '{name}': lora adapter: alpha must be a finite number"):
        adapters.attach_bricks(base, bad)


def test_errors_without_adapters_and_on_adapted_targets(base, models):
    with pytest.raises(adapters.AdapterError, match=r"already has a lora adapter"):
        adapters.attach(models["lora"], "dora", "layers.0.self_attn.q_proj")
    for fn, name in [(adapters.merge, "merge"), (adapters.detach, "detach"), (adapters.as_delta, "as_delta")]:
        with pytest.raises(adapters.AdapterError, match=rf"{name}: the model has no adapters"):
            fn(base)
    with pytest.raises(adapters.AdapterError, match=r"unmerge: the model has no merged adapters"):
        adapters.unmerge(models["lora"])
    zero = deltas.apply(models["ia3"], deltas.Delta({"layers.0.mlp.down_proj.ia3_scale": -adapters.adapter_state(
        models["ia3"])["layers.0.mlp.down_proj.ia3_scale"]}))
    with pytest.raises(adapters.AdapterError, match=r"IA3 scales of \['layers.0.mlp.down_proj'\] have zeros"):
        adapters.unmerge(adapters.merge(zero, keep=True))
    assert adapters.adapter_state(base) == {} and adapters.adapters(base) == {}


def test_lora_dropout_drops_the_lora_branch_input_only_inside_the_block(base):
    """Inside lora_dropout(key, p): y = xW + b + s ((x ⊙ k / (1 - p)) A) B with k ~ Bernoulli(1 - p) drawn from
    fold_in(key, i) for the block's i-th LoRA call; unbiased (the mean over many keys approaches the output without
    dropout); rate 0 and outside the block: no dropout; DoRA refuses."""
    m = adapters.attach(base, "lora", "layers.0.self_attn.q_proj", rank=4, alpha=8, init="random", seed=3)
    q = m.layers[0].self_attn.q_proj
    x = jnp.asarray(np.random.RandomState(1).randn(3, 24), jnp.float32)
    plain = np.asarray(q(x))
    base_out = np.asarray(x @ q.kernel[...] + (0 if q.bias is None else q.bias[...]))
    a, b = np.asarray(q.lora_a[...]), np.asarray(q.lora_b[...])
    with adapters.lora_dropout(jax.random.key(0), 0.0):
        np.testing.assert_array_equal(np.asarray(q(x)), plain)
    key = jax.random.key(7)
    with adapters.lora_dropout(key, 0.25):
        first, second = np.asarray(q(x)), np.asarray(q(x))
    for i, out in enumerate((first, second)):
        k = np.asarray(jax.random.bernoulli(jax.random.fold_in(key, i), 0.75, x.shape))
        want = base_out + q.scale * ((np.asarray(x) * k / 0.75) @ a) @ b
        np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-5)
    assert not np.allclose(first, second) and not np.allclose(first, plain)
    np.testing.assert_array_equal(np.asarray(q(x)), plain)  # outside the block again

    def in_block(k):
        with adapters.lora_dropout(k, 0.5):
            return q(x)

    samples = jax.vmap(jax.jit(in_block))(jax.random.split(jax.random.key(1), 2000))
    branch = np.abs(plain - base_out).max()
    assert np.abs(np.asarray(samples).mean(0) - plain).max() < 0.1 * branch  # unbiased: E[k / (1 - p)] = 1
    d = adapters.attach(base, "dora", "layers.0.self_attn.q_proj", rank=4, alpha=8, init="random", seed=3)
    with pytest.raises(adapters.AdapterError, match="DoRA with LoRA dropout"):
        with adapters.lora_dropout(jax.random.key(0), 0.5):
            d.layers[0].self_attn.q_proj(x)
    with pytest.raises(adapters.AdapterError, match=r"\[0, 1\)"):
        with adapters.lora_dropout(jax.random.key(0), 1.0):
            pass


def test_lora_dropout_with_scan_layers_draws_per_layer_as_the_loop(base):
    """scan_layers gives the loop's results (models/llama.py), under lora_dropout too: each layer's LoRA call draws
    its own mask (a scan body traced once gave every layer of the run the same masks, and other logits)."""
    m = adapters.attach(base, "lora", ATTN, rank=4, alpha=8, init="random", seed=3)
    scanned = with_compute_dtype(m, None, scan_layers=True)

    def run(model):
        with adapters.lora_dropout(jax.random.key(5), 0.5):
            return np.asarray(model(IDS))

    np.testing.assert_allclose(run(scanned), run(m), rtol=TOL, atol=TOL)


def test_joint_lora_matmul_equals_the_separate_sum_with_its_gradients(base, models, gpt2):
    """with_lora_matmul(m, 'joint'): y = [x | s x A | 0] @ [W ; B ; 0] + b equals x W + b + s (x A) B in float32
    (logits and the gradients of the LoRA factors, through the attention and the MLP; with biases on a gpt2); 'auto'
    likewise; the input model is untouched; merged LoRAs compute the plain Linear; bad input is refused."""
    model = models["rslora"]
    joint = adapters.with_lora_matmul(model, "joint")
    assert {m.matmul for _, m in nnx.iter_modules(joint) if isinstance(m, adapters.LoRALinear)} == {"joint"}
    assert {m.matmul for _, m in nnx.iter_modules(model) if isinstance(m, adapters.LoRALinear)} == {"separate"}
    assert nnx.graphdef(joint) != nnx.graphdef(model)  # a jit cache keyed by the graph compiles each once

    def loss(m):
        return jnp.sum(jnp.tanh(m(IDS)))

    np.testing.assert_allclose(logits(joint), logits(model), rtol=TOL, atol=TOL)
    auto = adapters.with_lora_matmul(model, "auto")  # joint on q (24 -> 24), separate on v (24 -> 12) and down
    np.testing.assert_allclose(logits(auto), logits(model), rtol=TOL, atol=TOL)
    grad = nnx.jit(nnx.grad(loss))  # one compilation per model, not an op-by-op backward (the same gradients)
    sep, jnt = flat_params(grad(model)), flat_params(grad(joint))
    lora_keys = [k for k in sep if k.endswith(("lora_a", "lora_b"))]
    assert lora_keys
    for k in lora_keys:
        np.testing.assert_allclose(np.asarray(jnt[k]), np.asarray(sep[k]), rtol=1e-4, atol=1e-6, err_msg=k)
    g = adapters.attach(gpt2, "lora", "h.*.attn.c_attn", rank=3, alpha=6, init="random", seed=1)
    np.testing.assert_allclose(logits(adapters.with_lora_matmul(g, "joint")), logits(adapters.merge(g)),
                               rtol=1e-4, atol=1e-5)
    merged = adapters.merge(model, keep=True)
    np.testing.assert_array_equal(logits(adapters.with_lora_matmul(merged, "joint")), logits(merged))
    with pytest.raises(adapters.AdapterError, match="mode must be one of"):
        adapters.with_lora_matmul(model, "fused")
    with pytest.raises(adapters.AdapterError, match="no LoRA modules"):
        adapters.with_lora_matmul(models["dora"], "joint")
