"""`cfm-moefy` (scripts/moefy.py): MoEfy a dense model (its FFNs regrouped into routed experts,
configurable_fm/analysis/moefication) and write it as an orbax model checkpoint or a Mixtral HF directory.

    python scripts/moefy.py --config experiments/analysis/moefy.py --config.input=IN --config.output=OUT \\
        [--config.num_experts=16] [--config.num_experts_per_tok=4] [--config.split=kmeans|coactivation|cmoe|random] \\
        [--config.router=oracle|centroid|mlp] [--config.calibration.corpus=stdlib] [--config.format=orbax|hf]

The keys are documented in experiments/analysis/moefy.py (`moefy_config` below holds their defaults). format
'orbax' writes the MoEfied model itself (`orbax_io.save_model`; load it after importing
configurable_fm.analysis.moefication, which registers its module kind); 'hf' writes MixtralForCausalLM
(`moefication.to_mixtral` + `interop.hf.to_hf`, with the source's tokenizer files when it has one): exact with all
routed experts active, an approximation with the centroid router and `mixtral_router_scale` > 0, refused otherwise.
With a calibration corpus the per-layer error and router recall on it are printed (moefication.layer_metrics).

Bad input (an unknown key or value, a split or router that needs calibration data without a corpus, a width that
num_experts does not divide, num_experts_per_tok above the routed experts, an output Mixtral cannot express, an
existing output) prints one line and exits with status 1. Everything that does not need the model is checked
before it is loaded, the rest before the MoEfication starts; outputs appear atomically, so nothing is written on
error.
"""
from __future__ import annotations

from typing import Sequence

import ml_collections

from configurable_fm import cli
from configurable_fm.checks import is_int, is_real
from configurable_fm.errors import ConfigError

CALIBRATION_KEYS = {"corpus": "", "tokenizer": "", "split": "train", "n_tokens": 16384, "seq_len": 256,
                    "batch_size": 8}
ROUTER_TRAINING_KEYS = {"steps": 300, "batch_size": 512, "learning_rate": 1e-2, "hidden": 0, "max_tokens": 16384}
KEYS = {"input": "", "output": "", "format": "orbax", "overwrite": False, "seed": 0, "num_experts": 16,
        "num_experts_per_tok": 4, "num_shared": -1, "split": "kmeans", "router": "centroid", "active_fraction": 0.1,
        "mixtral_router_scale": 0.0}
SEE = "experiments/analysis/moefy.py"
DATA_HINT = "set --config.calibration.corpus (a token dataset, a .txt file or a directory of .txt files)"


def moefy_config(**overrides) -> ml_collections.ConfigDict:
    """A moefy config: KEYS, `calibration` (CALIBRATION_KEYS) and `router_training` (ROUTER_TRAINING_KEYS) with
    `overrides` ({key: value}; the two sections as dicts of their keys); unknown keys are a ConfigError."""
    return cli.sectioned_config("moefy config", KEYS,
                                {"calibration": CALIBRATION_KEYS, "router_training": ROUTER_TRAINING_KEYS}, overrides)


def _int(c, key: str, value, low: int) -> int:
    if not is_int(value) or value < low:
        raise ConfigError(f"moefy config: `{key}` must be an int >= {low}, got {value!r}")
    return value


def check_config(c) -> dict:
    """The resolved settings of a moefy config, checked without the model: {input, output, format, overwrite,
    seed, options (moefication.check_options' dict), calibration {...}, training (RouterTraining), router_scale}.
    ConfigError (a MoefyError for the MoEfication options) naming the key."""
    from configurable_fm.analysis.moefication import RouterTraining, check_options, mixtral_plan

    cal = c.calibration.to_dict()
    for key in ("corpus", "tokenizer", "split"):
        if not isinstance(cal[key], str):
            raise ConfigError(f"moefy config: `calibration.{key}` must be a string, got {cal[key]!r}")
    for key in ("n_tokens", "seq_len", "batch_size"):
        _int(c, f"calibration.{key}", cal[key], 1)
    num_shared = _int(c, "num_shared", c.num_shared, -1)
    try:
        training = RouterTraining(**c.router_training.to_dict()).check("moefy config: router_training")
    except ValueError as e:
        raise ConfigError(str(e)) from None
    options = check_options(None, num_experts=c.num_experts, num_experts_per_tok=c.num_experts_per_tok, split=c.split,
                            router=c.router, num_shared=None if num_shared < 0 else num_shared,
                            active_fraction=c.active_fraction, has_calibration=bool(cal["corpus"]),
                            op="moefy config", data_hint=DATA_HINT)
    scale = c.mixtral_router_scale
    if not is_real(scale) or not 0 <= scale < float("inf"):
        raise ConfigError(f"moefy config: `mixtral_router_scale` must be a number >= 0, got {scale!r}")
    fmt = c.get("format") or "hf"
    if fmt == "hf":
        mixtral_plan(num_experts=options["num_experts"], num_shared=options["num_shared"], top_k=options["top_k"],
                     router=options["router"], router_scale=float(scale) or None, op="moefy config (format=hf)")
    return dict(input=c.input, output=c.output, format=fmt, overwrite=bool(c.overwrite),
                seed=_int(c, "seed", c.seed, 0), options=options, calibration=cal, training=training,
                router_scale=float(scale))


