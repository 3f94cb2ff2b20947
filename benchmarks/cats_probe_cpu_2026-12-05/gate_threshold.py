"""A training-free probe of CATS-style sparsity (Lee et al. 2024) against TEAL's on SmolLM2-135M-Instruct: which
FFN neurons a token keeps is decided by the gate alone, |act(gate x)_i| > t_l, instead of by h_i = act(gate x)_i *
(up x)_i. The gate-only rule lets a decode kernel skip the dropped neurons' rows of up_proj as well as down_proj
(three quarters of both at 25% active: half the FFN's weight reads, against a quarter for TEAL's down_proj-only
rule, whose bound at 1B is about 1.2x; BENCHMARKS.md "Sparse FFN decode"); this measures what it costs in quality.

t_l is the p-quantile of |silu(g)| over the calibration tokens of layer l (all positions). Applied as an intervention
on each gate_proj output: g -> g where |silu(g)| > t_l, else -80 (silu(-80) ~ -1e-33, so h_i = 0 up to float32).
TEAL's rule at the same p is the package's own (analysis.sparsity: calibrate + sparsify_activations on the down_proj
inputs). Held-out windows of the activation-sparsity study's pools (calibration on one half of the documents,
evaluation on the other), every position sparse; each change with the paired SE over 512-token windows
(analysis.sparsity.perplexity_change).
    python benchmarks/cats_probe_cpu_2026-12-05/gate_threshold.py CAL_TOKENS EVAL_TOKENS   # e.g. 4096 8192"""
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, ".")  # run from the repository root
import experiments.analysis.activation_sparsity as S  # noqa: E402
from configurable_fm.analysis.capture import capture, intervene  # noqa: E402
from configurable_fm.analysis.sparsity import (Evaluation, calibrate, evaluate, perplexity_change,  # noqa: E402
                                               sparsify_activations)
from configurable_fm.interop.loader import load_pretrained  # noqa: E402
from configurable_fm.models.scoring import next_token_nll  # noqa: E402

t0 = time.time()


def say(s):
    print(f"[{time.time() - t0:5.0f}s] {s}", flush=True)


if len(sys.argv) != 3 or not all(a.isdigit() and int(a) > 0 for a in sys.argv[1:]):
    sys.exit("usage: gate_threshold.py CAL_TOKENS EVAL_TOKENS (two positive integers, e.g. 4096 8192)")
NCAL, NEV = int(sys.argv[1]), int(sys.argv[2])
model, tok = load_pretrained("smollm2-135m-instruct", dtype=jnp.float32)
L = model.cfg.num_layers
gates = [f"layers.{i}.mlp.gate_proj.output" for i in range(L)]
down = [f"layers.{i}.mlp.down_proj" for i in range(L)]


def evaluate_intervened(m, batches, fns) -> Evaluation:
    """analysis.sparsity.evaluate's per-token NLL sums for a forward with interventions (which evaluate does not
    take), so that perplexity_change pairs it with evaluate's dense reference (every window full, no sparse Linear)."""
    nll = [np.asarray(next_token_nll(intervene(m, fns, jnp.asarray(b["inputs"])), jnp.asarray(b["targets"])),
                      np.float64) for b in batches]
    nll = np.concatenate(nll)
    return Evaluation(window_nll=nll, window_tokens=np.ones(nll.shape, np.int64), kept={}, entries={}, shapes={},
                      dense_prefix=0, batches=len(batches))


for domain in ("english", "code"):
    split = S.pools(S.domain_documents(domain), 0)
    cal_b = S.batches_of(S.token_stream(split["calibration"], tok, NCAL, 1024)[0], 512, 4)
    ev_b = S.batches_of(S.token_stream(split["evaluation"], tok, NEV, 1024)[0], 512, 4)
    acts = {g: [] for g in gates}
    for b in cal_b:
        _, vals = capture(model, gates, jnp.asarray(b["inputs"]))
        for g in gates:
            acts[g].append(np.abs(np.asarray(jax.nn.silu(vals[g]), np.float32)).ravel())
    acts = {g: np.concatenate(v) for g, v in acts.items()}
    teal_cal = calibrate(model, cal_b, down)
    say(f"{domain}: calibrated on {NCAL} tokens")
    ref = evaluate(model, ev_b)
    say(f"{domain} dense ppl {ref.perplexity():.4f} ({ref.scored_windows()} windows)")
    for p in (0.5, 0.75):
        teal = sparsify_activations(model, teal_cal.thresholds({d: p for d in down}))
        c, se = perplexity_change(evaluate(teal, ev_b), ref)
        say(f"{domain} p={p:.2f} TEAL (|h| at down_proj input)  {c:+.2%} ± {se:.2%}")
        th = {g: float(np.quantile(acts[g], p)) for g in gates}
        fns = {g: (lambda t: (lambda v: jnp.where(jnp.abs(jax.nn.silu(v)) > t, v, jnp.asarray(-80.0, v.dtype))))(th[g])
               for g in gates}
        c, se = perplexity_change(evaluate_intervened(model, ev_b, fns), ref)
        say(f"{domain} p={p:.2f} CATS (|silu(gate)|)            {c:+.2%} ± {se:.2%}")
