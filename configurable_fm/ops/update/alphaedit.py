"""AlphaEdit (Fang et al., ICLR 2025): MEMIT's update projected onto the null space of the preserved keys.

    state = alphaedit_init(stats, layers=[3, 4, 5])                     # null-space projectors, empty history
    delta, state = alphaedit(model, tok, requests, layers=[3, 4, 5], state=state, key=jax.random.key(0))
    model = bricks.deltas.apply(model, delta)                           # ... and the next batch with `state`

Projector (`experiments/evaluate.py::get_project`). C = E[k k^T] (F, F), the same normalised key second moment
MEMIT uses (stats.py; no lambda scaling). With its eigendecomposition C = U diag(s) U^T (the authors take an SVD,
the same for a symmetric PSD matrix), the eigenvectors whose eigenvalue is below `nullspace_threshold` (authors:
2e-2) span the (approximate) null space of the preserved keys K0, and P = U_0 U_0^T (F, F) projects onto it:
P = P^T = P^2 and k0^T P ~ 0 for every key k0 the statistics were computed from.

Update (the paper, in its layout W_p (D, F) with keys as columns):
    Delta_p = R_p K1_p^T P (Kp_p Kp_p^T P + K1_p K1_p^T P + I)^{-1},    then  W_p <- W_p + Delta_p
(the paper writes the perturbation as Delta P; Delta_p above already ends in P, since
P (A P + I)^{-1} = (P A + I)^{-1} P for A = Kp Kp^T + K1 K1^T, so Delta_p P = Delta_p). The authors' code
(`AlphaEdit_main.py`) solves the transposed system with I weighted by `L2` (10 in the released GPT-2 XL, GPT-J and
Llama3 JSONs; the paper's form has 1):  upd = solve(P (K1 K1^T + cache_c) + L2 I, P K1 R^T).

In our layout (W (F, D), y = k @ W + b, keys K (E, F) as rows, residuals R (E, D), history H = sum_p Kp^T Kp
(F, F)), transposing:

    dW = (P (K^T K + H) + L2 I)^{-1} P K^T R        (F, D), rank <= E,

solved in float64 (numpy, general solve: the matrix is not symmetric). Invariants: dW = P dW exactly (multiply
the normal equations by I - P: L2 (I - P) dW = 0), so K0 (W + dW) = K0 W for every key in the preserved
subspace (K0 P = 0): the preserved outputs do not move, to the threshold's accuracy for keys that are only
approximately there. The edit is met only as far as the keys reach into the null space: a key k1 whose
projection P k1 is small cannot be written (editing capacity is bounded by the null-space dimension).

Sequential editing. After each batch the history of every edited layer grows, H <- H + K_l^T K_l (the authors'
`cache_c`, one (F, F) float64 per layer): the ||dW Kp||^2 term that keeps later updates from moving earlier
edits' outputs. State is explicit: `AlphaEditState` holds the projectors and histories, `alphaedit` takes one
and returns the next (nothing is cached in globals; independent edits share nothing: pass a fresh
`alphaedit_init(...)`, as EasyEdit issue #613 shows the authors' global cache leaking across "independent" edits).

Targets and spreading are MEMIT's (memit.memit_spread): z at the residual stream after the last layer, the
remaining residual split over the layers in ascending order, each layer's update applied before the next
layer's keys are read.

Deviations from the authors' code, all deliberate:
* The history adds the keys the update used (read on the model as edited by the layers below); the authors read
  the keys once more after the whole batch is applied. Those are the same keys: a layer's keys depend only on
  the parameters upstream of its projection, which the layers above it do not change (they differ by float
  rounding of a second forward pass).
* The authors cast nothing to float64 (float32 torch solve); here every solve and product is float64 and the
  factors are stored float32 (LowRank(a (F, E), R (E, D)), or Dense when that is smaller, as memit_update).
* An empty null space (no eigenvalue below the threshold) is refused with a StatsError naming the smallest
  eigenvalue, instead of a silent no-op update; a threshold suited to GPT-2 XL keys (2e-2) can be far off for a
  model whose keys have another scale: choose it from the spectrum (`null_space_projector(..., threshold)`).
* The projector is computed once per session from the statistics of the unedited model, as the authors do; the
  preserved keys of layer l change once layers below l are edited, and P does not follow them (neither does the
  authors').
Defaults (AlphaEditHparams): MEMIT's GPT-J value optimisation (25 steps, lr 0.5, clamp 0.75, kl 0.0625, weight
decay 0.5, MEMIT_CONTEXT), nullspace_threshold 2e-2, L2 10.
"""
from __future__ import annotations

import dataclasses
from typing import Mapping, Sequence

import jax
import numpy as np
from flax import nnx

