"""MEMIT (Meng et al., 2023): many edits at once, spread over several layers' MLP output projections.

    stats = second_moments(model, batches, layers=[3, 4, 5], n_tokens=100_000)
    delta = memit(model, tok, requests, layers=[3, 4, 5], stats=stats, key=jax.random.key(0))
    edited = bricks.deltas.apply(model, delta)        # one LowRank term (rank = number of edits) per layer

Targets. For each request r, z_r = h_L + delta_r (values.py with the point = the residual stream after the last
edited layer L = max(layers), `layers.<L>.output`), optimised so that the model says target_new; the
requests are optimised together (one batched, jitted loop; each gets exactly its own Adam trajectory).

Spreading (`memit_main.py`). For the layers l_1 < ... < l_m in order, with the model as edited so far:
    K_l   (E, F): the keys of the requests at layer l (keys.py: averaged over the context template groups),
    h_L   (E, D): the residual stream after layer L at the subject's last token of the bare prompt,
    R_l = (z - h_L) / (m - i)      (layer l_i takes an equal share of what is left),
    dW_l = argmin  lambda tr(dW^T C_l dW) + ||K_l (W_l + dW) - (K_l W_l + R_l)||_F^2,
then dW_l is applied before the next layer's keys are read (the later layers see the earlier edits).

The math in our layout (W (F, D), y = k @ W + b; the paper's W_p = W^T (D, F) and K_p = K^T (F, E)). The paper's
dW_p = R_p K_p^T (lambda C + K_p K_p^T)^{-1} with R_p = R^T (D, E) transposes (C symmetric) to

    dW = (lambda C + K^T K)^{-1} K^T R        (F, D), rank <= E;

its normal equations are (lambda C + K^T K) dW = K^T R. C = E[k k^T] is the normalised key second moment
(stats.py) and lambda the authors' `mom2_update_weight` (15,000 for GPT-J; 20,000 for GPT-2 XL). Solved in
float64 with numpy (the authors cast to double too): a = (lambda C + K^T K)^{-1} K^T (F, E), stored as
LowRank(a, R) float32 (a (F, E), b = R (E, D)), or Dense(a R) when that stores fewer numbers
(E (F + D) >= F D).

Choosing lambda. For one new key k the share of a layer's residual that the update writes is s / (lambda + s)
with s = k^T C^{-1} k (Sherman-Morrison), and s is about F for a key drawn like the corpus keys (E[s] = F). So
lambda counts "corpus keys' worth" of preservation against each new key, and its scale follows the key width F:
the authors' 15,000 (GPT-J, F = 16,384) and 20,000 (GPT-2 XL, F = 6,400) write a large share per layer; on a
model with F = 128 the same lambda writes under 1 % and the edit does nothing (the tests use lambda = 16).

Conflicting requests (the same subject and prompt twice) are refused: MEMIT cannot give one key two values.
Defaults (MEMITHparams): the released GPT-J JSON (25 steps, lr 0.5, clamp 0.75, kl 0.0625, weight decay 0.5,
lambda 15,000) and MEMIT's context (keys.py MEMIT_CONTEXT: '{}' and 5 prefixes of 10 tokens, two groups).
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from configurable_fm.bricks.deltas import Delta, Dense, LowRank, Term, apply
from configurable_fm.ops.update.keys import (MEMIT_CONTEXT, Context, context_templates, flatten, group_average,
                                             values_at_subject)
from configurable_fm.ops.update.requests import PLACEHOLDER, Request, RequestError
from configurable_fm.ops.update.rome import solve_psd
from configurable_fm.ops.update.sites import EditSite, edit_site
from configurable_fm.ops.update.stats import StatsError, second_moment_of
from configurable_fm.ops.update.values import ValueHparams, optimize_values


@dataclasses.dataclass(frozen=True)
class MEMITHparams(ValueHparams):
    """MEMIT's settings (module docstring); value optimisation fields as in values.ValueHparams.
    mom2_update_weight: lambda, the weight of the old keys' second moment; scale it with the key width F (module
    docstring, "Choosing lambda")."""

    v_num_grad_steps: int = 25
    clamp_norm_factor: float = 0.75
    mom2_update_weight: float = 15000.0
    context: Context = MEMIT_CONTEXT


def keys_and_residuals(keys, residuals, what: str) -> tuple[np.ndarray, np.ndarray]:
    """Keys K (E, F) and residuals R (E, D) as float64 arrays; ValueError naming `what` for other shapes."""
    k = np.asarray(keys, np.float64)
    r = np.asarray(residuals, np.float64)
    if k.ndim != 2 or r.ndim != 2 or k.shape[0] != r.shape[0]:
        raise ValueError(f"{what}: keys (E, F) and residuals (E, D) expected, got {k.shape} and {r.shape}")
    return k, r


def factored_update(a: np.ndarray, r: np.ndarray):
    """The update dW = a R (a (F, E), R (E, D)) as LowRank(a, R) float32, or Dense (F, D) when that is smaller
    (E (F + D) >= F D)."""
    (f, e), d = a.shape, r.shape[1]
    if e * (f + d) >= f * d:
        return Dense(jnp.asarray(a @ r, jnp.float32))
    return LowRank(jnp.asarray(a, jnp.float32), jnp.asarray(r, jnp.float32))


def memit_update(keys, residuals, second_moment=None, mom2_update_weight: float = 15000.0):
    """dW = (lambda C + K^T K)^{-1} K^T R for keys K (E, F) and residuals R (E, D) (module docstring), in
    float64; C = I when second_moment is None. Returns `factored_update` (LowRank(a (F, E), R (E, D)) float32,
    or Dense (F, D) when that is smaller)."""
    k, r = keys_and_residuals(keys, residuals, "memit_update")
    f = k.shape[1]
    c = np.eye(f) if second_moment is None else np.asarray(second_moment, np.float64)
    a = solve_psd(float(mom2_update_weight) * c + k.T @ k, k.T, "memit_update")  # (F, E)
    return factored_update(a, r)


@dataclasses.dataclass(frozen=True, eq=False)
class Spread:
    """What memit_spread computed: terms {kernel path: term} in layer order, the keys K_l (E, F) float64 each
    layer's update used (read on the model as edited by the layers below), the residuals R_l (E, D) float64 it was
    given, the value optimisation's final mean loss and the number of context templates."""

    terms: dict
    keys: dict
    residuals: dict
    value_loss: float
    templates: int

    def residual_norms(self) -> dict[str, float]:
        return {str(l): float(np.linalg.norm(r, axis=1).mean()) for l, r in self.residuals.items()}


