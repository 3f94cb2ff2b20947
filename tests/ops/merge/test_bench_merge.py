"""scripts/bench_merge.py runs end to end at the tiny size on the CPU (ours only): the merge's output is complete
and the run reports the inputs' read bandwidth and the fraction of it the merge reached (what BENCHMARKS.md
quotes). Marked slow (~17 s: the random checkpoints are made first): the suite is over its time budget."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]


@pytest.mark.slow
def test_bench_merge_tiny(tmp_path):
    out = tmp_path / "results.json"
    proc = subprocess.run([sys.executable, "scripts/bench_merge.py", "--workdir", str(tmp_path / "w"), "--size",
                           "tiny", "--methods", "linear", "--tools", "ours", "--keep_outputs", "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = json.loads(out.read_text())["rows"]
    run = next(r for r in rows if "wall_s" in r)
    bw = next(r for r in rows if r.get("kind") == "read_bandwidth")
    assert run["rc"] == 0 and run["output_bytes"] > 0 and run["input_bytes"] == bw["bytes"] > 0
    assert bw["page_cache_gb_s"] > 0 and bw["method"] == "linear"
    assert "direct_gb_s" in bw or "direct_error" in bw
    assert "of read bound" in proc.stdout and "% of " in proc.stdout
