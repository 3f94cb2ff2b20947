"""Growth masks (MSG, Yao et al. 2024): modules that fade new structure in with a ramp r in [0, 1].

    lin = MaskedLinear(base_linear, new=[(4, 6)], unit_size=8)   # input units 4, 5 (8 features each) are new
    norm = MaskedRMSNorm(base_norm, new=[(32, 48)])               # residual dims 32..47 are new
    lin.ramp[...] = 0.5                                            # a GrowthRamp: not a parameter

Both subclass the module they mask and keep its variables at the same paths (`kernel`, `bias`, `weight`), adding
one scalar `ramp` (a `GrowthRamp`, an nnx.Variable that is not a Param: the trainer carries it in its 'other'
partition and a task sets it, train/ramp.py). Which units are new is static structure (`new`: ranges
[start, stop) of unit indices), described by `structure_spec()` so that orbax checkpoints rebuild the modules
(models/structure.py, kinds 'masked_linear' and 'masked_rms_norm', registered when configurable_fm.models is
imported). The growth operator that puts them into a model is ops/grow/masked.py.

Per unit u the mask is m_u = 1 for an old unit and r for a new one.

MaskedLinear (an output projection: o_proj over heads of unit_size = head_dim features, down_proj over FFN units):
    y = x @ (m[:, None] * W) + b                  (m repeated unit_size times along the input features)
    y = r * (x @ W + b)                           when every unit is new (a new layer's branch: the bias is gated too)
so a new unit's (head's, layer's) contribution to the residual stream is scaled by r: r = 0 is the function without
it (whatever its weights), r = 1 the plain Linear.

MaskedRMSNorm (the residual stream grew from D to D' = D + N dims; statistics over the active dims, MSG's masked
norm):
    x_m = x * m,   y = x_m / sqrt(sum(x_m^2) / (D + r N) + eps) * g
r = 0: the new dims read as 0 and the statistics are those of the D old dims (the source's RMSNorm, same eps);
r = 1: the plain RMSNorm over D' dims. (eps stays outside the active-width scaling so that both ends are exact.)
"""
from __future__ import annotations

from typing import Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from configurable_fm.models.layers import Linear, RMSNorm
from configurable_fm.models.structure import register_extension
from configurable_fm.models.taps import tapped

MASK_KINDS = ("masked_linear", "masked_rms_norm")


class GrowthRamp(nnx.Variable):
    """How far new structure is faded in: a float32 scalar r, 0 right after growth, 1 when fully on. Not a
    parameter (no gradient, no optimizer state); select it as trainable only to learn it ('GrowthRamp:**')."""


def normalize_ranges(new: Iterable[Sequence[int]], units: int, what: str) -> tuple[tuple[int, int], ...]:
    """`new` as sorted, merged, non-empty ranges (start, stop) within 0..units; ValueError naming `what` otherwise."""
    spans = []
    for item in new:
        try:
            a, b = (int(v) for v in item)
        except (TypeError, ValueError):
            raise ValueError(f"{what}: new ranges must be [start, stop) pairs of ints, got {item!r}") from None
        if not 0 <= a < b <= units:
            raise ValueError(f"{what}: new range [{a}, {b}) is not a non-empty range within 0..{units}")
        spans.append((a, b))
    out: list[tuple[int, int]] = []
    for a, b in sorted(spans):
        if out and a <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], b))
        else:
            out.append((a, b))
    return tuple(out)


def ranges_of(flags: Sequence[bool]) -> tuple[tuple[int, int], ...]:
    """The maximal ranges [start, stop) where `flags` is true: ranges_of([0, 1, 1, 0, 1]) == ((1, 3), (4, 5))."""
    out, start = [], None
    for i, f in enumerate(list(flags) + [False]):
        if f and start is None:
            start = i
        elif not f and start is not None:
            out.append((start, i))
            start = None
    return tuple(out)


def _flags(new: tuple[tuple[int, int], ...], units: int) -> np.ndarray:
    flags = np.zeros(units, bool)
    for a, b in new:
        flags[a:b] = True
    return flags