def check_distinct(requests: Sequence[Request], what: str) -> list[Request]:
    """The requests as a list; TypeError when they are not Requests, RequestError when two edit the same text
    (one key cannot take two values)."""
    requests = list(requests)
    if not requests or not all(isinstance(r, Request) for r in requests):
        raise TypeError(f"{what}: requests must be a non-empty sequence of Request")
    seen: dict[tuple[str, str], int] = {}
    for i, r in enumerate(requests):
        j = seen.setdefault((r.prompt, r.subject), i)
        if j != i:
            raise RequestError(f"{what}: requests {j} and {i} both edit {r.text!r}: one key cannot take two values")
    return requests


def check_layer_stats(stats, layers: Sequence[int], what: str) -> None:
    """StatsError unless `stats` is None, a mapping with every layer, or (one layer) a single KeyStats/array."""
    if isinstance(stats, Mapping):
        missing = [l for l in layers if l not in stats]
        if missing:
            raise StatsError(f"{what}: no key statistics for layer(s) {missing}; given for {sorted(stats)}")
    elif stats is not None and len(layers) > 1:
        raise StatsError(f"{what}: give the key statistics as {{layer: KeyStats}} for the layers {layers}")


def memit_spread(model: nnx.Module, tokenizer, requests: Sequence[Request], *, layers: Sequence[int],
                 hparams: ValueHparams, solve: Callable[[EditSite, np.ndarray, np.ndarray], Term],
                 key: jax.Array | None = None, bos_id: int | None = None, what: str = "memit") -> Spread:
    """MEMIT's targets and spreading (module docstring) with the per-layer solve left open: for the layers in
    ascending order, `solve(site, K_l (E, F) float64, R_l (E, D) float64)` returns the layer's term, which is
    applied before the next layer's keys are read. MEMIT, AlphaEdit and the RLS editor differ only in `solve`.
    hparams: value optimisation settings plus `context` (the context templates). The model is not modified."""
    requests = check_distinct(requests, what)
    layers = sorted(set(int(l) for l in layers))
    if not layers:
        raise ValueError(f"{what}: no layers given")
    sites = [edit_site(model, l) for l in layers]
    top = sites[-1]
    groups = context_templates(model, tokenizer, hparams.context, key=key, bos_id=bos_id)
    templates = flatten(groups)
    z = optimize_values(model, tokenizer, requests, point=top.layer_output, templates=templates, hparams=hparams,
                        bos_id=bos_id)
    targets = z.values.astype(np.float64)
    bare = templates.index(PLACEHOLDER) if PLACEHOLDER in templates else None
    current, terms, keys, resids = model, {}, {}, {}
    for i, site in enumerate(sites):
        points = [site.key_point, top.layer_output]
        vals = values_at_subject(current, tokenizer, requests, points, templates, bos_id=bos_id)
        k = group_average(vals[site.key_point], groups)
        if bare is not None:
            h = vals[top.layer_output][:, bare].astype(np.float64)
        else:
            h = values_at_subject(current, tokenizer, requests, [top.layer_output], bos_id=bos_id)[
                top.layer_output][:, 0].astype(np.float64)
        resid = (targets - h) / (len(sites) - i)
        term = solve(site, k, resid)
        terms[site.kernel] = term
        keys[site.layer], resids[site.layer] = k, resid
        if i + 1 < len(sites):
            current = apply(current, Delta({site.kernel: term}))
    return Spread(terms, keys, resids, float(z.losses[-1].mean()), len(templates))


