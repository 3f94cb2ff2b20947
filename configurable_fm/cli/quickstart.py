"""`cfm-quickstart` (scripts/quickstart.py): the default end-to-end job run by `bash scripts/quickstart.sh`.

    cfm-quickstart [--workdir runs/quickstart] [--max_new_tokens 48] [--pretrain_steps 120]   # 0: no pre-training

1. Loads the packaged SmolLM2-135M-Instruct (a GGUF file whose matrices are Q4_1-quantised, dequantised to
   float32 on load), lists its bricks and parameter counts, answers a few questions through its chat template
   (greedy, stopping at its end-of-turn token <|im_end|>) and measures perplexity on a fixed English passage.
2. Pre-trains the `tiny` llama of experiments/pretrain.py on the Python standard library (token shards built
   on first use into the data root, $CFM_DATA_DIR or ~/.cache/configurable_fm/data/stdlib) and shows its loss
   curve. Default 120 steps: one step of 8 x 128 tokens takes ~0.5-0.9 s on a 2-core CPU (measured: 1.1-2.0 k
   tokens/s; 300 steps took 501 s in total), so the pre-training takes ~1-2 minutes and the whole job stays
   within ~5 minutes from a fresh clone, while the smoothed training loss still drops from ~10.8 (uniform over
   the 49152-token vocabulary) by several nats.
Progress is never silent for long: the trainer's bar becomes log lines every ~10 s when stderr is not a
terminal (train/metrics.py ProgressBar). Everything goes into a report (report.md with PNG plots, report.json)
in the work directory, headed by the total time, device, jax/flax versions and git revision. Later issues add
their steps here (merging, growing, editing). `run(workdir, ...)` is the job; `main(argv)` its command line.
"""
from __future__ import annotations

import os
import platform
import re
import subprocess
import time
from collections import OrderedDict
from pathlib import Path
from typing import Sequence

import jax

import matplotlib.pyplot as plt
import numpy as np
from absl import flags

from configurable_fm import cli
from configurable_fm.bricks import flat_params
from configurable_fm.data.texts import english_passage
from configurable_fm.models.scoring import token_nll
from configurable_fm.models.generation import generate_text
from configurable_fm.interop.loader import load_pretrained
from configurable_fm.interop.tokenizers import load_chat_tokenizer
from configurable_fm.stages.report import Report

# Questions for instruct models (rendered by the model's chat template); plain prompts for models without one.
CHAT_PROMPTS = ("What is the capital of France?", "In one sentence, what is a large language model?",
                "Write a Python function that returns the n-th Fibonacci number.")
PROMPTS = ("The capital of France is", "A large language model is built from", "def fibonacci(n):")


def _inline_code(text: str) -> str:
    """`text` as inline code in a markdown table cell: newlines as \\n, pipes escaped, and a backtick fence
    longer than any backtick run inside (answers often hold ``` code fences)."""
    text = text.replace("\n", "\\n").replace("|", "\\|")
    fence = "`" * (max((len(r) for r in re.findall(r"`+", text)), default=0) + 1)
    return f"{fence} {text} {fence}" if len(fence) > 1 else f"`{text}`"


def brick_groups(model) -> "OrderedDict[str, int]":
    """Parameter counts per brick: `embed_tokens`, `layers.N.self_attn`, `layers.N.mlp`, `layers.N.norms`, `norm`."""
    groups: OrderedDict[str, int] = OrderedDict()
    for path, value in flat_params(model).items():
        m = re.match(r"(layers\.\d+)\.(\w+)", path)
        if m:
            name = m.group(2)
            key = f"{m.group(1)}.{'norms' if name.endswith('layernorm') else name}"
        else:
            key = path.split(".")[0]
        groups[key] = groups.get(key, 0) + int(value.size)
    return groups


BRICK_KINDS = ("embeddings", "attention", "MLP", "norms", "output head")


def brick_kind(key: str) -> str:
    """The kind of a `brick_groups` key: embeddings, attention, MLP, norms or output head (other: the key)."""
    last = key.split(".")[-1]
    if last.startswith("embed"):
        return "embeddings"
    if last in ("self_attn", "attn", "attention"):
        return "attention"
    if last == "mlp":
        return "MLP"
    if last in ("norm", "norms") or last.endswith("norm"):
        return "norms"
    if last == "lm_head":
        return "output head"
    return last


