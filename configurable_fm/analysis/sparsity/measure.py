"""Measuring an activation-sparse model on held-out batches: perplexity and the sparsity each SparseLinear achieves;
the mean KL divergence from a reference model's next-token distributions.

    ev = evaluate(sparse, batches)             # one jitted forward per batch
    ev.perplexity(), ev.sparsity()             # exp(mean NLL); {path: fraction of input entries zeroed}
    ev.mean_sparsity(weighted=True)            # the fraction of the targeted weights a sparse kernel would skip
    dense = evaluate(model, batches)           # a model without SparseLinear: perplexity only
    ev = evaluate(sparse, batches, dense_prefix=256)   # TEAL's protocol: positions < 256 stay dense, scored from 256
    change, se = perplexity_change(ev, dense_ev)       # ppl(ev) / ppl(dense_ev) - 1 on the same batches, its SE
    ref = next_token_logits(model, batches)            # (B, T, V) per batch, held
    mean_kl(sparse, batches, ref)                      # mean KL(model || sparse) per scored token

Per batch ({'inputs', 'targets' (B, T), 'loss_mask'?, 'attention_mask'?, 'mask'?}, as data.pipeline.eval_batches
yields them), with m the token mask (analysis/batches.py `token_mask`, times 'loss_mask' when present):
    nll[b, t]   = -log softmax(logits[b, t])[targets[b, t]]             (models/scoring.next_token_nll, float32)
    NLL_t      += sum_b m[b, t] nll[b, t],   N_t += sum_b m[b, t]        per position t, summed over batches (float64)
    kept_l     += sum_{b, t >= P} m[b, t] sum_i kept_l[b, t, i]            for each SparseLinear l (its `kept` tap)
    entries_l  += in_l sum_{b, t >= P} m[b, t]
    perplexity(from) = exp(sum_{t >= from} NLL_t / sum_{t >= from} N_t);  sparsity_l = 1 - kept_l / entries_l
    mean_sparsity(weighted) = sum_l w_l sparsity_l / sum_l w_l,   w_l = in_l out_l (weighted) or 1
The per-window sums are kept too (window_nll, window_tokens: (W, T), one row per sequence of every batch), so two
evaluations of the same batches can be compared window by window: perplexity_change (below) gives the change with
its standard error.
With dense_prefix P > 0 every SparseLinear keeps all entries of the positions t < P (an intervention on the `kept`
points), the sparsity is counted on t >= P, and perplexity() scores t >= P by default. This is how TEAL's published
perplexities are measured (its evaluation sparsifies only the last half of each window, emulating a dense prefill
followed by sparse decoding, and scores positions in that half); P = 0 sparsifies and scores every position.

The forward runs as one jitted step per batch, compiled once per (model structure, batch shape, P): models that
differ only in their thresholds (every level of a sweep, and the dense model as thresholds -1) share it. Nothing
but the sums leaves the step.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from configurable_fm.analysis.batches import batch_inputs, limited, progress_bar, token_mask
from configurable_fm.analysis.capture import capture
from configurable_fm.analysis.interventions import replace
from configurable_fm.analysis.sparsity.module import SparsityError, linear_shapes, sparse_linears
from configurable_fm.checks import is_int
from configurable_fm.models.scoring import next_token_kl, next_token_nll


@dataclasses.dataclass
class Evaluation:
    """The sums of `evaluate` (module docstring): window_nll and window_tokens (W, T) per sequence and position
    (W sequences over all batches, rows of shorter batches padded with zeros), whose column sums are nll (T,) and
    tokens (T,) per position; kept and entries per SparseLinear path; shapes {path: (in, out)}; dense_prefix P;
    batches."""

    window_nll: np.ndarray
    window_tokens: np.ndarray
    kept: dict[str, int]
    entries: dict[str, int]
    shapes: dict[str, tuple[int, int]]
    dense_prefix: int
    batches: int

    @property
    def nll(self) -> np.ndarray:
        """NLL_t: the masked NLL summed over sequences, per position (T,)."""
        return self.window_nll.sum(axis=0)

    @property
    def tokens(self) -> np.ndarray:
        """N_t: the scored tokens per position (T,)."""
        return self.window_tokens.sum(axis=0)

    def scored_tokens(self, start: Optional[int] = None) -> int:
        return int(self.tokens[self.dense_prefix if start is None else start:].sum())

    def scored_windows(self, start: Optional[int] = None) -> int:
        """How many sequences have a scored token at positions t >= start (default: dense_prefix); padding rows
        of a short last batch have none."""
        s = self.dense_prefix if start is None else start
        return int(np.count_nonzero(self.window_tokens[:, s:].sum(axis=1)))

    def mean_nll(self, start: Optional[int] = None) -> float:
        """Mean NLL over the scored positions t >= start (default: dense_prefix)."""
        s = self.dense_prefix if start is None else start
        n = self.tokens[s:].sum()
        if n <= 0:
            raise SparsityError(f"evaluate: no scored tokens at positions >= {s}")
        return float(self.nll[s:].sum() / n)

    def perplexity(self, start: Optional[int] = None) -> float:
        return float(np.exp(self.mean_nll(start)))

    def sparsity(self) -> dict[str, float]:
        """{path: fraction of the input entries the SparseLinear zeroed}."""
        return {p: 1.0 - self.kept[p] / self.entries[p] if self.entries[p] else float("nan") for p in self.kept}

    def mean_sparsity(self, weighted: bool = True, paths: Optional[Iterable[str]] = None) -> float:
        """The mean of sparsity() over `paths` (all), weighted by in * out (the share of weight reads skipped) or
        not; NaN when there is no SparseLinear."""
        s = self.sparsity()
        chosen = list(s) if paths is None else [p for p in paths if p in s]
        if not chosen:
            return float("nan")
        w = np.asarray([self.shapes[p][0] * self.shapes[p][1] if weighted else 1.0 for p in chosen], np.float64)
        return float(np.sum(w * np.asarray([s[p] for p in chosen])) / w.sum())


def model_logits(model, inputs, attention):
    """The model's logits; attention None (a static pytree under jit) calls it without a mask."""
    return model(inputs) if attention is None else model(inputs, attention_mask=attention)


