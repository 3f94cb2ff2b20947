"""Block merges (execute.py, MergeMethod.chunks): a tensor merged in blocks, a tiny byte threshold forcing many
blocks (and a shorter last one), equals the whole-tensor merge bit for bit, for every registered method that allows
it: bf16 and integer-valued inputs (equal task-vector magnitudes at the density cut: kept by lowest flat index across
blocks), reduced compute dtypes, a missed radix-bucket prediction (its second pass), and both executor paths (on the
CPU the tensor flattened, blocks of entries; under an outer jit, as on an accelerator, blocks of rows). window_cuts'
masks equal a stable-argsort reference whatever its sample. Methods that need the whole tensor are listed."""
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from configurable_fm.ops.merge import execute as X
from configurable_fm.ops.merge import sparsify as sp
from configurable_fm.ops.merge.registry import METHODS, get_method

BF16 = np.dtype(ml_dtypes.bfloat16)
WHOLE = X.KernelCache(chunk_bytes=None)
BLOCKS = X.KernelCache(chunk_bytes=1)  # blocks of one entry (one row under an outer jit)
SOME_BLOCKS = X.KernelCache(chunk_bytes=3000)  # 4 inputs: 187 entries a block; (37, 23) ends with a block of 103

# Per chunked method: parameter sets (per-model arrays as float32, as params.resolve_for_tensor gives them).
W3 = np.array([0.5, 0.3, 0.2], np.float32)
D3 = np.array([0.5, 0.3, 0.9], np.float32)
CASES = {
    "linear": [{"weight": W3, "normalize": True}, {"weight": np.array([1.0, -2.0, 0.5], np.float32),
                                                   "normalize": False}],
    "task_arithmetic": [{"weight": W3, "lambda": 0.9}, {"weight": W3, "normalize": True, "divisor": "count"}],
    "ties": [{"weight": W3, "density": D3, "normalize": True},
             {"weight": W3, "density": np.array([0.0, 1.0, 0.37], np.float32), "election": "count",
              "divisor": "count"},
             {"weight": W3, "density": D3, "rescale": "inv_p", "lambda": 1.3}],
    "breadcrumbs": [{"weight": W3, "density": D3, "gamma": np.array([0.1, 0.0, 0.05], np.float32)}],
    "breadcrumbs_ties": [{"weight": W3, "density": np.array([0.6, 0.2, 1.0], np.float32),
                          "gamma": np.array([0.01, 0.3, 0.0], np.float32), "election": "sum"}],
    "nearswap": [{"t": 0.05}],
    "ram": [{"epsilon": 0.02}],
    "ramplus_tl": [{"epsilon": 0.02, "r": 0.3, "alpha": 0.5}],
    "passthrough": [{"scale": np.array([0.7], np.float32)}, {}],
}
UNCHUNKED = {"dare_linear", "dare_ties", "della", "della_linear", "sce", "slerp", "nuslerp", "multislerp", "karcher",
             "model_stock", "arcee_fusion"}


def _inputs(method, shape, kind, seed=0):
    """Base and inputs as numpy arrays. kind "bf16": bf16 values (many equal task-vector magnitudes); "ties":
    small integers (runs of equal magnitudes much longer than a block); "float32": distinct values."""
    m = get_method(method)
    n = max(m.min_inputs, 1) if m.max_inputs == 1 else 3
    rng = np.random.default_rng(seed)
    if kind == "ties":
        base = rng.integers(-2, 3, size=shape).astype(np.float32)
        xs = [base + rng.integers(-2, 3, size=shape) for _ in range(n)]
        return base, [x.astype(np.float32) for x in xs]
    base = rng.standard_normal(shape).astype(np.float32)
    xs = [(base + 0.05 * rng.standard_normal(shape)).astype(np.float32) for _ in range(n)]
    if kind == "bf16":
        return base.astype(BF16), [x.astype(BF16) for x in xs]
    return base, xs


def _merge(cache, method, base, xs, params, **kw):
    m = get_method(method)
    y = X.merge_tensor(m, None if m.base == "ignored" else base, xs, params, cache=cache, **kw)
    return np.asarray(y)


def _bits(y):
    return y.view(f"u{y.dtype.itemsize}")


