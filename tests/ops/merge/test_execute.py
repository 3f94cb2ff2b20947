"""execute.py: the fused jitted per-tensor kernels give the eager (op by op, unjitted) computation bitwise for
every method, and tree.merge (which calls them) too; the kernel cache (identity, LRU); PreadStore reads what
safetensors wrote; planned shards are valid safetensors split at the limit; the read-ahead stays within its depth;
the pipeline (read-ahead thread, writer thread) writes every tensor, and errors name the tensor."""
import json

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import save_file

from configurable_fm.interop.safetensors_io import INDEX_FILE, SINGLE_FILE, CheckpointError, write_sharded
from configurable_fm.ops.merge import execute as X
from configurable_fm.ops.merge import params as P
from configurable_fm.ops.merge import tree
from configurable_fm.ops.merge.keys import tensor_key
from configurable_fm.ops.merge.registry import METHODS, get_method
from tests.helpers import marked_slow

BF16 = np.dtype(ml_dtypes.bfloat16)
NAMES = ["model.layers.0.mlp.up_proj.weight", "model.layers.1.mlp.up_proj.weight", "model.norm.weight"]
SHAPES = [(6, 5), (6, 5), (5,)]

# Per-method settings (a gradient over depth and a filter, so parameters differ between tensors).
SETTINGS = {
    "linear": ({"normalize": True}, [{"weight": 0.6}, {"weight": [0.2, 0.8]}]),
    "task_arithmetic": ({"lambda": 0.9}, [{"weight": 0.7}, {"weight": [{"filter": "norm", "value": 0.1},
                                                                        {"value": 0.4}]}]),
    "ties": ({"normalize": True}, [{"weight": 0.7, "density": 0.5}, {"weight": 0.3, "density": [0.3, 0.9]}]),
    "dare_ties": ({}, [{"weight": 0.7, "density": 0.5}, {"weight": 0.3, "density": 0.6}]),
    "dare_linear": ({}, [{"weight": 0.7, "density": 0.5}, {"weight": 0.3, "density": 0.6}]),
    "breadcrumbs": ({}, [{"weight": 0.7, "density": 0.5}, {"weight": 0.3, "density": 0.6}]),
    "della": ({}, [{"weight": 0.7, "density": 0.5, "epsilon": 0.1}, {"weight": 0.3, "density": 0.6}]),
    "slerp": ({"t": [0.2, 0.7]}, None),
    "nuslerp": ({}, [{"weight": 0.4}, {"weight": 0.6}]),
    "model_stock": ({}, None),
    "karcher": ({}, None),
    "sce": ({"select_topk": 0.5}, None),
}


def _inputs(n_models, dtype=np.float32, seed=0):
    rng = np.random.default_rng(seed)
    base = {k: rng.normal(size=s).astype(dtype) for k, s in zip(NAMES, SHAPES)}
    models = [{k: (v.astype(np.float32) + 0.1 * rng.normal(size=v.shape)).astype(dtype) for k, v in base.items()}
              for _ in range(n_models)]
    return base, models


def _n_models(m):
    return max(m.min_inputs, 2) if m.max_inputs is None else m.max_inputs


def _fast(method, base, models, parameters, model_parameters, load_dtype=None, out_dtype=None, seed=0,
          tensors=NAMES):
    m = get_method(method)
    names = [f"model_{i}" for i in range(len(models))]
    depth = P.num_layers_of(NAMES)
    out = {}
    for name in tensors:
        kw = P.resolve_for_tensor(m, name, parameters=parameters, model_parameters=model_parameters,
                                  model_names=names, num_layers=depth)
        b = None if base is None or m.base == "ignored" else base[name]
        ref = (base or models[0])[name]
        out[name] = X.merge_tensor(m, b, [x[name] for x in models], kw, load_dtype=load_dtype,
                                   out_dtype=X.output_dtype(ref.dtype, load_dtype, out_dtype),
                                   key=tensor_key(seed, name) if m.randomized else None, name=name)
    return out


