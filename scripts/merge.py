"""Merge models, from a mergekit YAML file (streamed) or from an ml-collections merge config (in memory).

    python scripts/merge.py --mergekit_yaml ties.yml --output merged/ [--overwrite] [--max_shard_size 5GB] [--seed 0]
    python scripts/merge.py --config experiments/merge/task_arithmetic_tiny.py[:variant] --output merged/ \
        [--format hf|orbax] [--overwrite] [--config.parameters.weight=0.3 ...]

--mergekit_yaml: the YAML is mergekit 0.1.5's format (ops/merge/mergekit_yaml.py lists the supported keys; any
other key is an error naming it and its line), with `models:` or `slices:` (frankenmerges, depth up-scaling,
slice-wise merges; the output config gets the new num_hidden_layers), `tokenizer_source` / `tokenizer`
(vocabularies aligned by token; the merged tokenizer is written, config vocab_size updated) and `chat_template`.
Inputs: HF directories or registry names; output: sharded safetensors + config.json + tokenizer files (the base's,
or the merged vocabulary's), written under a temporary name and renamed when complete.
--config: a merge config (configurable_fm/ops/merge/stage.py: method, base, models, parameters, model_parameters,
seed, out_dtype, embed_alignment) with ml_collections `--config.KEY=VALUE` overrides (a key that the config does
not have is refused with the valid keys of its level, as in scripts/train.py); inputs are any sources
`load_model` takes; output: an HF directory (`to_hf`, default) or an orbax model checkpoint (`save_model`).
Exactly one of --mergekit_yaml and --config is required.
"""
from __future__ import annotations

import argparse
import os
import re
import sys


def load_config(spec: str, overrides: list[str]):
    """The merge config of `--config=spec` with `--config.KEY=VALUE` overrides applied (ml_collections'
    config_flags semantics). Raises SystemExit-free ValueError with a readable message on a bad file or key."""
    from absl import flags
    from ml_collections import config_dict, config_flags

    from configurable_fm.config_errors import bad_override

    path = spec.split(":")[0]
    if not os.path.isfile(path):
        raise ValueError(f"--config={spec}: no such config file {path!r} (relative to {os.getcwd()})")
    argv = ["merge.py", f"--config={spec}", *overrides]
    fv = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "merge config file", flag_values=fv, lock_config=True,
                                    sys_argv=argv)
    try:
        fv(argv)
    except flags.Error as e:
        message = str(e)
        if "Error whilst parsing config file" in message:
            lines = [line.strip() for line in message.splitlines() if line.strip()]
            message = f"--config={spec}: {lines[-1]}"
        raise ValueError(message) from None
    except (AttributeError, KeyError) as e:
        try:
            message = bad_override(fv["config"].parser.parse(spec), overrides)
        except Exception:  # noqa: BLE001: fall back to ml_collections' own error
            message = None
        raise ValueError(message or f"{type(e).__name__}: {e}") from None
    if not isinstance(fv.config, config_dict.ConfigDict):
        raise ValueError(f"--config={spec}: get_config() returned {type(fv.config).__name__}, not a ConfigDict")
    return fv.config


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mergekit_yaml", help="mergekit YAML file (streamed merge of HF checkpoints)")
    parser.add_argument("--config", help="merge config file path.py[:variant] (in-memory merge; see stage.py)")
    parser.add_argument("--output", required=True, help="output directory (must not exist unless --overwrite)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    parser.add_argument("--format", choices=("hf", "orbax"), default=None,
                        help="--config only: output as an HF directory (default) or an orbax model checkpoint")
    parser.add_argument("--max_shard_size", default="5GB", help="largest output shard (e.g. 5GB, 500MB, bytes)")
    parser.add_argument("--seed", type=int, default=None,
                        help="--mergekit_yaml only: seed of the PRNG keys of randomised methods (default 0)")
    parser.add_argument("--no_progress", action="store_true", help="no progress bar")
    argv = list(sys.argv[1:] if argv is None else argv)
    overrides = [a for a in argv if re.match(r"--?config\.", a)]
    args = parser.parse_args([a for a in argv if not re.match(r"--?config\.", a)])

    if (args.mergekit_yaml is None) == (args.config is None):
        parser.error("give exactly one of --mergekit_yaml (a mergekit YAML file) and --config (a merge config), "
                     f"got {'both' if args.config else 'neither'}")
    if args.mergekit_yaml is not None:
        if overrides or args.format is not None:
            parser.error(f"{(overrides or ['--format'])[0].split('=')[0]} applies to --config only, "
                         "not to --mergekit_yaml")
        from configurable_fm.ops.merge.mergekit_yaml import load_mergekit_yaml
        from configurable_fm.ops.merge.stream import merge_checkpoints

        plan = load_mergekit_yaml(args.mergekit_yaml)
        out = merge_checkpoints(plan, args.output, overwrite=args.overwrite, max_shard_size=args.max_shard_size,
                                progress=not args.no_progress, seed=0 if args.seed is None else args.seed)
        what = f" in {len(plan.slices)} slice(s)" if plan.slices is not None else ""
        print(f"merged {len(plan.models) + (plan.base is not None)} models{what} with {plan.method} into {out}")
        return 0

    if args.seed is not None:
        parser.error("--seed applies to --mergekit_yaml only; with --config set --config.seed=N")
    try:
        config = load_config(args.config, overrides)
    except ValueError as e:
        parser.error(str(e))
    from configurable_fm.ops.merge.stage import merge_from_config

    try:
        model = merge_from_config(config, log=print)
    except (ValueError, FileNotFoundError) as e:  # bad settings, mismatched or missing inputs: the message names them
        parser.error(f"--config={args.config}: {e}")
    if (args.format or "hf") == "hf":
        from configurable_fm.interop.hf import to_hf

        out = to_hf(model, args.output, max_shard_size=args.max_shard_size, overwrite=args.overwrite)
    else:
        from configurable_fm.interop.orbax_io import save_model

        out = save_model(model, args.output, overwrite=args.overwrite)
    print(f"merged {len(config.models) + bool(config.get('base'))} models with {config.method} into {out} "
          f"({args.format or 'hf'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
