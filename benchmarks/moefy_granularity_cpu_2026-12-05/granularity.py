"""25% of SmolLM2-135M-Instruct's FFN neurons active, training-free: how the expert size changes the loss.
Every FFN (F = 1536) MoEfied with the cmoe split into E experts of 1536 / E neurons, E / 8 shared and the top E / 8
of the routed ones chosen per token (4 of every 16: 25% of the neurons), mlp or oracle router; against TEAL's
per-token threshold on the down_proj input at 75% sparsity (one "expert" per neuron, the finest split).
With SPLIT 'random' or 'kmeans' (no shared experts): the top E / 4 of E experts per token, so E = 1536 with the
oracle router is the per-token top 25% of the neurons by |h_i|. Calibration 16,384 tokens of the stdlib train
split, perplexity on EVAL tokens of its validation split; prints the rows and writes /tmp/granularity_*.json.
    python benchmarks/moefy_granularity_cpu_2026-12-05/granularity.py EVAL_TOKENS E1,E2,... ROUTERS [SPLIT]
    e.g. granularity.py 8192 16,64 oracle,mlp           (cmoe.json / .log here)
         granularity.py 8192 16,64,256,1536 oracle random  (random_oracle.json / .log here)"""
import json, sys, time
import jax.numpy as jnp, numpy as np
sys.path.insert(0, ".")
from configurable_fm.analysis import moefication as mf
from configurable_fm.analysis.sparsity import calibrate, sparsify_activations, LogBins
from configurable_fm.interop.loader import load_pretrained
from configurable_fm.models.scoring import token_nll

t0 = time.time()
say = lambda s: print(f"[{time.time()-t0:6.0f}s] {s}", flush=True)
if len(sys.argv) not in (4, 5) or not sys.argv[1].isdigit():
    sys.exit("usage: granularity.py EVAL_TOKENS E1,E2,... ROUTERS [SPLIT] (e.g. 8192 16,64 mlp,oracle cmoe)")
n_eval, sizes, routers = int(sys.argv[1]), [int(e) for e in sys.argv[2].split(",")], sys.argv[3].split(",")
split = sys.argv[4] if len(sys.argv) == 5 else "cmoe"
model, tok = load_pretrained("smollm2-135m-instruct", dtype=jnp.float32)
cal = mf.corpus_batches("stdlib", tok, split="train", seq_len=256, batch_size=8, n_tokens=16384)
ev = mf.corpus_batches("stdlib", tok, split="validation", seq_len=256, batch_size=8, n_tokens=n_eval)


def nll(m):
    return float(np.nanmean(np.concatenate([token_nll(m, b["inputs"]).ravel() for b in ev])))


rows = []
def record(name, value, **extra):
    rows.append(dict(name=name, nll=value, ppl=float(np.exp(value)), **extra))
    say(f"{name}: nll {value:.4f} ppl {np.exp(value):.3f} ({100 * (np.exp(value - rows[0]['nll']) - 1):+.1f}%) {extra}")


record("dense", nll(model))
down = [f"layers.{i}.mlp.down_proj" for i in range(model.cfg.num_layers)]
c = calibrate(model, cal, down, bins=LogBins(lo=-24, hi=16, per_octave=64))
for p in (0.5, 0.75):
    record(f"teal_down_{p}", nll(sparsify_activations(model, c.thresholds({d: p for d in down}))), sparsity=p)
for e in sizes:
    shared, top_k = (e // 8, e // 8) if split == "cmoe" else (0, e // 4)
    for r in routers:
        moe = mf.moefy(model, num_experts=e, num_experts_per_tok=top_k, split=split, num_shared=shared,
                       router=r, calibration=cal, key=0)
        record(f"{split}_E{e}_{r}", nll(moe), experts=e, shared=shared, top_k=top_k, router=r)
json.dump(dict(eval_tokens=n_eval, split=split, rows=rows),
          open(f"/tmp/granularity_{n_eval}_{sys.argv[2]}_{sys.argv[3]}_{split}.json", "w"), indent=1)