def _eager(method, base, inputs, kw, key, out_dtype):
    """The reference: the kernel dispatched op by op, outside one jit (float32 inputs stacked, result cast), as
    tree.merge computed it before it called execute.merge_tensor."""
    xs = jnp.stack([jnp.asarray(x, jnp.float32) for x in inputs])
    y = method.kernel(None if base is None else jnp.asarray(base, jnp.float32), xs, key=key, **kw)
    return jnp.asarray(y).astype(out_dtype)


# dare_linear is slow (CI time, ~1.5 s): dare_ties' random masks and rescale, then task_arithmetic's weighted sum
@pytest.mark.parametrize("method", marked_slow(sorted(SETTINGS), {"dare_linear"}))
def test_same_as_eager_kernel_and_tree_merge(method):
    m = get_method(method)
    base, models = _inputs(_n_models(m))
    parameters, model_parameters = SETTINGS[method]
    b = None if m.base == "ignored" else base
    names = [f"model_{i}" for i in range(len(models))]
    got = _fast(method, b, models, parameters, model_parameters, seed=3)
    in_memory = tree.merge(method, b, models, parameters=parameters, model_parameters=model_parameters, seed=3)
    for name in NAMES:
        kw = P.resolve_for_tensor(m, name, parameters=parameters, model_parameters=model_parameters,
                                  model_names=names, num_layers=P.num_layers_of(NAMES))
        want = _eager(m, None if b is None else b[name], [x[name] for x in models], kw,
                      tensor_key(3, name) if m.randomized else None, np.float32)
        assert got[name].dtype == want.dtype == in_memory[name].dtype, name
        np.testing.assert_array_equal(np.asarray(got[name]), np.asarray(want), err_msg=f"{method} {name}")
        np.testing.assert_array_equal(np.asarray(in_memory[name]), np.asarray(want), err_msg=f"{method} {name}")


@pytest.mark.parametrize("method", ["ties", "della", "sce"])
def test_inputs_equal_to_the_base_give_the_kernels_bits_without_it(method):
    """A task-vector method whose inputs all equal the base (host arrays equal entry for entry, or the base's own
    array) returns f32(b) + 0 without calling the kernel: the eager kernel's result bit for bit, -0.0 -> +0.0
    included, cast to the output dtype; a distinct device array, a load cast, a NaN or an input that differs runs
    it."""
    m = get_method(method)
    parameters, model_parameters = SETTINGS[method]
    names = ["model_0", "model_1"]
    base = np.random.default_rng(0).normal(size=(6, 5)).astype(np.float32)
    base[0, :2] = [-0.0, 0.0]
    kw = P.resolve_for_tensor(m, NAMES[0], parameters=parameters, model_parameters=model_parameters,
                              model_names=names, num_layers=2)
    key = tensor_key(0, NAMES[0]) if m.randomized else None
    for out_dtype in (np.float32, BF16):
        want = np.asarray(_eager(m, base, [base, base], kw, key, out_dtype))
        for inputs in ([base.copy(), base.copy()], [base, base]):
            cache = X.KernelCache()
            got = X.merge_tensor(m, base, inputs, kw, out_dtype=out_dtype, key=key, cache=cache)
            assert len(cache) == 0 and got.dtype == want.dtype
            np.testing.assert_array_equal(np.asarray(got).view(np.uint8), want.view(np.uint8))
    assert X.unchanged_from_base(m, jnp.asarray(base), [jnp.asarray(base)] * 2) is False  # not compared on device
    assert X.unchanged_from_base(get_method("linear"), base, [base, base]) is False  # not a task-vector method
    changed = base.copy()
    changed[5, 4] += 1
    assert X.unchanged_from_base(m, base, [base, changed]) is False
    with_nan = base.copy()
    with_nan[1, 1] = np.nan
    assert X.unchanged_from_base(m, with_nan, [with_nan.copy(), with_nan.copy()]) is False  # NaN != NaN: kernel
    cache = X.KernelCache()
    X.merge_tensor(m, base, [base, base.copy()], kw, out_dtype=np.float32, key=key, cache=cache, load_dtype=BF16)
    assert len(cache) == 1  # a load cast rounds the inputs first: the kernel runs


