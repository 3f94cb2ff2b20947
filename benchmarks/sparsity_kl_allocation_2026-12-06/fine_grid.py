"""The KL allocation on a finer grid, without new sensitivity forwards: the per-layer KL curves of a results.json
(`sensitivity.increase`, measured at 0.3, 0.4, ..., 0.8) interpolated linearly in log KL to a 0.05 grid, allocated
at a mean of 50% (allocation.allocate_levels), then measured as paired.py measures: 65,536 held-out code tokens,
code thresholds from 16,384 tokens, every position sparse, against uniform 50% on the same windows.
    python benchmarks/sparsity_kl_allocation_2026-12-06/fine_grid.py [RESULTS_JSON]    (~9 min on the 2-core CPU)
"""
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import code_setup, evaluate_levels, study_results  # noqa: E402
from configurable_fm.analysis.sparsity import (allocate_levels, evaluate, perplexity_change,  # noqa: E402
                                               sparsify_activations)

measured = study_results(sys.argv)["sensitivity"]["increase"]
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
model, cal, down, dense_t, data = code_setup(65536)
uniform = evaluate_levels(model, cal, dense_t, data, {q: 0.5 for q in down})
allocated = evaluate_levels(model, cal, dense_t, data, alloc)
dense = evaluate(sparsify_activations(model, dense_t), data)
change, se = perplexity_change(allocated, uniform)
print("fine-grid allocated vs uniform (paired):", f"{100 * change:.3f} ± {100 * se:.3f}")
for name, ev in (("uniform", uniform), ("fine-grid allocated", allocated)):
    c, s = perplexity_change(ev, dense)
    print(name, f"{100 * c:.3f} ± {100 * s:.3f}, down_proj sparsity {np.mean([ev.sparsity()[q] for q in down]):.4f}")
