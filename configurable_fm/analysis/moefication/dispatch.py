"""Dispatching forwards of a MoEfied FFN (module.py): only the shared and the chosen experts are computed, so a
decode step reads (S + k) / E of the FFN's weights instead of all of them (issue 13's sparse-FFN speed-up).

    fast = with_dispatch(moe, "pallas")            # a new model; `moe` itself keeps its modes
    out = generate(fast, ids, max_new_tokens=64)   # the tokens of generate(moe, ...)

`MoefiedMLP.dispatch` is a runtime execution choice, like llama's `remat`: it is not one of the module's `options`,
not in its structure spec and not in a checkpoint (a loaded model computes 'masked'):
    masked   every expert computed, the unchosen ones masked (module.py): training, taps of every expert, the oracle
    gather   the chosen experts' weights gathered (jnp.take) and only those computed; plain XLA, any backend. The
             gather copies the chosen weights before the matmuls read them (about 3x their bytes in memory traffic)
    pallas   two Pallas kernels (below) that read only the chosen experts' weight blocks from memory: compiled with
             Triton on a GPU, run with interpret=True on any other backend (slow: for tests)
Both dispatching modes need scores from x alone: routers 'centroid' and 'mlp' (the router is called with no
activations); the oracle router scores the experts by their activations, so every expert must be computed.
They are for inference (decode): there is no straight-through term (module.py), so the routing gets no gradient.

Math, for N tokens x (N, D) (the input (..., D) flattened), E experts of m neurons, the first S shared, top_k = k:
    s = router(x) (N, R);  c = expert_mask(s) (N, E)     (the masked forward's top-k: the same experts, ties to the
                                                          lower index, shared experts always on)
    Q = min(E, S + N k) slots;  idx (Q,) = the experts some token uses, ascending, then expert 0 as padding
    w (N, Q) = c[:, idx], 0 on padding slots (padding happens only when the N tokens use fewer than Q experts;
               never for N = 1, where idx = the S shared and the k chosen experts)
    h_q = act(x G_{idx_q} + b^g_{idx_q}) * (x U_{idx_q} + b^u_{idx_q})   (N, m)      [GPT-2: act(x U + b^u)]
    y = sum_q w_{:, q} h_q D_{idx_q} + b^d                                 (N, D)
equal to the masked forward up to the order of float sums. When Q = E (top_k = R, or many tokens: a prefill) no
expert can be skipped and the masked computation runs (same value). The weights read per call are Q / E of the
FFN's. Compute dtype as MoefiedMLP.expert_hidden / combine: the module's dtype, else x's.

Taps in the dispatching modes: the module's `input` and `output`, `<path>.router_logits` s (..., R) and
`<path>.router.{input, output}`; `<path>.hidden` is not emitted (the skipped experts' activations do not exist).

Pallas kernels (`expert_hidden_kernel`, `expert_combine_kernel`): tokens padded to a multiple of the token block
bn (the smallest power of two >= N, clipped to [16, PallasOptions.tokens]: Triton's dot needs 16 rows); grids
    hidden:  (slot q, neuron block j of bm, token block t)   h[q, t, j] = act(x_t G_e[:, j]) * (x_t U_e[:, j]),
             e = idx[q] loaded inside the kernel; the D reduction in a loop over chunks of bd rows, float32 accumulate
    combine: (slot q, output block o of bo, token block t)   p[q, t, o] = (w_q h_q)_t D_e[:, o], over chunks of bk
             neurons; y = sum_q p[q] + b^d outside the kernel (float32 partial sums, one per slot: more programs)
    h = act(gate) * up is computed in float32 and stored in the compute dtype (the masked path rounds gate and up to
    the compute dtype first: in bfloat16 the two differ by rounding).
For one token (decode at batch 1) idx comes straight from lax.top_k (token_slots), w = 1.
The weights stay whole arrays in memory and each program loads the blocks of expert idx[q] by dynamic indexing
(`ref[e, pl.ds(...), pl.ds(...)]`): the Triton backend has no scalar prefetch for data-dependent block specs.
Block sizes (PallasOptions): each is the largest power of two <= its bound that divides its dimension (Triton loads need
power-of-two shapes) and, compiled, at least 16 (Triton's dot); a shape without such a block raises ValueError.
Defaults: bm <= 32 neurons, bd <= 256 of D, bo <= 32 of D, bk <= 64 neurons, bn <= 64 tokens, 4 warps, 2 stages.

One token (decode at batch 1; PallasOptions.decode, on by default): the general kernels loop over chunks of D (or
of neurons) inside each program, one dependent memory load after another, and pad the token to 16 rows; measured
on an H100 they read the chosen experts at 35-45% of the copy bandwidth. The one-token kernels loop nowhere: every
program reads one tile, so there are many programs with independent loads in flight (split-K):
    partials (`decode_partials_kernel`), grid (slot q, neuron block j of bm, D chunk s of bd):
        P^g[q, s, j-block] = x[s-chunk] G_e[s-chunk, j-block],  P^u likewise with U_e   (float32; e = idx_q)
    out (`decode_out_kernel`), grid (slot q, neuron block k of bk, output block o of bo):
        h_q[k-block] = act(sum_s P^g[q, s, k-block] + b^g) * (sum_s P^u[q, s, k-block] + b^u), rounded to the
        compute dtype;  p[q, k, o-block] = h_q[k-block] D_e[k-block, o-block]   (float32)
    y = sum_{q, k} p[q, k] + b^d (XLA), in the compute dtype.
    route (`route_kernel`, one program; PallasOptions.route, on by default), for the centroid router with R routed
        experts a power of two and no tap context active: s_r = sum_d x_d C_{d r} in float32 (the router's
        <x / ||x||, c_r> times ||x|| > 0: the same ranking, up to rounding), then the k largest by k rounds of
        (max, the lowest index holding it, set to -inf): lax.top_k's choice and order, ties to the lower index;
        idx = (0 .. S-1, S + the chosen). It replaces the router's, top-k's and the slot list's XLA kernels.
        Otherwise idx comes from the router and token_slots as in the general path (so taps and interventions on
        router_logits apply).
Each product v w (v (n,), w (n, c)) is, by PallasOptions.matvec, the float32 products summed over n (1, the
default: no padding, any power-of-two tile) or a Triton dot of v repeated on 16 rows (0: tiles >= 16; the rows
are equal, so their max is the product exactly). Tiles (PallasOptions.token_*, each the largest power of two <= its
bound dividing its dimension): bm <= 64 neurons, bd <= 128 of D, bk <= 128 neurons, bo <= 64 of D, the best of six
sets measured on an H100 (1B shape, top 4 of 16: partials 7.9 us, out 6.5 us per FFN, against 15.2 + 9.6 us for
the general kernels; BENCHMARKS.md "Sparse FFN decode").
"""
from __future__ import annotations

