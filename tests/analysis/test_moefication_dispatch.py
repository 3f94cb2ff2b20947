"""Dispatching MoEfied FFNs (configurable_fm/analysis/moefication/dispatch.py): the gather path and the Pallas kernels
(interpret=True on CPU) compute the masked forward (float32, 1e-5) for several (E, shared, top_k), with ties in the
router scores, for one token and several; greedy generation gives the same tokens; with_dispatch leaves its input
alone and names bad modes and oracle routers; the kernels lower to Triton for CUDA (no GPU needed); the out kernel's
atomic adds give way to XLA's determinism flags."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configurable_fm.analysis import capture
from configurable_fm.analysis.moefication import PallasOptions, moefy, with_dispatch
from configurable_fm.analysis.moefication.dispatch import (chosen_slots, decode_out_kernel, decode_partials_kernel,
                                                           expert_combine_kernel, expert_hidden_kernel, pallas_ffn,
                                                           route_kernel, routes_in_kernel, token_slots)
from configurable_fm.bricks.paths import flat_params
from configurable_fm.models import extension_specs
from configurable_fm.models.generation import generate
from configurable_fm.models.layers import activation
from tests.analysis.tiny import GPT2, random_model
from tests.helpers import cuda_lowering

LLAMA = dict(family="llama", vocab_size=64, hidden_size=32, intermediate_size=128, num_layers=2, num_heads=4,
             num_kv_heads=2, max_position_embeddings=64)
IDS = np.random.RandomState(0).randint(0, 64, (8, 16)).astype(np.int32)
CALIBRATION = [{"inputs": IDS[i:i + 4]} for i in range(0, 8, 4)]
# (E, shared, top_k): m = 128 / E neurons per expert; shared experts come with split 'cmoe'
CASES = [(4, 0, 1), (8, 0, 3), (8, 2, 2), (16, 1, 4)]


@pytest.fixture(scope="module")
def dense():
    return random_model(LLAMA, 0)


@pytest.fixture(scope="module")
def moes(dense):
    out = {}
    for e, s, k in CASES:
        split = dict(split="cmoe", num_shared=s, calibration=CALIBRATION) if s else dict(split="random")
        out[e, s, k] = moefy(dense, num_experts=e, num_experts_per_tok=k, router="centroid", key=1, **split)
    return out


def with_tied_router(moe):
    """A copy whose layer 0 scores every routed expert alike (all ties: the first k win) and whose layer 1 has
    experts 1, 2 and 3 tied (columns 0..2 of its centroid kernel equal)."""
    tied = nnx.clone(moe)
    k0 = tied.layers[0].mlp.router.kernel
    k0.set_value(jnp.broadcast_to(k0[...][:, :1], k0[...].shape))
    k1 = tied.layers[1].mlp.router.kernel
    k1.set_value(k1[...].at[:, 1:3].set(k1[...][:, :1]))
    return tied


@nnx.jit
def _ffns(model, x):
    return [layer.mlp(x) for layer in model.layers]


@nnx.jit
def _gpt2_ffns(model, x):
    return [block.mlp(x) for block in model.h]


@nnx.jit
def _slots_both_ways(ffn, x):
    """(token_slots of the router's scores, route_kernel's slots) for one token, top 3 of 8 routed experts (one
    compiled program for every layer and seed instead of op-by-op dispatch and a retrace per call)."""
    want = token_slots(ffn.router(x, None)[0], 0, 3)
    got = route_kernel(x, ffn.router.kernel[...], shared=0, top_k=3, options=PallasOptions(token_route=8),
                       interpret=True)
    return want, got


@functools.partial(nnx.jit, static_argnames=("shared", "top_k"))
def _slots(ffn, x, shared, top_k):
    """(chosen_slots of the router's mask with S + k slots, token_slots of the scores) for one token x (1, D), as one
    compiled program (not op by op)."""
    scores = ffn.router(x, None)
    idx, w = chosen_slots(ffn.expert_mask(scores), shared + top_k)
    return idx, w, token_slots(scores[0], shared, top_k)


@nnx.jit
def _router_logits(model, ids):
    """capture of every layer's router_logits (under jit: one program; taps work under jit, see analysis/taps.py)."""
    return capture(model, ["layers.*.mlp.router_logits"], ids)[1]


def ffn_outputs(moe, mode, x):
    """Every layer's FFN output on x in `mode` (one compiled program: faster than op by op)."""
    return [np.asarray(y) for y in _ffns(moe if mode == "masked" else with_dispatch(moe, mode), x)]


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("case", [c if c == (8, 2, 2) else pytest.param(c, marks=pytest.mark.slow) for c in CASES])
def test_gather_and_pallas_compute_the_masked_ffn(moes, case, tied):  # CI: shared experts, with and without ties
    moe = with_tied_router(moes[case]) if tied else moes[case]
    rs = np.random.RandomState(3)
    e, s, k = case
    # a decode token; two tokens (S + 2k < E slots: the dispatching path, with padding slots when they share experts;
    # with S + N k >= E the masked computation runs: the prefill of test_greedy_generation_gives_the_same_tokens)
    assert s + 2 * k < e
    for shape in [(1, 1, 32), (2, 1, 32)]:
        x = jnp.asarray(rs.normal(size=shape), jnp.float32)
        want = ffn_outputs(moe, "masked", x)
        for mode in ("gather", "pallas"):
            for got, ref in zip(ffn_outputs(moe, mode, x), want):
                assert got.shape == shape
                np.testing.assert_allclose(got, ref, atol=1e-5, rtol=0, err_msg=f"{case} {mode} {shape}")


@pytest.mark.parametrize("options", [PallasOptions(), PallasOptions(matvec=0),
                                     # the general kernels: slow (CI time); they run on two tokens (shared
                                     # experts, ties) in test_gather_and_pallas_compute_the_masked_ffn
                                     pytest.param(PallasOptions(decode=0), marks=pytest.mark.slow),
                                     PallasOptions(token_neurons=4, token_width=8, token_inner=2, token_out=4,
                                                   token_route=8, route=0),
                                     PallasOptions(token_inner=8, token_out=8, atomic=1)],
                         ids=["one_token_products", "one_token_dots", "general", "one_token_small_tiles_xla_route",
                              "one_token_atomic_out"])
def test_one_token_kernels_compute_the_masked_ffn(moes, options):
    """Decode at batch 1: the one-token kernels (products or dots, one tile per program; the slots from route_kernel
    for 8 routed experts, from the router for 6) and the general kernels equal the masked forward, ties and shared
    experts included."""
    assert routes_in_kernel(moes[8, 0, 3].layers[0].mlp) and not routes_in_kernel(moes[8, 2, 2].layers[0].mlp)
    x = jnp.asarray(np.random.RandomState(7).normal(size=(1, 1, 32)), jnp.float32)
    for case in [(8, 0, 3), (8, 2, 2)]:
        for moe in (moes[case], with_tied_router(moes[case])):
            want = ffn_outputs(moe, "masked", x)
            got = _ffns(with_dispatch(moe, "pallas", pallas=options), x)
            for g, r in zip(got, want):
                np.testing.assert_allclose(np.asarray(g), r, atol=1e-5, rtol=0, err_msg=f"{case} {options}")


def test_atomic_out_gives_way_to_xla_determinism_flags(moes, monkeypatch):
    """PallasOptions(atomic=1) adds the out kernel's products atomically, unless XLA_FLAGS asks for deterministic
    ops (then the partials and their XLA sum, as the one-token layers do)."""
    fast = with_dispatch(moes[8, 0, 3], "pallas", pallas=PallasOptions(atomic=1))
    x = jnp.zeros((1, 1, 32), jnp.float32)
    atomic = lambda: "atomic_rmw" in str(jax.make_jaxpr(lambda x: fast.layers[0].mlp(x))(x))
    assert atomic()
    monkeypatch.setenv("XLA_FLAGS", "--xla_gpu_deterministic_ops=true")
    assert not atomic()


def test_one_token_partials_sum_to_the_projections(moes):
    """decode_partials_kernel's chunks of D sum to x G_e and x U_e of the slots' experts (float32, 1e-5)."""
    ffn = moes[8, 0, 3].layers[0].mlp
    x = jnp.asarray(np.random.RandomState(8).normal(size=(1, 32)), jnp.float32)
    idx = jnp.asarray([5, 0, 2], jnp.int32)
    gate, up = decode_partials_kernel(idx, x, ffn.gate_proj[...], ffn.up_proj[...],
                                      options=PallasOptions(token_width=8), interpret=True)
    assert gate.shape == up.shape == (3, 4, 16)
    for part, w in ((gate, ffn.gate_proj[...]), (up, ffn.up_proj[...])):
        want = np.einsum("d,qdm->qm", np.asarray(x[0]), np.asarray(w)[np.asarray(idx)])
        np.testing.assert_allclose(np.asarray(part).sum(axis=1), want, atol=1e-5, rtol=0)


def test_route_kernel_finds_the_router_slots(moes):
    """route_kernel's slots are token_slots' (lax.top_k's choice and order, ties to the lower index), padded to a
    power of two; inside a tap context the layer routes through the router (router_logits tapped)."""
    for moe in (moes[8, 0, 3], with_tied_router(moes[8, 0, 3])):
        for layer in moe.layers:
            ffn = layer.mlp
            for seed in range(3):
                x = jnp.asarray(np.random.RandomState(seed).normal(size=(1, 32)), jnp.float32)
                want, got = (np.asarray(a) for a in _slots_both_ways(ffn, x))
                np.testing.assert_array_equal(got, np.append(want, 0))
    ffn = moes[4, 0, 1].layers[0].mlp
    x = jnp.asarray(np.random.RandomState(9).normal(size=(1, 32)), jnp.float32)
    got = route_kernel(x, ffn.router.kernel[...], shared=2, top_k=2, interpret=True)  # S shared first, P = 4
    np.testing.assert_array_equal(np.asarray(got), np.asarray(token_slots(ffn.router(x, None)[0], 2, 2)))
    with pytest.raises(ValueError, match="6 routed experts is not a power of two"):
        route_kernel(x, jnp.zeros((32, 6)), shared=0, top_k=2, interpret=True)
    fast = with_dispatch(moes[8, 0, 3], "pallas")
    taps = _router_logits(fast, jnp.asarray(IDS[:1, :1]))
    assert sorted(taps) == ["layers.0.mlp.router_logits", "layers.1.mlp.router_logits"]


def test_ties_choose_the_lower_experts(moes):
    """With every routed score equal the first top_k routed experts (after the shared ones) are the slots."""
    moe = with_tied_router(moes[8, 2, 2])
    ffn = moe.layers[0].mlp
    x = jnp.asarray(np.random.RandomState(4).normal(size=(1, 32)), jnp.float32)
    idx, w, slots = _slots(ffn, x, shared=2, top_k=2)  # chosen_slots(mask, 4), token_slots(scores, 2, 2)
    np.testing.assert_array_equal(np.asarray(idx), [0, 1, 2, 3])
    np.testing.assert_array_equal(np.asarray(w), [[1, 1, 1, 1]])
    np.testing.assert_array_equal(np.asarray(slots), [0, 1, 2, 3])


def test_one_token_slots_are_the_masked_choice(moes):
    ffn = moes[16, 1, 4].layers[1].mlp
    x = jnp.asarray(np.random.RandomState(6).normal(size=(1, 32)), jnp.float32)
    want, _, idx = _slots(ffn, x, shared=1, top_k=4)  # chosen_slots(mask, 5), token_slots(scores, 1, 4)
    np.testing.assert_array_equal(np.sort(np.asarray(idx)), np.asarray(want))


def test_slots_are_the_union_of_the_tokens_choices():
    mask = jnp.asarray([[1, 0, 0, 1, 0, 0], [1, 0, 0, 1, 0, 0], [1, 1, 0, 0, 0, 0]], jnp.float32)
    # three experts used, two padding slots (expert 0, weight 0); jitted: one program, not op by op
    idx, w = jax.jit(chosen_slots, static_argnums=1)(mask, 5)
    np.testing.assert_array_equal(np.asarray(idx), [0, 1, 3, 0, 0])
    np.testing.assert_array_equal(np.asarray(w), [[1, 0, 1, 0, 0], [1, 0, 1, 0, 0], [1, 1, 0, 0, 0]])


def test_gpt2_gather_and_pallas_compute_the_masked_ffn():
    model = random_model(dict(GPT2, n_inner=64), 1)
    moe = moefy(model, num_experts=4, num_experts_per_tok=2, split="random", router="centroid", key=0)
    for shape in [(1, 2, 16), (1, 1, 16)]:  # two tokens; one (the one-token kernels, with biases, not gated)
        x = jnp.asarray(np.random.RandomState(5).normal(size=shape), jnp.float32)
        want = [np.asarray(y) for y in _gpt2_ffns(moe, x)]
        for mode in ("gather", "pallas"):
            got = [np.asarray(y) for y in _gpt2_ffns(with_dispatch(moe, mode), x)]
            for g, r in zip(got, want):
                np.testing.assert_allclose(g, r, atol=1e-5, rtol=0, err_msg=f"{mode} {shape}")


def test_greedy_generation_gives_the_same_tokens(moes):
    moe = moes[8, 0, 3]
    prompt = IDS[:1, :6]
    want = np.asarray(generate(moe, prompt, max_new_tokens=6))
    np.testing.assert_array_equal(np.asarray(generate(with_dispatch(moe, "gather"), prompt, max_new_tokens=6)), want)
    np.testing.assert_array_equal(np.asarray(generate(with_dispatch(moe, "pallas"), prompt, max_new_tokens=3)),
                                  want[:, :9])


def test_with_dispatch_leaves_its_input_unchanged(moes):
    moe = moes[8, 2, 2]
    before = {k: np.array(v) for k, v in flat_params(moe).items()}
    fast = with_dispatch(moe, "gather", pallas=PallasOptions(neurons=16))
    assert [layer.mlp.dispatch for layer in moe.layers] == ["masked", "masked"]
    assert [layer.mlp.dispatch for layer in fast.layers] == ["gather", "gather"]
    assert fast.layers[0].mlp.dispatch_options == PallasOptions(neurons=16)
    assert extension_specs(fast) == extension_specs(moe)  # a runtime choice: not in the structure (checkpoints)
    after = flat_params(moe)
    assert all(np.array_equal(before[k], np.asarray(after[k])) for k in before)
    assert with_dispatch(fast, "masked").layers[1].mlp.dispatch == "masked"


def test_dispatching_taps_router_logits(moes):
    fast = with_dispatch(moes[8, 0, 3], "gather")
    taps = _router_logits(fast, jnp.asarray(IDS[:1, :4]))
    assert sorted(taps) == ["layers.0.mlp.router_logits", "layers.1.mlp.router_logits"]
    assert np.asarray(taps["layers.0.mlp.router_logits"]).shape == (1, 4, 8)


def test_bad_mode_and_oracle_router_raise(dense, moes):
    with pytest.raises(ValueError, match=r"layers\.0\.mlp: dispatch='sparse' is unknown"):
        with_dispatch(moes[4, 0, 1], "sparse")
    oracle = moefy(dense, num_experts=4, num_experts_per_tok=1, split="random", router="oracle", key=0)
    with pytest.raises(ValueError, match=r"layers\.0\.mlp: dispatch='pallas' needs a router that scores from x alone"):
        with_dispatch(oracle, "pallas")
    assert with_dispatch(oracle, "masked").layers[0].mlp.dispatch == "masked"
    with pytest.raises(ValueError, match="has no MoEfied FFN"):
        with_dispatch(dense, "gather")
    with pytest.raises(ValueError, match="pallas must be a dispatch.PallasOptions"):
        with_dispatch(moes[4, 0, 1], "pallas", pallas=(16, 16))


def test_compiled_kernels_need_power_of_two_blocks_of_16(moes):
    ffn = moes[16, 1, 4].layers[0].mlp  # m = 8 neurons per expert: no block of 16
    x = jnp.zeros((1, 32), jnp.float32)
    with pytest.raises(ValueError, match="the expert width m 8 has no power-of-two block in \\[16, 32\\]"):
        pallas_ffn(ffn, x, jnp.arange(5, dtype=jnp.int32), jnp.ones((1, 5)), interpret=False)
    with pytest.raises(ValueError, match=r"layers\.0\.mlp: pallas dispatch: the expert width m 8"):
        with_dispatch(moes[16, 1, 4], "pallas", pallas=PallasOptions(interpret=False))
    dots = PallasOptions(interpret=False, matvec=0, token_width=8)  # m = 16 fits; a width tile of 8 does not
    with pytest.raises(ValueError, match=r"layers\.0\.mlp: pallas dispatch: the model width D 32 has no"):
        with_dispatch(moes[8, 0, 3], "pallas", pallas=dots)
    with_dispatch(moes[8, 0, 3], "pallas", pallas=dots._replace(matvec=1))  # products take any tile


def test_kernels_lower_to_triton_for_cuda():
    """The 1B shape's kernels (E = 16, D = 2048, m = 512, bf16) lower for CUDA on any host: the Triton lowering
    accepts the dynamic expert index, the block shapes and the dot (compilation to PTX happens on the GPU)."""
    e, d, m, q = 16, 2048, 512, 4
    bf = jnp.bfloat16
    spec = jax.ShapeDtypeStruct

    def ffn(idx, w, x, gate, up, down):
        h = expert_hidden_kernel(idx, x, gate, up, act=activation("silu"), interpret=False)
        return expert_combine_kernel(idx, w, h, down, interpret=False)

    text = cuda_lowering(jax.jit(ffn), spec((q,), jnp.int32), spec((q, 16), jnp.float32), spec((16, d), bf),
                         spec((e, d, m), bf), spec((e, d, m), bf), spec((e, m, d), bf))
    assert text.count("__gpu$xla.gpu.triton") == 2


@pytest.mark.parametrize("matvec,atomic", [(1, 0), (0, 0), (1, 1)])
def test_one_token_kernels_lower_to_triton_for_cuda(matvec, atomic):
    """The 1B shape's one-token kernels (E = 16, top 4, D = 2048, m = 512, bf16) lower for CUDA, with products and
    with dots, and with the out kernel's atomic adds."""
    e, d, m, k = 16, 2048, 512, 4
    bf = jnp.bfloat16
    spec = jax.ShapeDtypeStruct
    options = PallasOptions(matvec=matvec, atomic=atomic, interpret=False)

    def ffn(centroids, x, gate, up, down):
        idx = route_kernel(x, centroids, shared=0, top_k=k, options=options)
        gate_part, up_part = decode_partials_kernel(idx, x, gate, up, options=options)
        return decode_out_kernel(idx, gate_part, up_part, down, act=activation("silu"), dtype=bf, options=options)

    text = cuda_lowering(jax.jit(ffn), spec((d, e), bf), spec((1, d), bf), spec((e, d, m), bf), spec((e, d, m), bf),
                         spec((e, m, d), bf))
    assert text.count("__gpu$xla.gpu.triton") == 3


def test_a_decode_step_lowers_to_triton_for_cuda(moes):
    """One cached decode step of a pallas-dispatched model (PallasOptions(interpret=False): Triton even on a CPU
    host) lowers for CUDA with the three one-token kernels per layer."""
    fast = with_dispatch(moes[4, 0, 1], "pallas", pallas=PallasOptions(interpret=False))
    graphdef, state = nnx.split(fast)

    def step(state, tok_Bx1):
        model = nnx.merge(graphdef, state)
        return model(tok_Bx1, cache=model.init_cache(1, 8))[0]

    text = cuda_lowering(jax.jit(step), state, jnp.zeros((1, 1), jnp.int32))
    assert text.count("__gpu$xla.gpu.triton") == 3 * LLAMA["num_layers"]  # route, partials, out
    assert "top_k" not in text.lower()  # the routing is route_kernel's (centroid router, 4 routed experts)
