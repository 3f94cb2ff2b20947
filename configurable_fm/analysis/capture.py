"""Capture the values at tap points of one forward, and run forwards under interventions.

    logits, values = capture(model, ["layers.*.mlp.hidden", "layers.3.output"], ids)
    values["layers.0.mlp.hidden"]                                   # (B, T, F), in forward order
    logits = intervene(model, {"layers.0.mlp.hidden": mask([3, 7])}, ids)
    logits, values = capture(model, "layers.5.output", ids, interventions={"layers.2.output": add(v)})

`call` is the forward: token ids (B, T), run as `model(ids)`, or any function `model -> output` (e.g.
`lambda m: m(ids, attention_mask=am)`, `lambda m: m.pooled(ids)`). Points are glob patterns over the dotted tap
point names (analysis/taps.py lists them; `tap_points(model, ids)` shows them with shapes); each pattern must
match at least one point, else a TapError lists close matches.

Both are pure functions of (model, inputs): nothing is modified, so they compose with JAX transforms when the
capture is entered inside the transformed function:

    @jax.jit
    def hidden(state, ids):
        return capture(nnx.merge(graphdef, state), "layers.*.mlp.hidden", ids)[1]

    def loss(v):                                                    # editing: optimise an added vector
        logits = intervene(model, {"layers.5.mlp.output": add(v, positions=-1)}, ids)
        return next_token_nll(logits, targets).mean()
    grad = jax.grad(loss)(v0)

For statistics over many batches use `reduce_over` (analysis/reduce.py), which reduces inside one jitted step
per batch instead of returning every value.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import jax
from flax import nnx

from configurable_fm.analysis.taps import Session, TapError, intervention_items, patterns_of, run_session


def capture(model: nnx.Module, points: str | Sequence[str], call, *,
            interventions: Mapping[str, Any] | None = None) -> tuple[Any, dict[str, jax.Array]]:
    """(output of the forward, {point: value} of every tap point matching `points`, in forward order).

    model: the nnx model the forward runs (its sub-modules are the ones tapped). points: a glob or a list of
    them. call: token ids (B, T) or a function model -> output. interventions: {glob: Intervention or
    fn(value) -> value} applied during the same forward; a captured point holds its value after them.
    Raises TapError when a pattern matches nothing, or a matched point is computed twice in the forward.
    """
    patterns = patterns_of(points, "capture")
    if not patterns:
        raise TapError("capture: no points given")
    items = intervention_items(interventions, "capture")
    values: dict[str, jax.Array] = {}

    def record(point: str, value):
        if point in values:
            raise TapError(f"capture: {point} is computed twice in one forward (the call runs its module twice); "
                           "capture one forward at a time, or use reduce_over, which adds up repeats")
        values[point] = value

    out, _ = run_session(model, call, lambda m: Session(m, what="capture", record_patterns=patterns, record=record,
                                                        interventions=items))
    return out, values


def intervene(model: nnx.Module, interventions: Mapping[str, Any], call) -> Any:
    """The output of the forward `call` with every point matching a glob of `interventions` replaced by
    `fn(value)` (an Intervention: replace, add, mask, patch_from; or a function value -> value of the same
    shape). Interventions matching one point apply in the mapping's order. Raises TapError when a glob
    matches no point or an intervention does not fit its point (shape, positions, neurons)."""
    items = intervention_items(interventions, "intervene")
    if not items:
        raise TapError("intervene: no interventions given")
    out, _ = run_session(model, call, lambda m: Session(m, what="intervene", interventions=items))
    return out
