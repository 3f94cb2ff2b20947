"""Training metrics: a JSONL + TensorBoard writer that survives resumption, a loss-curve plot, a progress bar
(a tqdm bar on a terminal, log lines every ~10 s otherwise).

    writer = MetricWriter(workdir, resume_step=restored_step)   # None for a fresh run
    writer.write(step, loss=loss, tokens=tokens, lr=lr)          # one JSON line, flushed; one TB scalar per key
    writer.close()
    plot_loss_curve(read_metrics(workdir / "metrics.jsonl"), workdir / "loss.png")

WORKDIR/metrics.jsonl holds one object per `write` call: {"step": int, key: value, ...} in call order.
TensorBoard event files go to WORKDIR/tensorboard (written with tensorboardX: no TensorFlow needed);
`read_tensorboard_scalars` reads them back without TensorBoard. Only process 0 of a multi-host run should
create a writer.
"""
from __future__ import annotations

import itertools
import json
import math
import numbers
import os
import struct
import sys
import time
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from configurable_fm.checks import is_real
from configurable_fm.interop.atomic import atomic_file, write_text_atomic

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"
_WRITER_IDS = itertools.count()


def import_tensorboardx():
    """The tensorboardX package, imported without torch when torch is not loaded yet. tensorboardX imports torch
    whenever it is installed, only to accept torch tensors in its summaries (writer.py, x2num.py: `try: import
    torch`); this writer gives it Python floats. That import was 1.2-2.1 s of every training process's start
    on the 2-core machine (2026-12-06, cProfile of scripts/train.py), and the suite starts dozens of them. torch
    is hidden only for the time of the import (`sys.modules['torch'] = None` makes `import torch` raise
    ImportError; another thread importing torch in that instant would get the error too) and is importable
    afterwards as usual; a process that already imported torch, or tensorboardX, gets the modules it has."""
    if "tensorboardX" in sys.modules or "torch" in sys.modules:
        import tensorboardX

        return tensorboardX
    sys.modules["torch"] = None  # type: ignore[assignment]
    try:
        import tensorboardX
    finally:
        if sys.modules.get("torch", 0) is None:
            del sys.modules["torch"]
    return tensorboardX


def _to_json_value(key: str, value: Any):
    """A Python int/float/bool/str from a Python, numpy or jax scalar (0-d or size-1 arrays)."""
    if isinstance(value, (bool, str)) or value is None:
        return value
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        return float(value)
    arr = np.asarray(value)  # jax arrays and numpy scalars; pulls device values to the host
    if arr.size != 1:
        raise ValueError(f"metric {key!r} must be a scalar, got an array of shape {arr.shape}")
    item = arr.reshape(()).item()
    if isinstance(item, (bool, int, float)):
        return item
    raise TypeError(f"metric {key!r} has unsupported type {type(value).__name__} (dtype {arr.dtype})")


