"""Mixed-adapter batches: N LoRA-family adapters served at once, each batch row with its own adapter.

    mixed = mix(base, [lora_m, dora_m, ia3_m])     # adapted models of `base` (attach / from_peft / load_adapter)
                                                   # or adapter brick sets (adapter_bricks / load_bricks)
    m = with_adapter_ids(mixed, [0, 2, 1, -1])     # row b uses adapter ids[b]; -1 (BASE_ID): the base alone
    logits_BxTxV = m(ids_BxT)                      # row b: the logits of adapter ids[b] attached alone
    out_BxL = generate(m, prompts_BxT, max_new_tokens=32)   # KV cache; ids traced: no recompilation per ids
    plain = unmix(mixed)                           # the base back: plain Linears, the same arrays
    served = mix(base, adapters, factor_dtype=jnp.bfloat16)   # LoRA factors stored in bfloat16 (serving)
    m = with_small_batch_path(m, False)            # force the gather LoRA path (default: by shape; "Cost" below)
    m = with_lora_matmul(m, "auto")               # LoRA terms inside the base products where out >= in (joint_rows)

Every Linear targeted by at least one adapter becomes a `MixedLinear` at the same path. It keeps the base `kernel`
W (in, out) and `bias` b, shared by all rows (one matmul for the whole batch), and stacks the adapters' factors
along a leading adapter axis n = 0..N-1 (the order given to `mix`):

    lora_a          A (N, in, r)    LoRAParam     ranks r_n < r = max_n r_n zero-padded: exact (the padded
    lora_b          B (N, r, out)   LoRAParam     columns of A meet zero rows of B)
    lora_scale      s (N,)          AdapterScale  alpha_n / r_n (alpha_n / sqrt(r_n) with rsLoRA); 0: no LoRA
    lora_magnitude  m (N, out)      LoRAParam     DoRA's magnitude; 1 for the other adapters
    lora_weight_norm n (N, out)     DoRANorm      ||W + s_n A_n B_n|| per output feature, computed by `mix`; 1 for
                                                  the other adapters
    ia3_in          l_in (N, in)    IA3Param      IA3 feedforward scales; 1 for the other adapters
    ia3_out         l_out (N, out)  IA3Param      IA3 output-side scales; 1 for the other adapters
    adapter_ids     ids (B,)        AdapterIds    int32: the adapter of each batch row (`with_adapter_ids`)

A leaf is present only when some adapter at that module needs it (a module with LoRA adapters only has no
magnitude, norm or IA3 leaves, and computes none of their terms). An adapter that does not target the module gets
zero factors (s = 0) and unit vectors there, so its rows see the base there. With i = ids[b] (x: (B, ..., in)):

    x'   = x ⊙ l_in[i]                                  (IA3, feedforward modules)
    y    = x' W + b                                     (the base, one matmul for all rows)
    Δ    = s[i] · (x' A[i]) B[i]                        (LoRA; DoRA: (x' A[i]) (B[i] ⊙ f s[i]) = f ⊙ Δ)
    f    = m[i] / n[i]                                  (DoRA; 1 for the other adapters)
    out  = (y + (f − 1) ⊙ (y − b) + f ⊙ Δ) ⊙ l_out[i]   (IA3 output side)

which is, for each kind, the order of operations of its own module (modules.py: LoRALinear, DoRALinear,
IA3Linear), so a row matches its adapter attached alone to float rounding (the tests: <= 1e-5 on float32 logits).
Row id -1 (BASE_ID) gives the base (s = 0, f = 1, l = 1 for that row). Ids are checked where they are concrete
(`with_adapter_ids`: AdapterError for an id outside -1..N-1); inside a trace they cannot be, and a row whose id is
outside -1..N-1 comes out NaN (never another adapter's output).

How the ids reach the modules: `with_adapter_ids(model, ids_B)` is a pure function returning a model whose
MixedLinear modules each hold the ids as an `AdapterIds` variable (state, not graph). So `model(ids_BxT)`,
`models.generation.generate`, `nnx.split` + `jax.jit` and the trainer need no new argument; the ids travel with
the rest of the state as a traced array (new ids of the same batch size reuse the compiled program; a new batch
size is a new shape, as for the tokens). `with_adapter_ids` also works under a trace (ids traced, checked only for
shape and dtype). A mixed model without ids (`mix(..., ids=None)`) refuses to run, naming the module.

Cost per MixedLinear and call, x with M = B·T rows of `in` features (T: the positions per batch row):
    base:   2·M·in·out FLOPs, one matmul shared by every row (the same as the base model);
    LoRA:   one of two paths, equal in value to float rounding (the tests: <= 1e-5 on float32 logits, the same
            greedy tokens), chosen from the static shapes (`uses_small_batch_path`) unless a module's
            `small_batch_path` is set (True / False; `with_small_batch_path`, a runtime choice, not in the
            structure spec or checkpoints):
      gather (large M): gathers A[ids] (B, in, r) and B[ids] (B, r, out) — B·r·(in + out) values materialised
            (written, then read again), read from the N·r·(in + out) stored — then two batched matmuls,
            2·M·r·(in + out) FLOPs: as one LoRA adapter over the batch, whatever N is (PEFT's masked path instead
            runs each adapter on its sub-batch, N passes). At decode (T = 1) the copies are ~3x the bytes of the
            factors and dominate the step;
      all adapters (small M): every adapter's down-projection at once, selected per row by a one-hot mask
            e (B, N), e[b, n] = [ids[b] = n] (all zero for BASE_ID and out-of-range rows):
              xa_all = x A_flat                         A_flat (in, N·r): A (N, in, r) transposed  (B, ..., N, r)
              xa     = Σ_n e[b, n] xa_all[b, ..., n, :]                                            (B, ..., r)
              z      = e[b, n] xa[b, ..., :]            laid out as (B, ..., N·r)
              Δ      = s[i] · z B_flat                  B_flat (N·r, out): B (N, r, out) reshaped  (B, ..., out)
            (the selections are `where` masks: one non-zero term per sum, so xa is exactly the row's own x A[i];
            the zero blocks of z meet the other adapters' B). Each factor is read once and nothing is gathered;
            the price is 2·M·N·r·(in + out) FLOPs, N·r·(in + out) / (in·out) of the base matmul's (1b llama,
            N = 64, r = 16: 0.6x-2.5x per projection), hidden only while the step is memory-bound: the extra
            FLOPs per factor byte are 2·M / bytes-per-value, below an H200's ~100-200 FLOP/byte (TF32 / bf16
            tensor cores against 4.8 TB/s) for M <= SMALL_BATCH_ROWS = 128. It reads all N adapters' factors
            (N·r·(in + out), plus a transposing copy of A unless XLA hoists it, e.g. out of generate's loop)
            where the gather path reads and copies ~3·B·r·(in + out): so it is chosen only when also
            N <= SMALL_BATCH_ADAPTERS_PER_ROW · B = 2·B (a decode step of 64 rows over 64 adapters: yes; one row
            over 64 adapters: no). An adapter with non-finite factors would make every row NaN on this path
            (0 · inf), not only its own rows;
    DoRA:   gathers m[ids], n[ids] (B, out) and adds ~4·M·out elementwise operations (the norm is precomputed);
    IA3:    gathers (B, in) / (B, out) and M·in / M·out multiplications.
Memory: N·r·(in + out) (+ 2·N·out DoRA, N·in / N·out IA3) stored, against N·in·out to keep N merged copies;
`mix(..., factor_dtype=jnp.bfloat16)` halves the LoRA factors' share (vLLM and S-LoRA serve adapters in the model
dtype). When many rows share few adapters (B >> N) the gather path copies each adapter's factors once per row; a
grouped (segment) matmul would avoid that copy and is not implemented.

The mixed model is for serving. Its stacked factors are AdapterParams (`adapter_state` lists them), but a DoRA
norm is a snapshot taken by `mix`, not recomputed if the factors are trained. MixedLinear is a registered
models.structure extension (kind 'mixed_adapters', registered when this module is imported), so a mixed model
passes `check_consistent` (generate needs that) and round-trips through orbax checkpoints; `to_hf` and `to_peft`
refuse it by name (`unmix` it, or export each adapter from its own model).
"""
from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from configurable_fm.bricks.adapters.core import adapted_modules, check_mergeable
from configurable_fm.bricks.adapters.experts import expert_loras
from configurable_fm.bricks.adapters.io import attach_bricks
from configurable_fm.bricks.adapters.modules import (JOINT_PAD, AdaptedLinear, AdapterError, AdapterParam, DoRANorm,
                                                     IA3Param, LoRAParam, adapter_compute_dtype, adapter_dtype,
                                                     checked_options, dora_output, joint_matmul, linear_holding,
                                                     make_variable, sharding_axes)
