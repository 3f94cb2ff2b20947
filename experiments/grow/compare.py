"""The stage kind 'grow_compare': the compute accounting of a grow-vs-scratch study (experiments/grow/
grow_vs_scratch.py), with its table and loss-versus-FLOPs plot.

    compare_config(scratch="@scratch", runs={"gstack_x4": ("@small_gstack_x4", "@large_gstack_x4"), ...})

Inputs are train stages (their output models; the stage directory next to each holds stage.json and
train/metrics.jsonl), or for a grown run's large part a 'grow_run' stage (its records after the growth step,
tokens counted from there). Compute is counted as the trainer counts it (train/flops.py, 3 x the forward pass, every
matmul including the LM head and full T x T attention):

    C(run, t) = tokens_t x flops_per_token(model config, seq_len)

For a grown run, C = C_small(end of the small run) + C_large(t) (the growth operator itself costs no training
FLOPs and is not counted). With L* the scratch run's final validation loss and C_s its total compute:

    total fraction f = C_grown(first point where val_loss <= L*) / C_s     (the small model's training counted)
    post  fraction g = C_large(that point) / C_s                          (only the compute after growth)

where the point is interpolated linearly in compute between the two evaluations that bracket L*; None when the
grown run never reaches L* (then the table says so and gives its final loss and, as a weaker figure, the
fraction of C_s at which the scratch curve first reaches that final loss: a "scratch-equivalent" compute, which
flatters scratch's mid-run losses less than its decayed end but is only indicative). Goals (the issue's):
f <= goal_total and g <= goal_post.

Writes compare.json (every curve and figure), compare.md (the table) and compare.png (validation loss, and the
training loss smoothed, against compute; a marker at each growth point) in the stage directory.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Mapping, Sequence

import ml_collections
import numpy as np

from configurable_fm.errors import ConfigError
from configurable_fm.stages import StageContext, StageOutput, register_stage, to_plain
from configurable_fm.stages.report import markdown_table

COMPARE_KEYS = ("scratch", "runs", "controls", "goal_total", "goal_post")


def compare_config(name: str = "compare", *, scratch: str, runs: Mapping[str, Sequence[str]],
                   controls: Mapping[str, str] | None = None, goal_total: float = 0.6,
                   goal_post: float = 0.4) -> ml_collections.ConfigDict:
    """A 'grow_compare' stage: `scratch` the from-scratch train stage, `runs` {label: (small stage, large stage)},
    `controls` {label: train stage} (runs without growth, e.g. a small model trained alone for the same budget;
    counted like a grown run whose whole compute is 'post-growth'), goals as fractions of the scratch compute."""
    c = ml_collections.ConfigDict()
    c.name, c.kind = name, "grow_compare"
    c.scratch = scratch
    c.runs = ml_collections.ConfigDict({k: list(v) for k, v in runs.items()})
    c.controls = ml_collections.ConfigDict(dict(controls or {}))
    c.goal_total, c.goal_post = float(goal_total), float(goal_post)
    return c


# ------------------------------------------------------------------------------------------ curves
class Curve:
    """One train stage's losses against its own compute: `val` [(flops, val_loss)], `train` [(flops, loss)],
    `total` its compute at the last step, `params` its model's parameter count, `shape` a short description."""

    def __init__(self, model_path: str | Path):
        from configurable_fm.interop.orbax_io import read_model_spec
        from configurable_fm.train.flops import flops_per_token
        from configurable_fm.train.metrics import read_metrics

        stage_dir = Path(model_path).parent
        record = json.loads((stage_dir / "stage.json").read_text())
        seq_len = int(record["resolved"]["seq_len"])
        cfg, _ = read_model_spec(model_path)
        self.name = record["name"]
        self.flops_per_token = flops_per_token(cfg, seq_len)
        self.params = count_params(cfg)
        self.shape = (f"{cfg.num_layers} x {cfg.hidden_size}, heads {cfg.num_heads}/{cfg.num_kv_heads}, "
                      f"FFN {cfg.intermediate_size}")
        rows = read_metrics(stage_dir / "train")
        if record.get("kind") == "grow_run":  # its metrics start with the source run's: keep the grown run's own
            grown_at = int(record["metrics"]["growth_step"])
            per_step = int(record["resolved"]["batch_size"]) * seq_len
            rows = [dict(r, tokens=r["tokens"] - grown_at * per_step) for r in rows
                    if r.get("step", 0) > grown_at and "tokens" in r]
        self.val = [(r["tokens"] * self.flops_per_token, float(r["val_loss"])) for r in rows
                    if isinstance(r.get("val_loss"), (int, float)) and "tokens" in r]
        self.train = [(r["tokens"] * self.flops_per_token, float(r["loss"])) for r in rows
                      if isinstance(r.get("loss"), (int, float)) and "tokens" in r]
        steps = [r["tokens"] for r in rows if "tokens" in r]
        self.total = (max(steps) if steps else 0) * self.flops_per_token
        if not self.val:
            raise ValueError(f"stage {self.name!r}: no validation loss in {stage_dir / 'train' / 'metrics.jsonl'} "
                             "(set eval_every)")

    @property
    def final_val(self) -> float:
        return self.val[-1][1]


