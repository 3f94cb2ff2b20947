"""The built-in stage kinds 'train' and 'evaluate' (registered when configurable_fm.stages is imported).

    'train'    : pre-training or fine-tuning (train/trainer.py) from a train config (experiments/pretrain.py,
                 experiments/finetune.py); `init_from` may name an earlier stage's model; an optional `task`
                 entry picks the task (train/ramp.py: task_from_config, e.g. {'kind': 'mask_ramp', 'start': 0,
                 'steps': 500} fades in a grow_masked model's new structure). Output: the final model.
    'evaluate' : validation loss / perplexity on `data` and task exact match (`task_metrics`) for each of
                 `models`, each exact match with n, its SE, 95% Wilson interval, chance level and standard errors
                 above chance (report.accuracy_stats), written to eval.json + eval.md (see `evaluate_config`).
                 Output: its last model, as is.
"""
from __future__ import annotations

import math
from typing import Any, Mapping

import ml_collections
import numpy as np

from configurable_fm.errors import ConfigError
from configurable_fm.interop.atomic import write_json_atomic, write_text_atomic
from configurable_fm.stages.report import (ACCURACY_HEADER, ACCURACY_LEGEND, accuracy_row, accuracy_stats,
                                          chance_level, format_metrics, markdown_table)
from configurable_fm.stages.study import StageContext, StageOutput, register_stage

# The top-level keys of a train config (experiments/pretrain.py, experiments/finetune.py) that the trainer and its
# data read; a train stage with any other key is refused before the study runs.
TRAIN_KEYS = ("name", "seed", "model", "init_from", "trainable", "steps", "batch_size", "seq_len", "grad_accum_steps",
              "compute_dtype", "remat", "scan_layers", "mesh", "optimizer", "checkpoint", "checkpoint_every", "eval_every",
              "log_every", "progress", "data", "tokenizer", "token_ids", "task_metrics", "task_eval", "task")
EVALUATE_KEYS = ("models", "seed", "seq_len", "batch_size", "compute_dtype", "tokenizer", "token_ids", "data",
                 "task_metrics", "task_eval")

# ------------------------------------------------------------------------------------------ train stage
def train_stage(cfg: ml_collections.ConfigDict, ctx: StageContext) -> StageOutput:
    """Pre-training or fine-tuning (train/trainer.py) in stage_dir/train, which resumes an interrupted attempt;
    the final model is the stage's output. Metrics: the last logged loss, best validation loss, and the last
    value of every evaluation metric (val_loss, val_ppl, '<task>/exact_match')."""
    from configurable_fm.train.ramp import task_from_config
    from configurable_fm.train.trainer import train

    task = task_from_config(cfg.get("task"))  # ConfigError before anything is written
    result = train(cfg, ctx.stage_dir / "train", task=task, log=ctx.log)
    return train_output(cfg, ctx, result, origin=f"Trained {result.step} steps from "
                                                 f"{ctx.label(cfg.get('init_from') or 'scratch')}.")


def train_output(cfg: ml_collections.ConfigDict, ctx: StageContext, result, *, origin: str) -> StageOutput:
    """The StageOutput of a finished training run in stage_dir/train (the 'train' and 'grow_run' stages): the final
    model saved as the stage's output; metrics: steps, the last logged loss, best validation loss and the last
    value of every evaluation metric; `origin` opens the summary."""
    from configurable_fm.train.metrics import read_metrics

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
    run_dir = (ctx.stage_dir / "train").relative_to(ctx.workdir)
    summary = (f"{origin} Batch {cfg.batch_size} x {cfg.seq_len}, data {cfg.data.kind}; trainable: "
               f"{list(cfg.trainable)}. Run directory: `{run_dir}` (metrics.jsonl, TensorBoard events, checkpoints).")
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


STAT_SUFFIXES = ("n", "se", "ci95_low", "ci95_high", "chance", "z_chance")  # '<task>/exact_match_<suffix>'


def task_chance(cfg: ml_collections.ConfigDict) -> dict[str, dict]:
    """{task: report.chance_level of the answers of its evaluation problems} for cfg.task_metrics: the problems
    the task metrics score (synthetic task `examples(split, n, seed)` with cfg.task_eval over the trainer's
    defaults), answers compared after the scorer's normalisation."""
    from configurable_fm.data.synthetic.tasks import get_task, normalize
    from configurable_fm.train.data import TASK_EVAL_DEFAULTS

    ev = {**TASK_EVAL_DEFAULTS, **dict(cfg.get("task_eval") or {})}
    return {name: chance_level(normalize(ex.answer) for ex in get_task(name).examples(ev["split"], int(ev["n"]),
                                                                                    int(ev["seed"])))
            for name in cfg.get("task_metrics") or ()}


