"""A probe: does a Fisher-weighted score choose the FFN neurons to drop better than TEAL's |h_i|? SmolLM2-135M-Instruct
in float32, the study's code pools (16,384 calibration tokens; N_EVAL held-out tokens as 512-token windows), the
down_proj inputs h (B, T, F) of every layer at 50% sparsity, every position sparse.

Score of neuron i at a token, a_i = |h_i| s_i, kept where a_i > t:
  magnitude      s_i = 1, t per layer (the 50% quantile of |h| in that layer): TEAL, the study's uniform row
  fisher_layer   s_i = sqrt(E[(dL/dh_i)^2]), t per layer: the neurons of a layer reweighted by how much the loss
                 moves with them (dL/dh_i the gradient of the summed next-token NLL of a window with respect to
                 h_i at that token, averaged over the calibration tokens: the diagonal empirical Fisher of h)
  fisher_global  the same s_i, one t for all layers (the 50% quantile of a over every layer): the layers'
                 levels then follow from the scores, by the second-order estimate of what dropping h_i costs,
                 (h_i dL/dh_i)^2 ~ h_i^2 s_i^2
Quantiles on every second calibration token. Prints each row's perplexity change against dense with its SE, and
the two Fisher rows against magnitude paired on the same windows, and the achieved sparsity.
With ALLOCATED=1 also both scores at the levels of the KL allocation (results/sparsity, 2026-12-06); with
SAMPLED=1 s_i from tokens sampled from the model's own next-token distributions (the true Fisher) instead of the
text's next tokens (the empirical Fisher).
    python benchmarks/sparsity_fisher_2026-12-07/fisher_score.py [N_EVAL]     (32768: ~13 min on the 2-core CPU)
"""
import functools
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

sys.path.insert(0, ".")
from configurable_fm.analysis import capture, intervene  # noqa: E402
from configurable_fm.analysis.sparsity import Evaluation, perplexity_change  # noqa: E402
from configurable_fm.interop.loader import load_pretrained  # noqa: E402
from configurable_fm.models.scoring import next_token_nll  # noqa: E402
from experiments.analysis.activation_sparsity import (batches_of, domain_documents, get_config, pools,  # noqa: E402
                                                      token_stream)

if len(sys.argv) > 2 or (len(sys.argv) == 2 and not (sys.argv[1].isdigit() and int(sys.argv[1]) >= 512)):
    sys.exit(f"usage: fisher_score.py [N_EVAL (an integer >= 512)]; got {sys.argv[1:]}")
N_EVAL = int(sys.argv[1]) if len(sys.argv) > 1 else 32768
LEVEL = 0.5
SAMPLED = os.environ.get("SAMPLED") == "1"
ALLOC = json.load(open("results/sparsity/eval65k_kl_allocated_code_calibrated_2026-12-06.json"))["allocations"]["0.5"]
t0 = time.time()
cfg = get_config()
model, tok = load_pretrained(cfg.model, dtype=jnp.float32)
L, F = model.cfg.num_layers, model.cfg.intermediate_size
POINTS = [f"layers.{l}.mlp.down_proj.input" for l in range(L)]
split = pools(domain_documents("code"), cfg.seed)
cal = batches_of(token_stream(split["calibration"], tok, 16384, cfg.max_doc_tokens)[0], 512, 4)
ev = batches_of(token_stream(split["evaluation"], tok, N_EVAL, cfg.max_doc_tokens)[0], 512, 4)
graphdef, state = nnx.split(model)


@jax.jit
def fisher_batch(state, inputs, targets, key):
    """sum over the batch's tokens of (dL/dh_i)^2 per layer (L, F), L the summed NLL of the batch (of the true next
    tokens, or with SAMPLED of tokens drawn from the model's own next-token distributions: the true Fisher)."""
    def loss(deltas, y):
        m = nnx.merge(graphdef, state)
        ints = {p: (lambda x, d=d: x + d) for p, d in zip(POINTS, deltas)}
        return next_token_nll(intervene(m, ints, lambda mm: mm(inputs)), y).sum()
    b, t = inputs.shape
    if SAMPLED:
        targets = jax.random.categorical(key, nnx.merge(graphdef, state)(inputs)).astype(jnp.int32)
    loss = functools.partial(loss, y=targets)
    g = jax.grad(loss)([jnp.zeros((b, t, F), jnp.float32) for _ in POINTS])
    return jnp.stack([jnp.sum(x * x, axis=(0, 1)) for x in g])