from configurable_fm.bricks.brickset import Brick, BrickSet
from configurable_fm.bricks.paths import flat_state
from configurable_fm.bricks.select import module_index, select
from configurable_fm.interop.peft import attach_built
from configurable_fm.models.layers import Linear
from configurable_fm.models.structure import register_extension
from configurable_fm.models.taps import tapped

BASE_ID = -1  # the row id that means "the base model alone"
KIND = "mixed_adapters"  # the models.structure extension kind of MixedLinear
_LISTED = 8
# The all-adapters LoRA path (module docstring) when M = B·T <= SMALL_BATCH_ROWS (its extra FLOPs then hide under
# the factor reads on an H200) and N <= SMALL_BATCH_ADAPTERS_PER_ROW · B (it then reads no more factor bytes than
# the gather path copies); else the gather path.
SMALL_BATCH_ROWS = 128
SMALL_BATCH_ADAPTERS_PER_ROW = 2


def uses_small_batch_path(rows: int, batch: int, adapters: int) -> bool:
    """Whether a MixedLinear takes the all-adapters LoRA path by default (module docstring, "Cost"): for an input
    of `rows` = M = B·T rows, `batch` = B batch rows and `adapters` = N stacked adapters, M <= SMALL_BATCH_ROWS and
    N <= SMALL_BATCH_ADAPTERS_PER_ROW · B. Static: shapes only, never the ids' values."""
    return rows <= SMALL_BATCH_ROWS and adapters <= SMALL_BATCH_ADAPTERS_PER_ROW * batch


