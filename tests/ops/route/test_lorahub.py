"""LoraHub (ops/route/lorahub.py) on a tiny Llama.

* The combination rule: the combined adapter's factors are Σ w_i A_i and Σ w_i B_i with the shared scale (checked
  against numpy), so ΔW' = s A'B' keeps the cross terms; w = 0 is the base (bit for bit); J(w) = J(−w).
* The search: one adapter trained here (Adam on the few-shot loss) and one random adapter; with budget 40 the
  weights put most of their magnitude on the trained adapter (|w_fit| > 3 |w_other|), and the loss is below both
  the uniform combination's (w = 1/2, 1/2) and the base's (measured: base 3.95, uniform 2.10, LoraHub 0.91, the
  trained adapter alone 0.88); two runs with one seed give the same trace bit for bit, another seed another trace.
* few_shot_batch's layout, target_loss by hand, and the errors.
"""
import functools
import importlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from configurable_fm.bricks import adapters
from configurable_fm.bricks.paths import flat_params, with_params
from configurable_fm.models.llama import LlamaConfig
from configurable_fm.models.scoring import next_token_nll
from configurable_fm.ops.route import (FewShot, RouteError, few_shot_batch, lorahub, lorahub_combine,
                                       lorahub_objective, target_loss)
from tests.helpers import char_tokenizer, random_llama

CFG = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=24, num_layers=2, num_heads=2, num_kv_heads=1,
                  max_position_embeddings=32)
TARGETS = ["layers.*.self_attn.[qv]_proj", "layers.*.mlp.down_proj"]


def shots() -> FewShot:
    """6 examples: 5 prompt tokens, then 3 output tokens (the prompt's last token, then 17, 23)."""
    rs = np.random.RandomState(0)
    prompts = rs.randint(4, 32, (6, 5))
    outs = np.tile([[9, 17, 23]], (6, 1))
    outs[:, 0] = prompts[:, -1]
    ids = np.concatenate([prompts, outs], 1).astype(np.int32)
    return FewShot(ids, np.ones_like(ids), np.concatenate([np.zeros((6, 5)), np.ones((6, 3))], 1).astype(np.int32))


def batch(s: FewShot):
    return tuple(jnp.asarray(a) for a in (s.ids, s.attention, s.targets))


@pytest.fixture(scope="module")
def setup():
    base = random_llama(CFG, 0)  # sharper logits than N(0, 0.02) weights give, so that an adapter can fit
    base = with_params(base, {k: v * (1.0 if "norm" in k else 15.0) for k, v in flat_params(base).items()})
    examples = shots()
    fit = adapters.attach(base, "lora", TARGETS, rank=4, alpha=8, init="gaussian", seed=1)
    graphdef, lora, rest = nnx.split(fit, adapters.LoRAParam, ...)
    opt = optax.adam(0.1)

    @jax.jit
    def step(lora, state):
        loss, grads = jax.value_and_grad(lambda p: target_loss(nnx.merge(graphdef, p, rest), *batch(examples)))(lora)
        updates, state = opt.update(grads, state, lora)
        return optax.apply_updates(lora, updates), state, loss

    state = opt.init(lora)
    for _ in range(40):
        lora, state, _ = step(lora, state)
    fit = nnx.merge(graphdef, lora, rest)
    other = adapters.attach(base, "lora", TARGETS, rank=4, alpha=8, init="random", seed=2)
    return base, examples, other, fit