from configurable_fm.bricks.deltas import Delta
from configurable_fm.ops.update.keys import MEMIT_CONTEXT, Context
from configurable_fm.ops.update.memit import (case_ids, check_layer_stats, factored_update, keys_and_residuals,
                                             memit_spread)
from configurable_fm.ops.update.requests import Request
from configurable_fm.ops.update.stats import StatsError, second_moment_of
from configurable_fm.ops.update.values import ValueHparams


@dataclasses.dataclass(frozen=True)
class AlphaEditHparams(ValueHparams):
    """AlphaEdit's settings (module docstring); value optimisation fields as in values.ValueHparams.
    nullspace_threshold: eigenvalues of C below it span the null space; L2: the weight of ||dW||^2."""

    v_num_grad_steps: int = 25
    clamp_norm_factor: float = 0.75
    nullspace_threshold: float = 2e-2
    L2: float = 10.0
    context: Context = MEMIT_CONTEXT


@dataclasses.dataclass(frozen=True, eq=False)
class AlphaEditState:
    """The state sequential AlphaEdit carries: per layer the projector P (F, F) and the history
    H = sum Kp^T Kp (F, F) of the keys written so far (float64), the number of requests edited, and the keys the
    last step added ({layer: (E, F) float64}: what `alphaedit_undo` subtracts), and the threshold P came from."""

    projectors: Mapping[int, np.ndarray]
    histories: Mapping[int, np.ndarray]
    edits: int = 0
    last_keys: Mapping[int, np.ndarray] = dataclasses.field(default_factory=dict)
    nullspace_threshold: float = 2e-2

    @property
    def layers(self) -> list[int]:
        return sorted(self.projectors)

    def nullspace_dims(self) -> dict[int, int]:
        return {l: int(round(float(np.trace(p)))) for l, p in sorted(self.projectors.items())}


def null_space_projector(second_moment, threshold: float = 2e-2, *, what: str = "null_space_projector") -> np.ndarray:
    """P = U_0 U_0^T (F, F) float64 for the eigenvectors U_0 of C = `second_moment` whose eigenvalue is below
    `threshold` (module docstring); StatsError when there is none."""
    c = np.asarray(second_moment, np.float64)
    if c.ndim != 2 or c.shape[0] != c.shape[1]:
        raise StatsError(f"{what}: the second moment must be square (F, F), got {c.shape}")
    s, u = np.linalg.eigh(0.5 * (c + c.T))
    small = s < float(threshold)
    if not small.any():
        raise StatsError(f"{what}: no eigenvalue of the key second moment is below nullspace_threshold="
                         f"{threshold:g} (the smallest is {s[0]:.3g}): the null space is empty and AlphaEdit could "
                         f"not write anything; raise the threshold (the spectrum's scale follows the keys' scale)")
    u0 = u[:, small]
    return u0 @ u0.T


def nullspace_threshold_for_energy(second_moment, share: float) -> float:
    """The threshold whose null space (eigen-directions of C below it) holds the largest share of the keys' energy
    tr(C) that does not exceed `share` (0 < share < 1): with C's eigenvalues s_1 <= ... <= s_F, the n smallest with
    s_1 + ... + s_n <= share x tr(C), n >= 1; returned halfway between s_n and s_n+1 (in the ascending order), so
    null_space_projector(C, threshold) keeps exactly those n. A scale-free way to pick AlphaEdit's threshold:
    the authors' 2e-2 is absolute (tied to their models' key scale); on SmolLM2-135M it leaves 15-27 % of the
    energy in the null space (experiments/edit/alphaedit.py). StatsError when even the smallest eigenvalue holds
    more than `share`."""
    share = float(share)
    if not 0 < share < 1:
        raise ValueError(f"nullspace_threshold_for_energy: share must be in (0, 1), got {share:g}")
    c = np.asarray(second_moment, np.float64)
    s = np.linalg.eigvalsh(0.5 * (c + c.T))
    total = float(s.sum())
    n = int(np.searchsorted(np.cumsum(s), share * total, side="right"))
    if n < 1:
        raise StatsError(f"nullspace_threshold_for_energy: the smallest eigenvalue of the key second moment holds "
                         f"{s[0] / total:.3g} of its trace, more than share={share:g}")
    return float(s[n - 1] + 0.5 * (s[n] - s[n - 1]))  # n < F: the whole trace exceeds share x tr(C)


