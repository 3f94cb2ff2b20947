"""Why does an edit not take? MEMIT steps on a study's model, taken apart stage by stage.

    python -m experiments.edit.diagnose --study DIR [--n 32] [--batches 1,16] [--windows 0,1,2;0] \
        [--lambda_rels 2] [--ridges 0,1e-3] [--v_steps 25,100] [--stats_tokens 200000]

Reads a study directory of experiments/edit/lifelong.py (model, world, edit stream, cached key statistics) and, for
every combination of the options, edits the first `n` requests of the stream `batch` at a time, each batch from the
unedited model (independent steps, nothing carried), with MEMIT on the layers of `window` (lambda = lambda_rel x F,
the study's value settings). Per combination it prints one line and writes all of them to DIR/diagnose.json:

  value_loss   the target optimisation's final loss (NLL of target_new + KL + decay, with the residual after the top
               layer L replaced by z): is z a value that makes the model say the new object?
  s_rel        mean over the edited keys of s = k^T C^-1 k / F per layer (MEMIT's docstring: a corpus-like key has
               E[s] = F; s << F: the key lies where the corpus keys are strong, so lambda C resists writing it)
  written      per layer |K_l dW_l| / |R_l|: the share of the layer's residual that the solve writes for the keys it
               was given (s / (lambda + s) for a lone key)
  dW           per layer |dW_l|_F, and the share of |dW_l|^2 that lies in C's eigen-directions below 1e-3 of the mean
               eigenvalue (`dead`): large updates there are invisible on the corpus and unstable on any other key
  realised     1 - |z - h_L'| / |z - h_L| at the bare prompt after the whole step (h_L' on the edited model): the share
               of the intended change of the top layer's output that the edit produced where it is read
  ES PS NS     the scores (%) of the edited requests after their step (experiments/edit/README.md)

`ridge` r > 0 solves with C + r (tr C / F) I instead of C (a relative ridge: lambda then also holds the dead key
directions); 0 is MEMIT as published. `v_steps`: the value optimisation's Adam steps (default: the study size's).
`stats_tokens`: the tokens of the key statistics (default: the size's; fewer for a quicker CPU look, cached
separately). The key spectrum of every layer is printed first (lifelong.key_spectrum).
"""
from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import sys
import time
from pathlib import Path

import numpy as np


def dead_directions(c: np.ndarray) -> np.ndarray:
    """(F, d) orthonormal eigenvectors of C (F, F) whose eigenvalues are below 1e-3 of the mean eigenvalue."""
    ev, vecs = np.linalg.eigh(np.asarray(c, np.float64))
    return vecs[:, ev < 1e-3 * ev.mean()]


def layer_report(c: np.ndarray, k: np.ndarray, resid: np.ndarray, dw: np.ndarray, dead: np.ndarray) -> dict:
    """The per-layer numbers of the module docstring for C (F, F), keys K (E, F), residuals R (E, D), update dW
    (F, D), all float64, and C's dead directions (`dead_directions(C)`: computed once per layer by the caller)."""
    f = c.shape[0]
    s = np.einsum("ef,ef->e", k, np.linalg.solve(c + 1e-12 * np.eye(f), k.T).T)
    dw_sq = float(np.sum(dw ** 2))
    return dict(s_rel=float(np.mean(s) / f), written=float(np.linalg.norm(k @ dw) / max(np.linalg.norm(resid), 1e-30)),
                dW=float(np.sqrt(dw_sq)), dead=float(np.sum((dead.T @ dw) ** 2) / max(dw_sq, 1e-30)))


def run_variant(model, tok, stats, dead, stream, evaluator, plan, *, batch: int, ridge: float) -> dict:
    """The numbers of one combination, averaged over its requests (module docstring); dead: {layer: C's dead
    directions}."""
    import jax

    from configurable_fm.bricks.deltas import Delta, apply
    from configurable_fm.ops.update import edit_site, memit_spread, memit_update, values_at_subject

    hp = plan.hparams
    sites = {l: edit_site(model, l) for l in plan.layers}
    top = sites[max(plan.layers)]
    rows, sizes, per_layer, realised, losses = [], [], {l: [] for l in plan.layers}, [], []
    for start in range(0, len(stream), batch):
        reqs = stream[start:start + batch]
        record = {}

        def solve(site, k, resid):
            c = np.asarray(stats[site.layer].second_moment, np.float64)
            if ridge:
                c = c + ridge * np.trace(c) / c.shape[0] * np.eye(c.shape[0])
            term = memit_update(k, resid, c, hp.mom2_update_weight)
            record[site.layer] = (k, resid, np.asarray(term.materialize(), np.float64))
            return term

        out = memit_spread(model, tok, reqs, layers=plan.layers, hparams=hp, solve=solve,
                           key=jax.random.key(start), bos_id=0, what="diagnose")
        edited = apply(model, Delta(out.terms))
        for l, (k, resid, dw) in record.items():
            per_layer[l].append(layer_report(np.asarray(stats[l].second_moment, np.float64), k, resid, dw, dead[l]))
        below = apply(model, Delta({k: v for k, v in out.terms.items() if k != top.kernel}))

        def h(m):  # the top layer's output at the subject's last token of the bare prompt (E, D)
            return values_at_subject(m, tok, reqs, [top.layer_output], bos_id=0)[top.layer_output][:, 0]

        h0, h1 = h(model).astype(np.float64), h(edited).astype(np.float64)
        z = h(below).astype(np.float64) + out.residuals[top.layer]  # the top layer's residual is z - h there
        realised.append(1 - np.linalg.norm(z - h1, axis=1) / np.maximum(np.linalg.norm(z - h0, axis=1), 1e-30))
        losses.append(out.value_loss)
        m = evaluator(edited, which=list(range(start, start + len(reqs))))
        rows.append([m.summary[k].mean for k in ("efficacy_score", "paraphrase_score", "neighborhood_score")])
        sizes.append(len(reqs))
    es, ps, ns = (100 * np.average(rows, axis=0, weights=sizes)).round(1).tolist()
    layers = {str(l): {k: float(np.average([r[k] for r in v], weights=sizes)) for k in v[0]}
              for l, v in per_layer.items()}
    return dict(value_loss=float(np.average(losses, weights=sizes)), realised=float(np.mean(np.concatenate(realised))),
                layers=layers, ES=es, PS=ps, NS=ns, n=len(stream))