import functools
import warnings
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
from flax import nnx
from jax.experimental import pallas as pl

from configurable_fm.analysis.moefication.module import MoefiedMLP, expert_activations, expert_sum
from configurable_fm.models.layers import activation
from configurable_fm.models.moe import expert_weight
from configurable_fm.models.one_token import deterministic_ops, power_of_two_tile, rowvec, whole
from configurable_fm.models.taps import active as taps_active, tap

MODES = ("masked", "gather", "pallas")
DISPATCHING = ("gather", "pallas")
DOT_MIN = 16  # Triton's dot: every operand dimension >= 16
# Activations the Pallas Triton lowering cannot express (jax 0.10-0.11): compiled, such a layer runs gather_ffn.
NO_TRITON_ACT = {"gelu": "the exact gelu needs erfc, which the Pallas Triton lowering does not implement"}


class PallasOptions(NamedTuple):
    """Upper bounds of the Pallas tile sizes (module docstring), the Triton launch options and whether to interpret
    the kernels (None: interpreted off GPU; False forces Triton, e.g. to lower for CUDA on a CPU host)."""
    neurons: int = 32      # bm: expert neurons per program of the hidden kernel
    width: int = 256       # bd: chunk of D in the hidden kernel's reduction loop
    out: int = 32          # bo: output columns (of D) per program of the combine kernel
    inner: int = 64        # bk: chunk of neurons in the combine kernel's reduction loop
    tokens: int = 64       # bn: most token rows per program
    num_warps: int = 4
    num_stages: int = 2
    decode: int = 1        # one token (decode at batch 1): 1 runs the one-token kernels (below), 0 the general ones
    matvec: int = 1        # one-token kernels: 1 float32 products summed, 0 Triton dots on the row repeated 16 times
    token_neurons: int = 64   # one-token tiles (the best of six measured on an H100, 1B shape, BENCHMARKS.md):
    token_width: int = 128    # partials (neurons x width of G_e, U_e) and out (inner neurons x out columns of D_e)
    token_inner: int = 128
    token_out: int = 64
    token_route: int = 512    # route_kernel: chunk of D per load (its loads are independent: one program)
    route_warps: int = 4      # route_kernel's Triton warps (its one program reads the whole centroid kernel)
    route: int = 1            # one token, centroid router: 1 routes in route_kernel, 0 with XLA (router, top-k)
    atomic: int = 0           # one token: 1 the out kernel adds its products into y (1, D) float32 by atomic adds
    # (no XLA sum of the (Q, m / bk, D) partials after it; the order of the additions varies between runs; ignored
    # when XLA_FLAGS asks for deterministic ops, models.one_token.deterministic_ops, as the one-token layers do)
    interpret: Optional[bool] = None


# ------------------------------------------------------------------------------------------------ the model switch
def check_dispatch(layer: MoefiedMLP, mode: str, path: str = "") -> None:
    """ValueError naming `path` when `layer` cannot run `mode`."""
    where = f"{path}: " if path else ""
    if mode not in MODES:
        raise ValueError(f"{where}dispatch={mode!r} is unknown; choose one of {list(MODES)}")
    if mode in DISPATCHING and layer.router_kind == "oracle":
        raise ValueError(f"{where}dispatch={mode!r} needs a router that scores from x alone ('centroid' or 'mlp'); "
                         "the 'oracle' router scores the experts by their activations, so every expert is computed "
                         "(use dispatch='masked')")