def test_every_registered_method_is_classified():
    """A method added to the registry is either chunked (and in CASES) or listed as needing the whole tensor."""
    get_method("linear")
    chunked = {name for name, m in METHODS.items() if m.chunks is not None}
    assert chunked == set(CASES)
    assert set(METHODS) - chunked == UNCHUNKED


CASE_IDS = [(method, i) for method in sorted(CASES) for i in range(len(CASES[method]))]
SLOW = pytest.mark.slow  # compilation-bound variants (the ties kernel, ~8-16 s each on 2 cores) that repeat a path
# a faster case in CI already takes: run with --runslow


def _case(*values, slow=False):
    return pytest.param(*values, marks=[SLOW] if slow else [])


# Slow (CI time, ~3-4 s each): ties-1 and -2 take ties-0's block path (election, divisor, rescale and lambda are
# elementwise in every block; windows at 0 and n, as ties-1's densities 1 and 0 give, are checked by
# test_window_cuts_match_stable_argsort); breadcrumbs_ties-0 is breadcrumbs-0's outlier window, ties-0's election
SLOW_CASES = {("ties", 1), ("ties", 2), ("breadcrumbs_ties", 0)}


@pytest.mark.parametrize("method,i", [_case(m, i, slow=(m, i) in SLOW_CASES) for m, i in CASE_IDS],
                         ids=[f"{m}-{i}" for m, i in CASE_IDS])
def test_row_blocks_equal_whole_tensor(method, i):
    """bf16 inputs (many equal task-vector magnitudes) merged in blocks (a shorter last one) equal the whole
    tensor. (37, 23): ties-0's whole-tensor kernel is the one the tests below compare with (compiled once)."""
    params = CASES[method][i]
    base, xs = _inputs(method, (37, 23), "bf16", seed=i)
    assert X._chunk_rows(get_method(method), params, base, xs, SOME_BLOCKS.chunk_bytes) < 37
    want = _merge(WHOLE, method, base, xs, params, out_dtype=BF16)
    got = _merge(SOME_BLOCKS, method, base, xs, params, out_dtype=BF16)
    assert got.dtype == want.dtype and got.shape == want.shape
    np.testing.assert_array_equal(_bits(got), _bits(want), err_msg=f"{method} {params}")


@pytest.mark.parametrize("method", ["ties", _case("breadcrumbs_ties", slow=True), "linear", "ramplus_tl", "ram"])
def test_single_rows_and_a_short_last_block(method):
    """Blocks of one row, and blocks of 8 rows of a 37-row tensor (a last block of 5), on small integers (runs
    of equal magnitudes far longer than a block)."""
    params = CASES[method][0]
    base, xs = _inputs(method, (37, 23), "ties")
    assert X._chunk_rows(get_method(method), params, base, xs, BLOCKS.chunk_bytes) == 1
    want = _merge(WHOLE, method, base, xs, params, out_dtype=np.float32)
    for cache in (BLOCKS, SOME_BLOCKS):
        np.testing.assert_array_equal(_merge(cache, method, base, xs, params, out_dtype=np.float32), want)


@pytest.mark.parametrize("method", [_case("ties", slow=True), "linear"])
def test_three_dimensional_tensor(method):
    base, xs = _inputs(method, (9, 4, 5), "float32")
    params = CASES[method][0]
    want = _merge(WHOLE, method, base, xs, params, out_dtype=np.float32)
    np.testing.assert_array_equal(_merge(BLOCKS, method, base, xs, params, out_dtype=np.float32), want)


PRECISIONS = {"bfloat16": {"compute_dtype": "bfloat16"}, "float16": {"compute_dtype": "float16"},
              "load_float32": {"load_dtype": np.float32}}


@pytest.mark.parametrize("method,kw", [_case(m, kw, slow=m == "ties" and name != "bfloat16")
                                       for m in ("ties", "linear", "ramplus_tl") for name, kw in PRECISIONS.items()],
                         ids=[f"{m}-{name}" for m in ("ties", "linear", "ramplus_tl") for name in PRECISIONS])
