"""Reduced-precision arithmetic (precision.py): every method's kernel with compute_dtype float16/bfloat16 against
mergekit 0.1.5 run on the same inputs in that dtype (tests/golden/mergekit_0.1.5/<dtype>/, written by
`scripts/mergekit_goldens.py --dtype ...`), the rounding helper against numpy's casts, and the float32 default
unchanged."""
from __future__ import annotations

import functools
import json
import pathlib

import jax
import ml_dtypes
import numpy as np
import pytest
import yaml
from safetensors.numpy import load_file

from configurable_fm.ops.merge import execute as X
from configurable_fm.ops.merge.precision import Arithmetic, compute_dtype_name, round_to
from configurable_fm.ops.merge.registry import get_method
from tests.helpers import golden_hf_inputs, golden_yaml, marked_slow, read_tensors

GOLDEN = pathlib.Path(__file__).resolve().parents[2] / "golden" / "mergekit_0.1.5"
DTYPES = {"float16": np.float16, "bfloat16": ml_dtypes.bfloat16}
RANDOM = ("dare_linear", "dare_ties", "della", "della_linear")
PER_MODEL = ("weight", "density", "gamma", "epsilon")
# Methods whose mergekit code runs transcendental functions (acos, sin, cos, exp, log) in the reduced dtype: XLA's
# float32 implementations differ from torch's by up to an ulp of float32, so an element whose value lies that
# close to a rounding boundary of the compute dtype may land one ulp (of the compute dtype) away. Entries:
# method -> (largest difference in ulps of the compute dtype, largest fraction of elements that may differ).
TRANSCENDENTAL: dict[str, tuple[int, float]] = {
    # not a transcendental: torch's float32 vector_norm adds in 8 lanes, XLA in its own order; one norm an ulp
    # off flips one rounded unit value (n2_2d: 1 of 35 elements, 2 ulps)
    "karcher": (2, 0.03),
}
# Methods that rank task-vector magnitudes (TIES trim, Breadcrumbs). mergekit sorts with torch's unstable CPU sort,
# which orders equal magnitudes arbitrarily in tensors of more than 16 elements; ours keeps the lower flat index
# first (sparsify.py). Ties are rare in float32 and common in float16/bfloat16 (few distinct magnitudes), so there
# an entry may be kept by one and dropped by the other: allowed only at entries whose magnitude is tied.
MAGNITUDE_RANKING = ("ties", "breadcrumbs", "breadcrumbs_ties")
STABLE_SORT_MAX = 16


_round_to = jax.jit(round_to, static_argnums=1)  # one compilation per shape (eager: one per operation and shape)


def rounded(x, dt) -> np.ndarray:
    """round_to(x, dt) of x as float32, jitted (the form test_round_to_matches_numpy_casts checks), as numpy."""
    return np.asarray(_round_to(np.asarray(x, np.float32), dt))


def tie_order_only(y, want, base, xs, dt) -> bool:
    """Whether every entry where y and want differ is one whose rounded |x_i − b| equals another entry's |x_j − b|
    of the same model (a tie in magnitude) in a tensor longer than torch's stable-sort limit."""
    bad = np.flatnonzero((y != want).ravel())
    if bad.size == 0:
        return True
    if want.size <= STABLE_SORT_MAX:
        return False
    mags = [np.abs(rounded(x - base, dt)).ravel() for x in xs]
    tied = np.zeros(want.size, bool)
    for m in mags:
        values, counts = np.unique(np.asarray(m), return_counts=True)
        tied |= np.isin(np.asarray(m), values[counts > 1])
    return bool(np.all(tied[bad]))