def with_dispatch(model, mode: str, *, pallas: Optional[PallasOptions] = None):
    """A copy of `model` (nnx.clone: new modules and variables sharing the arrays; `model` is unchanged) whose every
    MoefiedMLP computes in `mode` ('masked', 'gather' or 'pallas', module docstring), with Pallas tile bounds
    `pallas` (default PallasOptions()). ValueError naming the layer for a bad mode or an oracle router, and when the
    model has no MoefiedMLP."""
    if pallas is not None and not isinstance(pallas, PallasOptions):
        raise ValueError(f"pallas must be a dispatch.PallasOptions, got {type(pallas).__name__}")
    layers = [(".".join(str(k) for k in p), m) for p, m in nnx.iter_modules(model) if isinstance(m, MoefiedMLP)]
    if not layers:
        raise ValueError(f"with_dispatch: {type(model).__name__} has no MoEfied FFN; MoEfy it first")
    for path, layer in layers:
        check_dispatch(layer, mode, path)
        if mode == "pallas":
            check_pallas_blocks(layer, pallas or PallasOptions(), path)
    copy = nnx.clone(model)
    for _, layer in nnx.iter_modules(copy):
        if isinstance(layer, MoefiedMLP):
            layer.dispatch = mode
            layer.dispatch_options = pallas
    return copy


def check_pallas_blocks(layer: MoefiedMLP, options: PallasOptions, path: str = "") -> None:
    """ValueError naming `path` when the compiled kernels have no blocks for `layer`'s shapes (module docstring);
    nothing to check when the kernels will be interpreted."""
    interpret = jax.default_backend() != "gpu" if options.interpret is None else options.interpret
    if interpret:
        return
    _, d, m = layer.up_proj.get_value().shape
    blocks = [(m, options.neurons, "the expert width m"), (d, options.width, "the model width D"),
              (d, options.out, "the model width D"), (m, options.inner, "the expert width m")]
    if options.decode and not options.matvec:  # the one-token kernels' Triton dots need tiles of 16 too
        blocks += [(m, options.token_neurons, "the expert width m"), (d, options.token_width, "the model width D"),
                   (m, options.token_inner, "the expert width m"), (d, options.token_out, "the model width D")]
    try:
        for dim, bound, name in blocks:
            _block(dim, bound, name, DOT_MIN)
    except ValueError as e:
        raise ValueError(f"{path}: {e}" if path else str(e)) from None


# ------------------------------------------------------------------------------------------------ routing
def chosen_slots(mask_NxE, slots: int):
    """(idx (Q,) int32, w (N, Q) float32): the experts any token uses, ascending, padded with expert 0 of weight 0
    to Q = `slots`; w[n, q] = mask[n, idx[q]] (module docstring)."""
    used_E = jnp.any(mask_NxE > 0, axis=0)
    (idx_Q,) = jnp.nonzero(used_E, size=slots, fill_value=0)
    valid_Q = jnp.arange(slots) < jnp.sum(used_E)
    return idx_Q.astype(jnp.int32), jnp.take(mask_NxE, idx_Q, axis=1) * valid_Q.astype(jnp.float32)


def token_slots(scores_R, num_shared: int, top_k: int):
    """idx (S + k,) int32 for one token: the shared experts, then the routed ones by lax.top_k (top_k_mask's choice:
    the same experts), without the union's mask and sort (fewer small kernels per decode step)."""
    _, top = jax.lax.top_k(scores_R, top_k)
    return jnp.concatenate([jnp.arange(num_shared, dtype=jnp.int32), num_shared + top.astype(jnp.int32)])


def routes_in_kernel(layer: MoefiedMLP) -> bool:
    """Whether one token's slots can come from `route_kernel` (module docstring, 'One token'): the centroid router,
    a power-of-two number of routed experts (a Triton tile) and no tap context active (router_logits is then not
    computed, so it could be neither read nor replaced)."""
    r = layer.num_routed
    return layer.router_kind == "centroid" and r & (r - 1) == 0 and not taps_active()


