"""Arrow routing (ops/route/arrow.py) and its kernel (ops/route/mixture.py).

* Kernels by hand: softmax_top_k on a 2 x 3 example (ties: lower index), lora_mixture against a per-adapter loop.
* Prototypes against numpy's SVD of the materialised ΔW = s A B (|cos| >= 1 - 1e-6), a zero-padded rank and a zero
  adapter (prototype 0).
* PEFT 0.21.2's create_arrow_model on a tiny random LlamaForCausalLM built here, three rank-4 LoRAs (top_k=2,
  T=0.7), without and with GenKnowSub (two general LoRAs): float32 logits within 1e-5 (measured ~1.7e-6; Arrow
  moves the logits by ~3 from the base) and PEFT's prototypes equal ours to |cos| >= 1 - 1e-6. The adapters are
  made with a clear top singular value (B's first column x4), because PEFT's 15-step power iteration is not
  converged otherwise (measured 1 - |cos| up to 0.25 with plain random LoRAs, whereas ours is exact).
* In our own model: top_k=1 with one adapter that has an update and two fresh ones (B = 0, prototype 0) equals
  that adapter alone; top_k=N at a huge temperature equals the uniform linear combination Σ ΔW_i / N
  (bricks.adapters.combine 'cat'); with top_k=1 the captured routing weights are one-hot on argmax |<x, p_i>| and
  the module output is x W + s_i (x A_i) B_i, both recomputed with numpy from the captured input.
* The model passes check_consistent, jits, round-trips through orbax, generates with the KV cache as full
  recomputation does (greedy; slow); unroute gives the base arrays; errors.
"""
import copy

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configurable_fm.analysis import capture
from configurable_fm.bricks import adapters, deltas
from configurable_fm.models import check_consistent
from configurable_fm.models.llama import LlamaConfig
from configurable_fm.ops.route import (ArrowLinear, RouteError, arrow, arrow_modules, lora_mixture, lora_prototypes,
                                       softmax_top_k, unroute)
from tests.helpers import assert_params_equal, random_llama, tiny_hf_llama

CFG = LlamaConfig(vocab_size=61, hidden_size=24, intermediate_size=40, num_layers=2, num_heads=4, num_kv_heads=2,
                  max_position_embeddings=32)
TARGETS = ["layers.*.self_attn.[qv]_proj", "layers.*.mlp.down_proj"]
TOKENS = jnp.asarray(np.random.RandomState(0).randint(0, 61, (3, 7)))


@pytest.fixture(scope="module")
def base():
    return random_llama(CFG, 0)


@pytest.fixture(scope="module")
def loras(base):
    """Three random LoRAs on the same modules; the second has another rank and alpha."""
    return [adapters.attach(base, "lora", TARGETS, rank=r, alpha=a, init="random", seed=i + 1)
            for i, (r, a) in enumerate([(4, 8), (2, 6), (4, 4)])]


# ------------------------------------------------------------------------------------------ kernels by hand
def test_softmax_top_k_by_hand():
    scores = jnp.asarray([[1.0, 3.0, 2.0], [2.0, 2.0, 0.5]])
    w, idx = softmax_top_k(scores, 2, 0.5)
    e = np.exp([3.0 / 0.5, 2.0 / 0.5])
    np.testing.assert_allclose(np.asarray(w)[0], [0, e[0] / e.sum(), e[1] / e.sum()], rtol=1e-6)
    np.testing.assert_allclose(np.asarray(w)[1], [0.5, 0.5, 0], rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(idx), [[1, 2], [0, 1]])  # equal scores: the lower index first
    w1, idx1 = softmax_top_k(jnp.asarray([[2.0, 2.0, 0.5]]), 1, 1.0)
    np.testing.assert_array_equal(np.asarray(w1), [[1, 0, 0]])
    np.testing.assert_array_equal(np.asarray(idx1), [[0]])
    for k, t in [(0, 1.0), (4, 1.0), (1, 0.0), (1, float("inf"))]:
        with pytest.raises(RouteError, match=r"need 1 <= k <= 3 and a finite temperature > 0"):
            softmax_top_k(scores, k, t)


