"""The all-adapters LoRA path of mixed-adapter batches (bricks/adapters/mixed.py, issue 12) and bfloat16 factors.

The all-adapters path (every adapter's down-projection, one-hot selection, no per-row copies of the factors) and
the gather path give the same values: the kernels against a per-row numpy loop on small tensors (extra position
axes, BASE_ID and out-of-range ids); the logits of the mix of test_adapter_mixed (LoRA, rsLoRA, DoRA, IA3, another
LoRA rank, base rows) within 1e-5 relative (float32); each row equals its adapter alone and base rows the base bit
for bit on either path; greedy generation gives the same tokens whether prefill and decode take the paths the
shapes choose or the gather path everywhere. The decode shape takes the new path and gathers no factors (read off
the jaxpr). `mix(..., factor_dtype=jnp.bfloat16)` stores bfloat16 factors and matches the float32 mix within
bfloat16 tolerance.
"""
import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configurable_fm.bricks import adapters
from configurable_fm.bricks.adapters import mixed as mx
from configurable_fm.models import check_consistent, extension_specs, generation
from configurable_fm.models.factory import with_compute_dtype
from tests.bricks import test_adapter_mixed
from tests.bricks.test_adapter_mixed import CASES, CFG, ROW_IDS, TOKENS, adapted
from tests.helpers import random_llama

REL = 1e-5
base, singles, mixed = test_adapter_mixed.base, test_adapter_mixed.singles, test_adapter_mixed.mixed  # its fixtures


def logits(model, ids, use, tokens=TOKENS):
    return np.asarray(mx.with_small_batch_path(mx.with_adapter_ids(model, ids), use)(tokens))


def rel_diff(a, b):
    return np.abs(a - b).max() / np.abs(b).max()


# ------------------------------------------------------------------------------------------ the rule
def test_the_path_is_chosen_from_shapes():
    assert mx.SMALL_BATCH_ROWS == 128 and mx.SMALL_BATCH_ADAPTERS_PER_ROW == 2
    assert mx.uses_small_batch_path(64, 64, 64)  # issue 12's decode step: 64 rows x 1 token, 64 adapters
    assert not mx.uses_small_batch_path(64 * 512, 64, 64)  # its 512-token batch: the gather path
    assert mx.uses_small_batch_path(128, 128, 256) and not mx.uses_small_batch_path(129, 129, 2)
    assert not mx.uses_small_batch_path(1, 1, 64)  # one row over 64 adapters: reading them all costs more
    assert mx.uses_small_batch_path(4 * 16, 4, 8) and not mx.uses_small_batch_path(4, 4, 9)


# ------------------------------------------------------------------------------------------ the kernels
def per_row_reference(x, a, b, ids):
    """(x A[i]) B[i] row by row in float64; 0 for ids outside 0..N-1."""
    out = np.zeros(x.shape[:-1] + (b.shape[2],))
    for row, i in enumerate(ids):
        if 0 <= i < a.shape[0]:
            out[row] = (x[row].astype(np.float64) @ a[i]) @ b[i]
    return out


_all_adapters, _gathered = jax.jit(mx.lora_all_adapters), jax.jit(mx.lora_gathered)  # a program each, not op by op


