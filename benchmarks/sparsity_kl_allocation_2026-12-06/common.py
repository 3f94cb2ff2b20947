"""The setup the scripts of this folder share: SmolLM2-135M-Instruct in float32, its down_proj thresholds calibrated
on 16,384 tokens of stdlib code (the study's calibration pool, experiments/analysis/activation_sparsity.py), and
`n_eval` held-out code tokens from the evaluation pool as 512-token windows, 4 a batch."""
import json
import sys
from pathlib import Path

import jax.numpy as jnp

sys.path.insert(0, ".")
from configurable_fm.analysis.sparsity import LogBins, calibrate, evaluate, sparsify_activations  # noqa: E402
from configurable_fm.interop.loader import load_pretrained  # noqa: E402
from experiments.analysis.activation_sparsity import (batches_of, domain_documents, get_config, pools,  # noqa: E402
                                                      token_stream)

RESULTS = "results/sparsity/eval65k_kl_allocated_code_calibrated_2026-12-06.json"


def code_setup(n_eval: int):
    """(model, calibration, down_proj paths, thresholds {path: -1} (dense), evaluation batches)."""
    cfg = get_config()
    model, tok = load_pretrained(cfg.model, dtype=jnp.float32)
    split = pools(domain_documents("code"), cfg.seed)
    cal_tokens, _ = token_stream(split["calibration"], tok, 16384, cfg.max_doc_tokens)
    ev_tokens, _ = token_stream(split["evaluation"], tok, n_eval, cfg.max_doc_tokens)
    cal = calibrate(model, batches_of(cal_tokens, 512, 4), bins=LogBins(**cfg.bins.to_dict()))
    down = [p for p in cal.paths if p.endswith("down_proj")]
    return model, cal, down, {p: -1.0 for p in cal.paths}, batches_of(ev_tokens, 512, 4)


def evaluate_levels(model, cal, dense_t, data, levels):
    """evaluate() of the model with the down_proj thresholds of `levels` ({path: level})."""
    return evaluate(sparsify_activations(model, {**dense_t, **cal.thresholds(levels)}), data)


def study_results(argv) -> dict:
    """The study's results.json named by argv[1] (default RESULTS), or exit with a one-line message."""
    path = Path(argv[1] if len(argv) > 1 else RESULTS)
    try:
        results = json.loads(path.read_text())
        results["sensitivity"]["increase"], results["allocations"]["0.5"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        sys.exit(f"{path}: not a results.json of the activation-sparsity study with a KL allocation at 0.5 "
                 f"({type(e).__name__}: {e})")
    return results