# In CI every method runs in float16, on every third case of its golden file (the first, fourth, ...; the float32
# tests run every case); bfloat16 runs for a few methods with code paths of their own there (DARE rescales in
# bfloat16 but in float32 for float16 inputs on the CPU; arcee_fusion's bfloat16 threshold) or many rounding steps,
# on the same cases. The rest is marked slow (compilation dominates: one kernel per case and shape).
BFLOAT16_IN_CI = ("ties", "dare_ties", "arcee_fusion", "nuslerp")
# Of those, cases that take another CI case's path with other shapes or values are slow too (CI time, ~0.5 s
# each): ties' 3-model neg_weights (per_model), model_stock's 2-model and 1-D filter-wise ones (four_models, n3_3d,
# rows_singular_and_zero), multislerp's three models without a base (base_three_3d, nobase_two_3d), slerp's
# 3-D random and t = 1 (random_2d_t0.5, random_1d_t0.0), the breadcrumbs' 64-entry default gamma (basic, ties16),
# nuslerp's 3-D rows and columns (the 2-D ones), arcee_fusion's second 2-D shape (16x8), ram's 2 of 1, 2, 3
# models, nearswap's 3-D t = 0.01 (2-D t = 0.05).
REPEATS = {"ties": {"neg_weights"}, "model_stock": {"n2_1d_filter_wise", "n2_3d", "n3_1d_filter_wise"},
           "multislerp": {"nobase_three_3d"}, "slerp": {"random_3d_t0.3", "random_1d_t1.0"},
           "breadcrumbs": {"norm64_default_gamma"}, "breadcrumbs_ties": {"norm64_default_gamma"},
           "nuslerp": {"base_3d_flat0_row0", "nobase_3d_flat0_row1"}, "arcee_fusion": {"6x32_scale0.5"},
           "ram": {"n2_1d"}, "ramplus_tl": {"n2_1d"}, "nearswap": {"3d_t0.01"}}
# In bfloat16 also those whose float16 case checks the same steps: nuslerp's 1-D rows and t = 0 (its rows, columns
# and flattened vectors stay), ties' 2x8 tie order, arcee_fusion's 3-D rows (the 1- and 2-D ones stay).
BFLOAT16_REPEATS = {"nuslerp": {"base_1d_flat0_row0", "t0"}, "ties": {"ties2x8"}, "arcee_fusion": {"2x4x16_scale0.5"}}


def _cases():
    out = []
    for dt in DTYPES:
        for f in sorted((GOLDEN / dt).glob("*.json")):
            meta = json.loads(f.read_text())
            bf16 = dt == "bfloat16"
            repeats = REPEATS.get(f.stem, set()) | (BFLOAT16_REPEATS.get(f.stem, set()) if bf16 else set())
            for i, case in enumerate(meta["cases"]):
                slow = (bf16 and f.stem not in BFLOAT16_IN_CI) or i % 3 != 0 or case in repeats
                out.append(pytest.param(dt, f.stem, case, marks=[pytest.mark.slow] if slow else []))
    return out


@functools.lru_cache(maxsize=None)
def _golden(dt, name):
    meta = json.loads((GOLDEN / dt / f"{name}.json").read_text())
    assert meta["mergekit"] == "0.1.5" and meta["dtype"] == dt
    return meta["cases"], load_file(str(GOLDEN / dt / f"{name}.safetensors"))


def ulps(a: np.ndarray, b: np.ndarray, dt: str) -> np.ndarray:
    """|a − b| in units of the compute dtype's spacing at b (float32 arrays of representable values)."""
    spacing = np.abs(np.spacing(b.astype(DTYPES[dt]))).astype(np.float32)
    same = (a == b) | (np.isnan(a) & np.isnan(b))  # mergekit's NaNs (e.g. multislerp's float16 eps) reproduced
    with np.errstate(invalid="ignore"):
        return np.where(same, 0.0, np.abs(a - b) / spacing)


def merge_case(dt, name, case, compute_dtype):
    """(y as float32, mergekit's y, mergekit's output dtype name, our output dtype name) of one golden case, run as
    the streaming merge runs it: the inputs stored in `dt`, execute.dtypes_for picking the output and compute
    dtypes, execute.merge_tensor with per-model parameters as float32 arrays (traced by the kernel cache)."""
    cases, t = _golden(dt, name)
    info = cases[case]
    method = get_method(name)
    p = dict(info["params"])
    for k in PER_MODEL:
        if k in p and k in method.per_model:
            p[k] = np.broadcast_to(np.asarray(p[k], np.float32), (info["n"],)).copy()
    if name in RANDOM:
        p["masks"] = t[f"{case}/masks"]  # the masks mergekit drew (torch.bernoulli, recorded)
    stored = np.dtype(DTYPES[dt])
    base = None if f"{case}/base" not in t else t[f"{case}/base"].astype(stored)
    xs = [x.astype(stored) for x in t[f"{case}/xs"]]
    out_dtype, compute = X.dtypes_for(method, [stored] * (len(xs) + (base is not None)),
                                      compute_dtype=compute_dtype)
    y = X.merge_tensor(method, base, xs, p, out_dtype=out_dtype, compute_dtype=compute, name=f"{name}/{case}")
    return np.asarray(y, np.float32), t[f"{case}/y"], info["out_dtype"], str(np.dtype(out_dtype))


