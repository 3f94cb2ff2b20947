"""scripts/bench_merge.py runs end to end at the tiny size on the CPU (ours only): the merge's output is complete
and the run reports the inputs' read bandwidth and the fraction of it the merge reached (what BENCHMARKS.md
quotes). Marked slow (~17 s: the random checkpoints are made first): the suite is over its time budget. Its
slerp YAML (a depth gradient of t) is checked without running it."""
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


def test_bench_merge_slerp_yaml_is_a_depth_gradient(tmp_path):
    """The bench's slerp YAML (mergekit's README example: the base towards one fine-tune, t by depth) loads as a
    two-model slerp whose t varies over the layers; its inputs are the base's and that fine-tune's files."""
    from configurable_fm.ops.merge.mergekit_yaml import load_mergekit_yaml
    from tests.helpers import load_script

    bm = load_script("bench_merge")
    ckpt = {m: tmp_path / m for m in bm.MODELS}
    for d in ckpt.values():
        d.mkdir()
        (d / "model.safetensors").write_bytes(b"")
        (d / "config.json").write_text("{}")
    plan = load_mergekit_yaml(bm.write_yaml(tmp_path / "s.yml", "slerp", ckpt, "float32"))
    assert plan.method == "slerp" and plan.parameters["t"] == [0.0, 0.5, 0.3, 0.7, 1.0]
    assert [Path(m).name for m in plan.model_names] == ["ft_a"] and plan.base.path.name == "base"
    assert [f.parent.name for f in bm.input_files(ckpt, "slerp")] == ["base", "ft_a"]
