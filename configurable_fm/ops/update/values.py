"""Target values v* of edit requests: a vector added at one tap point, optimised so the model says target_new.

    res = optimize_values(model, tok, requests, point="layers.5.mlp.down_proj.output", templates=flat, hparams=hp)
    res.values       # (R, D) float32 v* = v_init + delta: ROME's v (point = the projection's output) or MEMIT's z
                     # (point = the residual stream after the last edited layer)

For request r with prompt rows x_j + p (the context templates, flattened; one should be '{}', the bare
prompt) and KL rows p'_i ('{} is a' by default), a vector delta_r (D,) is added to the value at `point` at the
subject's last token of every row of r (analysis.intervene with an add at those positions; differentiable), and

    L_r(delta) = (1/J) sum_j  -(1/|o|) sum_t log P(o_t | x_j + p + o_<t)                  (NLL of target_new o)
               + kl_factor * (1/I) sum_i KL( P_delta(. | p'_i) || P_0(. | p'_i) )    (at the subject's last token)
               + v_weight_decay * ||delta|| / ||v_init||^2

is minimised with Adam (optax.adam(v_lr), delta_0 = 0) for at most v_num_grad_steps iterations; each
iteration computes L_r and stops request r when L_r < loss_stop or at the last iteration (so at most
steps - 1 updates, as the authors' loop), else takes an Adam step and projects
||delta|| <= clamp_norm_factor * ||v_init|| (ROME's clamp_norm_factor). v_init is the value at the point at the
subject's last token of the request's row of the bare prompt '{}' (the authors list it first; without a '{}'
template, the request's first row). P_0 is the unedited model. This is
`rome/compute_v.py` and `memit/compute_z.py` (the loss read from the final logits: v_loss_layer = last layer;
the weight decay is the code's ||delta|| / ||v_init||^2, not the paper's squared norm).

Batching: requests are independent, so their rows go through one forward (each row adds its own request's
delta: a (B, 1, D) vector with a (B, T) boolean position mask), the loss is the sum of the L_r, and Adam, which
acts element-wise, gives each request exactly the update it would get alone. The whole loop is one jitted
`lax.scan`; logits are computed only at the positions the losses read (targets and KL lookups), not at every
token. Requests go through in chunks of `batch_size` (the last chunk padded with copies, whose results are
dropped) so that memory and compilations stay bounded.
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

from configurable_fm.analysis.capture import capture, intervene
from configurable_fm.analysis.interventions import add
from configurable_fm.ops.update.keys import Encoder, check_template, padded_length
from configurable_fm.ops.update.requests import PLACEHOLDER, Request, fill


@dataclasses.dataclass(frozen=True)
class ValueHparams:
    """The value optimisation's settings (names as in the authors' JSONs; defaults: ROME, GPT-2 XL / GPT-J)."""

    v_num_grad_steps: int = 20
    v_lr: float = 0.5
    v_weight_decay: float = 0.5
    clamp_norm_factor: float = 4.0
    kl_factor: float = 0.0625
    loss_stop: float = 5e-2
    kl_prompts: tuple[str, ...] = ("{} is a",)
    batch_size: int = 16  # requests per jitted chunk

    def __post_init__(self):
        object.__setattr__(self, "kl_prompts", tuple(self.kl_prompts))
        if self.v_num_grad_steps < 1 or self.batch_size < 1:
            raise ValueError(f"v_num_grad_steps and batch_size must be >= 1, got {self}")
        for name in ("v_lr", "v_weight_decay", "clamp_norm_factor", "kl_factor", "loss_stop"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float, np.number)) or not 0 <= v < np.inf:  # NaN too
                raise ValueError(f"{name} must be a finite number >= 0, got {v!r}")
        for p in self.kl_prompts:
            check_template(p)


@dataclasses.dataclass(frozen=True)
class Values:
    """Result of optimize_values: values = init + delta (R, D) float32; losses (steps, R) (the loss at each
    iteration, repeated after a request stopped); nll / kl: the last iteration's terms (R,)."""

    values: np.ndarray
    init: np.ndarray
    delta: np.ndarray
    losses: np.ndarray
    nll: np.ndarray
    kl: np.ndarray


