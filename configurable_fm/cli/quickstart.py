"""`cfm-quickstart` (scripts/quickstart.py): the default end-to-end job run by `bash scripts/quickstart.sh`.

    cfm-quickstart [--workdir runs/quickstart] [--max_new_tokens 48] [--pretrain_steps 300]   # 0: no pre-training

1. Loads the packaged SmolLM2-135M-Instruct, lists its bricks and parameter counts, answers a few questions
   through its chat template (greedy, stopping at its end-of-turn token <|im_end|>) and measures perplexity on
   a fixed English passage.
2. Pre-trains the `tiny` llama of experiments/pretrain.py on the Python standard library (token shards built
   on first use into the data root, $CFM_DATA_DIR or ~/.cache/configurable_fm/data/stdlib) for a couple of
   minutes, and shows its loss curve.
Everything goes into a report (markdown + PNG plots) in the work directory. Later issues add their steps here
(merging, growing, editing). `run(workdir, ...)` is the job; `main(argv)` its command line.
"""
from __future__ import annotations

import re
import time
from collections import OrderedDict
from pathlib import Path
from typing import Sequence

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


def _layer_plot(groups):
    layers = sorted({int(k.split(".")[1]) for k in groups if k.startswith("layers.")})
    fig, ax = plt.subplots(figsize=(8, 3))
    bottom = np.zeros(len(layers))
    for part in ("self_attn", "mlp", "norms"):
        vals = np.array([groups.get(f"layers.{i}.{part}", 0) for i in layers]) / 1e6
        ax.bar(layers, vals, bottom=bottom, label=part)
        bottom += vals
    ax.set_xlabel("layer")
    ax.set_ylabel("parameters (M)")
    ax.set_title("Parameters per layer brick")
    ax.legend()
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