def case_ids(requests: Sequence[Request]) -> list:
    return [r.case_id if r.case_id is None or isinstance(r.case_id, (str, int)) else str(r.case_id)
            for r in requests]


def memit(model: nnx.Module, tokenizer, requests: Sequence[Request], *, layers: Sequence[int], stats,
          hparams: MEMITHparams = MEMITHparams(), key: jax.Array | None = None,
          bos_id: int | None = None) -> Delta:
    """The MEMIT edit of `requests` spread over `layers` (module docstring) as a Delta with one term per layer
    on its MLP output projection. The model is not modified.

    stats: {layer: KeyStats or (F, F) array} for every layer (None: C = I). key: PRNG key for sampled context
    prefixes. tokenizer / bos_id: as in rome. Metadata: method, layers, number of edits, mom2_update_weight, the
    per-layer residual norms and the mean value loss.
    """
    layers = sorted(set(int(l) for l in layers))
    check_layer_stats(stats, layers, "memit")

    def solve(site, k, resid):
        c = second_moment_of(stats, site.layer, k.shape[1])
        return memit_update(k, resid, c, hparams.mom2_update_weight)

    out = memit_spread(model, tokenizer, requests, layers=layers, hparams=hparams, solve=solve, key=key,
                       bos_id=bos_id, what="memit")
    requests = list(requests)
    metadata = {"method": "memit", "layers": layers, "edits": len(requests),
                "mom2_update_weight": float(hparams.mom2_update_weight), "residual_norm_mean": out.residual_norms(),
                "value_loss_final_mean": out.value_loss, "templates": out.templates, "case_ids": case_ids(requests)}
    return Delta(out.terms, kind="memit", source=f"memit:{len(requests)} edits", metadata=metadata)
