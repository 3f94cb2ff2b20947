"""The stage kinds of the adapter-library study (experiments/adapters/library.py): one LoRA adapter per task through
the trainer (`config.adapter`), then every way of using the library scored on in-library and held-out tasks.

  'library_adapter'  a train config (experiments/adapters/lora_synthetic.py's keys) plus `library_task` {name, shots,
                     demo_seed, train_examples, eval_examples, task_seed}: rows of few-shot prompts of that task
                     (data/text_tasks.py: few_shot; the answer is followed by a newline, the loss covers the answer and
                     that newline) fed to train(config, data=...), so `config.adapter` attaches the LoRA, only it trains,
                     and the trainer writes it to train/adapter (a brick set). The stage's output is that directory, so
                     '@<stage>' in the evaluation stage names the adapter and fingerprints chain.
  'library_eval'     base + the adapters; every method scored on `n_test` test-split problems of each task.

Score (one forward per problem, no generation): for the row s = ids(prompt) + ids(answer) + [newline] with answer
positions A (the answer tokens and the newline),
    correct = Π_{t ∈ A} [argmax_v logits[t − 1, v] = s_t]      nll = −Σ_{t ∈ A} log p(s_t | s_<t)
`correct` is 1 exactly when greedy decoding from the prompt produces the answer's tokens and then a newline, i.e.
the exact match of a greedy generation cut at its first line, compared token by token (a generation that spells the
answer with other tokens counts as wrong: a lower bound of string exact match). Accuracy p over n problems has
SE sqrt(p(1 − p)/n); a mean over T tasks has SE sqrt(Σ_t SE_t²)/T. Chance: stages.report.chance_level (always
answering the commonest answer).

Methods (library of N adapters, LoRA factors A_i, B_i, scale s_i, ΔW_i = s_i A_i B_i per module):
  base            the model alone
  oracle          the task's own adapter (in-library tasks only; held-out tasks have none)
  best_single     every library adapter alone on every task; per task the best of them, chosen on the test problems
                  themselves: an upper bound for any top-1 routing (results `singles`: each adapter's accuracy)
  uniform         W + (1/N) Σ_i ΔW_i                                   (averaging; merged: the base's cost)
  task_arithmetic W + λ Σ_i ΔW_i                                       (ops.merge.merge_deltas 'task_arithmetic')
  ties            W + λ · disjoint-mean of the top-`density` entries of each ΔW_i agreeing with the elected sign
  dare_ties       W + λ · disjoint-mean of Bernoulli(density)-kept, 1/density-rescaled ΔW_i entries, elected sign
  cat             PEFT's add_weighted_adapter 'cat' with weights 1: one LoRA of rank Σ r_i, ΔW = Σ_i ΔW_i exactly,
                  kept unmerged (its cost: a rank-N·r LoRA at every module)
  arrow           ops.route.arrow: per token and module, top-k of |<x, p_i>| (p_i: top singular vector), softmax / T
  lorahub         ops.route.lorahub per task: CMA-ES over w (budget evaluations) on `examples` train-split problems
                  of that task, A' = Σ w_i A_i, B' = Σ w_i B_i, merged (search cost reported separately)
  embed_routing   ops.route: MiniLM embedding of the query (the prompt without its demonstrations), nearest centroid of
                  `router_examples` train-split queries per library task, top-1 adapter per row (with_adapter_ids)
  embed_floors    embed_routing, but a row whose best cosine is below its adapter's calibrated floor (mean − 3 std
                  of the adapter's own examples' leave-one-out cosines, ops.route.retrieval) runs the base: queries
                  unlike every library task get no adapter. Calibrated on the library's examples alone.
  embed_uniform   embed_floors, but a row below its floor runs the uniform merge instead of the base
                  (route(..., fallback='uniform'): weights 1/N on ops.route.weighted_mix, the uniform merge for that
                  row alone; the rows above keep their top-1 adapter as one-hot weights)
  embed_soft      the `routing.top_k` nearest adapters mixed per row, w_i = softmax(s_i / routing.temperature) over
                  them (ops.route.softmax_top_k; Σ w_i ΔW_i for that row), rows below their floor the uniform merge
(results.json `routing`: per method and task the top-1 choices (`chosen`; 'uniform merge' / 'base' for the rows
below their floor), the share routed to the task's own adapter, and for the weighted methods each adapter's mean
weight over the task's rows (`mean_weights`).)
Merges are computed on the dense ΔW_i and added to the base kernels (bricks.deltas.apply): no SVD truncation.

Inference cost: median wall time of a jitted forward of one (batch_size, seq_len) batch per method (the model split
once, before timing: ops.route.forward_call), divided by the base's (merged methods are plain models; routing adds
the embedding and selection, ops.route.routing_cost).
"""
from __future__ import annotations

