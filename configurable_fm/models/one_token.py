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
`rowvec` is the products of one tile: float32 products summed over the chunk (exact products of bf16 inputs).

`one_token_matmuls()` (a context read while tracing, like layers.fuse_projections) makes `matmul`, which
`layers.Linear` and `layers.fused_linears` call, take this path for x with one row when
min_elements <= D N < max_elements (below the upper bound XLA reduces; above the lower one, 2^18, the weights are
large enough for the split to pay) and the kernel can be compiled (a GPU) or is interpreted on request.
For D N < whole_below (an option, off by default until measured) the product is one program per column block
over the whole of D instead (`whole_column_matmul`: no partials, no XLA sum), and SwiGLU's act(x W_g) * (x W_u)
one such kernel (`gated_matmul`, through layers.gated_product), so that a small layer runs fewer kernels.
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
from typing import Iterator, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

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
    interpret: Optional[bool] = None
    whole_below: int = 0  # D N < whole_below: `whole_column_matmul` (no partials, no XLA sum); 0: never
    whole_out: int = 16  # its column tile


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


def rowvec(v_N, w_NxC):
    """v (n,) @ w (n, c) -> (c,) float32: the float32 products summed over n (one tile of a one-token kernel)."""
    return jnp.sum(v_N.astype(jnp.float32)[:, None] * w_NxC.astype(jnp.float32), axis=0)


def power_of_two_tile(dim: int, bound: int) -> int:
    """The largest power of two <= bound dividing dim (Triton tiles are powers of two); 1 at least."""
    b = 1
    while b * 2 <= bound and dim % (b * 2) == 0:
        b *= 2
    return b


def _partials_kernel(x_ref, *refs, bn: int, bd: int, starts: tuple[int, ...]):
    """Program (n, s): out[s, n-block] = x[s-chunk] W[s-chunk, n-block] of the concatenation [W_1 | W_2 | ...]:
    column block n lies in W_i for starts[i] <= n < starts[i + 1] (one branch taken per program)."""
    from jax.experimental import pallas as pl
    *w_refs, out_ref = refs
    n, s = pl.program_id(0), pl.program_id(1)
    rows = pl.ds(pl.multiple_of(s * bd, bd), bd)
    for w_ref, lo, hi in zip(w_refs, starts, starts[1:]):
        def block(w_ref=w_ref, lo=lo):
            out_ref[0] = rowvec(x_ref[0, rows], w_ref[rows, pl.ds(pl.multiple_of((n - lo) * bn, bn), bn)])
        if len(w_refs) == 1:
            block()
        else:
            pl.when((n >= lo) & (n < hi))(block)


def power_of_two_chunks(dim: int, bound: int) -> list[tuple[int, int]]:
    """[(start, size), ...] covering range(dim) with power-of-two sizes <= bound, largest first (Triton loads
    power-of-two tiles): 576, 128 -> 4 x 128 + 64."""
    chunks, start = [], 0
    while start < dim:
        size = 1 << min(bound.bit_length() - 1, (dim - start).bit_length() - 1)
        chunks.append((start, size))
        start += size
    return chunks


def _whole_kernel(x_ref, *refs, bn: int, chunks: tuple[tuple[int, int], ...], starts: tuple[int, ...]):
    """Program n: out[n-block] = sum over the chunks of x[chunk] W[chunk, n-block], rounded to out's dtype."""
    from jax.experimental import pallas as pl
    *w_refs, out_ref = refs
    n = pl.program_id(0)
    for w_ref, lo, hi in zip(w_refs, starts, starts[1:]):
        def block(w_ref=w_ref, lo=lo):
            cols = pl.ds(pl.multiple_of((n - lo) * bn, bn), bn)
            acc = sum(rowvec(x_ref[0, pl.ds(c0, c)], w_ref[pl.ds(c0, c), cols]) for c0, c in chunks)
            out_ref[0] = acc.astype(out_ref.dtype)
        if len(w_refs) == 1:
            block()
        else:
            pl.when((n >= lo) & (n < hi))(block)