def dispatched(layer: MoefiedMLP, x):
    """y (..., D) of `layer` in its dispatch mode (module docstring); called by MoefiedMLP.__call__."""
    check_dispatch(layer, layer.dispatch)
    d = x.shape[-1]
    x_NxD = x.reshape(-1, d)
    n = x_NxD.shape[0]
    slots = min(layer.num_experts, layer.num_shared + n * layer.top_k)
    options = getattr(layer, "dispatch_options", None) or PallasOptions()
    one_token = layer.dispatch == "pallas" and n == 1 and slots < layer.num_experts and options.decode
    if one_token and options.route and routes_in_kernel(layer):  # the centroid router: routing in a kernel too
        y = decode_ffn(layer, x_NxD, None, options=options)
        return y.reshape(x.shape[:-1] + (y.shape[-1],))
    scores = tap(layer, "router_logits", layer.router(x, None).astype(jnp.float32))  # centroid / mlp: x alone
    if slots == layer.num_experts:  # no expert can be skipped: the masked computation (same value)
        y = layer.combine(layer.expert_hidden(x_NxD), layer.expert_mask(scores).reshape(n, -1))
    else:
        if n == 1:  # decode at batch 1
            idx_Q, w_NxQ = token_slots(scores.reshape(-1), layer.num_shared, layer.top_k), jnp.ones((1, slots))
        else:
            idx_Q, w_NxQ = chosen_slots(layer.expert_mask(scores).reshape(n, -1), slots)
        if layer.dispatch == "gather":
            y = gather_ffn(layer, x_NxD, idx_Q, w_NxQ)
        elif one_token:
            y = decode_ffn(layer, x_NxD, idx_Q, options=options)
        else:
            y = pallas_ffn(layer, x_NxD, idx_Q, w_NxQ, options=options)
    return y.reshape(x.shape[:-1] + (y.shape[-1],))


def _weights(layer: MoefiedMLP):
    """{name: array or None} of the layer's expert weights, in their parameter dtype (cast after the gather, or
    inside the kernels, so that only the chosen experts are converted); an unmerged expert LoRA's change is added
    first (float32, every expert: merge it for inference speed)."""
    get = lambda v: None if v is None else v[...]  # noqa: E731
    weight = lambda name: expert_weight(layer, name)  # noqa: E731  (with an unmerged expert LoRA's change)
    return dict(gate=weight("gate_proj"), up=weight("up_proj"), down=weight("down_proj"),
                gate_bias=get(layer.gate_bias), up_bias=get(layer.up_bias), down_bias=get(layer.down_bias))


# ------------------------------------------------------------------------------------------------ gather (XLA)
def gather_ffn(layer: MoefiedMLP, x_NxD, idx_Q, w_NxQ):
    """y (N, D) = sum_q w_{:, q} h_q D_{idx_q} + b^d, the chosen experts' weights gathered with jnp.take (then the
    masked forward's own arithmetic: module.expert_activations / expert_sum on the Q gathered experts)."""
    dtype = layer.dtype or x_NxD.dtype
    wts = _weights(layer)
    take = lambda a: None if a is None else jnp.take(a, idx_Q, axis=0).astype(dtype)  # noqa: E731
    h_NxQxM = expert_activations(x_NxD, take(wts["up"]), take(wts["up_bias"]), take(wts["gate"]),
                                 take(wts["gate_bias"]), act=layer.act, dtype=dtype)
    return expert_sum(h_NxQxM, w_NxQ, take(wts["down"]), wts["down_bias"])


# ------------------------------------------------------------------------------------------------ Pallas
def _block(dim: int, bound: int, name: str, least: int) -> int:
    """The largest power of two <= bound dividing dim; ValueError when it is below `least`."""
    b = power_of_two_tile(dim, bound)
    if b < least:
        raise ValueError(f"pallas dispatch: {name} {dim} has no power-of-two block in [{least}, {bound}] dividing "
                         f"it (Triton needs power-of-two tiles of at least {DOT_MIN} for its dot); use "
                         "dispatch='gather'")
    return b


def _token_block(n: int, bound: int) -> int:
    """bn: the smallest power of two >= n, clipped to [DOT_MIN, bound] (bound a power of two >= DOT_MIN)."""
    b = DOT_MIN
    while b < n and b < bound:
        b *= 2
    return b


def _padded_token_block(n: int, bound: int) -> int:
    """bn = _token_block(n, bound) for kernel inputs of n token rows; ValueError unless bn divides n (the kernels
    take inputs padded to a multiple of it: pallas_ffn pads them)."""
    bn = _token_block(n, bound)
    if n % bn:
        raise ValueError(f"pallas dispatch: {n} token rows are not a multiple of the token block {bn}: pad them "
                         "(pallas_ffn does)")
    return bn


def _expert_refs(refs, gated: bool, biased: bool):
    """(gate, up, gate bias, up bias) from a kernel's refs in the order the wrappers pass them (absent ones None)."""
    refs = list(refs)
    gate = refs.pop(0) if gated else None
    up = refs.pop(0)
    gate_bias = refs.pop(0) if gated and biased else None
    up_bias = refs.pop(0) if biased else None
    return gate, up, gate_bias, up_bias


