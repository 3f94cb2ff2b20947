"""The CMA-ES minimiser (ops/route/search.py): it finds the minimum of an ill-conditioned quadratic (to 1e-3 in
x within 800 evaluations) and of Rosenbrock's function (to 1e-6 within 1500); it uses exactly `budget`
evaluations, the first at x0; it stays in the box (a linear function is driven to the corner); the same seed gives
the same points bit for bit and another seed other points; the repair reflects then clips; errors."""
import numpy as np
import pytest

from configurable_fm.ops.route import RouteError, cma_es
from configurable_fm.ops.route.search import repair

TARGET = np.array([0.7, -0.3, 1.2])


def quadratic(x):
    return float(np.sum((x - TARGET) ** 2 * np.array([1.0, 10.0, 100.0])))


def test_minimises_a_quadratic_and_rosenbrock():
    r = cma_es(quadratic, np.zeros(3), sigma0=0.5, budget=800, lower=-1.5, upper=1.5, seed=0)
    np.testing.assert_allclose(r.x, TARGET, atol=1e-3)
    assert r.f == r.trace.min() and r.f < 1e-8 and r.generations == 114 and r.sigma < 1e-3
    rosen = cma_es(lambda x: float(100 * (x[1] - x[0] ** 2) ** 2 + (1 - x[0]) ** 2), np.zeros(2), sigma0=0.5,
                   budget=1500, seed=1)
    np.testing.assert_allclose(rosen.x, [1.0, 1.0], atol=1e-6)


def test_budget_trace_bounds_and_determinism():
    calls = []

    def f(x):
        calls.append(x)
        return quadratic(x)

    r = cma_es(f, np.full(3, 0.25), sigma0=0.5, budget=23, lower=-1.5, upper=1.5, seed=3)
    assert len(calls) == 23 and r.trace.shape == (23,) and r.points.shape == (23, 3)
    np.testing.assert_array_equal(calls[0], np.full(3, 0.25))  # the first evaluation is x0
    assert r.trace[0] == quadratic(np.full(3, 0.25))
    np.testing.assert_array_equal(r.best_trace, np.minimum.accumulate(r.trace))
    again = cma_es(quadratic, np.full(3, 0.25), sigma0=0.5, budget=23, lower=-1.5, upper=1.5, seed=3)
    np.testing.assert_array_equal(again.points, r.points)
    other = cma_es(quadratic, np.full(3, 0.25), sigma0=0.5, budget=23, lower=-1.5, upper=1.5, seed=4)
    assert not np.array_equal(other.points[1:], r.points[1:])
    corner = cma_es(lambda x: float(np.sum(x)), np.zeros(4), sigma0=0.5, budget=200, lower=-1.5, upper=1.5, seed=1)
    assert (corner.points >= -1.5).all() and (corner.points <= 1.5).all()
    assert corner.f < -5.9  # the corner is -6


def test_repair_reflects_then_clips():
    lo, hi = np.full(3, -1.0), np.full(3, 1.0)
    np.testing.assert_array_equal(repair(np.array([1.25, -1.5, 0.5]), lo, hi), [0.75, -0.5, 0.5])
    np.testing.assert_array_equal(repair(np.array([3.5, -4.0, 1.0]), lo, hi), [-1.0, 1.0, 1.0])


def test_errors():
    with pytest.raises(RouteError, match=r"budget must be an int >= 1 \(evaluations of f\), got 0"):
        cma_es(quadratic, np.zeros(3), sigma0=0.5, budget=0)
    with pytest.raises(RouteError, match=r"sigma0 must be a finite number > 0, got -1"):
        cma_es(quadratic, np.zeros(3), sigma0=-1, budget=5)
    with pytest.raises(RouteError, match=r"x0 \[2\.0, 0\.0, 0\.0\] must lie in \[lower, upper\]"):
        cma_es(quadratic, np.array([2.0, 0, 0]), sigma0=0.5, budget=5, lower=-1.5, upper=1.5)
    with pytest.raises(RouteError, match=r"popsize must be an int >= 2, got 1"):
        cma_es(quadratic, np.zeros(3), sigma0=0.5, budget=5, popsize=1)
    with pytest.raises(RouteError, match=r"lower must be a number or one per coordinate \(3\)"):
        cma_es(quadratic, np.zeros(3), sigma0=0.5, budget=5, lower=[0, 1])


def test_a_non_finite_start_is_refused():
    """x0 = NaN or inf passed the box check (NaN compares false; inf lies in an unbounded box) and every point
    evaluated was non-finite: the result was x0 itself."""
    for x0 in ([np.nan, 0.0], [np.inf, 0.0]):
        with pytest.raises(RouteError, match=r"cma_es: x0 must be finite, got \[(nan|inf), 0\.0\]"):
            cma_es(quadratic, np.array(x0), sigma0=0.5, budget=5)
