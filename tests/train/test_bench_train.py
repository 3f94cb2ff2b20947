"""scripts/bench_train.py --mesh: the benchmarked step sharded over 8 fake CPU devices (FSDP 4 x tensor 2)
computes the one-device step's loss, and the row reports the mesh's devices (MFU counts all of them)."""
import os

import jax
import pytest

from tests.helpers import load_script


@pytest.fixture(scope="module")
def bench():
    return load_script("bench_train")


@pytest.mark.slow  # ~45 s on 2 cores; the trainer's own sharded == unsharded tests run in CI
def test_sharded_bench_step_matches_one_device(bench):
    assert jax.device_count() == 8
    one = bench.bench_one("tiny", 64, 8, "none", 2, 1, "auto", (1, 1, 1))
    row = bench.bench_one("tiny", 64, 8, "none", 2, 1, "auto", (1, 4, 2))
    assert row["devices"] == 8 and row["mesh"] == [1, 4, 2]
    assert row["loss"] == pytest.approx(one["loss"], rel=1e-5)
    assert row["tokens_per_s_per_device"] == pytest.approx(row["tokens_per_s"] / 8)


def test_accumulated_and_fused_steps_match_one_pass(bench):
    """--accum 2: the step's 8 rows as 2 micro-batches of 4 give the one-pass loss (the trainer's exact
    accumulation); --fuse_projections 1 (q/k/v and gate/up as one matmul each) gives it too; a batch that does not
    split is refused."""
    one = bench.bench_one("tiny", 32, 8, "none", 1, 1, "auto")
    two = bench.bench_one("tiny", 32, 8, "none", 1, 1, "auto", accum=2)
    assert two["accum"] == 2 and two["batch"] == 8 and two["tokens_per_s"] > 0
    assert two["loss"] == pytest.approx(one["loss"], rel=1e-5)
    fused = bench.bench_one("tiny", 32, 8, "none", 1, 1, "auto", fuse=True)
    assert fused["fuse_projections"] and not one["fuse_projections"]
    assert fused["loss"] == pytest.approx(one["loss"], rel=1e-5)
    assert one["xla_flags"] == os.environ.get("XLA_FLAGS", "")  # the flags each row ran under
    with pytest.raises(ValueError, match="micro-batches"):
        bench.bench_one("tiny", 32, 6, "none", 1, 1, "auto", accum=4)
