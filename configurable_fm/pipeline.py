"""Stages: experiments that chain operations (pretrain -> grow -> train -> merge -> edit -> evaluate), each
stage's output checkpointed, so that a whole study reruns from one command.

    python scripts/run.py --config experiments/study_tiny.py --workdir runs/study [--rerun_from=finetune]
    result = run(config, "runs/study")                 # the same from Python

A study config holds `stages`: an ordered list of stage configs, each with `name` (unique; letters, digits,
'_', '-', '.'), `kind` (a key of `STAGES`) and the kind's keys. Other modules add kinds with
`register_stage(kind, fn)`, fn(config, ctx: StageContext) -> StageOutput; a study lists the modules that register
its kinds in `stage_modules` (imported first). This module provides:
    'train'    : pre-training or fine-tuning (train/trainer.py) from a train config (experiments/pretrain.py,
                 experiments/finetune.py); `init_from` may name an earlier stage's model. Output: the final model.
    'evaluate' : validation loss / perplexity on `data` and task exact match (`task_metrics`) for each of
                 `models`, written to eval.json + eval.md (see `evaluate_config`). Output: its last model, as is.

References. A string '@previous' or '@<stage name>' anywhere in a stage config (e.g. `init_from`, `models`) means
that earlier stage's output model (an orbax model checkpoint, or the source it passed through) and is replaced by
its path before the stage runs.

Layout and bookkeeping. Stage i runs in WORKDIR/stages/<ii>_<name>/ and writes its output model to model/
(`orbax_io.save_model`). It starts by writing stage.pending.json and ends by writing stage.json (atomically, last)
with its config, resolved config, inputs, output, metrics and time. A stage's fingerprint is
    fp_i = sha256(kind, config_i without cosmetic keys (`progress`), {reference: fp_j of the stage it names})
so it changes when the stage's config or any model it reads changes. On a rerun of the study:
    stage.json present, same fingerprint      -> skipped (its recorded output is used);
    no stage.json, pending with same fp       -> run again in the same directory (a train stage resumes from
                                                 its last checkpoint: the trainer resumes by itself);
    different fingerprint                     -> StageConfigChanged naming the changed keys, unless
                                                 --rerun_from=<stage> at or before it: that stage and every later
                                                 one are deleted first and run again.
WORKDIR/config.json holds the study config; WORKDIR/report.md (configurable_fm.report.Report) lists the stages,
times, key metrics and the loss curves of the train stages (rewritten after every stage that runs).
"""
from __future__ import annotations

import dataclasses
import hashlib
import importlib
import json
import math
import re
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Mapping

import ml_collections
import numpy as np

from configurable_fm.errors import UserError

MARKER = "stage.json"
PENDING = "stage.pending.json"
MODEL_DIR = "model"
COSMETIC_KEYS = ("progress",)  # top-level stage keys that do not change results (left out of fingerprints)
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
REF_RE = re.compile(r"@([A-Za-z0-9][A-Za-z0-9_.-]*)")


class StageConfigChanged(UserError, ValueError):
    """A completed (or interrupted) stage's recorded config differs from the study config."""


@dataclasses.dataclass(frozen=True)
class StageContext:
    """What a stage function gets besides its (resolved, locked) config.

    workdir: the study directory; stage_dir: this stage's directory (exists; may hold an interrupted run's files);
    sources: {resolved reference value: '@<stage name>'} for labels; log: a print-like function."""

    workdir: Path
    stage_dir: Path
    index: int
    name: str
    sources: Mapping[str, str]
    log: Callable[[str], None] = print

    @property
    def model_dir(self) -> Path:
        return self.stage_dir / MODEL_DIR

    def save_model(self, model) -> Path:
        """Writes `model` as this stage's output (an orbax model checkpoint in stage_dir/model) and returns its path."""
        from configurable_fm.interop import orbax_io

        return orbax_io.save_model(model, self.model_dir, overwrite=True)

    def label(self, source: str) -> str:
        """'@<stage>' for a model that came from a reference, else the source itself."""
        return self.sources.get(str(source), str(source))


