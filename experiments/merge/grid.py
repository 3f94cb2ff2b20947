"""Multi-task merging study: the pipeline stage kind 'merge_grid' (a grid of merges of per-task fine-tunes of one
base, each scored by exact match on every task).

    python scripts/run.py --config experiments/merge/multitask.py --workdir runs/merge_multitask

What the stage does (config keys in `merge_grid_config`):
  1. Loads `base` and the fine-tunes `models` (one per task of `tasks`, same order) once; every model that is
     scored is the base's module with other parameters (`with_params`), so all share one graphdef and greedy
     generation compiles once per batch shape for the whole stage.
  2. Problems (module `problems`): per task, a validation set of `n_val` distinct train-split problems (seed
     `val_seed`) that are not among the fine-tuning problems (`task.examples("train", exclude.n, exclude.seed)`,
     compared through `task.canonical`), and a test set of `n_test` distinct test-split problems (seed
     `test_seed`). Splits are disjoint by construction (tasks.py), so validation and test never share a problem.
  3. Scores the base and every fine-tune on every task (the fine-tune of task t on t is the "individual" score),
     then for each grid point (method, parameters) merges in memory (`tree.merge`, float32, no checkpoint) and
     scores the merged model. One `evaluate_examples` call per model covers all tasks and both sets (one padded
     batch shape; rows sorted by task so batches stop early at their eos).
  4. Normalized accuracy (as in the merging literature): acc_merged(t) / acc_individual(t); a method's score is
     the mean over tasks whose individual accuracy is > 0. Selection: per method, the grid point with the highest
     mean normalized *validation* accuracy (ties: the first in grid order); its *test* scores are reported.
  5. Writes to the stage directory: results.csv and results.json (every model x task x set), table.md (best
     setting per method + the fine-tunes' task matrix), methods.png (per-task normalized test accuracy of each
     method's chosen setting) and hparams.png (mean normalized accuracy vs each swept hyperparameter).

Grid spec: `methods` is a list of {method, label, parameters, sweep}: `parameters` are `tree.merge`'s global
parameters shared by the points, `sweep` maps parameter names to lists of values whose Cartesian product gives
the points (`grid_points`). Method 'fisher' / 'regmean' are data-based merges (configurable_fm.ops.merge.fisher /
regmean): they use `data_examples` training-split rows of each fine-tune's own task (see
`DATA_METHODS`).
"""
from __future__ import annotations

import csv
import itertools
import json
import math
from pathlib import Path
from typing import Any, Mapping, Sequence

import ml_collections
import numpy as np

from configurable_fm.stages import StageContext, StageOutput, register_stage, to_plain

SETS = ("val", "test")
DATA_METHODS = ("fisher", "regmean")  # merges that need data (gradients / activations), see data_merge
GRID_KEYS = ("method", "label", "parameters", "sweep")


# ------------------------------------------------------------------------------------------ config
def merge_grid_config(name: str = "merge_grid", *, base: str, tasks: Sequence[str], models: Sequence[str],
                      methods: Sequence[Mapping], n_val: int = 64, n_test: int = 128, val_seed: int = 1,
                      test_seed: int = 0, exclude_n: int = 2000, exclude_seed: int = 0, batch_size: int = 256,
                      max_new_tokens: int = 0, compute_dtype: str = "float32", seed: int = 0,
                      tokenizer: str = "smollm2-135m-instruct", token_ids: Mapping | None = None,
                      seq_len: int = 64, data_examples: int = 64, data_batch_size: int = 16,
                      fisher_chunk: int = 1, save_best: bool = False) -> ml_collections.ConfigDict:
    """A 'merge_grid' stage config. base/models: `load_model` sources or stage references ('@finetune_sort');
    tasks: the synthetic task of each model; methods: grid spec (module docstring); n_val/n_test, val_seed/
    test_seed: problems per task and set; exclude_n/exclude_seed: the fine-tuning problems kept out of
    validation (the train stages' data.train_examples / data.task_seed); batch_size: generation rows;
    max_new_tokens: 0 = longest answer + 2; compute_dtype: scoring dtype; seed: randomised merges' seed;
    seq_len, data_examples, data_batch_size: rows for the data-based merges (fisher_chunk: examples per
    vmapped per-example gradient); save_best: write the merged model
    with the best mean normalized validation accuracy (then mean absolute; first in grid order on ties) as the
    stage's output model."""
    c = ml_collections.ConfigDict()
    c.name, c.kind = name, "merge_grid"
    c.base = base
    c.tasks = tuple(tasks)
    c.models = tuple(models)
    c.methods = [dict(to_plain(m, f"methods[{i}]")) for i, m in enumerate(methods)]
    c.n_val, c.n_test, c.val_seed, c.test_seed = n_val, n_test, val_seed, test_seed
    c.exclude = ml_collections.ConfigDict(dict(n=exclude_n, seed=exclude_seed))
    c.batch_size, c.max_new_tokens, c.compute_dtype, c.seed = batch_size, max_new_tokens, compute_dtype, seed
    c.tokenizer = tokenizer
    c.token_ids = ml_collections.ConfigDict({"eos": -1, "pad": -1, "bos": -1, **dict(token_ids or {})})
    c.seq_len, c.data_examples, c.data_batch_size = seq_len, data_examples, data_batch_size
    c.fisher_chunk = fisher_chunk
    c.save_best = save_best
    return c


