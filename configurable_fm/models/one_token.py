"""One-token matrix-vector products as Pallas kernels, for batch-1 decode on a GPU.

XLA's GPU simplifier rewrites a dot whose two operands hold fewer than 10M elements in all into multiply + reduce
(xla/service/gpu/gpu_algebraic_simplifier.cc, `IsMatrixMultiplicationTooSmallForRewriting`; the flag that once
turned it off, xla_gpu_enable_dot_strength_reduction, is gone: jaxlib 0.10.2 rejects it). For one token that
makes a (D, N) projection one reduction kernel, which on an H100 read the 1B shape's fused q/k/v (2048 x 3072)
and o_proj (2048 x 2048) weights at ~0.8 and ~1.2 TB/s, where the FFN's larger GEMMs reach ~2.5 TB/s
(BENCHMARKS.md, "One-token kernels"). Here the product is split over D (split-K), one tile per program, so that
many independent loads are in flight (the MoEfied FFN's one-token kernels do the same,
analysis/moefication/dispatch.py):
    P[s, n-block] = x[s-chunk] W[s-chunk, n-block]     float32, grid (N / bn, D / bd)
    y = sum_s P[s]                                      (XLA), in the compute dtype
The split is what makes it fast: one program per column block over the whole of D (no partials, no XLA sum after
it, SwiGLU's act(gate) * up in the same kernel) took the 135M step from 0.876 to 1.392 ms on an H100 (BENCHMARKS.md,
"One-token kernels for the attention projections"; built, measured and removed on 2026-12-05).
`rowvec` is the products of one tile: float32 products summed over the chunk (exact products of bf16 inputs).

`one_token_matmuls()` (a context read while tracing, like layers.fuse_projections) makes `matmul`, which
`layers.Linear` and `layers.fused_linears` call, take this path for x with one row when
min_elements <= D N < max_elements (below the upper bound XLA reduces; above the lower one, 2^18, the weights are
large enough for the split to pay) and the kernel can be compiled (a GPU) or is interpreted on request.
`models.generation.Generator` enters it for its decode loop (by default for a model on one device). Measured on
an H100 (BENCHMARKS.md, "One-token kernels"; benchmarks/one_token_h100_2026-12-05/): at the 1B shape, batch 1,
the fused q/k/v product 14.0 -> 6.3 us, o_proj 6.8 -> 4.6 us, the step 1.415 -> 1.123 ms; at the 135M shape
(every projection, 0.33-1.8M elements, in range) 1.008 -> 0.867 ms.
"""
from __future__ import annotations

import contextlib
import contextvars
import functools
import math
import os
from typing import Iterator, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

MIN_TILE = 16  # `matmul` leaves to XLA the shapes whose tiles would be smaller (e.g. D = 1000: chunks of 8 rows)
XLA_REDUCE_BELOW = 10_000_000  # XLA's strength-reduction bound: sum of both operands' elements (module docstring)