def pretrain_tiny(report: Report, workdir: Path, *, steps: int, log=print) -> None:
    """Trains experiments/pretrain.py:tiny on the stdlib shards and adds its loss curve to the report."""
    import shutil

    from configurable_fm.train.trainer import train
    from experiments.pretrain import get_config

    cfg = get_config("tiny")
    cfg.steps = steps
    cfg.checkpoint_every = steps
    cfg.eval_every = max(steps // 3, 1)
    if workdir.exists():  # the quickstart always shows a fresh run
        shutil.rmtree(workdir)
    from configurable_fm.train.data import dataset_dir

    log(f"pre-training the tiny llama for {steps} steps on the Python standard library "
        f"(data: {dataset_dir(cfg.data.dir, cfg.data.prepare)})")
    t0 = time.perf_counter()
    result = train(cfg, workdir, log=log)
    seconds = time.perf_counter() - t0
    first, last = result.losses[min(result.losses)], result.losses[result.step]
    log(f"  loss {first:.3f} -> {last:.3f}, best validation loss {result.best_val_loss:.3f} ({seconds:.0f}s)")
    tokens = steps * cfg.batch_size * cfg.seq_len
    report.section("Pre-training a tiny model", (
        f"`experiments/pretrain.py:tiny` ({cfg.model.num_layers} layers, width {cfg.model.hidden_size}, "
        f"SmolLM2's 49152-token vocabulary) on the Python standard library: {steps} steps of "
        f"{cfg.batch_size} x {cfg.seq_len} tokens ({tokens:,} tokens) in {seconds:.0f} s on this machine. "
        f"Training loss {first:.3f} -> {last:.3f}; best validation loss {result.best_val_loss:.3f} "
        f"(perplexity {np.exp(result.best_val_loss):.1f}). Run directory: `{workdir}` "
        "(metrics.jsonl, TensorBoard events, checkpoints)."))
    shutil.copy(workdir / "loss.png", report.workdir / "pretrain_loss.png")
    report.text("![Tiny model loss curve](pretrain_loss.png)\n")
    report.record(pretrain={"steps": steps, "first_loss": first, "last_loss": last,
                            "best_val_loss": result.best_val_loss, "seconds": seconds})


def run(workdir: str | Path = "runs/quickstart", *, model_name: str = "smollm2-135m-instruct",
        max_new_tokens: int = 48, pretrain_steps: int = 300, log=print) -> Path:
    report = Report(workdir, title="configurable_fm quickstart")
    t0 = time.perf_counter()
    model, tokenizer = load_pretrained(model_name)
    load_s = time.perf_counter() - t0
    groups = brick_groups(model)
    total = sum(groups.values())
    log(f"loaded {model_name} in {load_s:.1f}s: {total:,} parameters in {len(groups)} bricks")
    report.section("Model", f"`{model_name}` ({type(model).__name__}, {total:,} parameters), "
                            f"loaded and dequantized in {load_s:.1f} s.")
    report.code(repr(model.cfg))
    report.record(model=model_name, parameters=total, load_seconds=load_s)

    head = [(k, v) for k, v in groups.items() if not k.startswith("layers.")]
    layer0 = [(k, v) for k, v in groups.items() if k.startswith("layers.0.")]
    report.section("Bricks", f"{len(groups)} bricks; the top-level ones and those of layer 0 "
                             "(every layer has the same):")
    report.table(["brick", "parameters"], head + layer0)
    report.figure("bricks.png", _layer_plot(groups), caption="Parameter count of each layer's bricks")
    for k, v in head + layer0:
        log(f"  {k:28s} {v:>12,}")

    chat = load_chat_tokenizer(model_name, tokenizer=tokenizer)  # special tokens and chat template
    prompts = CHAT_PROMPTS if chat.chat_template else PROMPTS
    stop = ", ".join(chat.id_to_token(i) for i in chat.stop_token_ids) or "none"
    how = ("Each question is rendered by the model's chat template (as transformers' `apply_chat_template` does)"
           if chat.chat_template else "Plain continuation of each prompt")
    report.section("Generation", f"{how}; greedy, KV-cache decoding, at most {max_new_tokens} new tokens, "
                                 f"stopping at the end-of-sequence token ({stop}): `generate_text`.")
    rows, answers = [], {}
    for prompt in prompts:
        t0 = time.perf_counter()
        text = generate_text(model, chat, prompt, max_new_tokens=max_new_tokens)
        dt = time.perf_counter() - t0
        log(f"  {prompt!r} -> {text!r} ({dt:.1f}s)")
        rows.append((_inline_code(prompt), _inline_code(text), f"{dt:.1f}"))
        answers[prompt] = text
    report.table(["prompt", "answer" if chat.chat_template else "continuation", "seconds (incl. compile)"], rows)
    report.record(generations=answers, chat_template=bool(chat.chat_template))

    title, passage = english_passage()
    ids = np.asarray([tokenizer.encode(passage).ids])
    nll = token_nll(model, ids)[0]
    ppl = float(np.exp(nll.mean()))
    log(f"perplexity on {title} ({ids.shape[1]} tokens): {ppl:.2f}")
    report.section("Perplexity", f"On a fixed English passage ({title}, {ids.shape[1]} tokens): "
                                 f"**perplexity {ppl:.2f}** (mean NLL {nll.mean():.3f} nats).")
    report.figure("nll.png", _nll_plot(ids[0], nll), caption="Per-token NLL on the passage")
    report.record(perplexity=ppl, passage=title, passage_tokens=int(ids.shape[1]))

    if pretrain_steps:
        pretrain_tiny(report, Path(workdir) / "pretrain_tiny", steps=pretrain_steps, log=log)
    path = report.write()
    log(f"report: {path}")
    return path


# ------------------------------------------------------------------------------------------ command line
def define(fv: flags.FlagValues) -> None:
    flags.DEFINE_string("workdir", "runs/quickstart", "report directory (replaced on every run)", flag_values=fv)
    flags.DEFINE_integer("max_new_tokens", 48, "tokens generated per prompt", flag_values=fv)
    flags.DEFINE_integer("pretrain_steps", 300, "steps of the tiny pre-training (0 skips it)", flag_values=fv)


def run_flags(fv: flags.FlagValues) -> None:
    run(fv.workdir, max_new_tokens=fv.max_new_tokens, pretrain_steps=fv.pretrain_steps)


def main(argv: Sequence[str] | None = None) -> int:
    return cli.run(run_flags, define, argv, prog="cfm-quickstart")
