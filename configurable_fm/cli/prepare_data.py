"""`cfm-prepare-data` (scripts/prepare_data.py): build a token dataset (train/validation shards + manifest.json)
from an ml-collections config.

    cfm-prepare-data --config experiments/data.py:stdlib [--config.key=value] [--out DIR] [--overwrite]

Where it goes: `--out DIR` (relative to the current directory), else the config's `out_dir` resolved as training
resolves `data.dir` (train/data.py: '' -> the data root's <name>; the data root is $CFM_DATA_DIR, default
~/.cache/configurable_fm/data), so that `cfm-train` finds the dataset from any directory. The output directory
is refused if it exists, unless --overwrite; it appears only once complete. Named datasets and their options:
experiments/data.py.
"""
from __future__ import annotations

import time
from typing import Sequence

from absl import flags

from configurable_fm import cli


def define(fv: flags.FlagValues) -> None:
    cli.config_flag(fv, "config", "dataset config file (experiments/data.py:NAME)")
    flags.DEFINE_string("out", None, "output directory (default: the config's out_dir; '' -> the data root's "
                        "<name>, $CFM_DATA_DIR or ~/.cache/configurable_fm/data)", flag_values=fv)
    flags.DEFINE_bool("overwrite", False, "replace a previous output in the output directory (a directory holding files "
                      "the library did not write is refused, never deleted)", flag_values=fv)


def summary(manifest: dict, out_dir: str, seconds: float) -> str:
    """A few lines: sources (documents, characters), splits (documents, tokens, shards), time."""
    lines = [f"dataset {manifest['name']!r} -> {out_dir}  ({manifest['dtype']}, vocab {manifest['vocab_size']}, "
             f"eos {manifest['eos_id']} {manifest['eos_token']!r}, tokenizer {manifest['tokenizer']['spec']})"]
    for name, s in manifest["sources"].items():
        drops = ", ".join(f"{k} {v}" for k, v in s.items() if k.startswith(("dropped_", "skipped_")) and v)
        lines.append(f"  source {name:12s} {s['documents']:8d} docs {s['chars'] / 1e6:9.2f} M chars"
                     + (f"  ({drops})" if drops else ""))
    for split, s in manifest["splits"].items():
        lines.append(f"  split  {split:12s} {s['documents']:8d} docs {s['tokens']:12,d} tokens "
                     f"in {len(s['shards'])} shard(s), {s['chars'] / max(s['tokens'], 1):.2f} chars/token")
    lines.append(f"  {seconds:.1f} s")
    return "\n".join(lines)


def run(fv: flags.FlagValues) -> None:
    from pathlib import Path

    from configurable_fm.data.shards import build_dataset
    from configurable_fm.train.data import dataset_dir

    t0 = time.time()
    config = fv.config
    out = Path(fv.out) if fv.out else dataset_dir(config.get("out_dir"), config.name)
    if fv.overwrite or not out.exists():  # else build_dataset refuses at once
        print(f"building dataset {config.name!r} (sources: {', '.join(config.sources)}) into {out}", flush=True)
    manifest = build_dataset(config, out, overwrite=fv.overwrite, progress=True, log=print)
    print(summary(manifest, str(out), time.time() - t0))


def main(argv: Sequence[str] | None = None) -> int:
    return cli.run(run, define, argv, prog="cfm-prepare-data", required=("config",))
