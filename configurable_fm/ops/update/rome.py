"""ROME (Meng et al., 2022): a rank-one update of one MLP output projection that inserts one fact.

    stats = second_moments(model, batches, layers=[5], n_tokens=100_000)
    delta = rome(model, tok, request, layer=5, stats=stats, key=jax.random.key(0))   # a bricks.deltas.Delta
    edited = bricks.deltas.apply(model, delta); back = bricks.deltas.rollback(edited, delta)

The math in our layout. The projection is y = k @ W + b with W (F, D) (the transpose of torch's weight), keys
k (F,) and values y (D,). With C = E[k k^T] (F, F) the keys' second moment (stats.py), ROME solves

    min ||K^T (W + dW) - V||_F   s.t.   (W + dW)^T k* + b = v*

(K the old keys as columns, V their values = K^T W + b, C proportional to K K^T). The Lagrangian gives
dW = C^{-1} k* lambda^T for some lambda (D,); the constraint fixes lambda, so

    u = C^{-1} k*  (F,),      r = v* - (W^T k* + b)  (D,),      dW = u r^T / (u^T k*)      (F, D), rank one.

(The paper's W_p = W^T (D, F) form: W_p + Lambda (C^{-1} k*)^T with Lambda = r / ((C^{-1} k*)^T k*); the same
matrix transposed.) Invariants: (W + dW)^T k* + b = v* exactly; any key k with u^T k = k^T C^{-1} k* = 0 (orthogonal
to k* in the C^{-1} metric) is mapped as before. The solve and the products are float64 (numpy, on the host);
the factors are stored float32 as LowRank(a = u/||u|| (F, 1), b = ||u|| r^T / (u^T k*) (1, D)), the
authors' left/right vectors.

k* (keys.py): the key at the subject's last token averaged over the context templates; v* (values.py): the
value at the projection's output at the bare prompt plus the optimised delta.

Deviation from the authors' code (`rome_main.py`): there the denominator uses the key of the bare prompt
(`cur_input`) while u uses the template-averaged key, which makes the update occasionally huge ("disabling
edits", Gupta et al. 2024); here k* is the averaged key everywhere (r-ROME's homogeneous keys,
`enable_random_prefix_keys`), so the constraint holds for the key that u is built from. stats=None is the
authors' `mom2_adjustment: false` (C = I: u = k*), which EasyEdit's default YAMLs use and which is less specific.
"""
from __future__ import annotations

import dataclasses
from typing import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from configurable_fm.bricks.deltas import Delta, LowRank
from configurable_fm.bricks.paths import flat_params
from configurable_fm.ops.update.keys import (ROME_CONTEXT, Context, context_templates, flatten, group_average,
                                             values_at_subject)
from configurable_fm.ops.update.requests import PLACEHOLDER, Request
from configurable_fm.ops.update.sites import edit_site
from configurable_fm.ops.update.stats import KeyStats, StatsError, second_moment_of
from configurable_fm.ops.update.values import ValueHparams, optimize_values


@dataclasses.dataclass(frozen=True)
class ROMEHparams(ValueHparams):
    """ROME's settings: the value optimisation (values.ValueHparams, defaults of the released GPT-2 XL / GPT-J
    JSONs: 20 steps, lr 0.5, weight decay 0.5, clamp 4, kl 0.0625) and the context templates (keys.py:
    ROME_CONTEXT = '{}' + 10 sampled prefixes of 5 tokens + 10 of 10, one group)."""

    context: Context = ROME_CONTEXT


def solve_psd(c: np.ndarray, rhs: np.ndarray, what: str) -> np.ndarray:
    """c^{-1} rhs in float64 (c symmetric positive definite); a StatsError naming `what` when c is singular."""
    c = np.asarray(c, np.float64)
    try:
        x = np.linalg.solve(c, np.asarray(rhs, np.float64))
    except np.linalg.LinAlgError:
        raise StatsError(f"{what}: the key second moment is singular (computed from too few tokens? it needs at "
                         f"least as many tokens as key features, {c.shape[0]}, and in practice many more)") from None
    if not np.all(np.isfinite(x)):
        raise StatsError(f"{what}: solving with the key second moment gave non-finite values")
    return x


def rome_update(kernel, key, value, second_moment=None, bias=None) -> LowRank:
    """The rank-one change dW (F, D) of `kernel` W (F, D) that maps `key` k* (F,) to `value` v* (D,) (module
    docstring): dW = u r^T / (u^T k*), u = C^{-1} k*, r = v* - (W^T k* + b); C = I when second_moment is None.
    Float64 throughout; returns LowRank(a (F, 1), b (1, D)) with float32 jax arrays."""
    w = np.asarray(jax.device_get(kernel), np.float64)
    k = np.asarray(key, np.float64).reshape(-1)
    v = np.asarray(value, np.float64).reshape(-1)
    f, d = w.shape
    if k.shape != (f,) or v.shape != (d,):
        raise ValueError(f"rome_update: kernel is {w.shape} but key is {k.shape} and value {v.shape}")
    u = k.copy() if second_moment is None else solve_psd(second_moment, k, "rome_update")
    current = k @ w + (0.0 if bias is None else np.asarray(jax.device_get(bias), np.float64))
    denom = float(u @ k)
    if not denom > 0:
        raise StatsError(f"rome_update: k*^T C^-1 k* = {denom:g} is not positive (C is not positive definite?)")
    norm = float(np.linalg.norm(u))
    a = (u / norm)[:, None]
    b = ((v - current) * (norm / denom))[None, :]
    return LowRank(jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32))


