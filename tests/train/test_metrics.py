"""MetricWriter (JSONL + TensorBoard, resume truncation), loss-curve plot, progress bar."""
import io
import json
import subprocess
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

from configurable_fm.train.metrics import (MetricWriter, ProgressBar, plot_loss_curve, read_metrics,
                                           read_tensorboard_scalars)

ROOT = Path(__file__).resolve().parents[2]


def test_jsonl_and_tensorboard(tmp_path):
    w = MetricWriter(tmp_path)
    rec = w.write(1, loss=jnp.float32(2.5), tokens=np.int64(4096), lr=np.float32(1e-3), phase="warmup")
    assert rec == {"step": 1, "loss": 2.5, "tokens": 4096, "lr": pytest.approx(1e-3), "phase": "warmup"}
    assert type(rec["loss"]) is float and type(rec["tokens"]) is int
    w.write(np.int32(2), loss=jnp.array([2.25], jnp.bfloat16), tokens=8192, lr=1e-3)
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()  # flushed before close
    assert [json.loads(x)["step"] for x in lines] == [1, 2]
    w.close()
    records = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["loss"] for r in records] == [2.5, 2.25] and read_metrics(tmp_path) == records
    scalars = read_tensorboard_scalars(tmp_path / "tensorboard")
    assert scalars["loss"] == [(1, 2.5), (2, 2.25)]
    assert scalars["tokens"] == [(1, 4096.0), (2, 8192.0)]
    assert "phase" not in scalars


def test_bad_values(tmp_path):
    with MetricWriter(tmp_path, tensorboard=False) as w:
        with pytest.raises(ValueError, match="'loss' must be a scalar"):
            w.write(1, loss=np.ones(3))
        with pytest.raises(TypeError, match="unsupported type"):
            w.write(1, loss=np.array("text"))
    assert not (tmp_path / "tensorboard").exists()
    with pytest.raises(RuntimeError, match="closed"):
        w.write(2, loss=1.0)


def test_resume_truncates_later_steps(tmp_path):
    with MetricWriter(tmp_path) as w:
        for s in range(1, 11):
            w.write(s, loss=10.0 - s)
    with MetricWriter(tmp_path, resume_step=5) as w:
        assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2, 3, 4, 5]
        for s in range(6, 9):
            w.write(s, loss=100.0 + s)
    records = read_metrics(tmp_path)
    assert [r["step"] for r in records] == list(range(1, 9))
    assert [r["loss"] for r in records] == [9, 8, 7, 6, 5, 106, 107, 108]
    assert not list(tmp_path.glob("*.tmp"))
    # TensorBoard: the resumed writer purges steps > 5 of the first run.
    assert read_tensorboard_scalars(tmp_path / "tensorboard")["loss"] == [(s, r["loss"]) for s, r in
                                                                          zip(range(1, 9), records)]
    with MetricWriter(tmp_path, tensorboard=False) as w:  # no resume_step: plain append
        w.write(9, loss=1.0)
    assert [r["step"] for r in read_metrics(tmp_path)] == list(range(1, 10))


def test_partial_last_line_from_a_kill(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 3.0}\n{"step": 2, "lo')
    assert read_metrics(path) == [{"step": 1, "loss": 3.0}]
    with MetricWriter(tmp_path, tensorboard=False) as w:
        w.write(2, loss=2.0)
    assert read_metrics(path) == [{"step": 1, "loss": 3.0}, {"step": 2, "loss": 2.0}]
    path.write_text('{"step": 1}\nnot json\n{"step": 3}\n')
    with pytest.raises(ValueError, match="metrics.jsonl:2"):
        read_metrics(path)
    path.write_text('{"loss": 1}\n')
    with pytest.raises(ValueError, match="'step'"):
        read_metrics(path)


def test_plot_loss_curve(tmp_path):
    records = [{"step": s, "loss": 5.0 / s} for s in range(1, 51)]
    records += [{"step": s, "val_loss": 5.5 / s} for s in (10, 20, 30, 40, 50)]
    records.append({"step": 51, "loss": float("nan")})
    out = plot_loss_curve(records, tmp_path / "figs" / "loss.png", log_scale=True, title="tiny run")
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    assert width >= 600 and height >= 400
    with MetricWriter(tmp_path, tensorboard=False) as w:
        for r in records[:5]:
            w.write(**r)
    assert plot_loss_curve(tmp_path, tmp_path / "from_file.png").exists()
    with pytest.raises(ValueError, match="no finite values"):
        plot_loss_curve([{"step": 1, "acc": 0.5}], tmp_path / "none.png")


def test_progress_bar():
    out = io.StringIO()
    bar = ProgressBar(100, initial=10, file=out)  # StringIO is not a terminal: disabled
    assert bar.disabled
    bar.update(20, loss=1.0)
    bar.close()
    assert out.getvalue() == ""
    out = io.StringIO()
    with ProgressBar(100, initial=10, disable=False, file=out) as bar:
        bar.update(30, loss=3.0, mfu=None)
        bar.update(60, loss=np.float32(2.5), tokens_per_s=12345.0, mfu=0.45, grad_norm=0.123456)
        assert bar._bar.n == 60
    text = out.getvalue().split("\r")[-1]  # the final render (on close)
    assert "60/100" in text and "loss=2.5000" in text and "tok/s=12.3k" in text and "mfu=45.0%" in text
    assert "grad_norm=0.1235" in text


def test_notebook_detection_needs_a_running_kernel(monkeypatch):
    """ipykernel imported (as in a worker that ran a notebook in-process) is not a notebook: the bar stays off on a
    non-terminal stream; a current IPython shell of the kernel's type is one."""
    import types

    from configurable_fm.train.metrics import in_notebook

    monkeypatch.setitem(sys.modules, "ipykernel", types.ModuleType("ipykernel"))
    ipython = types.ModuleType("IPython")
    ipython.get_ipython = lambda: None
    monkeypatch.setitem(sys.modules, "IPython", ipython)
    assert not in_notebook() and ProgressBar(10, file=io.StringIO()).disabled
    ZMQInteractiveShell = type("ZMQInteractiveShell", (), {})
    ipython.get_ipython = lambda: ZMQInteractiveShell()
    assert in_notebook()


def test_the_writer_starts_without_importing_torch(tmp_path):
    """tensorboardX imports torch when it is installed (1-2 s of every training process's start); the writer's
    import hides it, and torch stays importable afterwards. A fresh interpreter: this one may have torch loaded."""
    pytest.importorskip("torch")
    code = ("import sys; from configurable_fm.train.metrics import MetricWriter, read_tensorboard_scalars\n"
            f"w = MetricWriter({str(tmp_path)!r}); w.write(1, loss=2.5); w.close()\n"
            "assert 'torch' not in sys.modules, 'torch was imported'\n"
            f"assert read_tensorboard_scalars({str(tmp_path / 'tensorboard')!r}) == {{'loss': [(1, 2.5)]}}\n"
            "import torch, tensorboardX.writer\n"
            "print(torch.ones(2).sum().item())")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "2.0", proc.stderr[-2000:]
