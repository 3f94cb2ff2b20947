"""RegMean (Jin et al., ICLR 2023, arXiv 2212.09849): merge each linear layer by regression on its inputs.

    grams_a, n_a = gram_matrices(model_a, batches)     # {kernel path: G (in, in) float32}, number of tokens
    grams_b, n_b = gram_matrices(model_b, batches)
    merged = regmean_merge([model_a, model_b], [grams_a, grams_b], alpha=0.9)     # {path: array}

Gram matrices. For every `layers.Linear` module of the model (found by type, wherever it sits: for llama the
q/k/v/o projections, gate/up/down, the lm_head when untied, a MoE router; a tied head is `Embed.attend`, not a
Linear, so it has no Gram) the input x (D_in,) seen at each scored token position of its own forward gives
    G = sum_{b, t: m_bt = 1} x_bt x_bt^T        (D_in, D_in), float32 products and sums
(a Linear called several times in one forward adds up every call). Token mask m: 'attention_mask' (B, L) when
the batch has one; else with a loss_mask the positions t <= the row's last scored position (task rows: the
prompt and the answer, not the right padding), else every position; times the row mask 'mask' (B,)
(`analysis.token_mask`). The forward is `model(inputs)` as in training (causal attention: right padding does not
change the real positions). The Grams are the analysis layer's streamed reduction `Gram()` of the tap points
`<linear path>.input` (`analysis.reduce_over`: one jitted step per batch, the Gram computed where the input is
produced, float32 products at precision HIGHEST, summed over batches on the device); nothing is modified.

Merge of M models, for each Linear kernel W_i (D_in, D_out) with Gram G_i (and model weights w_i, default 1):
    G_i' = alpha G_i + (1 - alpha) diag(G_i)       (shrinks the off-diagonal entries; alpha = 1: plain RegMean)
    W*   = (sum_i w_i G_i')^{-1} sum_i w_i G_i' W_i,
the minimiser of sum_i w_i ||X_i W - X_i W_i||^2 for alpha = 1 (X_i the stacked inputs, G_i = X_i^T X_i).
Solved with numpy in float64 on the host (Grams of LM activations are badly conditioned, float32 solves lose
digits); an input feature j that no model ever activates (sum_i w_i G_i'[j, j] = 0) does not enter the
objective: its row of W* is the weighted average of the W_i rows, the other rows solve the reduced system.
Every other tensor (embeddings, norms, biases, tied heads, MoE expert stacks) is the weighted average
sum_i w_i theta_i / sum_i w_i. Results take the first model's dtypes.
"""
from __future__ import annotations

from typing import Any, Iterable, Mapping, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from configurable_fm.analysis.batches import token_mask  # noqa: F401  (re-exported: RegMean's token mask)
from configurable_fm.analysis.reduce import Gram, reduce_over
from configurable_fm.bricks.paths import path_str
from configurable_fm.checks import is_real
from configurable_fm.models.layers import Linear
from configurable_fm.ops.merge.inputs import copy_exact, float32_tree, model_weights, names_and_flats
from configurable_fm.ops.merge.tree import MergeInputError, check_inputs

State = Union[Mapping[str, Any], nnx.Module]


def linear_kernel_paths(model: nnx.Module) -> list[str]:
    """Kernel paths of every `layers.Linear` in `model`, in module order (e.g. 'layers.0.self_attn.q_proj.kernel')."""
    return [_kernel_path(p) for p, m in nnx.iter_modules(model) if isinstance(m, Linear)]


def _kernel_path(module_path) -> str:
    return f"{path_str(module_path)}.kernel" if module_path else "kernel"


def gram_matrices(model: nnx.Module, batches: Iterable[Mapping[str, Any]], *, max_batches: Optional[int] = None,
                  progress: bool = True) -> tuple[dict[str, jax.Array], int]:
    """({kernel path: G (D_in, D_in) float32}, number of masked-in token positions) (module docstring).

    model: an nnx model called as model(ids (B, L)) whose linear maps are `layers.Linear`; not modified.
    batches: pipeline dicts {'inputs', 'targets'?, 'loss_mask'?, 'mask'?, 'attention_mask'?}; the first
      `max_batches` are used. Parameters are cast to float32 for the forward. Keys follow the order of
      `linear_kernel_paths(model)` (that of flat_params); a Linear the forward never calls is an error naming
      its input point (analysis.TapError).
    """
    modules = [p for p, m in nnx.iter_modules(model) if isinstance(m, Linear)]
    if not modules:
        raise ValueError(f"gram_matrices: {type(model).__name__} has no layers.Linear module")
    inputs = {f"{path_str(p)}.input" if p else "input": _kernel_path(p) for p in modules}
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    model32 = nnx.merge(graphdef, float32_tree(params), rest)
    stats = reduce_over(model32, batches, {point: Gram() for point in inputs}, max_batches=max_batches,
                        progress=progress, desc="gram_matrices")
    return {kernel: stats[point]["gram"] for point, kernel in inputs.items()}, stats.tokens


