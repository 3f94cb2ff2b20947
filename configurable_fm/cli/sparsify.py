"""`cfm-sparsify` (scripts/sparsify.py): give a model training-free activation sparsity (TEAL-style thresholds,
configurable_fm/analysis/sparsity) calibrated on a corpus, measure it on held-out tokens, and write it as an orbax
model checkpoint.

    python scripts/sparsify.py --config experiments/analysis/sparsify.py --config.input=IN --config.output=OUT \\
        [--config.targets=ffn|all|GLOB,GLOB] [--config.sparsity=0.5] [--config.score=magnitude|weighted|fisher] \\
        [--config.calibration.corpus=stdlib] [--config.evaluation.split=validation]

The keys are documented in experiments/analysis/sparsify.py (`sparsify_config` below holds their defaults). For
each targeted Linear l, t_l is the `sparsity` quantile of its input's score on the calibration tokens
(`calibrate(...).thresholds(p)`: |x|, |x| ||W_i|| or, with score 'fisher', |x_i| s_i where
s_i = sqrt(E[(dL/dx_i)^2]) over the same tokens, `fisher_scales`, measured with the targets dense), and the output
model zeroes the entries at or below t_l (`sparsify_activations`; with 'fisher' it keeps s as each module's
`scale`). The input may already be sparse (a recovery run's checkpoint: its thresholds are then
re-calibrated, which is how the level is restored after training moved the activations; with score 'magnitude' on
the model as it is, the targets upstream still zeroing their inputs, with 'weighted' and 'fisher' on the model with
every target dense, as `calibrate` histograms those scores) and
may carry other extensions (LoRA adapters stay attached, unmerged). With an evaluation split, the perplexity of the
input with its targets dense and of the output, and the sparsity the output achieves there (mean over the targets
and the range), are printed.

Bad input (an unknown key or value, a target that names no Linear, a sparsity outside [0, 1), no calibration
corpus, an existing output) prints one line and exits with status 1; outputs appear atomically, so nothing is
written on error. The written checkpoint loads after `import configurable_fm.analysis.sparsity` (which registers
its module kind; scripts/train.py's configs that start from it import it), and `to_hf` refuses it by name: an HF
checkpoint cannot express the thresholds.
"""
from __future__ import annotations

from typing import Sequence

import ml_collections

from configurable_fm import cli
from configurable_fm.checks import is_int
from configurable_fm.errors import ConfigError

CALIBRATION_KEYS = {"corpus": "", "tokenizer": "", "split": "train", "n_tokens": 16384, "seq_len": 512,
                    "batch_size": 8}
EVALUATION_KEYS = {"corpus": "", "split": "validation", "n_tokens": 16384}
KEYS = {"input": "", "output": "", "format": "orbax", "overwrite": False, "targets": "ffn", "sparsity": 0.5,
        "score": "magnitude"}
SCORES = ("magnitude", "weighted", "fisher")  # 'fisher': analysis.sparsity score 'scaled' with fisher_scales
TARGET_SETS = ("ffn", "all")  # the FFN down-projection inputs (the neurons), or TEAL's seven projections
SEE = "experiments/analysis/sparsify.py"


def sparsify_config(**overrides) -> ml_collections.ConfigDict:
    """A sparsify config: KEYS, `calibration` (CALIBRATION_KEYS) and `evaluation` (EVALUATION_KEYS) with
    `overrides` ({key: value}; the sections as dicts of their keys); unknown keys are a ConfigError."""
    return cli.sectioned_config("sparsify config", KEYS,
                                {"calibration": CALIBRATION_KEYS, "evaluation": EVALUATION_KEYS}, overrides)


def check_config(c) -> dict:
    """The resolved settings of a sparsify config, checked without the model: {input, output, overwrite, targets
    ('ffn', 'all' or a tuple of paths / globs), sparsity, score, calibration {...}, evaluation {...}}; ConfigError
    naming the key."""
    from configurable_fm.analysis.sparsity import check_sparsity
    from configurable_fm.data.shards import is_text_corpus

    if c.get("format") != "orbax":
        raise ConfigError(f"sparsify config: `format` must be 'orbax' (an HF checkpoint cannot express the "
                          f"thresholds), got {c.get('format')!r}")
    cal, ev = c.calibration.to_dict(), c.evaluation.to_dict()
    for section, d, keys in (("calibration", cal, ("corpus", "tokenizer", "split")),
                             ("evaluation", ev, ("corpus", "split"))):
        for key in keys:
            if not isinstance(d[key], str):
                raise ConfigError(f"sparsify config: `{section}.{key}` must be a string, got {d[key]!r}")
    counts = [(f"calibration.{key}", cal[key]) for key in ("n_tokens", "seq_len", "batch_size")]
    for key, value in counts + [("evaluation.n_tokens", ev["n_tokens"])]:
        if not is_int(value) or value < 1:
            raise ConfigError(f"sparsify config: `{key}` must be a positive int, got {value!r}")
    if not cal["corpus"]:
        raise ConfigError("sparsify config: set `calibration.corpus` (a token dataset, a .txt file or a directory of "
                          ".txt files): the thresholds are quantiles of the activations on it")
    if ev["split"] and not ev["corpus"] and is_text_corpus(cal["corpus"]):
        raise ConfigError(f"sparsify config: the calibration corpus {cal['corpus']!r} is text, which has no held-out "
                          "split: set `evaluation.corpus` (other text, or a token dataset) or `evaluation.split=''` "
                          "(no evaluation)")
    if not isinstance(c.targets, str) or not c.targets.strip():
        raise ConfigError(f"sparsify config: `targets` is 'ffn', 'all' or comma-separated Linear paths / globs, "
                          f"got {c.targets!r}")
    targets = c.targets.strip()
    if targets not in TARGET_SETS:
        targets = tuple(t.strip() for t in targets.split(","))
        if not all(targets):
            raise ConfigError(f"sparsify config: `targets` has an empty entry: {c.targets!r}")
    if c.score not in SCORES:
        raise ConfigError(f"sparsify config: `score` must be one of {list(SCORES)}, got {c.score!r}")
    sparsity = check_sparsity(c.sparsity, "the sparsify config")
    return dict(input=c.input, output=c.output, overwrite=bool(c.overwrite), targets=targets, sparsity=sparsity,
                score=c.score, calibration=cal, evaluation=ev)


