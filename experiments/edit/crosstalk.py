"""How much does editing one subject move the others? Cross-talk in the key space of an edited layer.

    python -m experiments.edit.crosstalk --study DIR [--layers 0,1] [--edits 200,1000,10000]

Reads a study directory of experiments/edit/lifelong.py (model, edit stream, cached key statistics). A rank-one
MEMIT / ROME / RLS step for subject s with key k_s (the down_proj input at the subject's last token) writes
dW = u_s r_s^T, u_s = (lambda C + k_s k_s^T)^-1 k_s, C the key second moment of the statistics corpus. Another
subject j's output then moves by (k_j . u_s) r_s^T, and relative to what the edit wrote on s itself,

    chi(s, j) = (k_j . u_s) / (k_s . u_s) = <k_j, k_s>_{C^-1} / <k_s, k_s>_{C^-1}     (Sherman-Morrison: lambda
                                                                                     cancels)

so chi is a property of the keys alone. After N edits whose residuals point in unrelated directions with a similar
norm, an unedited subject's output has moved by about sqrt(sum_s chi(s, j)^2) ~ sqrt(N) * rms(chi) edit-sized
residuals: the accumulated interference, printed for each N of --edits (an extrapolation from the subjects measured
here, which assumes new subjects' keys are spread like these). For comparison, whitened keys spread evenly over F
dimensions give rms(chi) = 1 / sqrt(F); F_eff is the participation ratio of the whitened subject keys' spectrum
(how many directions they really use). Prints one line per layer and writes DIR/crosstalk.json.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np


def crosstalk(keys: np.ndarray, second_moment: np.ndarray) -> dict:
    """The module docstring's numbers for subject keys (S, F) and C (F, F), float64."""
    k = np.asarray(keys, np.float64)
    c = np.asarray(second_moment, np.float64)
    f = c.shape[0]
    ev, vecs = np.linalg.eigh(c)
    inv_sqrt = vecs @ np.diag(1.0 / np.sqrt(np.maximum(ev, 1e-12 * ev.max()))) @ vecs.T
    w = k @ inv_sqrt  # whitened keys: <k_j, k_s>_{C^-1} = w_j . w_s
    gram = w @ w.T
    chi = gram / np.diag(gram)[None, :]  # chi[j, s]
    off = chi[~np.eye(len(k), dtype=bool)]
    sv = np.linalg.svd(w, compute_uv=False) ** 2
    return dict(subjects=len(k), F=f, rms_chi=float(np.sqrt(np.mean(off ** 2))),
                median_abs_chi=float(np.median(np.abs(off))), even_spread=float(1 / np.sqrt(f)),
                F_eff=float(sv.sum() ** 2 / np.sum(sv ** 2)),
                s_rel=float(np.mean(np.diag(gram)) / f))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m experiments.edit.crosstalk", description=__doc__.split("\n")[0])
    ap.add_argument("--study", required=True)
    ap.add_argument("--layers", default="", help="comma-separated (default: the study's window)")
    ap.add_argument("--edits", default="200,1000,10000", help="N for the accumulated interference, comma-separated")
    args = ap.parse_args(argv)
    import jax

    jax.config.update("jax_default_matmul_precision", "float32")
    from configurable_fm.errors import UserError
    from configurable_fm.ops.update import cached_second_moments, edit_site, values_at_subject
    from experiments.edit import lifelong as L

    try:
        edits = [int(n) for n in args.edits.split(",") if n]
        layers = [int(x) for x in args.layers.split(",") if x]
    except ValueError:
        ap.error(f"--edits {args.edits!r} / --layers {args.layers!r}: give comma-separated integers")
    out = Path(args.study)
    try:
        st = L.open_study(out)
    except UserError as e:
        ap.error(str(e))
    size, model, tok = st.size, st.model, st.world.tokenizer
    layers = layers or list(size.window)
    if any(not 0 <= l < model.cfg.num_layers for l in layers):
        ap.error(f"--layers {args.layers}: layers must lie in 0..{model.cfg.num_layers - 1} (the model has "
                 f"{model.cfg.num_layers})")
    stats = cached_second_moments(model, lambda: L.stat_batches(st.world, size), layers,
                                  corpus=f"testbed-seed{st.seed}", n_tokens=size.stats_tokens, cache_dir=out / "stats")
    first = {}
    for r in st.stream:  # one request per subject
        first.setdefault(r.subject, r)
    requests = list(first.values())
    results = {}
    for layer in layers:
        site = edit_site(model, layer)
        keys = values_at_subject(model, tok, requests, [site.key_point], bos_id=0)[site.key_point][:, 0]
        r = crosstalk(keys, stats[layer].second_moment)
        r["accumulated"] = {str(n): float(np.sqrt(n) * r["rms_chi"]) for n in edits}
        results[str(layer)] = r
        acc = ", ".join(f"N={n}: {v:.2f}" for n, v in r["accumulated"].items())
        print(f"layer {layer}: {r['subjects']} subjects, F={r['F']}, F_eff={r['F_eff']:.0f}, "
              f"rms chi={r['rms_chi']:.4f} (even spread over F: {r['even_spread']:.4f}), "
              f"median |chi|={r['median_abs_chi']:.4f}, "
              f"s_rel={r['s_rel']:.2f}; accumulated ~ {acc}", flush=True)
    (out / "crosstalk.json").write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