def describe(name: str, r: dict) -> str:
    per = "  ".join(f"L{l}: s_rel {v['s_rel']:.3g} written {v['written']:.2f} dW {v['dW']:.3g} dead {v['dead']:.2f}"
                    for l, v in r["layers"].items())
    return (f"{name}: value loss {r['value_loss']:.3f}  realised {r['realised']:.2f}  ES {r['ES']} PS {r['PS']} "
            f"NS {r['NS']} (n={r['n']})\n    {per}")


def numbers(kind):
    """An argparse type: a comma-separated list of `kind` (e.g. '1,16'), or a usage error naming the bad item."""
    def parse(text: str) -> list:
        try:
            return [kind(t) for t in text.split(",") if t]
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of {kind.__name__}") from None
    return parse


def layer_sets(text: str) -> list[tuple[int, ...]]:
    """An argparse type: ';'-separated comma lists of layers ('0,1,2;0')."""
    return [tuple(numbers(int)(w)) for w in text.split(";") if w]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m experiments.edit.diagnose", description=__doc__.split("\n")[0])
    ap.add_argument("--study", required=True)
    ap.add_argument("--n", type=int, default=32, help="requests (the first of the stream)")
    ap.add_argument("--batches", type=numbers(int), default=[1, 16], help="requests per step, comma-separated")
    ap.add_argument("--windows", type=layer_sets, default=[], help="layer sets, ';'-separated (default: the study's "
                                                                   "window)")
    ap.add_argument("--lambda_rels", type=numbers(float), default=[], help="comma-separated (default: the study's)")
    ap.add_argument("--ridges", type=numbers(float), default=[0.0], help="relative ridges, comma-separated (module "
                                                                       "docstring)")
    ap.add_argument("--v_steps", type=numbers(int), default=[], help="value optimisation steps, comma-separated "
                                                                     "(default: the study's)")
    ap.add_argument("--stats_tokens", type=int, default=0, help="tokens of the key statistics (default: the study's)")
    args = ap.parse_args(argv)
    if args.n < 1 or any(b < 1 for b in args.batches) or any(v < 1 for v in args.v_steps) or args.stats_tokens < 0:
        ap.error("--n, --batches and --v_steps must be at least 1, --stats_tokens at least 0")
    import jax

    jax.config.update("jax_default_matmul_precision", "float32")
    from configurable_fm.errors import UserError
    from configurable_fm.ops.update import Evaluator, cached_second_moments
    from experiments.edit import lifelong as L

    out = Path(args.study)
    try:
        st = L.open_study(out)
    except UserError as e:
        ap.error(str(e))
    size, seed, world, model, tok = st.size, st.seed, st.world, st.model, st.world.tokenizer
    if args.stats_tokens:
        size = dataclasses.replace(size, stats_tokens=args.stats_tokens)
    stream = st.stream[:args.n]
    windows = args.windows or [tuple(size.window)]
    layers = sorted({l for w in windows for l in w})
    n_layers = model.cfg.num_layers
    if any(not 0 <= l < n_layers for l in layers):
        ap.error(f"--windows {args.windows}: layers must lie in 0..{n_layers - 1} (the model has {n_layers})")
    stats = cached_second_moments(model, lambda: L.stat_batches(world, size), layers, corpus=f"testbed-seed{seed}",
                                  n_tokens=size.stats_tokens, cache_dir=out / "stats")
    for l in layers:
        print(f"key second moment, layer {l}: {L.key_spectrum(stats[l].second_moment)}", flush=True)
    dead = {l: dead_directions(stats[l].second_moment) for l in layers}
    evaluator = Evaluator(tok, stream, metrics=("probability",), bos_id=0)
    results = {}
    lambda_rels = args.lambda_rels or [size.lambda_rel]
    for window, batch, lam, ridge, steps in itertools.product(windows, args.batches, lambda_rels, args.ridges,
                                                              args.v_steps or [size.v_steps]):
        plan = L.make_plan("memit", dataclasses.replace(size, v_steps=steps), world, args.n,
                           {"memit": {"layers": list(window), "batch": batch, "lambda_rel": lam}})
        plan = L.resolve_hparams(plan, model, tok, stats, stream)[0]
        name = f"memit layers {list(window)} batch {batch} lambda_rel {lam:g} ridge {ridge:g} v_steps {steps}"
        t = time.perf_counter()
        r = run_variant(model, tok, stats, dead, stream, evaluator, plan, batch=batch, ridge=ridge)
        r["seconds"] = round(time.perf_counter() - t, 1)
        results[name] = r
        print(describe(name, r), flush=True)
    (out / "diagnose.json").write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
