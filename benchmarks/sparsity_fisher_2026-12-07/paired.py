"""The Fisher-scaled score against TEAL's magnitude score, paired on the same windows, through the package
(analysis.sparsity.fisher_scales, score='scaled'): SmolLM2-135M-Instruct in float32, the down_proj inputs of every
layer, thresholds calibrated on 16,384 tokens of stdlib code (the study's calibration pool; the Fisher scales from
the same tokens), 65,536 held-out tokens of code and of English (the study's evaluation pools), every position
sparse. Rows: magnitude and Fisher (empirical, and sampled: the true Fisher) at 50% in every layer; the Fisher
scores with one threshold for all layers (the pooled 50% quantile of |h_i| s_i: the layers' levels follow from the
scores); magnitude and empirical Fisher at the per-layer levels of the KL allocation
(results/sparsity/eval65k_kl_allocated_code_calibrated_2026-12-06.json). Prints each row against dense and each
against the uniform magnitude row (paired SE), with the achieved down_proj sparsity.
ROWS (comma-separated names, default all) limits the rows; dense and magnitude always run.
    python benchmarks/sparsity_fisher_2026-12-07/paired.py [N_EVAL] [DOMAINS]   (65536 code: ~38 min, all rows)
"""
import os
import sys
import time

import jax.numpy as jnp
import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "sparsity_kl_allocation_2026-12-06"))
sys.path.insert(0, ".")
from common import study_results  # noqa: E402
from configurable_fm.analysis.sparsity import (LogBins, calibrate, evaluate, fisher_scales,  # noqa: E402
                                               perplexity_change, sparsify_activations, threshold_from_counts)
from configurable_fm.interop.loader import load_pretrained  # noqa: E402
from experiments.analysis.activation_sparsity import (batches_of, domain_documents, get_config, pools,  # noqa: E402
                                                      token_stream)

ROW_NAMES = ("fisher", "fisher_pooled", "fisher_sampled", "fisher_sampled_pooled", "magnitude_kl_allocated",
             "fisher_kl_allocated")
n_eval = sys.argv[1] if len(sys.argv) > 1 else "65536"
domains = sys.argv[2].split(",") if len(sys.argv) > 2 else ["code"]
rows = os.environ.get("ROWS", "").split(",") if os.environ.get("ROWS") else None
if len(sys.argv) > 3 or not n_eval.isdigit() or int(n_eval) < 512 or not set(domains) <= {"code", "english"} or (
        rows is not None and not set(rows) <= set(ROW_NAMES)):
    sys.exit(f"usage: paired.py [N_EVAL (an integer >= 512)] [DOMAINS (code,english)], ROWS a subset of "
             f"{','.join(ROW_NAMES)}; got {sys.argv[1:]}, ROWS={os.environ.get('ROWS', '')!r}")
n_eval = int(n_eval)
start = time.perf_counter()
say = lambda line: print(f"[{time.perf_counter() - start:5.0f} s] {line}", flush=True)  # noqa: E731
cfg = get_config()
alloc = study_results([None])["allocations"]["0.5"]
model, tok = load_pretrained(cfg.model, dtype=jnp.float32)
cal_batches = batches_of(token_stream(pools(domain_documents("code"), cfg.seed)["calibration"], tok, 16384,
                                      cfg.max_doc_tokens)[0], 512, 4)
down = [f"layers.{i}.mlp.down_proj" for i in range(model.cfg.num_layers)]
bins = LogBins(**cfg.bins.to_dict())
mcal = calibrate(model, cal_batches, down, bins=bins)
scales = fisher_scales(model, cal_batches, down, seed=cfg.seed)
fcal = calibrate(model, cal_batches, down, bins=bins, score="scaled", scales=scales)
if rows is None or any("sampled" in r for r in rows):
    sampled = fisher_scales(model, cal_batches, down, seed=cfg.seed, sampled=True)
    scal = calibrate(model, cal_batches, down, bins=bins, score="scaled", scales=sampled)
say("calibrated magnitude and Fisher-scaled scores")


def pooled(cal, p=0.5):
    """One threshold for every path: the p-quantile of the scores of all of them (equal in sizes, so summed counts)."""
    t = threshold_from_counts(sum(cal.counts[q] for q in down), cal.bins, p, "pooled")
    return {q: t for q in down}


uniform = {p: 0.5 for p in down}
build = {"dense": lambda: sparsify_activations(model, {p: -1.0 for p in down}),
         "magnitude": lambda: sparsify_activations(model, mcal.thresholds(uniform)),
         "fisher": lambda: sparsify_activations(model, fcal.thresholds(uniform), score="scaled", scales=scales),
         "fisher_pooled": lambda: sparsify_activations(model, pooled(fcal), score="scaled", scales=scales),
         "fisher_sampled": lambda: sparsify_activations(model, scal.thresholds(uniform), score="scaled",
                                                        scales=sampled),
         "fisher_sampled_pooled": lambda: sparsify_activations(model, pooled(scal), score="scaled", scales=sampled),
         "magnitude_kl_allocated": lambda: sparsify_activations(model, mcal.thresholds(alloc)),
         "fisher_kl_allocated": lambda: sparsify_activations(model, fcal.thresholds(alloc), score="scaled",
                                                             scales=scales)}
models = {k: f() for k, f in build.items() if rows is None or k in ("dense", "magnitude", *rows)}
for d in domains:
    data = batches_of(token_stream(pools(domain_documents(d), cfg.seed)["evaluation"], tok, n_eval,
                                   cfg.max_doc_tokens)[0], 512, 4)
    ev = {name: evaluate(m, data) for name, m in models.items()}
    say(f"{d}: {ev['dense'].scored_tokens()} held-out tokens, dense perplexity {ev['dense'].perplexity():.4f}")
    for name, e in ev.items():
        if name == "dense":
            continue
        c, se = perplexity_change(e, ev["dense"])
        line = (f"  {d:7s} {name:24s} {100 * c:+.3f}% ± {100 * se:.3f} at "
                f"{np.mean(list(e.sparsity().values())):.4f} achieved")
        if name != "magnitude":
            pc, pse = perplexity_change(e, ev["magnitude"])
            line += f"; against magnitude (paired) {100 * pc:+.3f} ± {100 * pse:.3f} points"
        print(line, flush=True)
