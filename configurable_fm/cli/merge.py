"""`cfm-merge` (scripts/merge.py): merge models, from a mergekit YAML file (streamed) or from an ml-collections
merge config (in memory).

    cfm-merge --mergekit_yaml ties.yml --output merged/ [--overwrite] [--max_shard_size 5GB] [--seed 0] \\
        [--compute_dtype mergekit|float32|float16|bfloat16] [--timers] [--read_workers N]
    cfm-merge --mergekit_yaml multi.yml --output merged/ [--intermediate_dir merged.stages/]   # mergekit-multi
    cfm-merge --config experiments/merge/task_arithmetic_tiny.py[:variant] --output merged/ \\
        [--format hf|orbax] [--overwrite] [--config.parameters.weight=0.3 ...]

--mergekit_yaml: the YAML is mergekit 0.1.5's format (ops/merge/mergekit_yaml.py lists the supported keys; any
other key is an error naming it and its line), with `models:` or `slices:` (frankenmerges, depth up-scaling,
slice-wise merges; the output config gets the new num_hidden_layers), `tokenizer_source` / `tokenizer`
(vocabularies aligned by token; the merged tokenizer is written, config vocab_size updated) and `chat_template`.
Inputs: HF directories, GGUF files, orbax model checkpoints or registry names; output: sharded safetensors +
config.json + tokenizer files (the base's, or the merged vocabulary's), written under a temporary name and renamed
when complete.
--compute_dtype: the merge arithmetic of --mergekit_yaml (ops/merge/precision.py). Default `mergekit`: as mergekit
0.1.5 computes, in the YAML's `dtype:` (else the inputs' stored dtype), rounding after every operation in float16
or bfloat16, so a published mergekit YAML gives mergekit's weights; without `out_dtype:`, arcee_fusion and
ramplus_tl then write float32 as mergekit does. `float32`: every method in float32, rounded once at the end
(more accurate: it avoids, e.g., mergekit's division by a float16 zero when normalised weights sum to 0; the
result differs from mergekit's in the last bits of some entries and, for sparsifying methods, in which entries
are kept). `float16` / `bfloat16`: mergekit's rounding in that dtype whatever the YAML says.
A YAML of several documents (separated by `---`) is a multi-stage merge, mergekit-multi's format
(ops/merge/multistage.py): each document a merge, the named ones (`name: first-merge`) intermediates written to
`--intermediate_dir/<name>` (default: `<output>.stages`, next to the output), the one unnamed document the final
merge written to --output; later documents use an intermediate by its name as a model (`base_model: first-merge`).
Stages run in dependency order, one line each (`stage 2/3 'second-merge': ...`); on a rerun an intermediate is
reused when its document, inputs and files are unchanged (a hash recorded next to it), else merged again.
Duplicate names, two unnamed documents, cycles and unknown references are errors naming the line, and so is a
file whose documents are all named (mergekit-multi writes those into the intermediate directory only; here the
final document must be unnamed). --overwrite applies to --output, checked before the first stage runs.
--intermediate_dir with a single-document YAML is a usage error.
On a GPU the command sets XLA_PYTHON_CLIENT_PREALLOCATE=false for its process unless it is set already (jax's
preallocation of most of the GPU's memory cost ~2 s of every merge; `no_device_preallocation`).
--config: a merge config (configurable_fm/stages/merge.py: method, base, models, parameters, model_parameters,
seed, out_dtype, embed_alignment) with ml_collections `--config.KEY=VALUE` overrides (a key that the config does
not have is refused with the valid keys of its level, as in cfm-train); inputs are any sources `load_model`
takes; output: an HF directory (`to_hf`, default) or an orbax model checkpoint (`save_model`).
Exactly one of --mergekit_yaml and --config is required. Paths (the YAML's, the config's sources, --output) are
relative to the current directory. Inputs that cannot be merged (different architectures or vocabularies) are
one short error: what differs, the first tensors that differ, and the knob that aligns vocabularies
(`tokenizer_source: base` in a YAML, `--config.embed_alignment=base` in a merge config).
"""
from __future__ import annotations

