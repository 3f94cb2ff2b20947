"""experiments/analysis/recovery_report.py: the table's values and changes from hand-written metrics files, the
plot written, and bad input refused before anything is written."""
import json

import pytest

from experiments.analysis import recovery_report as rr


def write_metrics(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.fixture
def runs(tmp_path):
    dense = write_metrics(tmp_path / "dense.jsonl", [{"step": 1, "lr": 0.0, "tokens": 16, "val_ppl": 10.0}])
    ctl = write_metrics(tmp_path / "ctl.jsonl", [{"step": 1, "lr": 1e-3, "tokens": 100, "loss": 3.0},
                                                 {"step": 2, "lr": 1e-3, "tokens": 200, "val_ppl": 6.0},
                                                 {"step": 4, "lr": 1e-3, "tokens": 400, "val_ppl": 5.0}])
    rec = write_metrics(tmp_path / "rec.jsonl", [{"step": 2, "lr": 1e-3, "tokens": 200, "val_ppl": 8.0},
                                                 {"step": 4, "lr": 1e-3, "tokens": 400, "val_ppl": 5.5}])
    return dense, ctl, rec


def test_validation_curve_counts_an_eval_only_run_as_untrained(runs):
    dense, ctl, _ = runs
    assert rr.validation_curve(rr.read_metrics(dense)) == [(0, 10.0)]
    assert rr.validation_curve(rr.read_metrics(ctl)) == [(200, 6.0), (400, 5.0)]


def test_report_table_and_plot(runs, tmp_path, capsys):
    dense, ctl, rec = runs
    out = tmp_path / "out"
    assert rr.main(["--out", str(out), "--ref", f"dense={dense}", "--ref", f"ctl={ctl}",
                    "--run", f"rec={rec}"]) == 0
    table = (out / "recovery.md").read_text()
    rec_row = next(line for line in table.splitlines() if line.startswith("| rec |"))
    # 5.5 / 10 - 1 = -45.0 %, 5.5 / 5.0 - 1 = +10.0 %
    assert rec_row == "| rec | 400 | 5.5 | -45.0% | +10.0% |"
    assert "| dense | 0 | 10 |  | +100.0% |" in table
    assert (out / "recovery.png").stat().st_size > 1000
    assert not [f.name for f in out.iterdir() if ".tmp" in f.name]  # no temporaries left


@pytest.mark.parametrize("args, message", [
    (["--run", "rec"], "expected LABEL=PATH"),
    (["--run", "rec=/no/such/file"], "does not exist"),
    (["--run", "rec={rec}", "--run", "rec={rec}"], "given twice"),
    (["--run", "x={rec}"], "give at least one --run and one --ref"),
    (["--run", "x={rec}", "--ref", "x={dense}"], "both a run and a reference"),
    (["--run", "x={rec}", "--ref", "d={train_only}"], "no record with a finite val_ppl"),
])
def test_bad_input_is_a_usage_error_and_writes_nothing(runs, tmp_path, capsys, args, message):
    dense, _, rec = runs
    train_only = write_metrics(tmp_path / "train_only.jsonl", [{"step": 1, "loss": 2.0}])
    args = [a.format(rec=rec, dense=dense, train_only=train_only) for a in args]
    if "--ref" not in args and message != "give at least one --run and one --ref":
        args += ["--ref", f"dense={dense}"]
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as e:
        rr.main(["--out", str(out)] + args)
    assert e.value.code == 2
    assert message in capsys.readouterr().err
    assert not out.exists()