def _fmt(v) -> str:
    return f"{v:g}" if isinstance(v, float) else str(v)


def grid_points(methods: Sequence[Mapping]) -> list[dict]:
    """Expands the grid spec into points [{method, label, group, parameters, swept}], in spec order; a sweep's
    points are its Cartesian product in the order of its keys (the last key varies fastest).

    group: the spec's label (default: the method name), which the table and plots use; label: group plus the
    swept values ('ties density=0.2 lambda=1'). Errors name the entry."""
    from configurable_fm.ops.merge.registry import get_method

    points, groups = [], set()
    for i, spec in enumerate(methods):
        spec = dict(spec)
        unknown = sorted(set(spec) - set(GRID_KEYS))
        if unknown:
            raise ValueError(f"methods[{i}]: unknown key(s) {unknown}; valid: {list(GRID_KEYS)}")
        method = spec.get("method")
        if not isinstance(method, str) or not method:
            raise ValueError(f"methods[{i}]: `method` must be a method name, got {method!r}")
        if method not in DATA_METHODS:
            get_method(method)  # unknown names fail here, before any model is loaded
        group = spec.get("label") or method
        if group in groups:
            raise ValueError(f"methods[{i}]: label {group!r} is used twice (give `label` to tell them apart)")
        groups.add(group)
        fixed = dict(spec.get("parameters") or {})
        sweep = dict(spec.get("sweep") or {})
        for name, values in sweep.items():
            if not isinstance(values, (list, tuple)) or not values:
                raise ValueError(f"methods[{i}] ({group}): sweep.{name} must be a non-empty list, got {values!r}")
            if name in fixed:
                raise ValueError(f"methods[{i}] ({group}): {name!r} is both in `parameters` and in `sweep`")
        names = list(sweep)
        for combo in itertools.product(*(sweep[n] for n in names)):
            swept = dict(zip(names, combo))
            label = " ".join([group] + [f"{k}={_fmt(v)}" for k, v in swept.items()])
            points.append({"method": method, "group": group, "label": label,
                           "parameters": {**fixed, **swept}, "swept": swept})
    return points


# ------------------------------------------------------------------------------------------ problems
def problems(task, n_val: int, n_test: int, *, val_seed: int, test_seed: int, exclude_n: int,
             exclude_seed: int) -> dict[str, list]:
    """{'val': n_val train-split problems not among the fine-tuning problems, 'test': n_test test-split problems},
    each distinct (module docstring, step 2). An error names the task when its train split has too few unseen
    problems."""
    from configurable_fm.data.synthetic import get_task

    task = get_task(task)
    seen = {task.canonical(ex.prompt) for ex in task.examples("train", exclude_n, exclude_seed)}
    val: list = []
    want = max(2 * n_val, 16)
    while len(val) < n_val:
        try:
            drawn = task.examples("train", want, val_seed, unique=True)  # a prefix of any larger draw
        except ValueError as e:
            raise ValueError(f"task {task.name!r}: cannot find {n_val} validation problems outside the "
                             f"{len(seen)} fine-tuning problems: {e}") from None
        val = [ex for ex in drawn if task.canonical(ex.prompt) not in seen][:n_val]
        want *= 2
    return {"val": val, "test": task.examples("test", n_test, test_seed, unique=True)}


