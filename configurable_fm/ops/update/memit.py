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
from typing import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from configurable_fm.bricks.deltas import Delta, Dense, LowRank, apply
from configurable_fm.ops.update.keys import (MEMIT_CONTEXT, Context, context_templates, flatten, template_weights,
                                             values_at_subject)
from configurable_fm.ops.update.requests import PLACEHOLDER, Request, RequestError
from configurable_fm.ops.update.rome import solve_psd
from configurable_fm.ops.update.sites import edit_site
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


def memit_update(keys, residuals, second_moment=None, mom2_update_weight: float = 15000.0):
    """dW = (lambda C + K^T K)^{-1} K^T R for keys K (E, F) and residuals R (E, D) (module docstring), in
    float64; C = I when second_moment is None. Returns LowRank(a (F, E), R (E, D)) float32, or Dense (F, D)
    when that is smaller."""
    k = np.asarray(keys, np.float64)
    r = np.asarray(residuals, np.float64)
    if k.ndim != 2 or r.ndim != 2 or k.shape[0] != r.shape[0]:
        raise ValueError(f"memit_update: keys (E, F) and residuals (E, D) expected, got {k.shape} and {r.shape}")
    e, f = k.shape
    d = r.shape[1]
    c = np.eye(f) if second_moment is None else np.asarray(second_moment, np.float64)
    a = solve_psd(float(mom2_update_weight) * c + k.T @ k, k.T, "memit_update")  # (F, E)
    if e * (f + d) >= f * d:
        return Dense(jnp.asarray(a @ r, jnp.float32))
    return LowRank(jnp.asarray(a, jnp.float32), jnp.asarray(r, jnp.float32))


def memit(model: nnx.Module, tokenizer, requests: Sequence[Request], *, layers: Sequence[int], stats,
          hparams: MEMITHparams = MEMITHparams(), key: jax.Array | None = None,
          bos_id: int | None = None) -> Delta:
    """The MEMIT edit of `requests` spread over `layers` (module docstring) as a Delta with one term per layer
    on its MLP output projection. The model is not modified.

    stats: {layer: KeyStats or (F, F) array} for every layer (None: C = I). key: PRNG key for sampled context
    prefixes. tokenizer / bos_id: as in rome. Metadata: method, layers, number of edits, mom2_update_weight, the
    per-layer residual norms and the mean value loss.
    """
    requests = list(requests)
    if not requests or not all(isinstance(r, Request) for r in requests):
        raise TypeError("memit: requests must be a non-empty sequence of Request")
    seen: dict[tuple[str, str], int] = {}
    for i, r in enumerate(requests):
        j = seen.setdefault((r.prompt, r.subject), i)
        if j != i:
            raise RequestError(f"memit: requests {j} and {i} both edit {r.text!r}: one key cannot take two values")
    layers = sorted(set(int(l) for l in layers))
    if not layers:
        raise ValueError("memit: no layers given")
    sites = [edit_site(model, l) for l in layers]
    top = sites[-1]
    groups = context_templates(model, tokenizer, hparams.context, key=key, bos_id=bos_id)
    templates = flatten(groups)
    weights = template_weights(groups)
    if isinstance(stats, Mapping):
        missing = [l for l in layers if l not in stats]
        if missing:
            raise StatsError(f"memit: no key statistics for layer(s) {missing}; given for {sorted(stats)}")
    elif stats is not None and len(layers) > 1:
        raise StatsError(f"memit: give the key statistics as {{layer: KeyStats}} for the layers {layers}")
    z = optimize_values(model, tokenizer, requests, point=top.layer_output, templates=templates, hparams=hparams,
                        bos_id=bos_id)
    targets = z.values.astype(np.float64)
    bare = templates.index(PLACEHOLDER) if PLACEHOLDER in templates else None
    current, terms, resid_norms = model, {}, {}
    for i, site in enumerate(sites):
        points = [site.key_point, top.layer_output]
        vals = values_at_subject(current, tokenizer, requests, points, templates, bos_id=bos_id)
        k = np.einsum("rjf,j->rf", vals[site.key_point].astype(np.float64), weights)
        if bare is not None:
            h = vals[top.layer_output][:, bare].astype(np.float64)
        else:
            h = values_at_subject(current, tokenizer, requests, [top.layer_output], bos_id=bos_id)[
                top.layer_output][:, 0].astype(np.float64)
        resid = (targets - h) / (len(sites) - i)
        c = second_moment_of(stats, site.layer, k.shape[1])
        term = memit_update(k, resid, c, hparams.mom2_update_weight)
        terms[site.kernel] = term
        resid_norms[str(site.layer)] = float(np.linalg.norm(resid, axis=1).mean())
        if i + 1 < len(sites):
            current = apply(current, Delta({site.kernel: term}))
    metadata = {"method": "memit", "layers": layers, "edits": len(requests),
                "mom2_update_weight": float(hparams.mom2_update_weight), "residual_norm_mean": resid_norms,
                "value_loss_final_mean": float(z.losses[-1].mean()), "templates": len(templates),
                "case_ids": [r.case_id if r.case_id is None or isinstance(r.case_id, (str, int)) else str(r.case_id)
                             for r in requests]}
    return Delta(terms, kind="memit", source=f"memit:{len(requests)} edits", metadata=metadata)