def define(fv) -> None:
    cli.config_flag(fv, "config", "sparsify config file: experiments/analysis/sparsify.py[:variant] (set "
                                  "--config.input and --config.output)")


def target_paths(model, targets) -> list[str]:
    """The Linear paths of `targets` ('ffn': the FFN down projections, 'all': the family's defaults, or globs)."""
    from configurable_fm.analysis import sparsity as sp

    if targets == "ffn":
        family = sp.family_of(model)
        if family not in sp.FFN_TARGETS:
            raise ConfigError(f"sparsify config: targets='ffn' knows the FFN of {sorted(sp.FFN_TARGETS)} models, not "
                              f"of a {family} model: name its Linear paths or globs")
        return sp.resolve_targets(model, sp.FFN_TARGETS[family], op="sparsify config: targets")
    return sp.resolve_targets(model, None if targets == "all" else targets, op="sparsify config: targets")


def run(fv) -> None:
    from configurable_fm.analysis import sparsity as sp
    from configurable_fm.analysis.moefication import corpus_batches
    from configurable_fm.interop.loader import load_model
    from configurable_fm.data.shards import is_text_corpus
    from configurable_fm.interop.orbax_io import save_model
    from configurable_fm.interop.tokenizers import find_tokenizer, load_chat_tokenizer

    c = fv.config
    cli.model_output(c, "sparsify config", required=("input", "output"), see=SEE)
    d = check_config(c)
    cal, ev = d["calibration"], d["evaluation"]
    tokenizer = load_chat_tokenizer(cal["tokenizer"]) if cal["tokenizer"] else find_tokenizer(d["input"])
    if tokenizer is None:
        raise ConfigError(f"sparsify config: the source {d['input']!r} carries no tokenizer for the calibration "
                          "corpus: set `calibration.tokenizer` (a registry name, tokenizer.json, directory or .gguf)")
    model = load_model(d["input"])
    paths = target_paths(model, d["targets"])

    def batches(corpus, split, n_tokens, what):
        return corpus_batches(corpus, tokenizer, split=split, seq_len=cal["seq_len"], batch_size=cal["batch_size"],
                              n_tokens=n_tokens, what=what)

    calibration_batches = batches(cal["corpus"], cal["split"], cal["n_tokens"], "calibration corpus")
    corpus = ev["corpus"] or cal["corpus"]
    held_out = (batches(corpus, ev["split"], ev["n_tokens"], "evaluation corpus") if ev["split"]
                else None)  # its errors before anything is written
    already = [p for p in paths if p in sp.sparse_linears(model)]  # a sparse input: its targets' dense form, built
    needs_dense = d["score"] == "fisher" or held_out is not None  # only where the Fisher score or the check reads it
    dense = sp.desparsify(model, already) if already and needs_dense else model
    if d["score"] == "fisher":  # gradients through the dense targets (a mask would zero those of dropped entries)
        scales = sp.fisher_scales(dense, calibration_batches, paths)
        calibration = sp.calibrate(model, calibration_batches, paths, score="scaled", scales=scales)
    else:
        calibration = sp.calibrate(model, calibration_batches, paths, score=d["score"])
    out = sp.sparsify_activations(model, calibration.thresholds(d["sparsity"]), score=calibration.score,
                                  scales=calibration.scales)
    written = save_model(out, d["output"], overwrite=d["overwrite"])
    print(f"sparsified {d['input']}: {len(paths)} Linears ({paths[0]} ...) zero {d['sparsity']:.0%} of their input "
          f"entries on the calibration tokens ({calibration.tokens} of {cal['corpus']!r}"
          f"{'' if is_text_corpus(cal['corpus']) else ' ' + cal['split']}, score "
          f"{d['score']!r}) -> {written} (orbax)")
    if held_out is not None:
        # a sparse input is compared with its targets dense (`dense` above)
        before, after = sp.evaluate(dense, held_out), sp.evaluate(out, held_out)
        achieved = after.sparsity()
        values = [achieved[p] for p in paths]
        windows = after.scored_windows()
        change = (f"{after.perplexity() / before.perplexity() - 1:+.2%}" if windows < 2 else
                  "{:+.2%} ± {:.2%} SE over {} windows".format(*sp.perplexity_change(after, before), windows))
        print(f"held out ({after.scored_tokens()} tokens of {corpus!r}"
              f"{'' if is_text_corpus(corpus) else ' ' + ev['split']}): perplexity "
              f"{before.perplexity():.4f} with the targets dense -> {after.perplexity():.4f} "
              f"({change}); achieved sparsity mean "
              f"{sum(values) / len(values):.4f}, range {min(values):.4f}-{max(values):.4f}")


def main(argv: Sequence[str] | None = None) -> int:
    return cli.run(run, define, argv, prog="cfm-sparsify", required=("config",))