def _step(graphdef, points: tuple, prefix: int, state, inputs, targets, attention, m_BxT):
    model = nnx.merge(graphdef, state)
    call = lambda mm: model_logits(mm, inputs, attention)  # noqa: E731
    if points:
        interventions = {p: replace(True, positions=list(range(prefix))) for p in points} if prefix else None
        logits, kept = capture(model, list(points), call, interventions=interventions)
    else:
        logits, kept = call(model), {}
    nll_BxT = next_token_nll(logits, targets) * m_BxT
    scored = m_BxT.at[:, :prefix].set(0.0) if prefix else m_BxT
    counts = {p[:-len(".kept")]: jnp.sum(k & (scored[..., None] > 0), dtype=jnp.int32) for p, k in kept.items()}
    return nll_BxT, counts, jnp.sum(scored)


_jitted_step = jax.jit(_step, static_argnums=(0, 1, 2))


def evaluate(model, batches: Iterable[Mapping[str, Any]], *, dense_prefix: int = 0, max_batches: Optional[int] = None,
             progress: bool = False, log: Optional[Callable[[str], None]] = None,
             desc: str = "sparsity: evaluate") -> Evaluation:
    """Perplexity and per-SparseLinear achieved sparsity over `batches` (module docstring); `model` is not modified.
    Batches need 'inputs' and 'targets' (B, T). SparsityError for a dense_prefix outside [0, T) or no batches."""
    if not is_int(dense_prefix) or dense_prefix < 0:
        raise SparsityError(f"evaluate: dense_prefix must be an int >= 0, got {dense_prefix!r}")
    prefix = int(dense_prefix)
    found = sparse_linears(model)
    points = tuple(f"{p}.kept" for p in found)
    shapes = linear_shapes(model, list(found))
    graphdef, state = nnx.split(model)
    window_nll, window_tokens = [], []
    kept = {p: 0 for p in found}
    entries = {p: 0 for p in found}
    n = 0
    it, total = limited(batches, max_batches)
    for i, batch in enumerate(progress_bar(it, total=total, desc=desc, enabled=progress, log=log)):
        inputs, targets, m, attention = scored_batch(batch, f"{desc}: batch {i}")
        if prefix >= inputs.shape[1]:
            raise SparsityError(f"evaluate: dense_prefix={prefix} leaves no position of the {inputs.shape[1]}-token "
                                "windows sparse")
        nll_BxT, counts, scored = _jitted_step(graphdef, points, prefix, state, jnp.asarray(inputs),
                                               jnp.asarray(targets), attention, jnp.asarray(m, jnp.float32))
        window_nll.append(np.asarray(nll_BxT, np.float64))
        window_tokens.append(np.asarray(m, np.int64))
        scored = int(round(float(scored)))
        for p, c in counts.items():
            kept[p] += int(c)
            entries[p] += scored * shapes[p][0]
        n += 1
    if n == 0:
        raise SparsityError(f"{desc}: no batches")
    window_nll, window_tokens = _stack_padded(window_nll), _stack_padded(window_tokens)
    return Evaluation(window_nll=window_nll, window_tokens=window_tokens, kept=kept, entries=entries, shapes=shapes,
                      dense_prefix=prefix, batches=n)