def score(model, tok, sets: Mapping[tuple[str, str], Sequence], *, batch_size: int,
          max_new_tokens: int | None) -> dict[tuple[str, str], float]:
    """{(task, set): mean task.score} of greedy generations for every problem of `sets` ({(task, set):
    [Example]}), in one `evaluate_examples` call (one padded batch shape for all of them). `tok`: a
    train.data.TaskTokenizer."""
    from configurable_fm.data.synthetic import evaluate_examples, get_task

    keys = list(sets)
    flat = [ex for k in keys for ex in sets[k]]
    out = evaluate_examples(model, tok.tokenizer, flat, batch_size=batch_size, max_new_tokens=max_new_tokens,
                            eos_id=tok.eos_id, pad_id=tok.pad_id, bos_id=tok.bos_id, n_show=len(flat))
    preds = [e["prediction"] for e in out["examples"]]
    result, i = {}, 0
    for task, s in keys:
        t, n = get_task(task), len(sets[(task, s)])
        result[(task, s)] = float(np.mean([t.score(p, ex.answer) for p, ex in zip(preds[i:i + n], sets[(task, s)])]))
        i += n
    return result


def normalized(acc: Mapping[str, float], individual: Mapping[str, float]) -> dict[str, float]:
    """{task: acc / individual} for tasks whose individual accuracy is > 0 (others are left out)."""
    return {t: acc[t] / individual[t] for t in acc if individual.get(t, 0.0) > 0}


def mean_or_nan(values) -> float:
    values = list(values)
    return float(np.mean(values)) if values else float("nan")


# ------------------------------------------------------------------------------------------ data-based merges
def _task_batches(tok, task: str, n: int, seed: int, seq_len: int, batch_size: int) -> list[dict]:
    from configurable_fm.train.data import encode_task_rows

    rows = encode_task_rows(tok, (task,), "train", n, seed, seq_len)
    return [{k: v[i:i + batch_size] for k, v in rows.items()} for i in range(0, n, batch_size)]


def data_statistics(method: str, models: Sequence, batches: Sequence[list[dict]], *, chunk: int = 1) -> list:
    """Per fine-tune, the data statistic of a data-based merge from `batches` of its own task's training rows
    ({inputs, targets, loss_mask}): the diagonal Fisher F_i = E[g g] (fisher.diagonal_fisher, empirical) or the
    Gram matrices G_i = sum_t x_t x_t^T of every linear layer's inputs (regmean.gram_matrices)."""
    if method == "fisher":
        from configurable_fm.ops.merge.fisher import diagonal_fisher

        return [diagonal_fisher(m, b, chunk=chunk, progress=False) for m, b in zip(models, batches)]
    if method == "regmean":
        from configurable_fm.ops.merge.regmean import gram_matrices

        return [gram_matrices(m, b, progress=False)[0] for m, b in zip(models, batches)]
    raise ValueError(f"unknown data-based merge method {method!r}; known: {list(DATA_METHODS)}")


def data_merge(method: str, models: Sequence, stats: Sequence, parameters: Mapping) -> dict:
    """Fisher merging (Matena & Raffel, 2022): y = Σ_i F_i ⊙ θ_i / Σ_i F_i (fisher.fisher_merge), or RegMean
    (Jin et al., 2023): per linear kernel W = (Σ_i G_i')^-1 Σ_i G_i' W_i with G_i' = alpha G_i + (1 - alpha)
    diag(G_i), other tensors averaged (regmean.regmean_merge). Neither uses the base. `parameters` are passed to
    the merge function (fisher: fisher_floor, normalize; regmean: alpha)."""
    if method == "fisher":
        from configurable_fm.ops.merge.fisher import fisher_merge

        return fisher_merge(models, stats, **parameters)
    if method == "regmean":
        from configurable_fm.ops.merge.regmean import regmean_merge

        return regmean_merge(models, stats, **parameters)
    raise ValueError(f"unknown data-based merge method {method!r}; known: {list(DATA_METHODS)}")


# ------------------------------------------------------------------------------------------ the stage
def _plain_params(p: Mapping) -> str:
    return json.dumps(p, sort_keys=True)


def _check(cfg) -> None:
    tasks, models = list(cfg.tasks), list(cfg.models)
    if len(tasks) < 2:
        raise ValueError(f"merge_grid: `tasks` needs at least 2 tasks, got {tasks}")
    if len(tasks) != len(models):
        raise ValueError(f"merge_grid: {len(tasks)} tasks {tasks} but {len(models)} models; give one fine-tune "
                         "per task, in the same order")
    if len(set(tasks)) != len(tasks):
        raise ValueError(f"merge_grid: a task is listed twice in {tasks}")
    from configurable_fm.data.synthetic import TASKS

    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise ValueError(f"merge_grid: unknown task(s) {unknown}; known: {sorted(TASKS)}")
    if not cfg.base:
        raise ValueError("merge_grid: `base` (the model the fine-tunes started from) is required")


