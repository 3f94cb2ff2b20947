"""FT-L (Zhu et al. 2020, the ROME paper's FT+L baseline, EasyEdit's FT): fine-tune one MLP output projection on
the edit prompts' targets under an L-infinity constraint on the change.

    delta = ft(model, tok, requests, layer=0, hparams=FTHparams(norm_constraint=5e-4))
    edited = bricks.deltas.apply(model, delta)      # one Dense term on layers.0.mlp.down_proj.kernel

Loss (all requests in one batch), minimised over dW (F, D) added to the kernel W of the layer's projection
(sites.py: `layers.<l>.mlp.down_proj.kernel`, gpt2 `h.<l>.mlp.c_proj.kernel`):
  objective="target" (EasyEdit's current `ft_main.py`, FT-M's loss): the mean over requests of the mean
    teacher-forced NLL of target_new's tokens after the prompt (prompt + target[:-1] fed, target tokens scored);
  objective="prompt_last" (the ROME authors' `ft_main.py`, EasyEdit's FT-L `prompt_last`): every target token's
    log-probability read at the prompt's last position (the same for one-token targets).
Adam (optax.adam(lr), the authors' torch Adam with weight_decay 0) from dW = 0; each iteration computes the loss,
stops when it is below `loss_stop` (authors: 1e-2), else takes a step and clamps dW to [-eps, eps] entry-wise
(eps = norm_constraint: W' in [W - eps, W + eps], the authors' `torch.clamp` after every step; None is the
unconstrained FT). The loop is one jitted lax.scan over num_steps (eps traced: one compilation serves every norm
constraint). Returns Dense(dW) float32.

Deviations: only the projection's kernel is tuned (the authors' module-name match also tunes its bias where there
is one, gpt2's c_proj); all requests form one batch (the authors chunk them by batch_size, one optimiser step per
chunk); prompts are encoded as the other editors do (keys.Encoder: [bos] + ids(prompt) + ids(target)).
Defaults: the ROME authors' GPT-2 XL FT+L (25 steps, lr 5e-4, eps 5e-4).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from configurable_fm.bricks.deltas import Delta, Dense
from configurable_fm.bricks.paths import flat_params, with_params
from configurable_fm.ops.update.keys import Encoder, padded_length
from configurable_fm.ops.update.memit import case_ids
from configurable_fm.ops.update.requests import Request, fill
from configurable_fm.ops.update.sites import edit_site

OBJECTIVES = ("target", "prompt_last")


@dataclasses.dataclass(frozen=True)
class FTHparams:
    """FT-L's settings (module docstring). norm_constraint: the L-infinity radius eps of the change (None:
    unconstrained); objective: 'target' or 'prompt_last'."""

    num_steps: int = 25
    lr: float = 5e-4
    norm_constraint: float | None = 5e-4
    loss_stop: float = 1e-2
    objective: str = "target"

    def __post_init__(self):
        if self.num_steps < 1 or not self.lr > 0:
            raise ValueError(f"FTHparams: num_steps must be >= 1 and lr > 0, got {self}")
        if self.norm_constraint is not None and not self.norm_constraint > 0:
            raise ValueError(f"FTHparams: norm_constraint must be > 0 or None, got {self.norm_constraint!r}")
        if self.objective not in OBJECTIVES:
            raise ValueError(f"FTHparams: objective must be one of {OBJECTIVES}, got {self.objective!r}")


def ft_rows(enc: Encoder, requests: Sequence[Request], objective: str):
    """ids (R, T) right-padded, pos (R, S) positions whose logits are read, tgt (R, S) the target tokens there,
    mask (R, S) 1 on real target tokens."""
    rows, poss, tgts = [], [], []
    for r in requests:
        prompt = enc.ids(fill(r.prompt, r.subject))
        target = enc.target(r.target_new)
        if objective == "target":
            rows.append(prompt + target[:-1])
            poss.append(list(range(len(prompt) - 1, len(prompt) - 1 + len(target))))
        else:
            rows.append(prompt)
            poss.append([len(prompt) - 1] * len(target))
        tgts.append(target)
    t, s = padded_length(max(len(x) for x in rows)), max(len(x) for x in tgts)
    ids, pos, tgt, mask = (np.zeros((len(rows), n), dt) for n, dt in
                           ((t, np.int32), (s, np.int32), (s, np.int32), (s, np.float32)))
    for i, (x, p, y) in enumerate(zip(rows, poss, tgts)):
        ids[i, :len(x)] = x
        pos[i, :len(p)] = p
        tgt[i, :len(y)] = y
        mask[i, :len(y)] = 1.0
    return ids, pos, tgt, mask


@functools.partial(jax.jit, static_argnames=("graphdef", "path", "steps", "clamp"))
def _finetune(state, ids, pos, tgt, mask, lr, loss_stop, eps, *, graphdef, path: str, steps: int, clamp: bool):
    """eps: the clamp radius, a float32 scalar (traced: a sweep over norm constraints compiles once), used when
    `clamp` (False: the unconstrained FT)."""
    model = nnx.merge(graphdef, state)
    w0 = flat_params(model)[path]
    opt = optax.adam(lr)
    rows = jnp.arange(ids.shape[0])[:, None]

    def loss_fn(dw):
        edited = with_params(model, {path: (w0.astype(jnp.float32) + dw).astype(w0.dtype)})
        logits = edited(ids)[rows, pos].astype(jnp.float32)  # (R, S, V)
        nll = -jnp.take_along_axis(jax.nn.log_softmax(logits, -1), tgt[..., None], -1)[..., 0]
        return jnp.mean((nll * mask).sum(-1) / mask.sum(-1))

    def step(carry, _):
        dw, opt_state, done = carry
        loss, g = jax.value_and_grad(loss_fn)(dw)
        done = done | (loss < loss_stop)
        updates, new_opt = opt.update(g, opt_state, dw)
        new_dw = optax.apply_updates(dw, updates)
        if clamp:
            new_dw = jnp.clip(new_dw, -eps, eps)
        dw = jnp.where(done, dw, new_dw)
        opt_state = jax.tree.map(lambda a, b: jnp.where(done, a, b), opt_state, new_opt)
        return (dw, opt_state, done), loss

    dw0 = jnp.zeros(w0.shape, jnp.float32)
    (dw, _, _), losses = jax.lax.scan(step, (dw0, opt.init(dw0), jnp.zeros((), bool)), None, length=steps)
    return dw, losses, loss_fn(dw)


def ft(model: nnx.Module, tokenizer, requests: Sequence[Request], *, layer: int, hparams: FTHparams = FTHparams(),
       bos_id: int | None = None) -> Delta:
    """The FT-L edit of `requests` (module docstring) as a Delta with one Dense term on `layer`'s MLP output
    projection kernel. The model is not modified. Metadata: method, layer, number of edits, the settings, the loss
    at every iteration and after the last step, and the largest |dW| entry."""
    requests = list(requests)
    if not requests or not all(isinstance(r, Request) for r in requests):
        raise TypeError("ft: requests must be a non-empty sequence of Request")
    site = edit_site(model, layer)
    ids, pos, tgt, mask = ft_rows(Encoder(tokenizer, bos_id), requests, hparams.objective)
    graphdef, state = nnx.split(model)
    eps = None if hparams.norm_constraint is None else float(hparams.norm_constraint)
    dw, losses, final = _finetune(state, *(jnp.asarray(a) for a in (ids, pos, tgt, mask)), jnp.float32(hparams.lr),
                                  jnp.float32(hparams.loss_stop), jnp.float32(0.0 if eps is None else eps),
                                  graphdef=graphdef, path=site.kernel, steps=int(hparams.num_steps),
                                  clamp=eps is not None)
    metadata = {"method": "ft", "layer": site.layer, "path": site.kernel, "edits": len(requests),
                "num_steps": int(hparams.num_steps), "lr": float(hparams.lr), "norm_constraint": eps,
                "objective": hparams.objective, "loss": [float(x) for x in np.asarray(losses)],
                "loss_final": float(final), "max_abs_change": float(jnp.max(jnp.abs(dw))),
                "case_ids": case_ids(requests)}
    return Delta({site.kernel: Dense(dw)}, kind="ft", source=f"ft:{len(requests)} edits", metadata=metadata)