def evaluate_models(cfg: ml_collections.ConfigDict, models: Mapping[str, str], log=print) -> dict[str, dict]:
    """{label: {'val_loss', 'val_ppl' (when cfg.data.kind is set), '<task>/exact_match' ..., then for each task
    '<task>/exact_match_<s>' for s in STAT_SUFFIXES}} for each model source in `models` ({label: source}).
    Validation loss is the token-weighted mean NLL over every evaluation batch of `make_data(cfg)` (loss_mask
    and padding-row mask applied, as in training), perplexity exp(loss). Each exact match p comes with
    report.accuracy_stats: n problems, SE, 95% Wilson interval, the chance level of `task_chance` and
    z_chance, the standard errors of guessing by which p exceeds it."""
    from flax import nnx

    from configurable_fm.interop.loader import load_model
    from configurable_fm.models.factory import DTYPES, with_compute_dtype
    from configurable_fm.train.data import TASK_EVAL_DEFAULTS, make_data, make_task_metrics
    from configurable_fm.train.task import loss_sums

    data = make_data(cfg) if cfg.data.get("kind") else None
    tasks = make_task_metrics(cfg, getattr(data, "tokenizer", None))
    if data is None and not tasks:
        raise ConfigError("evaluate stage: nothing to evaluate; set data.kind (validation loss) and/or task_metrics")
    sums = nnx.jit(loss_sums)
    chance = task_chance(cfg) if tasks else {}
    n_problems = int({**TASK_EVAL_DEFAULTS, **dict(cfg.get("task_eval") or {})}["n"])
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
                raise ConfigError(f"evaluate stage: the evaluation data of data.kind={cfg.data.kind!r} has no tokens")
            metrics["val_loss"] = nll / count
            metrics["val_ppl"] = math.exp(min(metrics["val_loss"], 50.0))
        for fn in tasks.values():
            metrics.update(fn(model))
        log(f"  {label}: {format_metrics(metrics, limit=12)}")
        for name, c in chance.items():
            acc = metrics[f"{name}/exact_match"]
            stats = accuracy_stats(acc, n_problems, c["chance"])
            metrics.update({f"{name}/exact_match_{k}": stats[k] for k in STAT_SUFFIXES})
            cells = accuracy_row(acc, stats, c["answer"], c["k"])
            log(f"    {name} exact match {cells[0]}, 95% CI {cells[1]}, chance {cells[3]}: {cells[4]}")
        out[label] = metrics
    return out


def evaluate_stage(cfg: ml_collections.ConfigDict, ctx: StageContext) -> StageOutput:
    """Evaluates `cfg.models` (see `evaluate_models`); writes eval.json and eval.md (a models x metrics table).
    Output model: the last of `models` (passed through, not copied)."""

    sources = list(cfg.models)
    if not sources:
        raise ConfigError(f"evaluate stage {ctx.name!r}: `models` is empty")
    labels = [ctx.label(s) for s in sources]
    if len(set(labels)) != len(labels):
        raise ConfigError(f"evaluate stage {ctx.name!r}: a model is listed twice in {labels}")
    results = evaluate_models(cfg, dict(zip(labels, sources)), log=ctx.log)
    chance = task_chance(cfg)
    stat_keys = {f"{t}/exact_match_{s}" for t in chance for s in STAT_SUFFIXES}
    keys = sorted({k for m in results.values() for k in m if k not in stat_keys},
                  key=lambda k: (k not in ("val_loss", "val_ppl"), k))
    table = markdown_table(["model"] + keys, [[label] + [results[label].get(k, "") for k in keys]
                                              for label in labels])
    if chance:
        rows = [[label, task] + accuracy_row(results[label][f"{task}/exact_match"],
                                             {s: results[label][f"{task}/exact_match_{s}"] for s in STAT_SUFFIXES},
                                             c["answer"], c["k"])
                for label in labels for task, c in chance.items()]
        table += "\n\n" + markdown_table(["model", "task"] + ACCURACY_HEADER, rows) + "\n\n" + ACCURACY_LEGEND
    write_json_atomic(ctx.stage_dir / "eval.json", {
        "models": [{"label": label, "source": src, "metrics": results[label]} for label, src in zip(labels, sources)],
        "chance": {t: {"chance": c["chance"], "answer": c["answer"], "distinct_answers": c["k"]}
                   for t, c in chance.items()}})
    write_text_atomic(ctx.stage_dir / "eval.md", table + "\n")
    # headline metrics first (the study report's key-metrics column shows the first few), then the statistics
    metrics = {f"{label}/{k}" if len(labels) > 1 else k: v for label in labels for k, v in results[label].items()
               if k not in stat_keys}
    metrics.update({f"{label}/{k}" if len(labels) > 1 else k: v for label in labels
                    for k, v in results[label].items() if k in stat_keys})
    return StageOutput(model=sources[-1], metrics=metrics, summary=table)


def _check_train(cfg) -> None:
    from configurable_fm.train.ramp import task_from_config
    from configurable_fm.train.trainer import check_config

    check_config(cfg)
    task_from_config(cfg.get("task"))


register_stage("train", train_stage, keys=TRAIN_KEYS, check=_check_train)
register_stage("evaluate", evaluate_stage, keys=EVALUATE_KEYS)
