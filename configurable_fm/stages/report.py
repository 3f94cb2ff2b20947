"""Readable run reports: a markdown file with tables and PNG figures, plus a JSON summary.

    report = Report("runs/quickstart", title="Quickstart")
    report.section("Model", "text ...")
    report.table(["brick", "params"], rows)
    report.figure("loss.png", fig, caption="...")
    report.write()          # -> runs/quickstart/report.md, report.json
"""
from __future__ import annotations

import json
import math
import os
from collections import Counter
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import matplotlib.pyplot as plt  # the backend is left to matplotlib (Agg when headless; inline in notebooks)

from configurable_fm.interop.atomic import make_directory, write_text_atomic


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    def cell(x):
        if isinstance(x, float):
            return f"{x:.4g}"
        if isinstance(x, int):
            return f"{x:,}"
        return str(x).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(map(str, header)) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(x) for x in row) + " |" for row in rows]
    return "\n".join(lines)


def format_metrics(metrics: Mapping, limit: int = 6) -> str:
    """'k=v, ...' of the first `limit` metrics (floats to 4 significant digits), for logs and tables."""
    items = []
    for k, v in list(metrics.items())[:limit]:
        items.append(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}")
    return ", ".join(items) + (", ..." if len(metrics) > limit else "")


# ------------------------------------------------------------------------------------ accuracies with uncertainty
Z95 = 1.959963984540054  # the 0.975 quantile of the standard normal


def wilson_interval(successes: int, n: int, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval of a binomial proportion p = successes / n (95% for the default z):
    (c − h, c + h) with c = (p + z²/2n) / (1 + z²/n), h = z·sqrt(p(1 − p)/n + z²/4n²) / (1 + z²/n).
    Unlike p ± z·SE it stays inside [0, 1] and is not empty at p = 0 or 1."""
    if n <= 0:
        raise ValueError(f"wilson_interval: n must be >= 1, got {n}")
    p = successes / n
    d = 1 + z * z / n
    c = (p + z * z / (2 * n)) / d
    h = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    return max(0.0, c - h), min(1.0, c + h)


def chance_level(answers: Iterable[str]) -> dict[str, Any]:
    """The exact-match score of guessing on these problems: {'chance': the share of the most common answer
    (always giving it, the best answer that ignores the prompt), 'answer': that answer, 'k': the number of
    distinct answers (a uniform guess among them scores 1/k <= chance)}."""
    counts = Counter(answers)
    if not counts:
        raise ValueError("chance_level: no answers")
    answer, top = counts.most_common(1)[0]
    return {"chance": top / sum(counts.values()), "answer": answer, "k": len(counts)}


def accuracy_stats(accuracy: float, n: int, chance: float) -> dict[str, float]:
    """{'n', 'se', 'ci95_low', 'ci95_high', 'chance', 'z_chance'} of an accuracy measured on n problems:
    se = sqrt(p(1 − p)/n), the 95% Wilson interval, and z_chance = (p − chance) / sqrt(chance(1 − chance)/n),
    how many standard errors (of guessing at `chance` on n problems) the accuracy lies above chance (None when
    chance is 0 or 1)."""
    successes = round(accuracy * n)
    lo, hi = wilson_interval(successes, n)
    null_se = math.sqrt(chance * (1 - chance) / n)
    return {"n": n, "se": math.sqrt(accuracy * (1 - accuracy) / n), "ci95_low": lo, "ci95_high": hi,
            "chance": chance, "z_chance": (accuracy - chance) / null_se if null_se > 0 else None}


ACCURACY_LEGEND = ("exact match: share of the n problems answered exactly (k/n); 95% CI: Wilson score interval; "
                   "SE: sqrt(p(1-p)/n); chance: the score of always giving the most common answer of these n "
                   "problems (named, with the number of distinct answers: a uniform guess among them scores "
                   "1/answers); vs chance: (exact match - chance) / sqrt(chance(1-chance)/n), standard errors "
                   "above guessing (about 2 or more: unlikely to be luck).")


def accuracy_row(accuracy: float, stats: Mapping[str, Any], answer: str | None = None,
                 k: int | None = None) -> list[str]:
    """The cells [exact match, 95% CI, SE, chance, vs chance] of one accuracy (see ACCURACY_LEGEND)."""
    n = int(stats["n"])
    guess = f" (always {answer.strip()!r}" + (f"; {k} answers)" if k is not None else ")") if answer is not None else ""
    z = stats["z_chance"]
    return [f"{accuracy:.3f} ({round(accuracy * n)}/{n})", f"{stats['ci95_low']:.3f}-{stats['ci95_high']:.3f}",
            f"{stats['se']:.3f}", f"{stats['chance']:.3f}{guess}", "n/a" if z is None else f"{z:+.1f} SE"]


ACCURACY_HEADER = ["exact match", "95% CI", "SE", "chance", "vs chance"]


class Report:
    def __init__(self, workdir: str | os.PathLike, title: str):
        self.workdir = make_directory(workdir, "report directory")
        self.title = title
        self.parts: list[str] = []
        self.summary: dict[str, Any] = {}

    def section(self, heading: str, text: str = "") -> None:
        self.parts.append(f"## {heading}\n\n{text}".rstrip() + "\n")

    def text(self, text: str) -> None:
        self.parts.append(text.rstrip() + "\n")

    def table(self, header: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
        self.parts.append(markdown_table(header, rows) + "\n")

    def code(self, text: str) -> None:
        self.parts.append("```\n" + text.rstrip() + "\n```\n")

    def figure(self, name: str, fig, caption: str = "") -> Path:
        path = self.workdir / name
        fig.savefig(path, dpi=120, bbox_inches="tight")
        plt.close(fig)
        self.parts.append(f"![{caption or name}]({name})\n" + (f"\n*{caption}*\n" if caption else ""))
        return path

    def record(self, **values: Any) -> None:
        """Adds machine-readable values to report.json."""
        self.summary.update(values)

    def write(self) -> Path:
        md = f"# {self.title}\n\n" + "\n".join(self.parts)
        out = self.workdir / "report.md"
        write_text_atomic(out, md)
        write_text_atomic(self.workdir / "report.json", json.dumps(self.summary, indent=2, default=str) + "\n")
        return out
