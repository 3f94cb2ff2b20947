"""A per-output correction of SmolLM2-135M-Instruct with 50% of every down_proj input zeroed (TEAL thresholds,
training-free): y_hat_j = alpha_j y_s_j + beta_j, fitted per layer by least squares on the calibration tokens
against the dense y_d = h W (the dense model's inputs h; y_s = (h * [|h| > t]) W), in float64; 'beta_only' keeps
alpha = 1. Perplexity on held-out English (the study's pools), applied as interventions on the down_proj outputs.
    python benchmarks/sparsity_correction_cpu_2026-12-05/output_correction.py CAL_TOKENS EVAL_TOKENS"""
import sys, time
import jax, jax.numpy as jnp, numpy as np
sys.path.insert(0, ".")  # run from the repository root
import experiments.analysis.activation_sparsity as S
from configurable_fm.analysis.sparsity import calibrate, sparsify_activations, LogBins
from configurable_fm.analysis.capture import capture, intervene
from configurable_fm.interop.loader import load_pretrained

t0 = time.time()
say = lambda s: print(f"[{time.time()-t0:5.0f}s] {s}", flush=True)
if len(sys.argv) != 3 or not all(a.isdigit() and int(a) > 0 for a in sys.argv[1:]):
    sys.exit("usage: output_correction.py CAL_TOKENS EVAL_TOKENS (two positive integers, e.g. 4096 8192)")
model, tok = load_pretrained("smollm2-135m-instruct", dtype=jnp.float32)
split = S.pools(S.domain_documents("english"), 0)
NCAL, NEV = int(sys.argv[1]), int(sys.argv[2])
cal_tokens, _ = S.token_stream(split["calibration"], tok, NCAL, 1024)
ev_tokens, _ = S.token_stream(split["evaluation"], tok, NEV, 1024)
cal_b, ev_b = S.batches_of(cal_tokens, 512, 4), S.batches_of(ev_tokens, 512, 4)
down = [f"layers.{i}.mlp.down_proj" for i in range(model.cfg.num_layers)]
cal = calibrate(model, cal_b, down, bins=LogBins(lo=-24, hi=16, per_octave=64))
th = cal.thresholds({p: 0.5 for p in down})
say("calibrated")
dense_sp = sparsify_activations(model, {p: -1.0 for p in down})
sparse = sparsify_activations(model, th)
W = {p: np.asarray(dense_sp.layers[i].mlp.down_proj.kernel[...], np.float64) for i, p in enumerate(down)}
D = W[down[0]].shape[1]
mom = {p: np.zeros((5, D)) for p in down}  # n, Sy_s, Sy_d, Sy_s^2, Sy_s*y_d
for b in cal_b:
    _, vals = capture(dense_sp, [f"{p}.input" for p in down], jnp.asarray(b["inputs"]))
    for p in down:
        h = np.asarray(vals[f"{p}.input"], np.float64).reshape(-1, W[p].shape[0])
        ys = (h * (np.abs(h) > th[p])) @ W[p]; yd = h @ W[p]
        m = mom[p]; m[0] += len(h); m[1] += ys.sum(0); m[2] += yd.sum(0); m[3] += (ys * ys).sum(0); m[4] += (ys * yd).sum(0)
say("moments")
corr = {}
for p in down:
    n, s, d, ss, sd = mom[p]
    ms, md = s / n, d / n
    var = ss / n - ms * ms; cov = sd / n - ms * md
    alpha = np.where(var > 1e-12, cov / np.maximum(var, 1e-12), 1.0)
    corr[p] = dict(beta_only=(np.ones(D), md - ms), ls=(alpha, md - alpha * ms))
    print(p, "alpha mean %.4f min %.4f max %.4f  |beta| mean %.4f" % (alpha.mean(), alpha.min(), alpha.max(), np.abs(corr[p]['ls'][1]).mean()))

def ppl(m, fns=None):
    nll, cnt = 0.0, 0
    for b in ev_b:
        ids = jnp.asarray(b["inputs"])
        logits = intervene(m, fns, ids) if fns else m(ids)
        lp = jax.nn.log_softmax(logits.astype(jnp.float32), -1)
        t = jnp.asarray(b["targets"])
        nll += float(-jnp.take_along_axis(lp, t[..., None], -1).sum()); cnt += t.size
    return float(np.exp(nll / cnt))

base = ppl(dense_sp); say(f"dense {base:.4f}")
sp = ppl(sparse); say(f"sparse {sp:.4f} ({100*(sp/base-1):+.2f}%)")
for kind in ("beta_only", "ls"):
    fns = {f"{p}.output": (lambda a, b: (lambda y: y * jnp.asarray(a, y.dtype) + jnp.asarray(b, y.dtype)))(*corr[p][kind]) for p in down}
    v = ppl(sparse, fns); say(f"sparse+{kind} {v:.4f} ({100*(v/base-1):+.2f}%)")