class AdapterIds(nnx.Variable):
    """The adapter id of each batch row, (B,) int32, held by every MixedLinear (set by `with_adapter_ids`)."""


class AdapterScale(nnx.Variable):
    """The LoRA scale s_n of each stacked adapter (N,) (0 where adapter n has no LoRA / DoRA): a constant."""


def _per_row(v_BxK: jax.Array, ndim: int) -> jax.Array:
    """(B, K) -> (B, 1, ..., 1, K): broadcastable against an activation of `ndim` dimensions (B, ..., K)."""
    return v_BxK.reshape(v_BxK.shape[:1] + (1,) * (ndim - 2) + v_BxK.shape[1:])


def _one_hot_rows(ids_B: jax.Array, n: int, ndim: int) -> jax.Array:
    """e[b, n] = [ids[b] = n] as (B, 1, ..., 1, N, 1) booleans against (B, ..., N, r) (all False for ids outside
    0..N-1: BASE_ID and out-of-range rows)."""
    return _per_row(ids_B[:, None] == jnp.arange(n, dtype=ids_B.dtype), ndim)[..., None]


def _down_gathered(x, a_NxIxR: jax.Array, idx_B: jax.Array) -> jax.Array:
    """x A[i] per row (B, ..., r), i = idx_B[b] in 0..N-1, by gathering each row's A[i] (B, in, r) in x's dtype."""
    return jnp.einsum("b...i,bir->b...r", x, jnp.take(a_NxIxR, idx_B, axis=0).astype(x.dtype))


def _down_all(x, a_NxIxR: jax.Array, e_BxNx1: jax.Array) -> jax.Array:
    """x A[i] per row (B, ..., r) from every adapter's down-projection x A_flat (B, ..., N, r), selected one-hot by
    e (0 where a row has no adapter): Σ_n e[b, n] xa_all[b, ..., n] as a `where` mask (an exact selection)."""
    xa_all = jnp.einsum("b...i,nir->b...nr", x, a_NxIxR.astype(x.dtype))
    return jnp.where(e_BxNx1, xa_all, jnp.zeros((), xa_all.dtype)).sum(axis=-2)


def _in_slots(xa: jax.Array, e_BxNx1: jax.Array) -> jax.Array:
    """z = e[b, n] xa[b, ...] laid out as (B, ..., N·r): each row's (B, ..., r) in its adapter's slot, zeros in the
    others (so z B_flat, B_flat (N·r, out), meets only the row's own B[i])."""
    n, r = e_BxNx1.shape[-2], xa.shape[-1]
    return jnp.where(e_BxNx1, xa[..., None, :], jnp.zeros((), xa.dtype)).reshape(xa.shape[:-1] + (n * r,))


def lora_gathered(x, a_NxIxR: jax.Array, b_NxRxO: jax.Array, idx_B: jax.Array) -> jax.Array:
    """(x A[i]) B[i] per row, i = idx_B[b] in 0..N-1, by gathering each row's factors (the gather path).

    x: (B, ..., in); A: (N, in, r); B: (N, r, out); idx: (B,) int. Gathers A[idx] (B, in, r) and B[idx]
    (B, r, out), cast to x's dtype, then two batched matmuls: (B, ..., out) in x's dtype."""
    b_BxRxO = jnp.take(b_NxRxO, idx_B, axis=0).astype(x.dtype)
    return jnp.einsum("b...r,bro->b...o", _down_gathered(x, a_NxIxR, idx_B), b_BxRxO)


def joint_rows(xd, kernel, a_NxIxR, b_NxRxO, s_B, ids_B, small: bool, ld) -> jax.Array:
    """x W + s[i] (x A[i]) B[i] per row as one product (the 'joint' LoRA matmul, modules.py):

        z = e[b, n] s[i] (x A[i])  laid out as (B, ..., N·r), zero-padded to a multiple of JOINT_PAD
        y = [x | z] @ [W ; B_flat ; 0]                                  (B, ..., out) in x's dtype

    x A[i] by the gather or the all-adapters down-projection (`small`), in `ld`; e[b, n] = [ids[b] = n] (all zero
    for BASE_ID and out-of-range rows: the base there). xd: (B, ..., in) in the compute dtype; kernel W (in, out);
    A (N, in, r); B (N, r, out); s_B (B,) the row's scale (0 for BASE_ID rows)."""
    n, _, r = a_NxIxR.shape
    dtype = xd.dtype
    x = xd.astype(ld)
    e_BxNx1 = _one_hot_rows(ids_B, n, x.ndim)
    xa = _down_all(x, a_NxIxR, e_BxNx1) if small else _down_gathered(x, a_NxIxR, jnp.clip(ids_B, 0, n - 1))
    z = _in_slots(xa * _per_row(s_B[:, None].astype(ld), x.ndim), e_BxNx1)
    pad = -(n * r) % JOINT_PAD
    z = jnp.pad(z.astype(dtype), [(0, 0)] * (z.ndim - 1) + [(0, pad)])
    w = jnp.concatenate([kernel.astype(dtype), b_NxRxO.astype(dtype).reshape(n * r, b_NxRxO.shape[2]),
                         jnp.zeros((pad, kernel.shape[1]), dtype)], axis=0)
    return jnp.dot(jnp.concatenate([xd, z], axis=-1), w)