def test_every_registered_method_is_covered():
    get_method("linear")  # imports every method module
    uncovered = sorted(set(METHODS) - set(SETTINGS))
    # The remaining methods share their kernels' code paths with a covered one; check them with defaults, on the
    # two layer tensors (one shape: one compilation per method).
    layers = NAMES[:2]
    only = lambda d: {k: d[k] for k in layers}  # noqa: E731
    for method in uncovered:
        m = METHODS[method]
        base, models = _inputs(_n_models(m))
        if any(v is P.REQUIRED for v in m.per_model.values()) or any(v is P.REQUIRED for v in m.shared.values()):
            mp = [{k: 0.5 for k, v in m.per_model.items() if v is P.REQUIRED} for _ in models]
            gp = {k: 0.5 for k, v in m.shared.items() if v is P.REQUIRED}
        else:
            mp, gp = None, {}
        b = None if m.base == "ignored" else base
        want = tree.merge(method, None if b is None else only(b), [only(x) for x in models], parameters=gp,
                          model_parameters=mp, seed=1)
        got = _fast(method, b, models, gp, mp, seed=1, tensors=layers)
        assert sorted(got) == sorted(want) == sorted(layers)
        for name in layers:
            np.testing.assert_allclose(np.asarray(got[name]), np.asarray(want[name]), atol=1e-6, rtol=0,
                                       err_msg=f"{method} {name}")


# (float32, bf16) is slow (CI time, ~2 s): test_merge_to_shards_pipeline_matches_tree runs the same ties merge of
# bf16 inputs loaded as float32, written in bf16, against tree.merge
@pytest.mark.parametrize("load_dtype,out_dtype",
                         [(None, None), pytest.param(np.float32, BF16, marks=pytest.mark.slow), (BF16, np.float32)])
def test_bf16_inputs_and_load_casts_match_tree(load_dtype, out_dtype):
    """bf16 stored inputs: the casts happen inside the jitted function; tree gets numpy-cast inputs as stream
    passes them (cast to the load dtype on read)."""
    base, models = _inputs(3, BF16, seed=1)
    parameters, model_parameters = SETTINGS["ties"]
    cast = (lambda d: {k: v.astype(load_dtype) for k, v in d.items()}) if load_dtype is not None else (lambda d: d)
    want = tree.merge("ties", cast(base), [cast(x) for x in models], parameters=parameters,
                      model_parameters=model_parameters + [{"weight": 0.2, "density": 0.4}], out_dtype=out_dtype)
    got = _fast("ties", base, models, parameters, model_parameters + [{"weight": 0.2, "density": 0.4}],
                load_dtype=load_dtype, out_dtype=out_dtype)
    for name in NAMES:
        assert got[name].dtype == want[name].dtype
        np.testing.assert_array_equal(np.asarray(got[name]).astype(np.float32),
                                      np.asarray(want[name]).astype(np.float32), err_msg=name)


def test_kernel_cache_one_function_per_setting():
    """Per-model arrays and traced scalars are arguments (a new weight or lambda reuses the function), other
    parameters baked (a new normalize does not)."""
    cache = X.KernelCache()
    m = get_method("task_arithmetic")
    base, models = _inputs(2)
    kw = {"weight": np.array([0.5, 0.5]), "lambda": 1.0, "normalize": False}
    for name in NAMES:
        X.merge_tensor(m, base[name], [x[name] for x in models], kw, out_dtype=np.float32, cache=cache)
    assert len(cache) == 1
    n0 = NAMES[0]
    y2 = X.merge_tensor(m, base[n0], [x[n0] for x in models], {**kw, "weight": np.array([0.5, 0.25])},
                        out_dtype=np.float32, cache=cache)
    assert len(cache) == 1
    y3 = X.merge_tensor(m, base[n0], [x[n0] for x in models], {**kw, "lambda": 0.5}, out_dtype=np.float32,
                        cache=cache)
    assert len(cache) == 1
    X.merge_tensor(m, base[n0], [x[n0] for x in models], {**kw, "normalize": True}, out_dtype=np.float32, cache=cache)
    assert len(cache) == 2
    y = X.merge_tensor(m, base[n0], [x[n0] for x in models], kw, out_dtype=np.float32, cache=cache)
    d0, d1 = models[0][n0] - base[n0], models[1][n0] - base[n0]
    np.testing.assert_allclose(np.asarray(y), base[n0] + 0.5 * d0 + 0.5 * d1, atol=1e-6, rtol=0)
    np.testing.assert_allclose(np.asarray(y2), base[n0] + 0.5 * d0 + 0.25 * d1, atol=1e-6, rtol=0)
    np.testing.assert_allclose(np.asarray(y3), base[n0] + 0.5 * (0.5 * d0 + 0.5 * d1), atol=1e-6, rtol=0)