def merge_grid_stage(cfg: ml_collections.ConfigDict, ctx: StageContext) -> StageOutput:
    """Stage kind 'merge_grid' (module docstring)."""
    import time

    import jax.numpy as jnp

    from configurable_fm.bricks.paths import flat_params, with_params
    from configurable_fm.interop.loader import load_model
    from configurable_fm.ops.merge.registry import get_method
    from configurable_fm.ops.merge.tree import merge
    from configurable_fm.train.data import task_tokenizer
    from configurable_fm.models.factory import DTYPES, with_compute_dtype

    _check(cfg)
    points = grid_points(cfg.methods)
    tasks = list(cfg.tasks)
    tok = task_tokenizer(cfg)
    sets = {}
    for t in tasks:
        ps = problems(t, cfg.n_val, cfg.n_test, val_seed=cfg.val_seed, test_seed=cfg.test_seed,
                      exclude_n=cfg.exclude.n, exclude_seed=cfg.exclude.seed)
        sets.update({(t, s): ps[s] for s in SETS})
    max_new = int(cfg.max_new_tokens) or None

    base_model = load_model(cfg.base)
    template = base_model if cfg.compute_dtype == "float32" else with_compute_dtype(base_model,
                                                                                     DTYPES[cfg.compute_dtype])
    base_flat = {k: jnp.asarray(v, jnp.float32) for k, v in flat_params(base_model).items()}
    ft_models = []
    for t, source in zip(tasks, cfg.models):
        m = load_model(source)
        if m.cfg != base_model.cfg:
            raise ValueError(f"merge_grid: the fine-tune of {t!r} ({ctx.label(source)}) has config {m.cfg}, the "
                             f"base ({ctx.label(cfg.base)}) {base_model.cfg}")
        ft_models.append(m)
    ft_flats = [{k: jnp.asarray(v, jnp.float32) for k, v in flat_params(m).items()} for m in ft_models]

    def evaluate(flat) -> dict[tuple[str, str], float]:
        return score(with_params(template, flat), tok, sets, batch_size=cfg.batch_size, max_new_tokens=max_new)

    rows: list[dict] = []  # one per (model, task, set)

    def add(kind, label, group, method, params, acc, seconds):
        for (t, s), v in acc.items():
            rows.append({"kind": kind, "label": label, "group": group, "method": method,
                         "parameters": _plain_params(params), "task": t, "set": s, "exact_match": v,
                         "seconds": seconds})

    t0 = time.perf_counter()
    ref = {"base": evaluate(base_flat)}
    add("base", "base", "base", "", {}, ref["base"], time.perf_counter() - t0)
    for t, flat in zip(tasks, ft_flats):
        t0 = time.perf_counter()
        acc = evaluate(flat)
        ref[f"finetune:{t}"] = acc
        add("finetune", f"finetune:{t}", f"finetune:{t}", "", {}, acc, time.perf_counter() - t0)
    individual = {s: {t: ref[f"finetune:{t}"][(t, s)] for t in tasks} for s in SETS}
    ctx.log(f"  base: {_summary(ref['base'], tasks)}; individual: " +
            ", ".join(f"{t}={individual['test'][t]:.3f}" for t in tasks))

    data_batches, stats = None, {}
    best = ((-math.inf, -math.inf), None, None)  # ((mean normalized val, mean val), label, flat)
    for p in points:
        t0 = time.perf_counter()
        if p["method"] in DATA_METHODS:
            if data_batches is None:
                data_batches = [_task_batches(tok, t, cfg.data_examples, cfg.exclude.seed, cfg.seq_len,
                                              cfg.data_batch_size) for t in tasks]
            if p["method"] not in stats:  # once per method, shared by its grid points
                stats[p["method"]] = data_statistics(p["method"], ft_models, data_batches, chunk=cfg.fisher_chunk)
            flat = {k: jnp.asarray(v, jnp.float32)
                    for k, v in data_merge(p["method"], ft_flats, stats[p["method"]], p["parameters"]).items()}
        else:
            b = None if get_method(p["method"]).base == "ignored" else base_flat  # linear: the plain soup
            flat = merge(p["method"], b, ft_flats, parameters=p["parameters"], seed=cfg.seed, out_dtype=jnp.float32)
        acc = evaluate(flat)
        seconds = time.perf_counter() - t0
        add("merge", p["label"], p["group"], p["method"], p["parameters"], acc, seconds)
        val_norm = mean_or_nan(normalized({t: acc[(t, "val")] for t in tasks}, individual["val"]).values())
        ctx.log(f"  {p['label']}: val norm {val_norm:.3f}; {_summary(acc, tasks)} ({seconds:.1f}s)")
        key = (-math.inf if math.isnan(val_norm) else val_norm, mean_or_nan(acc[(t, "val")] for t in tasks))
        if cfg.save_best and key > best[0]:
            best = (key, p["label"], flat)

    results = summarize(rows, tasks, points)
    results["uncertainty"] = uncertainty(sets, tasks)
    files = write_outputs(ctx.stage_dir, rows, results, tasks, points)
    metrics: dict[str, Any] = {"points": len(points), "base/avg_test": results["base"]["avg_test"],
                               "individual/avg_test": results["individual"]["avg_test"]}
    for g in results["chosen"]:
        metrics[f"{g['group']}/norm_test"] = g["norm_test"]
    model_path = None
    if cfg.save_best and best[2] is not None:
        model_path = ctx.save_model(with_params(base_model, best[2]))
        metrics["best"] = best[1]
    rel = ctx.stage_dir.relative_to(ctx.workdir)
    summary = (f"{len(points)} merges of {len(tasks)} fine-tunes ({', '.join(ctx.label(m) for m in cfg.models)}) "
               f"of {ctx.label(cfg.base)}, each scored by exact match on {cfg.n_val} validation and {cfg.n_test} "
               f"test problems per task. Setting per method chosen on validation; test scores below. Normalized "
               f"= merged / individual fine-tune on its own task. Files: `{rel}/table.md`, `{rel}/results.csv`, "
               f"`{rel}/results.json`.\n\n" + files["table"] +
               f"\n\n![normalized test accuracy per method]({rel}/methods.png)\n\n"
               f"![accuracy vs hyperparameters]({rel}/hparams.png)\n")
    return StageOutput(model=model_path, metrics=metrics, summary=summary)