def alphaedit_init(stats, layers: Sequence[int], *, nullspace_threshold: float = 2e-2) -> AlphaEditState:
    """A fresh AlphaEditState: the projector of every layer from its key statistics ({layer: KeyStats or (F, F)
    array}, or one of them for a single layer) and empty histories."""
    layers = sorted(set(int(l) for l in layers))
    if not layers:
        raise ValueError("alphaedit_init: no layers given")
    if stats is None:
        raise StatsError("alphaedit_init: AlphaEdit needs the key statistics of every edited layer (its null space "
                         "comes from them)")
    check_layer_stats(stats, layers, "alphaedit_init")
    projectors, histories = {}, {}
    for l in layers:
        s = stats[l] if isinstance(stats, Mapping) else stats
        dim = int(np.asarray(getattr(s, "second_moment", s)).shape[0])
        c = second_moment_of(stats, l, dim)
        projectors[l] = null_space_projector(c, nullspace_threshold, what=f"alphaedit_init (layer {l})")
        histories[l] = np.zeros((dim, dim), np.float64)
    return AlphaEditState(projectors, histories, nullspace_threshold=float(nullspace_threshold))


def alphaedit_update(keys, residuals, projector, history=None, l2: float = 10.0):
    """dW = (P (K^T K + H) + L2 I)^{-1} P K^T R for keys K (E, F), residuals R (E, D), projector P (F, F) and
    history H (F, F) (None: zero), in float64 (module docstring). Returns LowRank(a (F, E), R (E, D)) float32,
    or Dense (F, D) when that is smaller."""
    k, r = keys_and_residuals(keys, residuals, "alphaedit_update")
    p = np.asarray(projector, np.float64)
    f = k.shape[1]
    if p.shape != (f, f):
        raise ValueError(f"alphaedit_update: the projector is {p.shape} but the keys have {f} features")
    a_mat = k.T @ k if history is None else k.T @ k + np.asarray(history, np.float64)
    try:
        a = np.linalg.solve(p @ a_mat + float(l2) * np.eye(f), p @ k.T)  # (F, E)
    except np.linalg.LinAlgError:
        raise StatsError("alphaedit_update: P (K^T K + H) + L2 I is singular (L2 must be > 0)") from None
    return factored_update(a, r)


def alphaedit_undo(state: AlphaEditState, keys: Mapping[int, np.ndarray], n_requests: int) -> AlphaEditState:
    """The state before a step that added `keys` ({layer: (E, F)}) for `n_requests` requests: H <- H - K^T K."""
    histories = dict(state.histories)
    for l, k in keys.items():
        k = np.asarray(k, np.float64)
        histories[l] = histories[l] - k.T @ k
    return dataclasses.replace(state, histories=histories, edits=state.edits - int(n_requests), last_keys={})


def alphaedit(model: nnx.Module, tokenizer, requests: Sequence[Request], *, layers: Sequence[int],
              state: AlphaEditState | None = None, stats=None, hparams: AlphaEditHparams = AlphaEditHparams(),
              key: jax.Array | None = None, bos_id: int | None = None) -> tuple[Delta, AlphaEditState]:
    """One AlphaEdit step: the edit of `requests` spread over `layers` (module docstring) as a Delta with one term
    per layer, and the state after it (histories grown by this step's keys). `state`: from alphaedit_init or the
    previous step; None builds a fresh one from `stats` (then nothing is remembered between calls unless the
    returned state is passed on). The model is not modified. Metadata: method, layers, number of edits, the
    null-space dimension per layer, residual norms, mean value loss."""
    layers = sorted(set(int(l) for l in layers))
    if state is None:
        state = alphaedit_init(stats, layers, nullspace_threshold=hparams.nullspace_threshold)
    missing = [l for l in layers if l not in state.projectors]
    if missing:
        raise StatsError(f"alphaedit: the state has no projector for layer(s) {missing}; it has {state.layers}")

    def solve(site, k, resid):
        return alphaedit_update(k, resid, state.projectors[site.layer], state.histories[site.layer], hparams.L2)

    out = memit_spread(model, tokenizer, requests, layers=layers, hparams=hparams, solve=solve, key=key,
                       bos_id=bos_id, what="alphaedit")
    requests = list(requests)
    histories = dict(state.histories)
    for l, k in out.keys.items():
        histories[l] = histories[l] + k.T @ k
    new_state = dataclasses.replace(state, histories=histories, edits=state.edits + len(requests),
                                    last_keys=dict(out.keys))
    dims = state.nullspace_dims()
    metadata = {"method": "alphaedit", "layers": layers, "edits": len(requests), "L2": float(hparams.L2),
                "nullspace_threshold": float(state.nullspace_threshold),
                "nullspace_dim": {str(l): dims[l] for l in layers}, "residual_norm_mean": out.residual_norms(),
                "value_loss_final_mean": out.value_loss, "templates": out.templates, "case_ids": case_ids(requests),
                "edits_before": state.edits}
    return Delta(out.terms, kind="alphaedit", source=f"alphaedit:{len(requests)} edits", metadata=metadata), new_state
