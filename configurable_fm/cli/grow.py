"""`cfm-grow` (scripts/grow.py): grow a model (wider, deeper, or into a mixture of experts) from a grow config and
write it as a Hugging Face directory or an orbax model checkpoint.

    cfm-grow --config experiments/grow/width.py --config.input=IN --config.output=OUT \\
        --config.width.hidden_size=960 [--config.format=hf|orbax] [--config.dtype=bfloat16] [--config.overwrite=True]
    cfm-grow --config experiments/grow/depth.py --config.input=IN --config.output=OUT --config.depth.num_layers=40
    cfm-grow --config experiments/grow/upcycle.py --config.input=IN --config.output=OUT       # MixtralForCausalLM
    cfm-grow --config experiments/grow/to_shape.py:smollm2_360m --config.input=smollm2-135m --config.output=OUT

The configs are experiments/grow/*.py (their docstrings, and configurable_fm/stages/grow.py, explain every key);
the work is `stages.grow.grow_from_config`. format 'hf' (default) writes `interop.hf.to_hf` with the source's
tokenizer files when it has one (`interop.tokenizers.find_tokenizer`); 'orbax' writes `orbax_io.save_model`.
Bad input (an unknown key or value, a missing source, a target the operator cannot honour, an existing output)
prints one line and exits with status 1; everything is checked before anything is written, and outputs appear
atomically, so nothing is written on error.
"""
from __future__ import annotations

from typing import Sequence

from configurable_fm import cli

def define(fv) -> None:
    cli.config_flag(fv, "config", "grow config file: experiments/grow/{width,depth,upcycle,to_shape}.py[:variant] "
                                  "(set --config.input and --config.output)")


def run(fv) -> None:
    from configurable_fm.stages.grow import check_config, count_params, describe, grow_from_config

    c = fv.config
    fmt, overwrite = cli.model_output(c, "grow config", required=("input", "output"), see="experiments/grow/__init__.py")
    d = check_config(c)
    tokenizer = None
    if fmt == "hf":
        from configurable_fm.interop.tokenizers import find_tokenizer

        tokenizer = find_tokenizer(d["input"])
    model = grow_from_config(c, log=print)
    if fmt == "hf":
        from configurable_fm.interop.hf import to_hf

        out = to_hf(model, c.output, tokenizer=tokenizer, overwrite=overwrite)
    else:
        from configurable_fm.interop.orbax_io import save_model

        out = save_model(model, c.output, overwrite=overwrite)
    tok = " with the source's tokenizer" if tokenizer is not None else (" (no tokenizer: the source has none)"
                                                                          if fmt == "hf" else "")
    print(f"grew {d['input']} ({describe(d)}) into {out} ({fmt}{tok}): {count_params(model):,} parameters")


def main(argv: Sequence[str] | None = None) -> int:
    return cli.run(run, define, argv, prog="cfm-grow", required=("config",))