def test_lora_mixture_is_the_weighted_sum_of_the_adapters():
    rs = np.random.RandomState(1)
    x, a, b = rs.normal(size=(2, 5, 6)), rs.normal(size=(3, 6, 4)), rs.normal(size=(3, 4, 7))
    s, w = np.array([2.0, 0.5, -1.0]), rs.normal(size=(2, 5, 3))
    want = sum(w[..., i:i + 1] * s[i] * (x @ a[i]) @ b[i] for i in range(3))
    got = lora_mixture(*(jnp.asarray(v, jnp.float32) for v in (x, a, b, s, w)))
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)
    row = lora_mixture(*(jnp.asarray(v, jnp.float32) for v in (x, a, b, s)), jnp.asarray(w[:, :1], jnp.float32))
    want_row = sum(w[:, :1, i:i + 1] * s[i] * (x @ a[i]) @ b[i] for i in range(3))  # one weight vector per row
    np.testing.assert_allclose(np.asarray(row), want_row, rtol=1e-5, atol=1e-5)


def test_prototypes_equal_numpy_svd():
    rs = np.random.RandomState(2)
    a = rs.normal(size=(4, 9, 3)).astype(np.float32)
    b = rs.normal(size=(4, 3, 5)).astype(np.float32)
    a[1, :, 2] = 0.0  # rank 2 zero-padded to 3
    b[1, 2] = 0.0
    b[3] = 0.0  # a zero update
    p = np.asarray(lora_prototypes(jnp.asarray(a), jnp.asarray(b)))
    assert p.shape == (4, 9) and p.dtype == np.float32
    for n in range(3):
        u = np.linalg.svd((2.5 * a[n].astype(np.float64)) @ b[n])[0][:, 0]  # the scale does not matter
        assert abs(float(p[n] @ u)) >= 1 - 1e-6 and abs(np.linalg.norm(p[n]) - 1) < 1e-6
        assert p[n][np.argmax(np.abs(p[n]))] > 0  # the sign convention
    np.testing.assert_array_equal(p[3], 0)


# ------------------------------------------------------------------------------------------ PEFT's Arrow
@pytest.mark.parametrize("gks", [False, pytest.param(True, marks=pytest.mark.slow)], ids=["arrow", "genknowsub"])
def test_parity_with_peft_arrow(tmp_path, gks):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    from configurable_fm.interop.hf import from_hf

    hf = tiny_hf_llama(tmp_path / "hf")
    names = ["t0", "t1", "t2"] + (["g0", "g1"] if gks else [])
    for seed, name in enumerate(names):
        torch.manual_seed(seed + 1)
        config = peft.LoraConfig(r=4, lora_alpha=8 + 2 * seed, target_modules=["q_proj", "v_proj", "down_proj"],
                                 init_lora_weights=False)
        model = peft.get_peft_model(copy.deepcopy(hf), config)
        with torch.no_grad():  # a clear top singular value, so that PEFT's power iteration converges
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    p[:, 0] *= 4.0
        model.save_pretrained(tmp_path / name)
    served = peft.create_arrow_model(copy.deepcopy(hf), [str(tmp_path / n) for n in names[:3]],
                                     peft.ArrowConfig(top_k=2, router_temperature=0.7, rng_seed=0, use_gks=gks),
                                     general_adapter_paths=[str(tmp_path / n) for n in names[3:]] or None).eval()
    tokens = np.random.RandomState(0).randint(0, 97, (3, 9))
    with torch.no_grad():
        want = served(torch.tensor(tokens)).logits.numpy()
        plain = hf(torch.tensor(tokens)).logits.numpy()

    ours_base = from_hf(tmp_path / "hf")
    loaded = [adapters.from_peft(ours_base, tmp_path / n) for n in names]
    m = arrow(ours_base, loaded[:3], top_k=2, temperature=0.7, general=loaded[3:] or None)
    got = np.asarray(m(jnp.asarray(tokens)))
    assert np.abs(want - plain).max() > 1.0  # Arrow changes the function
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
    ours = arrow_modules(m)
    seen = 0
    for name, module in served.named_modules():
        if hasattr(module, "lora_arrow"):
            theirs = module.lora_arrow["arrow_router"].prototypes.numpy()
            mine = np.asarray(ours[name.removeprefix("base_model.model.model.")].arrow_prototypes[...])
            cos = np.abs(np.sum(theirs * mine, axis=1)) / np.linalg.norm(theirs, axis=1)
            assert cos.min() >= 1 - 1e-6, name
            seen += 1
    assert seen == 6