def test_row_blocks_in_reduced_precision_and_load_dtype(method, kw):
    """compute_dtype (mergekit's rounding in bfloat16 / float16) and a float32 load of bf16 inputs (the load cast
    is every method's, _fused: ties-load_float32 is slow, linear and ramplus_tl take it in CI)."""
    base, xs = _inputs(method, (40, 23), "bf16", seed=3)
    params = CASES[method][0]
    want = _merge(WHOLE, method, base, xs, params, out_dtype=BF16, **kw)
    got = _merge(SOME_BLOCKS, method, base, xs, params, out_dtype=BF16, **kw)
    np.testing.assert_array_equal(_bits(got), _bits(want), err_msg=f"{method} {kw}")


@pytest.mark.parametrize("method", ["ties", _case("breadcrumbs", slow=True)])
def test_ties_at_the_cut_across_blocks(method):
    """Task vectors of small integers: every window edge falls inside a run of equal magnitudes spanning many
    blocks, so the kept tied entries are those of lowest flat index, found block by block. (37, 23) and ties'
    parameters of test_single_rows_and_a_short_last_block (normalize, the densities traced): its three kernels."""
    rng = np.random.default_rng(5)
    shape = (37, 23)
    base = np.zeros(shape, np.float32)
    xs = [(rng.choice([-1.0, 1.0], size=shape) * rng.integers(0, 3, size=shape)).astype(np.float32) for _ in range(3)]
    xs[2][:] = 2.0  # one input whose magnitudes are all equal
    for d in ([0.5, 0.3, 0.25], [0.001, 0.999, 0.5], [0.12, 0.61, 0.9]):
        params = {"weight": W3, "density": np.array(d, np.float32)}
        if method == "ties":
            params["normalize"] = True  # ties' default, given as CASES["ties"][0] gives it (one cached kernel)
        if method == "breadcrumbs":
            params["gamma"] = np.array([0.2, 0.1, 0.3], np.float32)
        want = _merge(WHOLE, method, base, xs, params, out_dtype=np.float32)
        for cache in (BLOCKS, SOME_BLOCKS):
            got = _merge(cache, method, base, xs, params, out_dtype=np.float32)
            np.testing.assert_array_equal(got, want, err_msg=f"{method} densities {d}")
    # the whole-tensor kernel itself keeps the lowest flat indices among equal magnitudes (stable order)
    k = int(0.25 * base.size)
    kept = np.flatnonzero(np.asarray(sp.magnitude_mask(jnp.asarray(xs[2]), np.float32(0.25))))
    np.testing.assert_array_equal(kept, np.arange(k))