import dataclasses
import json
import math
import time
from collections import Counter
from pathlib import Path
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from configurable_fm.data.synthetic import encode_examples, encode_text
from configurable_fm.data.text_tasks import few_shot, source_of
from configurable_fm.stages import StageContext, StageOutput, register_stage
from configurable_fm.stages.report import chance_level, plt
from configurable_fm.stages.train import TRAIN_KEYS

ADAPTER_KEYS = TRAIN_KEYS + ("adapter", "frozen_dtype", "library_task")
EVAL_KEYS = ("base", "adapters", "library", "held_out", "shots", "demo_seed", "n_test", "task_seed", "batch_size",
             "seq_len", "compute_dtype", "tokenizer", "token_ids", "merge", "arrow", "lorahub", "routing", "cost",
             "methods", "seed", "base_model", "base_seed", "length_step")
METHODS = ("base", "oracle", "best_single", "uniform", "task_arithmetic", "ties", "dare_ties", "cat", "arrow",
           "lorahub", "embed_routing", "embed_floors", "embed_uniform", "embed_soft")
# embedding-routing methods: the model they run on ('mixed': one adapter id per row, bricks.adapters.mix;
# 'weighted': weights per row, ops.route.weighted_mix) and their route() options ('floors': the router's calibrated
# floors; 'top_k' / 'temperature': the config's routing.top_k / routing.temperature; routing_options fills them in)
ROUTED = {"embed_routing": ("mixed", dict(threshold=None)),
          "embed_floors": ("mixed", dict(threshold="floors")),
          "embed_uniform": ("weighted", dict(threshold="floors", fallback="uniform")),
          "embed_soft": ("weighted", dict(threshold="floors", fallback="uniform", top_k="top_k",
                                          temperature="temperature"))}
MERGED = ("uniform", "task_arithmetic", "ties", "dare_ties")


def newline_id(tokenizer) -> int:
    """The id of '\\n' alone (the answers' terminator)."""
    ids = encode_text(tokenizer, "\n")
    if len(ids) != 1:
        raise ValueError(f"the tokenizer encodes a newline as {ids}, not one token")
    return ids[0]


def task_problems(name: str, split: str, n: int, seed: int, shots: int, demo_seed: int):
    """(few-shot task, n problems of `split`), n capped at the split's size for text tasks."""
    task = few_shot(name, shots, demo_seed)
    inner = task.inner
    if hasattr(inner, "split_items"):
        n = min(n, len(inner.split_items(split)) - (shots if split == "train" else 0))
    return task, task.examples(split, n, seed)