@dataclasses.dataclass
class StageOutput:
    """What a stage function returns. model: its output model (a path or any source `load_model` takes; None when
    it has none); metrics: key scalars for the report; curves: a metrics.jsonl whose loss curve the report shows;
    summary: markdown for the report."""

    model: str | Path | None = None
    metrics: dict[str, float] = dataclasses.field(default_factory=dict)
    curves: Path | None = None
    summary: str = ""


@dataclasses.dataclass
class StageRecord:
    """A completed stage, as written to its stage.json; `status` is what this invocation did: 'ran', 'resumed'
    (ran again over an interrupted attempt) or 'skipped' (complete with the same fingerprint)."""

    index: int
    name: str
    kind: str
    dir: str  # relative to the study workdir
    fingerprint: str
    config: dict
    resolved: dict
    inputs: dict
    model: str | None  # relative to the workdir when model_in_workdir
    model_in_workdir: bool
    metrics: dict
    curves: str | None
    summary: str
    seconds: float
    started: str
    finished: str
    status: str = "ran"

    def model_source(self, workdir: Path) -> str | None:
        if self.model is None:
            return None
        return str(workdir / self.model) if self.model_in_workdir else self.model

    def to_json(self) -> dict:
        d = dataclasses.asdict(self)
        d.pop("status")
        return d

    @classmethod
    def from_json(cls, d: Mapping, status: str) -> "StageRecord":
        names = {f.name for f in dataclasses.fields(cls)} - {"status"}
        missing = sorted(names - set(d))
        if missing:
            raise ValueError(f"stage marker lacks {missing}")
        return cls(**{k: d[k] for k in names}, status=status)


@dataclasses.dataclass
class StudyResult:
    workdir: Path
    stages: list[StageRecord]
    report: Path

    def __getitem__(self, name: str) -> StageRecord:
        for r in self.stages:
            if r.name == name:
                return r
        raise KeyError(f"no stage {name!r}; stages: {[r.name for r in self.stages]}")


StageFn = Callable[[ml_collections.ConfigDict, StageContext], StageOutput]
STAGES: dict[str, StageFn] = {}


def register_stage(kind: str, fn: StageFn | None = None, *, replace: bool = False):
    """Registers fn(config, ctx) -> StageOutput as stage kind `kind`; usable as a decorator
    (`@register_stage("merge")`). Registering a taken kind again is an error unless replace=True."""
    if not isinstance(kind, str) or not NAME_RE.fullmatch(kind):
        raise ValueError(f"stage kind must be a name (letters, digits, '_', '-', '.'), got {kind!r}")

    def add(f):
        if not callable(f):
            raise TypeError(f"stage kind {kind!r}: {f!r} is not callable")
        if kind in STAGES and STAGES[kind] is not f and not replace:
            raise ValueError(f"stage kind {kind!r} is already registered ({STAGES[kind].__module__}."
                             f"{STAGES[kind].__qualname__}); pass replace=True to replace it")
        STAGES[kind] = f
        return f

    return add if fn is None else add(fn)


