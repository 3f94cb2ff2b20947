"""Training-free activation sparsity (TEAL, Liu et al. 2024): the inputs of a model's Linears pruned by magnitude.

    from configurable_fm.analysis.sparsity import calibrate, sparsify_activations, evaluate, desparsify
    cal = calibrate(model, batches)                              # |x| histograms at each targeted Linear's input
    sparse = sparsify_activations(model, cal.thresholds(0.5))   # each Linear zeroes the entries with |x| <= t_0.5
    ev = evaluate(sparse, heldout)                               # perplexity; achieved sparsity per Linear
    dense = desparsify(sparse)

Modules: module.py (the SparseLinear extension of kind 'activation_sparsity', sparsify_activations, desparsify,
target paths); calibration.py (streamed |x| histograms with log-spaced bins, quantile thresholds); measure.py
(perplexity and achieved sparsity in one pass); fisher.py (per-input scales sqrt(E[(dL/dx_i)^2]) for the
'scaled' score); greedy.py (TEAL's block-wise greedy allocation); allocation.py
(levels shared among blocks by measured sensitivity: an exact knapsack over each Linear's loss increase). Importing this
package registers the extension kind, so orbax checkpoints of sparsified models load after
`import configurable_fm.analysis.sparsity`.
"""
from configurable_fm.analysis.sparsity.calibration import (AbsHistogram, Calibration, LogBins, calibrate,
                                                           check_sparsity, fraction_from_counts, shared_inputs,
                                                           threshold_from_counts)
from configurable_fm.analysis.sparsity.allocation import Sensitivity, allocate_levels, sensitivity
from configurable_fm.analysis.sparsity.fisher import fisher_scales
from configurable_fm.analysis.sparsity.greedy import blocks_of, greedy_allocation
from configurable_fm.analysis.sparsity.measure import (Evaluation, evaluate, mean_kl, next_token_logits,
                                                      perplexity_change)
from configurable_fm.analysis.sparsity.module import (DEFAULT_TARGETS, FFN_TARGETS, KIND, SCORES, SparseLinear,
                                                      SparsityError, SparsityScale, SparsityThreshold, desparsify,
                                                      family_of, resolve_targets, scales_of, sparse_linears,
                                                      sparsify_activations, thresholds_of)

__all__ = ["calibrate", "Calibration", "LogBins", "AbsHistogram", "threshold_from_counts", "fraction_from_counts",
           "check_sparsity", "shared_inputs", "greedy_allocation", "blocks_of", "sensitivity", "Sensitivity",
           "allocate_levels", "evaluate", "perplexity_change", "Evaluation", "mean_kl", "next_token_logits",
           "sparsify_activations", "desparsify", "thresholds_of", "scales_of", "fisher_scales", "sparse_linears",
           "resolve_targets", "SparseLinear", "SparsityThreshold", "SparsityScale", "SparsityError", "KIND",
           "DEFAULT_TARGETS", "FFN_TARGETS", "SCORES", "family_of"]
