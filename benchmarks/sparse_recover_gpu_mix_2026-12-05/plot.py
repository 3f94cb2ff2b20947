"""The 25%-active recoveries against the dense model on held-out code and English, with their paired standard
errors, read from the heldout_eval.py outputs of the two GPU recovery folders (cpu_heldout*.txt):
    python benchmarks/sparse_recover_gpu_mix_2026-12-05/plot.py   # writes recovery_25.png next to this file"""
import re
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

HERE = Path(__file__).parent
FILES = [HERE.parent / "sparse_recover_gpu_2026-12-05" / "cpu_heldout.txt", HERE / "cpu_heldout.txt",
         HERE / "cpu_heldout_mc.txt"]
LABELS = {"before": "before recovery", "sk": "code only", "ma": "38% English, seed 0",
          "mc": "38% English, seed 1", "mb": "61% English"}
ROW = re.compile(r"^\s*(\S+)\s+(code|english)\s+\d+ tokens\s+ppl\s+\S+\s+([+-][\d.]+)% ± ([\d.]+)%")

rows: dict[str, dict[str, tuple[float, float]]] = {}
for f in FILES:
    for line in f.read_text().splitlines():
        m = ROW.match(line)
        if m and m.group(1) in LABELS:
            rows.setdefault(m.group(1), {})[m.group(2)] = (float(m.group(3)), float(m.group(4)))
names = [n for n in LABELS if n in rows]
fig, ax = plt.subplots(figsize=(7.5, 3.8))
width = 0.38
for j, (domain, colour) in enumerate((("code", "tab:blue"), ("english", "tab:orange"))):
    xs = [i + (j - 0.5) * width for i in range(len(names))]
    ys = [rows[n][domain][0] for n in names]
    es = [2 * rows[n][domain][1] for n in names]
    ax.bar(xs, ys, width, yerr=es, capsize=3, color=colour, label=f"held-out {domain} (± 2 SE)")
    for x, y, e in zip(xs, ys, es):
        ax.text(x, y + e + 0.4, f"{y:+.1f}", ha="center", fontsize=7)
ax.axhline(5, color="k", ls="--", lw=1, label="goal: +5%")
ax.set_xticks(range(len(names)), [LABELS[n] for n in names], fontsize=8)
ax.set_ylabel("perplexity vs dense (%)")
ax.set_ylim(0, 37)
ax.set_title("SmolLM2-135M-Instruct, 25% of FFN neurons active, LoRA distillation on one H100", fontsize=9)
ax.legend(fontsize=8)
fig.tight_layout()
fig.savefig(HERE / "recovery_25.png", dpi=120)
print({n: rows[n] for n in names})