def _summary(acc, tasks) -> str:
    return " ".join(f"{t}={acc[(t, 'test')]:.2f}" for t in tasks)


# ------------------------------------------------------------------------------------------ results
def summarize(rows: Sequence[Mapping], tasks: Sequence[str], points: Sequence[Mapping]) -> dict:
    """Per grid point: test/val accuracies, normalized accuracies and their means; per method group: the point
    chosen on mean normalized validation accuracy (first in grid order on ties); references: base, individual.

    Returns {'points': [...], 'chosen': [...], 'base': {...}, 'individual': {...}, 'finetunes': {...}}."""
    acc: dict[str, dict[tuple[str, str], float]] = {}
    for r in rows:
        acc.setdefault(r["label"], {})[(r["task"], r["set"])] = r["exact_match"]
    individual = {s: {t: acc[f"finetune:{t}"][(t, s)] for t in tasks} for s in SETS}

    def entry(label):
        a = acc[label]
        out = {}
        for s in SETS:
            per = {t: a[(t, s)] for t in tasks}
            norm = normalized(per, individual[s])
            out[s] = per
            out[f"norm_{s}_per_task"] = norm
            out[f"avg_{s}"] = mean_or_nan(per.values())
            out[f"norm_{s}"] = mean_or_nan(norm.values())
        return out

    pts = [{**{k: p[k] for k in ("method", "group", "label", "parameters", "swept")}, **entry(p["label"])}
           for p in points]
    chosen = []
    for group in dict.fromkeys(p["group"] for p in pts):
        cands = [p for p in pts if p["group"] == group]
        key = lambda p: -math.inf if math.isnan(p["norm_val"]) else p["norm_val"]
        chosen.append(max(cands, key=key))  # max keeps the first of equal keys
    return {"points": pts, "chosen": chosen, "base": entry("base"),
            "individual": {"test": individual["test"], "val": individual["val"],
                           "avg_test": mean_or_nan(individual["test"].values()),
                           "avg_val": mean_or_nan(individual["val"].values())},
            "finetunes": {t: entry(f"finetune:{t}") for t in tasks}}


