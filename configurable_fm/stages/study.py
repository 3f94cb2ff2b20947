"""Stages: experiments that chain operations (pretrain -> grow -> train -> merge -> edit -> evaluate), each
stage's output checkpointed, so that a whole study reruns from one command.

    python scripts/run.py --config experiments/study_tiny.py --workdir runs/study [--rerun_from=finetune]
    result = run(config, "runs/study")                 # the same from Python

A study config holds `stages`: an ordered list of stage configs, each with `name` (unique; letters, digits,
'_', '-', '.'), `kind` (a key of `STAGES`) and the kind's keys. The built-in kinds ('train', 'evaluate': stages/
train.py; 'merge': stages/merge.py) are registered when `configurable_fm.stages` is imported; other modules add
kinds and a study lists them in `stage_modules` (imported first).

A stage kind is a function and the keys it reads:

    @register_stage("grow", keys=("method", "base", "width", "depth", "seed"))
    def grow_stage(cfg, ctx: StageContext) -> StageOutput:
        model = ctx.load_model(cfg.base)               # any source, '@stage' references already resolved
        grown = grow(model, ...)                       # the pure operation (configurable_fm.ops)
        return StageOutput(model=ctx.save_model(grown), metrics={...}, summary="...")

Before anything runs, every stage's keys are checked against its kind's declared `keys` (plus name, kind and the
cosmetic `progress`): an unknown key is a ConfigError naming the stage, the key, the closest valid key and all of
them (a mistyped key would otherwise be ignored). `ctx.save_model` writes the stage's output model as an orbax
model checkpoint, which refuses a model whose module tree disagrees with its config (models/structure.py).

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
WORKDIR/config.json holds the study config; WORKDIR/report.md (stages/report.py Report) lists the stages,
times, key metrics and the loss curves of the train stages (rewritten after every stage that runs).
"""
from __future__ import annotations

import dataclasses
import difflib
import hashlib
import importlib
import json
import math
import re
import shutil
import time
from pathlib import Path
from typing import Callable, Mapping

import ml_collections
import numpy as np

from configurable_fm.errors import ConfigError, SourceNotFound, UserError
from configurable_fm.interop.atomic import make_directory, write_json_atomic
from configurable_fm.stages.report import Report, format_metrics, plt
from configurable_fm.train.resume import config_changes, describe_changes, drop_neutral

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

    def load_model(self, source: str):
        """The model at `source` (any source interop.loader.load_model takes; references are already paths)."""
        from configurable_fm.interop.loader import load_model

        return load_model(source)

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
STAGE_KEYS: dict[str, tuple[str, ...] | None] = {}  # {kind: the keys its stages may have (None: not checked)}
STAGE_CHECKS: dict[str, Callable[[ml_collections.ConfigDict], object] | None] = {}  # {kind: its config check}
COMMON_KEYS = ("name", "kind") + COSMETIC_KEYS


def register_stage(kind: str, fn: StageFn | None = None, *, keys=None, check=None, replace: bool = False):
    """Registers fn(config, ctx) -> StageOutput as stage kind `kind`; usable as a decorator
    (`@register_stage("merge", keys=MERGE_KEYS)`). `keys`: the top-level keys a stage of this kind may have
    besides name and kind (checked before a study runs); None leaves them unchecked. `check`: fn(config) that
    raises a UserError for a bad config without loading or writing anything; a study runs it on every stage that
    has still to run before the first of them runs (stage references are still '@name' strings then, so it must
    treat model sources as opaque strings). Registering a taken kind again is an error unless replace=True."""
    if not isinstance(kind, str) or not NAME_RE.fullmatch(kind):
        raise ValueError(f"stage kind must be a name (letters, digits, '_', '-', '.'), got {kind!r}")

    def add(f):
        if not callable(f):
            raise TypeError(f"stage kind {kind!r}: {f!r} is not callable")
        if kind in STAGES and STAGES[kind] is not f and not replace:
            raise ValueError(f"stage kind {kind!r} is already registered ({STAGES[kind].__module__}."
                             f"{STAGES[kind].__qualname__}); pass replace=True to replace it")
        STAGES[kind] = f
        STAGE_KEYS[kind] = None if keys is None else tuple(dict.fromkeys(tuple(keys) + COMMON_KEYS))
        STAGE_CHECKS[kind] = check
        return f

    return add if fn is None else add(fn)


