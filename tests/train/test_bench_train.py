"""scripts/bench_train.py --mesh: the benchmarked step sharded over 8 fake CPU devices (FSDP 4 x tensor 2)
computes the one-device step's loss, and the row reports the mesh's devices (MFU counts all of them)."""
import json
import os

import jax
import pytest

from tests.helpers import compiles, load_script


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


@pytest.fixture(scope="module")
def main_run(bench, tmp_path_factory):
    """(the rows written to --out, the compilations of the step) of `bench_train.py --variant tiny --seq_len 16
    --grid 4:none --steps 1 --warmup 1 --anchor FAKE --anchor_batch 8`: our row (the step's first call and the timed
    one on 4 x 16 tokens), the fake anchor's row, the summary. One run for the two tests below."""
    tmp = tmp_path_factory.mktemp("bench_train")
    fake = tmp / "anchor.py"
    fake.write_text("import sys\nprint('args', sys.argv[1:])\n"
                    "print('torch 9 compile=True params 1.1B batch 8x2048: 60,555 tokens/s, MFU 44.8%, peak 32 GiB')\n")
    out = tmp / "rows.jsonl"
    with compiles("fused_step") as c:
        bench.main(["--variant", "tiny", "--seq_len", "16", "--grid", "4:none", "--steps", "1", "--warmup", "1",
                    "--anchor", str(fake), "--anchor_batch", "8", "--out", str(out)])
    return [json.loads(line) for line in out.read_text().splitlines()], c.count


def test_accumulated_and_fused_steps_match_one_pass(bench, main_run):
    """--accum 2 with --fuse_projections 1: the step's 4 rows as 2 micro-batches of 2 (the trainer's exact
    accumulation) with q/k/v and gate/up as one matmul each give the one-pass, unfused loss of main_run's row; a
    batch that does not split is refused; the step compiles once (the optimizer state starts where the step leaves
    it, on the mesh). 4 x 16 tokens."""
    (one, *_), count = main_run
    assert count == 1  # the optimizer state starts on the mesh, where the step leaves it: one executable
    both = bench.bench_one("tiny", 16, 4, "none", 1, 1, "auto", accum=2, fuse=True)
    assert both["accum"] == 2 and both["batch"] == 4 and both["tokens_per_s"] > 0
    assert both["fuse_projections"] and not one["fuse_projections"] and one["accum"] == 1
    assert both["loss"] == pytest.approx(one["loss"], rel=1e-5)
    assert one["xla_flags"] == both["xla_flags"] == os.environ.get("XLA_FLAGS", "")  # the flags each row ran under
    with pytest.raises(ValueError, match="micro-batches"):
        bench.bench_one("tiny", 32, 6, "none", 1, 1, "auto", accum=4)


def test_anchor_runs_after_our_rows_and_its_line_is_parsed(bench, main_run, tmp_path, capsys):
    """--anchor SCRIPT: the anchor runs as `python SCRIPT BATCH compile` after our rows; its 'N tokens/s, MFU M%'
    line becomes a row, and a summary row holds our best MFU over the anchor's (None on the CPU, which has no peak);
    an anchor that prints no such line leaves its stderr in the row; a missing script is a usage error."""
    rows, _ = main_run
    assert [("anchor" in r, "summary" in r) for r in rows] == [(False, False), (True, False), (False, True)]
    anchor, summary = rows[1], rows[2]
    assert anchor["tokens_per_s"] == 60555 and anchor["mfu"] == pytest.approx(0.448) and anchor["compile"]
    assert anchor["batch"] == 8 and anchor["returncode"] == 0
    assert summary["anchor_mfu"] == pytest.approx(0.448) and summary["best_mfu"] is None  # no peak FLOP/s on a CPU
    assert summary["mfu_over_anchor"] is None
    broken = tmp_path / "broken.py"
    broken.write_text("import sys\nsys.exit('CUDA is not available')\n")
    row = bench.run_anchor(str(broken), 4, False)
    assert row["returncode"] == 1 and "CUDA is not available" in row["line"] and "mfu" not in row
    capsys.readouterr()
    with pytest.raises(SystemExit):
        bench.main(["--variant", "tiny", "--anchor", str(tmp_path / "missing.py")])
    assert "--anchor: no file" in capsys.readouterr().err
