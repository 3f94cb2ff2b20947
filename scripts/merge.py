"""Merge HF checkpoints with a mergekit YAML file, streaming tensor by tensor (configurable_fm/ops/merge/stream.py).

    python scripts/merge.py --mergekit_yaml ties.yml --output merged/ [--overwrite] [--max_shard_size 5GB] [--seed 0]

The YAML is mergekit 0.1.5's format (ops/merge/mergekit_yaml.py lists the supported keys; any other key is an
error naming it and its line). Inputs: HF directories or registry names; output: sharded safetensors +
config.json (+ the base's tokenizer files), written under a temporary name and renamed when complete.
"""
from __future__ import annotations

import argparse
import sys


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mergekit_yaml", required=True, help="mergekit YAML file")
    parser.add_argument("--output", required=True, help="output HF directory (must not exist unless --overwrite)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    parser.add_argument("--max_shard_size", default="5GB", help="largest output shard (e.g. 5GB, 500MB, bytes)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the PRNG keys of randomised methods")
    parser.add_argument("--no_progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)

    from configurable_fm.ops.merge.mergekit_yaml import load_mergekit_yaml
    from configurable_fm.ops.merge.stream import merge_checkpoints

    plan = load_mergekit_yaml(args.mergekit_yaml)
    out = merge_checkpoints(plan, args.output, overwrite=args.overwrite, max_shard_size=args.max_shard_size,
                            progress=not args.no_progress, seed=args.seed)
    print(f"merged {len(plan.models) + (plan.base is not None)} models with {plan.method} into {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