class OneTokenMatmuls(NamedTuple):
    """When `matmul` takes the kernel: min_elements <= D N < max_elements; tiles bn (out), bd (width); interpret
    None: compiled on a GPU, elsewhere not taken; True: interpreted anywhere (tests)."""
    min_elements: int = 1 << 18  # 2^21 left the 135M shape's products (0.33-1.8M elements) to XLA: 1.008 ms/step
    # against 0.867 with 2^18 (H100, BENCHMARKS.md "One-token kernels")
    max_elements: int = XLA_REDUCE_BELOW
    out: int = 64
    width: int = 128
    num_warps: int = 4
    layers: bool = True  # plain llama decoder layers as models/one_token_layer.py's five kernels (norms, RoPE,
    # the cache write, attention and SwiGLU in the products' prologues): 135M batch 1 0.866 -> 0.794 ms on an H200
    keys: int = 64  # cache slots per block of that attention kernel (a power of two at most); with split_cache 64
    # against 128: 0.652 against 0.670 ms per step at 135M on an H200 (one process; without the split, 128 was the
    # better: 0.789 against 0.821 ms on an H100), BENCHMARKS.md
    split_cache: bool = True  # that attention kernel with one program per head and cache block (flash-decoding),
    # the o_proj kernel's prologue combining the blocks: 135M batch 1 on an H200, 256 new tokens 0.672 -> 0.652 ms
    # per step, 1,024 new tokens 0.910 -> 0.660 ms
    residual_atomic: bool = True  # the layers' residual stream in float32, the o and down products added into it
    # by atomic adds (`accumulate`) instead of two XLA sums per layer: 135M batch 1 on an H100, 0.658 -> 0.637 ms
    # per step (A B A B in one process, BENCHMARKS.md). The order of those float32 additions varies between runs,
    # so a GPU decode is not bit-reproducible with it; False is (the sums in the compute dtype, as the modules), and
    # so is the decode when XLA is asked for deterministic ops (`deterministic_ops`)
    interpret: Optional[bool] = None


_ONE_TOKEN: contextvars.ContextVar[Optional[OneTokenMatmuls]] = contextvars.ContextVar("configurable_fm_one_token",
                                                                                       default=None)


@contextlib.contextmanager
def one_token_matmuls(enabled: bool = True, options: Optional[OneTokenMatmuls] = None) -> Iterator[None]:
    """Forwards traced inside the block run one-row products of in-range kernels with `one_token_matmul` (module
    docstring). Read while tracing, not part of jax.jit's cache key: enter it inside the jitted function."""
    token = _ONE_TOKEN.set((options or OneTokenMatmuls()) if enabled else None)
    try:
        yield
    finally:
        _ONE_TOKEN.reset(token)


def layer_options() -> tuple[OneTokenMatmuls, bool] | None:
    """(options, interpret) when the forward being traced should run whole decoder layers as one-token kernels
    (options.layers inside one_token_matmuls(); interpret as in `matmul`: None compiles them on a GPU only), else
    None."""
    options = _ONE_TOKEN.get()
    if options is None or not options.layers:
        return None
    if options.interpret is None:
        return (options, False) if jax.default_backend() == "gpu" else None
    return options, bool(options.interpret)


DETERMINISM_FLAGS = ("--xla_gpu_deterministic_ops=true", "--xla_gpu_exclude_nondeterministic_ops=true")


def deterministic_ops() -> bool:
    """Whether XLA_FLAGS asks XLA for deterministic GPU ops (DETERMINISM_FLAGS): then the one-token kernels keep
    their bit-reproducible forms (OneTokenMatmuls.residual_atomic is ignored)."""
    flags = os.environ.get("XLA_FLAGS", "").split()
    return any(f in flags for f in DETERMINISM_FLAGS)


def rowvec(v_N, w_NxC):
    """v (n,) @ w (n, c) -> (c,) float32: the float32 products summed over n (one tile of a one-token kernel)."""
    return jnp.sum(v_N.astype(jnp.float32)[:, None] * w_NxC.astype(jnp.float32), axis=0)


def power_of_two_tile(dim: int, bound: int) -> int:
    """The largest power of two <= bound dividing dim (Triton tiles are powers of two); 1 at least."""
    b = 1
    while b * 2 <= bound and dim % (b * 2) == 0:
        b *= 2
    return b


def tiles(d: int, widths, options: OneTokenMatmuls) -> tuple[int, int]:
    """(bn, bd): the column tile (a power of two <= options.out dividing every width) and the row chunk (<= width,
    dividing d) of `one_token_matmul`."""
    return power_of_two_tile(math.gcd(*widths), options.out), power_of_two_tile(d, options.width)


