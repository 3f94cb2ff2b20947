"""The report of a MoEfication recovery experiment (experiments/analysis/moefy_recover.py): runs' validation
perplexity against training tokens, each compared with reference runs, as a markdown table and a plot.

    python -m experiments.analysis.recovery_report --out DIR \\
        --ref dense=runs/recover/dense --ref dense+lora=runs/recover/dense_lora \\
        --run before=runs/recover/before --run "routers+lora=runs/recover/both"

Every --run / --ref is LABEL=PATH, PATH a trainer workdir or its metrics.jsonl (train/metrics.py read_metrics).
A run's perplexity is its last record with `val_ppl`; the table gives, for every run, that value and its relative
change against every reference's last value,

    change(run, ref) = ppl_run / ppl_ref - 1,

and the tokens the run trained on (the record's `tokens`; a one-step learning-rate-0 'eval' run counts as 0).
The plot draws each run's and reference's `val_ppl` against training tokens (points joined by lines; an eval-only
run as a horizontal line). The comparison that matters for issue 13's goal ("at 25% active, perplexity <= 5% above
the dense model after recovery") is against a dense reference trained the same way (dense + the same adapter on
the same tokens): against the untrained dense model a recovery run also gets credit for adapting to the
evaluation domain. Writes DIR/recovery.md and DIR/recovery.png (temporary names, then renamed).
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

from configurable_fm.interop.atomic import atomic_file, write_text_atomic
from configurable_fm.stages.report import markdown_table
from configurable_fm.train.metrics import read_metrics


def validation_curve(records: list[dict]) -> list[tuple[int, float]]:
    """[(training tokens, val_ppl)] of the records that carry a finite val_ppl; an lr-0 one-step run -> tokens 0."""
    eval_only = len(records) == 1 and records[0].get("lr") == 0.0
    return [(0 if eval_only else int(r.get("tokens", 0)), float(r["val_ppl"])) for r in records
            if isinstance(r.get("val_ppl"), (int, float)) and math.isfinite(r["val_ppl"])]


def parse_runs(items: list[str], flag: str) -> dict[str, list[tuple[int, float]]]:
    """LABEL=PATH items -> {label: validation curve}; a bad item, a missing file or a run without val_ppl is a
    ValueError naming it."""
    runs = {}
    for item in items:
        label, sep, path = item.partition("=")
        if not sep or not label or not path:
            raise ValueError(f"{flag} {item!r}: expected LABEL=PATH")
        if label in runs:
            raise ValueError(f"{flag} {item!r}: label {label!r} given twice")
        if not Path(path).exists():
            raise ValueError(f"{flag} {item!r}: {path} does not exist")
        curve = validation_curve(read_metrics(path))
        if not curve:
            raise ValueError(f"{flag} {item!r}: no record with a finite val_ppl in {path}")
        runs[label] = curve
    return runs


def report_table(runs: dict, refs: dict) -> str:
    header = ["run", "training tokens", "val ppl"] + [f"change vs {r}" for r in refs]
    rows = []
    for label, curve in {**refs, **runs}.items():
        tokens, ppl = curve[-1]
        rows.append([label, tokens, round(ppl, 3)] +
                    ["" if label == r else f"{ppl / refs[r][-1][1] - 1:+.1%}" for r in refs])
    return markdown_table(header, rows)


def plot(runs: dict, refs: dict, out_png: Path) -> Path:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4.2), dpi=120)
    ax = fig.add_subplot()
    span = max(t for curve in {**runs, **refs}.values() for t, _ in curve) or 1
    for label, curve in {**refs, **runs}.items():
        style = "--" if label in refs else "-"
        if len(curve) == 1 and curve[0][0] == 0:
            ax.plot([0, span], [curve[0][1]] * 2, style, lw=1.5, label=f"{label} (no training)")
        else:
            ax.plot([t for t, _ in curve], [p for _, p in curve], "o" + style, ms=3, lw=1, label=label)
    ax.set_yscale("log")
    ax.set_xlabel("training tokens")
    ax.set_ylabel("validation perplexity")
    ax.set_title("Recovery: validation perplexity against training tokens")
    ax.grid(True, alpha=0.3, which="both")
    ax.legend(fontsize=8, loc="center right")
    fig.tight_layout()
    with atomic_file(out_png) as tmp:
        fig.savefig(tmp, format="png")
    return out_png


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", action="append", default=[], help="LABEL=PATH of a run to compare (repeatable)")
    ap.add_argument("--ref", action="append", default=[], help="LABEL=PATH of a reference run (repeatable)")
    ap.add_argument("--out", required=True, help="directory for recovery.md and recovery.png")
    args = ap.parse_args(argv)
    if not args.run or not args.ref:
        ap.error("give at least one --run and one --ref")
    try:
        runs, refs = parse_runs(args.run, "--run"), parse_runs(args.ref, "--ref")
    except ValueError as e:
        ap.error(str(e))
    if set(runs) & set(refs):
        ap.error(f"labels used for both a run and a reference: {sorted(set(runs) & set(refs))}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    table = report_table(runs, refs)
    write_text_atomic(out / "recovery.md", table + "\n")
    plot(runs, refs, out / "recovery.png")
    print(table)
    print(f"wrote {out / 'recovery.md'} and {out / 'recovery.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
