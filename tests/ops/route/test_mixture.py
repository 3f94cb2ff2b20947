"""Row-weighted mixtures of stacked LoRA adapters (ops/route/mixture.py).

One-hot rows equal bricks.adapters.with_adapter_ids on a mixed model of the same adapters, and each adapter alone
(<= 1e-5 on float32 logits); a zero row is the base; a row with weights w equals the model with the single
adapter Σ_i w_i ΔW_i (bricks.adapters.combine 'cat', exact at rank Σ r_i), negative weights included. New weights
of the same batch size reuse the compiled program; the tap point `weights` is captured; errors name the problem.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configurable_fm.analysis import capture
from configurable_fm.bricks import adapters
from configurable_fm.models import check_consistent
from configurable_fm.models.llama import LlamaConfig
from configurable_fm.ops.route import RouteError, RowWeightedLinear, routed_modules, unroute, weighted_mix, \
    with_adapter_weights
from tests.helpers import assert_params_equal, random_llama

CFG = LlamaConfig(vocab_size=61, hidden_size=24, intermediate_size=40, num_layers=2, num_heads=4, num_kv_heads=2,
                  max_position_embeddings=32)
TARGETS = ["layers.*.self_attn.[qv]_proj", "layers.*.mlp.up_proj"]
TOKENS = jnp.asarray(np.random.RandomState(0).randint(0, 61, (4, 6)))
WEIGHTS = np.array([[1, 0, 0], [0, 0, 1], [0, 0, 0], [0.5, -0.7, 1.2]], np.float32)


@pytest.fixture(scope="module")
def setup():
    base = random_llama(CFG, 0)
    loras = [adapters.attach(base, "lora", TARGETS, rank=r, alpha=a, rslora=rs, init="random", seed=i + 1)
             for i, (r, a, rs) in enumerate([(4, 8, False), (2, 6, True), (3, 3, False)])]
    return base, loras, weighted_mix(base, loras, weights=WEIGHTS)


def test_rows_equal_ids_single_adapters_and_combinations(setup):
    base, loras, m = setup
    check_consistent(m, "test")
    out = np.asarray(m(TOKENS))
    by_ids = np.asarray(adapters.mix(base, loras, ids=[0, 2, -1, 0])(TOKENS))
    np.testing.assert_allclose(out[:2], by_ids[:2], atol=1e-6, rtol=0)
    np.testing.assert_allclose(out[0], np.asarray(loras[0](TOKENS))[0], atol=1e-5, rtol=0)
    np.testing.assert_allclose(out[1], np.asarray(loras[2](TOKENS))[1], atol=1e-5, rtol=0)
    np.testing.assert_array_equal(out[2], np.asarray(base(TOKENS))[2])  # zero weights add exactly 0
    combined = adapters.combine(loras, WEIGHTS[3].tolist(), "cat")  # Σ_i w_i ΔW_i, exact
    want = np.asarray(combined(TOKENS))[3]
    assert np.abs(want - np.asarray(base(TOKENS))[3]).max() > 0.05
    np.testing.assert_allclose(out[3], want, atol=1e-5, rtol=0)


def test_weights_are_traced_state(setup):
    base, loras, m = setup
    graphdef, state = nnx.split(m)
    traces = []

    @jax.jit
    def run(state, x):
        traces.append(1)
        return nnx.merge(graphdef, state)(x)

    first = np.asarray(run(state, TOKENS))
    flipped = with_adapter_weights(m, WEIGHTS[::-1].copy())
    second = np.asarray(run(nnx.split(flipped)[1], TOKENS))
    assert len(traces) == 1  # new weights, same program
    np.testing.assert_allclose(first, np.asarray(m(TOKENS)), atol=1e-6, rtol=0)
    np.testing.assert_allclose(second, np.asarray(flipped(TOKENS)), atol=1e-6, rtol=0)
    _, got = capture(m, "layers.0.self_attn.q_proj.weights", TOKENS)
    np.testing.assert_array_equal(np.asarray(got["layers.0.self_attn.q_proj.weights"]), WEIGHTS)


def test_structure_and_unroute(setup):
    base, loras, m = setup
    mod = routed_modules(m)["layers.1.mlp.up_proj"]
    assert isinstance(mod, RowWeightedLinear) and mod.options() == {"adapters": 3, "rank": 4, "batch": 4}
    np.testing.assert_allclose(mod.lora_scale[...], [2.0, 6 / np.sqrt(2), 1.0], rtol=1e-6)
    assert mod.lora_a.get_metadata()["out_sharding"] == (None, "embed", None)
    assert_params_equal(unroute(m), base)


def test_errors(setup):
    base, loras, m = setup
    with pytest.raises(RouteError, match=r"weights must be \(B, 3\) \(one weight per adapter for each batch row\), "
                                         r"got shape \(4, 2\)"):
        with_adapter_weights(m, WEIGHTS[:, :2])
    with pytest.raises(RouteError, match=r"rows \[1\] have non-finite weights"):
        with_adapter_weights(m, np.array([[1, 0, 0], [np.nan, 0, 0]]))
    with pytest.raises(RouteError, match=r"the model has no row-weighted adapter modules"):
        with_adapter_weights(base, WEIGHTS)
    with pytest.raises(RouteError, match=r"needs one weight vector per batch row"):
        weighted_mix(base, loras)(TOKENS)
    with pytest.raises(RouteError, match=r"got an input of shape \(2, 6, 24\) but holds weights for 4 rows"):
        m(TOKENS[:2])
    dora = adapters.attach(base, "dora", TARGETS, rank=2)
    with pytest.raises(RouteError, match=r"adapter 1 has non-LoRA adapters at .*\(dora\)"):
        weighted_mix(base, [loras[0], dora])


def test_weights_that_are_not_an_array_of_numbers_are_named(setup):
    """Ragged rows or strings raised numpy's own ValueError ('inhomogeneous shape', 'could not convert string')."""
    _, _, m = setup
    for bad in ([[1, 0, 0], [1, 0]], [["a", "b", "c"]]):
        with pytest.raises(RouteError, match=r"with_adapter_weights: weights must be a \(B, 3\) array of numbers"):
            with_adapter_weights(m, bad)
