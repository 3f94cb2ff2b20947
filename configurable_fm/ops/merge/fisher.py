"""Fisher merging (Matena & Raffel, 2022, arXiv 2111.09832): a per-parameter precision-weighted average.

    F_a = diagonal_fisher(model_a, batches, kind="empirical")             # {path: F (shape of the parameter)}
    F_b = diagonal_fisher(model_b, batches, kind="sampled", key=jax.random.key(0))
    merged = fisher_merge([model_a, model_b], [F_a, F_b])                   # {path: array}

Diagonal Fisher of a causal LM over N examples (rows of the batches):
    F = (1/N) sum_n g_n * g_n,   g_n = grad_theta log p_theta(y_n | x_n),
    log p_theta(y_n | x_n) = sum_t w_nt log softmax(model(inputs_n))[t, y_nt]      (one row, its own forward)
with w_nt = loss_mask (1 where the batch has none) times the row mask 'mask' of padded evaluation batches. A row
counts as an example when some w_nt > 0 (padding rows and rows without scored tokens are not examples).
    kind='empirical': y_nt = targets_nt (the dataset's next tokens);
    kind='sampled'  : y_nt ~ softmax(logits_nt) drawn independently at every position from the model's own
                      teacher-forced prediction (inputs fixed), one draw per example, with the key
                      jax.random.fold_in(jax.random.fold_in(key, batch_index), row_index) given to
                      jax.random.categorical(., logits_n (L, V)) (batch_index counts the batches from 0).
Per-example gradients are exact (one example per forward, `chunk` examples at a time under vmap, scanned over
the batch; memory ~ (chunk + 2) x the parameters), with the parameters cast to float32 and float32 sums,
jit-compiled once per (model structure, batch shape, kind, chunk); a tqdm bar counts the batches.

Fisher merge of M models (elementwise, per tensor):
    theta* = sum_i w_i F~_i theta_i / sum_i w_i F~_i,   F~_i = c_i max(F_i, fisher_floor),
    c_i = 1 / sum_{all tensors p, entries} F_i[p]   if normalize (each model's Fisher sums to 1), else 1.
The floor keeps entries where every Fisher is 0 defined (they become the w-weighted average of the thetas). It
applies to the raw Fisher, as in Matena & Raffel's code (mmatena/model_merging), not to the normalised one, whose
entries average 1 / (number of entries): ~1e-8 for a 100M-parameter model, so a floor of 1e-6 there would floor
nearly every entry and return the weighted average. (Their code normalises by the L2 norm; here the sum.)
"""
from __future__ import annotations

import functools
from typing import Any, Iterable, Literal, Mapping, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from configurable_fm.analysis.batches import limited, progress_bar
from configurable_fm.bricks.paths import flat_params
from configurable_fm.checks import is_int
from configurable_fm.models.scoring import next_token_nll
from configurable_fm.ops.merge.inputs import copy_exact, float32_tree, model_weights, names_and_flats
from configurable_fm.ops.merge.tree import MergeInputError, check_inputs

FisherKind = Literal["empirical", "sampled"]
State = Union[Mapping[str, Any], nnx.Module]