def lora_all_adapters(x, a_NxIxR: jax.Array, b_NxRxO: jax.Array, ids_B: jax.Array) -> jax.Array:
    """(x A[i]) B[i] per row, i = ids_B[b], by running every adapter's down-projection and selecting one-hot (the
    all-adapters path; module docstring): no per-row copy of the factors. A row whose id is outside 0..N-1
    (BASE_ID, or out of range) gets 0.

    x: (B, ..., in); A: (N, in, r); B: (N, r, out), cast to x's dtype; ids: (B,) int. Returns (B, ..., out) in
    x's dtype.
        xa_all = x A_flat (B, ..., N, r);  xa = Σ_n e[b, n] xa_all[b, ..., n]  (B, ..., r)
        z = e[b, n] xa[b, ...] (B, ..., N·r);  z B_flat (B, ..., out)
    with e[b, n] = [ids[b] = n], applied as `where` masks (exact selections)."""
    n, _, r = a_NxIxR.shape
    e_BxNx1 = _one_hot_rows(ids_B, n, x.ndim)
    z = _in_slots(_down_all(x, a_NxIxR, e_BxNx1), e_BxNx1)
    return jnp.dot(z, b_NxRxO.astype(x.dtype).reshape(n * r, b_NxRxO.shape[2]))


