"""Where does a pre-trained testbed model store its facts, and do single locate-then-edit edits take there?

    python -m experiments.edit.testbed_check --study runs/lifelong_small [--n_trace 16] [--n_edit 24]

Reads a study directory of experiments/edit/lifelong.py (its model, tokenizer, edit stream and world) and writes
DIR/testbed_check.json and prints:
  1. causal tracing (analysis.tracing.trace_fact; MLP outputs, attention outputs and the residual stream restored
     one layer at a time, window 1) of `n_trace` edit requests: the mean indirect effect per layer at the
     subject's last token and at the prompt's last token, as a fraction of the total effect; and suggest_layers
     (the MLP at the subject's last token) over them. Facts stored at the subject: a large MLP and residual effect
     at the subject's last token in early layers (Meng et al. 2022, Fig. 1), not only at the last position.
  2. single edits (each from the unedited model, CounterFact's protocol) of the first `n_edit` requests of the
     stream: ROME at every layer and MEMIT on the study's window and on every pair of adjacent layers, with the
     study's settings (lifelong.make_plan): ES / PS / NS (%).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np


def trace_summary(model, tok, requests, *, bos_id: int = 0, samples: int = 10) -> dict:
    """Mean indirect effects / total effect per layer: MLP and attention at the subject's last token and at the
    last token, over the requests whose clean prediction is their true object and whose total effect is > 0.05."""
    from configurable_fm.analysis.tracing import subject_embedding_std, suggest_layers, trace_fact

    std = subject_embedding_std(model, tok, [r.subject for r in requests])
    rows = {f"{k}_{w}": [] for k in ("mlp", "attn", "residual") for w in ("subject", "last")}
    traces = []
    for r in requests:
        t = trace_fact(model, tok, r.prompt, r.subject, target=r.target_true, bos_id=bos_id,
                       kinds=("mlp", "attn", "residual"), samples=samples, window=1, embedding_std=std)
        if t.total_effect < 0.05:
            continue
        traces.append(t)
        for kind in ("mlp", "attn", "residual"):
            e = t.effects[kind] / t.total_effect
            rows[f"{kind}_subject"].append(e[t.last_subject])
            rows[f"{kind}_last"].append(e[-1])
    out = {k: np.mean(v, axis=0).round(3).tolist() for k, v in rows.items() if v}
    out.update(n=len(traces), of=len(requests),
               total_effect=float(np.mean([t.total_effect for t in traces])) if traces else None,
               suggest_layers=suggest_layers(traces, "mlp", k=3) if traces else [])
    return out


def single_edits(model, tok, stats, stream, plans) -> dict:
    """{plan name: {ES, PS, NS, seconds per edit}} of independent single edits of `stream` (each from `model`)."""
    import jax

    from configurable_fm.ops.update import Evaluator, edit_step, init_session, session_config

    ev = Evaluator(tok, stream, metrics=("probability",), bos_id=0)
    out = {}
    for plan in plans:
        cfg = session_config(model, tok, plan.method, layers=plan.layers, stats=stats, hparams=plan.hparams, bos_id=0)
        start = init_session(model, cfg)
        rows, t0 = [], time.perf_counter()
        for i, r in enumerate(stream):
            edited, _ = edit_step(cfg, start, [r], jax.random.key(i))
            m = ev(edited.model, which=[i])
            rows.append([m.summary[k].mean for k in ("efficacy_score", "paraphrase_score", "neighborhood_score")])
        es, ps, ns = (100 * np.mean(rows, axis=0)).round(1).tolist()
        out[f"{plan.name} {list(plan.layers)}"] = dict(ES=es, PS=ps, NS=ns, n=len(rows),
                                                       s_per_edit=round((time.perf_counter() - t0) / len(rows), 2))
        print(f"  single edits {plan.name} layers {list(plan.layers)}: ES {es} PS {ps} NS {ns} (n={len(rows)})",
              flush=True)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m experiments.edit.testbed_check", description=__doc__.split("\n")[0])
    ap.add_argument("--study", required=True)
    ap.add_argument("--n_trace", type=int, default=16)
    ap.add_argument("--n_edit", type=int, default=24)
    ap.add_argument("--skip_edits", action="store_true")
    args = ap.parse_args(argv)
    import jax

    jax.config.update("jax_default_matmul_precision", "float32")
    from configurable_fm.ops.update import cached_second_moments
    from experiments.edit import lifelong as L

    out = Path(args.study)
    from configurable_fm.errors import UserError

    try:
        st = L.open_study(out, layers_from_trace=False)  # its own trace chooses them
    except UserError as e:
        ap.error(str(e))
    size, seed, world, model, tok, stream = st.size, st.seed, st.world, st.model, st.world.tokenizer, st.stream
    result = {"trace": trace_summary(model, tok, stream[:args.n_trace])}
    t = result["trace"]
    print(f"causal tracing ({t['n']} of {t['of']} facts, total effect {t['total_effect']}), indirect effect / total "
          f"per layer:\n" + "\n".join(f"  {k:17s} {t[k]}" for k in t if k.endswith(("_subject", "_last")))
          + f"\n  suggest_layers (mlp, subject's last token): {t['suggest_layers']}", flush=True)
    if not args.skip_edits:
        n_layers = len(t["mlp_subject"])
        size = L.choose_layers(size, t)
        stats = cached_second_moments(model, lambda: L.stat_batches(world, size), range(n_layers),
                                      corpus=f"testbed-seed{seed}", n_tokens=size.stats_tokens, cache_dir=out / "stats")
        plans = [L.make_plan("rome", size, world, 1, {"rome": {"layers": [l]}}) for l in range(n_layers)]
        plans += [L.make_plan("memit", size, world, 1, {})]
        plans += [L.make_plan("memit", size, world, 1, {"memit": {"layers": [l, l + 1]}}) for l in range(n_layers - 1)
                  if (l, l + 1) != tuple(size.window)]
        plans = [L.resolve_hparams(p, model, tok, stats, stream)[0] for p in plans]
        result["single_edits"] = single_edits(model, tok, stats, stream[:args.n_edit], plans)
    (out / "testbed_check.json").write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