@pytest.mark.parametrize("dt, name, case", _cases())
def test_matches_mergekit_in_reduced_precision(dt, name, case):
    y, want, mergekit_dtype, our_dtype = merge_case(dt, name, case, dt)
    if _golden(dt, name)[0][case]["n"] > 0:  # a base alone: mergekit returns the base tensor itself, in its dtype
        assert our_dtype == mergekit_dtype, f"{name}/{case}: mergekit returns {mergekit_dtype}, we write {our_dtype}"
    if name in MAGNITUDE_RANKING and not np.array_equal(y, want):
        cases, t = _golden(dt, name)
        assert tie_order_only(y, want, t[f"{case}/base"], t[f"{case}/xs"], dt), (
            f"{dt} {name}/{case}: entries differ from mergekit where no magnitudes are tied")
        return
    d = ulps(y, want, dt)
    worst, share = TRANSCENDENTAL.get(name, (0, 0.0))
    bad = d > 0
    assert float(np.max(d, initial=0)) <= worst and bad.mean() <= share, (
        f"{dt} {name}/{case}: {int(bad.sum())}/{bad.size} elements differ from mergekit 0.1.5, up to "
        f"{float(np.max(d, initial=0)):.3g} ulps of {dt}")


def test_float32_arithmetic_differs_where_mergekit_rounds():
    """The goldens are not vacuous: rounding once at the end (float32 arithmetic) misses mergekit's float16 task
    arithmetic result (5 of 60 entries), and the reduced mode is what closes the gap."""
    y32, want, _, _ = merge_case("float16", "task_arithmetic", "normalize_lambda", None)
    y16, _, _, _ = merge_case("float16", "task_arithmetic", "normalize_lambda", "float16")
    assert not np.array_equal(y32, want)
    assert np.array_equal(y16, want)


@pytest.mark.parametrize("dt", list(DTYPES))
def test_round_to_matches_numpy_casts(dt):
    r = np.random.default_rng(0)
    x = (r.standard_normal(200_000) * np.exp(r.uniform(-30, 12, 200_000))).astype(np.float32)
    x[:8] = [65504, 65519.9, 65520, -65520, 2.0 ** -25, 3 * 2.0 ** -26, 2.0 ** -24 * 2.5, 0.0]
    with np.errstate(over="ignore"):
        want = x.astype(DTYPES[dt]).astype(np.float32)
    got = np.asarray(jax.jit(lambda v: round_to(v, dt))(x))
    np.testing.assert_array_equal(got, want)


def test_arithmetic_and_names():
    assert compute_dtype_name(None) is None and compute_dtype_name("float32") is None
    assert compute_dtype_name(np.float16) == "float16" and compute_dtype_name("bfloat16") == "bfloat16"
    with pytest.raises(ValueError, match="compute dtype"):
        compute_dtype_name("int8")
    a = Arithmetic.of("float16")
    assert float(a.const(0.1)) == float(np.float16(0.1)) and float(Arithmetic().r(0.1)) == np.float32(0.1)


# ------------------------------------------------------------------------------ whole YAML merges (stream, CLI)
YAML_META = json.loads((GOLDEN / "yaml_dtypes.json").read_text())


@pytest.fixture(scope="module")
def yaml_golden():
    return load_file(str(GOLDEN / "yaml_dtypes.safetensors"))


@pytest.fixture(scope="module")
def yaml_inputs(yaml_golden, tmp_path_factory):
    """The golden inputs A, B, C as HF directories (config.json + model.safetensors)."""
    return golden_hf_inputs(yaml_golden, YAML_META["input_config"], "ABC",
                            tmp_path_factory.mktemp("yaml_dtype_inputs"))