class MixedLinear(Linear):
    """A Linear with N stacked adapters, one chosen per batch row by `adapter_ids` (module docstring).

    small_batch_path: the LoRA path, a runtime setting (graph, not state; not in `options`): None (default) by
    shape (`uses_small_batch_path`), True the all-adapters path, False the gather path (`with_small_batch_path`).
    matmul: how the LoRA term meets the base product, as LoRALinear's ('separate', 'joint', 'auto';
    `with_lora_matmul`); 'joint' here is `joint_rows` (K = in + N·r), and only where no adapter is DoRA."""

    OPTIONS = {"kinds": (list, None), "rank": (int, 0), "dora": (bool, False), "ia3_in": (bool, False),
               "ia3_out": (bool, False), "batch": (int, 0)}
    matmul = "separate"  # LORA_MATMULS (modules.py), set by with_lora_matmul: the graph, not the state
    JOINT_CAPABLE = True

    def __init__(self, base: Linear, *, kinds: Sequence[str | None], rank: int = 0, dora: bool = False,
                 ia3_in: bool = False, ia3_out: bool = False, batch: int = 0):
        if not isinstance(base, Linear) or isinstance(base, (AdaptedLinear, MixedLinear)):
            raise AdapterError(f"a mixed-adapter module wraps a plain Linear module, got {type(base).__name__}")
        bad = [k for k in kinds if k not in (None, "lora", "dora", "ia3")]
        if not kinds or bad:
            raise AdapterError(f"mixed adapters: kinds must be a non-empty list of 'lora', 'dora', 'ia3' or None "
                               f"(not targeted), got {list(kinds)!r}")
        if rank < 0 or batch < 0 or (dora and not rank):
            raise AdapterError(f"mixed adapters: rank={rank}, batch={batch}, dora={dora} do not fit (rank >= 1 "
                               "with DoRA, both >= 0)")
        self.kernel, self.bias, self.dtype = base.kernel, base.bias, base.dtype
        self.kinds = tuple(kinds)
        n, d_in, d_out = len(self.kinds), int(self.kernel.shape[0]), int(self.kernel.shape[1])
        dtype = adapter_dtype(self.kernel.get_value().dtype)
        axes = sharding_axes(self.kernel)
        ax_in, ax_out = (None, None) if axes is None else axes
        shard = axes is not None
        in_axes, out_axes = ((None, ax_in), (None, ax_out)) if shard else (None, None)
        self.lora_a = make_variable(LoRAParam, jnp.zeros((n, d_in, rank), dtype),
                            (None, ax_in, None) if shard else None) if rank else None
        self.lora_b = make_variable(LoRAParam, jnp.zeros((n, rank, d_out), dtype),
                            (None, None, ax_out) if shard else None) if rank else None
        self.lora_scale = AdapterScale(jnp.zeros((n,), jnp.float32)) if rank else None
        self.lora_magnitude = make_variable(LoRAParam, jnp.ones((n, d_out), dtype), out_axes) if dora else None
        self.lora_weight_norm = make_variable(DoRANorm, jnp.ones((n, d_out), dtype), out_axes) if dora else None
        self.ia3_in = make_variable(IA3Param, jnp.ones((n, d_in), dtype), in_axes) if ia3_in else None
        self.ia3_out = make_variable(IA3Param, jnp.ones((n, d_out), dtype), out_axes) if ia3_out else None
        self.adapter_ids = AdapterIds(jnp.zeros((batch,), jnp.int32))
        self.small_batch_path: bool | None = None

    @classmethod
    def from_options(cls, base: Linear, options: Mapping[str, Any]) -> "MixedLinear":
        return cls(base, **checked_options(KIND, options, cls.OPTIONS))

    @property
    def num_adapters(self) -> int:
        return len(self.kinds)

    @property
    def rank(self) -> int:
        return 0 if self.lora_a is None else int(self.lora_a.shape[2])

    def options(self) -> dict:
        return {"kinds": list(self.kinds), "rank": self.rank, "dora": self.lora_magnitude is not None,
                "ia3_in": self.ia3_in is not None, "ia3_out": self.ia3_out is not None,
                "batch": int(self.adapter_ids.shape[0])}

    def structure_spec(self):
        return {"kind": KIND, "options": self.options()}

    def plain(self) -> Linear:
        """A plain Linear holding this module's kernel and bias Variables (the base module)."""
        return linear_holding(self.kernel, self.bias, self.dtype)

    @tapped
    def __call__(self, x: jax.Array) -> jax.Array:
        ids_B = self.adapter_ids[...]
        if ids_B.shape[0] == 0:
            raise AdapterError("a mixed-adapter model needs one adapter id per batch row: "
                               "bricks.adapters.with_adapter_ids(model, ids) (or mix(..., ids=...))")
        if x.ndim < 2 or x.shape[0] != ids_B.shape[0]:
            raise AdapterError(f"a mixed-adapter module got an input of shape {tuple(x.shape)} but holds "
                               f"{ids_B.shape[0]} adapter ids (one per batch row): set ids for this batch size "
                               "with bricks.adapters.with_adapter_ids")
        n, nd = self.num_adapters, x.ndim
        valid_B = ids_B >= 0  # BASE_ID rows take the identity
        idx_B = jnp.clip(ids_B, 0, n - 1)

        def rows(var, fill):
            """var[ids] (B, K), `fill` for BASE_ID rows."""
            v = var[...]
            return jnp.where(valid_B[:, None], jnp.take(v, idx_B, axis=0), jnp.asarray(fill, v.dtype))

        if self.ia3_in is not None:  # IA3Linear (feedforward): base_layer((x * l).to(x.dtype))
            l_BxI = rows(self.ia3_in, 1)
            x = (x.astype(l_BxI.dtype) * _per_row(l_BxI, nd)).astype(x.dtype)
        kernel = self.kernel[...]
        dtype = self.dtype or jnp.result_type(x, kernel)
        xd = x.astype(dtype)
        ld = dtype
        small = self.small_batch_path
        if small is None:
            small = uses_small_batch_path(math.prod(x.shape[:-1]), ids_B.shape[0], n)
        if self.lora_a is not None and self.lora_magnitude is None and joint_matmul(self):
            a = self.lora_a[...]
            s_B = jnp.where(valid_B, jnp.take(self.lora_scale[...], idx_B), 0)
            out = joint_rows(xd, kernel, a, self.lora_b[...], s_B, ids_B, small,
                             adapter_compute_dtype(self.dtype, dtype, a.dtype))
            out = out + self.bias[...].astype(dtype) if self.bias is not None else out
        else:
            out, ld = self._separate(xd, kernel, dtype, ids_B, idx_B, valid_B, small)
        if self.ia3_out is not None:  # IA3Linear (output side): (base_layer(x) * l).to(result dtype)
            l_BxO = rows(self.ia3_out, 1)
            ld = jnp.result_type(ld, l_BxO.dtype)
            out = out.astype(ld) * _per_row(l_BxO, nd)
        bad_B = (ids_B < BASE_ID) | (ids_B >= n)  # only possible for ids traced past with_adapter_ids' check
        out = out + _per_row(jnp.where(bad_B, jnp.nan, 0.0).astype(out.dtype)[:, None], nd)
        return out.astype(dtype)

    def _separate(self, xd, kernel, dtype, ids_B, idx_B, valid_B, small):
        """(x W + b + the LoRA / DoRA terms, their dtype) with the LoRA term as its own products (module docstring)."""
        nd = xd.ndim
        xw = jnp.dot(xd, kernel.astype(dtype))
        y = xw + self.bias[...].astype(dtype) if self.bias is not None else xw
        ld = dtype
        if self.lora_a is not None:  # LoRALinear._lora: s · (x A) B in adapter_compute_dtype
            a, b = self.lora_a[...], self.lora_b[...]
            ld = adapter_compute_dtype(self.dtype, dtype, a.dtype)
            s_N = self.lora_scale[...]
            if self.lora_magnitude is not None:  # DoRALinear's fold: B_n ⊙ f_n s_n for the DoRA adapters
                f32 = jnp.float32
                f_NxO = self.lora_magnitude[...].astype(f32) / self.lora_weight_norm[...].astype(f32)  # f = m / n
                dora_N = jnp.asarray([k == "dora" for k in self.kinds])
                b = jnp.where(dora_N[:, None, None], b.astype(f32) * (f_NxO * s_N[:, None])[:, None, :],
                              b.astype(f32))
                s_N = jnp.where(dora_N, 1.0, s_N)  # their s is in B already
            if small:
                xab = lora_all_adapters(xd.astype(ld), a, b, ids_B)
            else:
                xab = lora_gathered(xd.astype(ld), a, b, idx_B)
            s_B = jnp.where(valid_B, jnp.take(s_N, idx_B), 0).astype(ld)
            lora = xab * _per_row(s_B[:, None], nd)
            if self.lora_magnitude is not None:  # DoRALinear: y + ((f - 1) · base + f ⊙ lora), f in lora already
                f = _per_row(jnp.where(valid_B[:, None], jnp.take(f_NxO, idx_B, axis=0), 1.0), nd)  # BASE_ID: 1
                out = dora_output(y, xw, None if self.bias is None else self.bias[...], lora, f, ld)
            else:
                out = y.astype(ld) + lora
        else:
            out = y
        return out, ld


