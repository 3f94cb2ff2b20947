"""The grow-vs-scratch study's compute accounting (experiments/grow/compare.py) on hand-made curves, the stage on
fabricated stage directories, and the study config's budgets (experiments/grow/grow_vs_scratch.py). The whole
pipeline (train -> grow -> train in a study) is tested in tests/stages/test_grow_stage.py."""
import json

import pytest

from configurable_fm.models.factory import config_from_dict, config_to_dict
from configurable_fm.stages import StageContext
from configurable_fm.train.flops import flops_per_token
from experiments.grow import compare as C
from experiments.grow import grow_vs_scratch as G


def test_first_crossing_interpolates_in_compute():
    pts = [(10.0, 4.0), (20.0, 3.0), (30.0, 2.0)]
    assert C.first_crossing(pts, 2.5) == pytest.approx(25.0)  # halfway between 3.0 (20) and 2.0 (30)
    assert C.first_crossing(pts, 3.0) == pytest.approx(20.0)
    assert C.first_crossing(pts, 5.0) == 10.0  # below the target at the first point: that point's compute
    assert C.first_crossing(pts, 1.0) is None


class FakeCurve:
    def __init__(self, name, val, total, params=1, shape="s"):
        self.name, self.val, self.train, self.total, self.params, self.shape = name, val, val, total, params, shape

    @property
    def final_val(self):
        return self.val[-1][1]


def test_compare_counts_the_small_run():
    scratch = FakeCurve("scratch", [(50.0, 3.0), (100.0, 2.0)], 100.0)
    small = FakeCurve("small", [(10.0, 3.5), (20.0, 3.2)], 20.0)
    large = FakeCurve("large", [(10.0, 2.5), (30.0, 1.5), (40.0, 1.4)], 40.0)  # crosses 2.0 at 20
    never = FakeCurve("never", [(40.0, 2.4)], 40.0)
    alone = FakeCurve("alone", [(30.0, 2.2), (60.0, 1.8)], 60.0)  # crosses 2.0 at 45
    r = C.compare(scratch, {"a": (small, large), "b": (small, never)}, 0.6, 0.4, {"ctl": alone})
    a, b = r["runs"]["a"], r["runs"]["b"]
    assert a["total_fraction"] == pytest.approx(0.4) and a["post_fraction"] == pytest.approx(0.2)
    assert a["small_fraction"] == pytest.approx(0.2) and a["total_fraction_budget"] == pytest.approx(0.6)
    assert a["meets_total_goal"] and a["meets_post_goal"]
    assert b["total_fraction"] is None and not b["meets_total_goal"]
    assert b["scratch_equivalent_fraction"] == pytest.approx(0.5 + 0.5 * 0.6)  # scratch at 2.4: 50 + 50*0.6
    assert r["controls"]["ctl"]["total_fraction"] == pytest.approx(0.45)
    text = C.table(r)
    assert "not reached" in text and "control: ctl" in text and "goal <= 0.6" in text