def test_kernel_needing_concrete_arrays_gets_them_baked():
    import dataclasses

    lin = get_method("linear")

    def picky(b, xs, *, key, weight, normalize):  # Python control flow on a per-model parameter
        if float(weight[0]) == 0.0:
            raise ValueError("weight[0] must not be 0")
        return lin.kernel(b, xs, key=key, weight=weight, normalize=normalize)

    m = dataclasses.replace(lin, kernel=picky)
    cache = X.KernelCache()
    x = [np.full(3, 2.0, np.float32), np.full(3, 4.0, np.float32)]
    y = X.merge_tensor(m, None, x, {"weight": np.array([1.0, 3.0]), "normalize": True}, out_dtype=np.float32,
                       cache=cache)
    np.testing.assert_allclose(np.asarray(y), np.full(3, 3.5), rtol=1e-6)
    with pytest.raises(ValueError, match="tensor w: weight.0. must not be 0"):
        X.merge_tensor(m, None, x, {"weight": np.array([0.0, 3.0]), "normalize": True}, out_dtype=np.float32,
                       cache=cache, name="w")


def test_integer_tensors_copied_or_refused():
    m = get_method("linear")
    ids = np.arange(6, dtype=np.int64)
    y = X.merge_tensor(m, None, [ids, ids.copy()], {"weight": np.ones(2), "normalize": True}, out_dtype=np.int64,
                       name="position_ids")
    np.testing.assert_array_equal(np.asarray(y), ids)
    with pytest.raises(tree.MergeInputError, match="position_ids.*model_1"):
        X.merge_tensor(m, None, [ids, ids + 1], {"weight": np.ones(2), "normalize": True}, out_dtype=np.int64,
                       name="position_ids")


def test_kernel_error_names_method_and_tensor():
    m = get_method("task_arithmetic")
    with pytest.raises(ValueError, match="task_arithmetic: tensor layers.3.w"):
        X.merge_tensor(m, np.zeros((2, 2), np.float32), [np.zeros((2, 2), np.float32)],
                       {"weight": np.ones(3), "lambda": 1.0, "normalize": False}, out_dtype=np.float32,
                       name="layers.3.w")


def test_pread_store_reads_what_safetensors_wrote(tmp_path):
    rng = np.random.default_rng(0)
    tensors = {"a": rng.normal(size=(3, 4)).astype(np.float32), "b": rng.normal(size=(5,)).astype(BF16),
               "c": np.arange(7, dtype=np.int64), "empty": np.zeros((0, 3), np.float16)}
    (tmp_path / "sharded").mkdir()
    write_sharded(tensors, tmp_path / "sharded", max_shard_bytes=40)
    save_file(tensors, str(tmp_path / "one.safetensors"))
    for where in (tmp_path / "sharded", tmp_path / "one.safetensors"):
        store = X.PreadStore(where)
        assert set(store) == set(tensors)
        for k, v in tensors.items():
            assert store.shape(k) == v.shape and store.dtype(k) == v.dtype
            got = store[k]
            assert got.dtype == v.dtype and (got.size == 0 or got.ctypes.data % X.HOST_ALIGNMENT == 0)
            np.testing.assert_array_equal(got.astype(np.float64), v.astype(np.float64), err_msg=k)
    with pytest.raises(KeyError, match="'zzz'"):
        X.PreadStore(tmp_path / "one.safetensors")["zzz"]