@pytest.mark.slow  # CI time (~8 s)
def test_combination_rule(setup):
    base, examples, other, fit = setup
    w = [0.3, -1.2]
    m = lorahub_combine(base, [other, fit], w)
    for path, mod in adapters.adapted_modules(m).items():
        a = [np.asarray(adapters.adapted_modules(x)[path].lora_a[...]) for x in (other, fit)]
        b = [np.asarray(adapters.adapted_modules(x)[path].lora_b[...]) for x in (other, fit)]
        np.testing.assert_allclose(mod.lora_a[...], w[0] * a[0] + w[1] * a[1], rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(mod.lora_b[...], w[0] * b[0] + w[1] * b[1], rtol=1e-6, atol=1e-7)
        assert mod.rank == 4 and mod.scale == 2.0
    zero = lorahub_combine(base, [other, fit], [0.0, 0.0])
    np.testing.assert_array_equal(np.asarray(zero(examples.ids)), np.asarray(base(examples.ids)))
    objective, ce = lorahub_objective(base, [other, fit], examples)
    assert ce([0.0, 0.0]) == pytest.approx(float(target_loss(base, *batch(examples))), abs=1e-6)
    assert objective(w) == pytest.approx(ce(w) + 0.05 * (0.3 + 1.2) / 2, abs=1e-6)
    assert objective([-0.3, 1.2]) == pytest.approx(objective(w), abs=1e-6)  # the rule is even in w
    assert ce(w) == pytest.approx(float(target_loss(m, *batch(examples))), abs=1e-5)


@functools.partial(jax.jit, static_argnums=0)
def _jitted_target_loss(graphdef, state, ids, attention, targets):
    return target_loss(nnx.merge(graphdef, state), ids, attention, targets)


def jitted_target_loss(model, examples: FewShot) -> float:
    """target_loss(model, *batch(examples)) as one jitted program (eagerly, each of its ops compiles on its own);
    the LoRA models share one graphdef, hence one program."""
    return float(_jitted_target_loss(*nnx.split(model), *batch(examples)))


def test_search_finds_the_fitted_adapter(setup):
    base, examples, other, fit = setup
    result = lorahub(base, [other, fit], examples, budget=40, seed=0)
    base_loss = jitted_target_loss(base, examples)
    uniform = jitted_target_loss(lorahub_combine(base, [other, fit], [0.5, 0.5]), examples)
    print(f"base {base_loss:.3f}, uniform {uniform:.3f}, LoraHub {result.loss:.3f} at {result.weights}, trained "
          f"alone {jitted_target_loss(fit, examples):.3f}")
    assert abs(result.weights[1]) > 3 * abs(result.weights[0])
    assert result.loss < uniform < base_loss
    assert result.trace.shape == (40,) and result.candidates.shape == (40, 2)
    assert result.trace[0] == pytest.approx(base_loss, abs=1e-6)  # w = 0 first: the base
    assert result.objective == result.trace.min() == result.best_trace[-1]
    assert result.loss == pytest.approx(jitted_target_loss(result.model, examples), abs=1e-5)
    compiled = importlib.import_module("configurable_fm.ops.route.lorahub")._combined_loss._cache_size()
    again = lorahub(base, [other, fit], examples, budget=40, seed=0)
    assert importlib.import_module("configurable_fm.ops.route.lorahub")._combined_loss._cache_size() == compiled
    np.testing.assert_array_equal(again.trace, result.trace)
    np.testing.assert_array_equal(again.weights, result.weights)
    other_seed = lorahub(base, [other, fit], examples, budget=12, seed=1)
    assert not np.array_equal(other_seed.candidates[1:], result.candidates[1:12])


@pytest.mark.slow  # CI time; the search test covers the objective
def test_few_shot_batch_and_target_loss(setup):
    tok = char_tokenizer()
    s = few_shot_batch(tok, ["ab", "c"], ["X", "YZ"], pad_id=0, bos_id=2, eos_id=1)
    a, b, c, x, y, z = (tok.token_to_id(ch) for ch in "abcXYZ")
    np.testing.assert_array_equal(s.ids, [[2, a, b, x, 1], [2, c, y, z, 1]])
    np.testing.assert_array_equal(s.targets, [[0, 0, 0, 1, 1], [0, 0, 1, 1, 1]])
    np.testing.assert_array_equal(s.attention, np.ones((2, 5)))
    s2 = few_shot_batch(tok, ["abc", "c"], ["X", "Y"])
    np.testing.assert_array_equal(s2.attention, [[1, 1, 1, 1], [1, 1, 0, 0]])
    np.testing.assert_array_equal(s2.targets, [[0, 0, 0, 1], [0, 1, 0, 0]])
    model = setup[0]
    padded = FewShot(s2.ids % CFG.vocab_size, s2.attention, s2.targets)  # the same layout in the model's vocab
    logits = np.asarray(model(jnp.asarray(padded.ids), attention_mask=jnp.asarray(padded.attention)))
    nll = np.asarray(next_token_nll(jnp.asarray(logits[:, :-1]), jnp.asarray(padded.ids[:, 1:])))
    want = (nll[0, 2] + nll[1, 0]) / 2  # the targets at (0, 3) and (1, 1), predicted from one position earlier
    assert float(target_loss(model, *batch(padded))) == pytest.approx(want, rel=1e-5)


def test_errors(setup):
    base, examples, other, fit = setup
    r2 = adapters.attach(base, "lora", TARGETS, rank=2, alpha=4, seed=3)
    with pytest.raises(RouteError, match=r"needs equal ranks and scales alpha/r at every module "
                                         r"\(adapters in order\):\n  layers\.0\.mlp\.down_proj has ranks \[4, 2\]"):
        lorahub_combine(base, [other, r2], [1, 1])
    s1 = adapters.attach(base, "lora", TARGETS, rank=4, alpha=4, seed=3)
    with pytest.raises(RouteError, match=r"\n  layers\.0\.mlp\.down_proj has scales \[2\.0, 1\.0\]"):
        lorahub_combine(base, [other, s1], [1, 1])
    with pytest.raises(RouteError, match=r"weights must be 2 finite numbers \(one per adapter\), got \[1\]"):
        lorahub_combine(base, [other, fit], [1])
    with pytest.raises(RouteError, match=r"examples must be a FewShot batch"):
        lorahub(base, [other, fit], (examples.ids, examples.targets))
    with pytest.raises(RouteError, match=r"l1 must be a number >= 0"):
        lorahub(base, [other, fit], examples, l1=-1)
    with pytest.raises(RouteError, match=r"x0 \[2\.0, 0\.0\] must lie in \[lower, upper\]"):
        lorahub(base, [other, fit], examples, init=[2.0, 0.0], budget=2)
    with pytest.raises(RouteError, match=r"no target token to score"):
        FewShot(examples.ids, examples.attention, np.zeros_like(examples.ids))
    with pytest.raises(RouteError, match=r"give equal, non-empty lists of inputs and outputs, got 2 and 1"):
        few_shot_batch(char_tokenizer(), ["a", "b"], ["c"])
    with pytest.raises(RouteError, match=r"pad_to must be an int >= 1, got 0"):
        few_shot_batch(char_tokenizer(), ["a"], ["c"], pad_to=0)
    padded = few_shot_batch(char_tokenizer(), ["ab", "c"], ["X", "YZ"], pad_to=4)  # rows of 3 tokens -> 4
    assert padded.ids.shape == (2, 4) and padded.attention.sum() == 6
    assert few_shot_batch(char_tokenizer(), ["abc", "c"], ["XY", "Y"], pad_to=4).ids.shape == (2, 8)