def _column_blocks(ws, bound: int) -> tuple[list, int, tuple[int, ...], int]:
    """The kernels as a list, the column tile bn (a power of two dividing every width), the first block of each
    kernel (and the total), the total width N."""
    ws = list(ws) if isinstance(ws, (list, tuple)) else [ws]
    widths = [w.shape[1] for w in ws]
    bn = power_of_two_tile(math.gcd(*widths), bound)
    return ws, bn, tuple(int(c) for c in np.cumsum([0] + [w // bn for w in widths])), sum(widths)


def whole_column_matmul(x_1xD, w_DxN, *, options: OneTokenMatmuls = OneTokenMatmuls(), interpret: bool = False):
    """y (1, N) = x W like `one_token_matmul`, one program per column block reading the whole of D (power-of-two
    chunks of at most options.width rows, all loads independent) and writing y in x's dtype: no float32 partials
    and no XLA sum after it, for small D N where those cost more than the split's parallel loads save."""
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import triton as pltriton
    ws, bn, starts, n = _column_blocks(w_DxN, options.whole_out)
    d = ws[0].shape[0]
    return pl.pallas_call(
        functools.partial(_whole_kernel, bn=bn, chunks=tuple(power_of_two_chunks(d, options.width)), starts=starts),
        out_shape=jax.ShapeDtypeStruct((1, n), x_1xD.dtype), grid=(n // bn,),
        in_specs=[pl.BlockSpec(x_1xD.shape, lambda *_: (0, 0))] + [pl.BlockSpec(w.shape, lambda *_: (0, 0))
                                                                    for w in ws],
        out_specs=pl.BlockSpec((1, bn), lambda j: (0, j)), interpret=interpret, name="whole_column_matmul",
        compiler_params=None if interpret else pltriton.CompilerParams(num_warps=options.num_warps, num_stages=1))(
        x_1xD, *ws)


def one_token_matmul(x_1xD, w_DxN, *, options: OneTokenMatmuls = OneTokenMatmuls(), interpret: bool = False):
    """y (1, N) = x W in x's dtype (module docstring); x (1, D) and W (D, N) in the compute dtype. W may be a
    sequence [W_1, W_2, ...] of (D, N_i) kernels: y = x [W_1 | W_2 | ...] (N = sum N_i), the concatenation never
    written (one kernel reads each W_i where it lies)."""
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import triton as pltriton
    ws, bn, starts, n = _column_blocks(w_DxN, options.out)
    d = ws[0].shape[0]
    bd = power_of_two_tile(d, options.width)
    parts = pl.pallas_call(
        functools.partial(_partials_kernel, bn=bn, bd=bd, starts=starts),
        out_shape=jax.ShapeDtypeStruct((d // bd, n), jnp.float32), grid=(n // bn, d // bd),
        in_specs=[pl.BlockSpec(x_1xD.shape, lambda *_: (0, 0))] + [pl.BlockSpec(w.shape, lambda *_: (0, 0))
                                                                    for w in ws],
        out_specs=pl.BlockSpec((1, bn), lambda j, s: (s, j)), interpret=interpret, name="one_token_matmul",
        compiler_params=None if interpret else pltriton.CompilerParams(num_warps=options.num_warps, num_stages=1))(
        x_1xD, *ws)
    return jnp.sum(parts, axis=0, keepdims=True).astype(x_1xD.dtype)


def _gated_kernel(x_ref, g_ref, u_ref, out_ref, *, bn: int, chunks: tuple[tuple[int, int], ...], act):
    """Program n: out[n-block] = act(x W_g[:, n-block]) * (x W_u[:, n-block]), each product rounded to out's dtype
    first (as `layers.gated_product`'s unfused path rounds its matmul outputs), act in float32."""
    from jax.experimental import pallas as pl
    n = pl.program_id(0)
    cols = pl.ds(pl.multiple_of(n * bn, bn), bn)
    dtype = out_ref.dtype
    g = sum(rowvec(x_ref[0, pl.ds(c0, c)], g_ref[pl.ds(c0, c), cols]) for c0, c in chunks).astype(dtype)
    u = sum(rowvec(x_ref[0, pl.ds(c0, c)], u_ref[pl.ds(c0, c), cols]) for c0, c in chunks).astype(dtype)
    out_ref[0] = (act(g.astype(jnp.float32)).astype(dtype) * u).astype(dtype)


def gated_matmul(x_1xD, w_gate_DxF, w_up_DxF, act, *, options: OneTokenMatmuls = OneTokenMatmuls(),
                 interpret: bool = False):
    """h (1, F) = act(x W_gate) * (x W_up) in x's dtype (SwiGLU's hidden layer for one token): one program per block
    of neurons reads both kernels' columns over the whole of D (as `whole_column_matmul`), so gate and up never
    leave the kernel and no XLA kernel follows for act(gate) * up."""
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import triton as pltriton
    d, f = w_gate_DxF.shape
    bn = power_of_two_tile(f, options.whole_out)
    return pl.pallas_call(
        functools.partial(_gated_kernel, bn=bn, chunks=tuple(power_of_two_chunks(d, options.width)), act=act),
        out_shape=jax.ShapeDtypeStruct((1, f), x_1xD.dtype), grid=(f // bn,),
        in_specs=[pl.BlockSpec(a.shape, lambda *_: (0, 0)) for a in (x_1xD, w_gate_DxF, w_up_DxF)],
        out_specs=pl.BlockSpec((1, bn), lambda j: (0, j)), interpret=interpret, name="gated_matmul",
        compiler_params=None if interpret else pltriton.CompilerParams(num_warps=options.num_warps, num_stages=1))(
        x_1xD, w_gate_DxF, w_up_DxF)


def kernel_taken(x, kernels) -> Optional[tuple[OneTokenMatmuls, bool]]:
    """(options, interpret) when the product of x (..., D) with the (D, N_i) kernels takes a one-token kernel here
    (inside `one_token_matmuls()`, x one row, min_elements <= D N < max_elements, a GPU or interpret=True), else
    None."""
    options = _ONE_TOKEN.get()
    if options is None or x.size != x.shape[-1] or not all(k.ndim == 2 for k in kernels):
        return None
    if not options.min_elements <= kernels[0].shape[0] * sum(k.shape[1] for k in kernels) < options.max_elements:
        return None
    if options.interpret is None:
        return (options, False) if jax.default_backend() == "gpu" else None
    return options, options.interpret


def matmul(x, kernel):
    """x @ kernel (x (..., D), kernel (D, N) or a sequence of (D, N_i) kernels standing for their concatenation
    along columns, one dtype): `one_token_matmul` (or `whole_column_matmul` for D N < whole_below) where
    `kernel_taken`, else jnp.dot (of the concatenation)."""
    kernels = list(kernel) if isinstance(kernel, (list, tuple)) else [kernel]
    taken = kernel_taken(x, kernels)
    if taken is None:
        return jnp.dot(x, kernels[0] if len(kernels) == 1 else jnp.concatenate(kernels, axis=1))
    options, interpret = taken
    d, n = kernels[0].shape[0], sum(k.shape[1] for k in kernels)
    product = whole_column_matmul if d * n < options.whole_below else one_token_matmul
    y = product(x.reshape(1, d), kernels, options=options, interpret=interpret)
    return y.reshape(x.shape[:-1] + (n,))


def gated(x, w_gate, w_up, act):
    """act(x W_gate) * (x W_up) (..., F) by `gated_matmul` where `kernel_taken` for [W_gate, W_up] and D 2F <
    whole_below; else None (the caller computes it its own way)."""
    taken = kernel_taken(x, [w_gate, w_up])
    if taken is None or w_gate.shape != w_up.shape or w_gate.size * 2 >= taken[0].whole_below:
        return None
    options, interpret = taken
    h = gated_matmul(x.reshape(1, -1), w_gate, w_up, act, options=options, interpret=interpret)
    return h.reshape(x.shape[:-1] + (w_gate.shape[1],))