def bucket(tokenizer, examples, limit: int, *, bos: bool = False, step: int = 16) -> int:
    """The row length of these problems: the longest prompt + answer + terminator (+ bos), rounded up to a multiple
    of `step`, at most `limit` (longer problems are then an error naming them, from encode_examples)."""
    longest = max(len(encode_text(tokenizer, e.prompt)) + len(encode_text(tokenizer, e.answer)) + 1 + bos
                  for e in examples)
    return min(limit, -(-longest // step) * step)


# ------------------------------------------------------------------------------------------ adapter stage
def adapter_stage(cfg: ml_collections.ConfigDict, ctx: StageContext) -> StageOutput:
    """Trains one LoRA on one task's few-shot rows (module docstring); output: the adapter directory."""
    from configurable_fm.train.data import ExampleData, task_tokenizer
    from configurable_fm.train.metrics import read_metrics
    from configurable_fm.train.trainer import train

    t = cfg.library_task
    tok = task_tokenizer(cfg)
    nl = newline_id(tok.tokenizer)
    _, train_ex = task_problems(t.name, "train", int(t.train_examples), int(t.task_seed), int(t.shots),
                                int(t.demo_seed))
    _, val_ex = task_problems(t.name, "test", int(t.eval_examples), int(t.task_seed) + 1, int(t.shots),
                              int(t.demo_seed))
    seq_len = bucket(tok.tokenizer, train_ex + val_ex, int(cfg.seq_len), bos=tok.bos_id is not None,
                     step=int(t.get("length_step", 32)))
    rows = {split: encode_examples(tok.tokenizer, ex, seq_len, eos_id=nl, pad_id=tok.pad_id,
                                   bos_id=tok.bos_id) for split, ex in (("train", train_ex), ("val", val_ex))}
    cfg = ml_collections.ConfigDict(cfg.to_dict())
    cfg.seq_len = seq_len  # this task's rows: one compiled shape, no longer than needed
    manifest = {"kind": "library_task", "task": t.name, "source": source_of(t.name), "shots": int(t.shots),
                "train_examples": len(train_ex), "eval_examples": len(val_ex), "task_seed": int(t.task_seed),
                "terminator": nl, "train_answer_tokens": int(rows["train"]["loss_mask"].sum())}
    data = ExampleData(rows["train"], rows["val"], int(cfg.batch_size), int(cfg.seed),
                       int(cfg.data.get("eval_batch_size") or cfg.batch_size), manifest=manifest,
                       max_eval_batches=cfg.data.get("max_eval_batches"), tokenizer=tok)
    result = train(cfg, ctx.stage_dir / "train", data=data, log=ctx.log)
    adapter_dir = ctx.stage_dir / "train" / "adapter"
    logged = [r for r in read_metrics(ctx.stage_dir / "train") if "val_loss" in r]
    metrics = {"steps": result.step, "train_examples": len(train_ex)}
    if logged:
        metrics.update(first_val_loss=logged[0]["val_loss"], val_loss=logged[-1]["val_loss"])
    return StageOutput(model=str(adapter_dir), metrics=metrics, curves=ctx.stage_dir / "train" / "metrics.jsonl",
                       summary=f"LoRA on task `{t.name}` ({source_of(t.name)}), {result.step} steps; adapter: "
                               f"`{adapter_dir.relative_to(ctx.workdir)}`.")


# ------------------------------------------------------------------------------------------ scoring
def encode_rows(tokenizer, examples, seq_len: int, *, terminator: int, pad_id: int, bos_id=None) -> dict:
    """{'ids' (n, T) int32, 'mask' (n, T) float32: 1 at the positions t whose token s_t is scored (answer and
    terminator)}; ValueError naming a problem longer than seq_len."""
    rows = encode_examples(tokenizer, examples, seq_len, eos_id=terminator, pad_id=pad_id, bos_id=bos_id)
    ids = np.full_like(rows["inputs"], pad_id)
    ids[:, 0] = rows["inputs"][:, 0]
    ids[:, 1:] = rows["targets"][:, :-1]
    mask = np.zeros(ids.shape, np.float32)
    mask[:, 1:] = rows["loss_mask"][:, :-1]
    # the last target lies in column T - 1 of targets only when the row is full: encode_examples leaves it there
    full = rows["loss_mask"][:, -1] > 0
    if full.any():
        raise ValueError(f"seq_len={seq_len} leaves no room for {int(full.sum())} problems; raise seq_len")
    return {"ids": ids.astype(np.int32), "mask": mask}


@jax.jit
def _row_scores(logits_BxTxV, ids_BxT, mask_BxT):
    pred = jnp.argmax(logits_BxTxV[:, :-1], axis=-1)
    m = mask_BxT[:, 1:]
    hit = jnp.where(m > 0, pred == ids_BxT[:, 1:], True).all(axis=1)
    logp = jax.nn.log_softmax(logits_BxTxV[:, :-1].astype(jnp.float32), axis=-1)
    nll = -(jnp.take_along_axis(logp, ids_BxT[:, 1:, None], axis=-1)[..., 0] * m).sum(axis=1)
    return hit, nll


def forward(model, ids_BxT):
    """model(ids) through one jitted function per model structure (ops.route.forward_call)."""
    from configurable_fm.ops import route

    return route.forward_call(model, ids_BxT)()


def score_rows(rows: Mapping, batch_size: int, model_for_rows) -> tuple[np.ndarray, np.ndarray]:
    """(correct (n,) bool, nll (n,)) of encoded rows; model_for_rows(idx) -> the model for those row indices
    (batches padded to batch_size with copies of their first row, so every batch has one shape)."""
    n = len(rows["ids"])
    hits, nlls = [], []
    for start in range(0, n, batch_size):
        idx = np.arange(start, min(start + batch_size, n))
        pad = np.concatenate([idx, np.full(batch_size - len(idx), idx[0])])
        logits = forward(model_for_rows(pad), rows["ids"][pad])
        h, l = _row_scores(logits, jnp.asarray(rows["ids"][pad]), jnp.asarray(rows["mask"][pad]))
        hits.append(np.asarray(h)[:len(idx)])
        nlls.append(np.asarray(l)[:len(idx)])
    return np.concatenate(hits), np.concatenate(nlls)


def mean_se(accs: Sequence[float], ns: Sequence[int]) -> tuple[float, float]:
    """(mean of task accuracies, its SE sqrt(Σ p(1 − p)/n)/T)."""
    if not accs:
        return float("nan"), float("nan")
    var = sum(p * (1 - p) / n for p, n in zip(accs, ns))
    return float(np.mean(accs)), math.sqrt(var) / len(accs)


# ------------------------------------------------------------------------------------------ evaluation stage
def eval_stage(cfg: ml_collections.ConfigDict, ctx: StageContext) -> StageOutput:
    """Scores every method on every task (module docstring); writes results.json, results.md, library.png."""
    from configurable_fm.bricks import adapters as ad
    from configurable_fm.bricks.deltas import apply
    from configurable_fm.interop.loader import load_model
    from configurable_fm.models.factory import DTYPES, with_compute_dtype
    from configurable_fm.ops import route
    from configurable_fm.ops.merge import merge_deltas
    from configurable_fm.train.data import task_tokenizer

    log = ctx.log
    library, held_out = list(cfg.library), list(cfg.held_out)
    if len(cfg.adapters) != len(library):
        raise ValueError(f"library_eval: {len(cfg.adapters)} adapters for {len(library)} library tasks")
    methods = [m for m in (cfg.get("methods") or METHODS)]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"library_eval: unknown methods {unknown}; known: {list(METHODS)}")
    t_start = time.perf_counter()
    tok = task_tokenizer(cfg)
    nl = newline_id(tok.tokenizer)
    if cfg.base:
        base = load_model(cfg.base)
    else:  # the random model the adapter stages' trainer built (init_from '': config.model, seed)
        from configurable_fm.models.factory import build_model

        base = build_model(cfg.base_model.to_dict(), seed=int(cfg.base_seed))
    if cfg.compute_dtype != "float32":
        base = with_compute_dtype(base, DTYPES[cfg.compute_dtype])
    adapted = [ad.load_adapter(base, d) for d in cfg.adapters]
    n_lib = len(adapted)
    tasks = library + held_out
    bs, T = int(cfg.batch_size), int(cfg.seq_len)
    length_step = int(cfg.get("length_step", 32))

    problems, rows, chance = {}, {}, {}
    for name in tasks:
        fs, exs = task_problems(name, "test", int(cfg.n_test), int(cfg.task_seed), int(cfg.shots), int(cfg.demo_seed))
        problems[name] = (fs, exs)
        # + 1: the row holds s_0 .. s_{m-1}; length_step >= seq_len gives every task one shape (one compilation)
        L = bucket(tok.tokenizer, exs, T, bos=tok.bos_id is not None, step=length_step) + 1
        rows[name] = encode_rows(tok.tokenizer, exs, min(L, T), terminator=nl, pad_id=tok.pad_id, bos_id=tok.bos_id)
        chance[name] = chance_level(e.answer.strip() for e in exs)

    results: dict[str, dict[str, dict]] = {}  # method -> task -> {acc, n, se, nll}
    seconds: dict[str, float] = {}
    cost_models: dict[str, Any] = {}

    def record(method, name, hit, nll, **extra):
        n = len(hit)
        p = float(hit.mean())
        results.setdefault(method, {})[name] = {"acc": p, "n": n, "se": math.sqrt(p * (1 - p) / n),
                                                "nll": float(nll.mean()), **extra}

    def run_plain(method, model, names=tasks):
        t0 = time.perf_counter()
        for name in names:
            hit, nll = score_rows(rows[name], bs, lambda idx: model)
            record(method, name, hit, nll)
        seconds[method] = seconds.get(method, 0.0) + time.perf_counter() - t0
        log(f"  {method}: " + " ".join(f"{k}={v['acc']:.2f}" for k, v in results[method].items() if k in names))

    if "base" in methods:
        run_plain("base", base)
        cost_models["base"] = base
    if "oracle" in methods:
        for i, name in enumerate(library):
            run_plain("oracle", adapted[i], [name])
        cost_models["oracle"] = adapted[0]
    if "best_single" in methods:
        t0 = time.perf_counter()
        for name in tasks:
            scored = [score_rows(rows[name], bs, lambda idx: m) for m in adapted]
            accs = [float(hit.mean()) for hit, _ in scored]
            best = int(np.argmax(accs))
            record("best_single", name, *scored[best], adapter=library[best],
                   singles=dict(zip(library, np.round(accs, 4).tolist())))
        seconds["best_single"] = time.perf_counter() - t0
        log("  best_single: " + " ".join(f"{k}={v['acc']:.2f} ({v['adapter']})"
                                         for k, v in results["best_single"].items()))
        cost_models.setdefault("oracle", adapted[0])

    deltas = [ad.as_delta(m) for m in adapted] if any(m in methods for m in MERGED) else []
    mc = cfg.merge
    merge_specs = {
        "uniform": ("task_arithmetic", {"normalize": True}),
        "task_arithmetic": ("task_arithmetic", {"lambda": float(mc.ta_lambda)}),
        "ties": ("ties", {"density": float(mc.ties_density), "lambda": float(mc.ties_lambda), "normalize": True}),
        "dare_ties": ("dare_ties", {"density": float(mc.dare_density), "lambda": float(mc.dare_lambda),
                                    "normalize": True}),
    }
    for method in MERGED:
        if method not in methods:
            continue
        kind, params = merge_specs[method]
        t0 = time.perf_counter()
        delta = merge_deltas(kind, deltas, parameters=params, model_parameters=[{"weight": 1.0}] * n_lib,
                             seed=int(cfg.seed))
        merged = apply(base, delta)
        seconds[f"{method}_build"] = time.perf_counter() - t0
        run_plain(method, merged)
        cost_models.setdefault("merged", merged)
        del merged, delta

    if "cat" in methods:
        cat = ad.combine(adapted, [1.0] * n_lib, "cat")
        run_plain("cat", cat)
        cost_models["cat"] = cat

    if "arrow" in methods:
        t0 = time.perf_counter()
        arrowed = route.arrow(base, adapted, top_k=min(int(cfg.arrow.top_k), n_lib),
                              temperature=float(cfg.arrow.temperature))
        seconds["arrow_build"] = time.perf_counter() - t0
        run_plain("arrow", arrowed)
        cost_models["arrow"] = arrowed

    if "lorahub" in methods:
        lh = cfg.lorahub
        weights = {}
        t0 = time.perf_counter()
        for name in tasks:
            fs, shots = task_problems(name, "train", int(lh.examples), int(cfg.task_seed) + 7, int(cfg.shots),
                                      int(cfg.demo_seed))
            batch = route.few_shot_batch(tok.tokenizer, [e.prompt for e in shots], [e.answer + "\n" for e in shots],
                                         pad_id=tok.pad_id, pad_to=length_step)
            hub = route.lorahub(base, adapted, batch, budget=int(lh.budget), seed=int(cfg.seed))
            weights[name] = [float(w) for w in hub.weights]
            model = ad.merge(hub.model)
            hit, nll = score_rows(rows[name], bs, lambda idx: model)
            record("lorahub", name, hit, nll, weights=weights[name])
            del model, hub
        seconds["lorahub"] = time.perf_counter() - t0
        log("  lorahub: " + " ".join(f"{k}={v['acc']:.2f}" for k, v in results["lorahub"].items()))

    routing_info = {}
    routed = [m for m in ROUTED if m in methods]
    if routed:
        rc = cfg.routing
        encoder = route.load_text_encoder()
        examples = {}
        for name in library:
            fs, exs = task_problems(name, "train", int(rc.examples), int(cfg.task_seed) + 13, int(cfg.shots),
                                    int(cfg.demo_seed))
            examples[name] = [fs.query(e.prompt) for e in exs]
        router = route.build_router(encoder, examples)
        models = {kind: (ad.mix if kind == "mixed" else route.weighted_mix)(base, adapted)
                  for kind in sorted({ROUTED[m][0] for m in routed})}
        routing_info["floors"] = dict(zip(library, np.round(router.floors, 4).tolist()))
        for method in routed:
            kind, options = routing_options(method, router, rc)
            model = models[kind]
            t0 = time.perf_counter()
            for name in tasks:
                fs, exs = problems[name]
                r = route.route_texts(router, encoder, [fs.query(e.prompt) for e in exs], **options)
                choices = np.asarray(r.choices)
                counts = dict(Counter("base" if c is None else c for c in r.chosen_names))
                hit, nll = score_rows(rows[name], bs, lambda idx: route.routed_model(
                    model, dataclasses.replace(r, choices=r.choices[idx], weights=r.weights[idx])))
                own = float((choices == library.index(name)).mean()) if name in library else None
                info = {"chosen": counts, "routed_to_own": own}
                if kind == "weighted":  # what the rows ran: each adapter's mean weight over the task's rows
                    info["mean_weights"] = dict(zip(library, np.round(r.weights.mean(axis=0), 4).tolist()))
                record(method, name, hit, nll, **info)
                routing_info.setdefault(method, {})[name] = info
            seconds[method] = time.perf_counter() - t0
            log(f"  {method}: " + " ".join(f"{k}={v['acc']:.2f}" for k, v in results[method].items()))
            cost_models.setdefault(COST_OF[method], (model, router, encoder, options))

    cost = measure_costs(cfg, cost_models, rows, problems, tasks, log)
    summary = summarize(results, library, held_out, chance, cost, methods)
    out = {"library": library, "held_out": held_out, "sources": {t: source_of(t) for t in tasks},
           "n_test": {t: len(rows[t]["ids"]) for t in tasks}, "chance": chance, "results": results,
           "summary": summary, "cost": cost, "routing": routing_info, "seconds": seconds,
           "settings": json.loads(cfg.to_json()), "wall_seconds": time.perf_counter() - t_start,
           "examples": {t: [dict(prompt=e.prompt, answer=e.answer) for e in problems[t][1][:2]] for t in tasks}}
    (ctx.stage_dir / "results.json").write_text(json.dumps(out, indent=1, default=float) + "\n")
    table = markdown(out, methods)
    (ctx.stage_dir / "results.md").write_text(table + "\n")
    figure(out, methods, ctx.stage_dir / "library.png")
    metrics = {f"{m}/in_library": summary[m]["in_library"] for m in methods}
    metrics.update({f"{m}/held_out": summary[m]["held_out"] for m in methods})
    return StageOutput(model=None, metrics=metrics, summary=table)


def measure_costs(cfg, cost_models, rows, problems, tasks, log) -> dict:
    """{method: {'seconds', 'ratio'}}: median jitted forward time of one (batch_size, seq_len) batch relative to
    the base (module docstring)."""
    from configurable_fm.ops import route

    cc = cfg.cost
    bs = int(cfg.batch_size)
    name = tasks[0]
    idx = np.arange(bs) % len(rows[name]["ids"])
    ids = jnp.asarray(rows[name]["ids"][idx])
    out = {}
    if "base" not in cost_models:
        return out
    for key, model in cost_models.items():
        if isinstance(model, tuple):  # a routed model: (model, router, encoder, route options)
            routed, router, encoder, options = model
            fs, exs = problems[name]
            texts = [fs.query(exs[i].prompt) for i in idx]
            rc = route.routing_cost(router, encoder, texts, routed, ids, repeats=int(cc.repeats), **options)
            out[key] = {"seconds": rc.lm + rc.embed + rc.select, "lm": rc.lm, "embed": rc.embed,
                        "select": rc.select}
            continue
        s = route.median_seconds(route.forward_call(model, ids), int(cc.repeats))
        out[key] = {"seconds": s}
    b = out["base"]["seconds"]
    for v in out.values():
        v["ratio"] = v["seconds"] / b
    tokens = ids.size
    for v in out.values():
        v["us_per_token"] = 1e6 * v["seconds"] / tokens
    log("  cost (x base): " + " ".join(f"{k}={v['ratio']:.3f}" for k, v in out.items()))
    return out


# embed_floors: the same mixed model and router as embed_routing (base rows cost no less in a batch); the
# weighted methods run every adapter on every row (ops.route.mixture), whatever the weights
COST_OF = {"base": "base", "oracle": "oracle", "best_single": "oracle", "uniform": "merged",
           "task_arithmetic": "merged", "ties": "merged", "dare_ties": "merged", "lorahub": "merged", "cat": "cat",
           "arrow": "arrow", "embed_routing": "embed_routing", "embed_floors": "embed_routing",
           "embed_uniform": "embed_weighted", "embed_soft": "embed_weighted"}


def routing_options(method: str, router, rc) -> tuple[str, dict]:
    """(model kind, route() options) of an embedding-routing method (ROUTED), with the floors and the config's
    top_k / temperature filled in."""
    kind, options = ROUTED[method]
    filled = {}
    for key, value in options.items():
        if value == "floors":
            value = router.floors
        elif key == "top_k":
            value = min(int(rc.get("top_k", 3)), len(router.names))
        elif key == "temperature":
            value = float(rc.get("temperature", 0.05))
        filled[key] = value
    return kind, filled


def summarize(results, library, held_out, chance, cost, methods) -> dict:
    out = {}
    for m in methods:
        r = results.get(m, {})
        entry = {}
        for label, names in (("in_library", library), ("held_out", held_out)):
            got = [n for n in names if n in r]
            mean, se = mean_se([r[n]["acc"] for n in got], [r[n]["n"] for n in got])
            entry[label], entry[f"{label}_se"] = (mean, se) if got else (float("nan"), float("nan"))
        c = cost.get(COST_OF[m]) or (cost.get("base") if COST_OF[m] == "merged" else None)
        entry["cost_ratio"] = c["ratio"] if c else float("nan")
        out[m] = entry
    if "oracle" in out:
        o = out["oracle"]["in_library"]
        for m in out:
            out[m]["pct_of_oracle"] = 100 * out[m]["in_library"] / o if o > 0 else float("nan")
    for label, names in (("in_library", library), ("held_out", held_out)):
        out.setdefault("chance", {})[label] = float(np.mean([chance[n]["chance"] for n in names])) if names else \
            float("nan")
    return out


def _f(x, digits=2) -> str:
    return "" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def markdown(out: Mapping, methods: Sequence[str]) -> str:
    lib, held, res, s = out["library"], out["held_out"], out["results"], out["summary"]
    tasks = lib + held
    head = ["method", "in-library mean ± SE", "% of oracle", "held-out mean ± SE", "cost × base"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for m in methods:
        e = s[m]
        lines.append(f"| {m} | {_f(e['in_library'], 3)} ± {_f(e['in_library_se'], 3)} | "
                     f"{_f(e.get('pct_of_oracle'), 1)} | {_f(e['held_out'], 3)} ± {_f(e['held_out_se'], 3)} | "
                     f"{_f(e['cost_ratio'], 3)} |")
    lines.append(f"| chance (commonest answer) | {_f(s['chance']['in_library'], 3)} | | "
                 f"{_f(s['chance']['held_out'], 3)} | |")
    per = ["", "Per task (exact match; n problems each; held-out tasks marked *):", "",
           "| method | " + " | ".join(t + ("*" if t in held else "") for t in tasks) + " |",
           "|" + "---|" * (len(tasks) + 1)]
    per.append("| n | " + " | ".join(str(out["n_test"][t]) for t in tasks) + " |")
    per.append("| source | " + " | ".join(out["sources"][t] for t in tasks) + " |")
    per.append("| chance | " + " | ".join(_f(out["chance"][t]["chance"]) for t in tasks) + " |")
    for m in methods:
        per.append(f"| {m} | " + " | ".join(_f(res.get(m, {}).get(t, {}).get("acc")) for t in tasks) + " |")
    if "best_single" in res:  # which adapter alone did best on each task
        per.append("| best_single's adapter | " + " | ".join(res["best_single"].get(t, {}).get("adapter", "")
                                                              for t in tasks) + " |")
    return "\n".join(lines + per)


def figure(out: Mapping, methods: Sequence[str], path: Path) -> None:
    s = out["summary"]
    fig, ax = plt.subplots(figsize=(8, 3.6), dpi=100)
    x = np.arange(len(methods))
    for k, (label, color) in enumerate((("in_library", "C0"), ("held_out", "C1"))):
        ys = [s[m][label] for m in methods]
        es = [s[m][f"{label}_se"] for m in methods]
        ax.bar(x + (k - 0.5) * 0.38, ys, 0.38, yerr=es, color=color, capsize=2,
               label=label.replace("_", "-") + " tasks")
        ax.axhline(s["chance"][label], color=color, ls=":", lw=1)
    ax.set_xticks(x, methods, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("mean exact match (± SE)")
    ax.set_title("Adapter library: methods on in-library and held-out tasks (dotted: chance)", fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(True, axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


register_stage("library_adapter", adapter_stage, keys=ADAPTER_KEYS)
register_stage("library_eval", eval_stage, keys=EVAL_KEYS)