def _parse_lines(path: Path) -> tuple[list[dict], int]:
    """(records, byte length of the complete part). A last line without '\\n' (a write cut by a kill) is left out;
    any other unparsable line is an error naming it."""
    data = path.read_bytes()
    complete = data[:data.rfind(b"\n") + 1]
    records = []
    for lineno, line in enumerate(complete.decode("utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{lineno}: not a JSON object ({e.msg})") from None
        if not isinstance(record, dict) or "step" not in record:
            raise ValueError(f"{path}:{lineno}: expected a JSON object with a 'step' key, got {line[:80]!r}")
        records.append(record)
    return records, len(complete)


def read_metrics(path: str | os.PathLike) -> list[dict]:
    """The records of a metrics.jsonl file (or of WORKDIR/metrics.jsonl when given a directory), in file order."""
    path = Path(path)
    if path.is_dir():
        path = path / METRICS_FILE
    return _parse_lines(path)[0]


class MetricWriter:
    """Appends scalars to WORKDIR/metrics.jsonl (flushed each call) and to TensorBoard under WORKDIR/tensorboard.

    `resume_step=N` (resuming from a checkpoint of step N): records with step > N, written after that checkpoint
    by the interrupted run, are removed first (the file is rewritten to a temporary name and renamed), and
    TensorBoard is told to hide its events with step > N (a purge at N + 1). Without `resume_step` the writer
    simply appends. Either way an incomplete last line left by a kill is dropped.
    """

    def __init__(self, workdir: str | os.PathLike, *, tensorboard: bool = True, resume_step: int | None = None):
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.path = self.workdir / METRICS_FILE
        if self.path.exists():
            self._repair(resume_step)
        self._file = open(self.path, "a", encoding="utf-8")
        self._tb = None
        if tensorboard:
            SummaryWriter = import_tensorboardx().SummaryWriter
            # tensorboardX names files events.out.tfevents.<seconds>.<host><suffix>: a unique suffix keeps a writer
            # opened in the same second (a quick restart) from truncating the previous file.
            self._tb = SummaryWriter(str(self.workdir / TENSORBOARD_DIR), flush_secs=30,
                                     filename_suffix=f".{os.getpid()}.{next(_WRITER_IDS)}",
                                     purge_step=None if resume_step is None else resume_step + 1)

    def _repair(self, resume_step: int | None) -> None:
        records, complete = _parse_lines(self.path)
        keep = records if resume_step is None else [r for r in records if r["step"] <= resume_step]
        if len(keep) == len(records) and complete == self.path.stat().st_size:
            return
        write_text_atomic(self.path, "".join(json.dumps(r) + "\n" for r in keep))

    def write(self, step: int, **scalars: Any) -> dict:
        """Logs one record {"step": step, **scalars}; returns it (with plain Python values).

        Values may be Python, numpy or jax scalars; strings go to the JSON file only. Non-finite floats are
        written as JSON's NaN/Infinity extension (Python's json reads them back).
        """
        if self._file is None:
            raise RuntimeError(f"MetricWriter for {self.path} is closed")
        record = {"step": int(_to_json_value("step", step))}
        record.update({k: _to_json_value(k, v) for k, v in scalars.items()})
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._tb is not None:
            for k, v in record.items():
                if k != "step" and is_real(v):
                    self._tb.add_scalar(k, v, global_step=record["step"])
            self._tb.flush()
        return record

    def flush(self) -> None:
        if self._file is not None:
            self._file.flush()
        if self._tb is not None:
            self._tb.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


# ------------------------------------------------------------------------------------------ tensorboard reader
def _tfrecords(path: Path) -> Iterable[bytes]:
    """Records of a TFRecord file: [u64 length][u32 crc][data][u32 crc]; a truncated trailing record ends it."""
    with open(path, "rb") as f:
        while True:
            header = f.read(12)
            if len(header) < 12:
                return
            (length,) = struct.unpack("<Q", header[:8])
            data = f.read(length)
            if len(data) < length or len(f.read(4)) < 4:
                return
            yield data


def read_tensorboard_scalars(logdir: str | os.PathLike) -> dict[str, list[tuple[int, float]]]:
    """{tag: [(step, value), ...]} from the event files in `logdir`, as TensorBoard shows them.

    Files are read in the order of their first event's wall time; a SessionLog START at step S (a resumed
    writer's purge) discards the points with step >= S read before it, as TensorBoard does.
    """
    import_tensorboardx()
    from tensorboardX.proto import event_pb2

    files = []
    for path in sorted(Path(logdir).glob("events.out.tfevents.*")):
        events = []
        for record in _tfrecords(path):
            event = event_pb2.Event()
            event.ParseFromString(record)
            events.append(event)
        if events:
            files.append((events[0].wall_time, path.name, events))
    scalars: dict[str, list[tuple[int, float]]] = {}
    for _, _, events in sorted(files, key=lambda x: x[:2]):
        for event in events:
            if event.HasField("session_log") and event.session_log.status == event_pb2.SessionLog.START:
                scalars = {tag: [(s, v) for s, v in points if s < event.step] for tag, points in scalars.items()}
            if event.HasField("summary"):
                for value in event.summary.value:
                    if value.HasField("simple_value"):
                        scalars.setdefault(value.tag, []).append((int(event.step), float(value.simple_value)))
    return scalars


# ------------------------------------------------------------------------------------------------------ plot
def plot_loss_curve(metrics: Sequence[Mapping[str, Any]] | str | os.PathLike, out_png: str | os.PathLike, *,
                    keys: Sequence[str] = ("loss", "val_loss"), log_scale: bool = False,
                    title: str | None = None) -> Path:
    """Plots keys[0] (training loss) as a line against step and every further key (validation) as points.

    `metrics` is a list of records or a metrics.jsonl path / workdir. Records without a key are skipped for it;
    non-finite values are left out. Writes `out_png` (temporary name, then renamed) and returns its path.
    """
    from matplotlib.figure import Figure  # no pyplot: the caller's backend (a notebook's inline one) is untouched

    if not isinstance(metrics, Sequence) or isinstance(metrics, (str, bytes)):
        metrics = read_metrics(metrics)
    out_png = Path(out_png)
    fig = Figure(figsize=(7, 4.2), dpi=120)
    ax = fig.add_subplot()
    plotted = 0
    for i, key in enumerate(keys):
        pts = [(r["step"], r[key]) for r in metrics
               if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]
        if not pts:
            continue
        steps, values = zip(*pts)
        if i == 0:
            ax.plot(steps, values, lw=1.2, label=f"{key} (train)" if key == "loss" else key)
        else:
            ax.plot(steps, values, "o-", ms=4, lw=0.8, label=key)
        plotted += 1
    if not plotted:
        raise ValueError(f"no finite values for any of {list(keys)} in {len(metrics)} metric records")
    if log_scale:
        ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title(title or "Loss curve")
    ax.grid(True, alpha=0.3, which="both")
    ax.legend()
    fig.tight_layout()
    out_png.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(out_png) as tmp:
        fig.savefig(tmp, format="png")
    return out_png


# ------------------------------------------------------------------------------------------------- progress
def _si(x: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.3g}{unit}"
    return f"{x:.3g}"


def _duration(seconds: float) -> str:
    seconds = max(int(round(seconds)), 0)
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else (f"{m}m{s:02d}s" if m else f"{s}s")


def in_notebook() -> bool:
    """Whether this code runs in a Jupyter kernel: IPython's current shell is the kernel's (ZMQInteractiveShell).
    Not merely `ipykernel` imported: a process that ran a notebook in-process (a test worker) imports it too."""
    ipython = sys.modules.get("IPython")
    shell = ipython.get_ipython() if ipython is not None and hasattr(ipython, "get_ipython") else None
    return shell is not None and type(shell).__name__ == "ZMQInteractiveShell"


class ProgressBar:
    """Training progress: a tqdm bar on a terminal, log lines elsewhere (log files, CI, pipes).

    `disable=None` (default): a tqdm bar when the output stream (`file`, default stderr) is a terminal or in a
    notebook; otherwise plain lines `train step 50/300 (17%): loss 6.1234, 1.3k tok/s, elapsed 40s, ETA 3m20s`,
    written when `every_steps` steps (None: no step rule) or `every_seconds` seconds have passed since the last line
    and at the last step, so a redirected run is never silent for long (the rate behind the ETA leaves out the time
    up to the first update: compilation). `True` shows nothing, `False` always a bar. `update(step, loss=...,
    tokens_per_s=..., mfu=...)` moves to `step`; `mfu=None` shows nothing (unknown peak FLOP/s); extra keyword
    values are shown as given. `disabled` says whether the tqdm bar is off; `lines` whether log lines are on.
    """

    def __init__(self, total_steps: int, initial: int = 0, *, disable: bool | None = None, desc: str = "train",
                 file=None, every_steps: int | None = None, every_seconds: float = 10.0):
        from tqdm.auto import tqdm

        file = file if file is not None else sys.stderr
        self.lines = False
        if disable is None:  # a terminal, or a notebook (tqdm.auto then draws a widget)
            disable = not ((hasattr(file, "isatty") and file.isatty()) or in_notebook())
            self.lines = disable
        self._bar = tqdm(total=total_steps, initial=initial, desc=desc, disable=disable, file=file,
                         dynamic_ncols=True, unit="step")
        self.disabled = bool(disable)
        self._file, self._desc, self._total = file, desc, total_steps
        self.every_steps, self.every_seconds = every_steps, every_seconds
        self._t0 = time.perf_counter()
        self._first = None  # (time, step) of the first update: the ETA's rate starts there (after compilation)
        self._last_line = (self._t0, initial)  # (time, step) of the last line written
        self._step = initial

    @staticmethod
    def _postfix(loss, tokens_per_s, mfu, extra) -> dict:
        postfix = {}
        if loss is not None:
            postfix["loss"] = f"{float(loss):.4f}"
        if tokens_per_s is not None:
            postfix["tok/s"] = _si(float(tokens_per_s))
        if mfu is not None:
            postfix["mfu"] = f"{100 * float(mfu):.1f}%"
        postfix.update({k: (f"{v:.4g}" if isinstance(v, float) else str(v)) for k, v in extra.items()})
        return postfix

    def _line(self, step: int, postfix: dict, now: float) -> str:
        parts = [f"loss {postfix.pop('loss')}"] if "loss" in postfix else []
        if "tok/s" in postfix:
            parts.append(f"{postfix.pop('tok/s')} tok/s")
        parts += [f"{k} {v}" for k, v in postfix.items()]
        parts.append(f"elapsed {_duration(now - self._t0)}")
        t_first, s_first = self._first
        if step < self._total and step > s_first and now > t_first:
            rate = (step - s_first) / (now - t_first)
            parts.append(f"ETA {_duration((self._total - step) / rate)}")
        pct = 100 * step / self._total if self._total else 100.0
        return f"{self._desc} step {step}/{self._total} ({pct:.0f}%): " + ", ".join(parts)

    def update(self, step: int, *, loss=None, tokens_per_s=None, mfu=None, **extra) -> None:
        self._step = step
        if self.lines:
            now = time.perf_counter()
            if self._first is None:
                self._first = (now, step)
            t_last, s_last = self._last_line
            due = (now - t_last >= self.every_seconds or step >= self._total
                   or (self.every_steps is not None and step - s_last >= self.every_steps))
            if due and step != s_last:
                print(self._line(step, self._postfix(loss, tokens_per_s, mfu, extra), now), file=self._file,
                      flush=True)
                self._last_line = (now, step)
            return
        if self.disabled:
            return
        self._bar.set_postfix(self._postfix(loss, tokens_per_s, mfu, extra), refresh=False)
        self._bar.update(step - self._bar.n)

    def close(self) -> None:
        self._bar.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
