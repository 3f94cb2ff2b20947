"""The KL allocation on a finer grid, without new sensitivity forwards: the per-layer KL curves of a results.json
(`sensitivity.increase`, measured at 0.3, 0.4, ..., 0.8) interpolated linearly in log KL to a 0.05 grid, allocated
at a mean of 50% (allocation.allocate_levels), then measured as paired.py measures: 65,536 held-out code tokens,
code thresholds from 16,384 tokens, every position sparse, against uniform 50% on the same windows.
    python benchmarks/sparsity_kl_allocation_2026-12-06/fine_grid.py [RESULTS_JSON]    (~9 min on the 2-core CPU)
"""
import json
import sys

import jax.numpy as jnp
import numpy as np

sys.path.insert(0, ".")
from configurable_fm.analysis.sparsity import (LogBins, allocate_levels, calibrate, evaluate,  # noqa: E402
                                               perplexity_change, sparsify_activations)
from configurable_fm.interop.loader import load_pretrained  # noqa: E402
from experiments.analysis.activation_sparsity import (batches_of, domain_documents, get_config, pools,  # noqa: E402
                                                      token_stream)

path = sys.argv[1] if len(sys.argv) > 1 else "results/sparsity/eval65k_kl_allocated_code_calibrated_2026-12-06.json"
measured = json.load(open(path))["sensitivity"]["increase"]
grid = np.round(np.arange(0.30, 0.801, 0.05), 2)
fine = {}
for layer, curve in measured.items():
    levels = np.array(sorted(float(p) for p in curve))
    logs = np.log([curve[str(p)] for p in levels])  # JSON keys: "0.3", ..., "0.8"
    fine[layer] = {float(p): float(np.exp(np.interp(p, levels, logs))) for p in grid}
alloc = allocate_levels(fine, 0.5)
print("predicted summed KL: uniform", round(sum(v[0.5] for v in fine.values()), 5), "allocated",
      round(sum(fine[q][alloc[q]] for q in alloc), 5))
print("levels:", ", ".join(f"{q.split('.')[1]}: {p:.2f}" for q, p in alloc.items()), flush=True)
cfg = get_config()
model, tok = load_pretrained(cfg.model, dtype=jnp.float32)
split = pools(domain_documents("code"), cfg.seed)
cal_tokens, _ = token_stream(split["calibration"], tok, 16384, cfg.max_doc_tokens)
ev_tokens, _ = token_stream(split["evaluation"], tok, 65536, cfg.max_doc_tokens)
cal = calibrate(model, batches_of(cal_tokens, 512, 4), bins=LogBins(**cfg.bins.to_dict()))
down = [p for p in cal.paths if p.endswith("down_proj")]
dense_t = {p: -1.0 for p in cal.paths}
data = batches_of(ev_tokens, 512, 4)
uniform = evaluate(sparsify_activations(model, {**dense_t, **cal.thresholds({q: 0.5 for q in down})}), data)
allocated = evaluate(sparsify_activations(model, {**dense_t, **cal.thresholds(alloc)}), data)
dense = evaluate(sparsify_activations(model, dense_t), data)
change, se = perplexity_change(allocated, uniform)
print("fine-grid allocated vs uniform (paired):", f"{100 * change:.3f} ± {100 * se:.3f}")
for name, ev in (("uniform", uniform), ("fine-grid allocated", allocated)):
    c, s = perplexity_change(ev, dense)
    print(name, f"{100 * c:.3f} ± {100 * s:.3f}, down_proj sparsity {np.mean([ev.sparsity()[q] for q in down]):.4f}")
