"""Per-input scales for the 'scaled' sparsity score: the root mean square gradient of the loss with respect to each
input entry of a Linear (the diagonal Fisher information of its input), measured on calibration batches.

    s = fisher_scales(model, batches, ["layers.*.mlp.down_proj"])       # {path: s (in,) float32}
    cal = calibrate(model, batches, list(s), score="scaled", scales=s)  # histograms of |x_i| s_i
    sparse = sparsify_activations(model, cal.thresholds(0.5), score="scaled", scales=s)

For a Linear at `path` with input x (B, T, in) and a batch's summed next-token loss L = sum_{b,t} m_bt nll_bt
(m the scored-token mask, measure.evaluate's; nll the NLL of the batch's targets, or with sampled=True of tokens
drawn from the model's own next-token distributions):

    g_bt = dL / dx_bt          (in,): through every later position (zeroing x_bt changes the losses at t and after)
    s_i  = sqrt( sum_{batches, b, t} n_bt g_bt,i^2 / sum n_bt )

n the token mask (analysis/batches.py `token_mask`: the real tokens, up to a row's last scored one), so the mean is
over every token whose x a sparse Linear would see, scored or not (a prompt token's x moves the loss of the answer
after it).

measured as the gradient of L with respect to a zero (B, T, in) added at the Linear's `.input` tap point
(analysis.intervene with analysis.add), for all the paths in one backward pass per batch. Dropping x_bt,i changes
L by about -x_bt,i g_bt,i, whose mean square over tokens is x_i^2 s_i^2 if the two are uncorrelated; ranking
entries by |x_i| s_i is then the second-order (Optimal Brain Damage-style, with the empirical Fisher for the Hessian's
diagonal) estimate of what dropping each costs, where TEAL's |x_i| assumes every entry of every layer costs
alike. sampled=False is the empirical Fisher (the observed next tokens); sampled=True the true Fisher of the
model's predictive distribution (its expected loss rise is the KL that measure.mean_kl measures).

Measured on SmolLM2-135M-Instruct (down_proj inputs at 50%, code, every position sparse; results/sparsity/README.md,
"A Fisher-scaled score"). Each batch holds the (B, T, in) gradients of every path at once: about 4 B T sum(in)
bytes (30 down_proj of 1,536 inputs at 4 x 512 tokens: 377 MB).
"""
from __future__ import annotations

from typing import Any, Callable, Iterable, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from configurable_fm.analysis.batches import limited, progress_bar, token_mask
from configurable_fm.analysis.capture import intervene
from configurable_fm.analysis.interventions import add
from configurable_fm.analysis.sparsity.calibration import peek
from configurable_fm.analysis.sparsity.measure import model_logits, scored_batch
from configurable_fm.analysis.sparsity.module import SparsityError, linear_shapes, resolve_targets
from configurable_fm.models.scoring import next_token_nll


def _squared_gradients(graphdef, paths: tuple, dims: tuple, sampled: bool, state, inputs, targets, attention, m_BxT,
                       n_BxT, key):
    """{path: sum_{b,t} n_bt (dL/dx_bt)^2 (in,)} for one batch (module docstring); dims the Linears' in sizes."""
    if sampled:
        logits = model_logits(nnx.merge(graphdef, state), inputs, attention)
        targets = jax.random.categorical(key, jax.lax.stop_gradient(logits).astype(jnp.float32)).astype(jnp.int32)

    def loss(zeros):
        adds = {f"{p}.input": add(z) for p, z in zeros.items()}
        logits = intervene(nnx.merge(graphdef, state), adds, lambda mm: model_logits(mm, inputs, attention))
        return jnp.sum(next_token_nll(logits, targets) * m_BxT)

    grads = jax.grad(loss)({p: jnp.zeros((*inputs.shape, d), jnp.float32) for p, d in zip(paths, dims)})
    return {p: jnp.einsum("bt,bti->i", n_BxT, jnp.square(g)) for p, g in grads.items()}


_jitted_squared_gradients = jax.jit(_squared_gradients, static_argnums=(0, 1, 2, 3))


def fisher_scales(model, batches: Iterable[Mapping[str, Any]], targets: Optional[Sequence[str]] = None, *,
                  sampled: bool = False, seed: int = 0, max_batches: Optional[int] = None, progress: bool = False,
                  log: Optional[Callable[[str], None]] = None) -> dict[str, np.ndarray]:
    """{path: s (in,) float32}, s_i = sqrt(E[(dL/dx_i)^2]) at the input of each Linear `targets` names
    (resolve_targets: paths or globs; None = the family's defaults), over `batches` ({'inputs', 'targets' (B, T),
    'loss_mask'?, 'attention_mask'?, 'mask'?}, as measure.evaluate takes them); module docstring. sampled: the
    targets drawn from the model's predictive distributions (key: seed folded with the batch index) instead of the
    batches' own. `model` is not modified. SparsityError for no batches or no scored token."""
    if not isinstance(sampled, bool):
        raise SparsityError(f"fisher_scales: sampled must be True or False, got {sampled!r}")
    paths = tuple(resolve_targets(model, targets, op="fisher_scales"))
    shapes = linear_shapes(model, list(paths))
    dims = tuple(shapes[p][0] for p in paths)
    _, stream = peek(batches, "fisher_scales")
    graphdef, state = nnx.split(model)
    total = {p: np.zeros(shapes[p][0], np.float64) for p in paths}
    tokens = scored = 0.0
    it, n = limited(stream, max_batches)
    for i, batch in enumerate(progress_bar(it, total=n, desc="sparsity: fisher", enabled=progress, log=log)):
        inputs, y, m, attention = scored_batch(batch, f"fisher_scales: batch {i}")
        n_BxT = token_mask(batch, f"fisher_scales: batch {i}")
        got = _jitted_squared_gradients(graphdef, paths, dims, sampled, state, jnp.asarray(inputs), jnp.asarray(y),
                                        attention, jnp.asarray(m, jnp.float32), jnp.asarray(n_BxT),
                                        jax.random.fold_in(jax.random.key(seed), i))
        for p in paths:
            total[p] += np.asarray(got[p], np.float64)
        tokens += float(n_BxT.sum())
        scored += float(m.sum())
    if scored <= 0:
        raise SparsityError("fisher_scales: no scored tokens in the batches")
    return {p: np.sqrt(total[p] / tokens).astype(np.float32) for p in paths}