def _ramp(value) -> GrowthRamp:
    return GrowthRamp(jnp.asarray(value, jnp.float32).reshape(()))


class MaskedLinear(Linear):
    """A Linear whose input units in `new` (ranges of units of `unit_size` features) are scaled by the ramp
    (module docstring). Holds the wrapped Linear's kernel and bias (same paths) and `ramp`."""

    def __init__(self, base: Linear, *, new: Iterable[Sequence[int]], unit_size: int = 1, ramp: float = 0.0):
        d_in = base.kernel.shape[0]
        unit_size = int(unit_size)
        if unit_size < 1 or d_in % unit_size:
            raise ValueError(f"MaskedLinear: unit_size={unit_size} does not divide the {d_in} input features")
        self.kernel, self.bias, self.dtype = base.kernel, base.bias, base.dtype
        self.unit_size = unit_size
        self.new = normalize_ranges(new, d_in // unit_size, "MaskedLinear")
        self.ramp = _ramp(ramp)

    @property
    def whole(self) -> bool:
        """True when every unit is new (the bias is then gated too)."""
        return self.new == ((0, self.kernel.shape[0] // self.unit_size),)

    def mask(self) -> jax.Array:
        """m per input feature (float32): 1 for old units, r for new ones."""
        flags = np.repeat(_flags(self.new, self.kernel.shape[0] // self.unit_size), self.unit_size)
        return jnp.where(flags, self.ramp[...].astype(jnp.float32), jnp.float32(1.0))

    def structure_spec(self):
        return {"kind": "masked_linear", "options": {"new": [list(r) for r in self.new],
                                                     "unit_size": self.unit_size}}

    @tapped
    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.kernel[...]
        dtype = self.dtype or jnp.result_type(x, kernel)
        r = self.ramp[...].astype(jnp.float32)
        if self.whole:
            y = jnp.dot(x.astype(dtype), kernel.astype(dtype))
            if self.bias is not None:
                y = y + self.bias[...].astype(dtype)
            return y * r.astype(dtype)
        y = jnp.dot(x.astype(dtype), (self.mask()[:, None] * kernel).astype(dtype))
        if self.bias is not None:
            y = y + self.bias[...].astype(dtype)
        return y


class MaskedRMSNorm(RMSNorm):
    """An RMSNorm over a residual stream whose dims in `new` are faded in by the ramp, with statistics over the
    active dims (module docstring). Holds the wrapped norm's weight (same path), eps and `ramp`."""

    def __init__(self, base: RMSNorm, *, new: Iterable[Sequence[int]], ramp: float = 0.0):
        self.weight, self.eps = base.weight, base.eps
        self.new = normalize_ranges(new, base.weight.shape[0], "MaskedRMSNorm")
        self.ramp = _ramp(ramp)

    def mask(self) -> jax.Array:
        """m per dim (float32): 1 for old dims, r for new ones."""
        return jnp.where(_flags(self.new, self.weight.shape[0]), self.ramp[...].astype(jnp.float32),
                         jnp.float32(1.0))

    def structure_spec(self):
        return {"kind": "masked_rms_norm", "options": {"new": [list(r) for r in self.new]}}

    @tapped
    def __call__(self, x: jax.Array) -> jax.Array:
        m = self.mask()
        xm = x.astype(jnp.float32) * m
        active = jnp.sum(m)  # D + r N
        y = xm * jax.lax.rsqrt(jnp.sum(xm * xm, axis=-1, keepdims=True) / active + self.eps)
        return (y * self.weight[...].astype(jnp.float32)).astype(x.dtype)


def growth_ramps(model) -> dict[str, GrowthRamp]:
    """{dotted path: GrowthRamp variable} of every growth ramp in `model`, in the model's order."""
    from configurable_fm.models.structure import variables_of

    return {p: v for p, v in variables_of(model).items() if isinstance(v, GrowthRamp)}


register_extension("masked_linear", lambda base, options, *, rngs: MaskedLinear(base, **options))
register_extension("masked_rms_norm", lambda base, options, *, rngs: MaskedRMSNorm(base, **options))