def rome(model: nnx.Module, tokenizer, request: Request, *, layer: int,
         stats: KeyStats | np.ndarray | Mapping[int, KeyStats | np.ndarray] | None,
         hparams: ROMEHparams = ROMEHparams(), key: jax.Array | None = None, bos_id: int | None = None) -> Delta:
    """The ROME edit of `request` at `layer` as a Delta with one LowRank rank-one term on the layer's MLP
    output projection (`layers.<l>.mlp.down_proj.kernel`, gpt2 `h.<l>.mlp.c_proj.kernel`). The model is not
    modified: `bricks.deltas.apply(model, delta)` is the edited model.

    tokenizer: a tokenizers.Tokenizer (or anything with encode(text, add_special_tokens=False) and decode);
    bos_id: prepended to every row when the model expects it. stats: the key second moment of that layer
    (KeyStats, an (F, F) array, a {layer: ...} mapping, or None for C = I). hparams: ROMEHparams. key: PRNG key
    for the sampled context prefixes (needed when hparams.context holds sampled Generated items). The prefixes
    are generated anew on every call; for many edits generate them once (`keys.context_templates`) and pass the
    strings: `ROMEHparams(context=templates)` (the authors cache them likewise). The statistics are not checked
    against the model (hashing the upstream weights costs a pass over them): `stats.cached_second_moments`
    keys its files by that hash.
    Metadata: method, layer, case_id, subject, prompt, target_new, the norms of k*, v*, the residual and the
    update, (u/||u||)^T k*, bare_prompt_share (u^T k_bare / u^T k*: the share of the change written at the bare
    prompt), the value losses, and the stats' corpus and token count.
    """
    if not isinstance(request, Request):
        raise TypeError(f"rome: request must be a Request, got {type(request).__name__}")
    site = edit_site(model, layer)
    flat = flat_params(model)
    groups = context_templates(model, tokenizer, hparams.context, key=key, bos_id=bos_id)
    flat_templates = flatten(groups)
    k_JxF = values_at_subject(model, tokenizer, [request], [site.key_point], flat_templates,
                              bos_id=bos_id)[site.key_point][0].astype(np.float64)
    k = group_average(k_JxF, groups)  # k*: compute_keys' average over the groups
    vals = optimize_values(model, tokenizer, [request], point=site.value_point, templates=flat_templates,
                           hparams=hparams, bos_id=bos_id)
    v = vals.values[0].astype(np.float64)
    w = flat[site.kernel]
    c = second_moment_of(stats, site.layer, w.shape[0])
    bias = flat.get(site.bias)
    term = rome_update(w, k, v, c, bias)
    w64 = np.asarray(jax.device_get(w), np.float64)
    resid = v - (k @ w64 + (0.0 if bias is None else np.asarray(jax.device_get(bias), np.float64)))
    info = stats[site.layer] if isinstance(stats, Mapping) else stats
    metadata = {
        "method": "rome", "layer": site.layer, "path": site.kernel, "case_id": _jsonable(request.case_id),
        "subject": request.subject, "prompt": request.prompt, "target_new": request.target_new,
        "key_norm": float(np.linalg.norm(k)), "value_norm": float(np.linalg.norm(v)),
        "residual_norm": float(np.linalg.norm(resid)),
        "unit_u_dot_key": float(np.asarray(term.a, np.float64)[:, 0] @ k),
        "bare_prompt_share": _bare_share(term, k, k_JxF, flat_templates),
        "update_norm": float(np.linalg.norm(term.a) * np.linalg.norm(term.b)),
        "value_loss": [float(x) for x in vals.losses[:, 0]], "nll": float(vals.nll[0]), "kl": float(vals.kl[0]),
        "templates": len(flat_templates),
        "stats": None if c is None else ({"corpus": info.corpus, "tokens": info.tokens}
                                         if isinstance(info, KeyStats) else "array"),
    }
    return Delta({site.kernel: term}, kind="rome", source=f"rome:{request.subject}", metadata=metadata)


def _bare_share(term: LowRank, key: np.ndarray, k_JxF: np.ndarray, templates: Sequence[str]) -> float | None:
    """u^T k_bare / u^T k*: the share of the intended change r that the update writes at the bare prompt's key
    (1 when k* is that key; None without a bare '{}' template). A key averaged over contexts can miss the bare
    prompt, e.g. for a subject at position 0 (experiments/edit/README.md, "Subjects at position 0")."""
    if PLACEHOLDER not in templates:
        return None
    a = np.asarray(term.a, np.float64)[:, 0]
    return float(a @ k_JxF[list(templates).index(PLACEHOLDER)] / (a @ key))


def _jsonable(x):
    return x if x is None or isinstance(x, (str, int, float, bool)) else str(x)
