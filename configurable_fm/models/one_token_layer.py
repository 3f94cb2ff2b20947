"""One llama decoder layer of a batch-1 decode step as four split-K Pallas kernels and one attention kernel (and two
XLA sums with OneTokenMatmuls(residual_atomic=False)), for a GPU.

Why: at batch 1 the decode step is bound by how many kernels it launches, not by the bytes it reads. The 135M
shape's step ran 14 kernels per layer at ~2.2 us each on an H100 (norms, the projections' products and the sums
of their partials, RoPE, the two cache writes, cuDNN's attention, SwiGLU, casts; BENCHMARKS.md "Generation"),
about 0.87 ms per step for ~8 MB of weights. Here each kernel does the elementwise work of its neighbours in its
prologue, so a layer is seven launches (five with the atomic residual below):

    P1 = partials(v = RMSNorm_1(x),                  [W_q | W_k | W_v])    norm in the prologue
    A  = attention(P1, cache, mask, position)                               q/k/v = sum_s P1[s] (+ b), RoPE,
                                                                            k/v written to the cache slot; per
                                                                            cache block: acc, max, sum
    P2 = partials(v = a = combine(A),                 W_o)                  the blocks combined in the prologue
    x' = x + (sum_s P2[s] (+ b_o))                                          XLA
    P3 = partials(v = RMSNorm_2(x'),                 [W_gate | W_up])      norm in the prologue
    P4 = partials(v = act(sum_s P3[s, :F]) * sum_s P3[s, F:],  W_down)     SwiGLU in the prologue
    y  = x' + (sum_s P4[s] (+ b_down))                                      XLA

With OneTokenMatmuls.residual_atomic (the default) the two sums are gone: x is a float32 (1, D) buffer that the o
and down kernels update in place, each program adding its tile's product by an atomic float32 add
(one_token.accumulate), so a layer is five launches and its output stays float32 (Llama.hidden_states casts
the stream back after the last layer). The modules round each residual sum to the compute dtype; this stream does
not (closer to float32 arithmetic), and the atomic additions' order varies between runs (with XLA asked for
deterministic ops, one_token.deterministic_ops, the sums are kept). Measured (H100, one
process, A B A B): 135M batch 1 0.656 / 0.660 -> 0.638 / 0.635 ms per step, 233 -> 176 kernels; the o and down
kernels 0.5-0.6 us slower each for the two 1.2-1.3 us sums they replace.

`partials` is models.one_token's split-K product (P[s, n-block] = v[s-chunk] W[s-chunk, n-block], float32, so
v W = sum_s P[s]): the split is what keeps enough loads in flight (one program per column block over the whole of
D was 1.6x slower, one_token's docstring). Shapes: x (1, 1, D); P1 (D / bd, (N + 2K) H); A (3, J, N H); a (N H,);
P3 (D / bd, 2F); P4 (F / bd, D); the cache per layer (1, S, K, H) (N query heads, K key/value heads, H head dim, S
slots, J = ceil(S / keys) cache blocks).

The attention kernel (one program per query head n and cache block j of `keys` slots, flash-decoding style; its
key/value head n // (N / K)): q, k and v of the new token are the column sums of P1 over the head's columns, cast
to the compute dtype (+ bias), q and k rotated in float32 in transformers' rotate-half layout and cast back
(attention.apply_rope); the new k and v are cast to the cache's dtype and written to slot `index` by the block-0
program of the first query head of each group (every program uses the values in registers, so no program reads a
slot another writes); then the block's part of softmax(q k^T / sqrt(H) + mask) v over the slots 0..index (block
0 also holds the new slot): its float32 running maximum m, sum l and unnormalised weighted values acc, and the o
kernel's prologue combines the blocks, a = sum_j e^(m_j - M) acc_j / sum_j e^(m_j - M) l_j with M = max_j m_j (a
block past the new slot has m = -1e30, l = 0). Blocks are whole at multiples of `keys`, then one that ends at the
cache's end for the slots past them; the mask is the layer's own (models.attention.decoder_mask: valid slots,
causality, a sliding window). With `split_cache=False`, one program per head loops over the blocks with an online
softmax and writes a itself. Every operation is the module's up to the order of float32 sums (and bf16 rounding
of the softmax weights, which XLA's and cuDNN's attention round to the compute dtype before the product with v and
these kernels do not): tests/models/test_one_token_layer.py compares logits, caches and greedy tokens with the
module's forward.

Measured (BENCHMARKS.md, "One-token decoder layers"): the 135M shape's batch-1 step 0.866 -> 0.794 ms on an H200
(408 -> 233 kernels per step; the attention kernel, 9.5 us per layer, is now the largest); at the 1B shape the
split-K gate/up product with its norm prologue took 41 us against XLA's GEMM's 24 us, hence `fits`' bound. Then
the cache read in whole blocks at multiples of `keys` (aligned loads; before, the last block was shifted back so
that no block start was a known multiple) and one static tail block, and partial rows and the norm's row in one
masked load each (`load_rows`; before, two overlapping power-of-two blocks): 0.757 -> 0.692 ms per step on an H100
in one call. Folding o_proj into this kernel (split over the heads: 9 programs read W_o, 8.4 -> 22.5 us) or the
first residual sum into the gate/up prologue (3.9 -> 5.3 us there for a 1.2 us sum saved) was slower or equal,
and is not kept (BENCHMARKS.md). Splitting the attention over the cache blocks (the kernel above; before, one
program per head looped over them): 0.672 -> 0.652 ms per step with 256 new tokens and 0.910 -> 0.660 ms with
1,024, on an H200 (attention 8.6 -> 6.5 us per layer at 256).

Taken (models/llama.py, `LlamaDecoderLayer`) inside `one_token_matmuls(options)` with `options.layers` set (the
default; models.generation.Generator enters it for a model on one device), for a
plain layer (exact module types: Linear projections, RMSNorm, LlamaMLP; no tap context), one token, a KVCache,
one compute dtype, half a head a power of two, tiles of MIN_TILE at least and every kernel below
options.max_elements (`fits`); on a GPU, or interpreted when options.interpret is True.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from configurable_fm.models.layers import activation
from configurable_fm.models.one_token import (MIN_TILE, OneTokenMatmuls, accumulate, deterministic_ops, load_row,
                                              partials, tiles, whole)

NEG = -1e30  # the running maximum before any slot: finite, so exp(m - m_new) is never exp(nan)
# layers.ACTIVATIONS that lower to Triton here (exact gelu's erf does not)
TRITON_ACTIVATIONS = ("silu", "swish", "relu", "gelu_new", "gelu_pytorch_tanh", "gelu_fast")


def is_power_of_two(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def largest_power_of_two(n: int) -> int:
    """The largest power of two <= n (n >= 1)."""
    return 1 << (n.bit_length() - 1)


def padded(n: int) -> int:
    """The smallest power of two >= n."""
    return 1 << (n - 1).bit_length()


def load_rows(ref, n: int, cols=None, lead: tuple = (), zero=0):
    """ref[*lead, 0:n] (a vector) or ref[*lead, 0:n, cols] as float32 padded with zeros to padded(n) rows: one load
    from row 0 with the rows past n masked (not read; a slice from 0 stays in place in interpret mode too).
    zero: the slice's start, a traced zero inside a kernel (a program id times 0): a padded slice runs past the
    ref, which a masked Triton load allows but jax >= 0.12 refuses when the start and size are both static."""
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import triton as pltriton
    rows = padded(n)
    first = pl.ds(0 if rows == n else zero, rows)
    index = lead + ((first,) if cols is None else (first, cols))
    if rows == n:
        return ref[index].astype(jnp.float32)
    inside = jax.lax.broadcasted_iota(jnp.int32, (rows,) if cols is None else (rows, 1), 0) < n
    return pltriton.load(ref.at[index], mask=inside, other=0).astype(jnp.float32)


def sum_rows(ref, cols, n: int):
    """sum_{s < n} ref[s, cols] in float32, in one load (`load_rows`); cols: a pl.ds whose start is traced (its
    start times 0 is the load's traced zero)."""
    return jnp.sum(load_rows(ref, n, cols, zero=cols.start * 0), axis=0)


def fits(hidden: int, heads: int, kv_heads: int, head_dim: int, ffn: int, act: str,
         options: OneTokenMatmuls) -> bool:
    """Whether the layer's shapes suit the kernels: half a head a power of two, an activation the kernel can run,
    every product's tiles >= MIN_TILE (one_token.tiles) and its kernel below options.max_elements (XLA's bound
    for reducing a one-row dot; above it XLA's GEMM reads the weights faster than the split-K kernel with its
    prologue: the 1B shape's gate/up 41 us against 24 us on an H100, BENCHMARKS.md)."""
    products = [(hidden, [heads * head_dim, kv_heads * head_dim, kv_heads * head_dim]), (heads * head_dim, [hidden]),
                (hidden, [ffn, ffn]), (ffn, [hidden])]
    return (act in TRITON_ACTIVATIONS and head_dim % 2 == 0 and is_power_of_two(head_dim // 2)
            and all(min(tiles(d, widths, options)) >= MIN_TILE and d * sum(widths) < options.max_elements
                    for d, widths in products))


def rms_norm_load(eps: float, dtype):
    """A `partials` load: chunk [start, start + size) of RMSNorm(x) = x / sqrt(mean(x^2) + eps) * w in float32,
    cast to x's dtype (layers.RMSNorm) and then to the compute dtype (layers.Linear); inputs x (1, D), w (D,). Each
    program sums x^2 over the whole row itself, in one load (`load_rows`)."""
    from jax.experimental import pallas as pl

    def load(in_refs, start, size):
        x_ref, w_ref = in_refs
        d = x_ref.shape[1]
        row = load_rows(x_ref, d, lead=(jnp.int32(0),), zero=start * 0)  # one load of the whole row
        sum_sq = jnp.sum(row * row)
        y = x_ref[0, pl.ds(start, size)].astype(jnp.float32) * jax.lax.rsqrt(sum_sq / d + eps)
        return (y * w_ref[pl.ds(start, size)].astype(jnp.float32)).astype(x_ref.dtype).astype(dtype)
    return load


def swiglu_load(act: str, ffn: int, dtype, bias: bool):
    """A `partials` load: chunk of h = act(gate) * up, gate = sum_s P[s, :F] (+ b_gate) and up = sum_s P[s, F:]
    (+ b_up) each cast to the compute dtype (layers.fused_linears), act and product in float32, h cast to the compute
    dtype; inputs P (S, 2F) float32 [, b_gate (F,), b_up (F,)]."""
    from jax.experimental import pallas as pl
    fn = activation(act)

    def load(in_refs, start, size):
        p_ref = in_refs[0]

        def column(offset, b):
            y = sum_rows(p_ref, pl.ds(offset + start, size), p_ref.shape[0]).astype(dtype)
            if bias:
                y = y + in_refs[b][pl.ds(start, size)].astype(dtype)
            return y.astype(jnp.float32)
        return (fn(column(0, 1)) * column(ffn, 2)).astype(dtype)
    return load


MAX_BLOCKS = 32  # cache blocks of the split attention at most (its o prologue holds 3 x blocks x bd floats)


def cache_blocks(slots: int, keys: int, split: bool) -> tuple[int, int]:
    """(keys, blocks): the attention kernel's block of cache slots, the largest power of two <= min(keys, slots),
    doubled for the split kernel until the cache has at most MAX_BLOCKS blocks (a long cache: blocks of 64 slots
    would make 128 at 8,192 slots, each program of the o kernel combining all of them); blocks = ceil(slots /
    keys)."""
    keys = largest_power_of_two(min(keys, slots))
    while split and -(-slots // keys) > MAX_BLOCKS and keys * 2 <= slots:
        keys *= 2
    return keys, -(-slots // keys)


def split_combine_load(dtype):
    """A `partials` load: chunk of the attention output a = sum_j w_j acc_j / sum_j w_j l_j, w_j = exp(m_j - max m),
    from the split attention's (acc, m, l) of each cache block, (3, J, N H) float32 (`attention`); cast to the
    compute dtype. A block past the new slot has m = NEG, l = 0, acc = 0: weight 0."""
    from jax.experimental import pallas as pl

    def load(in_refs, start, size):
        s_ref = in_refs[0]
        blocks = s_ref.shape[1]
        cols = pl.ds(start, size)
        acc, m, total = (load_rows(s_ref, blocks, cols, lead=(jnp.int32(k),), zero=start * 0) for k in range(3))
        m = jnp.where(jax.lax.broadcasted_iota(jnp.int32, m.shape, 0) < blocks, m, NEG)  # padded rows: weight 0
        w = jnp.exp(m - jnp.max(m, axis=0, keepdims=True))
        return (jnp.sum(w * acc, axis=0) / jnp.sum(w * total, axis=0)).astype(dtype)
    return load


def _attention_kernel(p_ref, inv_freq_ref, slots_ref, mask_ref, k_ref, v_ref, *refs, heads: int, kv_heads: int,
                      head_dim: int, keys: int, dtype, bias: bool, split: bool):
    """Program n (a query head): module docstring. slots = [RoPE position, cache slot of the new token]. With
    `split`, program (n, j) attends over cache block j only (the new token in block 0's program) and writes its
    unnormalised acc, its running maximum m and sum l (`split_combine_load` combines them)."""
    from jax.experimental import pallas as pl
    bias_ref = refs[0] if bias else None
    out_ref, k_out_ref, v_out_ref = refs[-3:]
    n = pl.program_id(0)
    j = pl.program_id(1) if split else 0
    group = heads // kv_heads
    kv = n // group
    half = head_dim // 2
    cache_dtype = k_out_ref.dtype
    max_len = mask_ref.shape[0]
    whole_blocks = max_len // keys
    position, index = slots_ref[0], slots_ref[1]
    scale = 1.0 / math.sqrt(head_dim)

    def column(start):  # columns [start, start + half) of sum_s P1[s] in the compute dtype (+ bias), as float32
        y = sum_rows(p_ref, pl.ds(start, half), p_ref.shape[0]).astype(dtype)
        if bias:
            y = y + bias_ref[pl.ds(start, half)].astype(dtype)
        return y.astype(jnp.float32)

    def rotated(start, cos, sin):  # attention.apply_rope of one head: x * cos + rotate_half(x) * sin, cast back
        x1, x2 = column(start), column(start + half)
        return [(y.astype(dtype)).astype(jnp.float32) for y in (x1 * cos - x2 * sin, x2 * cos + x1 * sin)]

    def new_token():  # q, and the carry (m, l, acc) of the new token's own slot (empty outside block 0)
        angles = position.astype(jnp.float32) * inv_freq_ref[...]
        cos, sin = jnp.cos(angles), jnp.sin(angles)
        q = rotated(n * head_dim, cos, sin)
        k_new = rotated((heads + kv) * head_dim, cos, sin)
        v_new = [column((heads + kv_heads + kv) * head_dim + i * half) for i in range(2)]

        @pl.when((n % group == 0) & (j == 0))
        def _write():
            for i in range(2):
                k_out_ref[0, index, kv, pl.ds(i * half, half)] = k_new[i].astype(dtype).astype(cache_dtype)
                v_out_ref[0, index, kv, pl.ds(i * half, half)] = v_new[i].astype(dtype).astype(cache_dtype)

        # what attention reads back from the cache: the compute dtype's values through the cache's dtype
        k_new = [y.astype(dtype).astype(cache_dtype).astype(dtype).astype(jnp.float32) for y in k_new]
        v_new = [y.astype(dtype).astype(cache_dtype).astype(dtype).astype(jnp.float32) for y in v_new]
        ok = (mask_ref[index] != 0) & (j == 0)
        m = jnp.where(ok, (jnp.sum(q[0] * k_new[0]) + jnp.sum(q[1] * k_new[1])) * scale, NEG)
        total = jnp.where(ok, jnp.float32(1), jnp.float32(0))
        return q, (m, total, [jnp.where(ok, v, jnp.zeros_like(v)) for v in v_new])

    def block(q, start, first, carry):  # the new slots first.. of the block of `keys` slots at start
        m, total, acc = carry
        slots = start + jax.lax.broadcasted_iota(jnp.int32, (keys,), 0)
        rows = pl.ds(start, keys)
        use = (slots >= first) & (mask_ref[rows] != 0) & (slots != index)

        def read(ref, i):
            return ref[0, rows, kv, pl.ds(i * half, half)].astype(dtype).astype(jnp.float32)
        k_blk = [read(k_ref, i) for i in range(2)]
        scores = (jnp.sum(k_blk[0] * q[0][None, :], axis=1) + jnp.sum(k_blk[1] * q[1][None, :], axis=1)) * scale
        scores = jnp.where(use, scores, NEG)
        m_new = jnp.maximum(m, jnp.max(scores))
        alpha = jnp.exp(m - m_new)
        p = jnp.where(use, jnp.exp(scores - m_new), 0.0)
        v_blk = [read(v_ref, i) for i in range(2)]
        acc = [a * alpha + jnp.sum(p[:, None] * v, axis=0) for a, v in zip(acc, v_blk)]
        return m_new, total * alpha + jnp.sum(p), acc

    # whole blocks at multiples of `keys` (aligned loads), then, when the cache does not divide into blocks, the
    # block that ends at max_len (a static start) for the slots after the whole blocks
    def aligned(q, i, carry):
        return block(q, pl.multiple_of(i * keys, keys), i * keys, carry)

    def tail(q, carry):
        return block(q, max_len - keys, whole_blocks * keys, carry)

    cols = [pl.ds(n * head_dim + i * half, half) for i in range(2)]
    if not split:  # every block up to the one holding the new slot, in one program
        q, carry = new_token()
        carry = jax.lax.fori_loop(0, jnp.minimum(index // keys + 1, whole_blocks), functools.partial(aligned, q),
                                  carry)
        if max_len % keys:
            carry = jax.lax.cond(index >= whole_blocks * keys, functools.partial(tail, q), lambda c: c, carry)
        m, total, acc = carry
        for i in range(2):
            out_ref[0, cols[i]] = (acc[i] / total).astype(out_ref.dtype)
        return

    def finish(m, total, acc):  # this block's acc (unnormalised), m and l for split_combine_load
        for i in range(2):
            out_ref[0, j, cols[i]] = acc[i]
            out_ref[1, j, cols[i]] = jnp.full((half,), m, jnp.float32)
            out_ref[2, j, cols[i]] = jnp.full((half,), total, jnp.float32)

    @pl.when(j * keys > index)  # a block past the new slot: nothing to attend to
    def _empty():
        finish(jnp.float32(NEG), jnp.float32(0), [jnp.zeros((half,), jnp.float32)] * 2)

    @pl.when(j * keys <= index)
    def _attend():
        q, carry = new_token()
        if max_len % keys:
            carry = jax.lax.cond(j < whole_blocks, functools.partial(aligned, q, j), functools.partial(tail, q), carry)
        else:
            carry = aligned(q, j, carry)
        finish(*carry)


def attention(p1, bias, inv_freq, position, index, mask_S, k_cache, v_cache, *, heads: int, kv_heads: int,
              head_dim: int, dtype, options: OneTokenMatmuls, interpret: bool):
    """(a, k cache, v cache) for the new token (module docstring): p1 (S1, (N + 2K) H) the q/k/v partials, bias
    ((N + 2K) H,) or None, inv_freq (H / 2,) float32, position and index int32 scalars, mask_S (S,) int32 (1: the
    new token may attend to the slot), caches (1, S, K, H), written in place. a: (1, N H) in the compute dtype; with
    options.split_cache, (3, J, N H) float32: each cache block's unnormalised acc, running maximum m and sum l
    (broadcast over the head's columns), J = ceil(S / keys), for `split_combine_load`."""
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import triton as pltriton
    slots = jnp.stack([position, index]).astype(jnp.int32)
    inputs = [p1, inv_freq.astype(jnp.float32), slots, mask_S.astype(jnp.int32), k_cache, v_cache]
    inputs += [bias] if bias is not None else []
    split = bool(options.split_cache)
    keys, blocks = cache_blocks(mask_S.shape[0], options.keys, split)
    first = (jax.ShapeDtypeStruct((3, blocks, heads * head_dim), jnp.float32) if split
             else jax.ShapeDtypeStruct((1, heads * head_dim), dtype))
    out_shape = [first, jax.ShapeDtypeStruct(k_cache.shape, k_cache.dtype),
                 jax.ShapeDtypeStruct(v_cache.shape, v_cache.dtype)]
    kernel = functools.partial(_attention_kernel, heads=heads, kv_heads=kv_heads, head_dim=head_dim, keys=keys,
                               dtype=dtype, bias=bias is not None, split=split)
    return pl.pallas_call(
        kernel, grid=(heads, blocks) if split else (heads,), in_specs=[whole(a) for a in inputs],
        out_shape=out_shape, out_specs=[whole(o) for o in out_shape],
        input_output_aliases={4: 1, 5: 2}, interpret=interpret, name="one_token_attention",
        compiler_params=None if interpret else pltriton.CompilerParams(num_warps=options.num_warps, num_stages=1))(
        *inputs)


def decoder_layer(x_1x1xD, position, index, mask_S, k_cache, v_cache, w: dict, *, heads: int, kv_heads: int,
                  head_dim: int, act: str, eps_1: float, eps_2: float, inv_freq, dtype, options: OneTokenMatmuls,
                  interpret: bool):
    """(x after the layer (1, 1, D), k cache, v cache): the module docstring's kernels. w: the layer's arrays,
    keys ln_1, ln_2 (D,), q, k, v, o, gate, up, down (kernels (in, out)) and optional q_bias, k_bias, v_bias,
    o_bias, gate_bias, up_bias, down_bias; dtype the projections' compute dtype. With options.residual_atomic the
    two residual sums are gone: the o and down kernels add their products into x in float32 by atomic adds
    (one_token.accumulate), five kernels per layer, and x comes back float32 (the model casts the stream back to its
    own dtype after the last layer, Llama.hidden_states)."""
    d = x_1x1xD.shape[-1]
    x = x_1x1xD.reshape(1, d)
    cast = lambda *names: [w[n].astype(dtype) for n in names]
    p1 = partials([x, w["ln_1"]], cast("q", "k", "v"), options=options, interpret=interpret,
                  load=rms_norm_load(eps_1, dtype), name="one_token_norm_qkv")
    qkv_bias = jnp.concatenate(cast("q_bias", "k_bias", "v_bias")) if "q_bias" in w else None
    a, k_cache, v_cache = attention(p1, qkv_bias, inv_freq, position, index, mask_S, k_cache, v_cache, heads=heads,
                                    kv_heads=kv_heads, head_dim=head_dim, dtype=dtype, options=options,
                                    interpret=interpret)

    def total(p, name):  # sum_s P[s] in the compute dtype (+ bias): layers.Linear's output
        y = jnp.sum(p, axis=0, keepdims=True).astype(dtype)
        return y + w[name].astype(dtype) if name in w else y

    def residual(x, inputs, name, load, kernel_name):  # x + (v W_name (+ b)): an XLA sum, or atomic adds into x
        if options.residual_atomic and not deterministic_ops():
            bias = w[name + "_bias"].astype(dtype) if name + "_bias" in w else None
            return accumulate(inputs, w[name].astype(dtype), x.astype(jnp.float32), bias, options=options,
                              interpret=interpret, load=load, name=kernel_name)
        return x + total(partials(inputs, cast(name), options=options, interpret=interpret, load=load,
                                  name=kernel_name), name + "_bias")

    a_load = split_combine_load(dtype) if options.split_cache else load_row
    x = residual(x, [a], "o", a_load, "one_token_o")
    p3 = partials([x, w["ln_2"]], cast("gate", "up"), options=options, interpret=interpret,
                  load=rms_norm_load(eps_2, dtype), name="one_token_norm_gate_up")
    ffn = w["gate"].shape[1]
    swiglu_inputs = [p3] + (cast("gate_bias", "up_bias") if "gate_bias" in w else [])
    x = residual(x, swiglu_inputs, "down", swiglu_load(act, ffn, dtype, "gate_bias" in w), "one_token_swiglu_down")
    return x.reshape(1, 1, d), k_cache, v_cache
