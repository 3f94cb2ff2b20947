"""staging.py: arenas hand out aligned, disjoint views, grow after an overflow up to their cap and reset after
each group; reads through PreadStore land in the active arena; a merge that stages its reads writes the same bytes
as one that does not, with several read workers reusing their arenas (device copies never alias them), integer
tensors copied out; on a CUDA device the arenas are page-locked."""
import jax
import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import save_file

from configurable_fm.ops.merge import execute as X
from configurable_fm.ops.merge import staging as S
from configurable_fm.ops.merge.registry import get_method

BF16 = np.dtype(ml_dtypes.bfloat16)


def test_arena_views_are_aligned_disjoint_and_reset_after_each_group():
    arena = S.StagingArena(max_bytes=64 << 20)
    with arena.active():  # empty at first: everything overflows into fresh memory, then it grows
        a = S.host_empty((1000,), np.float32)
        assert arena.take((10,), np.uint8) is None
    assert arena.capacity >= 4096 + 4000 and arena.capacity % (16 << 20) == 0
    with arena.active():
        a = S.host_empty((1000,), np.float32)
        b = S.host_empty((3, 5), BF16)
        assert a.ctypes.data % 4096 == 0 and b.ctypes.data % 4096 == 0
        assert a.dtype == np.float32 and b.shape == (3, 5) and b.dtype == BF16
        a[:] = 1.0
        b[:] = 2.0
        assert not np.shares_memory(a, b) and (a == 1.0).all()
        first = a.ctypes.data
    with arena.active():  # reset: the next group starts at the front again
        assert S.host_empty((8,), np.float32).ctypes.data == first
    c = S.host_empty((8,), np.float32)  # no arena active on this thread
    assert c.ctypes.data != first


def test_arena_growth_is_capped_and_overflow_falls_back():
    arena = S.StagingArena(max_bytes=16 << 20)
    for _ in range(2):
        with arena.active():
            big = S.host_empty((40 << 20,), np.uint8)  # more than the cap: fresh memory, the arena stays capped
            big[-1] = 7
    assert arena.capacity == 16 << 20
    with arena.active():
        x = arena.take((8 << 20,), np.uint8)
        y = arena.take((9 << 20,), np.uint8)
        assert x is not None and y is None


def test_closed_arena_is_not_used_and_pool_on_cpu_is_not_pinned():
    pool = S.StagingPool(jax.devices("cpu")[0])
    assert not pool.pinned
    with pool.arena() as arena:
        S.host_empty((1 << 20,), np.uint8)
    with pool.arena():
        assert S.host_empty((16,), np.uint8).base is not None and arena.capacity > 0
    pool.close()
    with pool.arena():
        assert arena.capacity == 0 and arena.take((16,), np.uint8) is None


def _checkpoints(tmp_path, n_models=3, seed=0):
    rng = np.random.default_rng(seed)
    shapes = {f"model.layers.{i}.mlp.up_proj.weight": (40 + 8 * i, 24) for i in range(10)}
    shapes["model.norm.weight"] = (24,)
    stores = []
    for k in range(n_models):
        tensors = {n: rng.normal(size=s).astype(BF16) for n, s in shapes.items()}
        tensors["model.layers.0.counter"] = np.arange(6, dtype=np.int32) + k * 0  # the same in every model
        save_file(tensors, str(tmp_path / f"m{k}.safetensors"))
        stores.append(X.PreadStore(tmp_path / f"m{k}.safetensors"))
    return stores, {**shapes, "model.layers.0.counter": (6,)}


def test_staged_merge_writes_the_same_bytes(tmp_path):
    """Staged reads (each of 3 workers reuses its arena for group after group, 4 groups ahead) give the same
    shards as unstaged reads, byte for byte, including a copied integer tensor. Device copies that aliased an
    arena (jax adopts aligned host memory on the CPU) would be overwritten by later reads and fail this."""
    stores, shapes = _checkpoints(tmp_path)
    m = get_method("linear")
    kw = {"weight": np.array([0.2, 0.3, 0.5], np.float32), "normalize": True}
    groups = [X.TensorGroup(n, s, np.dtype(np.int32 if n.endswith("counter") else BF16),
                            lambda n=n: (None, [st[n] for st in stores]), kw) for n, s in shapes.items()]
    outs = []
    for staging in (False, True):
        out = tmp_path / f"s{int(staging)}"
        out.mkdir()
        files = X.merge_to_shards(m, groups, out, limit=10**7, read_workers=3, prefetch=4, staging=staging)
        outs.append((out / files[0]).read_bytes())
    assert outs[0] == outs[1]


@pytest.mark.gpu
def test_arenas_are_page_locked_on_a_cuda_device():
    gpu = jax.devices("gpu")[0]
    with S.StagingPool(gpu) as pool:
        assert pool.pinned
        for _ in range(2):
            with pool.arena() as arena:
                x = S.host_empty((1 << 20,), np.float32)
                x[:] = np.arange(1 << 20, dtype=np.float32)
                y = jax.device_put(x, gpu, may_alias=False)
                np.testing.assert_array_equal(np.asarray(y), np.arange(1 << 20, dtype=np.float32))
        assert arena.registered