@pytest.mark.parametrize("lead", [(), (5,), (2, 3)])  # (B, in), (B, T, in), (B, T1, T2, in)
def test_kernels_equal_a_per_row_loop(lead):
    rng = np.random.RandomState(0)
    ids = np.asarray([2, mx.BASE_ID, 0, 3, 2, 7])  # 7: out of range (all-adapters path: 0)
    x = rng.randn(len(ids), *lead, 6).astype(np.float32)
    a, b = rng.randn(4, 6, 3).astype(np.float32), rng.randn(4, 3, 5).astype(np.float32)
    want = per_row_reference(x, a, b, ids)
    got = np.asarray(_all_adapters(jnp.asarray(x), jnp.asarray(a), jnp.asarray(b), jnp.asarray(ids)))
    assert got.shape == want.shape and got.dtype == np.float32
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(got[[1, 5]], 0)
    gathered = np.asarray(_gathered(jnp.asarray(x), jnp.asarray(a), jnp.asarray(b), jnp.asarray(np.clip(ids, 0, 3))))
    valid = [0, 2, 3, 4]
    np.testing.assert_allclose(gathered[valid], want[valid], rtol=1e-5, atol=1e-5)
    bf = _all_adapters(jnp.asarray(x, jnp.bfloat16), jnp.asarray(a), jnp.asarray(b), jnp.asarray(ids))
    assert bf.dtype == jnp.bfloat16  # factors cast to x's dtype


def test_the_selection_is_exact():
    """xa is exactly the row's own x A[i]: with B = 0 except one unit entry, the output is that product."""
    rng = np.random.RandomState(1)
    x, a = rng.randn(3, 6).astype(np.float32), rng.randn(4, 6, 2).astype(np.float32)
    b = np.zeros((4, 2, 4), np.float32)
    b[1, 1, 3] = 1.0
    got = np.asarray(mx.lora_all_adapters(jnp.asarray(x), jnp.asarray(a), jnp.asarray(b), jnp.asarray([1, 1, 0])))
    want = np.asarray(jnp.dot(jnp.asarray(x), jnp.asarray(a[1])))[:, 1]
    np.testing.assert_array_equal(got[:2, 3], want[:2])
    np.testing.assert_array_equal(got[2], 0)


# ------------------------------------------------------------------------------------------ the model
def test_both_paths_give_each_row_its_adapter(base, mixed):
    """The paths agree; test_adapter_mixed checks every row against its adapter alone on the default path, which
    for its 8 rows x 7 tokens over 5 adapters is the all-adapters path (asserted here)."""
    small, gather = logits(mixed, ROW_IDS, True), logits(mixed, ROW_IDS, False)
    assert rel_diff(small, gather) <= REL
    np.testing.assert_array_equal(logits(mixed, ROW_IDS, None), small)  # 8 rows x 7 tokens, 5 adapters: small
    base_out = np.asarray(base(TOKENS))
    for b, i in enumerate(ROW_IDS):
        if i == mx.BASE_ID:
            np.testing.assert_array_equal(small[b], base_out[b])
            np.testing.assert_array_equal(gather[b], base_out[b])


def test_the_setting_is_runtime_only(mixed):
    on = mx.with_small_batch_path(mixed, True)
    assert all(m.small_batch_path is True for m in mx.mixed_modules(on).values())
    kept = mx.with_adapter_ids(on, ROW_IDS)  # later pure functions keep it
    assert all(m.small_batch_path is True for m in mx.mixed_modules(kept).values())
    assert all(m.small_batch_path is None for m in mx.mixed_modules(mixed).values())  # untouched
    assert extension_specs(on) == extension_specs(mixed)  # not in the structure spec (nor in checkpoints)
    assert on.layers[0].self_attn.v_proj.lora_a.get_value() is mixed.layers[0].self_attn.v_proj.lora_a.get_value()
    check_consistent(on, "test")
    assert nnx.split(on)[0] != nnx.split(mx.with_small_batch_path(mixed, False))[0]  # two programs
    with pytest.raises(adapters.AdapterError, match=r"use must be True, False or None, got 'gather'"):
        mx.with_small_batch_path(mixed, "gather")
    with pytest.raises(adapters.AdapterError, match=r"use must be True, False or None, got 1"):
        mx.with_small_batch_path(mixed, 1)
    with pytest.raises(adapters.AdapterError, match=r"with_small_batch_path: the model has no mixed-adapter"):
        mx.with_small_batch_path(random_llama(CFG, 0), True)