def count_params(cfg) -> int:
    """Parameters of a model built from `cfg` (abstractly: nothing is allocated)."""
    from flax import nnx

    from configurable_fm.bricks.paths import flat_params
    from configurable_fm.models.factory import build_model

    abstract = nnx.eval_shape(lambda: build_model(cfg))
    return int(sum(math.prod(v.shape) for v in flat_params(abstract).values()))


def first_crossing(points: Sequence[tuple[float, float]], target: float) -> float | None:
    """The compute at which the piecewise-linear curve through `points` (compute ascending) first reaches a loss
    <= `target`; None when it never does. Before the first point the curve is unknown: a first point already
    below the target counts at its own compute."""
    for i, (c, loss) in enumerate(points):
        if loss <= target:
            if i == 0:
                return float(c)
            c0, l0 = points[i - 1]
            return float(c0 + (c - c0) * (l0 - target) / (l0 - loss))
    return None


def smooth(values: Sequence[float], alpha: float = 0.1) -> list[float]:
    """Exponential moving average (bias-corrected), for plotting noisy training losses."""
    out, m = [], 0.0
    for i, v in enumerate(values, 1):
        m = (1 - alpha) * m + alpha * v
        out.append(m / (1 - (1 - alpha) ** i))
    return out


def compare(scratch: Curve, runs: Mapping[str, tuple[Curve, Curve]], goal_total: float, goal_post: float,
            controls: Mapping[str, Curve] | None = None) -> dict:
    """The figures of the module docstring for every run: {'scratch': {...}, 'runs': {label: {...}}, 'controls':
    {label: {...}}} (a control's fractions: where its own curve reaches the scratch loss)."""
    target, c_s = scratch.final_val, scratch.total
    out = {"scratch": {"stage": scratch.name, "final_val_loss": target, "compute": c_s, "params": scratch.params,
                       "shape": scratch.shape},
           "goal_total": goal_total, "goal_post": goal_post, "runs": {}}
    for label, (small, large) in runs.items():
        offset = small.total
        cross = first_crossing(large.val, target)
        final = large.final_val
        equiv = first_crossing(scratch.val, final)
        row = {"small": small.name, "large": large.name, "small_shape": small.shape, "small_params": small.params,
               "small_val_loss": small.final_val, "small_fraction": offset / c_s,
               "total_fraction_budget": (offset + large.total) / c_s, "final_val_loss": final,
               "first_large_val_loss": large.val[0][1],
               "total_fraction": None if cross is None else (offset + cross) / c_s,
               "post_fraction": None if cross is None else cross / c_s,
               "scratch_equivalent_fraction": None if equiv is None else equiv / c_s}
        row["meets_total_goal"] = row["total_fraction"] is not None and row["total_fraction"] <= goal_total
        row["meets_post_goal"] = row["post_fraction"] is not None and row["post_fraction"] <= goal_post
        out["runs"][label] = row
    out["controls"] = {}
    for label, run in (controls or {}).items():
        cross = first_crossing(run.val, target)
        equiv = first_crossing(scratch.val, run.final_val)
        out["controls"][label] = {
            "stage": run.name, "shape": run.shape, "params": run.params, "budget": run.total / c_s,
            "final_val_loss": run.final_val, "total_fraction": None if cross is None else cross / c_s,
            "scratch_equivalent_fraction": None if equiv is None else equiv / c_s}
    return out


def table(result: dict) -> str:
    s = result["scratch"]

    def frac(v):
        return "not reached" if v is None else f"{v:.3f}"

    rows = [["scratch", s["shape"], f"{s['params'] / 1e6:.1f}M", "-", "1.000", f"{s['final_val_loss']:.4f}",
             "1.000", "1.000", "-"]]
    for label, r in result["runs"].items():
        rows.append([label, r["small_shape"], f"{r['small_params'] / 1e6:.1f}M", f"{r['small_fraction']:.3f}",
                     f"{r['total_fraction_budget']:.3f}", f"{r['final_val_loss']:.4f}", frac(r["total_fraction"]),
                     frac(r["post_fraction"]), frac(r["scratch_equivalent_fraction"])])
    for label, r in result.get("controls", {}).items():
        rows.append([f"control: {label}", r["shape"], f"{r['params'] / 1e6:.1f}M", "-", f"{r['budget']:.3f}",
                     f"{r['final_val_loss']:.4f}", frac(r["total_fraction"]), "-",
                     frac(r["scratch_equivalent_fraction"])])
    head = ["run", "small model (layers x width)", "small params", "small compute", "budget (total)",
            "final val loss", "reaches scratch loss at (total)", "(post-growth only)", "scratch-equivalent"]
    legend = (f"Compute as fractions of the scratch run's ({s['compute']:.3g} FLOPs; final validation loss "
              f"{s['final_val_loss']:.4f}). 'reaches scratch loss at': the first compute at which the grown run's "
              "validation loss is at or below the scratch run's final one, counting the small model's training "
              f"(goal <= {result['goal_total']:g}) and only the post-growth training (goal <= {result['goal_post']:g}). "
              "'scratch-equivalent': the fraction of its compute at which the scratch run first reaches the grown "
              "run's final loss (indicative: scratch is then mid-schedule). A control trains a model without "
              "growth: a grown run helps only where it beats its control as well as scratch.")
    return markdown_table(head, rows) + "\n\n" + legend + "\n"