register_extension(KIND, lambda base, options, *, rngs: MixedLinear.from_options(base, options))


# ------------------------------------------------------------------------------------------ building
def mixed_modules(model) -> dict[str, MixedLinear]:
    """{module path: MixedLinear} of `model`, in model order (views: do not modify)."""
    return {p: node for p, (_, node) in module_index(model).items() if isinstance(node, MixedLinear)}


def _few(items, n: int = _LISTED, sep: str = ", ") -> str:
    items = list(items)
    return sep.join(map(str, items[:n])) + (f" (+{len(items) - n} more)" if len(items) > n else "")


def _as_adapted(base, item, i: int):
    """Adapter i as a model of `base` with its adapters attached (a brick set is attached to `base`)."""
    if isinstance(item, (BrickSet, Brick)):
        try:
            return attach_bricks(base, item)
        except AdapterError as e:
            raise AdapterError(f"mix: adapter {i} (a brick set) does not fit the base: {e}") from None
    if not isinstance(item, nnx.Module):
        raise AdapterError(f"mix: adapter {i} is a {type(item).__name__}; give models with adapters attached "
                           "(bricks.adapters.attach / from_peft / load_adapter) or adapter brick sets")
    return item


def _base_problems(base_vars: dict, model, i: int) -> list[str]:
    """How the non-adapter parameters of adapted model i differ from the base's (paths, shapes, values)."""
    own = {k: v for k, v in flat_state(model).items() if not isinstance(v, AdapterParam)}
    problems = [f"{k} is in the base but not in adapter {i}" for k in base_vars if k not in own]
    problems += [f"{k} is in adapter {i} but not in the base" for k in own if k not in base_vars]
    for k, var in own.items():
        if k not in base_vars:
            continue
        a, b = base_vars[k].get_value(), var.get_value()
        if a is b:
            continue
        if tuple(a.shape) != tuple(b.shape):
            problems.append(f"{k} is {tuple(a.shape)} in the base but {tuple(b.shape)} in adapter {i}")
        elif a.dtype != b.dtype or not bool(jnp.array_equal(a, b)):
            problems.append(f"{k} differs between the base and adapter {i} ({a.dtype} / {b.dtype})")
    return problems


def _stack_values(lin: Linear, entries: list) -> tuple[dict, dict]:
    """(options, values) of the MixedLinear around the base Linear `lin` from its adapters `entries` (one per
    adapter; None where an adapter does not target the module)."""
    w = lin.kernel.get_value()
    d_in, d_out = int(w.shape[0]), int(w.shape[1])
    dtype = adapter_dtype(w.dtype)
    kinds = [None if m is None else m.kind for m in entries]
    lora = [m if k in ("lora", "dora") else None for m, k in zip(entries, kinds)]
    rank = max((m.rank for m in lora if m is not None), default=0)
    values: dict[str, Any] = {}
    if rank:
        values["lora_a"] = jnp.stack([jnp.zeros((d_in, rank), dtype) if m is None else
                                      jnp.pad(m.lora_a[...].astype(dtype), ((0, 0), (0, rank - m.rank)))
                                      for m in lora])
        values["lora_b"] = jnp.stack([jnp.zeros((rank, d_out), dtype) if m is None else
                                      jnp.pad(m.lora_b[...].astype(dtype), ((0, rank - m.rank), (0, 0)))
                                      for m in lora])
        values["lora_scale"] = jnp.asarray([0.0 if m is None else m.scale for m in lora], jnp.float32)
    dora = "dora" in kinds
    if dora:  # the norm from the module's kernel, which `mix` checked to be the base's
        values["lora_magnitude"] = jnp.stack([m.lora_magnitude[...].astype(dtype) if k == "dora" else
                                              jnp.ones((d_out,), dtype) for m, k in zip(entries, kinds)])
        values["lora_weight_norm"] = jnp.stack([m.weight_norm().astype(dtype) if k == "dora" else
                                                jnp.ones((d_out,), dtype) for m, k in zip(entries, kinds)])
    ia3 = [m if k == "ia3" else None for m, k in zip(entries, kinds)]
    ia3_in = any(m is not None and m.feedforward for m in ia3)
    ia3_out = any(m is not None and not m.feedforward for m in ia3)
    if ia3_in:
        values["ia3_in"] = jnp.stack([m.ia3_scale[...].astype(dtype) if m is not None and m.feedforward else
                                      jnp.ones((d_in,), dtype) for m in ia3])
    if ia3_out:
        values["ia3_out"] = jnp.stack([m.ia3_scale[...].astype(dtype) if m is not None and not m.feedforward else
                                       jnp.ones((d_out,), dtype) for m in ia3])
    options = {"kinds": kinds, "rank": rank, "dora": dora, "ia3_in": ia3_in, "ia3_out": ia3_out, "batch": 0}
    return options, values