def _hidden_kernel(idx_ref, x_ref, *refs, act, gated: bool, biased: bool, bm: int, bd: int):
    """One program: h[q, t-block, j-block] for expert e = idx[q] (module docstring)."""
    h_ref = refs[-1]
    gate_ref, up_ref, gate_bias_ref, up_bias_ref = _expert_refs(refs[:-1], gated, biased)
    q, j, t = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    bn = h_ref.shape[1]
    e = idx_ref[q]
    cols = pl.ds(pl.multiple_of(j * bm, bm), bm)
    toks = pl.ds(pl.multiple_of(t * bn, bn), bn)

    def body(i, acc):
        rows = pl.ds(pl.multiple_of(i * bd, bd), bd)
        x_bnxbd = x_ref[toks, rows]
        dot = lambda w_ref: jnp.dot(x_bnxbd, w_ref[e, rows, cols].astype(x_bnxbd.dtype),  # noqa: E731
                                    preferred_element_type=jnp.float32)
        up = acc[-1] + dot(up_ref)
        return (acc[0] + dot(gate_ref), up) if gated else (up,)

    zero = jnp.zeros((bn, bm), jnp.float32)
    acc = jax.lax.fori_loop(0, x_ref.shape[1] // bd, body, (zero, zero) if gated else (zero,))
    up = acc[-1] if up_bias_ref is None else acc[-1] + up_bias_ref[e, cols].astype(jnp.float32)[None, :]
    if gated:
        gate = acc[0] if gate_bias_ref is None else acc[0] + gate_bias_ref[e, cols].astype(jnp.float32)[None, :]
        h = act(gate) * up
    else:
        h = act(up)
    h_ref[0] = h.astype(h_ref.dtype)


def _combine_kernel(idx_ref, w_ref, h_ref, down_ref, out_ref, *, bk: int):
    """One program: p[q, t-block, o-block] = (w_q h_q)[t-block] D_{idx[q]}[:, o-block] (module docstring)."""
    q, o, t = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    bn, bo = out_ref.shape[1], out_ref.shape[2]
    e = idx_ref[q]
    cols = pl.ds(pl.multiple_of(o * bo, bo), bo)
    toks = pl.ds(pl.multiple_of(t * bn, bn), bn)
    w_bnx1 = w_ref[q, toks].astype(jnp.float32)[:, None]

    def body(i, acc):
        ks = pl.ds(pl.multiple_of(i * bk, bk), bk)
        h = h_ref[q, toks, ks]
        h = (h.astype(jnp.float32) * w_bnx1).astype(h.dtype)  # the masked path's h * c, in the compute dtype
        return acc + jnp.dot(h, down_ref[e, ks, cols].astype(h.dtype), preferred_element_type=jnp.float32)

    out_ref[0] = jax.lax.fori_loop(0, h_ref.shape[2] // bk, body, jnp.zeros((bn, bo), jnp.float32))


def _compiler_params(options: PallasOptions, interpret: bool):
    if interpret:
        return None
    from jax.experimental.pallas import triton as pltriton
    return pltriton.CompilerParams(num_warps=options.num_warps, num_stages=options.num_stages)


def expert_hidden_kernel(idx_Q, x_NxD, gate_ExDxM, up_ExDxM, gate_bias_ExM=None, up_bias_ExM=None, *, act,
                         options: PallasOptions = PallasOptions(), interpret: bool = False):
    """h (Q, N', m) in x's dtype: h[q] = act(x G_{idx_q} + b^g) * (x U_{idx_q} + b^u) (gate None: act(x U + b^u));
    x (N', D) with N' a multiple of the token block (`pallas_ffn` pads it). Reads only experts idx's weights."""
    q = idx_Q.shape[0]
    n, d = x_NxD.shape
    m = up_ExDxM.shape[-1]
    least = 1 if interpret else DOT_MIN
    bn = _padded_token_block(n, options.tokens)
    bm = _block(m, options.neurons, "the expert width m", least)
    bd = _block(d, options.width, "the model width D", least)
    gated, biased = gate_ExDxM is not None, up_bias_ExM is not None
    ins = [idx_Q, x_NxD] + ([gate_ExDxM] if gated else []) + [up_ExDxM] + \
        ([gate_bias_ExM] if gated and biased else []) + ([up_bias_ExM] if biased else [])
    kernel = functools.partial(_hidden_kernel, act=act, gated=gated, biased=biased, bm=bm, bd=bd)
    return pl.pallas_call(
        kernel, out_shape=jax.ShapeDtypeStruct((q, n, m), x_NxD.dtype), grid=(q, m // bm, n // bn),
        in_specs=[whole(a) for a in ins], out_specs=pl.BlockSpec((1, bn, bm), lambda qq, j, t: (qq, t, j)),
        interpret=interpret, compiler_params=_compiler_params(options, interpret), name="moe_expert_hidden")(*ins)


def expert_combine_kernel(idx_Q, w_QxN, h_QxNxM, down_ExMxD, *, options: PallasOptions = PallasOptions(),
                          interpret: bool = False):
    """p (Q, N', D) float32: p[q] = (w_q h_q) D_{idx_q}, w (Q, N') the tokens' weights of each slot (the sum over q
    is left to the caller); reads only experts idx's down rows."""
    q, n, m = h_QxNxM.shape
    d = down_ExMxD.shape[-1]
    least = 1 if interpret else DOT_MIN
    bn = _padded_token_block(n, options.tokens)
    bo = _block(d, options.out, "the model width D", least)
    bk = _block(m, options.inner, "the expert width m", least)
    return pl.pallas_call(
        functools.partial(_combine_kernel, bk=bk), out_shape=jax.ShapeDtypeStruct((q, n, d), jnp.float32),
        grid=(q, d // bo, n // bn), in_specs=[whole(a) for a in (idx_Q, w_QxN, h_QxNxM, down_ExMxD)],
        out_specs=pl.BlockSpec((1, bn, bo), lambda qq, o, t: (qq, t, o)),
        interpret=interpret, compiler_params=_compiler_params(options, interpret), name="moe_expert_combine")(
        idx_Q, w_QxN, h_QxNxM, down_ExMxD)


def _interpret(layer: MoefiedMLP, options: PallasOptions, interpret: Optional[bool]) -> Optional[bool]:
    """Whether the kernels run interpreted (options, else True off GPU); None when, compiled, the activation has no
    Triton lowering (NO_TRITON_ACT: the caller falls back to gather_ffn, with a warning)."""
    interpret = options.interpret if interpret is None else interpret
    interpret = jax.default_backend() != "gpu" if interpret is None else interpret
    if not interpret and layer.act in NO_TRITON_ACT:
        warnings.warn(f"pallas dispatch: activation {layer.act!r}: {NO_TRITON_ACT[layer.act]}; this FFN runs the "
                      "gather path instead")
        return None
    return interpret


def pallas_ffn(layer: MoefiedMLP, x_NxD, idx_Q, w_NxQ, *, options: Optional[PallasOptions] = None,
               interpret: Optional[bool] = None):
    """y (N, D) = sum_q w_{:, q} h_q D_{idx_q} + b^d with the two Pallas kernels (module docstring); interpret
    defaults to True off GPU. Compiled, an activation in NO_TRITON_ACT falls back to gather_ffn (with a warning)."""
    options = options or PallasOptions()
    interpret = _interpret(layer, options, interpret)
    if interpret is None:
        return gather_ffn(layer, x_NxD, idx_Q, w_NxQ)
    dtype = layer.dtype or x_NxD.dtype
    wts = _weights(layer)
    n = x_NxD.shape[0]
    bn = _token_block(n, options.tokens)
    padded = -(-n // bn) * bn
    x = jnp.pad(x_NxD.astype(dtype), ((0, padded - n), (0, 0)))
    h_QxNxM = expert_hidden_kernel(idx_Q, x, wts["gate"], wts["up"], wts["gate_bias"], wts["up_bias"],
                                   act=activation(layer.act), options=options, interpret=interpret)
    w_QxN = jnp.pad(w_NxQ.T.astype(jnp.float32), ((0, 0), (0, padded - n)))
    p_QxNxD = expert_combine_kernel(idx_Q, w_QxN, h_QxNxM, wts["down"], options=options, interpret=interpret)
    y = jnp.sum(p_QxNxD, axis=0)[:n].astype(dtype)
    return y if wts["down_bias"] is None else y + wts["down_bias"].astype(dtype)


# ------------------------------------------------------------------------------------------------ one token
def _rowvec(v_N, w_NxC, matvec: bool):
    """v (n,) @ w (n, c) -> (c,) float32 (module docstring, 'One token'): the float32 products summed over n, or a
    Triton dot of v repeated on DOT_MIN rows (all equal, so their max is the product exactly)."""
    if matvec:
        return rowvec(v_N, w_NxC)
    rows = jnp.broadcast_to(v_N[None, :], (DOT_MIN, v_N.shape[0]))
    return jnp.max(jnp.dot(rows, w_NxC.astype(v_N.dtype), preferred_element_type=jnp.float32), axis=0)


def _decode_partial_kernel(idx_ref, x_ref, *refs, gated: bool, bm: int, bd: int, matvec: bool):
    """One program (q, j, s): the s-th chunk's partial sums x[s-chunk] G_e[s-chunk, j-block] (and U_e), e = idx_q."""
    n = 2 if gated else 1
    gate_ref, up_ref, _, _ = _expert_refs(refs[:n], gated, False)
    gate_out, up_out, _, _ = _expert_refs(refs[n:], gated, False)
    q, j, s = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    e = idx_ref[q]
    cols = pl.ds(pl.multiple_of(j * bm, bm), bm)
    rows = pl.ds(pl.multiple_of(s * bd, bd), bd)
    x_bd = x_ref[0, rows]
    up_out[0, 0] = _rowvec(x_bd, up_ref[e, rows, cols], matvec)
    if gated:
        gate_out[0, 0] = _rowvec(x_bd, gate_ref[e, rows, cols], matvec)


def _decode_out_kernel(idx_ref, *refs, act, gated: bool, biased: bool, bk: int, bo: int, matvec: bool, dtype,
                       atomic: bool):
    """One program (q, k, o): h_q[k-block] from the partial sums, then its part h_q[k-block] D_e[k-block, o-block],
    written as p[q, k, o-block] or (atomic) added into y[0, o-block]."""
    if atomic:
        refs = refs[:-2] + refs[-1:]  # the zeros aliased to y: not read
    down_ref, out_ref = refs[-2:]
    gate_part, up_part, gate_bias_ref, up_bias_ref = _expert_refs(refs[:-2], gated, biased)
    q, k, o = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    e = idx_ref[q]
    ks = pl.ds(pl.multiple_of(k * bk, bk), bk)
    chunks = up_part.shape[1]

    def total(part_ref, bias_ref):  # sum over the D chunks (one load when their count is a power of two)
        if chunks & (chunks - 1) == 0:
            t = jnp.sum(part_ref[q, pl.ds(0, chunks), ks], axis=0)
        else:
            t = jax.lax.fori_loop(0, chunks, lambda i, a: a + part_ref[q, i, ks], jnp.zeros((bk,), jnp.float32))
        return t if bias_ref is None else t + bias_ref[e, ks].astype(jnp.float32)

    up = total(up_part, up_bias_ref)
    h = act(total(gate_part, gate_bias_ref)) * up if gated else act(up)
    cols = pl.ds(pl.multiple_of(o * bo, bo), bo)
    y = _rowvec(h.astype(dtype), down_ref[e, ks, cols], matvec)
    if atomic:  # out_ref: y (1, D), zeros aliased in
        from jax.experimental.pallas import triton as pltriton
        pltriton.atomic_add(out_ref, (pl.ds(0, 1), cols), y[None, :])
    else:
        out_ref[0, 0] = y


def decode_partials_kernel(idx_Q, x_1xD, gate_ExDxM, up_ExDxM, *, slots: Optional[int] = None,
                           options: PallasOptions = PallasOptions(), interpret: bool = False):
    """The partial sums (gate (Q, D / bd, m) or None, up (Q, D / bd, m)) float32 of one token x (1, D) against the
    slots' gate and up columns, one D chunk of bd rows per program (module docstring, 'One token'); Q = `slots`
    (default idx's length: route_kernel's idx is padded)."""
    q = idx_Q.shape[0] if slots is None else slots
    d = x_1xD.shape[1]
    m = up_ExDxM.shape[-1]
    least = 1 if interpret or options.matvec else DOT_MIN
    bm = _block(m, options.token_neurons, "the expert width m", least)
    bd = _block(d, options.token_width, "the model width D", least)
    gated = gate_ExDxM is not None
    ins = [idx_Q, x_1xD] + ([gate_ExDxM] if gated else []) + [up_ExDxM]
    part = jax.ShapeDtypeStruct((q, d // bd, m), jnp.float32)
    spec = pl.BlockSpec((1, 1, bm), lambda qq, j, s: (qq, s, j))
    outs = pl.pallas_call(
        functools.partial(_decode_partial_kernel, gated=gated, bm=bm, bd=bd, matvec=bool(options.matvec)),
        out_shape=(part, part) if gated else (part,), grid=(q, m // bm, d // bd), in_specs=[whole(a) for a in ins],
        out_specs=(spec, spec) if gated else (spec,), interpret=interpret,
        compiler_params=_compiler_params(options, interpret), name="moe_decode_partials")(*ins)
    return (outs[0], outs[1]) if gated else (None, outs[0])


def decode_out_kernel(idx_Q, gate_part, up_part, down_ExMxD, gate_bias_ExM=None, up_bias_ExM=None, *, act, dtype,
                      options: PallasOptions = PallasOptions(), interpret: bool = False):
    """p (Q, m / bk, D) float32: p[q, k] = h_q[k-block] D_{idx_q}[k-block, :], h_q = act(sum of the gate partials +
    b^g) * (sum of the up partials + b^u) rounded to `dtype` (module docstring, 'One token'); the caller sums p.
    With options.atomic, y = sum_{q, k} p[q, k] (1, D) float32 itself, each program adding its part into y by an
    atomic float32 add (the additions' order varies between runs on a GPU)."""
    q, _, m = up_part.shape
    d = down_ExMxD.shape[-1]
    least = 1 if interpret or options.matvec else DOT_MIN
    bk = _block(m, options.token_inner, "the expert width m", least)
    bo = _block(d, options.token_out, "the model width D", least)
    gated, biased = gate_part is not None, up_bias_ExM is not None
    ins = [idx_Q] + ([gate_part] if gated else []) + [up_part] + \
        ([gate_bias_ExM] if gated and biased else []) + ([up_bias_ExM] if biased else []) + [down_ExMxD]
    kernel = functools.partial(_decode_out_kernel, act=act, gated=gated, biased=biased, bk=bk, bo=bo,
                               matvec=bool(options.matvec), dtype=dtype, atomic=bool(options.atomic))
    if options.atomic:
        ins.append(jnp.zeros((1, d), jnp.float32))
        out_shape, out_spec, aliases = jax.ShapeDtypeStruct((1, d), jnp.float32), whole(ins[-1]), {len(ins) - 1: 0}
    else:
        out_shape = jax.ShapeDtypeStruct((q, m // bk, d), jnp.float32)
        out_spec, aliases = pl.BlockSpec((1, 1, bo), lambda qq, k, o: (qq, k, o)), {}
    return pl.pallas_call(
        kernel, out_shape=out_shape, grid=(q, m // bk, d // bo), in_specs=[whole(a) for a in ins], out_specs=out_spec,
        input_output_aliases=aliases, interpret=interpret, compiler_params=_compiler_params(options, interpret),
        name="moe_decode_out")(*ins)


def _route_kernel(x_ref, centroids_ref, idx_ref, *, shared: int, top_k: int, bd: int):
    """The one program of route_kernel: scores over static chunks of D (independent loads), then k rounds of (max,
    the lowest index holding it, set to -inf)."""
    d, r = centroids_ref.shape
    s_R = jnp.zeros((r,), jnp.float32)
    for i in range(d // bd):
        rows = pl.ds(i * bd, bd)
        s_R = s_R + rowvec(x_ref[0, rows], centroids_ref[rows, pl.ds(0, r)])
    iota_R = jax.lax.broadcasted_iota(jnp.int32, (r,), 0)
    slot_P = jax.lax.broadcasted_iota(jnp.int32, idx_ref.shape, 0)
    idx_P = jnp.where(slot_P < shared, slot_P, 0)
    for rank in range(top_k):
        best = jnp.max(s_R)
        i = jnp.minimum(jnp.min(jnp.where(s_R == best, iota_R, r)), r - 1)
        idx_P = jnp.where(slot_P == shared + rank, shared + i, idx_P)
        s_R = jnp.where(iota_R == i, -jnp.inf, s_R)
    idx_ref[...] = idx_P


def route_kernel(x_1xD, centroids_DxR, *, shared: int, top_k: int, options: PallasOptions = PallasOptions(),
                 interpret: bool = False):
    """idx (P,) int32 for one token from the centroid router's kernel (D, R), R a power of two: the S shared slots,
    then the top k routed experts in lax.top_k's order (module docstring, 'One token'); P = the smallest power of two
    >= S + k (a Triton tile), the slots after S + k hold 0 and are never read."""
    d, r = centroids_DxR.shape
    if r & (r - 1):
        raise ValueError(f"route_kernel: {r} routed experts is not a power of two (a Triton tile)")
    padded = 1 << (shared + top_k - 1).bit_length()
    bd = _block(d, options.token_route, "the model width D", 1)
    return pl.pallas_call(
        functools.partial(_route_kernel, shared=shared, top_k=top_k, bd=bd),
        out_shape=jax.ShapeDtypeStruct((padded,), jnp.int32), grid=(1,),
        in_specs=[whole(x_1xD), whole(centroids_DxR)], out_specs=pl.BlockSpec((padded,), lambda i: (0,)),
        interpret=interpret, compiler_params=_compiler_params(options._replace(num_warps=options.route_warps),
                                                               interpret), name="moe_decode_route")(
        x_1xD, centroids_DxR)


def decode_ffn(layer: MoefiedMLP, x_1xD, idx_Q=None, *, options: Optional[PallasOptions] = None,
               interpret: Optional[bool] = None):
    """y (1, D) = sum_q h_q D_{idx_q} + b^d for one token with the one-token kernels (module docstring); idx None:
    route_kernel finds the slots (routes_in_kernel must hold). Interpretation and the NO_TRITON_ACT fallback as
    pallas_ffn."""
    options = options or PallasOptions()
    if options.atomic and deterministic_ops():
        options = options._replace(atomic=0)
    interpret = _interpret(layer, options, interpret)
    slots = layer.num_shared + layer.top_k
    if interpret is None:
        if idx_Q is None:
            idx_Q = token_slots(layer.router(x_1xD, None).astype(jnp.float32).reshape(-1), layer.num_shared,
                                layer.top_k)
        return gather_ffn(layer, x_1xD, idx_Q, jnp.ones((1, slots)))
    dtype = layer.dtype or x_1xD.dtype
    wts = _weights(layer)
    if idx_Q is None:
        idx_Q = route_kernel(x_1xD, layer.router.kernel[...], shared=layer.num_shared,  # x as the router sees it
                             top_k=layer.top_k, options=options, interpret=interpret)
    gate_part, up_part = decode_partials_kernel(idx_Q, x_1xD.astype(dtype), wts["gate"], wts["up"], slots=slots,
                                                options=options, interpret=interpret)
    p = decode_out_kernel(idx_Q, gate_part, up_part, wts["down"], wts["gate_bias"], wts["up_bias"],
                          act=activation(layer.act), dtype=dtype, options=options, interpret=interpret)
    y = (p if options.atomic else jnp.sum(p, axis=(0, 1))[None, :]).astype(dtype)
    return y if wts["down_bias"] is None else y + wts["down_bias"].astype(dtype)
