"""Readable run reports: a markdown file with tables and PNG figures, plus a JSON summary.

    report = Report("runs/quickstart", title="Quickstart")
    report.section("Model", "text ...")
    report.table(["brick", "params"], rows)
    report.figure("loss.png", fig, caption="...")
    report.write()          # -> runs/quickstart/report.md, report.json
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


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


class Report:
    def __init__(self, workdir: str | os.PathLike, title: str):
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
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
        tmp = out.with_suffix(".md.tmp")
        tmp.write_text(md)
        os.replace(tmp, out)
        js = self.workdir / "report.json"
        tmp = js.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.summary, indent=2, default=str) + "\n")
        os.replace(tmp, js)
        return out