def test_pread_store_reads_model_safetensors_before_an_index(tmp_path):
    """As transformers' from_pretrained and interop's TensorStore: a directory holding both (stale shards next to
    a newer single file) is read from model.safetensors."""
    write_sharded({"a": np.zeros(4, np.float32), "b": np.zeros(4, np.float32)}, tmp_path, max_shard_bytes=16)
    write_sharded({"a": np.ones(4, np.float32), "b": np.ones(4, np.float32)}, tmp_path)
    assert (tmp_path / INDEX_FILE).exists() and (tmp_path / SINGLE_FILE).exists()
    store = X.PreadStore(tmp_path)
    np.testing.assert_array_equal(store["a"], np.ones(4, np.float32))
    assert sorted(store) == ["a", "b"]


@pytest.mark.parametrize("shape,dtype", [((1 << 20,), np.float32), ((1000, 3), BF16), ((0, 4), np.int8), ((), np.int64)])
def test_aligned_empty_starts_at_64_bytes_and_is_adopted_by_jax(shape, dtype):
    """A 64-byte-aligned host buffer goes onto jax's CPU device without a copy (what the read-ahead relies on);
    numpy's own large buffers start 16 bytes past a page and are copied."""
    a = X.aligned_empty(shape, dtype)
    assert a.shape == shape and a.dtype == np.dtype(dtype) and a.flags.c_contiguous
    assert a.size == 0 or a.ctypes.data % 64 == 0
    if a.size > 1000 and jax.default_backend() == "cpu":
        a[...] = 1
        assert jax.device_put(a, jax.devices()[0]).unsafe_buffer_pointer() == a.ctypes.data


def test_pread_store_truncated_file(tmp_path):
    save_file({"w": np.ones((64, 64), np.float32)}, str(tmp_path / SINGLE_FILE))
    data = (tmp_path / SINGLE_FILE).read_bytes()
    (tmp_path / SINGLE_FILE).write_bytes(data[:-100])
    with pytest.raises(CheckpointError, match="tensor 'w'.*truncated"):
        X.PreadStore(tmp_path)
    (tmp_path / SINGLE_FILE).write_bytes(b"\x01")
    with pytest.raises(CheckpointError, match="too short"):
        X.PreadStore(tmp_path)


def test_planned_shards_are_valid_and_split_like_shard_writer(tmp_path):
    rng = np.random.default_rng(0)
    tensors = {f"t{i}": rng.normal(size=(10, i + 1)).astype(np.float32) for i in range(5)}
    specs = [(k, v.shape, v.dtype) for k, v in tensors.items()]
    limit = 120 + 160  # t0 (40 B) + t1 (80) + t2 (120) = 240 <= 280; + t3 (160) -> new shard
    w = X.PlannedShardWriter(tmp_path, specs, limit)
    for k in reversed(list(tensors)):  # any order: each tensor goes to its planned offset
        w.add(k, jnp.asarray(tensors[k]))
    files = w.finish()
    assert files == ["model-00001-of-00003.safetensors", "model-00002-of-00003.safetensors",
                     "model-00003-of-00003.safetensors", INDEX_FILE]
    index = json.loads((tmp_path / INDEX_FILE).read_text())
    assert index["weight_map"] == {"t0": files[0], "t1": files[0], "t2": files[0], "t3": files[1], "t4": files[2]}
    assert index["metadata"]["total_size"] == sum(v.nbytes for v in tensors.values())
    for f in files[:3]:
        with safe_open(str(tmp_path / f), framework="numpy") as h:  # safetensors validates offsets and sizes
            for k in h.keys():
                np.testing.assert_array_equal(h.get_tensor(k), tensors[k])


def test_planned_writer_errors(tmp_path):
    w = X.PlannedShardWriter(tmp_path, [("a", (2,), np.float32), ("b", (2,), np.float32)], 10**6)
    w.add("a", np.zeros(2, np.float32))
    with pytest.raises(ValueError, match="'a' was already written"):
        w.add("a", np.zeros(2, np.float32))
    with pytest.raises(ValueError, match="never written.*'b'"):
        w.finish()
    w = X.PlannedShardWriter(tmp_path, [("a", (2,), np.float32)], 10**6)
    w.add("a", np.zeros(3, np.float32))
    with pytest.raises(ValueError, match=r"tensor a: result is \(3,\)"):
        w.finish()