def _yaml_file(case, dirs, tmp_path):
    return golden_yaml(YAML_META["cases"][case]["yaml"], dirs, tmp_path / f"{case}.yml")


_written = read_tensors


# Slow (CI time, ~5 s each): bio_merge_f16 runs in the next test; gradient_slerp_f16 is test_slices' slerp_classic
# (streamed in CI) in float16, slerp's float16 kernel checked by test_matches_mergekit_in_reduced_precision;
# breadcrumbs_ties_f16 streams as ties_gradients_f16 does, its float16 kernel checked there too.
YAML_SLOW = {"bio_merge_f16", "gradient_slerp_f16", "breadcrumbs_ties_f16"}


@pytest.mark.parametrize("case", marked_slow(sorted(YAML_META["cases"]), YAML_SLOW))
def test_yaml_merge_in_mergekit_mode_equals_mergekit(case, yaml_golden, yaml_inputs, tmp_path):
    """mergekit's shipped configs in float16/bfloat16, run whole (streamed): the same weights bit for bit, written
    in the dtypes mergekit writes (float32 for arcee_fusion without out_dtype)."""
    from configurable_fm.ops.merge.mergekit_yaml import load_mergekit_yaml
    from configurable_fm.ops.merge.stream import merge_checkpoints

    plan = load_mergekit_yaml(_yaml_file(case, yaml_inputs, tmp_path))
    out = merge_checkpoints(plan, tmp_path / "out", progress=False, compute_dtype="mergekit")
    config = json.loads((out / "config.json").read_text())
    assert config["num_hidden_layers"] == YAML_META["cases"][case]["num_hidden_layers"]
    got = _written(out)
    dtypes = YAML_META["cases"][case]["dtypes"]
    assert sorted(got) == sorted(dtypes)
    for k, want_dtype in dtypes.items():
        assert str(got[k].dtype) == want_dtype, f"{case}: {k} written as {got[k].dtype}, mergekit: {want_dtype}"
        assert_yaml_tensor(case, k, got[k], yaml_golden)


def assert_yaml_tensor(case, k, got, yaml_golden):
    """Bit for bit, except (for magnitude-ranking methods) at entries whose magnitudes are tied (tie_order_only)."""
    y, want = got.astype(np.float32), yaml_golden[f"{case}/{k}"]
    if np.array_equal(y, want):
        return
    method = yaml.safe_load(YAML_META["cases"][case]["yaml"])["merge_method"]
    dt = yaml.safe_load(YAML_META["cases"][case]["yaml"])["dtype"]
    xs = [yaml_golden[f"inputs/{m}/{k}"] for m in ("B", "C") if f"inputs/{m}/{k}" in yaml_golden]
    base = rounded(yaml_golden[f"inputs/A/{k}"], dt)
    assert method in MAGNITUDE_RANKING and tie_order_only(y, want, base, [rounded(x, dt) for x in xs], dt), (
        f"{case}: {k}: {int(np.sum(y != want))} of {want.size} entries differ from mergekit")


def test_float32_arithmetic_is_the_explicit_alternative(yaml_golden, yaml_inputs, tmp_path, capsys):
    """The CLI's default is the mergekit mode; --compute_dtype float32 gives float32 arithmetic rounded once, which
    differs from mergekit's float16 ties in some entries (and is what the Python API does by default)."""
    from tests.helpers import run_script

    case = "bio_merge_f16"
    path = _yaml_file(case, yaml_inputs, tmp_path)
    code, _ = run_script("merge", ["--mergekit_yaml", str(path), "--output", str(tmp_path / "mk"), "--no_progress"],
                         capsys)
    assert code in (0, None)
    code, _ = run_script("merge", ["--mergekit_yaml", str(path), "--output", str(tmp_path / "f32"), "--no_progress",
                                   "--compute_dtype", "float32"], capsys)
    assert code in (0, None)
    mk, f32 = _written(tmp_path / "mk"), _written(tmp_path / "f32")
    differ = 0
    for k in mk:
        assert_yaml_tensor(case, k, mk[k], yaml_golden)
        assert f32[k].dtype == np.float16
        differ += int(np.sum(mk[k] != f32[k]))
    assert differ > 0
