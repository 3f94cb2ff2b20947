"""Averaging and spherical merge kernels: linear, slerp, nuslerp, multislerp, karcher, model_stock.

Each kernel follows mergekit 0.1.5 (``mergekit/merge_methods/<name>.py``) to float32 rounding, in the notation
of shared/research/merging.md section 1.3: base ``b`` (shape ``S``), inputs ``xs = [x_1 .. x_N]`` stacked
``(N, *S)`` in the order of ``models:`` minus the base, per-model parameters as ``(N,)`` float32 arrays and
shared parameters as scalars. Everything is computed in float32 and returned in float32. The kernels are pure and
wrapped in ``jax.jit`` (an eager call compiles once per shape and flag set; inside another jit or vmap they
inline); the parameters documented as static (boolean flags) must be Python values.

``compute_dtype`` (static; None, 'float16' or 'bfloat16', see precision.py): None is the float32 arithmetic
above. A reduced dtype reproduces mergekit's rounding when its YAML's ``dtype:`` is float16/bfloat16 (the inputs
must then be values of that dtype; the result is still a float32 array, of values of the compute dtype): each
method's docstring says where mergekit rounds. ``linear`` and ``slerp`` upcast to float32 in mergekit, so for
them only the result is rounded, once. Where the reduced mode needs care beyond precision.py's rules:
a float32 0-dim tensor (karcher's norms) enters a reduced-dtype op unrounded as its right operand but is cast
first as its left one; XLA turns x / broadcast(y) into x · (1/y), so the reduced mode divides with
`Arithmetic.div`.

Importing this module registers the methods in ``configurable_fm.ops.merge.registry``.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from configurable_fm.ops.merge.kernel_inputs import F32, as_f32, check_kernel_inputs
from configurable_fm.ops.merge.precision import Arithmetic, compute_dtype_name
from configurable_fm.ops.merge.registry import REQUIRED, MergeMethod, RowChunks, register
from configurable_fm.ops.merge.sparsify import as_double


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


def _python_sum(terms, a: Arithmetic):
    """Σ over the leading axis. Reduced: mergekit's Python `sum(...)` / `+=` loop, r(r(t_1 + t_2) + t_3) ...;
    float32: one reduction (as before)."""
    if not a.reduced:
        return jnp.sum(terms, axis=0)
    acc = terms[0]
    for i in range(1, terms.shape[0]):
        acc = a.r(acc + terms[i])
    return acc


# ----------------------------------------------------------------------------------------------------- linear
@functools.partial(jax.jit, static_argnames=("normalize", "compute_dtype"))
def linear(base, xs, *, key=None, weight, normalize: bool = True, compute_dtype=None):
    """Linear merge / model soup (Wortsman et al., 2022), mergekit ``linear``.

        y = Σ_i w_i x_i / (Σ_i w_i  if normalize else 1)

    xs (N, *S), weight (N,); accumulated in float32 in mergekit's order: ((w_1 x_1 + w_2 x_2) + ...) then
    divided by Σ w_i. The sum is unrolled over the (static, small) model axis: XLA:CPU runs a chain of fused
    adds at memory speed, about twice as fast as a tensordot over the stacked inputs. The base is ignored. As
    in mergekit there is no guard against Σ w_i = 0 with ``normalize`` (the result is then inf/nan).
    ``normalize`` is static.
    Reduced compute_dtype: the arithmetic stays float32 (mergekit upcasts: float32 weights and accumulator) and
    only the result is rounded to the compute dtype, once, as mergekit's ``.to(dtype)`` does.
    """
    a = Arithmetic.of(compute_dtype)
    check_kernel_inputs("linear", None, xs, base_use="ignored", n_min=1)
    xs = as_f32(xs)
    w = _per_model("linear", "weight", weight, xs.shape[0])
    y = w[0] * xs[0]
    for i in range(1, xs.shape[0]):
        y = a.fma(w[i], xs[i], y)  # reduced mode: rounded once, as torch's addcmul_ (a fused multiply-add)
    if normalize:
        y = a.div(y, jnp.sum(w))
    return a.r(y)


# ------------------------------------------------------------------------------------------------------ slerp
@functools.partial(jax.jit, static_argnames=("compute_dtype",))
def slerp(base, xs, *, key=None, t, dot_threshold: float = 0.9995, eps: float = 1e-8, compute_dtype=None):
    """Spherical linear interpolation from the base ``v0 = b`` to ``v1 = x_1``, mergekit ``slerp``.

    On the flattened tensors:  â = v0/‖v0‖, b̂ = v1/‖v1‖ (a norm ≤ eps is replaced by 1),
    dot = clamp(Σ â b̂, -1, 1);  if |dot| > dot_threshold (0.9995): y = (1-t) v0 + t v1;
    else θ = acos(dot), y = sin((1-t)θ)/sinθ · v0 + sin(tθ)/sinθ · v1  (the un-normalised tensors).
    So t=0 gives the base and t=1 gives x_1; a zero tensor has dot = 0 (θ = π/2), not the linear branch.
    xs (1, *S), t a scalar (may be traced: depth gradients give one t per tensor). Empty tensors: lerp.
    Reduced compute_dtype: the arithmetic stays float32 (mergekit upcasts every chunk) and only the result is
    rounded to the compute dtype, once, where mergekit stores it in a tensor of the input dtype.
    """
    r = Arithmetic.of(compute_dtype).r
    check_kernel_inputs("slerp", base, xs, base_use="required", n_min=1, n_max=1)
    t = as_f32(t)
    v0 = as_f32(base)
    v1 = as_f32(xs[0])
    shape = v0.shape
    a = v0.reshape(-1)
    b = v1.reshape(-1)
    if a.size == 0:
        return r((1 - t) * a + t * b).reshape(shape)
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
    arith = Arithmetic.of(compute_dtype)
    return r(arith.mul(coef_a, a) + arith.mul(coef_b, b)).reshape(shape)


# ---------------------------------------------------------------------------------------------------- nuslerp
def _nuslerp_vectors(t, one_minus_t, v0, v1, *, row_wise: bool, flatten: bool, a: Arithmetic):
    """mergekit ``nuslerp.nuslerp``: slerp of the vectors along the last axis (after the layout change)."""
    r = a.r
    shape = v0.shape
    transposed = False
    if flatten:
        v0 = v0.reshape(-1)
        v1 = v1.reshape(-1)
    elif row_wise and v0.ndim >= 1:
        v0 = jnp.swapaxes(v0, 0, -1)
        v1 = jnp.swapaxes(v1, 0, -1)
        transposed = True

    def unit(v):  # the clamp bound is a value of the compute dtype (torch casts it)
        return r(a.div(v, jnp.maximum(r(jnp.linalg.norm(v, axis=-1, keepdims=True)), a.const(1e-7))))

    cos = jnp.clip(r(jnp.sum(r(unit(v0) * unit(v1)), axis=-1, keepdims=True)), -1.0, 1.0)
    # mergekit: colinear iff 1 - cos² ≤ (1e-8)²; in float32 that is exactly |cos| == 1 (and in float16/bfloat16
    # too: none of their values lies in (0, 1e-16]).
    colinear = r(1 - r(jnp.square(cos))) <= 1e-16
    theta = r(jnp.arccos(jnp.where(colinear, 0.0, cos)))
    sin_theta = jnp.where(colinear, 1.0, r(jnp.sin(theta)))
    # t and 1 - t are Python floats in mergekit: they enter the reduced-dtype ops as float32, unrounded.
    y = a.div(r(r(r(jnp.sin(r(one_minus_t * theta))) * v0) + r(r(jnp.sin(r(t * theta))) * v1)), sin_theta)
    y = jnp.where(colinear, r(r(one_minus_t * v0) + r(t * v1)), r(y))
    if transposed:
        y = jnp.swapaxes(y, 0, -1)
    return y.reshape(shape)


def nuslerp(base, xs, *, key=None, weight, nuslerp_row_wise: bool = False, nuslerp_flatten: bool = True,
            compute_dtype=None):
    """NuSLERP, mergekit ``nuslerp``: slerp of two models with t = w_2/(w_1+w_2) (0.5 if |w_1+w_2| < 1e-6).

    With a base: y = b + slerp_t(x_1 - b, x_2 - b); without: y = slerp_t(x_1, x_2), where on vectors
    v0, v1:  u = v/max(‖v‖, 1e-7), cos = clamp(u0·u1, -1, 1); if 1 - cos² ≤ 1e-16 (colinear or antipodal,
    in float32 |cos| = 1) y = (1-t) v0 + t v1, else θ = acos(cos), y = (sin((1-t)θ) v0 + sin(tθ) v1)/sinθ.
    There is no 0.9995 threshold here (unlike ``slerp``). Vectors, as mergekit's code does them:
      nuslerp_flatten=True (default): the whole flattened tensor is one vector;
      flatten=False, row_wise=False:  each slice along the last axis (the rows W[i, :] of a matrix);
      flatten=False, row_wise=True:   each slice along axis 0 (the columns W[:, j]; axes 0 and -1 swapped).
    xs (2, *S), weight (2,); base optional. ``nuslerp_row_wise`` and ``nuslerp_flatten`` are static.
    Reduced compute_dtype: every tensor op rounds (the differences, ‖v‖, u, each product u0·u1 and their sum,
    1 - cos², θ, sin θ, (1-t)θ and tθ, their sines, each term, the quotient, + b). t and 1 - t are Python
    doubles in mergekit, rounded to float32 where they meet a tensor: with concrete weights they are computed
    so here (from the decimals the float32 weights were rounded from, as `sparsify.as_double` recovers them);
    traced weights are refused in the reduced mode (float32 arithmetic for t can be an ulp off and, through the
    cancellations of the reduced dtype, change some elements by many ulps), so the executor's kernel cache
    passes them as constants (execute.KernelCache: a concretization error bakes them in).
    """
    t_pair = None
    if compute_dtype_name(compute_dtype) is not None:
        w = as_double(weight)
        if w is None:
            np.asarray(weight)  # a tracer: TracerArrayConversionError, so the cache retries with concrete weights
        else:
            w = np.broadcast_to(w, (2,)) if w.ndim == 0 else w
            total = sum(float(v) for v in w)  # mergekit: sum(weights), then its Python arithmetic
            t = 0.5 if abs(total) < 1e-6 else float(w[1]) / total
            t_pair = (np.float32(t), np.float32(1 - t))
    return _nuslerp(base, xs, weight=weight, t_pair=t_pair, nuslerp_row_wise=nuslerp_row_wise,
                    nuslerp_flatten=nuslerp_flatten, compute_dtype=compute_dtype)


@functools.partial(jax.jit, static_argnames=("nuslerp_row_wise", "nuslerp_flatten", "compute_dtype"))
def _nuslerp(base, xs, *, weight, t_pair, nuslerp_row_wise: bool, nuslerp_flatten: bool, compute_dtype):
    a = Arithmetic.of(compute_dtype)
    check_kernel_inputs("nuslerp", base, xs, base_use="optional", n_min=2, n_max=2)
    xs = as_f32(xs)
    w = _per_model("nuslerp", "weight", weight, 2)
    if t_pair is None:
        total = w[0] + w[1]
        t = jnp.where(jnp.abs(total) < 1e-6, 0.5, w[1] / jnp.where(total == 0, 1.0, total))
        one_minus_t = 1 - t
    else:
        t, one_minus_t = t_pair
    v0, v1 = xs[0], xs[1]
    kw = dict(row_wise=nuslerp_row_wise, flatten=nuslerp_flatten, a=a)
    if base is not None:
        b = as_f32(base)
        return a.r(b + _nuslerp_vectors(t, one_minus_t, a.r(v0 - b), a.r(v1 - b), **kw))
    return _nuslerp_vectors(t, one_minus_t, v0, v1, **kw)


# ------------------------------------------------------------------------------------------------- multislerp
def multislerp(base, xs, *, key=None, weight, normalize_weights: bool = True, eps: float = 1e-8,
               compute_dtype=None):
    """Multi-SLERP, mergekit ``multislerp``: one tangent-space step towards the weighted spherical mean.

    v_i = x_i - b (or x_i without base), flattened; w ← w/Σw if normalize_weights;
    u_i = v_i/(‖v_i‖ + eps);  m̃ = Σ w_i u_i;  if ‖m̃‖ < eps: N = 2 → y = w_1 v_1 + w_2 v_2 (+ b), N > 2 → error;
    m = m̃/‖m̃‖;  τ_i = u_i - (u_i·m) m;  T = Σ w_i τ_i;  n = ‖T‖ + eps;
    y = (m cos n + T sin(n)/n) · Σ w_i ‖v_i‖  (+ b).     A single input is returned as it is.
    The N > 2 degenerate case raises ValueError when the values are concrete (eager), like mergekit; under
    jit it cannot raise and returns NaN. xs (N, *S), weight (N,); ``normalize_weights`` is static.
    Reduced compute_dtype: everything is a tensor of that dtype in mergekit, so every op rounds, the weights
    too (torch.tensor(weights, dtype): concrete weights are rounded from their decimals, see
    `sparsify.as_double`); the sums and norms accumulate in float32 and round once; eps enters the additions as
    float32 but ‖m̃‖ < eps compares with eps rounded to the compute dtype (in float16 that is 0: antipodal or
    identical inputs then give NaN, as in mergekit).
    """
    arith = Arithmetic.of(compute_dtype)
    if arith.reduced and as_double(weight) is not None:
        weight = arith.const(as_double(weight))
    y, degenerate = _multislerp(base, xs, weight=weight, normalize_weights=normalize_weights, eps=eps,
                                compute_dtype=compute_dtype)
    if jnp.shape(xs)[0] > 2 and _is_concrete(degenerate) and bool(degenerate):
        raise ValueError(
            "multislerp: the weighted sum of the unit input tensors is zero (antipodal inputs whose weights "
            "balance out); use different weights"
        )
    return y


@functools.partial(jax.jit, static_argnames=("normalize_weights", "compute_dtype"))
def _multislerp(base, xs, *, weight, normalize_weights: bool, eps: float, compute_dtype=None):
    a = Arithmetic.of(compute_dtype)
    r = a.r
    check_kernel_inputs("multislerp", base, xs, base_use="optional", n_min=1)
    xs = as_f32(xs)
    n_models = xs.shape[0]
    w = a.const(_per_model("multislerp", "weight", weight, n_models))
    if n_models == 1:
        return xs[0], jnp.asarray(False)
    shape = xs.shape[1:]
    b = None if base is None else as_f32(base)
    v = r(xs - b) if b is not None else xs
    flat = v.reshape(n_models, -1)
    if normalize_weights:
        w = r(a.div(w, r(jnp.sum(w))))
    norms = r(jnp.linalg.norm(flat, axis=-1, keepdims=True))
    units = r(a.div(flat, r(norms + eps)))
    mean = r(jnp.sum(r(units * w[:, None]), axis=0))
    mean_norm = r(jnp.linalg.norm(mean))
    degenerate = mean_norm < a.const(eps)  # torch compares in the tensor's dtype
    mean = r(a.div(mean, jnp.where(degenerate, 1.0, mean_norm)))
    dots = r(jnp.sum(r(units * mean), axis=-1, keepdims=True))
    tangents = r(units - r(dots * mean))
    tangent = r(jnp.sum(r(tangents * w[:, None]), axis=0))
    tangent_norm = r(r(jnp.linalg.norm(tangent)) + eps)
    y = r(r(mean * r(jnp.cos(tangent_norm))) + r(tangent * r(a.div(r(jnp.sin(tangent_norm)), tangent_norm))))
    y = r(y * r(jnp.sum(r(norms[:, 0] * w)))).reshape(shape)
    if n_models == 2:
        y = jnp.where(degenerate, r(r(v[0] * w[0]) + r(v[1] * w[1])), y)
    else:
        y = jnp.where(degenerate, jnp.nan, y)
    return (r(y + b) if b is not None else y), degenerate


# ---------------------------------------------------------------------------------------------------- karcher
@functools.partial(jax.jit, static_argnames=("arith",))
def _karcher_iterate(units, valid, alpha, mean, tol, max_iter, arith: Arithmetic = Arithmetic()):
    """The Riemannian gradient steps of `karcher` (a jitted helper: eager calls reuse the compiled loop)."""
    r = arith.r

    def tangent_step(mean):
        if not arith.reduced:  # all inputs at once
            dots = jnp.clip(units @ mean, -1.0, 1.0)
            theta = jnp.arccos(dots)
            take = valid & (theta >= tol)
            factor = jnp.where(take, alpha * theta / jnp.where(take, jnp.sin(theta), 1.0), 0.0)
            return jnp.sum(factor[:, None] * (units - dots[:, None] * mean[None, :]), axis=0)
        # mergekit's loop over the inputs: 0-dim tensors of the compute dtype, tangent += ... rounding each step
        tangent = jnp.zeros_like(mean)
        for i in range(units.shape[0]):
            dot = jnp.clip(r(jnp.dot(units[i], mean)), -1.0, 1.0)  # torch.dot: float32 sum, rounded once
            theta = r(jnp.arccos(dot))
            take = valid[i] & (theta >= tol)
            factor = r(alpha[i] * r(arith.div(theta, jnp.where(take, r(jnp.sin(theta)), 1.0))))
            tangent = jnp.where(take, r(tangent + r(factor * r(units[i] - r(dot * mean)))), tangent)
        return tangent

    def cond(state):
        i, _, done = state
        return (i < max_iter) & ~done

    def body(state):
        i, mean, _ = state
        tangent = tangent_step(mean)
        tangent_norm = jnp.linalg.norm(tangent)  # mergekit: float32 norms
        stop = tangent_norm < tol
        # A float32 0-dim tensor meeting a reduced-dtype tensor enters unrounded as the right operand
        # (T / ‖T‖) but is cast to the reduced dtype first as the left one (cos‖T‖ · m, sin‖T‖ · ...).
        step = r(arith.div(tangent, jnp.where(stop, 1.0, tangent_norm)))
        new = r(r(r(jnp.cos(tangent_norm)) * mean) + r(r(jnp.sin(tangent_norm)) * step))
        new_norm = jnp.linalg.norm(new)
        new = jnp.where(new_norm > tol, r(arith.div(new, jnp.where(new_norm > tol, new_norm, 1.0))), new)
        return i + 1, jnp.where(stop, mean, new), stop

    _, mean, _ = jax.lax.while_loop(cond, body, (jnp.asarray(0, jnp.int32), mean, jnp.asarray(False)))
    return mean


@functools.partial(jax.jit, static_argnames=("compute_dtype",))
def karcher(base, xs, *, key=None, max_iter: int = 10, tol: float = 1e-5, compute_dtype=None):
    """Karcher (Riemannian) mean on the unit sphere with equal weights α_i = 1/N, mergekit ``karcher``.

    On flattened tensors: u_i = x_i/‖x_i‖ (0 if ‖x_i‖ = 0); only inputs with ‖x_i‖ > tol take part (none:
    y = 0), with weights a_i = α_i/Σ_valid α; m = Σ a_i u_i normalised (or u of the first valid input if
    ‖Σ a_i u_i‖ < tol). Then at most ``max_iter`` steps:
        θ_i = acos(clamp(m·u_i, -1, 1));  T = Σ_{θ_i ≥ tol} a_i θ_i/sinθ_i (u_i - cos θ_i m);
        stop if ‖T‖ < tol;  m ← cos‖T‖ m + sin‖T‖ T/‖T‖, renormalised if ‖m‖ > tol.
    y = (Σ_i α_i ‖x_i‖) · m  (the sum over all inputs). A single input is returned as it is.
    The base is ignored (pass every model in xs). xs (N, *S); max_iter and tol may be traced.
    Reduced compute_dtype: the norms ‖·‖, ‖T‖ and the scale Σ α_i ‖x_i‖ are float32 (mergekit upcasts them);
    u_i, m, each θ_i, sin θ_i, each term of T and the running sums Σ a_i u_i and T (added in input order) are
    rounded, as are the updates of m and y.
    """
    a = Arithmetic.of(compute_dtype)
    check_kernel_inputs("karcher", None, xs, base_use="ignored", n_min=1)
    xs = as_f32(xs)
    n_models = xs.shape[0]
    if n_models == 1:
        return xs[0]
    shape = xs.shape[1:]
    flat = xs.reshape(n_models, -1)
    tol = as_f32(tol)
    norms = jnp.linalg.norm(flat, axis=-1)
    units = a.r(a.div(flat, jnp.where(norms == 0, 1.0, norms)[:, None]))  # zero tensor → zero unit vector
    valid = norms > tol
    n_valid = jnp.sum(valid)
    alpha = jnp.where(valid, 1.0 / jnp.maximum(n_valid, 1), 0.0).astype(F32)
    mean0 = _python_sum(a.r(alpha[:, None] * units), a)  # invalid inputs add 0: r(m + 0) = m
    mean0_norm = jnp.linalg.norm(mean0)
    first_valid = units[jnp.argmax(valid)]
    small = mean0_norm < tol
    mean0 = jnp.where(small, first_valid, a.r(a.div(mean0, jnp.where(small, 1.0, mean0_norm))))

    mean = _karcher_iterate(units, valid, alpha, mean0, tol, jnp.asarray(max_iter, jnp.int32), arith=a)
    if a.reduced:  # mergekit: Python sum(alpha * norm) of float32 0-dim tensors in input order, alpha = 1/N
        terms = norms * jnp.float32(1.0 / n_models)
        scale = terms[0]
        for i in range(1, n_models):
            scale = scale + terms[i]
    else:
        scale = jnp.sum(norms / n_models)
    y = a.r(a.r(scale) * mean).reshape(shape)  # scale: a float32 0-dim tensor on the left, cast first
    return jnp.where(jnp.any(valid), y, jnp.zeros(shape, F32))


# ------------------------------------------------------------------------------------------------ model_stock
@functools.partial(jax.jit, static_argnames=("filter_wise", "compute_dtype"))
def model_stock(base, xs, *, key=None, filter_wise: bool = False, compute_dtype=None):
    """Model Stock (Jang et al., 2024), mergekit ``model_stock``.

    off_i = x_i - b over the flattened tensor (filter_wise=False) or per slice along the last axis
    (filter_wise=True; a 1-D tensor is one slice);  cos = mean over pairs i<j of
    clamp(⟨off_i, off_j⟩ / max(‖off_i‖‖off_j‖, 1e-6), -1, 1);  t = N cos/(1 + (N-1) cos), with t = 0 where
    |1 + (N-1) cos| < 1e-6 (0.1.5's guard: keep the base);  y = t · mean_i(x_i) + (1 - t) · b.
    xs (N ≥ 2, *S); ``filter_wise`` is static.
    Reduced compute_dtype: every op rounds (offsets, norms, their product, each product off_i·off_j and its sum,
    the quotient, the mean of the cosines, (N-1) cos, the denominator, t, 1 - t, each term); the thresholds 1e-6
    are values of the compute dtype (torch casts them), and Σ x_i is mergekit's Python sum, rounded per addition.
    """
    a = Arithmetic.of(compute_dtype)
    r = a.r
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
    offsets = r(xs - w0)
    norms = r(jnp.linalg.norm(offsets, axis=-1))
    cos_pairs = []
    for i in range(n_models):
        for j in range(i + 1, n_models):
            prod = r(norms[i] * norms[j])
            dot = r(jnp.sum(r(offsets[i] * offsets[j]), axis=-1))
            cos_pairs.append(jnp.clip(r(a.div(dot, jnp.maximum(prod, a.const(1e-6)))), -1, 1))
    cos = r(a.div(jnp.sum(jnp.stack(cos_pairs), axis=0), len(cos_pairs)))[..., None]  # torch: float32 mean
    denominator = r(1 + r((n_models - 1) * cos))
    singular = jnp.abs(denominator) < a.const(1e-6)
    t = jnp.where(singular, 0.0, r(a.div(r(n_models * cos), jnp.where(singular, 1.0, denominator))))
    average = r(a.div(_python_sum(xs, a), n_models))
    return r(r(t * average) + r(r(1 - t) * w0)).reshape(shape)


# --------------------------------------------------------------------------------------------------- registry
register(MergeMethod(
    name="linear", kernel=linear, base="ignored", min_inputs=1,
    per_model={"weight": REQUIRED}, shared={"normalize": True}, chunks=RowChunks(),
    doc="weighted average Σ w_i x_i / Σ w_i (model soup)"))
register(MergeMethod(
    name="slerp", kernel=slerp, base="required", min_inputs=1, max_inputs=1,
    shared={"t": REQUIRED}, traced_scalars=("t",),
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