def _rows(enc: Encoder, requests: Sequence[Request], templates: Sequence[str], kl_prompts: Sequence[str],
          shape: tuple[int, int] = (0, 0)):
    """Token rows of every request: its rewriting rows (template + prompt + target[:-1]) then its KL rows.

    Returns numpy arrays: ids (B, T), lookup (B,) subject-last index, pos (B, S) positions whose logits are read,
    tgt (B, S) the target token at each, tmask (B, S) 1 on target tokens of rewriting rows, is_kl (B,),
    row_req (B,) the request of each row; and rows per request. T and S are at least `shape`."""
    ids, lookup, pos, tgt, is_kl, row_req = [], [], [], [], [], []
    s = 1
    for ri, r in enumerate(requests):
        target = enc.target(r.target_new)
        s = max(s, len(target))
        for t in templates:
            p_ids, last = enc.prompt(fill(t, r.prompt), r.subject)
            ids.append(p_ids + target[:-1])
            lookup.append(last)
            pos.append(list(range(len(p_ids) - 1, len(p_ids) - 1 + len(target))))
            tgt.append(target)
            is_kl.append(False)
            row_req.append(ri)
        for t in kl_prompts:
            p_ids, last = enc.prompt(t, r.subject)
            ids.append(p_ids)
            lookup.append(last)
            pos.append([last])
            tgt.append([0])
            is_kl.append(True)
            row_req.append(ri)
    b, t_len = len(ids), max(padded_length(max(len(x) for x in ids)), shape[0])
    s = max(1 << (s - 1).bit_length(), 4, shape[1])  # target lengths bucketed too: 4, 8, 16, ...
    ids_a = np.zeros((b, t_len), np.int32)
    pos_a = np.zeros((b, s), np.int32)
    tgt_a = np.zeros((b, s), np.int32)
    tmask_a = np.zeros((b, s), np.float32)
    for i in range(b):
        ids_a[i, :len(ids[i])] = ids[i]
        pos_a[i, :len(pos[i])] = pos[i]
        tgt_a[i, :len(tgt[i])] = tgt[i]
        if not is_kl[i]:
            tmask_a[i, :len(tgt[i])] = 1.0
    return (ids_a, np.asarray(lookup, np.int32), pos_a, tgt_a, tmask_a, np.asarray(is_kl),
            np.asarray(row_req, np.int32), len(templates) + len(kl_prompts))


def _safe_norm(x, axis=-1):
    """||x|| with gradient 0 (not NaN) at x = 0 (torch's norm backward at 0 gives 0 too)."""
    sq = jnp.sum(jnp.square(x), axis=axis)
    return jnp.where(sq > 0, jnp.sqrt(jnp.where(sq > 0, sq, 1.0)), 0.0)


@functools.partial(jax.jit, static_argnames=("graphdef", "point", "steps", "n_req"))
def _optimize(state, ids, lookup, pos, tgt, tmask, is_kl, row_req, first_row, hp, *, graphdef, point: str,
              steps: int, n_req: int):
    model = nnx.merge(graphdef, state)
    b, t = ids.shape
    lookup_mask = jnp.arange(t)[None, :] == lookup[:, None]  # (B, T)
    per_request = lambda x_B: jax.ops.segment_sum(x_B, row_req, num_segments=n_req)  # (B,) -> (R,)  # noqa: E731
    rewrite = (~is_kl).astype(jnp.float32)
    kl_rows = is_kl.astype(jnp.float32)
    n_rewrite = jnp.maximum(per_request(rewrite), 1.0)  # (R,)
    n_kl = jnp.maximum(per_request(kl_rows), 1.0)
    n_target = jnp.maximum(tmask.sum(1), 1.0)  # (B,)

    def forward(m):
        if hasattr(m, "hidden_states") and hasattr(m, "logits"):
            h = m.hidden_states(ids)[0]
            return m.logits(jnp.take_along_axis(h, pos[..., None], axis=1))
        return jnp.take_along_axis(m(ids), pos[..., None], axis=1)

    def logprobs(delta_RxD):
        vec = delta_RxD[row_req][:, None, :]  # (B, 1, D): each row its request's delta
        logits = intervene(model, {point: add(vec, positions=lookup_mask)}, forward)
        return jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)  # (B, S, V)

    # v_init and the unedited model's KL distributions P_0, from one forward
    logits0, captured = capture(model, point, forward)
    v_init = captured[point][jnp.arange(b), lookup][first_row].astype(jnp.float32)  # (R, D)
    init_norm2 = jnp.sum(jnp.square(v_init), -1)
    max_norm = hp["clamp_norm_factor"] * jnp.sqrt(init_norm2)
    logp0 = jax.lax.stop_gradient(jax.nn.log_softmax(logits0.astype(jnp.float32), axis=-1)[:, 0])  # (B, V)

    def loss_fn(delta):
        lp = logprobs(delta)
        tok_lp = jnp.take_along_axis(lp, tgt[..., None], axis=-1)[..., 0]  # (B, S)
        nll_row = -(tok_lp * tmask).sum(1) / n_target  # (B,)
        nll = per_request(nll_row * rewrite) / n_rewrite  # (R,)
        lp_kl = lp[:, 0]  # (B, V)
        kl_row = jnp.sum(jnp.exp(lp_kl) * (lp_kl - logp0), axis=-1)  # KL(P_delta || P_0)
        kl = per_request(kl_row * kl_rows) / n_kl
        wd = hp["v_weight_decay"] * _safe_norm(delta) / init_norm2
        loss = nll + hp["kl_factor"] * kl + wd
        return loss.sum(), (loss, nll, kl)

    opt = optax.adam(hp["v_lr"])
    delta0 = jnp.zeros_like(v_init)

    def step(carry, i):
        delta, opt_state, done = carry
        (_, (loss, nll, kl)), g = jax.value_and_grad(loss_fn, has_aux=True)(delta)
        stop = done | (loss < hp["loss_stop"]) | (i == steps - 1)
        updates, opt_state = opt.update(g, opt_state, delta)
        new = delta + updates
        norm = _safe_norm(new)
        new = new * jnp.where(norm > max_norm, max_norm / jnp.maximum(norm, 1e-30), 1.0)[:, None]
        delta = jnp.where(stop[:, None], delta, new)
        return (delta, opt_state, stop), (loss, nll, kl)

    carry = (delta0, opt.init(delta0), jnp.zeros((n_req,), bool))
    (delta, _, _), (losses, nlls, kls) = jax.lax.scan(step, carry, jnp.arange(steps))
    return v_init, delta, losses, nlls, kls