import os
import time
from typing import Sequence

from absl import flags

from configurable_fm import cli


def define(fv: flags.FlagValues) -> None:
    flags.DEFINE_string("mergekit_yaml", None, "mergekit YAML file (streamed merge of HF checkpoints)", flag_values=fv)
    cli.config_flag(fv, "config", "merge config file path.py[:variant] (in-memory merge; see stages/merge.py)")
    flags.DEFINE_string("output", None, "output directory (must not exist unless --overwrite)", flag_values=fv)
    flags.DEFINE_string("intermediate_dir", None, "--mergekit_yaml with several documents only: directory of the "
                        "named stages' outputs (default: <output>.stages)", flag_values=fv)
    flags.DEFINE_bool("overwrite", False, "replace a previous output in the output directory (a directory holding files "
                      "the library did not write is refused, never deleted)", flag_values=fv)
    flags.DEFINE_enum("format", None, ["hf", "orbax"],
                      "--config only: output as an HF directory (default) or an orbax model checkpoint", flag_values=fv)
    flags.DEFINE_string("max_shard_size", "5GB", "largest output shard (e.g. 5GB, 500MB, bytes)", flag_values=fv)
    flags.DEFINE_integer("seed", None, "--mergekit_yaml only: seed of the PRNG keys of randomised methods (default 0)",
                         flag_values=fv)
    flags.DEFINE_bool("no_progress", False, "no progress bar", flag_values=fv)
    flags.DEFINE_bool("timers", False, "--mergekit_yaml with one document only: print the busy seconds of each stage "
                      "of the streamed merge (read, to_device, compute, write; they overlap) and the wall time",
                      flag_values=fv)
    flags.DEFINE_integer("read_workers", None, "--mergekit_yaml only: tensors read (and copied to the device) at "
                         "once; default 1 on the CPU, 4 on an accelerator", lower_bound=1, flag_values=fv)
    flags.DEFINE_enum("compute_dtype", "mergekit", ["mergekit", "float32", "float16", "bfloat16"],
                      "--mergekit_yaml only: merge arithmetic: 'mergekit' (in the YAML's dtype, as mergekit "
                      "0.1.5), 'float32' (float32, rounded once at the end) or a dtype", flag_values=fv)


def merge_yaml(fv: flags.FlagValues) -> None:
    from configurable_fm.ops.merge import multistage
    from configurable_fm.ops.merge.mergekit_yaml import load_mergekit_yaml
    from configurable_fm.ops.merge.execute import Timers
    from configurable_fm.ops.merge.stream import merge_checkpoints

    if multistage.is_multi_document(fv.mergekit_yaml):
        if fv.timers:
            raise cli.UsageError("--timers applies to a single-document --mergekit_yaml only")
        return merge_stages(fv)
    if fv.intermediate_dir is not None and os.path.isfile(fv.mergekit_yaml):
        raise cli.UsageError(f"--intermediate_dir applies to a multi-stage YAML (several documents separated by "
                             f"'---') only; {fv.mergekit_yaml} has one document")
    plan = load_mergekit_yaml(fv.mergekit_yaml)
    timers, t0 = (Timers() if fv.timers else None), time.perf_counter()
    out = merge_checkpoints(plan, fv.output, overwrite=fv.overwrite, max_shard_size=fv.max_shard_size,
                            progress=not fv.no_progress, seed=0 if fv.seed is None else fv.seed,
                            compute_dtype=fv.compute_dtype, timers=timers, read_workers=fv.read_workers)
    what = f" in {len(plan.slices)} slice(s)" if plan.slices is not None else ""
    print(f"merged {len(plan.models) + (plan.base is not None)} models{what} with {plan.method} into {out}")
    if timers is not None:
        print(f"wall {time.perf_counter() - t0:.2f} s; busy seconds per stage: {timers.summary()}")