# ------------------------------------------------------------------------------------------ invariants
def test_top1_with_one_dominant_adapter_equals_it_alone(base, loras):
    fresh = [adapters.attach(base, "lora", TARGETS, rank=4, alpha=8, seed=s) for s in (7, 8)]  # B = 0: p = 0
    m = arrow(base, [fresh[0], loras[0], fresh[1]], top_k=1)
    np.testing.assert_allclose(np.asarray(m(TOKENS)), np.asarray(loras[0](TOKENS)), atol=1e-5, rtol=0)
    _, got = capture(m, "layers.*.self_attn.q_proj.routing", TOKENS)
    for w in got.values():
        np.testing.assert_array_equal(np.asarray(w), np.broadcast_to([0.0, 1.0, 0.0], w.shape))


@pytest.mark.slow  # CI time
def test_all_adapters_at_a_huge_temperature_are_the_uniform_combination(base, loras):
    m = arrow(base, loras, top_k=3, temperature=1e9)
    uniform = adapters.combine(loras, [1 / 3] * 3, "cat")  # Σ_i ΔW_i / 3 exactly
    want = np.asarray(uniform(TOKENS))
    assert np.abs(want - np.asarray(base(TOKENS))).max() > 0.05
    np.testing.assert_allclose(np.asarray(m(TOKENS)), want, atol=1e-5, rtol=0)


@pytest.mark.slow  # CI time
def test_top1_routing_and_output_recomputed_with_numpy(base, loras):
    m = arrow(base, loras, top_k=1, temperature=0.3)
    point = "layers.1.mlp.down_proj"
    _, got = capture(m, [f"{point}.input", f"{point}.routing", f"{point}.output"], TOKENS)
    x = np.asarray(got[f"{point}.input"], np.float64).reshape(-1, CFG.intermediate_size)
    w = np.asarray(got[f"{point}.routing"]).reshape(-1, 3)
    mod = arrow_modules(m)[point]
    protos = np.asarray(mod.arrow_prototypes[...], np.float64)
    choice = np.argmax(np.abs(x @ protos.T), axis=1)
    assert len(set(choice.tolist())) > 1  # the tokens do not all pick one adapter
    np.testing.assert_array_equal(w, np.eye(3)[choice])
    singles = [adapters.adapted_modules(l)[point] for l in loras]
    want = np.stack([x[t] @ np.asarray(singles[i].kernel[...]) + singles[i].scale *
                     (x[t] @ np.asarray(singles[i].lora_a[...])) @ np.asarray(singles[i].lora_b[...])
                     for t, i in enumerate(choice)])
    np.testing.assert_allclose(np.asarray(got[f"{point}.output"]).reshape(want.shape), want, atol=1e-5)