def optimize_values(model: nnx.Module, tokenizer, requests: Sequence[Request], *, point: str,
                    templates: Sequence[str], hparams: ValueHparams = ValueHparams(),
                    bos_id: int | None = None) -> Values:
    """v* = v_init + delta for each request (module docstring). point: the tap point the delta is added to
    (ROME: the site's value_point; MEMIT: the residual stream after the last edited layer). templates: the
    flattened context templates (one should be '{}': v_init is read there). The model is not modified."""
    if not requests:
        raise ValueError("optimize_values: no requests")
    templates = [check_template(t) for t in templates]
    if not templates:
        raise ValueError("optimize_values: no templates")
    bare = templates.index(PLACEHOLDER) if PLACEHOLDER in templates else 0  # v_init's template
    enc = Encoder(tokenizer, bos_id)
    graphdef, state = nnx.split(model)
    hp = {k: jnp.float32(getattr(hparams, k)) for k in
          ("v_lr", "v_weight_decay", "clamp_norm_factor", "kl_factor", "loss_stop")}
    n = len(requests)
    chunk = min(hparams.batch_size, n)
    everything = _rows(enc, requests, templates, hparams.kl_prompts)  # the (T, S) every chunk is padded to
    shape = (everything[0].shape[1], everything[2].shape[1])
    outs = []
    for start in range(0, n, chunk):
        part = list(requests[start:start + chunk])
        real = len(part)
        part += [part[0]] * (chunk - real)  # pad the last chunk: one compilation
        ids, lookup, pos, tgt, tmask, is_kl, row_req, per = _rows(enc, part, templates, hparams.kl_prompts, shape)
        first_row = np.arange(chunk, dtype=np.int32) * per + bare  # each request's row of v_init
        v_init, delta, losses, nlls, kls = _optimize(
            state, *(jnp.asarray(a) for a in (ids, lookup, pos, tgt, tmask, is_kl, row_req, first_row)), hp,
            graphdef=graphdef, point=point, steps=int(hparams.v_num_grad_steps), n_req=chunk)
        outs.append((np.asarray(v_init)[:real], np.asarray(delta)[:real], np.asarray(losses)[:, :real],
                     np.asarray(nlls)[:, :real], np.asarray(kls)[:, :real]))
    v_init, delta = (np.concatenate([o[i] for o in outs], 0) for i in (0, 1))
    losses, nlls, kls = (np.concatenate([o[i] for o in outs], 1) for i in (2, 3, 4))
    return Values(values=(v_init + delta).astype(np.float32), init=v_init, delta=delta, losses=losses,
                  nll=nlls[-1], kl=kls[-1])