def test_merge_to_shards_pipeline_matches_tree(tmp_path):
    """The full pipeline (read-ahead thread, cached kernels, writer thread) on bf16 inputs equals tree.merge."""
    base, models = _inputs(3, BF16, seed=2)
    m = get_method("ties")
    parameters, mp = SETTINGS["ties"]
    mp = mp + [{"weight": 0.2, "density": 0.4}]
    names = [f"model_{i}" for i in range(3)]
    timers = X.Timers()
    groups = [X.TensorGroup(n, base[n].shape, np.dtype(BF16),
                            lambda n=n: (base[n], [x[n] for x in models]),
                            P.resolve_for_tensor(m, n, parameters=parameters, model_parameters=mp,
                                                 model_names=names, num_layers=2), None, names)
              for n in NAMES]
    files = X.merge_to_shards(m, groups, tmp_path, limit=10**6, load_dtype=np.float32, prefetch=1, timers=timers)
    assert files == [SINGLE_FILE]
    want = tree.merge("ties", {k: v.astype(np.float32) for k, v in base.items()},
                      [{k: v.astype(np.float32) for k, v in x.items()} for x in models], parameters=parameters,
                      model_parameters=mp, out_dtype=BF16)
    got = X.PreadStore(tmp_path)
    for n in NAMES:
        np.testing.assert_array_equal(got[n].astype(np.float32), np.asarray(want[n]).astype(np.float32), err_msg=n)
    assert {"read", "compute", "write"} <= set(timers.summary())


def test_merge_to_shards_read_error_propagates(tmp_path):
    def bad():
        raise CheckpointError("shard-3.safetensors: cannot read tensor 'x'")

    m = get_method("linear")
    groups = [X.TensorGroup("x", (2,), np.dtype(np.float32), bad, {"weight": np.ones(1), "normalize": True})]
    with pytest.raises(CheckpointError, match="shard-3"):
        X.merge_to_shards(m, groups, tmp_path, limit=10**6)


@pytest.mark.parametrize("workers", [1, 3])
def test_read_ahead_stays_within_its_depth(workers):
    """The read-ahead loads at most max(depth, workers) items beyond the ones the caller has taken (and does
    get that far ahead when the caller is slow); with a pool of workers the items still come in order."""
    import random
    import threading
    import time

    lock = threading.Lock()
    for depth in (1, 3):
        loaded, ahead, got = [], [], []

        def load(i):
            time.sleep(random.random() * 0.005)  # workers finish out of order
            with lock:
                loaded.append(i)
            return i

        for i in X._read_ahead(range(12), load, depth, workers):
            got.append(i)
            time.sleep(0.03)  # a slow consumer: an unbounded read-ahead would have loaded everything
            with lock:
                ahead.append(len(loaded) - (i + 1))
        assert got == list(range(12)) and sorted(loaded) == list(range(12))
        assert max(ahead) == max(depth, workers), (depth, ahead)


@pytest.mark.parametrize("workers", [1, 3])
def test_read_ahead_stops_when_the_caller_leaves_early(workers):
    loaded = []
    gen = X._read_ahead(range(1000), lambda i: loaded.append(i) or i, 2, workers)
    assert next(gen) == 0
    gen.close()
    import time

    time.sleep(0.3)
    assert len(loaded) <= 6


@pytest.mark.parametrize("workers", [1, 3])
def test_read_ahead_raises_in_order(workers):
    """An error in one load is raised when the caller reaches that item, after the items before it; no load
    starts after it failed (at most the workers - 1 loads already running beside it get past item 4)."""
    import time

    started = []

    def load(i):
        started.append(i)
        if i == 4:
            raise CheckpointError("cannot read tensor 4")
        time.sleep(0.02)
        return i

    got = []
    with pytest.raises(CheckpointError, match="tensor 4"):
        for i in X._read_ahead(range(10), load, 3, workers):
            got.append(i)
    assert got == [0, 1, 2, 3]
    time.sleep(0.2)  # the pool's running loads end
    assert max(started) <= 4 + workers - 1, started