def uncertainty(sets: Mapping[tuple[str, str], Sequence], tasks: Sequence[str]) -> dict[str, Any]:
    """What the test accuracies can resolve: n test problems per task, the largest standard error of one task's
    accuracy (p = 1/2: 0.5/sqrt(n)) and of the mean over the tasks (0.5/sqrt(n T)), and each task's chance level
    (stages.report.chance_level: always giving the most common answer of its test problems)."""
    from configurable_fm.data.synthetic.tasks import normalize
    from configurable_fm.stages.report import chance_level

    n = min(len(sets[(t, "test")]) for t in tasks)
    return {"n_test": n, "max_se_task": 0.5 / math.sqrt(n), "max_se_mean": 0.5 / math.sqrt(n * len(tasks)),
            "chance": {t: chance_level(normalize(ex.answer) for ex in sets[(t, "test")])["chance"] for t in tasks}}


def _table(results: Mapping, tasks: Sequence[str]) -> str:
    from configurable_fm.stages.report import markdown_table

    pct = lambda x: "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.1f}"
    header = (["method", "setting (swept values chosen on val)", "norm. test %", "abs. test %", "norm. val %"]
              + [f"{t} test % (norm.)" for t in tasks])
    ind = results["individual"]
    base = results["base"]
    rows = [["individual fine-tunes", "each on its own task", "100.0", pct(ind["avg_test"]), "100.0"]
            + [f"{pct(ind['test'][t])}" for t in tasks],
            ["base (no merge)", "", pct(base["norm_test"]), pct(base["avg_test"]), pct(base["norm_val"])]
            + [f"{pct(base['test'][t])} ({pct(base['norm_test_per_task'].get(t))})" for t in tasks]]
    for p in sorted(results["chosen"], key=lambda p: -p["norm_test"] if not math.isnan(p["norm_test"]) else 0):
        shown = p["swept"] or {k: v for k, v in p["parameters"].items() if k != "weight"}  # fixed: in results.json
        setting = ", ".join(f"{k}={_fmt(v)}" for k, v in shown.items()) or "(none)"
        rows.append([p["group"], setting, pct(p["norm_test"]), pct(p["avg_test"]), pct(p["norm_val"])]
                    + [f"{pct(p['test'][t])} ({pct(p['norm_test_per_task'].get(t))})" for t in tasks])
    best = markdown_table(header, rows)
    cross = markdown_table(["fine-tune \\ task (test %)"] + list(tasks),
                           [[f"finetune:{s}"] + [pct(results["finetunes"][s]["test"][t]) for t in tasks]
                            for s in tasks] + [["base"] + [pct(base["test"][t]) for t in tasks]])
    u = results.get("uncertainty")
    legend = "" if u is None else (
        f"\n\nTest accuracies are exact match on n = {u['n_test']} problems per task: one task's accuracy has a "
        f"standard error of at most {100 * u['max_se_task']:.1f} points, the mean over the {len(tasks)} tasks at most "
        f"{100 * u['max_se_mean']:.1f} (normalized scores scale these by 1 / the individual accuracy). Chance (always "
        "the most common answer): " + ", ".join(f"{t} {pct(u['chance'][t])}%" for t in tasks) + ".")
    return (best + legend + "\n\nEvery fine-tune on every task (the diagonal is the individual score used to "
            "normalize):\n\n" + cross)


def _bar_figure(results: Mapping, tasks: Sequence[str]):
    from configurable_fm.stages.report import plt

    chosen = sorted(results["chosen"], key=lambda p: -p["norm_test"] if not math.isnan(p["norm_test"]) else 0)
    groups = [p["group"] for p in chosen]
    cols = list(tasks) + ["mean"]
    fig, ax = plt.subplots(figsize=(max(6.0, 1.2 * len(groups) + 2), 4.2), dpi=120)
    width = 0.8 / len(cols)
    x = np.arange(len(groups))
    for j, c in enumerate(cols):
        vals = [100 * (p["norm_test"] if c == "mean" else p["norm_test_per_task"].get(c, float("nan")))
                for p in chosen]
        ax.bar(x + (j - (len(cols) - 1) / 2) * width, vals, width, label=c,
               color="black" if c == "mean" else f"C{j % 10}")
    ax.axhline(100, color="gray", ls="--", lw=0.8)
    base = results["base"]["norm_test"]
    if not math.isnan(base):
        ax.axhline(100 * base, color="red", ls=":", lw=0.8, label="base")
    ax.set_xticks(x)
    ax.set_xticklabels(groups, rotation=30, ha="right")
    ax.set_ylabel("test accuracy, % of the individual fine-tune")
    ax.set_title("Merged model per method (setting chosen on validation)")
    ax.legend(fontsize=7, ncol=2)
    ax.grid(True, axis="y", alpha=0.3)
    fig.tight_layout()
    return fig