def kind_totals(groups) -> "OrderedDict[str, int]":
    """Parameter counts per brick kind (summed over layers), in BRICK_KINDS order, kinds without parameters left out."""
    totals: OrderedDict[str, int] = OrderedDict((k, 0) for k in BRICK_KINDS)
    for key, n in groups.items():
        kind = brick_kind(key)
        totals[kind] = totals.get(kind, 0) + n
    return OrderedDict((k, v) for k, v in totals.items() if v)


def _kind_plot(totals, num_layers: int):
    fig, ax = plt.subplots(figsize=(7, 0.6 + 0.55 * len(totals)))
    names, values = list(totals)[::-1], np.array(list(totals.values())[::-1], dtype=float)
    bars = ax.barh(names, values / 1e6, color="tab:blue")
    total = values.sum()
    for bar, v in zip(bars, values):
        ax.text(bar.get_width(), bar.get_y() + bar.get_height() / 2, f" {v / 1e6:.2f} M ({100 * v / total:.0f}%)",
                va="center", fontsize=9)
    ax.set_xlim(0, values.max() / 1e6 * 1.35)
    ax.set_xlabel("parameters (M)")
    ax.set_title(f"Parameters per brick kind (summed over {num_layers} layers)")
    return fig


def _nll_plot(tokens, nll):
    fig, ax = plt.subplots(figsize=(8, 3))
    ax.plot(np.arange(1, len(nll) + 1), nll, lw=0.8)
    window = min(16, len(nll))
    ax.plot(np.arange(window, len(nll) + 1), np.convolve(nll, np.ones(window) / window, mode="valid"),
            lw=2, label=f"{window}-token mean")
    ax.set_xlabel("token position")
    ax.set_ylabel("NLL (nats)")
    ax.set_title(f"Per-token negative log-likelihood ({len(tokens)} tokens)")
    ax.legend()
    return fig


def smoothed_ends(losses: Sequence[float], fraction: float = 0.1) -> tuple[float, float, int]:
    """(mean of the first, mean of the last `fraction` of `losses`, how many each mean covers (>= 1))."""
    losses = np.asarray(losses, dtype=float)
    if losses.size == 0:
        raise ValueError("no losses")
    k = max(1, int(round(fraction * losses.size)))
    return float(losses[:k].mean()), float(losses[-k:].mean()), k