def fake_stage(root, name, model_cfg, seq_len, rows, **record):
    d = root / "stages" / name
    (d / "train").mkdir(parents=True)
    (d / "model").mkdir()
    (d / "stage.json").write_text(json.dumps({"name": name, "resolved": {"seq_len": seq_len}, **record}))
    (d / "model" / "model_config.json").write_text(json.dumps(config_to_dict(model_cfg)))
    (d / "train" / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(d / "model")


def test_stage_on_fabricated_runs(tmp_path):
    big = config_from_dict(dict(family="llama", vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2,
                            num_heads=4, num_kv_heads=2))
    small = config_from_dict(dict(family="llama", vocab_size=64, hidden_size=16, intermediate_size=32, num_layers=2,
                              num_heads=2, num_kv_heads=1))
    fb, fs = flops_per_token(big, 8), flops_per_token(small, 8)
    scratch = fake_stage(tmp_path, "00_scratch", big, 8, [
        {"step": 1, "tokens": 100, "loss": 4.0, "val_loss": 3.0}, {"step": 2, "tokens": 200, "loss": 3.0, "val_loss": 2.0}])
    s = fake_stage(tmp_path, "01_small", small, 8, [{"step": 1, "tokens": 100, "loss": 4.0, "val_loss": 3.5}])
    g = fake_stage(tmp_path, "03_large", big, 8, [
        {"step": 1, "tokens": 20, "loss": 3.0, "val_loss": 2.5}, {"step": 2, "tokens": 60, "loss": 2.0, "val_loss": 1.5}])
    stage_dir = tmp_path / "stages" / "04_compare"
    stage_dir.mkdir()
    cfg = C.compare_config(scratch=scratch, runs={"grown": (s, g)}, controls={})
    out = C.grow_compare_stage(cfg, StageContext(tmp_path, stage_dir, 4, "compare", {}, log=lambda m: None))
    result = json.loads((stage_dir / "compare.json").read_text())
    c_s = 200 * fb
    cross = 20 * fb + (60 - 20) * fb * (2.5 - 2.0) / (2.5 - 1.5)  # interpolated at loss 2.0
    assert result["runs"]["grown"]["total_fraction"] == pytest.approx((100 * fs + cross) / c_s)
    assert out.metrics["grown/total_fraction"] == pytest.approx((100 * fs + cross) / c_s)
    assert (stage_dir / "compare.png").stat().st_size > 0 and "| grown |" in (stage_dir / "compare.md").read_text()
    assert "stages/04_compare/compare.png" in out.summary


@pytest.mark.parametrize("variant", ["default", "wide_short", "long"])
def test_study_budgets(variant):
    c = G.get_config(variant)
    stages = {s.name: s for s in c.stages}
    scratch = stages["scratch"]
    fpt = lambda s: flops_per_token(config_from_dict(s.model.to_dict()), s.seq_len)
    c_s = scratch.steps * fpt(scratch)
    for name, st in stages.items():
        if name.startswith("small_"):
            assert st.steps * fpt(st) / c_s == pytest.approx(G.SMALL_FRACTION, rel=0.01)
            assert st.optimizer.schedule == "constant"
        if name.startswith("large_"):
            assert st.steps / scratch.steps == pytest.approx(G.POST_FRACTION) and st.init_from == "@grow_" + name[6:]
        if name.startswith("alone_"):
            assert st.steps * fpt(st) / c_s == pytest.approx(G.SMALL_FRACTION + G.POST_FRACTION, rel=0.01)
        if name.startswith("run_"):  # the control's growth as a continued run: copied / reset moments
            label, mode = name[4:].rsplit("_", 1)
            assert st.kind == "grow_run" and st.source == f"@small_{label}" and st.optimizer_state == mode
            assert st.steps == stages[f"small_{label}"].steps + stages[f"large_{label}"].steps
            assert st.rewarm_steps == stages[f"large_{label}"].optimizer.warmup_steps
    assert sorted(n for n in stages if n.startswith("run_")) == ["run_width_x2_stack_x2_copy",
                                                                "run_width_x2_stack_x2_reset"]
    assert stages["compare"].kind == "grow_compare" and len(stages["compare"].runs) == 8
    # MSG: one grow step to the large shape behind masks at 0, faded in over a quarter of the post-growth steps
    masked, large = stages["grow_masked_x2_x2"].masked, stages["large_masked_x2_x2"]
    assert {k: masked[k] for k in ("hidden_size", "num_heads", "num_kv_heads", "intermediate_size", "num_layers")} \
        == {k: large.model[k] for k in ("hidden_size", "num_heads", "num_kv_heads", "intermediate_size", "num_layers")}
    assert masked.ramp == 0.0 and "width" not in stages["grow_masked_x2_x2"]
    assert large.task.to_dict() == {"kind": "mask_ramp", "start": 0, "steps": round(G.MASK_RAMP_FRACTION * large.steps)}
    assert "task" not in stages["large_width_x2"]


def test_a_grow_run_curve_starts_at_its_growth_step(tmp_path):
    """A 'grow_run' stage's metrics begin with the source run's records: the curve keeps the steps after the
    growth step, with tokens (so compute) counted from there."""
    big = config_from_dict(dict(family="llama", vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2,
                                num_heads=4, num_kv_heads=2))
    rows = [{"step": s, "tokens": 10 * s, "loss": 5.0 - s / 10, "val_loss": 5.0 - s / 10} for s in (2, 4, 6, 8)]
    path = fake_stage(tmp_path, "05_run", big, 5, rows, kind="grow_run", metrics={"growth_step": 4},
                      resolved={"seq_len": 5, "batch_size": 2})
    curve = C.Curve(path)
    fb = flops_per_token(big, 5)
    assert curve.val == [(20 * fb, pytest.approx(4.4)), (40 * fb, pytest.approx(4.2))]
    assert curve.total == 40 * fb


def test_control_option_keeps_only_the_control_and_its_seed():
    full = {s.name: s for s in G.get_config("default").stages}
    part = {s.name: s for s in G.get_config("default,control").stages}
    label = G.CONTROL["default"]
    assert sorted(part) == sorted(["scratch", "compare"] + [n for n in full if n.endswith(label) or
                                                            n.startswith(f"run_{label}_")])
    assert part[f"grow_{label}"].seed == full[f"grow_{label}"].seed and len(part["compare"].runs) == 3
    msg = {s.name: s for s in G.get_config("default,msg").stages}
    assert sorted(msg) == sorted(["scratch", "compare"] + [n for n in full if n.endswith("masked_x2_x2")])
    assert msg["grow_masked_x2_x2"].seed == full["grow_masked_x2_x2"].seed and len(msg["compare"].runs) == 1
    with pytest.raises(ValueError, match="option"):
        G.get_config("default,all")


def test_bad_runs_are_config_errors(tmp_path):
    """(a UserError is one line from cfm-run; a plain ValueError was a traceback)"""
    import ml_collections

    from configurable_fm.errors import ConfigError
    from configurable_fm.stages import run
    from experiments.grow.compare import compare_config

    for runs, message in (({}, "`runs` is empty"), ({"a": ["x"]}, r"runs.a must be \[small stage, large stage\]")):
        c = ml_collections.ConfigDict({"stages": [compare_config(scratch="x", runs=runs)]})
        with pytest.raises(ConfigError, match=message):
            run(c, tmp_path, log=lambda s: None)