def _hparam_figure(results: Mapping):
    """One panel per method group with a sweep: mean normalized accuracy (val solid, test dashed) against its
    longest swept parameter, one line per combination of the other swept parameters."""
    from configurable_fm.stages.report import plt

    groups = [g for g in dict.fromkeys(p["group"] for p in results["points"])
              if any(p["swept"] for p in results["points"] if p["group"] == g)]
    n = max(len(groups), 1)
    ncols = min(n, 4)
    nrows = math.ceil(n / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(3.6 * ncols, 3.0 * nrows), dpi=120, squeeze=False)
    for ax, g in zip(axes.flat, groups):
        pts = [p for p in results["points"] if p["group"] == g]
        xname = max(pts[0]["swept"], key=lambda k: len({str(p["swept"][k]) for p in pts}))  # the longest sweep
        lines: dict[str, list] = {}
        for p in pts:
            rest = ", ".join(f"{k}={_fmt(v)}" for k, v in p["swept"].items() if k != xname)
            lines.setdefault(rest, []).append(p)
        numeric = all(isinstance(p["swept"][xname], (int, float)) for p in pts)
        for k, (rest, ps) in enumerate(lines.items()):
            xs = [p["swept"][xname] if numeric else str(p["swept"][xname]) for p in ps]
            ax.plot(xs, [100 * p["norm_val"] for p in ps], "o-", color=f"C{k}", label=f"{rest} val".strip())
            ax.plot(xs, [100 * p["norm_test"] for p in ps], "x--", color=f"C{k}", alpha=0.6,
                    label=f"{rest} test".strip())
        ax.set_title(g, fontsize=9)
        ax.set_xlabel(xname)
        ax.set_ylabel("normalized acc. %")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=6)
    for ax in list(axes.flat)[len(groups):]:
        ax.axis("off")
    if not groups:
        list(axes.flat)[0].text(0.5, 0.5, "no swept hyperparameters", ha="center", va="center")
    fig.tight_layout()
    return fig


def write_outputs(stage_dir: Path, rows: Sequence[Mapping], results: Mapping, tasks: Sequence[str],
                  points: Sequence[Mapping]) -> dict[str, str]:
    """results.csv, results.json, table.md, methods.png, hparams.png in `stage_dir`; returns {'table': markdown}."""
    from configurable_fm.stages.report import plt
    from configurable_fm.interop.atomic import write_json_atomic

    stage_dir = Path(stage_dir)
    with open(stage_dir / "results.csv.tmp", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["kind", "label", "group", "method", "parameters", "task", "set",
                                          "exact_match", "seconds"])
        w.writeheader()
        w.writerows(rows)
    (stage_dir / "results.csv.tmp").replace(stage_dir / "results.csv")
    write_json_atomic(stage_dir / "results.json", {"tasks": list(tasks), "rows": list(rows),
                                                   **_jsonable(results)})
    table = _table(results, tasks)
    (stage_dir / "table.md.tmp").write_text(table + "\n")
    (stage_dir / "table.md.tmp").replace(stage_dir / "table.md")
    for name, fig in (("methods.png", _bar_figure(results, tasks)), ("hparams.png", _hparam_figure(results))):
        fig.savefig(stage_dir / name, dpi=120, bbox_inches="tight")
        plt.close(fig)
    return {"table": table}


def _jsonable(x):
    if isinstance(x, Mapping):
        return {(k if isinstance(k, str) else "/".join(k)): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, float) and math.isnan(x):
        return None
    return x


STAGE_CONFIG_KEYS = ("base", "tasks", "models", "methods", "n_val", "n_test", "val_seed", "test_seed", "exclude", "batch_size",
             "max_new_tokens", "compute_dtype", "seed", "tokenizer", "token_ids", "seq_len", "data_examples",
             "data_batch_size", "fisher_chunk", "save_best")
register_stage("merge_grid", merge_grid_stage, keys=STAGE_CONFIG_KEYS)