def pretrain_tiny(report: Report, workdir: Path, *, steps: int, log=print) -> None:
    """Trains experiments/pretrain.py:tiny on the stdlib shards and adds its loss curve to the report."""
    import shutil

    from configurable_fm.train.data import dataset_dir
    from configurable_fm.train.trainer import train
    from experiments.pretrain import get_config

    cfg = get_config("tiny")
    cfg.steps = steps
    cfg.log_every = max(1, min(cfg.log_every, steps // 20))  # ~20 points on the curve, progress every few s
    cfg.checkpoint_every = steps
    cfg.eval_every = max(steps // 3, 1)
    if workdir.exists():  # the quickstart always shows a fresh run
        shutil.rmtree(workdir)

    log(f"pre-training the tiny llama for {steps} steps on the Python standard library "
        f"(data: {dataset_dir(cfg.data.dir, cfg.data.prepare)})")
    t0 = time.perf_counter()
    result = train(cfg, workdir, log=log)
    seconds = time.perf_counter() - t0
    losses = [result.losses[s] for s in sorted(result.losses)]
    first, last, k = smoothed_ends(losses)
    smoothed = (f"mean of the first {k} step{'s' if k > 1 else ''}' losses -> mean of the last {k}"
                if k > 1 else "first step's loss -> last step's loss")
    val = result.best_val_loss
    val_text = (f"best validation loss {val:.3f} (perplexity {np.exp(val):.1f}, {cfg.data.max_eval_batches} held-out "
                f"batches)" if val is not None else "no validation loss")
    log(f"  training loss {first:.3f} -> {last:.3f} ({smoothed}), {val_text} ({seconds:.0f}s)")
    tokens = steps * cfg.batch_size * cfg.seq_len
    report.section("Pre-training a tiny model", (
        f"`experiments/pretrain.py:tiny` ({cfg.model.num_layers} layers, width {cfg.model.hidden_size}, "
        f"SmolLM2's 49152-token vocabulary) on the Python standard library: {steps} steps of "
        f"{cfg.batch_size} x {cfg.seq_len} tokens ({tokens:,} tokens) in {seconds:.0f} s on this machine "
        f"({tokens / seconds:,.0f} tokens/s including compilation and evaluation).\n\n"
        f"**Training loss {first:.3f} -> {last:.3f}** ({smoothed}, in nats/token; a uniform guess over the "
        f"vocabulary is ln 49152 = {np.log(49152):.2f}); {val_text}. Run directory: `{workdir}` "
        "(metrics.jsonl, TensorBoard events, checkpoints)."))
    shutil.copy(workdir / "loss.png", report.workdir / "pretrain_loss.png")
    report.text("![Tiny model loss curve](pretrain_loss.png)\n")
    report.record(pretrain={"steps": steps, "seconds": seconds, "tokens": tokens,
                            "smoothed_first_loss": first, "smoothed_last_loss": last, "smoothing_steps": k,
                            "first_step_loss": losses[0], "last_step_loss": losses[-1], "best_val_loss": val})


def git_revision(path: str | os.PathLike | None = None) -> str:
    """`git describe --always --dirty` of the checkout holding `path` (default: this package), or 'unknown'."""
    path = Path(path) if path is not None else Path(__file__).resolve().parent
    try:
        out = subprocess.run(["git", "describe", "--always", "--dirty", "--abbrev=12"], cwd=path,
                             capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return "unknown (git not available)"
    return out.stdout.strip() if out.returncode == 0 and out.stdout.strip() else "unknown (not a git checkout)"


def environment() -> dict:
    """Device, versions and git revision of this run, for the report's header."""
    import flax

    devices = jax.devices()
    kind = devices[0].device_kind
    device = f"{len(devices)} x {kind}" if len(devices) > 1 else kind
    if devices[0].platform == "cpu":
        device = f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores visible)"
    return {"device": device, "platform": devices[0].platform, "jax": jax.__version__, "flax": flax.__version__,
            "python": platform.python_version(), "git_revision": git_revision()}


def weight_types(source) -> dict[str, int]:
    """{GGML tensor type: count} of a packaged model's GGUF file, given the model's name or the file's open
    reader (`load_pretrained(..., with_source=True)`); {} for other formats or on any error."""
    try:
        from configurable_fm.interop.gguf import read_gguf
        from configurable_fm.models import registry

        if isinstance(source, (str, Path)):
            name = registry.canonical_name(str(source), missing_ok=True)
            if name is None or registry.MODELS[name].format != "gguf":
                return {}
            source = read_gguf(registry.model_path(name))
        types: dict[str, int] = {}
        for t in source.tensors:
            types[t.tensor_type.name] = types.get(t.tensor_type.name, 0) + 1
        return dict(sorted(types.items(), key=lambda kv: -kv[1]))
    except Exception:  # only used to describe the weights
        return {}


def run(workdir: str | Path = "runs/quickstart", *, model_name: str = "smollm2-135m-instruct",
        max_new_tokens: int = 48, pretrain_steps: int = 120, log=print) -> Path:
    t_start = time.perf_counter()
    report = Report(workdir, title="configurable_fm quickstart")
    env = environment()
    log(f"device: {env['device']}; jax {env['jax']}, flax {env['flax']}; git {env['git_revision']}")
    t0 = time.perf_counter()
    model, tokenizer, source = load_pretrained(model_name, with_source=True)
    load_s = time.perf_counter() - t0
    types = weight_types(source)
    groups = brick_groups(model)
    total = sum(groups.values())
    log(f"loaded {model_name} in {load_s:.1f}s: {total:,} parameters in {len(groups)} bricks")
    quant = ""
    if types:
        listed = ", ".join(f"{n} {t}" for t, n in types.items())
        low = [t for t in types if t.startswith("Q")]
        quant = (f" The packaged file is a GGUF whose tensors are stored as {listed}: the weight matrices are "
                 f"{'/'.join(low)}-quantised (Q4_1: 4-bit blocks of 32 values with a scale and an offset) and "
                 "dequantised to float32 when loaded, so this is the quantised model, not the original bf16 "
                 "weights; the rounding costs some quality (see Perplexity)." if low else
                 f" The packaged file is a GGUF whose tensors are stored as {listed}.")
    report.section("Model", f"`{model_name}` ({type(model).__name__}, {total:,} parameters), "
                            f"loaded and dequantized in {load_s:.1f} s.{quant}")
    report.code(repr(model.cfg))
    report.record(model=model_name, parameters=total, load_seconds=load_s, weight_types=types)

    head = [(k, v) for k, v in groups.items() if not k.startswith("layers.")]
    layer0 = [(k, v) for k, v in groups.items() if k.startswith("layers.0.")]
    kinds = kind_totals(groups)
    num_layers = len({k.split(".")[1] for k in groups if k.startswith("layers.")})
    report.section("Bricks", f"{len(groups)} bricks; the top-level ones and those of layer 0 "
                             f"(each of the {num_layers} layers has the same):")
    report.table(["brick", "parameters"], head + layer0)
    report.text("Per kind of brick, summed over the layers:")
    report.table(["kind", "parameters", "share"], [(k, v, f"{100 * v / total:.1f}%") for k, v in kinds.items()])
    report.figure("bricks.png", _kind_plot(kinds, num_layers), caption="Parameters per brick kind")
    report.record(parameters_per_kind=dict(kinds))
    for k, v in head + layer0:
        log(f"  {k:28s} {v:>12,}")

    chat = load_chat_tokenizer(source, tokenizer=tokenizer)  # special tokens and chat template
    prompts = CHAT_PROMPTS if chat.chat_template else PROMPTS
    stop = ", ".join(chat.id_to_token(i) for i in chat.stop_token_ids) or "none"
    how = ("Each question is rendered by the model's chat template (as transformers' `apply_chat_template` does)"
           if chat.chat_template else "Plain continuation of each prompt")
    report.section("Generation", f"{how}; greedy, KV-cache decoding, at most {max_new_tokens} new tokens, "
                                 f"stopping at the end-of-sequence token ({stop}): `generate_text`.")
    rows, generations = [], []
    for prompt in prompts:
        t0 = time.perf_counter()
        text = generate_text(model, chat, prompt, max_new_tokens=max_new_tokens)
        dt = time.perf_counter() - t0
        log(f"  {prompt!r} -> {text!r} ({dt:.1f}s)")
        rows.append((_inline_code(prompt), _inline_code(text), f"{dt:.1f}"))
        generations.append({"prompt": prompt, "text": text, "seconds": round(dt, 2)})
    report.table(["prompt", "answer" if chat.chat_template else "continuation", "seconds (incl. compile)"], rows)
    report.text(f"Your own prompts, the answer streamed as it is made: `cfm-generate --config experiments/generate.py "
                f"--config.input={model_name} --config.prompt=\"...\"` (without a prompt: a chat on the terminal).")
    report.record(generations=generations, chat_template=bool(chat.chat_template))

    title, passage = english_passage()
    ids = np.asarray([tokenizer.encode(passage).ids])
    nll = token_nll(model, ids)[0]
    ppl = float(np.exp(nll.mean()))
    log(f"perplexity on {title} ({ids.shape[1]} tokens): {ppl:.2f}")
    q4 = "Q4_1" in types
    quant_note = (" These are the Q4_1-dequantised weights: the 4-bit rounding raises the perplexity relative to "
                  "the original bf16 weights, by an amount not measured here (the original weights are not "
                  "packaged), so this is the quantised model's perplexity." if q4 else "")
    report.section("Perplexity", f"On a fixed English passage ({title}, {ids.shape[1]} tokens): "
                                 f"**perplexity {ppl:.2f}** (mean NLL {nll.mean():.3f} nats).{quant_note}")
    report.figure("nll.png", _nll_plot(ids[0], nll), caption="Per-token NLL on the passage")
    report.record(perplexity=ppl, passage=title, passage_tokens=int(ids.shape[1]),
                  perplexity_weights="Q4_1-dequantised" if q4 else "as packaged")

    if pretrain_steps:
        pretrain_tiny(report, Path(workdir) / "pretrain_tiny", steps=pretrain_steps, log=log)
    total_s = time.perf_counter() - t_start
    report.parts.insert(0, (
        f"Total time **{total_s:.0f} s** on {env['device']} (jax platform `{env['platform']}`); jax {env['jax']}, "
        f"flax {env['flax']}, Python {env['python']}; git revision `{env['git_revision']}`.\n"))
    report.record(total_seconds=total_s, **env)
    path = report.write()
    log(f"report: {path} ({total_s:.0f}s in total)")
    return path


# ------------------------------------------------------------------------------------------ command line
def define(fv: flags.FlagValues) -> None:
    flags.DEFINE_string("workdir", "runs/quickstart", "report directory (replaced on every run)", flag_values=fv)
    flags.DEFINE_integer("max_new_tokens", 48, "tokens generated per prompt", lower_bound=0, flag_values=fv)
    flags.DEFINE_integer("pretrain_steps", 120, "steps of the tiny pre-training (0 skips it)", lower_bound=0,
                         flag_values=fv)


def run_flags(fv: flags.FlagValues) -> None:
    run(fv.workdir, max_new_tokens=fv.max_new_tokens, pretrain_steps=fv.pretrain_steps)


def main(argv: Sequence[str] | None = None) -> int:
    return cli.run(run_flags, define, argv, prog="cfm-quickstart")
