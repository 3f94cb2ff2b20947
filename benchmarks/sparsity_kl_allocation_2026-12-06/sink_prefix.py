"""Does keeping the first P positions of each window dense (attention-sink tokens) cut the cost of 50% down_proj
sparsity? SmolLM2-135M-Instruct, thresholds from 16,384 tokens of stdlib code, N held-out code tokens (argv[1]),
P = 0, 1, 2, 4; every position scored, paired with the dense model on the same windows.
    python benchmarks/sparsity_kl_allocation_2026-12-06/sink_prefix.py 16384    (~4.5 min on the 2-core CPU)
"""
import sys

import jax.numpy as jnp
import numpy as np

sys.path.insert(0, ".")
from configurable_fm.analysis.sparsity import (LogBins, calibrate, evaluate, perplexity_change,  # noqa: E402
                                               sparsify_activations)
from configurable_fm.interop.loader import load_pretrained  # noqa: E402
from experiments.analysis.activation_sparsity import (batches_of, domain_documents, get_config, pools,  # noqa: E402
                                                      token_stream)

cfg = get_config()
model, tok = load_pretrained(cfg.model, dtype=jnp.float32)
split = pools(domain_documents("code"), cfg.seed)
cal_tokens, _ = token_stream(split["calibration"], tok, 16384, cfg.max_doc_tokens)
ev_tokens, _ = token_stream(split["evaluation"], tok, int(sys.argv[1]), cfg.max_doc_tokens)
cal = calibrate(model, batches_of(cal_tokens, 512, 4), bins=LogBins(**cfg.bins.to_dict()))
down = [p for p in cal.paths if p.endswith("down_proj")]
dense_t = {p: -1.0 for p in cal.paths}
data = batches_of(ev_tokens, 512, 4)
dense = evaluate(sparsify_activations(model, dense_t), data)
sparse = sparsify_activations(model, {**dense_t, **cal.thresholds({q: 0.5 for q in down})})
for prefix in (0, 1, 2, 4):
    ev = evaluate(sparse, data, dense_prefix=prefix)
    change, se = perplexity_change(ev, dense, start=0)
    print(f"dense prefix {prefix}: {100 * change:.3f} ± {100 * se:.3f}, down_proj sparsity "
          f"{np.mean([ev.sparsity()[q] for q in down]):.4f}", flush=True)