def gathers(jaxpr) -> list[tuple]:
    """Output shapes of every gather in `jaxpr` and its sub-jaxprs."""
    out = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "gather":
            out += [tuple(v.aval.shape) for v in eqn.outvars]
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            out += gathers(sub)
    return out


def test_decode_shape_gathers_no_factors(mixed):
    """A decode step's input (B rows x 1 position) takes the all-adapters path: the only gather left is s[ids]
    (B,); the gather path, forced, copies A[ids] (B, in, r) and B[ids] (B, r, out)."""
    ids = [0, 4, 1, 4, -1, 0, 2, 1]
    q = mx.with_adapter_ids(mixed, ids).layers[0].mlp.gate_proj  # LoRA only (adapter 4, rank 8)
    x = jnp.ones((len(ids), 1, CFG.hidden_size))
    auto = gathers(jax.make_jaxpr(lambda x: q(x))(x).jaxpr)
    assert auto == [(len(ids),)]
    q.small_batch_path = False
    forced = gathers(jax.make_jaxpr(lambda x: q(x))(x).jaxpr)
    assert (len(ids), CFG.hidden_size, 8) in forced and (len(ids), 8, CFG.intermediate_size) in forced


def test_out_of_range_traced_ids_are_nan_on_both_paths(mixed):
    graphdef, state = nnx.split(mixed)

    def run(use):
        return np.asarray(jax.jit(lambda st, ids, t: mx.with_small_batch_path(
            mx.with_adapter_ids(nnx.merge(graphdef, st), ids), use)(t))(state, jnp.asarray([0, 5, -2, 1, 2, 3, 4, -1]),
                                                                        TOKENS))

    bad = {use: run(use) for use in (True, False)}  # one compilation per path
    for use in (True, False):
        assert np.isnan(bad[use][1]).all() and np.isnan(bad[use][2]).all(), use
        assert np.isfinite(bad[use][[0, 3, 4, 5, 6, 7]]).all(), use
    np.testing.assert_allclose(bad[True][[0, 3, 7]], bad[False][[0, 3, 7]], atol=1e-5, rtol=0)


@pytest.mark.slow  # CI time: two generate compilations (~10 s)
def test_generation_gives_the_same_tokens_on_both_paths(mixed):
    """Prompts of 20 tokens: prefill (8 x 20 = 160 rows) takes the gather path and decode (8 x 1) the all-adapters
    path, against the gather path everywhere."""
    tokens = jnp.asarray(np.random.RandomState(3).randint(0, CFG.vocab_size, (len(ROW_IDS), 20)))
    assert not mx.uses_small_batch_path(tokens.size, len(ROW_IDS), len(CASES))
    assert mx.uses_small_batch_path(len(ROW_IDS), len(ROW_IDS), len(CASES))
    model = mx.with_adapter_ids(mixed, ROW_IDS)
    auto = np.asarray(generation.generate(model, tokens, max_new_tokens=8))
    gather = np.asarray(generation.generate(mx.with_small_batch_path(model, False), tokens, max_new_tokens=8))
    np.testing.assert_array_equal(auto, gather)
    assert len({tuple(row[20:]) for row in auto}) >= 4  # the adapters make the rows differ