def scored_batch(batch: Mapping[str, Any], where: str):
    """(inputs, targets (B, T) int32, m (B, T) the scored-token mask, attention (B, T) int32 or None) of a batch."""
    inputs = batch_inputs(batch, where)
    if "targets" not in batch:
        raise KeyError(f"{where} lacks 'targets' (the next tokens to score); it has {sorted(batch)}")
    targets = np.asarray(batch["targets"], np.int32)
    if targets.shape != inputs.shape:
        raise ValueError(f"{where}: targets are {targets.shape} but inputs are {inputs.shape}")
    m = token_mask(batch, where)
    if "loss_mask" in batch:
        m = m * (np.asarray(batch["loss_mask"]) > 0)
    attention = jnp.asarray(batch["attention_mask"], jnp.int32) if "attention_mask" in batch else None
    return inputs, targets, m, attention


def _logits_step(graphdef, state, inputs, attention):
    return model_logits(nnx.merge(graphdef, state), inputs, attention)


def _kl_step(graphdef, state, inputs, attention, reference_BxTxV, m_BxT):
    """(B, T) float32 KL per token times the scored-token mask (summed in float64 on the host)."""
    return next_token_kl(_logits_step(graphdef, state, inputs, attention), reference_BxTxV) * m_BxT


_jitted_logits = jax.jit(_logits_step, static_argnums=(0,))
_jitted_kl = jax.jit(_kl_step, static_argnums=(0,))


def next_token_logits(model, batches: Sequence[Mapping[str, Any]]) -> list[jax.Array]:
    """The model's logits (B, T, V) for each batch (the reference of mean_kl); `model` is not modified."""
    graphdef, state = nnx.split(model)
    out = []
    for i, batch in enumerate(batches):
        inputs, _, _, attention = scored_batch(batch, f"next_token_logits: batch {i}")
        out.append(_jitted_logits(graphdef, state, jnp.asarray(inputs), attention))
    return out