def plot(scratch: Curve, runs: Mapping[str, tuple[Curve, Curve]], path: Path,
         controls: Mapping[str, Curve] | None = None) -> None:
    from configurable_fm.stages.report import plt

    fig, ax = plt.subplots(figsize=(9, 5.5))
    c_s = scratch.total

    def draw(points, offset, color, label, style="-o"):
        xs = [(offset + c) / c_s for c, _ in points]
        ax.plot(xs, [v for _, v in points], style, color=color, label=label, markersize=3)

    draw(scratch.val, 0.0, "black", "scratch (validation)")
    ax.plot([c / c_s for c, _ in scratch.train], smooth([v for _, v in scratch.train]), "-", color="black",
            alpha=0.25, linewidth=1)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (label, (small, large)) in enumerate(runs.items()):
        color = colors[i % len(colors)]
        draw(small.val, 0.0, color, None, style=":o")
        draw(large.val, small.total, color, f"{label} (validation)")
        tr = small.train + [(small.total + c, v) for c, v in large.train]
        ax.plot([c / c_s for c, _ in tr], smooth([v for _, v in tr]), "-", color=color, alpha=0.25, linewidth=1)
        ax.axvline(small.total / c_s, color=color, linestyle="--", linewidth=0.8, alpha=0.6)
    for label, run in (controls or {}).items():
        draw(run.val, 0.0, "gray", f"control: {label} (validation)", style="--s")
    ax.axhline(scratch.final_val, color="gray", linestyle=":", linewidth=1)
    ax.set_xlabel("training compute / scratch run's total compute (dashed lines: growth points)")
    ax.set_ylabel("loss (points: validation; faint: training, smoothed)")
    vals = [v for _, v in scratch.val] + [v for s, l in runs.values() for _, v in l.val]
    ax.set_ylim(min(vals) - 0.1, np.percentile(vals, 90) + 0.5)
    ax.set_title("Growing vs training from scratch")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ------------------------------------------------------------------------------------------ the stage
def grow_compare_stage(cfg: ml_collections.ConfigDict, ctx: StageContext) -> StageOutput:
    plain = to_plain(cfg.to_dict())
    runs_cfg = plain["runs"]
    if not runs_cfg:
        raise ConfigError(f"stage {ctx.name!r}: `runs` is empty")
    for label, refs in runs_cfg.items():  # checked before any stage's files are read
        if not isinstance(refs, (list, tuple)) or len(refs) != 2:
            raise ConfigError(f"stage {ctx.name!r}: runs.{label} must be [small stage, large stage], got {refs!r}")
    scratch = Curve(plain["scratch"])
    runs = {label: (Curve(refs[0]), Curve(refs[1])) for label, refs in runs_cfg.items()}
    controls = {label: Curve(ref) for label, ref in (plain.get("controls") or {}).items()}
    result = compare(scratch, runs, float(plain["goal_total"]), float(plain["goal_post"]), controls)
    text = table(result)
    (ctx.stage_dir / "compare.json").write_text(json.dumps(
        {**result, "curves": {c.name: {"val": c.val, "train": c.train, "flops_per_token": c.flops_per_token}
                              for c in [scratch, *controls.values()] + [x for pair in runs.values() for x in pair]}},
        indent=1))
    (ctx.stage_dir / "compare.md").write_text(text)
    plot(scratch, runs, ctx.stage_dir / "compare.png", controls)
    metrics: dict[str, Any] = {"scratch_final_val_loss": result["scratch"]["final_val_loss"]}
    for label, r in result["runs"].items():
        metrics[f"{label}/final_val_loss"] = r["final_val_loss"]
        metrics[f"{label}/total_fraction"] = -1.0 if r["total_fraction"] is None else r["total_fraction"]
    figure = (ctx.stage_dir / "compare.png").relative_to(ctx.workdir)
    return StageOutput(model=None, metrics=metrics, summary=f"{text}\n![compute comparison]({figure})\n")


register_stage("grow_compare", grow_compare_stage, keys=COMPARE_KEYS)
