"""How much of MEMIT's neighbourhood-score loss in one batch comes from neighbours that are edited themselves
(experiments/edit/README.md, "MEMIT's efficacy / neighbourhood frontier"). Reads stored metrics only:

    python3 benchmarks/edit_smollm2/memit_ns_overlap.py benchmarks/edit_smollm2/memit_sweep_h200_2026-12-03/*_metrics.json

The neighbourhood prompts of a fact in experiments/edit/data/smollm2_facts.jsonl are about other subjects of the
set, so in a batch of 100 of its 241 facts many of them name a subject that the same batch edits: its true object
is then meant to lose, and NS (P(true_n) > P(new)) counts that as a neighbourhood failure. Per case, `overlap` is
the share of its neighbourhood prompts that name (as a whole word) another subject of the batch. The metrics keep
one NS per case (not per prompt), so this splits the cases by overlap and fits NS = a + b * overlap by least
squares: a is the estimated NS of a case whose neighbours are all unedited. An estimate from per-case means, not a
measurement: the measurement is NS over the unedited neighbours' prompts alone, which the evaluator does not yet
report.
"""
import json
import re
import sys
from pathlib import Path

import numpy as np

FACTS = Path(__file__).resolve().parents[2] / "experiments/edit/data/smollm2_facts.jsonl"


def overlap_and_ns(metrics: dict, facts: dict) -> tuple[np.ndarray, np.ndarray]:
    """(overlap, NS) per edited case of one run's metrics.json."""
    rows = metrics["after"]["rows"]
    cases = [facts[r["case_id"]] for r in rows]
    subjects = {c["subject"] for c in cases}
    patterns = {s: re.compile(rf"(?<!\w){re.escape(s)}(?!\w)") for s in subjects}
    overlap = [np.mean([any(patterns[s].search(p) for s in subjects if s != c["subject"])
                        for p in c["neighborhood_prompts"]]) for c in cases]
    return np.asarray(overlap), np.asarray([r["neighborhood_score"] for r in rows])


def main(paths: list[str]) -> None:
    facts = {r["case_id"]: r for r in map(json.loads, FACTS.read_text().splitlines())}
    print("run | layers | lambda | NS | overlap (mean) | fit NS at overlap 0 / 1 | NS of cases with overlap <= 1/3 "
          "(n) | >= 2/3 (n)")
    for path in paths:
        m = json.loads(Path(path).read_text())
        if m.get("mode") != "batch":
            continue
        overlap, ns = overlap_and_ns(m, facts)
        a, b = np.linalg.lstsq(np.stack([np.ones_like(overlap), overlap], 1), ns, rcond=None)[0]
        low, high = ns[overlap <= 1 / 3], ns[overlap >= 2 / 3]
        print(f"{Path(path).name} | {m['layers'][0]}-{m['layers'][-1]} | {m['hparams']['mom2_update_weight']:g} | "
              f"{100 * ns.mean():.1f} | {overlap.mean():.2f} | {100 * a:.1f} / {100 * (a + b):.1f} | "
              f"{100 * low.mean():.1f} ({len(low)}) | {100 * high.mean():.1f} ({len(high)})")


if __name__ == "__main__":
    main(sys.argv[1:])
