"""Grow configs (ml-collections), one per operation: width.py, depth.py, upcycle.py, to_shape.py.

    python scripts/grow.py --config experiments/grow/width.py --config.input=IN --config.output=OUT \\
        --config.width.hidden_size=960 [--config.format=hf|orbax]

Every config has the common keys (configurable_fm/stages/grow.py documents all of them):
    input     : the source model, any source interop.loader.load_model takes
    output    : the directory to write (an HF directory, or an orbax model checkpoint with format='orbax')
    format    : 'hf' (default; with the source's tokenizer files when it has one) or 'orbax'
    dtype     : '' keeps the loaded dtype (float32); 'float32' | 'bfloat16' | 'float16'
    overwrite : replace a previous output of this library
    seed      : PRNG seed of the random parts
and one or more growth sections (width, depth, upcycle), applied in that order. As a study stage (kind 'grow'),
`common()` without output/format/overwrite plus name/kind: see `stage_config`.
"""
import ml_collections

from configurable_fm.stages.grow import grow_config


def common(arg: str, allowed=("",), where: str = "") -> ml_collections.ConfigDict:
    """The common keys; `arg` must be one of `allowed` (the file's variants)."""
    if arg not in allowed:
        raise ValueError(f"experiments/grow/{where}.py: unknown variant {arg!r}; known: {[a for a in allowed if a]} "
                         "(or none); set keys with --config.KEY=VALUE")
    return grow_config(input="", output="", format="hf", overwrite=False, dtype="", seed=0)


def stage_config(config: ml_collections.ConfigDict, name: str, **overrides) -> ml_collections.ConfigDict:
    """A study stage of kind 'grow' from a grow config: without output/format/overwrite, with name and kind."""
    from configurable_fm.stages import stage

    plain = {k: v for k, v in config.to_dict().items() if k not in ("output", "format", "overwrite")}
    return stage(name, "grow", plain, **overrides)