@pytest.mark.slow  # CI time
def test_structure_jit_orbax_and_unroute(base, loras, tmp_path):
    from flax import nnx

    from configurable_fm.interop.orbax_io import load_model, save_model

    m = arrow(base, [adapters.adapter_bricks(l) for l in loras], top_k=2)  # brick sets work too
    check_consistent(m, "test")
    mod = arrow_modules(m)["layers.0.self_attn.v_proj"]
    assert isinstance(mod, ArrowLinear) and mod.options() == {"adapters": 3, "rank": 4, "top_k": 2,
                                                              "temperature": 1.0}
    assert mod.kernel.get_value() is base.layers[0].self_attn.v_proj.kernel.get_value()
    np.testing.assert_array_equal(mod.lora_a[1, :, 2:], 0)  # rank 2 zero-padded
    np.testing.assert_allclose(mod.lora_scale[...], [2.0, 3.0, 1.0])
    assert "layers.0.self_attn.v_proj.lora_a" in adapters.adapter_state(m)  # stacked factors are AdapterParams
    eager = np.asarray(m(TOKENS))
    graphdef, state = nnx.split(m)
    jitted = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x))(state, TOKENS)
    np.testing.assert_allclose(np.asarray(jitted), eager, atol=1e-6, rtol=0)
    restored = load_model(save_model(m, tmp_path / "ckpt"))
    np.testing.assert_array_equal(np.asarray(restored(TOKENS)), eager)
    assert_params_equal(unroute(m), base)


@pytest.mark.slow  # ~10 s on CPU (compiling generate)
def test_greedy_generation_with_the_kv_cache_equals_full_recomputation(base, loras):
    from configurable_fm.models import generation

    m = arrow(base, loras, top_k=2)
    out = np.asarray(generation.generate(m, TOKENS, max_new_tokens=3))
    seq = np.asarray(TOKENS)
    for _ in range(3):  # routing is per token, so recomputing the whole sequence gives the same next tokens
        seq = np.concatenate([seq, np.argmax(np.asarray(m(jnp.asarray(seq)))[:, -1], axis=-1)[:, None]], axis=1)
    np.testing.assert_array_equal(out, seq)


# ------------------------------------------------------------------------------------------ errors
def test_arrow_errors(base, loras):
    with pytest.raises(RouteError, match=r"top_k must be an int in 1\.\.3 \(the number of task adapters\), got 4"):
        arrow(base, loras, top_k=4)
    with pytest.raises(RouteError, match=r"temperature must be a finite number > 0, got 0"):
        arrow(base, loras, temperature=0)
    with pytest.raises(RouteError, match=r"give a non-empty list of adapted models"):
        arrow(base, [])
    ia3 = adapters.attach(base, "ia3", TARGETS)
    with pytest.raises(RouteError, match=r"adapter 1 has non-LoRA adapters at layers\.0\.mlp\.down_proj \(ia3\), "
                                         r"layers\.0\.self_attn\.q_proj \(ia3\)"):
        arrow(base, [loras[0], ia3], top_k=1)
    partial = adapters.attach(base, "lora", "layers.*.self_attn.q_proj", rank=4, seed=3)
    with pytest.raises(RouteError, match=r"the adapters target different modules.*\n  adapter 0 "
                                         r"adapts layers\.0\.mlp\.down_proj, layers\.0\.self_attn\.v_proj, .*which "
                                         r"adapter 1 does not"):
        arrow(base, [loras[0], partial], top_k=1)
    with pytest.raises(RouteError, match=r"needs equal ranks at every module \(adapters in order\):\n  "
                                         r"layers\.0\.mlp\.down_proj has ranks \[4, 2, 4, 4\]"):
        arrow(base, loras, top_k=1, general=[loras[0]])
    merged = adapters.merge(loras[0], keep=True)
    with pytest.raises(RouteError, match=r"adapter 0 has merged adapters"):
        arrow(base, [merged], top_k=1)
    other = deltas.apply(loras[0], deltas.Delta({"layers.0.mlp.up_proj.kernel": jnp.ones((24, 40))}))
    with pytest.raises(adapters.AdapterError, match=r"layers\.0\.mlp\.up_proj\.kernel differs between the base and "
                                                    r"adapter 1"):
        arrow(base, [loras[1], other], top_k=1)
    with pytest.raises(RouteError, match=r"unroute: the model has no routed adapter modules"):
        unroute(base)
