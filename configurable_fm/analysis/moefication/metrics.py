"""How well a MoEfied model approximates its dense source, layer by layer, on token batches.

    report = layer_metrics(dense, moe, batches)         # {path: LayerMetrics}
    print(format_metrics(report))

Each MoEfied FFN is fed the dense model's FFN inputs x (so the errors of earlier layers do not compound: the
per-layer view MoEfication reports), over the N masked-in tokens (analysis/batches.py token_mask):
    rel_error   sqrt(sum_t ||y_t - f_t||^2 / sum_t ||f_t||^2), y the MoEfied FFN's output, f the dense FFN's
    recall      mean_t |chosen_t ∩ oracle_t| / k: how often the router picks the experts of largest ||h_e|| (the
                oracle's top-k of the routed experts); 1 for the oracle router and with all experts active
    mass        mean_t sum_{e chosen} ||h_te||^2 / sum_e ||h_te||^2 over the routed experts: the share of the
                routed activation energy the chosen experts carry
One jitted step per batch (a capture of the dense model's FFN inputs and outputs, the MoEfied modules run on them);
the sums are accumulated in float64 on the host.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Iterable, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from configurable_fm.analysis.batches import limited, token_mask
from configurable_fm.analysis.capture import capture
from configurable_fm.analysis.moefication.calibration import as_batch
from configurable_fm.analysis.moefication.module import expert_mass
from configurable_fm.analysis.moefication.transform import MoefyError, moefied_layers


@dataclasses.dataclass(frozen=True)
class LayerMetrics:
    """rel_error, recall and mass of one MoEfied FFN over `tokens` tokens (module docstring)."""

    rel_error: float
    recall: float
    mass: float
    tokens: int


def _module_at(model, path: str):
    node = model
    for seg in path.split("."):
        node = node[int(seg)] if seg.isdigit() else getattr(node, seg)
    return node


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _sums(dense_def, moe_def, paths, dense_state, moe_state, ids, am, m):
    dense, moe = nnx.merge(dense_def, dense_state), nnx.merge(moe_def, moe_state)
    points = [f"{p}.input" for p in paths] + [f"{p}.output" for p in paths]
    _, values = capture(dense, points, lambda mm: mm(ids, attention_mask=am))
    out = []
    for p in paths:
        mod = _module_at(moe, p)
        x, f = values[f"{p}.input"], values[f"{p}.output"].astype(jnp.float32)
        hidden = mod.expert_hidden(x)
        chosen = mod.expert_mask(mod.router_scores(x, hidden))
        y = mod.combine(hidden, chosen).astype(jnp.float32)
        s = mod.num_shared
        oracle = mod.oracle_mask(hidden)[..., s:]
        energy = jnp.square(expert_mass(hidden[..., s:, :]))
        total = jnp.sum(energy, axis=-1)
        share = jnp.where(total > 0, jnp.sum(energy * chosen[..., s:], axis=-1) / jnp.where(total > 0, total, 1.0), 1.0)
        recall = jnp.sum(chosen[..., s:] * oracle, axis=-1) / mod.top_k
        out.append(jnp.stack([jnp.sum(m * jnp.sum(jnp.square(y - f), axis=-1)), jnp.sum(m * jnp.sum(f * f, axis=-1)),
                              jnp.sum(m * recall), jnp.sum(m * share)]))
    return jnp.stack(out)


def layer_metrics(dense, moe, batches: Iterable, *, max_batches: Optional[int] = None) -> dict[str, LayerMetrics]:
    """{FFN path: LayerMetrics} of the MoEfied `moe` against its dense source `dense` (module docstring).

    batches: pipeline dicts or (B, T) id arrays; the first `max_batches`."""
    layers = moefied_layers(moe)
    paths = tuple(p for p, _ in layers)
    dense_def, dense_state = nnx.split(dense)
    moe_def, moe_state = nnx.split(moe)
    acc, tokens = np.zeros((len(paths), 4)), 0
    it, _ = limited(batches, max_batches)
    for i, b in enumerate(it):
        b = as_batch(b)
        m = token_mask(b, f"batch {i}")
        ids = np.asarray(b["inputs"], np.int32)
        am = np.asarray(b.get("attention_mask", np.ones_like(ids)), np.int32)
        acc += np.asarray(_sums(dense_def, moe_def, paths, dense_state, moe_state, jnp.asarray(ids),
                                jnp.asarray(am), jnp.asarray(m)), np.float64)
        tokens += int(m.sum())
    if tokens == 0:
        raise MoefyError("layer_metrics: the batches hold no tokens")
    return {p: LayerMetrics(rel_error=float(np.sqrt(a[0] / a[1])) if a[1] > 0 else 0.0, recall=float(a[2] / tokens),
                            mass=float(a[3] / tokens), tokens=tokens) for p, a in zip(paths, acc)}


def format_metrics(report: dict[str, LayerMetrics]) -> str:
    """A table: per FFN, the relative output error, the router's recall of the oracle's choices and the share of
    the activation energy in the chosen experts; a mean row."""
    head = f"{'ffn':<16} {'rel_error':>9} {'recall':>7} {'mass':>6}"
    rows = [head, "-" * len(head)]
    for p, r in report.items():
        rows.append(f"{p:<16} {r.rel_error:>9.4f} {r.recall:>7.3f} {r.mass:>6.3f}")
    vals = np.array([[r.rel_error, r.recall, r.mass] for r in report.values()])
    rows.append(f"{'mean':<16} {vals[:, 0].mean():>9.4f} {vals[:, 1].mean():>7.3f} {vals[:, 2].mean():>6.3f}")
    return "\n".join(rows)
