"""A routing folded into the weights (ops.route.folded, run_folded).

folded(m, w) is a plain model (no adapter modules) whose logits equal the row-weighted mixture's for a row routed
to w (<= 1e-5 on float32 logits: one-hot, zero, uniform and signed weights); one-hot weights give the adapter
merged as bricks.adapters.merge does; zero weights give the base's own arrays. run_folded equals run_routed row by
row, folds each distinct routing once and keeps it across calls; inputs are untouched; errors name the problem.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configurable_fm.bricks import adapters
from configurable_fm.bricks.paths import flat_params
from configurable_fm.models.llama import LlamaConfig
from configurable_fm.models.structure import extension_specs
from configurable_fm.ops.route import (FoldedModels, RouteError, Routing, folded, routed_modules, run_folded,
                                       run_routed, weighted_mix)
from configurable_fm.ops.route.retrieval import padded_rows
from tests.helpers import random_llama

CFG = LlamaConfig(vocab_size=61, hidden_size=24, intermediate_size=40, num_layers=2, num_heads=4, num_kv_heads=2,
                  max_position_embeddings=32)
TARGETS = ["layers.*.self_attn.[qv]_proj", "layers.*.mlp.up_proj"]
TOKENS = jnp.asarray(np.random.RandomState(0).randint(0, 61, (5, 6)))
WEIGHTS = np.array([[1, 0, 0], [0, 0, 0], [1 / 3, 1 / 3, 1 / 3], [0.5, -0.7, 1.2], [1, 0, 0]], np.float32)


@pytest.fixture(scope="module")
def setup():
    base = random_llama(CFG, 0)
    loras = [adapters.attach(base, "lora", TARGETS, rank=r, alpha=a, rslora=rs, init="random", seed=i + 1)
             for i, (r, a, rs) in enumerate([(4, 8, False), (2, 6, True), (3, 3, False)])]
    return base, loras, weighted_mix(base, loras)


def routing_of(weights: np.ndarray) -> Routing:
    """A Routing whose rows carry `weights` (top-1 choice: the largest weight, -1 for a zero row)."""
    choices = np.where(np.abs(weights).sum(1) > 0, weights.argmax(1), -1).astype(np.int32)
    return Routing(scores=weights.copy(), choices=choices, top=choices[:, None].copy(), weights=weights,
                   names=("a", "b", "c"))


def test_folded_models_compute_the_mixtures_rows(setup):
    base, loras, m = setup
    mixed = np.asarray(run_routed(m, routing_of(WEIGHTS), TOKENS))
    for row, w in enumerate(WEIGHTS):
        f = folded(m, w)
        assert not routed_modules(f) and not extension_specs(f)  # the base's structure
        np.testing.assert_allclose(np.asarray(f(TOKENS))[row], mixed[row], atol=1e-5, rtol=0)
    assert np.abs(mixed[3] - np.asarray(base(TOKENS))[3]).max() > 0.05  # the adapters change the logits


def test_one_hot_is_the_merged_adapter_and_zero_the_base(setup):
    base, loras, m = setup
    for i, lora in enumerate(loras):
        got, want = flat_params(folded(m, np.eye(3)[i])), flat_params(adapters.merge(lora))
        assert sorted(got) == sorted(want)
        for path in want:
            assert got[path].dtype == want[path].dtype, path
            np.testing.assert_allclose(np.asarray(got[path]), np.asarray(want[path]), atol=1e-6, rtol=0, err_msg=path)
    zero, plain = flat_params(folded(m, np.zeros(3))), flat_params(base)
    assert all(zero[p] is plain[p] for p in plain)  # nothing added: the base's own arrays


def test_run_folded_equals_run_routed_and_folds_each_routing_once(setup):
    base, loras, m = setup
    before = jax.tree.map(np.asarray, flat_params(m))
    routing = routing_of(WEIGHTS)
    folds = FoldedModels(m)
    got = run_folded(m, routing, TOKENS, folds=folds)
    np.testing.assert_allclose(np.asarray(got), np.asarray(run_routed(m, routing, TOKENS)), atol=1e-5, rtol=0)
    assert len(folds) == 4  # rows 0 and 4 share one routing
    first = folds(WEIGHTS[0])
    again = run_folded(m, routing_of(WEIGHTS[::-1].copy()), TOKENS[::-1], folds=folds)
    assert len(folds) == 4 and folds(WEIGHTS[0]) is first
    assert folds(np.where(WEIGHTS[0] == 0, -0.0, WEIGHTS[0])) is first  # -0.0 is 0.0: the same fold
    np.testing.assert_array_equal(np.asarray(again), np.asarray(got)[::-1])
    for path, value in flat_params(m).items():  # the routed model is untouched
        np.testing.assert_array_equal(np.asarray(value), before[path], err_msg=path)


def test_errors_name_the_problem(setup):
    base, loras, m = setup
    with pytest.raises(RouteError, match="no row-weighted adapter modules"):
        folded(base, np.ones(3))
    with pytest.raises(RouteError, match="3 finite numbers"):
        folded(m, np.ones(2))
    with pytest.raises(RouteError, match="3 finite numbers"):
        folded(m, np.array([1.0, np.nan, 0.0]))
    with pytest.raises(RouteError, match="another model"):
        run_folded(m, routing_of(WEIGHTS), TOKENS, folds=FoldedModels(weighted_mix(base, loras)))
    with pytest.raises(RouteError, match="5 rows of ids for 4 routed queries"):
        run_folded(m, routing_of(WEIGHTS[:4]), TOKENS)


def test_weights_that_are_not_numbers_are_named(setup):
    """A string or ragged weights raised numpy's own ValueError."""
    _, _, m = setup
    for bad in ("abc", [1.0, [0.0, 1.0], 0.0]):
        with pytest.raises(RouteError, match=r"folded: weights must be 3 finite numbers \(one per adapter\), got "):
            folded(m, bad)


def test_run_folded_pads_each_group_to_a_power_of_two(setup):
    """Groups of 3, 1, 1 / 2, 2, 1 / 4, 1 rows run as 4, 1, 1 / 2, 2, 1 / 4, 1 rows (padded_rows): three forward
    programs for the three batches, where one per distinct group size would be four; the logits are run_routed's."""
    base, loras, m = setup
    a, b, c = WEIGHTS[0], WEIGHTS[2], WEIGHTS[3]
    batches = [np.stack(rows) for rows in ([a, a, a, b, c], [a, b, a, b, c], [a, a, b, a, a])]
    tokens = jnp.asarray(np.random.RandomState(1).randint(0, 61, (5, 7)))  # a length no other test compiles
    want = [np.asarray(run_routed(m, routing_of(w), tokens)) for w in batches]
    folds = FoldedModels(m)
    for w in (a, b, c):
        folds(w)  # the folds compiled and made before counting
    compiled = []

    def listener(event, seconds, **kw):
        if event == "/jax/core/compile/backend_compile_duration":
            compiled.append(kw.get("fun_name"))

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        got = [np.asarray(run_folded(m, routing_of(w), tokens, folds=folds)) for w in batches]
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, atol=1e-5, rtol=0)
    assert compiled.count("jit(model_forward)") == 3  # 4 and 1 rows (first batch), 2 (second), none (third)
    assert [padded_rows(n, 5) for n in (1, 2, 3, 4, 5)] == [1, 2, 4, 4, 5]
    assert [padded_rows(n, 64) for n in (5, 8, 9, 16, 17, 60, 64)] == [8, 8, 16, 16, 24, 64, 64]
