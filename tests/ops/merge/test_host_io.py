"""host_io.ShardFile: bytes written through the O_DIRECT staging path (whole blocks, a padded last block, then a
truncate) equal the bytes of a plain file, for sizes that are not multiples of the block, a staging buffer smaller
than one write, out-of-order writes (the buffered fallback) and through PlannedShardWriter into a safetensors file
that safetensors reads back."""
import errno
import os

import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import load_file

from configurable_fm.ops.merge import host_io as H
from configurable_fm.ops.merge.execute import PlannedShardWriter


def _pieces(rng, sizes):
    return [rng.integers(0, 256, size=n, dtype=np.uint8) for n in sizes]


def _write(path, size, pieces, order=None, **kw):
    f = H.ShardFile(path, size, **kw)
    offsets = np.concatenate([[0], np.cumsum([p.size for p in pieces])[:-1]]).astype(int)
    for i in (order if order is not None else range(len(pieces))):
        f.write_at(int(offsets[i]), pieces[i])
    f.close()
    return f


@pytest.mark.parametrize("stage", [H.DIRECT_BLOCK, 3 * H.DIRECT_BLOCK, 1 << 20])
def test_direct_stream_equals_the_bytes(tmp_path, stage):
    rng = np.random.default_rng(stage)
    pieces = _pieces(rng, [77, 4096, 10_000, 1, 3 * 4096 + 5, 123_457])
    want = np.concatenate(pieces).tobytes()
    f = _write(tmp_path / "x", len(want), pieces, direct=True, stage_bytes=stage)
    assert (tmp_path / "x").read_bytes() == want
    if f.direct_bytes == 0:  # a file system that refuses O_DIRECT: the fallback wrote it
        pytest.skip("O_DIRECT is not available on the test's temporary directory")
    assert f.direct_bytes == len(want)  # every byte past the page cache, the padded tail included


def test_out_of_order_falls_back_and_stays_exact(tmp_path):
    rng = np.random.default_rng(1)
    pieces = _pieces(rng, [5000, 9000, 300, 70_001])
    want = np.concatenate(pieces).tobytes()
    _write(tmp_path / "x", len(want), pieces, order=[0, 2, 1, 3], direct=True, stage_bytes=2 * H.DIRECT_BLOCK)
    assert (tmp_path / "x").read_bytes() == want


def test_buffered_and_auto(tmp_path):
    rng = np.random.default_rng(2)
    pieces = _pieces(rng, [100, 200])
    want = np.concatenate(pieces).tobytes()
    for direct in (False, None):  # None: a file below DIRECT_MIN_BYTES is written buffered
        f = _write(tmp_path / f"x{direct}", len(want), pieces, direct=direct)
        assert (tmp_path / f"x{direct}").read_bytes() == want and f.direct_bytes == 0
    f.close()  # idempotent


def test_planned_shards_written_directly_load_back(tmp_path):
    rng = np.random.default_rng(3)
    bf16 = np.dtype(ml_dtypes.bfloat16)
    tensors = {"a": rng.standard_normal((37, 23)).astype(np.float32),
               "b": rng.standard_normal((5000,)).astype(bf16),
               "c": rng.integers(-9, 9, size=(3, 7)).astype(np.int64)}
    w = PlannedShardWriter(tmp_path, [(k, v.shape, v.dtype) for k, v in tensors.items()], 12_000, direct=True)
    for k, v in tensors.items():
        w.add(k, v)
    files = w.finish()
    assert len(files) == 3  # two shards and the index
    got = {}
    for name in files[:-1]:
        got.update(load_file(os.fspath(tmp_path / name)))
    assert set(got) == set(tensors)
    for k, v in tensors.items():
        assert got[k].dtype == v.dtype and np.array_equal(got[k].view(np.uint8), v.view(np.uint8)), k


@pytest.mark.parametrize("refuse_after", [0, 1, 3])
def test_a_refused_direct_write_falls_back_mid_stream(tmp_path, monkeypatch, refuse_after):
    """The file system refuses O_DIRECT (EINVAL) after `refuse_after` direct writes, inside a write larger than the
    stage: what was staged and the rest of that write go through the cache, and the file is still exact."""
    rng = np.random.default_rng(4)
    pieces = _pieces(rng, [1000, 5 * H.DIRECT_BLOCK + 17, 300, 9 * H.DIRECT_BLOCK + 3])
    want = np.concatenate(pieces).tobytes()
    real, calls = H._pwrite_all, []

    def pwrite(fd, data, offset):
        if f.direct_fd is not None and fd == f.direct_fd:
            calls.append(offset)
            if len(calls) > refuse_after:
                raise OSError(errno.EINVAL, "refused")
        real(fd, data, offset)

    monkeypatch.setattr(H, "_pwrite_all", pwrite)
    f = H.ShardFile(tmp_path / "x", len(want), direct=True, stage_bytes=2 * H.DIRECT_BLOCK)
    if not f.direct:
        pytest.skip("O_DIRECT is not available on the test's temporary directory")
    offsets = np.concatenate([[0], np.cumsum([p.size for p in pieces])[:-1]]).astype(int)
    for o, p in zip(offsets, pieces):
        f.write_at(int(o), p)
    f.close()
    assert (tmp_path / "x").read_bytes() == want
    assert f.direct_bytes == refuse_after * 2 * H.DIRECT_BLOCK and not f.direct