def define(fv) -> None:
    cli.config_flag(fv, "config", "moefy config file: experiments/analysis/moefy.py[:variant] (set --config.input and "
                                  "--config.output)")


def run(fv) -> None:
    from configurable_fm.analysis import moefication as mf
    from configurable_fm.interop.loader import load_model
    from configurable_fm.interop.tokenizers import find_tokenizer, load_chat_tokenizer

    c = fv.config
    fmt, overwrite = cli.model_output(c, "moefy config", required=("input", "output"), see=SEE)
    d = check_config(c)
    opts, cal = d["options"], d["calibration"]
    tokenizer = find_tokenizer(d["input"]) if fmt == "hf" or (cal["corpus"] and not cal["tokenizer"]) else None
    corpus_tokenizer = load_chat_tokenizer(cal["tokenizer"]) if cal["tokenizer"] else tokenizer
    if cal["corpus"] and corpus_tokenizer is None:
        raise ConfigError(f"moefy config: the source {d['input']!r} carries no tokenizer for the calibration corpus: "
                          "set `calibration.tokenizer` (a registry name, tokenizer.json, directory or .gguf)")
    model = load_model(d["input"])
    ffns = mf.ffn_layers(model, "moefy")
    mf.check_options(mf.dense_layout(ffns[0][1])["neurons"], num_experts=opts["num_experts"],
                     num_experts_per_tok=opts["top_k"], split=opts["split"], router=opts["router"],
                     num_shared=opts["num_shared"], active_fraction=opts["active_fraction"],
                     has_calibration=bool(cal["corpus"]), op="moefy", data_hint=DATA_HINT)
    if fmt == "hf":
        from configurable_fm.models.llama import LlamaConfig

        if not isinstance(model.cfg, LlamaConfig) or model.cfg.mlp_bias:
            raise ConfigError(f"moefy config (format=hf): MixtralForCausalLM holds llama-family FFNs without biases; "
                              f"{d['input']!r} is a {type(model).__name__}"
                              f"{' with mlp_bias' if getattr(model.cfg, 'mlp_bias', False) else ''}: use format=orbax")
    batches = None
    if cal["corpus"]:
        batches = mf.corpus_batches(cal["corpus"], corpus_tokenizer, split=cal["split"], seq_len=cal["seq_len"],
                                    batch_size=cal["batch_size"], n_tokens=cal["n_tokens"])
    moe = mf.moefy(model, num_experts=opts["num_experts"], num_experts_per_tok=opts["top_k"], split=opts["split"],
                   router=opts["router"], num_shared=opts["num_shared"], active_fraction=opts["active_fraction"],
                   calibration=batches, key=d["seed"], router_training=d["training"], log=print)
    if fmt == "hf":
        from configurable_fm.interop.hf import to_hf

        out = to_hf(mf.to_mixtral(moe, router_scale=d["router_scale"] or None), d["output"], tokenizer=tokenizer,
                    overwrite=overwrite)
    else:
        from configurable_fm.interop.orbax_io import save_model

        out = save_model(moe, d["output"], overwrite=overwrite)
    shared = f" ({opts['num_shared']} shared)" if opts["num_shared"] else ""
    print(f"moefied {d['input']}: {len(ffns)} FFNs into {opts['num_experts']} experts{shared}, top "
          f"{opts['top_k']} routed, split {opts['split']!r}, router {opts['router']!r} -> {out} ({fmt})")
    if batches is not None:
        print(mf.format_metrics(mf.layer_metrics(model, moe, batches)))


def main(argv: Sequence[str] | None = None) -> int:
    return cli.run(run, define, argv, prog="cfm-moefy", required=("config",))