def test_merge_to_shards_with_read_workers_equals_one_reader(tmp_path):
    """Several read workers give the same shards, byte for byte; a worker count below 1 is refused."""
    base, models = _inputs(3, BF16, seed=3)
    m = get_method("linear")
    groups = [X.TensorGroup(n, base[n].shape, np.dtype(BF16), lambda n=n: (None, [x[n] for x in models]),
                            {"weight": np.array([0.2, 0.3, 0.5], np.float32), "normalize": True})
              for n in NAMES]
    outs = []
    for workers in (1, 3):
        out = tmp_path / f"w{workers}"
        out.mkdir()
        files = X.merge_to_shards(m, groups, out, limit=10**6, read_workers=workers)
        outs.append((out / files[0]).read_bytes())
    assert outs[0] == outs[1]
    with pytest.raises(ValueError, match="read_workers must be at least 1"):
        list(X.merge_groups(m, groups, read_workers=0))


def test_kernel_cache_tells_methods_apart_and_drops_the_least_recent():
    import dataclasses

    lin = get_method("linear")
    doubled = dataclasses.replace(lin, kernel=lambda b, xs, *, key, **kw: 2 * lin.kernel(b, xs, key=key, **kw))
    cache = X.KernelCache(maxsize=2)
    x = [np.ones(3, np.float32), np.ones(3, np.float32)]
    kw = {"weight": np.array([0.5, 0.5]), "normalize": False}
    np.testing.assert_array_equal(np.asarray(X.merge_tensor(lin, None, x, kw, out_dtype=np.float32, cache=cache)),
                                  np.ones(3))
    np.testing.assert_array_equal(np.asarray(X.merge_tensor(doubled, None, x, kw, out_dtype=np.float32,
                                                            cache=cache)), 2 * np.ones(3))  # same name, own kernel
    assert len(cache) == 2
    cache.get(lin, kw, None, np.float32)  # now the most recent
    cache.get(lin, {**kw, "normalize": True}, None, np.float32)
    assert len(cache) == 2 and [m for m, _ in cache._fns.values()] == [lin, lin]  # `doubled` was dropped


@pytest.mark.parametrize("method, name, values", [("slerp", "t", [0.0, 0.3, 0.7, 1.0]),
                                                  ("nearswap", "t", [1e-3, 0.02, 0.5]),
                                                  ("ties", "lambda", [0.5, 1.0, 1.7])])
def test_traced_scalars_compile_once_and_equal_the_baked_kernel(method, name, values):
    """A depth gradient of a method's traced scalar (slerp's t, the task-vector methods' lambda) runs one cached
    function for every value, bit for bit the kernel with the value baked in as a constant (the old path)."""
    m = get_method(method)
    assert name in m.traced_scalars
    base, models = _inputs(1, seed=7)
    x = [models[0][NAMES[0]]]
    per_model = [{"weight": 0.8, "density": 0.5}] if method == "ties" else [{}]
    cache, baked = X.KernelCache(), X.KernelCache()
    for v in values:
        kw = P.resolve_for_tensor(m, NAMES[0], parameters={name: v}, model_parameters=per_model,
                                  model_names=["model_0"], num_layers=2)
        got = np.asarray(X.merge_tensor(m, base[NAMES[0]], x, kw, out_dtype=np.float32, cache=cache))
        want = np.asarray(baked.get(m, kw, None, np.float32, bake=True)(base[NAMES[0]], tuple(x), None))
        np.testing.assert_array_equal(got, want, err_msg=f"{method} {name}={v}")
    assert len(cache) == 1 and len(baked) == len(values)


