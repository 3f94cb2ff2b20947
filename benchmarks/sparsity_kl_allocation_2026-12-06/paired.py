"""The KL allocation against uniform thresholds, paired on the same windows: SmolLM2-135M-Instruct, thresholds
calibrated on 16,384 tokens of stdlib code (the study's pools), the down_proj inputs at 50% uniformly and at the
per-layer levels of a results.json's `allocations['0.5']`, 65,536 held-out code tokens, every position sparse.
Prints the allocated model's perplexity change against the uniform one (paired SE), then each against dense.
    python benchmarks/sparsity_kl_allocation_2026-12-06/paired.py [RESULTS_JSON]    (~9 min on the 2-core CPU)
"""
import json
import sys

import jax.numpy as jnp

sys.path.insert(0, ".")
from configurable_fm.analysis.sparsity import (LogBins, calibrate, evaluate, perplexity_change,  # noqa: E402
                                               sparsify_activations)
from configurable_fm.interop.loader import load_pretrained  # noqa: E402
from experiments.analysis.activation_sparsity import (batches_of, domain_documents, get_config, pools,  # noqa: E402
                                                      token_stream)

path = sys.argv[1] if len(sys.argv) > 1 else "results/sparsity/eval65k_kl_allocated_code_calibrated_2026-12-06.json"
alloc = json.load(open(path))["allocations"]["0.5"]
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
change, se = perplexity_change(allocated, uniform)
dense = evaluate(sparsify_activations(model, dense_t), data)
print("allocated vs uniform (paired):", f"{100 * change:.3f} ± {100 * se:.3f}")
for name, ev in (("uniform", uniform), ("allocated", allocated)):
    c, s = perplexity_change(ev, dense)
    print(name, f"{100 * c:.3f} ± {100 * s:.3f}")
