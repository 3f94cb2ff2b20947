"""Tables and figures of a specialisation study, next to the survey's published numbers.

    text = markdown(result)                      # the tables of results.md
    paths = figures(result, "out/figures")       # PNGs: indicator CDFs, masking, scores by layer, histograms,
                                                 # pruning and overlap heat maps (ours | survey Llama-3-8B)

SURVEY_* are the survey's Figs. 9 and 10 (Xiao et al. 2024, arXiv 2409.02877, read from the text extraction of its PDF:
/work/shared/research/emergent.md section 1.3), rows and columns in SURVEY_ORDER; they are reference values to draw
next to ours, never results of this code.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

SURVEY_ORDER = ("coding", "ethics", "knowledge", "linguistic", "math", "translation", "writing")
SURVEY_PRUNING = {  # relative PPL increase (%), rows = pruned function, columns = evaluated function
    "Llama-3-8B-Instruct": [[112, 6, 8, 7, 8, 4, 8], [10, 210, 21, 14, 10, 15, 24], [67, 296, 122, 81, 79, 184, 86],
                            [16, 8, 7, 59, 7, 26, 10], [15, 3, 9, 10, 147, 9, 7], [13, 10, 12, 26, 5, 444, 11],
                            [5, 8, 11, 7, 5, 9, 32]],
    "Mistral-7B-Instruct-v0.3": [[118, 0, 6, 10, 7, 9, 7], [5, 1774, 14, 13, 4, 10, 14], [11, 105, 375, 19, 9, 23, 17],
                                 [11, 3, 8, 115, 8, 31, 9], [19, 4, 12, 17, 200, 14, 6],
                                 [377, 391, 477, 381, 241, 9243, 440], [3, 16, 10, 4, 3, 9, 41]],
}
SURVEY_OVERLAP = {
    "Llama-3-8B-Instruct": [[1, .00, .01, .01, .03, .01, .01], [.00, 1, .02, .01, .00, .01, .04],
                            [.01, .02, 1, .01, .00, .01, .02], [.01, .01, .01, 1, .01, .08, .00],
                            [.03, .00, .00, .01, 1, .00, .00], [.01, .01, .01, .08, .00, 1, .01],
                            [.01, .04, .02, .00, .00, .01, 1]],
    "Mistral-7B-Instruct-v0.3": [[1, .00, .00, .01, .04, .01, .00], [.00, 1, .02, .02, .00, .01, .04],
                                 [.00, .02, 1, .01, .00, .01, .01], [.01, .02, .01, 1, .02, .09, .00],
                                 [.04, .00, .00, .02, 1, .00, .00], [.01, .01, .01, .09, .00, 1, .01],
                                 [.00, .04, .01, .00, .00, .01, 1]],
}
SURVEY_MODEL = "Llama-3-8B-Instruct"


def survey_matrix(table: Sequence[Sequence[float]], functions: Sequence[str]) -> np.ndarray:
    """A survey table re-ordered to `functions` (NaN for a function the survey does not have)."""
    out = np.full((len(functions), len(functions)), np.nan)
    for i, f in enumerate(functions):
        for j, g in enumerate(functions):
            if f in SURVEY_ORDER and g in SURVEY_ORDER:
                out[i, j] = table[SURVEY_ORDER.index(f)][SURVEY_ORDER.index(g)]
    return out


def _row_max_count(m: np.ndarray) -> int:
    k = min(m.shape)
    return int(sum(np.nanargmax(m[i]) == i for i in range(k) if not np.all(np.isnan(m[i]))))


def markdown(result: dict) -> str:
    """The study's tables (markdown): score distribution, indicators, masking, pruning (with 95% intervals and the
    survey's Llama row), overlap."""
    fs = result["functions"]
    k = len(fs)
    short = [f[:5] for f in fs]
    lines = [f"{result['layers']} FFN layers x {result['neurons_per_layer']} neurons; "
             f"{result['instances']['score']} scoring / {result['instances']['eval']} evaluation instances "
             f"({result['tokens']['score']} / {result['tokens']['eval']} tokens); run took {result['seconds']:.0f} s.",
             "", "### Functionality scores (AP of each neuron's mean |activation| on the prompt tokens)", "",
             "| function | chance (positive rate) | mean | median | p99 | max | < 0.2 | > 0.5 | null max | "
             "above null max |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for f in fs:
        d = result["score_distribution"][f]
        lines.append(f"| {f} | {d['chance']:.3f} | {d['mean']:.3f} | {d['median']:.3f} | {d['p99']:.3f} | "
                     f"{d['max']:.3f} | {d['below_0.2']:.1%} | {d['above_0.5']:.2%} | {d['null_max']:.3f} | "
                     f"{d['above_null_max']:.2%} |")
    lines.append(f"\nAll (function, neuron) scores below 0.2: {result['all_neurons_below_0.2']:.1%}.")
    ind = result["indicators"]
    below = np.asarray(ind["below_0.2"])
    lines += ["", "### Normalized indicators (per token and layer, value / the layer's max at that token)", "",
              "| indicator | share of neurons < 0.2 (mean over layers) | min layer | max layer |", "|---|---|---|---|",
              f"| activation | {below[:, 0].mean():.1%} | {below[:, 0].min():.1%} | {below[:, 0].max():.1%} |"]
    if ind["magnitude_available"]:
        lines.append(f"| output magnitude | {below[:, 1].mean():.1%} | {below[:, 1].min():.1%} | "
                     f"{below[:, 1].max():.1%} |")
    m = result["masking"]
    for name, losses in m["loss"].items():
        lines += ["", f"### Dynamic masking by {name} (mean response NLL, {m['instances']} evaluation instances)", "",
                  "| masked | " + " | ".join(fs) + " |", "|---" * (k + 1) + "|"]
        base = np.asarray(losses[0])
        for p, row in zip(m["levels"], losses):
            row = np.asarray(row)
            lines.append(f"| {p:.0%} | " + " | ".join(f"{x:.3f} ({x - b:+.3f})" for x, b in zip(row, base)) + " |")
    pr = result["pruning"]
    change, ci = np.asarray(pr["change"]) * 100, np.asarray(pr["ci95"]) * 100
    lines += ["", f"### Perplexity change after zeroing the top {pr['fraction']:.0%} neurons ({pr['neurons']}) of "
                  "a function (rows) on each function's held-out responses (columns), % [95% bootstrap interval]", "",
              "| pruned \\ evaluated | " + " | ".join(short) + " |", "|---" * (k + 1) + "|"]
    for i, row in enumerate(pr["rows"]):
        cells = []
        for j in range(k):
            cell = f"{change[i, j]:+.1f} [{ci[i, j, 0]:+.1f}, {ci[i, j, 1]:+.1f}]"
            cells.append(f"**{cell}**" if i == j else cell)
        lines.append(f"| {row} | " + " | ".join(cells) + " |")
    lines.append("| perplexity before | " + " | ".join(f"{result['perplexity'][f]:.2f}" for f in fs) + " |")
    survey = survey_matrix(SURVEY_PRUNING[SURVEY_MODEL], fs)
    lines += ["", f"The target function rises most in {pr['rows_target_max']} of {k} rows "
                  f"({pr['rows_target_max_minus_random']} of {k} after subtracting the random rows' mean change); "
                  f"survey {SURVEY_MODEL}: {_row_max_count(survey)} of 7, Mistral-7B: "
                  f"{_row_max_count(survey_matrix(SURVEY_PRUNING['Mistral-7B-Instruct-v0.3'], fs))} of 7."]
    ov = np.asarray(result["overlap"]["matrix"])
    lines += ["", f"### Overlap |T_f ∩ T_g| / |T_f| of the top-{pr['fraction']:.0%} sets (random pair: "
                  f"{result['overlap']['random_baseline']:.2f})", "", "| | " + " | ".join(short) + " |",
              "|---" * (k + 1) + "|"]
    for i, f in enumerate(fs):
        lines.append(f"| {f} | " + " | ".join(f"{x:.3f}" for x in ov[i]) + " |")
    lines.append(f"\nOff-diagonal mean {result['overlap']['off_diagonal_mean']:.3f}, max "
                 f"{result['overlap']['off_diagonal_max']:.3f}.")
    return "\n".join(lines)


def _heat(ax, m, labels, title, fmt, vmax=None, cmap="Reds"):
    im = ax.imshow(m, cmap=cmap, vmin=0, vmax=vmax if vmax is not None else np.nanmax(m))
    ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right", fontsize=7)
    ax.set_yticks(range(len(labels)), labels, fontsize=7)
    for i in range(m.shape[0]):
        for j in range(m.shape[1]):
            if not np.isnan(m[i, j]):
                ax.text(j, i, fmt(m[i, j]), ha="center", va="center", fontsize=6)
    ax.set_title(title, fontsize=8)
    return im


def figures(result: dict, out_dir: str | Path) -> list[Path]:
    """The study's figures as PNGs in out_dir (created); returns their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    fs = result["functions"]
    k, L = len(fs), result["layers"]
    paths = []

    def save(fig, name):
        p = out / name
        fig.savefig(p, dpi=90, bbox_inches="tight")
        plt.close(fig)
        paths.append(p)

    # Fig. 6(a, c): CDF of the normalized indicators, one line per layer
    ind = result["indicators"]
    counts = np.asarray(ind["counts"], np.float64)  # (L, 2, bins)
    edges = np.linspace(0, 1, ind["bins"] + 1)[1:]
    n_panels = 2 if ind["magnitude_available"] else 1
    fig, axes = plt.subplots(1, n_panels, figsize=(4 * n_panels, 3), squeeze=False)
    for j, name in enumerate(["activation", "output magnitude"][:n_panels]):
        ax = axes[0, j]
        for layer in range(L):
            c = np.cumsum(counts[layer, j]) / max(counts[layer, j].sum(), 1)
            ax.plot(edges, c, color=plt.cm.viridis(layer / max(L - 1, 1)), lw=0.8)
        ax.axvline(0.2, color="k", ls=":", lw=0.8)
        ax.set_xlabel(f"normalized {name}")
        ax.set_ylabel("CDF")
        ax.set_title(f"per token and layer (colour: layer 0-{L - 1})", fontsize=8)
    save(fig, "indicator_cdf.png")

    # Fig. 6(b): loss against the masked ratio
    m = result["masking"]
    fig, axes = plt.subplots(1, len(m["loss"]), figsize=(4 * len(m["loss"]), 3), squeeze=False)
    for j, (name, losses) in enumerate(m["loss"].items()):
        losses = np.asarray(losses)
        for g, f in enumerate(fs):
            axes[0, j].plot(np.asarray(m["levels"]) * 100, losses[:, g], marker="o", ms=3, label=f)
        axes[0, j].set_xlabel(f"masked ratio by {name} (%)")
        axes[0, j].set_ylabel("response NLL")
    axes[0, 0].legend(fontsize=6)
    save(fig, "masking.png")

    # Fig. 8: best / 5 per mille / mean score per layer, with the permuted-label baseline
    sd = result["score_distribution"]
    cols = 4
    fig, axes = plt.subplots(-(-k // cols), cols, figsize=(3 * cols, 2.4 * -(-k // cols)), squeeze=False)
    for g, f in enumerate(fs):
        ax = axes[g // cols, g % cols]
        x = np.arange(L)
        ax.plot(x, sd[f]["layer_best"], label="best")
        ax.plot(x, sd[f]["layer_p995"], label="best 5‰")
        ax.plot(x, sd[f]["layer_mean"], label="mean")
        ax.plot(x, sd[f]["layer_null_best"], ls="--", label="best, permuted labels")
        ax.axhline(sd[f]["chance"], color="grey", ls=":", lw=0.8, label="chance")
        ax.set_ylim(0, 1)
        ax.set_title(f, fontsize=8)
        ax.set_xlabel("layer", fontsize=7)
    for g in range(k, axes.size):
        axes.flat[g].axis("off")
    axes[0, 0].legend(fontsize=6)
    fig.tight_layout()
    save(fig, "scores_by_layer.png")

    # score histograms (the distribution over all neurons)
    if "scores" in result:
        scores = np.asarray(result["scores"])
        fig, ax = plt.subplots(figsize=(5, 3))
        for g, f in enumerate(fs):
            ax.hist(scores[g].reshape(-1), bins=np.linspace(0, 1, 51), histtype="step", label=f, density=True)
        ax.axvline(0.2, color="k", ls=":", lw=0.8)
        ax.set_yscale("log")
        ax.set_xlabel("functionality score (AP)")
        ax.set_ylabel("density")
        ax.legend(fontsize=6)
        save(fig, "score_histogram.png")

    # Fig. 9: pruning, ours next to the survey's
    pr = result["pruning"]
    ours = np.asarray(pr["change"])[:k] * 100
    survey = survey_matrix(SURVEY_PRUNING[SURVEY_MODEL], fs)
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.8))
    _heat(axes[0], np.clip(ours, 0, None), fs, "this run: PPL change (%) after pruning (rows)",
          lambda v: f"{v:.0f}", vmax=300)  # the survey's colour scale; larger values saturate
    _heat(axes[1], survey, fs, f"survey, {SURVEY_MODEL}", lambda v: f"{v:.0f}", vmax=300)
    save(fig, "pruning.png")

    # Fig. 10: overlap of the top sets
    ov = np.asarray(result["overlap"]["matrix"])
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.8))
    off = ov.copy()
    np.fill_diagonal(off, np.nan)
    _heat(axes[0], off, fs, f"this run: overlap of the top sets (random {result['overlap']['random_baseline']})",
          lambda v: f"{v:.2f}", cmap="Blues")
    sv = survey_matrix(SURVEY_OVERLAP[SURVEY_MODEL], fs)
    np.fill_diagonal(sv, np.nan)
    _heat(axes[1], sv, fs, f"survey, {SURVEY_MODEL}", lambda v: f"{v:.2f}", vmax=0.14, cmap="Blues")
    save(fig, "overlap.png")
    return paths
