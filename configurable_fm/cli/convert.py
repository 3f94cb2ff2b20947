"""`cfm-convert` (scripts/convert.py): any model source -> a complete Hugging Face directory (config, generation
config, tokenizer files, safetensors in the chosen dtype), written atomically. The config is experiments/convert.py
(its docstring explains every key):

    cfm-convert --config experiments/convert.py --config.input=smollm2-135m-instruct --config.output=out/smollm2 \\
        [--config.dtype=bfloat16] [--config.overwrite=True] [--config.tokenizer=...] [--config.chat_template=...]

The work is `interop.hf.convert_to_hf`; input errors (a missing source, an unsupported architecture, an existing
output, a tokenizer that does not fit) print one line and exit with status 1, and nothing is written.
"""
from __future__ import annotations

import os
from pathlib import Path

from configurable_fm import cli
from configurable_fm.errors import ConfigError, UserError


def define(fv) -> None:
    cli.config_flag(fv, "config", "convert config file: experiments/convert.py (set --config.input and "
                                  "--config.output)")


def _chat_template(value: str) -> str | None:
    """'' -> None (the tokenizer's); an existing file -> its text; text with Jinja tags -> itself."""
    if not value:
        return None
    if os.path.isfile(value):
        return Path(value).read_text()
    if "{{" in value or "{%" in value:
        return value
    raise ConfigError(f"config.chat_template={value!r}: no such file, and not a Jinja template")


def run(fv) -> None:
    from configurable_fm.interop.hf import UnsupportedModel, convert_to_hf

    c = fv.config
    cli.require_config_keys(c, ("input", "output"), see="experiments/convert.py")
    tokenizer = {"": None, "none": False}.get(c.tokenizer, c.tokenizer)
    try:
        out = convert_to_hf(c.input, c.output, tokenizer=tokenizer, dtype=c.dtype,
                            chat_template=_chat_template(c.chat_template), overwrite=c.overwrite,
                            max_shard_size=c.max_shard_size)
    except NotImplementedError as e:  # a feature of the input that no reader implements (e.g. in a GGUF file)
        if isinstance(e, UserError):
            raise
        raise UnsupportedModel(str(e)) from None
    files = sorted(p.name for p in out.iterdir() if not p.name.startswith("."))
    print(f"wrote {out}: {', '.join(files)}")
    if tokenizer is None and "tokenizer.json" not in files:
        print(f"note: {c.input} has no tokenizer.json / tokenizer metadata, so no tokenizer files were written; "
              "give one with --config.tokenizer=... (a packaged model, .gguf, HF directory or tokenizer.json)")


def main(argv=None) -> int:
    return cli.run(run, define, argv, prog="cfm-convert", required=("config",))