def test_missed_bucket_prediction_takes_the_second_pass(monkeypatch):
    """A sample of every 8th entry whose magnitudes are unlike the others' predicts the wrong radix buckets; the
    second pass then finds the right ones: the same result as the whole tensor."""
    rng = np.random.default_rng(9)
    shape = (37, 23)  # the whole-tensor kernel of test_single_rows_and_a_short_last_block[ties] (compiled once)
    base = np.zeros(shape, np.float32)
    xs = [(rng.standard_normal(shape) * 1e-3).astype(np.float32) for _ in range(3)]
    for x in xs:
        x.reshape(-1)[::8] *= 1e4  # the sampled entries (the tensor is merged flattened): large magnitudes
    params = {"weight": W3, "density": D3, "normalize": True}
    want = _merge(WHOLE, "ties", base, xs, params, out_dtype=np.float32)
    calls = []
    low = sp._radix_low
    monkeypatch.setattr(sp, "_radix_low", lambda k, b: (jax.debug.callback(lambda: calls.append(1)), low(k, b))[1])
    monkeypatch.setattr(sp, "SAMPLE_ENTRIES", 37 * 23 // 8)  # every 8th entry (851 // 106 = 8)
    got = _merge(X.KernelCache(chunk_bytes=1000), "ties", base, xs, params, out_dtype=np.float32)
    np.testing.assert_array_equal(got, want)
    assert calls, "the prediction should have missed"


def test_in_jit_path_equals_whole_tensor():
    """Under an outer jit on the CPU the inputs are traced (no bit views on the host): the row blocks slice the
    inputs' bits inside the compiled function."""
    base, xs = _inputs("ties", (37, 23), "bf16", seed=4)
    params = CASES["ties"][0]
    m = get_method("ties")
    want = _merge(WHOLE, "ties", base, xs, params, out_dtype=BF16)
    f = jax.jit(lambda b, xs: X.merge_tensor(m, b, xs, params, out_dtype=BF16, cache=SOME_BLOCKS))
    got = np.asarray(f(jnp.asarray(base), [jnp.asarray(x) for x in xs]))
    np.testing.assert_array_equal(_bits(got), _bits(want))


def test_threshold_by_bytes_and_refusals():
    m = get_method("ties")
    params = CASES["ties"][0]
    base, xs = _inputs("ties", (37, 23), "float32")
    size = 4 * 37 * 23 * 4  # float32 bytes of base + 3 inputs
    assert X._chunk_rows(m, params, base, xs, size) is None  # fits: merged whole
    rows = X._chunk_rows(m, params, base, xs, size - 1)
    assert rows is not None and 37 // 2 <= rows < 37
    assert X._chunk_rows(m, params, base, xs, None) is None
    assert X._chunk_rows(m, {**params, "rescale": "l1"}, base, xs, 1) is None  # a whole-tensor l1 norm
    assert X._chunk_rows(get_method("dare_ties"), params, base, xs, 1) is None  # masks drawn over the whole shape
    assert X._chunk_rows(get_method("linear"), {"weight": W3}, None, [x[:1] for x in xs], 1) is None  # 1 row
    assert X._chunk_rows(get_method("linear"), {"weight": W3}, None, [np.float32(1)] * 3, 1) is None  # 0-d
    assert X._chunk_rows(get_method("ram"), {}, base, [], 1) is None  # no inputs
    # a number of rows that divides the tensor's is preferred (no shorter last block)
    assert X._chunk_rows(get_method("linear"), {"weight": W3}, None, [np.zeros((100, 10), np.float32)] * 3,
                         12 * 120) == 10  # 12 rows fit, 10 divide 100


def test_default_cache_chunks_large_tensors_with_one_kernel_entry():
    """The default threshold is X.CHUNK_BYTES; a chunked tensor uses the same cache entry as a whole one."""
    cache = X.KernelCache()
    assert cache.chunk_bytes == X.CHUNK_BYTES
    m = get_method("linear")
    small = [np.ones((4, 4), np.float32)] * 2
    X.merge_tensor(m, None, small, {"weight": np.ones(2, np.float32)}, out_dtype=BF16, cache=cache)
    rows = X.CHUNK_BYTES // (4 * 2 * 64) + 7
    big = [np.full((rows, 64), 2.0, np.float32), np.full((rows, 64), 4.0, np.float32)]
    assert X._chunk_rows(m, {}, None, big, X.CHUNK_BYTES) is not None
    y = X.merge_tensor(m, None, big, {"weight": np.ones(2, np.float32)}, out_dtype=BF16, cache=cache)
    assert len(cache) == 1  # one entry (one jitted function) for whole and chunked tensors
    assert y.dtype == BF16 and y.shape == (rows, 64) and np.all(np.asarray(y, np.float32) == 3.0)


# ------------------------------------------------------------------ window_cuts against a stable-argsort reference
def _stable_window(v, lo, hi):
    ranks = np.empty(v.size, np.int64)
    ranks[np.argsort(v.reshape(-1), kind="stable")] = np.arange(v.size)
    return (ranks >= lo) & (ranks < hi)


@pytest.mark.parametrize("sample_kind", ["none", _case("all", slow=True), "unrelated", _case("every_7th", slow=True)])
def test_window_cuts_match_stable_argsort(sample_kind):
    """Blocks of 50 entries (a short last one), windows at 0 and n, empty and tied ones: the masks of
    rank_window_mask_at per block equal the stable-order reference whatever the sample predicts."""
    rng = np.random.default_rng(len(sample_kind))
    n, block = 230, 50
    v = np.concatenate([rng.integers(-3, 4, size=(2, n)).astype(np.float32),
                        rng.standard_normal((1, n)).astype(BF16).astype(np.float32)])
    v[0, rng.random(n) < 0.2] = -0.0
    keys = sp._order_keys(jnp.asarray(v))
    sample = {"none": None, "all": keys, "every_7th": keys[:, ::7],
              "unrelated": sp._order_keys(jnp.asarray(rng.standard_normal((3, 64)).astype(np.float32) * 100))}[
        sample_kind]
    starts = list(range(0, n, block))

    @jax.jit
    def masks(v, lo, hi):
        keys = sp._order_keys(v)

        def fold(fn, acc):
            for start in starts:
                acc = fn(acc, keys[:, start:start + block], jnp.int32(start))
            return acc

        cuts = sp.window_cuts(fold, lo, hi, n, sample=sample)
        at = jax.vmap(lambda vb, t, cut, ok, start: sp.rank_window_mask_at(vb, sp.WindowCuts(t, cut, ok, start)),
                      in_axes=(0, 0, 0, 0, None))
        return jnp.concatenate([at(v[:, a:a + block], cuts.t, cuts.cut, cuts.nonempty, a) for a in starts], axis=1)

    for lo, hi in [(0, 115), (40, 190), (0, n), (17, 17), (190, 40), (n - 1, n), (0, 1), (100, n)]:
        got = np.asarray(masks(jnp.asarray(v), jnp.full(3, lo, jnp.int32), jnp.full(3, hi, jnp.int32)))
        for j in range(3):
            np.testing.assert_array_equal(got[j], _stable_window(v[j], lo, hi), err_msg=f"row {j} [{lo}, {hi})")


def test_tensors_on_an_accelerator_are_merged_whole(monkeypatch):
    """Inputs on an accelerator (here: _on_accelerator patched to say so) skip the row blocks: the same result,
    and no block loop is traced."""
    base, xs = _inputs("ties", (37, 23), "bf16", seed=5)
    params = CASES["ties"][0]
    want = _merge(WHOLE, "ties", base, xs, params, out_dtype=BF16)
    traced = []
    by_rows = X._merge_by_rows
    monkeypatch.setattr(X, "_merge_by_rows", lambda *a, **k: traced.append(1) or by_rows(*a, **k))
    monkeypatch.setattr(X, "_on_accelerator", lambda x: True)
    got = _merge(X.KernelCache(chunk_bytes=3000), "ties", base, xs, params, out_dtype=BF16)
    np.testing.assert_array_equal(_bits(got), _bits(want))
    assert traced == []
    monkeypatch.setattr(X, "_on_accelerator", lambda x: False)  # the CPU path of the same cache: blocks
    got = _merge(X.KernelCache(chunk_bytes=3000), "ties", base, xs, params, out_dtype=BF16)
    np.testing.assert_array_equal(_bits(got), _bits(want))
    assert traced


def test_on_accelerator_reads_the_arrays_device(monkeypatch):
    assert not X._on_accelerator(jnp.ones(3))  # this machine's arrays live on the CPU
    assert X._on_accelerator(np.ones(3)) == (jax.default_backend() != "cpu")
    seen = []
    jax.jit(lambda x: seen.append(X._on_accelerator(x)) or x)(jnp.ones(2))  # a tracer: the default backend's
    assert seen == [jax.default_backend() != "cpu"]


def test_under_jit_on_an_accelerator_backend_tensors_are_merged_whole(monkeypatch):
    """A merge traced by an outer jit while the default backend is an accelerator (here: patched to say 'gpu')
    takes whole tensors, as concrete device arrays do: the same bits, no block loop traced."""
    base, xs = _inputs("ties", (37, 23), "bf16", seed=6)
    params, m = CASES["ties"][0], get_method("ties")
    want = _merge(WHOLE, "ties", base, xs, params, out_dtype=BF16)
    traced = []
    by_rows = X._merge_by_rows
    monkeypatch.setattr(X, "_merge_by_rows", lambda *a, **k: traced.append(1) or by_rows(*a, **k))
    cache = X.KernelCache(chunk_bytes=3000)
    f = jax.jit(lambda b, xs: X.merge_tensor(m, b, xs, params, out_dtype=BF16, cache=cache))
    with monkeypatch.context() as patch:
        patch.setattr(X.jax, "default_backend", lambda: "gpu")
        got = np.asarray(f(jnp.asarray(base), [jnp.asarray(x) for x in xs]))
    np.testing.assert_array_equal(_bits(got), _bits(want))
    assert traced == []