@jax.jit
def hidden_batch(state, inputs):
    _, vals = capture(nnx.merge(graphdef, state), POINTS, lambda mm: mm(inputs))
    return jnp.stack([jnp.abs(vals[p][:, ::2]).reshape(-1, F) for p in POINTS])  # L, B*T/2, F


sq, n, habs = np.zeros((L, F)), 0, []
for b in cal:
    x, y = jnp.asarray(b["inputs"]), jnp.asarray(b["targets"])
    sq += np.asarray(fisher_batch(state, x, y, jax.random.key(n)), np.float64)
    n += x.size
    habs.append(np.asarray(hidden_batch(state, x)))
habs = np.concatenate(habs, axis=1)  # L, N/2, F
fisher = np.sqrt(sq / n).astype(np.float32)
print(f"calibration {time.time() - t0:.0f} s; s_i per layer: median {np.median(fisher, 1).round(4).tolist()}")
cv = fisher.std(1) / fisher.mean(1)
print(f"coefficient of variation of s_i within a layer: {cv.min():.2f} .. {cv.max():.2f} (median {np.median(cv):.2f})")


def thresholds(scale, per_layer: bool, levels=None):
    a = habs * scale[:, None, :]
    if per_layer:
        levels = levels or [LEVEL] * L
        return np.asarray([np.quantile(a[l], levels[l]) for l in range(L)], np.float32)
    return np.full(L, np.quantile(a, LEVEL), np.float32)


@jax.jit
def sparse_batch(state, scale, t, inputs, targets):
    kept = []

    def rule(l):
        def fn(x):
            k = jnp.abs(x) * scale[l] > t[l]
            kept.append(jnp.sum(k, dtype=jnp.int32))
            return jnp.where(k, x, 0.0)
        return fn
    logits = intervene(nnx.merge(graphdef, state), {p: rule(l) for l, p in enumerate(POINTS)}, lambda mm: mm(inputs))
    return next_token_nll(logits, targets), jnp.stack(kept)


def evaluate(scale, t):
    nll, kept, ntok = [], np.zeros(L, np.int64), 0
    for b in ev:
        x, y = jnp.asarray(b["inputs"]), jnp.asarray(b["targets"])
        out, k = sparse_batch(state, jnp.asarray(scale), jnp.asarray(t), x, y)
        nll.append(np.asarray(out, np.float64))
        kept += np.asarray(k)
        ntok += x.size
    w = np.concatenate(nll)
    paths = [p[:-len(".input")] for p in POINTS]
    return Evaluation(window_nll=w, window_tokens=np.ones_like(w, np.int64), kept=dict(zip(paths, kept.tolist())),
                      entries={p: ntok * F for p in paths}, shapes={p: (F, model.cfg.hidden_size) for p in paths},
                      dense_prefix=0, batches=len(ev))


ones = np.ones((L, F), np.float32)
rows = {"dense": evaluate(ones, np.full(L, -1.0, np.float32)),
        "magnitude": evaluate(ones, thresholds(ones, True)),
        "fisher_layer": evaluate(fisher, thresholds(fisher, True)),
        "fisher_global": evaluate(fisher, thresholds(fisher, False))}
if os.environ.get("ALLOCATED") == "1":  # the KL allocation's levels (results/sparsity, 2026-12-06) with each score
    levels = [ALLOC[p[:-len(".input")]] for p in POINTS]
    rows["magnitude_alloc"] = evaluate(ones, thresholds(ones, True, levels))
    rows["fisher_alloc"] = evaluate(fisher, thresholds(fisher, True, levels))
print(f"{N_EVAL} held-out code tokens, {time.time() - t0:.0f} s; dense perplexity {rows['dense'].perplexity():.4f}")
for name, e in rows.items():
    if name == "dense":
        continue
    c, se = perplexity_change(e, rows["dense"])
    s = e.sparsity()
    line = f"{name:14s} {100 * c:+.3f}% ± {100 * se:.3f} at {np.mean(list(s.values())):.4f} achieved"
    if name != "magnitude":
        pc, pse = perplexity_change(e, rows["magnitude"])
        line += f"; against magnitude (paired) {100 * pc:+.3f} ± {100 * pse:.3f} points"
    print(line)
    if name == "fisher_global":
        print("  per-layer sparsity:", [round(v, 2) for v in s.values()])