def _partials_kernel(*refs, load, n_inputs: int, bn: int, bd: int, starts: tuple[int, ...]):
    """Program (n, s): out[s, n-block] = v[s-chunk] W[s-chunk, n-block] of the concatenation [W_1 | W_2 | ...],
    v[s-chunk] = load(input refs, s * bd, bd); column block n lies in W_i for starts[i] <= n < starts[i + 1] (one
    branch taken per program)."""
    from jax.experimental import pallas as pl
    in_refs, w_refs, out_ref = refs[:n_inputs], refs[n_inputs:-1], refs[-1]
    n, s = pl.program_id(0), pl.program_id(1)
    start = pl.multiple_of(s * bd, bd)
    v = load(in_refs, start, bd)
    rows = pl.ds(start, bd)
    for w_ref, lo, hi in zip(w_refs, starts, starts[1:]):
        def block(w_ref=w_ref, lo=lo):
            out_ref[0] = rowvec(v, w_ref[rows, pl.ds(pl.multiple_of((n - lo) * bn, bn), bn)])
        if len(w_refs) == 1:
            block()
        else:
            pl.when((n >= lo) & (n < hi))(block)


def load_row(in_refs, start, size):
    """The default `partials` input: chunk [start, start + size) of the one row x (1, D)."""
    from jax.experimental import pallas as pl
    return in_refs[0][0, pl.ds(start, size)]


def whole(a):
    """A BlockSpec that hands every program the whole array."""
    from jax.experimental import pallas as pl
    return pl.BlockSpec(a.shape, lambda *_: (0,) * a.ndim)


