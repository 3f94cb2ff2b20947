"""A small gradient-free minimiser: CMA-ES in numpy, seeded, with box bounds and a fixed evaluation budget.

    result = cma_es(f, x0=np.zeros(3), sigma0=0.5, budget=40, lower=-1.5, upper=1.5, seed=0)
    result.x, result.f            # the best point evaluated and its value
    result.trace, result.points   # f of every evaluation (budget,), and the points (budget, n), in order

(μ/μ_w, λ)-CMA-ES with the default parameters of Hansen, "The CMA Evolution Strategy: A Tutorial" (2016), for
dimension n:
    λ = 4 + ⌊3 ln n⌋ (popsize),  μ = ⌊λ/2⌋,  w_i ∝ ln(μ + ½) − ln i (i = 1..μ, Σ w_i = 1),  μ_eff = 1 / Σ w_i²
    c_σ = (μ_eff + 2) / (n + μ_eff + 5),  d_σ = 1 + 2 max(0, √((μ_eff − 1)/(n + 1)) − 1) + c_σ
    c_c = (4 + μ_eff/n) / (n + 4 + 2μ_eff/n),  c_1 = 2 / ((n + 1.3)² + μ_eff)
    c_μ = min(1 − c_1, 2 (μ_eff − 2 + 1/μ_eff) / ((n + 2)² + μ_eff)),  E||N(0, I)|| ≈ √n (1 − 1/(4n) + 1/(21n²))
Each generation samples y_k = B D z_k (z_k ~ N(0, I), C = B D² Bᵀ), x_k = m + σ y_k; ranks them by f; moves the mean
m ← m + σ Σ_i w_i y_(i); updates the evolution paths p_σ, p_c (with the h_σ stall of p_c), the covariance
C ← (1 − c_1 − c_μ + (1 − h_σ) c_1 c_c (2 − c_c)) C + c_1 p_c p_cᵀ + c_μ Σ_i w_i y_(i) y_(i)ᵀ and the step size
σ ← σ exp((c_σ/d_σ)(||p_σ|| / E||N(0, I)|| − 1)).

Choices (documented deviations from a textbook CMA-ES):
* Budget: exactly `budget` evaluations of f, the first at x0 itself (so the trace starts with f(x0)); a last
  generation that the budget cuts short is evaluated but not used for an update.
* Bounds: a sample outside [lower, upper] is reflected once at the violated bound (nevergrad's default "bouncing"
  for bounded arrays), then clipped; the repaired point is what is evaluated and what the update uses (y =
  (x_repaired − m)/σ), so the mean, a positive combination of repaired points, stays inside the box.
* The result is the best point evaluated (not the final mean): f is deterministic here, so the best evaluation
  is the honest recommendation and costs nothing more.
* Randomness: numpy's Generator(PCG64(seed)); the same seed, f and options give the same points, bit for bit.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable

import numpy as np

from configurable_fm.checks import is_int
from configurable_fm.ops.route.common import RouteError


@dataclasses.dataclass(frozen=True)
class SearchResult:
    """The best point `x` (n,) and its value `f`; `trace` (budget,): f of each evaluation in order; `points`
    (budget, n): the points evaluated; `generations`: the CMA-ES updates made; `sigma`: the final step size."""

    x: np.ndarray
    f: float
    trace: np.ndarray
    points: np.ndarray
    generations: int
    sigma: float

    @property
    def best_trace(self) -> np.ndarray:
        """The best value found after each evaluation (the running minimum of `trace`)."""
        return np.minimum.accumulate(self.trace)


def _bounds(value, n: int, name: str, default: float) -> np.ndarray:
    """A bound as (n,) float64: `default` (±inf) for None, else `value` broadcast; RouteError naming it."""
    if value is None:
        return np.full((n,), default)
    try:
        arr = np.broadcast_to(np.asarray(value, np.float64), (n,)).copy()
    except (TypeError, ValueError):
        raise RouteError(f"cma_es: {name} must be a number or one per coordinate ({n}), got {value!r}") from None
    if np.isnan(arr).any():
        raise RouteError(f"cma_es: {name} bound is NaN")
    return arr


def repair(x: np.ndarray, lower: np.ndarray, upper: np.ndarray) -> np.ndarray:
    """x reflected once at the violated bounds, then clipped into [lower, upper] (module docstring)."""
    x = np.where(x > upper, 2 * upper - x, np.where(x < lower, 2 * lower - x, x))
    return np.clip(x, lower, upper)


def cma_es(f: Callable[[np.ndarray], float], x0, *, sigma0: float, budget: int, lower=None, upper=None,
           seed: int = 0, popsize: int | None = None) -> SearchResult:
    """Minimises f over the box [lower, upper] (scalars or (n,); None: unbounded) with `budget` evaluations of
    CMA-ES started at x0 with step size sigma0 (module docstring: parameters and choices). f takes a float64
    (n,) array and returns a finite number (a non-finite value ranks last). RouteError for a bad budget, sigma0,
    popsize, or an x0 outside the box."""
    x0 = np.asarray(x0, np.float64).reshape(-1)
    n = int(x0.size)
    if n < 1:
        raise RouteError("cma_es: x0 must have at least one coordinate")
    if not np.isfinite(x0).all():
        raise RouteError(f"cma_es: x0 must be finite, got {x0.tolist()}")
    if not is_int(budget) or budget < 1:
        raise RouteError(f"cma_es: budget must be an int >= 1 (evaluations of f), got {budget!r}")
    if not (isinstance(sigma0, (int, float)) and math.isfinite(sigma0) and sigma0 > 0):
        raise RouteError(f"cma_es: sigma0 must be a finite number > 0, got {sigma0!r}")
    lo, hi = _bounds(lower, n, "lower", -np.inf), _bounds(upper, n, "upper", np.inf)
    if (lo > hi).any() or (x0 < lo).any() or (x0 > hi).any():
        raise RouteError(f"cma_es: x0 {x0.tolist()} must lie in [lower, upper] = [{lo.tolist()}, {hi.tolist()}]")
    lam = 4 + int(3 * math.log(n)) if popsize is None else popsize
    if not is_int(lam) or lam < 2:
        raise RouteError(f"cma_es: popsize must be an int >= 2, got {popsize!r}")
    mu = lam // 2
    w = math.log(mu + 0.5) - np.log(np.arange(1, mu + 1))
    w = w / w.sum()
    mueff = 1.0 / float(np.sum(w ** 2))
    cs = (mueff + 2) / (n + mueff + 5)
    ds = 1 + 2 * max(0.0, math.sqrt((mueff - 1) / (n + 1)) - 1) + cs
    cc = (4 + mueff / n) / (n + 4 + 2 * mueff / n)
    c1 = 2 / ((n + 1.3) ** 2 + mueff)
    cmu = min(1 - c1, 2 * (mueff - 2 + 1 / mueff) / ((n + 2) ** 2 + mueff))
    chi_n = math.sqrt(n) * (1 - 1 / (4 * n) + 1 / (21 * n ** 2))

    rng = np.random.Generator(np.random.PCG64(seed))
    mean, sigma = x0.copy(), float(sigma0)
    cov, basis, scales = np.eye(n), np.eye(n), np.ones(n)
    p_sigma, p_c = np.zeros(n), np.zeros(n)
    trace, points = [], []

    def evaluate(x: np.ndarray) -> float:
        value = float(f(x.copy()))
        trace.append(value)
        points.append(x.copy())
        return value if math.isfinite(value) else math.inf

    evaluate(mean)
    generation = 0
    while len(trace) < budget:
        z = rng.standard_normal((lam, n))
        xs = repair(mean + sigma * (z * scales) @ basis.T, lo, hi)
        count = min(lam, budget - len(trace))
        values = np.array([evaluate(x) for x in xs[:count]])
        if count < lam:
            break
        order = np.argsort(values, kind="stable")[:mu]
        ys = (xs[order] - mean) / sigma  # the repaired steps
        y_w = w @ ys
        mean = mean + sigma * y_w
        inv_sqrt = basis @ np.diag(1 / scales) @ basis.T
        p_sigma = (1 - cs) * p_sigma + math.sqrt(cs * (2 - cs) * mueff) * (inv_sqrt @ y_w)
        generation += 1
        norm = float(np.linalg.norm(p_sigma))
        h_sigma = norm / math.sqrt(1 - (1 - cs) ** (2 * generation)) / chi_n < 1.4 + 2 / (n + 1)
        p_c = (1 - cc) * p_c + (math.sqrt(cc * (2 - cc) * mueff) * y_w if h_sigma else 0.0)
        rank_mu = (ys * w[:, None]).T @ ys
        cov = ((1 - c1 - cmu + (0.0 if h_sigma else c1 * cc * (2 - cc))) * cov + c1 * np.outer(p_c, p_c)
               + cmu * rank_mu)
        cov = (cov + cov.T) / 2
        sigma *= math.exp((cs / ds) * (norm / chi_n - 1))
        eigenvalues, basis = np.linalg.eigh(cov)
        scales = np.sqrt(np.maximum(eigenvalues, 1e-20))
    trace_arr = np.asarray(trace, np.float64)
    ranked = np.where(np.isfinite(trace_arr), trace_arr, np.inf)
    best = int(np.argmin(ranked))
    return SearchResult(x=points[best].copy(), f=float(trace_arr[best]), trace=trace_arr,
                        points=np.stack(points), generations=generation, sigma=sigma)