# ------------------------------------------------------------------------------------------ merge
def _solve(path: str, a: np.ndarray, b: np.ndarray, fallback: np.ndarray) -> np.ndarray:
    """a^{-1} b (float64), rows of features with a zero diagonal (never active) taken from `fallback`."""
    active = np.diag(a) > 0
    out = np.array(fallback, np.float64)
    if not active.any():
        return out
    idx = np.flatnonzero(active)
    try:
        out[idx] = np.linalg.solve(a[np.ix_(idx, idx)], b[idx])
    except np.linalg.LinAlgError:
        raise np.linalg.LinAlgError(f"regmean_merge: {path}: the summed Gram matrix is singular (the inputs span "
                                    "fewer directions than the layer has features); use alpha < 1 or more "
                                    "data") from None
    if not np.all(np.isfinite(out)):
        raise np.linalg.LinAlgError(f"regmean_merge: {path}: the solve gave non-finite values")
    return out


def regmean_merge(models: Union[Sequence[State], Mapping[str, State]], grams: Sequence[Mapping[str, Any]], *,
                  alpha: float = 0.9, weights: Optional[Sequence[float]] = None) -> dict[str, jax.Array]:
    """W* = (sum_i w_i G_i')^{-1} sum_i w_i G_i' W_i per Linear kernel, weighted averages elsewhere (module doc).

    models: M flat {path: array} dicts or nnx modules (a list or {name: model}); grams: one {kernel path:
      G (D_in, D_in)} per model (e.g. gram_matrices(...)[0]). The kernels solved are the union of the Gram
      keys, plus every layers.Linear kernel of the models that are nnx modules; each must have a Gram in every
      model, of shape (D_in, D_in) for a 2-D kernel (D_in, D_out).
    alpha: in [0, 1], the weight of the off-diagonal Gram entries. weights: (M,) >= 0, default 1.
    Returns a flat dict in the first model's order and dtypes. Raises MergeInputError naming the tensor and
    model (missing/mis-shaped Gram, mismatched models), np.linalg.LinAlgError naming a singular tensor.
    """
    if isinstance(models, Mapping):
        modules = [m for m in models.values() if isinstance(m, nnx.Module)]
    else:
        modules = [m for m in models if isinstance(m, nnx.Module)]
    names, flats = names_and_flats(models, "regmean_merge")
    n = len(flats)
    if len(grams) != n:
        raise ValueError(f"regmean_merge: {len(grams)} Gram dicts for {n} models {names}")
    if not is_real(alpha) or not 0.0 <= alpha <= 1.0:
        raise ValueError(f"regmean_merge: alpha must be a number in [0, 1], got {alpha!r}")
    w = model_weights(weights, n, "regmean_merge")
    check_inputs(names, flats, vocab_tensors=(), embed_alignment=None, has_base=False)
    ref = flats[0]
    solved = list(dict.fromkeys([p for g in grams for p in g] + [p for m in modules for p in linear_kernel_paths(m)]))
    problems = []
    for p in solved:
        if p not in ref:
            problems.append(f"Gram for {p}, which is not a tensor of the models")
            continue
        shape = tuple(np.shape(ref[p]))
        if len(shape) != 2:
            problems.append(f"{p} has a Gram but is {shape}, not a 2-D kernel (D_in, D_out)")
            continue
        for name, g in zip(names, grams):
            if p not in g:
                problems.append(f"the Grams of {name} lack {p}")
            elif tuple(np.shape(g[p])) != (shape[0], shape[0]):
                problems.append(f"Gram {p} of {name} is {tuple(np.shape(g[p]))}, expected {(shape[0], shape[0])} "
                                f"for the kernel {shape}")
    if problems:
        raise MergeInputError("regmean_merge: " + "; ".join(problems))
    solved_set = set(solved)
    out = {}
    for p, v in ref.items():
        dtype = jnp.asarray(v).dtype
        if not jnp.issubdtype(dtype, jnp.floating):
            out[p] = copy_exact(p, [f[p] for f in flats], names)
            continue
        xs = [np.asarray(jnp.asarray(f[p], jnp.float32), np.float64) for f in flats]
        average = sum(wi * x for wi, x in zip(w, xs)) / w.sum()
        if p not in solved_set:
            out[p] = jnp.asarray(average, dtype)
            continue
        a = np.zeros((xs[0].shape[0],) * 2)
        b = np.zeros_like(xs[0])
        for wi, g, x in zip(w, grams, xs):
            g = np.asarray(jnp.asarray(g[p], jnp.float32), np.float64)
            g_reg = alpha * g + (1.0 - alpha) * np.diag(np.diag(g))
            a += wi * g_reg
            b += wi * (g_reg @ x)
        out[p] = jnp.asarray(_solve(p, a, b, average), dtype)
    return out
