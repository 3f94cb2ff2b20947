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
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from configurable_fm.ops.update import load_requests  # noqa: E402
from configurable_fm.ops.update.evaluate import names_edited_subject  # noqa: E402

FACTS = ROOT / "experiments/edit/data/smollm2_facts.jsonl"


def overlap_and_ns(metrics: dict, facts: dict) -> tuple[np.ndarray, np.ndarray]:
    """(overlap, NS) per edited case of one run's metrics.json (the evaluator's test for NS-u)."""
    rows = metrics["after"]["rows"]
    cases = [facts[r["case_id"]] for r in rows]
    subjects = {c.subject for c in cases}
    overlap = [np.mean(names_edited_subject(c, subjects)) for c in cases]
    return np.asarray(overlap), np.asarray([r["neighborhood_score"] for r in rows])


def main(paths: list[str]) -> int:
    if not paths:
        print("usage: memit_ns_overlap.py METRICS.json [...] (metrics.json of scripts/edit.py runs in batch mode)",
              file=sys.stderr)
        return 2
    missing = [p for p in paths if not Path(p).is_file()]
    if missing:
        print(f"memit_ns_overlap.py: no such file: {', '.join(missing)}", file=sys.stderr)
        return 2
    facts = {r.case_id: r for r in load_requests(FACTS)}
    print("run | layers | lambda | NS | overlap (mean) | fit NS at overlap 0 / 1 | NS of cases with overlap <= 1/3 "
          "(n) | >= 2/3 (n)")
    for path in paths:
        m = json.loads(Path(path).read_text())
        if m.get("mode") != "batch":  # independent edits change one fact per model: no edited neighbours
            print(f"{Path(path).name}: mode {m.get('mode')!r}, not a batch run: skipped", file=sys.stderr)
            continue
        overlap, ns = overlap_and_ns(m, facts)
        a, b = np.linalg.lstsq(np.stack([np.ones_like(overlap), overlap], 1), ns, rcond=None)[0]
        low, high = ns[overlap <= 1 / 3], ns[overlap >= 2 / 3]
        print(f"{Path(path).name} | {m['layers'][0]}-{m['layers'][-1]} | {m['hparams']['mom2_update_weight']:g} | "
              f"{100 * ns.mean():.1f} | {overlap.mean():.2f} | {100 * a:.1f} / {100 * (a + b):.1f} | "
              f"{100 * low.mean():.1f} ({len(low)}) | {100 * high.mean():.1f} ({len(high)})")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
