"""Capture and intervention on named tap points, and streamed reductions over them.

    tap_points(model, ids)                                   # {point: ShapeDtypeStruct}, e.g. 'layers.3.mlp.hidden'
    logits, values = capture(model, ["layers.*.mlp.hidden"], ids)
    logits = intervene(model, {"layers.0.mlp.hidden": mask([3, 7]), "layers.2.output": add(v)}, ids)
    stats = reduce_over(model, batches, {"layers.*.mlp.hidden": ["mean", CountAbove(0.0)]})
    result = trace_fact(model, tok, "The capital of {} is", "France"); plot_trace(result)   # causal tracing

taps.py names the points of every model family; capture.py, interventions.py and reduce.py hold the rest;
tracing.py is ROME's causal tracing built on them (and the layers it suggests for editing). Emergent bricks built on
them: neurons.py (activation statistics, specialisation scores, masking), moefication/ (FFNs split into experts with
routers; `moefy`) and sparsity/ (TEAL-style training-free activation sparsity; `sparsify_activations`), each
imported from its own module.
"""
from configurable_fm.analysis.batches import limited, progress_bar, token_mask
from configurable_fm.analysis.capture import capture, intervene
from configurable_fm.analysis.interventions import Add, Mask, PatchFrom, Replace, add, mask, patch_from, replace
from configurable_fm.analysis.reduce import (
    NAMED,
    CountAbove,
    Gram,
    Histogram,
    Mean,
    MeanSquare,
    Reduced,
    Reduction,
    Sum,
    Values,
    reduce_over,
)
from configurable_fm.analysis.taps import Intervention, TapError, tap_points
from configurable_fm.analysis.tracing import (Trace, causal_trace, plot_trace, subject_embedding_std, suggest_layers,
                                              trace_fact)

__all__ = ["tap_points", "capture", "intervene", "reduce_over", "Reduced", "TapError", "Intervention", "replace",
           "add", "mask", "patch_from", "Replace", "Add", "Mask", "PatchFrom", "Reduction", "Sum", "Mean",
           "MeanSquare", "Gram", "CountAbove", "Histogram", "Values", "NAMED", "token_mask", "limited",
           "progress_bar", "Trace", "causal_trace", "trace_fact", "suggest_layers", "subject_embedding_std",
           "plot_trace"]