def test_tree_merge_runs_the_cached_kernels():
    """tree.merge's per-tensor step is execute.merge_tensor: a new setting adds one cached function, used
    again for every tensor of the same setting and on a second call."""
    base, models = _inputs(2, seed=5)
    before = len(X.DEFAULT_CACHE)
    a = tree.merge("task_arithmetic", base, models, parameters={"lambda": 0.123456, "int8_mask": True},
                   model_parameters=[{"weight": 0.3}, {"weight": 0.6}])  # int8_mask: baked, a setting of its own
    assert len(X.DEFAULT_CACHE) == before + 1
    b = tree.merge("task_arithmetic", base, models, parameters={"lambda": 0.123456, "int8_mask": True},
                   model_parameters=[{"weight": 0.3}, {"weight": 0.6}])
    assert len(X.DEFAULT_CACHE) == before + 1
    for n in NAMES:
        want = base[n] + 0.123456 * (0.3 * (models[0][n] - base[n]) + 0.6 * (models[1][n] - base[n]))
        np.testing.assert_allclose(np.asarray(a[n]), want, atol=1e-6, rtol=0)
        np.testing.assert_array_equal(np.asarray(a[n]), np.asarray(b[n]))


def test_output_dtype_rules():
    assert X.output_dtype(BF16) == BF16 and X.output_dtype(BF16, np.float32) == np.float32
    assert X.output_dtype(np.float32, np.float32, BF16) == BF16
    assert X.output_dtype(np.int64, np.float32, BF16) == np.int64  # integer tensors keep theirs
    assert X.output_dtype(np.float64) == np.float32  # as jax computes it (x64 off), as tree.merge writes it


@pytest.mark.parametrize("method", [m if m in ("linear", "ties", "dare_ties", "karcher", "slerp") else
                                    pytest.param(m, marks=pytest.mark.slow) for m in sorted(SETTINGS)])
def test_merge_stacked_equals_tensor_by_tensor(method):
    """The two same-shape layer tensors merged in one vmapped call give merge_tensor's results (their per-model
    parameter arrays, and slerp's traced t, differ under the depth gradients of SETTINGS)."""
    m = get_method(method)
    base, models = _inputs(_n_models(m))
    parameters, model_parameters = SETTINGS[method]
    b = None if m.base == "ignored" else base
    layer_names = NAMES[:2]
    want = _fast(method, b, models, parameters, model_parameters, seed=3)
    kws = [P.resolve_for_tensor(m, n, parameters=parameters, model_parameters=model_parameters,
                                model_names=[f"model_{i}" for i in range(len(models))],
                                num_layers=P.num_layers_of(NAMES)) for n in layer_names]
    stack = lambda d: jnp.stack([jnp.asarray(d[n]) for n in layer_names])
    keys = jnp.stack([tensor_key(3, n) for n in layer_names]) if m.randomized else None
    got = X.merge_stacked(m, None if b is None else stack(b), [stack(x) for x in models], kws,
                          out_dtype=np.float32, keys=keys, names=layer_names, cache=X.KernelCache())
    assert got.shape == (2, *SHAPES[0])
    for i, n in enumerate(layer_names):
        np.testing.assert_allclose(np.asarray(got[i]), np.asarray(want[n]), rtol=2e-6, atol=1e-6,
                                   err_msg=f"{method} {n}")
        if method in ("linear", "task_arithmetic", "ties"):
            np.testing.assert_array_equal(np.asarray(got[i]), np.asarray(want[n]), err_msg=f"{method} {n}")


def test_merge_stacked_refuses_different_scalar_parameters_and_bad_stacks():
    m = get_method("ram")  # epsilon follows a depth gradient: a baked scalar that differs between the layers
    base, models = _inputs(1)
    kws = [P.resolve_for_tensor(m, n, parameters={"epsilon": [1e-5, 1e-3]}, model_parameters=[{}],
                                model_names=["model_0"], num_layers=2) for n in NAMES[:2]]
    stack = lambda d: jnp.stack([jnp.asarray(d[n]) for n in NAMES[:2]])
    with pytest.raises(ValueError, match=r"layers.0.mlp.up_proj.weight and .*layers.1.mlp.up_proj.weight have "
                                         r"different scalar parameters"):
        X.merge_stacked(m, stack(base), [stack(models[0])], kws, out_dtype=np.float32, names=NAMES[:2])
    with pytest.raises(ValueError, match="not all"):
        X.merge_stacked(m, stack(base), [stack(models[0])[:1]], kws, out_dtype=np.float32, names=NAMES[:2])
