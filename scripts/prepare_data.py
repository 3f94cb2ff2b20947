"""Builds a token dataset (train/validation shards + manifest.json) from an ml-collections config.

    python scripts/prepare_data.py --config experiments/data.py:stdlib [--config.key=value] [--out DIR] [--overwrite]

The output directory (default: the config's out_dir, data/<name>) is refused if it exists, unless --overwrite;
it appears only once complete. Named datasets and their options: experiments/data.py.
"""
import sys
import time

from absl import flags

from configurable_fm import cli


def define(fv):
    cli.config_flag(fv, "config", "dataset config file (experiments/data.py:NAME)")
    flags.DEFINE_string("out", None, "output directory (default: config.out_dir)", flag_values=fv)
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


def main(fv) -> None:
    from configurable_fm.data.shards import build_dataset

    t0 = time.time()
    out = fv.out or fv.config.out_dir or f"data/{fv.config.name}"
    manifest = build_dataset(fv.config, out, overwrite=fv.overwrite, progress=True, log=print)
    print(summary(manifest, out, time.time() - t0))


if __name__ == "__main__":
    sys.exit(cli.run(main, define, required=("config",)))