# ------------------------------------------------------------------------------------------ batches
def batch_arrays(batch: Mapping[str, Any], where: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(inputs int32 (B, L), targets int32 (B, L), weights float32 (B, L)) of a pipeline batch.

    weights = loss_mask (ones without one) * mask[:, None] (the row mask of padded evaluation batches)."""
    missing = [k for k in ("inputs", "targets") if k not in batch]
    if missing:
        raise KeyError(f"{where} lacks {missing}; it has {sorted(batch)} (batches are dicts with inputs, targets "
                       "and optionally loss_mask and mask, as configurable_fm.data.pipeline yields them)")
    inputs, targets = np.asarray(batch["inputs"]), np.asarray(batch["targets"])
    if inputs.ndim != 2 or targets.shape != inputs.shape:
        raise ValueError(f"{where}: inputs {inputs.shape} and targets {targets.shape} must both be (B, L)")
    w = np.ones(inputs.shape, np.float32)
    if "loss_mask" in batch:
        lm = np.asarray(batch["loss_mask"], np.float32)
        if lm.shape != inputs.shape:
            raise ValueError(f"{where}: loss_mask is {lm.shape} but inputs are {inputs.shape}")
        w = w * lm
    if "mask" in batch:
        rm = np.asarray(batch["mask"], np.float32)
        if rm.shape != inputs.shape[:1]:
            raise ValueError(f"{where}: mask is {rm.shape} but the batch has {inputs.shape[0]} rows")
        w = w * rm[:, None]
    return inputs.astype(np.int32), targets.astype(np.int32), w


# ------------------------------------------------------------------------------------------ Fisher
@functools.partial(jax.jit, static_argnames=("graphdef", "kind", "chunk"))
def _squared_grad_sums(graphdef, params, rest, inputs, targets, weights, row_keys, *, kind, chunk):
    """sum_n g_n * g_n over the rows of one batch (B a multiple of chunk), as a params-shaped State."""

    def loglik(p, x_L, y_L, w_L, key):
        model = nnx.merge(graphdef, p, rest)
        logits = model(x_L[None])[0].astype(jnp.float32)  # (L, V)
        if kind == "sampled":
            y_L = jax.random.categorical(key, jax.lax.stop_gradient(logits), axis=-1)
        return -jnp.sum(next_token_nll(logits, y_L) * w_L)

    per_example = jax.vmap(jax.grad(loglik), in_axes=(None, 0, 0, 0, 0))
    b, l = inputs.shape
    split = lambda a: a.reshape((b // chunk, chunk) + a.shape[1:])  # noqa: E731

    def body(acc, xs):
        grads = per_example(params, *xs)
        return jax.tree.map(lambda a, g: a + jnp.sum(jnp.square(g), axis=0), acc, grads), None

    acc0 = jax.tree.map(jnp.zeros_like, params)
    acc, _ = jax.lax.scan(body, acc0, (split(inputs), split(targets), split(weights), split(row_keys)))
    return acc


def diagonal_fisher(model: nnx.Module, batches: Iterable[Mapping[str, Any]], *, kind: FisherKind = "empirical",
                    key: Optional[jax.Array] = None, max_batches: Optional[int] = None, chunk: int = 1,
                    progress: bool = True) -> dict[str, jax.Array]:
    """The diagonal Fisher {path: F} (float32, shapes and order of `flat_params(model)`; module docstring).

    model: an nnx causal LM called as model(ids (B, L)) -> logits (B, L, V); not modified.
    batches: dicts {'inputs', 'targets': int (B, L), 'loss_mask'?: (B, L), 'mask'?: (B,)} (data/pipeline.py);
      the first `max_batches` are used (an endless iterator such as PackedBatches needs max_batches).
    kind: 'empirical' (dataset targets) or 'sampled' (y ~ p_theta per position; `key` required).
    chunk: examples whose per-example gradients are computed at once (vmap); memory ~ chunk x parameters.
    Raises ValueError when no batch holds a scored token (no example), or on a bad kind/key/chunk.
    """
    if kind not in ("empirical", "sampled"):
        raise ValueError(f"diagonal_fisher: kind must be 'empirical' or 'sampled', got {kind!r}")
    if kind == "sampled" and key is None:
        raise ValueError("diagonal_fisher: kind='sampled' draws y ~ p_theta and needs a PRNG key (key=...)")
    if not is_int(chunk) or chunk < 1:
        raise ValueError(f"diagonal_fisher: chunk must be a positive integer, got {chunk!r}")
    base_key = key if key is not None else jax.random.key(0)  # unused by 'empirical'

    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    params = float32_tree(params)
    acc, n_examples = None, 0
    it, total = limited(batches, max_batches)
    for bi, batch in enumerate(progress_bar(it, total=total, desc=f"fisher ({kind})", enabled=progress)):
        inputs, targets, w = batch_arrays(batch, f"batch {bi}")
        examples = int(np.sum(np.any(w > 0, axis=1)))
        if examples == 0:  # contributes nothing (its key index is still consumed: keys depend on bi only)
            continue
        n_examples += examples
        b = inputs.shape[0]
        c = min(int(chunk), b)
        pad = (-b) % c  # zero-weight rows so that chunks divide the batch (their gradient is 0)
        if pad:
            inputs, targets = (np.concatenate([a, np.zeros((pad, a.shape[1]), a.dtype)]) for a in (inputs, targets))
            w = np.concatenate([w, np.zeros((pad, w.shape[1]), w.dtype)])
        batch_key = jax.random.fold_in(base_key, bi)
        row_keys = jax.vmap(lambda r: jax.random.fold_in(batch_key, r))(jnp.arange(b + pad))
        sums = _squared_grad_sums(graphdef, params, rest, jnp.asarray(inputs), jnp.asarray(targets),
                                  jnp.asarray(w), row_keys, kind=kind, chunk=c)
        acc = sums if acc is None else jax.tree.map(jnp.add, acc, sums)
    if n_examples == 0:
        raise ValueError("diagonal_fisher: the batches hold no example with a scored token (every loss_mask/mask "
                         "entry is 0, or there were no batches)")
    return {k: v / n_examples for k, v in flat_params(acc).items()}


# ------------------------------------------------------------------------------------------ merge
def fisher_merge(models: Union[Sequence[State], Mapping[str, State]],
                 fishers: Sequence[Mapping[str, Any]], *, weights: Optional[Sequence[float]] = None,
                 fisher_floor: float = 1e-6, normalize: bool = False) -> dict[str, jax.Array]:
    """theta*[p] = sum_i w_i F~_i[p] theta_i[p] / sum_i w_i F~_i[p] for every tensor p (module docstring).

    models: M flat {path: array} dicts or nnx modules (a list, or {name: model}); fishers: one {path: F} per
      model with every floating tensor's path and shape (extra paths are errors too).
    weights: (M,) >= 0 (default all 1; only their ratios matter). fisher_floor: max(F, floor) (> 0), on the raw F.
    normalize: F~ = max(F, floor) / (sum of all of that model's Fisher entries).
    Returns a flat dict in the first model's order and dtypes (computed in float32); integer tensors are copied
    when identical in every model. Raises MergeInputError naming the tensor and model for mismatches.
    """
    names, flats = names_and_flats(models, "fisher_merge")
    n = len(flats)
    if len(fishers) != n:
        raise ValueError(f"fisher_merge: {len(fishers)} Fishers for {n} models {names}")
    if not (isinstance(fisher_floor, (int, float, np.floating)) and fisher_floor > 0):
        raise ValueError(f"fisher_merge: fisher_floor must be a number > 0 (it avoids 0/0), got {fisher_floor!r}")
    w = model_weights(weights, n, "fisher_merge")
    check_inputs(names, flats, vocab_tensors=(), embed_alignment=None, has_base=False)
    ref = flats[0]
    floating = [p for p, v in ref.items() if jnp.issubdtype(jnp.asarray(v).dtype, jnp.floating)]
    problems = []
    for name, f in zip(names, fishers):
        f = dict(f)
        missing = [p for p in floating if p not in f]
        extra = [p for p in f if p not in ref]
        if missing:
            problems.append(f"the Fisher of {name} lacks {', '.join(missing)}")
        if extra:
            problems.append(f"the Fisher of {name} has tensor(s) the models lack: {', '.join(extra)}")
        for p in floating:
            if p in f and tuple(np.shape(f[p])) != tuple(np.shape(ref[p])):
                problems.append(f"Fisher {p} of {name} is {tuple(np.shape(f[p]))} but the parameter is "
                                f"{tuple(np.shape(ref[p]))}")
    if problems:
        raise MergeInputError("fisher_merge: " + "; ".join(problems))
    scale = np.ones(n)
    if normalize:
        totals = np.array([sum(float(jnp.sum(jnp.asarray(f[p], jnp.float32))) for p in floating) for f in fishers])
        bad = [nm for nm, t in zip(names, totals) if not (np.isfinite(t) and t > 0)]
        if bad:
            raise MergeInputError(f"fisher_merge(normalize=True): the Fisher of {', '.join(bad)} sums to "
                                  f"{[float(t) for nm, t in zip(names, totals) if nm in bad]} (needs a finite "
                                  "positive total)")
        scale = 1.0 / totals
    out = {}
    for p, v in ref.items():
        if p not in floating:
            out[p] = copy_exact(p, [f[p] for f in flats], names)
            continue
        xs = jnp.stack([jnp.asarray(f[p], jnp.float32) for f in flats])
        fs = jnp.stack([jnp.asarray(f[p], jnp.float32) for f in fishers])
        out[p] = _fisher_kernel(xs, fs, jnp.asarray(scale, jnp.float32), jnp.asarray(w, jnp.float32),
                                jnp.float32(fisher_floor)).astype(jnp.asarray(v).dtype)
    return out


@jax.jit
def _fisher_kernel(xs, fs, scale, w, floor):
    """sum_i w_i F~_i x_i / sum_i w_i F~_i with F~_i = scale_i max(F_i, floor); xs, fs (N, *S), scale, w (N,)."""
    expand = lambda a: a.reshape(a.shape + (1,) * (xs.ndim - 1))  # noqa: E731
    f = jnp.maximum(fs, floor) * expand(scale * w)
    return jnp.sum(f * xs, axis=0) / jnp.sum(f, axis=0)