def _checked_factor_dtype(dtype) -> np.dtype:
    """`dtype` as a numpy dtype; AdapterError unless it is a floating dtype."""
    try:
        checked = jnp.dtype(dtype)
    except TypeError:
        checked = None
    if checked is None or not jnp.issubdtype(checked, jnp.floating):
        raise AdapterError(f"mix: factor_dtype must be a floating dtype (e.g. jnp.bfloat16) or None, got {dtype!r}")
    return checked


def mix(base, adapted: Sequence, *, ids=None, factor_dtype=None) -> nnx.Module:
    """A new model serving the N adapters of `adapted` at once, one per batch row (module docstring).

    base: the plain model (no adapters). adapted: N >= 1 items, each a model of `base` with LoRA / rsLoRA / DoRA /
    IA3 adapters attached (`attach`, `from_peft`, `load_adapter`: unmerged) or an adapter brick set
    (`adapter_bricks`, `load_bricks`), attached to `base` here. Adapter n is row id n; adapters may target
    different modules, with different kinds and ranks. ids: the row ids, as `with_adapter_ids` (None: set them
    later). `base` and the adapted models are untouched; the base arrays are shared, not copied.

    factor_dtype: the dtype of the stacked LoRA / DoRA factors `lora_a`, `lora_b` (None: the adapters' own,
    float32 for a lower-precision base, as PEFT keeps them; e.g. jnp.bfloat16 to serve them in the model dtype,
    as vLLM and S-LoRA do: half the bytes, and with a bfloat16 compute dtype the LoRA terms then run in
    bfloat16). The DoRA norm is computed from the adapters' own factors before the cast; the per-output vectors
    (DoRA magnitude and norm, IA3 scales: N·out values) keep the adapters' dtype. A serving setting, not part of
    the structure: `models.factory.with_compute_dtype` (float32 master weights) and a checkpoint restored by
    `load_model` (parameters in its `dtype`) hold the factors in float32 again, with the same values.

    AdapterError naming the module or parameter: a base with adapters; an item without adapters, with merged ones
    or that is not a model or brick set; an adapted model whose other parameters differ from the base's in paths,
    shapes or values (adapters of another base); a brick set that does not fit the base; a factor_dtype that is
    not a floating dtype.
    """
    factor_dtype = None if factor_dtype is None else _checked_factor_dtype(factor_dtype)
    if isinstance(adapted, (nnx.Module, BrickSet, Brick, str)) or not isinstance(adapted, Sequence) or not adapted:
        raise AdapterError(f"mix: give a non-empty list of adapted models or adapter brick sets, got "
                           f"{type(adapted).__name__}")
    present = list(adapted_modules(base)) + list(mixed_modules(base)) + list(expert_loras(base))
    if present:
        raise AdapterError(f"mix: the base has adapters at {_few(present)}; give the plain base "
                           "(bricks.adapters.detach / unmix)")
    models = [_as_adapted(base, item, i) for i, item in enumerate(adapted)]
    base_vars = flat_state(base)
    per_path: dict[str, list] = {}
    problems = []
    for i, model in enumerate(models):
        if mixed_modules(model):
            problems.append(f"adapter {i} is a mixed model ({_few(mixed_modules(model), 2)}); mix its adapters' "
                            "own models")
            continue
        if expert_loras(model):
            problems.append(f"adapter {i} has LoRA on stacked expert weights ({_few(expert_loras(model), 2)}), "
                            "which mixed batches do not serve")
            continue
        modules = adapted_modules(model)
        if not modules:
            problems.append(f"adapter {i} has no adapters attached")
            continue
        merged = [p for p, m in modules.items() if m.merged]
        if merged:
            problems.append(f"adapter {i} has merged adapters at {_few(merged, 3)} (bricks.adapters.unmerge first)")
            continue
        try:  # mix serves LoRA / DoRA / IA3 only (bottleneck adapters are nonlinear)
            check_mergeable(modules, f"adapter {i}")
        except AdapterError as e:
            problems.append(str(e))
            continue
        found = _base_problems(base_vars, model, i)
        if found:
            problems.append(f"adapter {i} is not an adapter of this base: {_few(found, 4, '; ')}")
            continue
        for path, m in modules.items():
            per_path.setdefault(path, [None] * len(models))[i] = m
    if problems:
        raise AdapterError(f"mix: {len(problems)} adapter(s) cannot be mixed:\n  " + "\n  ".join(problems))
    index = module_index(base)
    specs = []
    for path in [p for p in index if p in per_path]:  # model order
        node = index[path][1]
        if type(node) is not Linear:
            raise AdapterError(f"mix: {path} is a {type(node).__name__} in the base, not a plain Linear")
        options, values = _stack_values(node, per_path[path])
        specs.append({"path": path, "kind": KIND, "options": options, "values": values})
    mixed = attach_built(base, specs)
    if factor_dtype is not None:  # after attach_built, which casts values to the modules' own dtype
        for m in mixed_modules(mixed).values():  # mixed is a new model: set its own leaves
            if m.lora_a is not None:
                m.lora_a = m.lora_a.replace(m.lora_a.get_value().astype(factor_dtype))
                m.lora_b = m.lora_b.replace(m.lora_b.get_value().astype(factor_dtype))
    return mixed if ids is None else with_adapter_ids(mixed, ids)


