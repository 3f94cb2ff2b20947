"""Does keeping the first P positions of each window dense (attention-sink tokens) cut the cost of 50% down_proj
sparsity? SmolLM2-135M-Instruct, thresholds from 16,384 tokens of stdlib code, N held-out code tokens (argv[1]),
P = 0, 1, 2, 4; every position scored, paired with the dense model on the same windows.
    python benchmarks/sparsity_kl_allocation_2026-12-06/sink_prefix.py 16384    (~4.5 min on the 2-core CPU)
"""
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import code_setup  # noqa: E402
from configurable_fm.analysis.sparsity import evaluate, perplexity_change, sparsify_activations  # noqa: E402

if len(sys.argv) != 2 or not sys.argv[1].isdigit() or int(sys.argv[1]) < 1024:
    sys.exit("usage: sink_prefix.py N  (N held-out code tokens, an integer >= 1024)")
model, cal, down, dense_t, data = code_setup(int(sys.argv[1]))
dense = evaluate(sparsify_activations(model, dense_t), data)
sparse = sparsify_activations(model, {**dense_t, **cal.thresholds({q: 0.5 for q in down})})
for prefix in (0, 1, 2, 4):
    ev = evaluate(sparse, data, dense_prefix=prefix)
    change, se = perplexity_change(ev, dense, start=0)
    print(f"dense prefix {prefix}: {100 * change:.3f} ± {100 * se:.3f}, down_proj sparsity "
          f"{np.mean([ev.sparsity()[q] for q in down]):.4f}", flush=True)