# ------------------------------------------------------------------------------------------ configs as data
def to_plain(value, where: str = "config"):
    """A JSON-ready copy: ConfigDicts and mappings -> dicts (sorted keys), tuples/lists -> lists; anything that is
    not None/bool/int/float/str is an error naming its key."""
    if isinstance(value, ml_collections.ConfigDict):
        value = value.to_dict()
    if isinstance(value, ml_collections.FieldReference):
        value = value.get()
    if isinstance(value, Mapping):
        return {str(k): to_plain(v, f"{where}.{k}") for k, v in sorted(value.items(), key=lambda kv: str(kv[0]))}
    if isinstance(value, (list, tuple)):
        return [to_plain(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return float(value)
    raise TypeError(f"{where} has a value of type {type(value).__name__} ({value!r}); stage configs hold only "
                    "None, bool, int, float, str, lists and dicts")


def _refs(value) -> list[str]:
    """Stage references ('@name') in a plain value, in order of appearance."""
    if isinstance(value, dict):
        return [r for v in value.values() for r in _refs(v)]
    if isinstance(value, list):
        return [r for v in value for r in _refs(v)]
    if isinstance(value, str) and REF_RE.fullmatch(value):
        return [value]
    return []


def _substitute(value, table: Mapping[str, str]):
    if isinstance(value, dict):
        return {k: _substitute(v, table) for k, v in value.items()}
    if isinstance(value, list):
        return [_substitute(v, table) for v in value]
    if isinstance(value, str) and value in table:
        return table[value]
    return value


def _flatten(value, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict) and value:
        return {k: v for key, sub in value.items() for k, v in _flatten(sub, f"{prefix}{key}.").items()}
    return {prefix[:-1]: value}


def _diff(old: dict, new: dict, limit: int = 8) -> str:
    a, b = _flatten(old), _flatten(new)
    changes = [f"{k}: {a.get(k, '<absent>')!r} -> {b.get(k, '<absent>')!r}" for k in sorted(set(a) | set(b))
               if a.get(k, "<absent>") != b.get(k, "<absent>")]
    more = f"; and {len(changes) - limit} more" if len(changes) > limit else ""
    return "; ".join(changes[:limit]) + more


def fingerprint(kind: str, config: dict, inputs: Mapping[str, Mapping]) -> str:
    """sha256 of the kind, the plain config without COSMETIC_KEYS and the fingerprints of the referenced stages."""
    body = {"kind": kind, "config": {k: v for k, v in config.items() if k not in COSMETIC_KEYS},
            "inputs": {ref: dict(v)["fingerprint"] for ref, v in sorted(inputs.items())}}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def stage(name: str, kind: str, config: ml_collections.ConfigDict | Mapping | None = None,
          **overrides) -> ml_collections.ConfigDict:
    """A stage config: a copy of `config` (e.g. a train config) with `name`, `kind` and `overrides` set."""
    out = ml_collections.ConfigDict(to_plain(config or {}))
    out.name, out.kind = name, kind
    for key, value in overrides.items():
        out[key] = value
    return out


def _parse_stages(config) -> list[tuple[str, str, dict]]:
    stages = config.get("stages") if hasattr(config, "get") else None
    if not stages:
        raise ValueError("the study config has no `stages` (a list of stage configs with name and kind)")
    out, seen = [], {}
    for i, s in enumerate(stages):
        plain = to_plain(s, f"stages[{i}]")
        if not isinstance(plain, dict):
            raise TypeError(f"stages[{i}] must be a config (name, kind, ...), got {type(s).__name__}")
        name, kind = plain.get("name"), plain.get("kind")
        if not isinstance(name, str) or not NAME_RE.fullmatch(name):
            raise ValueError(f"stages[{i}].name must be a name (letters, digits, '_', '-', '.'), got {name!r}")
        if name == "previous":
            raise ValueError(f"stages[{i}].name 'previous' is reserved ('@previous' means the stage before)")
        if name in seen:
            raise ValueError(f"stages[{i}].name {name!r} is already the name of stages[{seen[name]}]")
        seen[name] = i
        if kind not in STAGES:
            raise ValueError(f"stages[{i}] ({name!r}).kind={kind!r} is not a registered stage kind; registered: "
                             f"{sorted(STAGES)} (a study lists the modules registering more in `stage_modules`)")
        out.append((name, kind, plain))
    return out


def _write_json(path: Path, obj) -> None:
    from configurable_fm.train.trainer import write_json_atomic

    write_json_atomic(path, obj)


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


# ------------------------------------------------------------------------------------------ running a study
@dataclasses.dataclass
class _Plan:
    index: int
    name: str
    kind: str
    dir: str
    config: dict  # plain, with references
    inputs: dict  # {reference: {'stage': name, 'fingerprint': fp}}
    targets: dict  # {reference: stage name}
    fingerprint: str


def plan(config) -> list[_Plan]:
    """The stages of a study with their references checked and fingerprints computed (nothing is run)."""
    stages = _parse_stages(config)
    names = [name for name, _, _ in stages]
    plans: list[_Plan] = []
    for i, (name, kind, plain) in enumerate(stages):
        inputs, targets = {}, {}
        for ref in _refs(plain):
            if ref == "@previous" and i == 0:
                raise ValueError(f"stages[0] ({name!r}) refers to '@previous' but it is the first stage")
            target = names[i - 1] if ref == "@previous" else ref[1:]
            if target not in names[:i]:
                where = "a later stage (or itself)" if target in names else "not a stage of this study"
                raise ValueError(f"stages[{i}] ({name!r}) refers to {ref!r}: {target!r} is {where}; a stage may "
                                 f"refer to the stages before it: {names[:i]}")
            inputs[ref] = {"stage": target, "fingerprint": plans[names.index(target)].fingerprint}
            targets[ref] = target
        plans.append(_Plan(i, name, kind, f"stages/{i:02d}_{name}", plain, inputs, targets,
                           fingerprint(kind, plain, inputs)))
    return plans


def _changed(p: _Plan, old: Mapping, stage_dir: Path, what: str) -> StageConfigChanged:
    diff = _diff(old.get("config", {}), p.config)
    moved = [f"{ref} ({v['stage']})" for ref, v in p.inputs.items()
             if old.get("inputs", {}).get(ref, {}).get("fingerprint") != v["fingerprint"]]
    detail = "; ".join(filter(None, [diff, f"changed inputs: {moved}" if moved else ""])) or "kind changed"
    return StageConfigChanged(
        f"stage {p.name!r} ({stage_dir}) is {what} with a different config: {detail}. Rerun it and the stages "
        f"after it with --rerun_from={p.name} (their directories are deleted), or restore its config")


def _check_unchanged(p: _Plan, stage_dir: Path) -> None:
    """Raises StageConfigChanged when the stage's marker (or an interrupted attempt's pending file) has another
    fingerprint."""
    for file, what in ((MARKER, "complete"), (PENDING, "interrupted")):
        if (stage_dir / file).exists():
            old = json.loads((stage_dir / file).read_text())
            if old.get("fingerprint") != p.fingerprint:
                raise _changed(p, old, stage_dir, what)
            return


def run(config: ml_collections.ConfigDict, workdir: str | Path, *, rerun_from: str | None = None,
        log: Callable[[str], None] = print) -> StudyResult:
    """Runs the stages of `config` in order in `workdir` (module docstring): completed stages with the same
    fingerprint are skipped, an interrupted one runs again (resuming), a changed one is an error unless
    `rerun_from` names it or an earlier stage (then it and all later stages are deleted and rerun). Every check
    (stage names and kinds, references, changed configs) happens before anything runs or is deleted."""
    for module in (config.get("stage_modules") or ()):
        importlib.import_module(module)
    plans = plan(config)
    names = [p.name for p in plans]
    if rerun_from is not None and rerun_from not in names:
        raise ValueError(f"--rerun_from={rerun_from!r} is not a stage of this study; stages: {names}")
    first_forced = names.index(rerun_from) if rerun_from is not None else len(plans)
    workdir = Path(workdir)
    for p in plans[:first_forced]:
        _check_unchanged(p, workdir / p.dir)

    (workdir / "stages").mkdir(parents=True, exist_ok=True)
    _write_json(workdir / "config.json", to_plain(config))
    title = f"Study {config.get('name') or workdir.name}"
    stale = sorted(d.name for d in (workdir / "stages").iterdir()
                   if d.is_dir() and f"stages/{d.name}" not in {p.dir for p in plans})
    if stale:
        log(f"note: {workdir / 'stages'} holds directories of stages not in this study: {stale}")
    for p in plans[first_forced:]:  # deleted up front: a crash during the rerun must not revive old markers
        if (workdir / p.dir).exists():
            log(f"--rerun_from={rerun_from}: deleting {workdir / p.dir}")
            shutil.rmtree(workdir / p.dir)

    records: list[StageRecord] = []
    by_name: dict[str, StageRecord] = {}
    for p in plans:
        stage_dir = workdir / p.dir
        head = f"[stage {p.index + 1}/{len(plans)} {p.name} ({p.kind})]"
        marker, pending = stage_dir / MARKER, stage_dir / PENDING
        if marker.exists():
            rec = StageRecord.from_json(json.loads(marker.read_text()), status="skipped")
            source = rec.model_source(workdir)
            if rec.model_in_workdir and not Path(source).exists():
                raise FileNotFoundError(f"stage {p.name!r} is complete but its output model {source} is missing; "
                                        f"rerun it with --rerun_from={p.name}")
            log(f"{head} complete, skipped ({marker})")
        else:
            table, sources = {}, {}
            for ref, target in p.targets.items():
                source = by_name[target].model_source(workdir)
                if source is None:
                    raise ValueError(f"stages[{p.index}] ({p.name!r}) refers to {ref!r} but stage {target!r} has "
                                     "no output model")
                table[ref], sources[source] = source, f"@{target}"
            resolved = _substitute(p.config, table)
            status = "resumed" if stage_dir.exists() else "ran"
            log(f"{head} {'resuming the interrupted attempt' if stage_dir.exists() else 'running'} in {stage_dir}")
            stage_dir.mkdir(parents=True, exist_ok=True)
            _write_json(pending, {"name": p.name, "kind": p.kind, "fingerprint": p.fingerprint, "config": p.config,
                                  "inputs": p.inputs})
            cfg = ml_collections.ConfigDict(resolved)
            cfg.lock()
            started, t0 = _now(), time.perf_counter()
            out = STAGES[p.kind](cfg, StageContext(workdir, stage_dir, p.index, p.name, sources, log))
            if not isinstance(out, StageOutput):
                raise TypeError(f"stage kind {p.kind!r} returned {type(out).__name__}, expected StageOutput")
            rec = _record(p, resolved, out, workdir, started, time.perf_counter() - t0, status)
            _write_json(marker, rec.to_json())  # the completion marker, written last
            pending.unlink(missing_ok=True)
            log(f"{head} done in {rec.seconds:.1f}s: {_format_metrics(rec.metrics)}")
        records.append(rec)
        by_name[p.name] = rec
        if rec.status != "skipped" and p.index + 1 < len(plans):  # a partial report while the study goes on
            write_report(workdir, title, records, pending=names[p.index + 1:])
    return StudyResult(workdir, records, write_report(workdir, title, records))


def _record(p: _Plan, resolved: dict, out: StageOutput, workdir: Path, started: str, seconds: float,
            status: str) -> StageRecord:
    model, in_workdir = None, False
    if out.model is not None:
        model = str(out.model)
        if Path(model).exists():  # a file or directory (not a registry name) inside the workdir: stored relative
            try:
                model, in_workdir = str(Path(model).absolute().relative_to(workdir.absolute())), True
            except ValueError:
                pass
    curves = None
    if out.curves is not None:
        curves = str(Path(out.curves).absolute().relative_to(workdir.absolute()))
    metrics = {k: to_plain(v, f"stage {p.name!r} metric {k!r}") for k, v in out.metrics.items()}
    return StageRecord(p.index, p.name, p.kind, p.dir, p.fingerprint, p.config, resolved, p.inputs, model,
                       in_workdir, metrics, curves, out.summary, float(seconds), started, _now(), status)


# ------------------------------------------------------------------------------------------ report
def _format_metrics(metrics: Mapping, limit: int = 6) -> str:
    items = []
    for k, v in list(metrics.items())[:limit]:
        items.append(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}")
    return ", ".join(items) + (", ..." if len(metrics) > limit else "")


def _loss_figure(workdir: Path, records: list[StageRecord]):
    """Training loss (line) and validation loss (points) of every train stage, one after the other on a shared
    step axis; dashed lines separate the stages. None when no stage has curves."""
    from configurable_fm.report import plt
    from configurable_fm.train.metrics import read_metrics

    curves = [(r, read_metrics(workdir / r.curves)) for r in records if r.curves and (workdir / r.curves).exists()]
    curves = [(r, m) for r, m in curves if m]
    if not curves:
        return None
    fig, ax = plt.subplots(figsize=(8, 4.2), dpi=120)
    offset = 0
    for k, (rec, metrics) in enumerate(curves):
        color = f"C{k % 10}"
        pts = [(m["step"] + offset, m["loss"]) for m in metrics if isinstance(m.get("loss"), (int, float))
               and math.isfinite(m["loss"])]
        if pts:
            ax.plot(*zip(*pts), lw=1.2, color=color, label=f"{rec.name}: loss")
        val = [(m["step"] + offset, m["val_loss"]) for m in metrics if isinstance(m.get("val_loss"), (int, float))
               and math.isfinite(m["val_loss"])]
        if val:
            ax.plot(*zip(*val), "o--", ms=4, lw=0.8, color=color, label=f"{rec.name}: val_loss")
        last = max(m["step"] for m in metrics)
        if k:
            ax.axvline(offset, color="gray", ls=":", lw=0.8)
        offset += last
    ax.set_xlabel("step (stages one after another)")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title("Loss curves of the train stages")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def write_report(workdir: Path, title: str, records: list[StageRecord], pending=()) -> Path:
    """WORKDIR/report.md (+ report.json, loss_curves.png): the stage table, loss curves, stage summaries."""
    from configurable_fm.report import Report

    report = Report(workdir, title=title)
    rows = [[r.index, r.name, r.kind, r.status, f"{r.seconds:.1f}", _format_metrics(r.metrics, limit=8)]
            for r in records]
    rows += [[len(records) + j, name, "", "pending", "", ""] for j, name in enumerate(pending)]
    report.section("Stages", "Status is what the last invocation did; time is that of the run that completed the "
                   "stage. Output models are orbax checkpoints in `stages/<index>_<name>/model`.")
    report.table(["#", "stage", "kind", "status", "seconds", "key metrics"], rows)
    fig = _loss_figure(workdir, records)
    if fig is not None:
        report.section("Loss curves")
        report.figure("loss_curves.png", fig, caption="Training and validation loss of the train stages")
    for r in records:
        if r.summary:
            report.section(f"{r.index}. {r.name} ({r.kind})", r.summary)
    report.record(stages=[{"name": r.name, "kind": r.kind, "status": r.status, "seconds": r.seconds,
                           "model": r.model, "metrics": r.metrics} for r in records], pending=list(pending))
    return report.write()


# ------------------------------------------------------------------------------------------ train stage
def train_stage(cfg: ml_collections.ConfigDict, ctx: StageContext) -> StageOutput:
    """Pre-training or fine-tuning (train/trainer.py) in stage_dir/train, which resumes an interrupted attempt;
    the final model is the stage's output. Metrics: the last logged loss, best validation loss, and the last
    value of every evaluation metric (val_loss, val_ppl, '<task>/exact_match')."""
    from configurable_fm.train.metrics import read_metrics
    from configurable_fm.train.trainer import train

    result = train(cfg, ctx.stage_dir / "train", log=ctx.log)
    model = ctx.save_model(result.model)
    records = read_metrics(ctx.stage_dir / "train")
    logged = [r["loss"] for r in records if isinstance(r.get("loss"), (int, float))]
    loss = result.losses.get(result.step, logged[-1] if logged else None)  # the trainer may have had no step left
    metrics: dict[str, Any] = {"steps": result.step, "loss": loss}
    if result.best_val_loss is not None:
        metrics["best_val_loss"] = result.best_val_loss
    skip = {"step", "loss", "tokens", "lr", "grad_norm", "tokens_per_s", "mfu"}
    for rec in records:
        for k, v in rec.items():
            if k not in skip and isinstance(v, (int, float)):
                metrics[k] = v
    init = cfg.get("init_from") or "scratch"
    run_dir = (ctx.stage_dir / "train").relative_to(ctx.workdir)
    summary = (f"Trained {result.step} steps (batch {cfg.batch_size} x {cfg.seq_len}, data {cfg.data.kind}) from "
               f"{ctx.label(init)}; trainable: {list(cfg.trainable)}. Run directory: `{run_dir}` (metrics.jsonl, "
               "TensorBoard events, checkpoints).")
    return StageOutput(model=model, metrics=metrics, curves=ctx.stage_dir / "train" / "metrics.jsonl",
                       summary=summary)


# ------------------------------------------------------------------------------------------ evaluate stage
def evaluate_config(name: str = "evaluate", *, models=("@previous",), data: Mapping | None = None,
                    task_metrics=(), n: int = 64, seed: int = 0, batch_size: int = 32, seq_len: int = 128,
                    tokenizer: str = "smollm2-135m-instruct", token_ids: Mapping | None = None,
                    max_new_tokens: int = 0) -> ml_collections.ConfigDict:
    """An 'evaluate' stage config. models: sources `load_model` takes or stage references; data: a train-style
    data config (kind 'shards' or 'tasks', with eval_batch_size, max_eval_batches, ...) for validation loss and
    perplexity, None for none; task_metrics: synthetic task names scored by exact match of greedy generations
    on `n` examples of their test split (seed `seed`)."""
    c = ml_collections.ConfigDict()
    c.name, c.kind = name, "evaluate"
    c.models = tuple(models)
    c.seed = seed
    c.seq_len = seq_len
    c.batch_size = batch_size
    c.compute_dtype = "float32"
    c.tokenizer = tokenizer
    c.token_ids = ml_collections.ConfigDict({"eos": -1, "pad": -1, "bos": -1, **dict(token_ids or {})})
    c.data = ml_collections.ConfigDict(dict(data) if data else {"kind": ""})
    c.task_metrics = tuple(task_metrics)
    c.task_eval = ml_collections.ConfigDict(dict(n=n, seed=seed, batch_size=batch_size,
                                                 max_new_tokens=max_new_tokens, split="test"))
    return c


def evaluate_models(cfg: ml_collections.ConfigDict, models: Mapping[str, str], log=print) -> dict[str, dict]:
    """{label: {'val_loss', 'val_ppl' (when cfg.data.kind is set), '<task>/exact_match' ...}} for each model
    source in `models` ({label: source}). Validation loss is the token-weighted mean NLL over every evaluation
    batch of `make_data(cfg)` (loss_mask and padding-row mask applied, as in training), perplexity exp(loss)."""
    from flax import nnx

    from configurable_fm.models.factory import load_model
    from configurable_fm.train.data import make_data, make_task_metrics
    from configurable_fm.train.trainer import DTYPES, loss_sums, with_compute_dtype

    data = make_data(cfg) if cfg.data.get("kind") else None
    tasks = make_task_metrics(cfg, getattr(data, "tokenizer", None))
    if data is None and not tasks:
        raise ValueError("evaluate stage: nothing to evaluate; set data.kind (validation loss) and/or task_metrics")
    sums = nnx.jit(loss_sums)
    out = {}
    for label, source in models.items():
        model = load_model(source)
        if cfg.get("compute_dtype", "float32") != "float32":
            model = with_compute_dtype(model, DTYPES[cfg.compute_dtype])
        metrics: dict[str, float] = {}
        if data is not None:
            nll = count = 0.0
            for batch in data.eval_batches():
                s, c = sums(model, {k: np.asarray(v) for k, v in batch.items()})
                nll, count = nll + float(s), count + float(c)
            if count == 0:
                raise ValueError(f"evaluate stage: the evaluation data of data.kind={cfg.data.kind!r} has no tokens")
            metrics["val_loss"] = nll / count
            metrics["val_ppl"] = math.exp(min(metrics["val_loss"], 50.0))
        for fn in tasks.values():
            metrics.update(fn(model))
        log(f"  {label}: {_format_metrics(metrics, limit=12)}")
        out[label] = metrics
    return out


def evaluate_stage(cfg: ml_collections.ConfigDict, ctx: StageContext) -> StageOutput:
    """Evaluates `cfg.models` (see `evaluate_models`); writes eval.json and eval.md (a models x metrics table).
    Output model: the last of `models` (passed through, not copied)."""
    from configurable_fm.report import markdown_table

    sources = list(cfg.models)
    if not sources:
        raise ValueError(f"evaluate stage {ctx.name!r}: `models` is empty")
    labels = [ctx.label(s) for s in sources]
    if len(set(labels)) != len(labels):
        raise ValueError(f"evaluate stage {ctx.name!r}: a model is listed twice in {labels}")
    results = evaluate_models(cfg, dict(zip(labels, sources)), log=ctx.log)
    keys = sorted({k for m in results.values() for k in m}, key=lambda k: (k not in ("val_loss", "val_ppl"), k))
    table = markdown_table(["model"] + keys, [[label] + [results[label].get(k, "") for k in keys]
                                              for label in labels])
    _write_json(ctx.stage_dir / "eval.json", {"models": [{"label": label, "source": src, "metrics": results[label]}
                                                         for label, src in zip(labels, sources)]})
    tmp = ctx.stage_dir / "eval.md.tmp"
    tmp.write_text(table + "\n")
    tmp.replace(ctx.stage_dir / "eval.md")
    metrics = {f"{label}/{k}" if len(labels) > 1 else k: v for label in labels for k, v in results[label].items()}
    return StageOutput(model=sources[-1], metrics=metrics, summary=table)


register_stage("train", train_stage)
register_stage("evaluate", evaluate_stage)