def mean_kl(model, batches: Sequence[Mapping[str, Any]], reference: Sequence[jax.Array]) -> float:
    """The mean over scored tokens of KL(softmax(r_bt) || softmax(z_bt)), z the model's logits and r the reference
    logits of the same batches (next_token_logits of the model compared with), float32 per token, summed in float64:
        mean_kl = sum_b,t m_bt KL_bt / sum_b,t m_bt,   m the scored-token mask (as evaluate's).
    For a reference that predicts the data well, this is the expected rise of the next-token NLL when its
    predictions are replaced by the model's (E_{y ~ r} [log r(y) - log q(y)]), measured without the sampling noise
    of the observed targets: the low-variance measure of a perturbation's cost. SparsityError for no batches or a
    reference of another length or shape."""
    graphdef, state = nnx.split(model)
    batches = list(batches)
    if not batches or len(reference) != len(batches):
        raise SparsityError(f"mean_kl: {len(batches)} batches and {len(reference)} reference logits; they must be "
                            "the same batches (at least one)")
    total, tokens = 0.0, 0.0
    for i, (batch, ref) in enumerate(zip(batches, reference)):
        inputs, _, m, attention = scored_batch(batch, f"mean_kl: batch {i}")
        if ref.shape[:2] != inputs.shape:
            raise SparsityError(f"mean_kl: batch {i} is {inputs.shape} but its reference logits are {ref.shape}")
        total += float(np.sum(np.asarray(_jitted_kl(graphdef, state, jnp.asarray(inputs), attention, ref,
                                                    jnp.asarray(m, jnp.float32)), np.float64)))
        tokens += float(m.sum())
    if tokens <= 0:
        raise SparsityError("mean_kl: no scored tokens")
    return total / tokens


def perplexity_change(ev: Evaluation, reference: Evaluation, start: Optional[int] = None) -> tuple[float, float]:
    """(ppl(ev) / ppl(reference) - 1, its standard error), both scored on positions t >= start (default: ev's
    dense_prefix), from two evaluations of the same batches. With a_w, b_w the two NLL sums of window w over those
    positions and n_w its scored tokens, the mean NLL difference and its ratio-estimator (delta-method) SE are
        D = sum_w (a_w - b_w) / sum_w n_w,
        SE(D) = sqrt(W / (W - 1) * sum_w (a_w - b_w - D n_w)^2) / sum_w n_w,
    and the change exp(D) - 1 has SE exp(D) SE(D). Windows are treated as independent; windows cut from one
    document are not quite, so the SE is a lower bound of the uncertainty. SparsityError when the two did not see
    the same windows (shape or scored tokens differ) or there are fewer than 2 windows."""
    s = ev.dense_prefix if start is None else int(start)
    if ev.window_tokens.shape != reference.window_tokens.shape or not np.array_equal(
            ev.window_tokens[:, s:], reference.window_tokens[:, s:]):
        raise SparsityError("perplexity_change: the two evaluations scored different windows "
                            f"({ev.window_tokens.shape} vs {reference.window_tokens.shape} sequences x positions)")
    w = ev.scored_windows(s)
    if w < 2:
        raise SparsityError(f"perplexity_change: {w} scored window(s); a standard error needs at least 2")
    n_w = ev.window_tokens[:, s:].sum(axis=1).astype(np.float64)
    diff_w = ev.window_nll[:, s:].sum(axis=1) - reference.window_nll[:, s:].sum(axis=1)
    keep = n_w > 0  # padding rows of a short last batch score nothing
    n_w, diff_w = n_w[keep], diff_w[keep]
    d = diff_w.sum() / n_w.sum()
    se = np.sqrt(w / (w - 1) * np.sum((diff_w - d * n_w) ** 2)) / n_w.sum()
    return float(np.expm1(d)), float(np.exp(d) * se)


def _stack_padded(rows: list[np.ndarray]) -> np.ndarray:
    """The (B_i, T_i) arrays of the batches as one (sum B_i, max T_i) array, shorter rows padded with zeros."""
    width = max(r.shape[1] for r in rows)
    return np.concatenate([np.pad(r, ((0, 0), (0, width - r.shape[1]))) for r in rows])