def _checked_ids(ids, n: int) -> jax.Array:
    """ids as (B,) int32; AdapterError for another shape or dtype and, when concrete, for ids outside -1..n-1."""
    try:
        concrete = np.asarray(ids)
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
        concrete = None
    arr = concrete if concrete is not None else ids
    dtype, shape = getattr(arr, "dtype", None), tuple(getattr(arr, "shape", ()))
    if dtype is None or not jnp.issubdtype(dtype, jnp.integer) or len(shape) != 1 or shape[0] == 0:
        raise AdapterError(f"with_adapter_ids: ids must be a non-empty 1-D integer array (one id per batch row), "
                           f"got {dtype} {shape}")
    if concrete is not None:
        bad = np.flatnonzero((concrete < BASE_ID) | (concrete >= n))
        if bad.size:
            raise AdapterError(f"with_adapter_ids: rows {bad[:_LISTED].tolist()} have ids "
                               f"{concrete[bad[:_LISTED]].tolist()}; the model mixes {n} adapter(s): ids are "
                               f"0..{n - 1} (the adapters in mix order) or {BASE_ID} (the base alone)")
    return jnp.asarray(arr, jnp.int32)


def with_adapter_ids(model, ids) -> nnx.Module:
    """A new model whose mixed-adapter modules use adapter ids[b] for batch row b (ids: (B,) ints in -1..N-1,
    -1 = BASE_ID the base alone). Works on concrete ids (range checked: AdapterError naming the rows) and under a
    trace (ids traced; see the module docstring for out-of-range ids there). The arrays of `model` are shared, not
    copied; `model` is untouched. AdapterError when the model has no mixed-adapter modules."""
    modules = mixed_modules(model)
    if not modules:
        raise AdapterError("with_adapter_ids: the model has no mixed-adapter modules (bricks.adapters.mix)")
    counts = {m.num_adapters for m in modules.values()}
    if len(counts) != 1:
        raise AdapterError(f"with_adapter_ids: the mixed modules hold different numbers of adapters {sorted(counts)};"
                           " build the model with one mix() call")
    ids_B = _checked_ids(ids, counts.pop())
    new = nnx.clone(model)
    for _, m in nnx.iter_modules(new):
        if isinstance(m, MixedLinear):
            m.adapter_ids = m.adapter_ids.replace(ids_B)
    return new


def with_small_batch_path(model, use: bool | None) -> nnx.Module:
    """A new model whose mixed-adapter modules take the all-adapters LoRA path (use=True), the gather path
    (False), or choose by shape (None, the default: `uses_small_batch_path`); module docstring, "Cost". Both give
    the same values to float rounding. A runtime setting: it changes the compiled program (the graph), not the
    state, the structure spec or checkpoints. The arrays are shared; `model` is untouched. AdapterError when `use`
    is not True, False or None, or the model has no mixed-adapter modules."""
    if not (use is None or isinstance(use, bool)):
        raise AdapterError(f"with_small_batch_path: use must be True, False or None, got {use!r}")
    if not mixed_modules(model):
        raise AdapterError("with_small_batch_path: the model has no mixed-adapter modules (bricks.adapters.mix)")
    new = nnx.clone(model)
    for _, m in nnx.iter_modules(new):
        if isinstance(m, MixedLinear):
            m.small_batch_path = use
    return new


def unmix(model) -> nnx.Module:
    """The base model: every mixed-adapter module replaced by a plain Linear holding its kernel and bias (the same
    arrays). AdapterError when the model has no mixed-adapter modules."""
    if not mixed_modules(model):
        raise AdapterError("unmix: the model has no mixed-adapter modules (bricks.adapters.mix)")
    return select(model).at_instances_of(MixedLinear).apply(lambda m: m.plain())