def merge_stages(fv: flags.FlagValues) -> None:
    from configurable_fm.ops.merge import multistage

    chain = multistage.load_multistage(fv.mergekit_yaml, output=fv.output, intermediate_dir=fv.intermediate_dir)
    out = multistage.run_multistage(chain, overwrite=fv.overwrite, max_shard_size=fv.max_shard_size,
                                    progress=not fv.no_progress, seed=0 if fv.seed is None else fv.seed, log=print,
                                    compute_dtype=fv.compute_dtype)
    print(f"merged {len(chain.stages)} stage(s) of {fv.mergekit_yaml} into {out} (intermediates in "
          f"{chain.intermediate_dir})")


def merge_config(fv: flags.FlagValues) -> None:
    from configurable_fm.interop.atomic import check_overwritable
    from configurable_fm.stages.merge import merge_from_config

    config = fv.config
    sources = [str(m) for m in config.get("models") or ()] + [str(config.get("base") or "")] + [
        str(src.get("model", "")) for piece in config.get("slices") or () for src in piece.get("sources", ())]
    check_overwritable(fv.output, fv.overwrite, inputs=sources)  # before the merge, not only when writing it
    model = merge_from_config(config, log=print)
    if (fv.format or "hf") == "hf":
        from configurable_fm.interop.hf import to_hf

        out = to_hf(model, fv.output, max_shard_size=fv.max_shard_size, overwrite=fv.overwrite)
    else:
        from configurable_fm.interop.orbax_io import save_model

        out = save_model(model, fv.output, overwrite=fv.overwrite)
    print(f"merged {len(config.models) + bool(config.get('base'))} models with {config.method} into {out} "
          f"({fv.format or 'hf'})")


DEVICE_PREALLOCATION = "XLA_PYTHON_CLIENT_PREALLOCATE"


def no_device_preallocation() -> None:
    """Turns off jax's preallocation of 75% of GPU memory for this process, unless the user set it: the streamed
    merge holds a few tensors on the device at a time (the in-memory one its models, allocated as they load), and
    on an H200 the preallocation made the first host -> device copy take 2.1 s (3.7 ms without; about a third of a
    1.1B merge's time, BENCHMARKS.md). jaxlib reads the variable when it creates the GPU client, i.e. at the first
    device use, which comes after this."""
    os.environ.setdefault(DEVICE_PREALLOCATION, "false")


def run(fv: flags.FlagValues) -> None:
    no_device_preallocation()
    from configurable_fm.interop.safetensors_io import parse_size

    parse_size(fv.max_shard_size)  # a bad size is named before any work (ConfigError)
    if (fv.mergekit_yaml is None) == (fv.config is None):
        raise cli.UsageError("give exactly one of --mergekit_yaml (a mergekit YAML file) and --config (a merge "
                             f"config), got {'both' if fv.config is not None else 'neither'}")
    if fv.mergekit_yaml is not None:
        if fv["format"].present:
            raise cli.UsageError("--format applies to --config only, not to --mergekit_yaml")
        return merge_yaml(fv)
    if fv.seed is not None:
        raise cli.UsageError("--seed applies to --mergekit_yaml only; with --config set --config.seed=N")
    if fv["compute_dtype"].present:
        raise cli.UsageError("--compute_dtype applies to --mergekit_yaml only; with --config set "
                             "--config.compute_dtype=float16|bfloat16")
    if fv.intermediate_dir is not None:
        raise cli.UsageError("--intermediate_dir applies to a multi-stage --mergekit_yaml only, not to --config")
    if fv.timers:
        raise cli.UsageError("--timers applies to --mergekit_yaml only (the streamed merge), not to --config")
    return merge_config(fv)


def main(argv: Sequence[str] | None = None) -> int:
    return cli.run(run, define, argv, prog="cfm-merge", required=("output",))
