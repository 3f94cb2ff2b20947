"""Averaging and spherical merge kernels: linear, slerp, nuslerp, multislerp, karcher, model_stock.

Each kernel follows mergekit 0.1.5 (``mergekit/merge_methods/<name>.py``) to float32 rounding, in the notation
of shared/research/merging.md section 1.3: base ``b`` (shape ``S``), inputs ``xs = [x_1 .. x_N]`` stacked
``(N, *S)`` in the order of ``models:`` minus the base, per-model parameters as ``(N,)`` float32 arrays and
shared parameters as scalars. Everything is computed in float32 and returned in float32. The kernels are pure and
wrapped in ``jax.jit`` (an eager call compiles once per shape and flag set; inside another jit or vmap they
inline); the parameters documented as static (boolean flags) must be Python values.

Importing this module registers the methods in ``configurable_fm.ops.merge.registry``.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from configurable_fm.ops.merge.kernel_inputs import F32, as_f32, check_kernel_inputs
from configurable_fm.ops.merge.registry import REQUIRED, MergeMethod, register


def _per_model(name: str, param: str, value, n: int):
    if value is None:
        raise ValueError(f"{name}: parameter {param!r} is required (one value per model)")
    v = as_f32(value)
    if v.ndim == 0:
        v = jnp.broadcast_to(v, (n,))
    if v.shape != (n,):
        raise ValueError(f"{name}: parameter {param!r} must have one value per model ({n}), got shape {v.shape}")
    return v


def _is_concrete(x) -> bool:
    return not isinstance(x, jax.core.Tracer)


# ----------------------------------------------------------------------------------------------------- linear
@functools.partial(jax.jit, static_argnames=("normalize",))
def linear(base, xs, *, key=None, weight, normalize: bool = True):
    """Linear merge / model soup (Wortsman et al., 2022), mergekit ``linear``.

        y = Σ_i w_i x_i / (Σ_i w_i  if normalize else 1)

    xs (N, *S), weight (N,); accumulated in float32 in mergekit's order: ((w_1 x_1 + w_2 x_2) + ...) then
    divided by Σ w_i. The sum is unrolled over the (static, small) model axis: XLA:CPU runs a chain of fused
    adds at memory speed, about twice as fast as a tensordot over the stacked inputs. The base is ignored. As
    in mergekit there is no guard against Σ w_i = 0 with ``normalize`` (the result is then inf/nan).
    ``normalize`` is static.
    """
    check_kernel_inputs("linear", None, xs, base_use="ignored", n_min=1)
    xs = as_f32(xs)
    w = _per_model("linear", "weight", weight, xs.shape[0])
    y = w[0] * xs[0]
    for i in range(1, xs.shape[0]):
        y = y + w[i] * xs[i]
    if normalize:
        y = y / jnp.sum(w)
    return y


# ------------------------------------------------------------------------------------------------------ slerp
@jax.jit
def slerp(base, xs, *, key=None, t, dot_threshold: float = 0.9995, eps: float = 1e-8):
    """Spherical linear interpolation from the base ``v0 = b`` to ``v1 = x_1``, mergekit ``slerp``.

    On the flattened tensors:  â = v0/‖v0‖, b̂ = v1/‖v1‖ (a norm ≤ eps is replaced by 1),
    dot = clamp(Σ â b̂, -1, 1);  if |dot| > dot_threshold (0.9995): y = (1-t) v0 + t v1;
    else θ = acos(dot), y = sin((1-t)θ)/sinθ · v0 + sin(tθ)/sinθ · v1  (the un-normalised tensors).
    So t=0 gives the base and t=1 gives x_1; a zero tensor has dot = 0 (θ = π/2), not the linear branch.
    xs (1, *S), t a scalar (may be traced: depth gradients give one t per tensor). Empty tensors: lerp.
    """
    check_kernel_inputs("slerp", base, xs, base_use="required", n_min=1, n_max=1)
    t = as_f32(t)
    v0 = as_f32(base)
    v1 = as_f32(xs[0])
    shape = v0.shape
    a = v0.reshape(-1)
    b = v1.reshape(-1)
    if a.size == 0:
        return ((1 - t) * a + t * b).reshape(shape)
    norm_a = jnp.linalg.norm(a)
    norm_b = jnp.linalg.norm(b)
    norm_a = jnp.where(norm_a > eps, norm_a, 1.0)
    norm_b = jnp.where(norm_b > eps, norm_b, 1.0)
    dot = jnp.clip(jnp.sum((a / norm_a) * (b / norm_b)), -1.0, 1.0)
    lin = jnp.abs(dot) > dot_threshold
    theta = jnp.arccos(jnp.where(lin, 0.0, dot))
    sin_theta = jnp.where(lin, 1.0, jnp.sin(theta))  # keep the unselected branch finite
    coef_a = jnp.where(lin, 1 - t, jnp.sin((1 - t) * theta) / sin_theta)
    coef_b = jnp.where(lin, t, jnp.sin(t * theta) / sin_theta)
    return (coef_a * a + coef_b * b).reshape(shape)


# ---------------------------------------------------------------------------------------------------- nuslerp
def _nuslerp_vectors(t, v0, v1, *, row_wise: bool, flatten: bool):
    """mergekit ``nuslerp.nuslerp``: slerp of the vectors along the last axis (after the layout change)."""
    shape = v0.shape
    transposed = False
    if flatten:
        v0 = v0.reshape(-1)
        v1 = v1.reshape(-1)
    elif row_wise and v0.ndim >= 1:
        v0 = jnp.swapaxes(v0, 0, -1)
        v1 = jnp.swapaxes(v1, 0, -1)
        transposed = True

    def unit(v):
        return v / jnp.maximum(jnp.linalg.norm(v, axis=-1, keepdims=True), 1e-7)

    cos = jnp.clip(jnp.sum(unit(v0) * unit(v1), axis=-1, keepdims=True), -1.0, 1.0)
    # mergekit: colinear iff 1 - cos² ≤ (1e-8)²; in float32 that is exactly |cos| == 1.
    colinear = (1 - jnp.square(cos)) <= 1e-16
    theta = jnp.arccos(jnp.where(colinear, 0.0, cos))
    sin_theta = jnp.where(colinear, 1.0, jnp.sin(theta))
    y = (jnp.sin((1 - t) * theta) * v0 + jnp.sin(t * theta) * v1) / sin_theta
    y = jnp.where(colinear, (1 - t) * v0 + t * v1, y)
    if transposed:
        y = jnp.swapaxes(y, 0, -1)
    return y.reshape(shape)


@functools.partial(jax.jit, static_argnames=("nuslerp_row_wise", "nuslerp_flatten"))
def nuslerp(base, xs, *, key=None, weight, nuslerp_row_wise: bool = False, nuslerp_flatten: bool = True):
    """NuSLERP, mergekit ``nuslerp``: slerp of two models with t = w_2/(w_1+w_2) (0.5 if |w_1+w_2| < 1e-6).

    With a base: y = b + slerp_t(x_1 - b, x_2 - b); without: y = slerp_t(x_1, x_2), where on vectors
    v0, v1:  u = v/max(‖v‖, 1e-7), cos = clamp(u0·u1, -1, 1); if 1 - cos² ≤ 1e-16 (colinear or antipodal,
    in float32 |cos| = 1) y = (1-t) v0 + t v1, else θ = acos(cos), y = (sin((1-t)θ) v0 + sin(tθ) v1)/sinθ.
    There is no 0.9995 threshold here (unlike ``slerp``). Vectors, as mergekit's code does them:
      nuslerp_flatten=True (default): the whole flattened tensor is one vector;
      flatten=False, row_wise=False:  each slice along the last axis (the rows W[i, :] of a matrix);
      flatten=False, row_wise=True:   each slice along axis 0 (the columns W[:, j]; axes 0 and -1 swapped).
    xs (2, *S), weight (2,); base optional. ``nuslerp_row_wise`` and ``nuslerp_flatten`` are static.
    """
    check_kernel_inputs("nuslerp", base, xs, base_use="optional", n_min=2, n_max=2)
    xs = as_f32(xs)
    w = _per_model("nuslerp", "weight", weight, 2)
    total = w[0] + w[1]
    t = jnp.where(jnp.abs(total) < 1e-6, 0.5, w[1] / jnp.where(total == 0, 1.0, total))
    v0, v1 = xs[0], xs[1]
    if base is not None:
        b = as_f32(base)
        return b + _nuslerp_vectors(t, v0 - b, v1 - b, row_wise=nuslerp_row_wise, flatten=nuslerp_flatten)
    return _nuslerp_vectors(t, v0, v1, row_wise=nuslerp_row_wise, flatten=nuslerp_flatten)


# ------------------------------------------------------------------------------------------------- multislerp
def multislerp(base, xs, *, key=None, weight, normalize_weights: bool = True, eps: float = 1e-8):
    """Multi-SLERP, mergekit ``multislerp``: one tangent-space step towards the weighted spherical mean.

    v_i = x_i - b (or x_i without base), flattened; w ← w/Σw if normalize_weights;
    u_i = v_i/(‖v_i‖ + eps);  m̃ = Σ w_i u_i;  if ‖m̃‖ < eps: N = 2 → y = w_1 v_1 + w_2 v_2 (+ b), N > 2 → error;
    m = m̃/‖m̃‖;  τ_i = u_i - (u_i·m) m;  T = Σ w_i τ_i;  n = ‖T‖ + eps;
    y = (m cos n + T sin(n)/n) · Σ w_i ‖v_i‖  (+ b).     A single input is returned as it is.
    The N > 2 degenerate case raises ValueError when the values are concrete (eager), like mergekit; under
    jit it cannot raise and returns NaN. xs (N, *S), weight (N,); ``normalize_weights`` is static.
    """
    y, degenerate = _multislerp(base, xs, weight=weight, normalize_weights=normalize_weights, eps=eps)
    if jnp.shape(xs)[0] > 2 and _is_concrete(degenerate) and bool(degenerate):
        raise ValueError(
            "multislerp: the weighted sum of the unit input tensors is zero (antipodal inputs whose weights "
            "balance out); use different weights"
        )
    return y


@functools.partial(jax.jit, static_argnames=("normalize_weights",))
def _multislerp(base, xs, *, weight, normalize_weights: bool, eps: float):
    check_kernel_inputs("multislerp", base, xs, base_use="optional", n_min=1)
    xs = as_f32(xs)
    n_models = xs.shape[0]
    w = _per_model("multislerp", "weight", weight, n_models)
    if n_models == 1:
        return xs[0], jnp.asarray(False)
    shape = xs.shape[1:]
    b = None if base is None else as_f32(base)
    v = xs - b if b is not None else xs
    flat = v.reshape(n_models, -1)
    if normalize_weights:
        w = w / jnp.sum(w)
    norms = jnp.linalg.norm(flat, axis=-1, keepdims=True)
    units = flat / (norms + eps)
    mean = jnp.sum(units * w[:, None], axis=0)
    mean_norm = jnp.linalg.norm(mean)
    degenerate = mean_norm < eps
    mean = mean / jnp.where(degenerate, 1.0, mean_norm)
    dots = jnp.sum(units * mean, axis=-1, keepdims=True)
    tangents = units - dots * mean
    tangent = jnp.sum(tangents * w[:, None], axis=0)
    tangent_norm = jnp.linalg.norm(tangent) + eps
    y = mean * jnp.cos(tangent_norm) + tangent * (jnp.sin(tangent_norm) / tangent_norm)
    y = (y * jnp.sum(norms[:, 0] * w)).reshape(shape)
    if n_models == 2:
        y = jnp.where(degenerate, v[0] * w[0] + v[1] * w[1], y)
    else:
        y = jnp.where(degenerate, jnp.nan, y)
    return (y + b if b is not None else y), degenerate


# ---------------------------------------------------------------------------------------------------- karcher
@jax.jit
def _karcher_iterate(units, valid, a, mean, tol, max_iter):
    """The Riemannian gradient steps of `karcher` (a jitted helper: eager calls reuse the compiled loop)."""

    def cond(state):
        i, _, done = state
        return (i < max_iter) & ~done

    def body(state):
        i, mean, _ = state
        dots = jnp.clip(units @ mean, -1.0, 1.0)
        theta = jnp.arccos(dots)
        take = valid & (theta >= tol)
        factor = jnp.where(take, a * theta / jnp.where(take, jnp.sin(theta), 1.0), 0.0)
        tangent = jnp.sum(factor[:, None] * (units - dots[:, None] * mean[None, :]), axis=0)
        tangent_norm = jnp.linalg.norm(tangent)
        stop = tangent_norm < tol
        new = jnp.cos(tangent_norm) * mean + jnp.sin(tangent_norm) * (tangent / jnp.where(stop, 1.0, tangent_norm))
        new_norm = jnp.linalg.norm(new)
        new = jnp.where(new_norm > tol, new / jnp.where(new_norm > tol, new_norm, 1.0), new)
        return i + 1, jnp.where(stop, mean, new), stop

    _, mean, _ = jax.lax.while_loop(cond, body, (jnp.asarray(0, jnp.int32), mean, jnp.asarray(False)))
    return mean


@jax.jit
def karcher(base, xs, *, key=None, max_iter: int = 10, tol: float = 1e-5):
    """Karcher (Riemannian) mean on the unit sphere with equal weights α_i = 1/N, mergekit ``karcher``.

    On flattened tensors: u_i = x_i/‖x_i‖ (0 if ‖x_i‖ = 0); only inputs with ‖x_i‖ > tol take part (none:
    y = 0), with weights a_i = α_i/Σ_valid α; m = Σ a_i u_i normalised (or u of the first valid input if
    ‖Σ a_i u_i‖ < tol). Then at most ``max_iter`` steps:
        θ_i = acos(clamp(m·u_i, -1, 1));  T = Σ_{θ_i ≥ tol} a_i θ_i/sinθ_i (u_i - cos θ_i m);
        stop if ‖T‖ < tol;  m ← cos‖T‖ m + sin‖T‖ T/‖T‖, renormalised if ‖m‖ > tol.
    y = (Σ_i α_i ‖x_i‖) · m  (the sum over all inputs). A single input is returned as it is.
    The base is ignored (pass every model in xs). xs (N, *S); max_iter and tol may be traced.
    """
    check_kernel_inputs("karcher", None, xs, base_use="ignored", n_min=1)
    xs = as_f32(xs)
    n_models = xs.shape[0]
    if n_models == 1:
        return xs[0]
    shape = xs.shape[1:]
    flat = xs.reshape(n_models, -1)
    tol = as_f32(tol)
    norms = jnp.linalg.norm(flat, axis=-1)
    units = flat / jnp.where(norms == 0, 1.0, norms)[:, None]  # zero tensor → zero unit vector
    valid = norms > tol
    n_valid = jnp.sum(valid)
    a = jnp.where(valid, 1.0 / jnp.maximum(n_valid, 1), 0.0).astype(F32)
    mean0 = jnp.sum(a[:, None] * units, axis=0)
    mean0_norm = jnp.linalg.norm(mean0)
    first_valid = units[jnp.argmax(valid)]
    mean0 = jnp.where(mean0_norm < tol, first_valid, mean0 / jnp.where(mean0_norm < tol, 1.0, mean0_norm))

    mean = _karcher_iterate(units, valid, a, mean0, tol, jnp.asarray(max_iter, jnp.int32))
    scale = jnp.sum(norms / n_models)
    y = (scale * mean).reshape(shape)
    return jnp.where(jnp.any(valid), y, jnp.zeros(shape, F32))


# ------------------------------------------------------------------------------------------------ model_stock
@functools.partial(jax.jit, static_argnames=("filter_wise",))
def model_stock(base, xs, *, key=None, filter_wise: bool = False):
    """Model Stock (Jang et al., 2024), mergekit ``model_stock``.

    off_i = x_i - b over the flattened tensor (filter_wise=False) or per slice along the last axis
    (filter_wise=True; a 1-D tensor is one slice);  cos = mean over pairs i<j of
    clamp(⟨off_i, off_j⟩ / max(‖off_i‖‖off_j‖, 1e-6), -1, 1);  t = N cos/(1 + (N-1) cos), with t = 0 where
    |1 + (N-1) cos| < 1e-6 (0.1.5's guard: keep the base);  y = t · mean_i(x_i) + (1 - t) · b.
    xs (N ≥ 2, *S); ``filter_wise`` is static.
    """
    check_kernel_inputs("model_stock", base, xs, base_use="required", n_min=2)
    xs = as_f32(xs)
    w0 = as_f32(base)
    n_models = xs.shape[0]
    shape = w0.shape
    if filter_wise:
        if w0.ndim <= 1:
            w0 = w0.reshape(1, -1)
            xs = xs.reshape(n_models, 1, -1)
    else:
        w0 = w0.reshape(-1)
        xs = xs.reshape(n_models, -1)
    offsets = xs - w0
    norms = jnp.linalg.norm(offsets, axis=-1)
    cos_pairs = []
    for i in range(n_models):
        for j in range(i + 1, n_models):
            prod = norms[i] * norms[j]
            cos_pairs.append(jnp.clip(jnp.sum(offsets[i] * offsets[j], axis=-1) / jnp.maximum(prod, 1e-6), -1, 1))
    cos = jnp.mean(jnp.stack(cos_pairs), axis=0)[..., None]
    denominator = 1 + (n_models - 1) * cos
    singular = jnp.abs(denominator) < 1e-6
    t = jnp.where(singular, 0.0, (n_models * cos) / jnp.where(singular, 1.0, denominator))
    average = jnp.sum(xs, axis=0) / n_models
    return (t * average + (1 - t) * w0).reshape(shape)


# --------------------------------------------------------------------------------------------------- registry
register(MergeMethod(
    name="linear", kernel=linear, base="ignored", min_inputs=1,
    per_model={"weight": REQUIRED}, shared={"normalize": True},
    doc="weighted average Σ w_i x_i / Σ w_i (model soup)"))
register(MergeMethod(
    name="slerp", kernel=slerp, base="required", min_inputs=1, max_inputs=1,
    shared={"t": REQUIRED},
    doc="spherical interpolation from the base (t=0) to the other model (t=1)"))
register(MergeMethod(
    name="nuslerp", kernel=nuslerp, base="optional", min_inputs=2, max_inputs=2,
    per_model={"weight": REQUIRED}, shared={"nuslerp_row_wise": False, "nuslerp_flatten": True},
    doc="slerp of two models (or their task vectors) with t = w_2/(w_1+w_2)"))
register(MergeMethod(
    name="multislerp", kernel=multislerp, base="optional", min_inputs=1,
    per_model={"weight": REQUIRED}, shared={"normalize_weights": True, "eps": 1e-8},
    doc="barycentric interpolation on the hypersphere (one tangent-space step)"))
register(MergeMethod(
    name="karcher", kernel=karcher, base="ignored", min_inputs=1,
    shared={"max_iter": 10, "tol": 1e-5},
    doc="equal-weight Karcher mean on the unit sphere, rescaled by the mean norm"))
register(MergeMethod(
    name="model_stock", kernel=model_stock, base="required", min_inputs=2,
    shared={"filter_wise": False},
    doc="interpolate between the base and the average by the task vectors' mean pairwise cosine"))