def partials(inputs, w_DxN, *, options: OneTokenMatmuls = OneTokenMatmuls(), interpret: bool = False,
             load=load_row, name: str = "one_token_matmul"):
    """P (D / bd, N) float32, P[s, n-block] = v[s-chunk] W[s-chunk, n-block], so that v W = sum_s P[s] (module
    docstring). v is the (D,) vector that load(input refs, start, size) reads chunk by chunk inside the kernel from
    `inputs` (each handed whole to every program; by default x (1, D) itself: `load_row`), so an input's own
    computation (a norm, SwiGLU's act(gate) * up over the partials of the kernel before) runs in the product's
    prologue instead of a kernel of its own (models/one_token_layer.py). W: a (D, N) kernel or a sequence of
    (D, N_i) kernels read in place, as in `one_token_matmul`."""
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import triton as pltriton
    ws = list(w_DxN) if isinstance(w_DxN, (list, tuple)) else [w_DxN]
    d = ws[0].shape[0]
    widths = [w.shape[1] for w in ws]
    bn, bd = tiles(d, widths, options)
    starts = tuple(int(c) for c in np.cumsum([0] + [w // bn for w in widths]))
    n = sum(widths)
    return pl.pallas_call(
        functools.partial(_partials_kernel, load=load, n_inputs=len(inputs), bn=bn, bd=bd, starts=starts),
        out_shape=jax.ShapeDtypeStruct((d // bd, n), jnp.float32), grid=(n // bn, d // bd),
        in_specs=[whole(a) for a in inputs] + [whole(w) for w in ws],
        out_specs=pl.BlockSpec((1, bn), lambda j, s: (s, j)), interpret=interpret, name=name,
        compiler_params=None if interpret else pltriton.CompilerParams(num_warps=options.num_warps, num_stages=1))(
        *inputs, *ws)


def _accumulate_kernel(*refs, load, n_inputs: int, bn: int, bd: int, biased: bool):
    """Program (n, s): into[0, n-block] += v[s-chunk] W[s-chunk, n-block] (+ b[n-block] in the s = 0 program), an
    atomic float32 add (refs: inputs, W, [b,] into (aliased to the output), out)."""
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import triton as pltriton
    in_refs, w_ref, out_ref = refs[:n_inputs], refs[n_inputs], refs[-1]
    n, s = pl.program_id(0), pl.program_id(1)
    start = pl.multiple_of(s * bd, bd)
    cols = pl.ds(pl.multiple_of(n * bn, bn), bn)
    y = rowvec(load(in_refs, start, bd), w_ref[pl.ds(start, bd), cols])
    if biased:
        y = y + jnp.where(s == 0, refs[n_inputs + 1][cols].astype(jnp.float32), 0.0)
    pltriton.atomic_add(out_ref, (pl.ds(0, 1), cols), y[None, :])


def accumulate(inputs, w_DxN, into_1xN, bias_N=None, *, options: OneTokenMatmuls = OneTokenMatmuls(),
               interpret: bool = False, load=load_row, name: str = "one_token_accumulate"):
    """into + v W (+ b): (1, N) float32, `into` (1, N) float32 updated in place (aliased to the output): the split-K
    products of `partials`, each program adding its tile's v[s-chunk] W[s-chunk, n-block] into the output by an
    atomic float32 add instead of writing a partial row that an XLA sum reduces (models/one_token_layer.py's
    residual stream, OneTokenMatmuls.residual_atomic). v as in `partials` (`load` over `inputs`); W one (D, N)
    kernel; the bias is added once, by the programs of the first chunk. The order of the float32 additions is the
    order in which the programs finish: equal to v W + into up to that order (not bit-reproducible on a GPU)."""
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import triton as pltriton
    d, n = w_DxN.shape
    bn, bd = tiles(d, [n], options)
    extra = [] if bias_N is None else [bias_N]
    ins = list(inputs) + [w_DxN] + extra + [into_1xN]
    return pl.pallas_call(
        functools.partial(_accumulate_kernel, load=load, n_inputs=len(inputs), bn=bn, bd=bd, biased=bias_N is not None),
        out_shape=jax.ShapeDtypeStruct((1, n), jnp.float32), grid=(n // bn, d // bd),
        in_specs=[whole(a) for a in ins], out_specs=whole(into_1xN), input_output_aliases={len(ins) - 1: 0},
        interpret=interpret, name=name,
        compiler_params=None if interpret else pltriton.CompilerParams(num_warps=options.num_warps, num_stages=1))(
        *ins)


def one_token_matmul(x_1xD, w_DxN, *, options: OneTokenMatmuls = OneTokenMatmuls(), interpret: bool = False):
    """y (1, N) = x W in x's dtype (module docstring); x (1, D) and W (D, N) in the compute dtype. W may be a
    sequence [W_1, W_2, ...] of (D, N_i) kernels: y = x [W_1 | W_2 | ...] (N = sum N_i), the concatenation never
    written (one kernel reads each W_i where it lies)."""
    parts = partials([x_1xD], w_DxN, options=options, interpret=interpret)
    return jnp.sum(parts, axis=0, keepdims=True).astype(x_1xD.dtype)


def matmul(x, kernel):
    """x @ kernel (x (..., D), kernel (D, N) or a sequence of (D, N_i) kernels standing for their concatenation
    along columns, one dtype): `one_token_matmul` inside `one_token_matmuls()` when x has one row, the kernel is in
    range (module docstring) and its tiles hold MIN_TILE at least, else jnp.dot (of the concatenation)."""
    kernels = list(kernel) if isinstance(kernel, (list, tuple)) else [kernel]
    options = _ONE_TOKEN.get()
    d, n = kernels[0].shape[0], sum(k.shape[-1] for k in kernels)
    take = (options is not None and x.size == x.shape[-1] and all(k.ndim == 2 for k in kernels)
            and options.min_elements <= d * n < options.max_elements
            and min(tiles(d, [k.shape[-1] for k in kernels], options)) >= MIN_TILE)
    interpret = options.interpret if take else None
    if take and interpret is None:
        take, interpret = jax.default_backend() == "gpu", False
    if not take:
        return jnp.dot(x, kernels[0] if len(kernels) == 1 else jnp.concatenate(kernels, axis=1))
    y = one_token_matmul(x.reshape(1, d), kernels, options=options, interpret=interpret)
    return y.reshape(x.shape[:-1] + (n,))