# ------------------------------------------------------------------------------------------ bfloat16 factors
def test_bfloat16_factors(base, singles, mixed):
    low = mx.mix(base, singles, factor_dtype=jnp.bfloat16)
    for m in mx.mixed_modules(low).values():
        if m.lora_a is not None:
            assert m.lora_a.get_value().dtype == m.lora_b.get_value().dtype == jnp.bfloat16
            assert isinstance(m.lora_a, adapters.LoRAParam)
        for vec in (m.lora_magnitude, m.lora_weight_norm, m.ia3_in, m.ia3_out):  # N x out vectors: as they were
            assert vec is None or vec.get_value().dtype == jnp.float32
        assert m.lora_scale is None or m.lora_scale.get_value().dtype == jnp.float32
    v, v32 = low.layers[0].self_attn.v_proj, mixed.layers[0].self_attn.v_proj
    assert v.lora_a.get_metadata()["out_sharding"] == v32.lora_a.get_metadata()["out_sharding"]
    np.testing.assert_array_equal(np.asarray(v.lora_a[...].astype(jnp.float32)),
                                  np.asarray(v32.lora_a[...].astype(jnp.bfloat16).astype(jnp.float32)))
    np.testing.assert_array_equal(v.lora_weight_norm[...], v32.lora_weight_norm[...])  # from the own factors
    check_consistent(low, "test")
    ref = logits(mixed, ROW_IDS, None)
    for use in (True, False):
        out = logits(low, ROW_IDS, use)
        assert 1e-6 < rel_diff(out, ref) <= 1e-2, use  # bfloat16 rounding of the factors (2^-9 relative)
        base_rows = [b for b, i in enumerate(ROW_IDS) if i == mx.BASE_ID]
        np.testing.assert_array_equal(out[base_rows], ref[base_rows])
    assert rel_diff(logits(low, ROW_IDS, True), logits(low, ROW_IDS, False)) <= REL


@pytest.mark.slow
def test_bfloat16_factors_with_bfloat16_compute(base):
    """The serving setting: bfloat16 compute (with_compute_dtype before attaching: it makes every parameter
    float32 master weights, stacked factors included) and bfloat16 factors. Both paths agree within bfloat16
    rounding, and the bfloat16 factors stay as close to the float32 model as the float32 factors under bfloat16
    compute (measured: 2.8e-2 and 3.2e-2 of the largest logit; the paths agree bit for bit on CPU)."""
    served = with_compute_dtype(base, jnp.bfloat16)
    singles = [adapted(served, n) for n in (0, 1, 4)]  # LoRA only
    low = mx.mix(served, singles, factor_dtype="bfloat16")
    assert low.layers[0].mlp.gate_proj.lora_b.get_value().dtype == jnp.bfloat16
    assert with_compute_dtype(low, jnp.bfloat16).layers[0].mlp.gate_proj.lora_b.get_value().dtype == jnp.float32
    ids = [0, 1, 2, -1, 2, 0, 1, 2]

    def f32(model, use):
        return logits(model, ids, use).astype(np.float32)

    small, gather = f32(low, True), f32(low, False)
    float32_factors = f32(mx.mix(served, singles), None)
    want = f32(mx.mix(base, [adapted(base, n) for n in (0, 1, 4)]), None)  # float32 throughout
    assert rel_diff(small, gather) <= 1e-2
    assert rel_diff(small, want) <= max(1.5 * rel_diff(float32_factors, want), 1e-2)


def test_factor_dtype_errors(base, singles):
    for bad in (jnp.int32, jnp.bool_, "nope"):
        with pytest.raises(adapters.AdapterError, match=r"mix: factor_dtype must be a floating dtype"):
            mx.mix(base, singles[:1], factor_dtype=bad)


@pytest.mark.slow  # CI time (orbax)
def test_bfloat16_factors_round_trip_as_float32(base, singles, tmp_path):
    """A checkpoint restores the parameters in load_model's dtype: the factors come back float32 with the same
    values, so float32 logits are unchanged."""
    from configurable_fm.interop.orbax_io import load_model, save_model

    low = mx.mix(base, singles, factor_dtype=jnp.bfloat16, ids=ROW_IDS)
    restored = load_model(save_model(low, tmp_path / "ckpt"))
    a = restored.layers[1].self_attn.q_proj.lora_a.get_value()
    assert a.dtype == jnp.float32
    np.testing.assert_array_equal(a, low.layers[1].self_attn.q_proj.lora_a.get_value().astype(jnp.float32))
    np.testing.assert_array_equal(np.asarray(restored(TOKENS)), np.asarray(low(TOKENS)))