def check_stage_keys(index: int, name: str, kind: str, config: Mapping) -> None:
    """ConfigError for a key the stage's kind does not declare (see register_stage)."""
    valid = STAGE_KEYS.get(kind)
    if valid is None:
        return
    unknown = [k for k in config if k not in valid]
    if unknown:
        close = difflib.get_close_matches(unknown[0], valid, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(f"stages[{index}] ({name!r}, kind {kind!r}) has unknown key(s) {unknown}{hint}; valid "
                          f"keys: {', '.join(sorted(valid))}")


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


def fingerprint(kind: str, config: dict, inputs: Mapping[str, Mapping], *, neutral: bool = True) -> str:
    """sha256 of the kind, the plain config without COSMETIC_KEYS and the fingerprints of the referenced stages.
    neutral: the config without the NEUTRAL_ADDITIONS at their neutral value (train.resume), so a stage finished
    before such a key existed keeps its fingerprint; False: as stages recorded with those keys present did."""
    config = drop_neutral(config) if neutral else config
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
        raise ConfigError("the study config has no `stages` (a list of stage configs with name and kind)")
    out, seen = [], {}
    for i, s in enumerate(stages):
        plain = to_plain(s, f"stages[{i}]")
        if not isinstance(plain, dict):
            raise TypeError(f"stages[{i}] must be a config (name, kind, ...), got {type(s).__name__}")
        name, kind = plain.get("name"), plain.get("kind")
        if not isinstance(name, str) or not NAME_RE.fullmatch(name):
            raise ConfigError(f"stages[{i}].name must be a name (letters, digits, '_', '-', '.'), got {name!r}")
        if name == "previous":
            raise ConfigError(f"stages[{i}].name 'previous' is reserved ('@previous' means the stage before)")
        if name in seen:
            raise ConfigError(f"stages[{i}].name {name!r} is already the name of stages[{seen[name]}]")
        seen[name] = i
        if kind not in STAGES:
            raise ConfigError(f"stages[{i}] ({name!r}).kind={kind!r} is not a registered stage kind; registered: "
                             f"{sorted(STAGES)} (a study lists the modules registering more in `stage_modules`)")
        check_stage_keys(i, name, kind, plain)
        out.append((name, kind, plain))
    return out


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
                raise ConfigError(f"stages[0] ({name!r}) refers to '@previous' but it is the first stage")
            target = names[i - 1] if ref == "@previous" else ref[1:]
            if target not in names[:i]:
                where = "a later stage (or itself)" if target in names else "not a stage of this study"
                raise ConfigError(f"stages[{i}] ({name!r}) refers to {ref!r}: {target!r} is {where}; a stage may "
                                 f"refer to the stages before it: {names[:i]}")
            inputs[ref] = {"stage": target, "fingerprint": plans[names.index(target)].fingerprint}
            targets[ref] = target
        plans.append(_Plan(i, name, kind, f"stages/{i:02d}_{name}", plain, inputs, targets,
                           fingerprint(kind, plain, inputs)))
    return plans


def _changed(p: _Plan, old: Mapping, stage_dir: Path, what: str) -> StageConfigChanged:
    diff = describe_changes(config_changes(old.get("config", {}), p.config))
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
            if old.get("fingerprint") not in (p.fingerprint, fingerprint(p.kind, p.config, p.inputs, neutral=False)):
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
        raise ConfigError(f"--rerun_from={rerun_from!r} is not a stage of this study; stages: {names}")
    first_forced = names.index(rerun_from) if rerun_from is not None else len(plans)
    workdir = Path(workdir)
    for p in plans[:first_forced]:
        _check_unchanged(p, workdir / p.dir)
    for p in plans:  # a bad config of a later stage is found now, not after the stages before it have run
        if p.index >= first_forced or not (workdir / p.dir / MARKER).exists():
            _check_stage_config(p)

    make_directory(workdir, "study directory")
    (workdir / "stages").mkdir(exist_ok=True)
    write_json_atomic(workdir / "config.json", to_plain(config))
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
                raise SourceNotFound(f"stage {p.name!r} is complete but its output model {source} is missing; "
                                        f"rerun it with --rerun_from={p.name}")
            log(f"{head} complete, skipped ({marker})")
        else:
            table, sources = {}, {}
            for ref, target in p.targets.items():
                source = by_name[target].model_source(workdir)
                if source is None:
                    raise ConfigError(f"stages[{p.index}] ({p.name!r}) refers to {ref!r} but stage {target!r} has "
                                     "no output model")
                table[ref], sources[source] = source, f"@{target}"
            resolved = _substitute(p.config, table)
            status = "resumed" if stage_dir.exists() else "ran"
            log(f"{head} {'resuming the interrupted attempt' if stage_dir.exists() else 'running'} in {stage_dir}")
            stage_dir.mkdir(parents=True, exist_ok=True)
            write_json_atomic(pending, {"name": p.name, "kind": p.kind, "fingerprint": p.fingerprint, "config": p.config,
                                  "inputs": p.inputs})
            cfg = ml_collections.ConfigDict(resolved)
            cfg.lock()
            started, t0 = _now(), time.perf_counter()
            try:
                out = STAGES[p.kind](cfg, StageContext(workdir, stage_dir, p.index, p.name, sources, log))
            except Exception:
                # refused before writing anything (e.g. a config check): no attempt to resume, so no pending
                # marker that would refuse the corrected config as 'interrupted with a different config'
                if status == "ran" and [f.name for f in stage_dir.iterdir()] == [PENDING]:
                    shutil.rmtree(stage_dir)
                raise
            if not isinstance(out, StageOutput):
                raise TypeError(f"stage kind {p.kind!r} returned {type(out).__name__}, expected StageOutput")
            rec = _record(p, resolved, out, workdir, started, time.perf_counter() - t0, status)
            write_json_atomic(marker, rec.to_json())  # the completion marker, written last
            pending.unlink(missing_ok=True)
            log(f"{head} done in {rec.seconds:.1f}s: {format_metrics(rec.metrics)}")
        records.append(rec)
        by_name[p.name] = rec
        if rec.status != "skipped" and p.index + 1 < len(plans):  # a partial report while the study goes on
            write_report(workdir, title, records, pending=names[p.index + 1:])
    return StudyResult(workdir, records, write_report(workdir, title, records))


def _check_stage_config(p: _Plan) -> None:
    """The stage kind's registered `check` on the stage's config (references unresolved); its UserError becomes
    a ConfigError naming the stage."""
    check = STAGE_CHECKS.get(p.kind)
    if check is None:
        return
    cfg = ml_collections.ConfigDict(p.config)
    cfg.lock()
    try:
        check(cfg)
    except UserError as e:
        raise ConfigError(f"stages[{p.index}] ({p.name!r}, kind {p.kind!r}): {e}") from None


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
def _loss_figure(workdir: Path, records: list[StageRecord]):
    """Training loss (line) and validation loss (points) of every train stage, one after the other on a shared
    step axis; dashed lines separate the stages. None when no stage has curves."""
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

    report = Report(workdir, title=title)
    rows = [[r.index, r.name, r.kind, r.status, f"{r.seconds:.1f}", format_metrics(r.metrics, limit=8)]
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
