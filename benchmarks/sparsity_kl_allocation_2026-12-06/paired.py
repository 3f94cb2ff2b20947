"""The KL allocation against uniform thresholds, paired on the same windows: SmolLM2-135M-Instruct, thresholds
calibrated on 16,384 tokens of stdlib code (the study's pools), the down_proj inputs at 50% uniformly and at the
per-layer levels of a results.json's `allocations['0.5']`, 65,536 held-out code tokens, every position sparse.
Prints the allocated model's perplexity change against the uniform one (paired SE), then each against dense.
    python benchmarks/sparsity_kl_allocation_2026-12-06/paired.py [RESULTS_JSON]    (~9 min on the 2-core CPU)
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import code_setup, evaluate_levels, study_results  # noqa: E402
from configurable_fm.analysis.sparsity import evaluate, perplexity_change, sparsify_activations  # noqa: E402

alloc = study_results(sys.argv)["allocations"]["0.5"]
model, cal, down, dense_t, data = code_setup(65536)
uniform = evaluate_levels(model, cal, dense_t, data, {q: 0.5 for q in down})
allocated = evaluate_levels(model, cal, dense_t, data, alloc)
change, se = perplexity_change(allocated, uniform)
dense = evaluate(sparsify_activations(model, dense_t), data)
print("allocated vs uniform (paired):", f"{100 * change:.3f} ± {100 * se:.3f}")
for name, ev in (("uniform", uniform), ("allocated", allocated)):
    c, s = perplexity_change(ev, dense)
    print(name, f"{100 * c:.3f} ± {100 * s:.3f}")
