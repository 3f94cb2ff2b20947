"""`cfm-adapters` (scripts/adapters.py): merge one adapter, or a combination of several, into its base model and
write the merged model (HF, which transformers loads, or orbax) and, on request, the combined adapter as a PEFT
directory. The config is experiments/adapters/merge.py (its docstring explains every key):

    cfm-adapters --config experiments/adapters/merge.py --config.base=IN --config.adapters=DIR1,DIR2 \\
        --config.weights=0.7,0.4 --config.combination=cat [--config.density=0.5] --config.output=OUT \\
        [--config.format=hf|orbax] [--config.adapter_output=DIR]

Adapter directories are PEFT's (adapter_config.json: `interop.peft.from_peft`) or this library's brick sets
(bricks.json: `bricks.adapters.load_adapter`), detected per directory. The combinations are
`bricks.adapters.combine.combine` (PEFT's add_weighted_adapter: cat, linear, svd, ties, ...) and, for
`exact[:METHOD]`, `combine_exact` with `ops.merge.merge_deltas` as its merge engine; `adapters_from_config` is
the whole pipeline without the writing, for notebooks.
Bad input (a missing or corrupt adapter directory, adapters with other target modules or of another base, a
weights count that is not the number of adapters, an unknown combination or option, an existing output) prints
one line naming it and exits with status 1 (an override naming no key of the config: status 2); the config, the
combination's options, the adapter directories and the outputs are checked before the base model is loaded, and
outputs appear atomically, so nothing is written on error.
"""
from __future__ import annotations

import dataclasses
import math
import shutil
from pathlib import Path
from typing import Any, Callable, Sequence

from configurable_fm import cli

PEFT_CONFIG, BRICKS_INDEX = "adapter_config.json", "bricks.json"
EXACT = "exact"


def define(fv) -> None:
    cli.config_flag(fv, "config", "adapters config file: experiments/adapters/merge.py (set --config.base, "
                                  "--config.adapters and --config.output)")


@dataclasses.dataclass(frozen=True)
class Settings:
    """A checked adapters config: what `adapters_from_config` does and `run` writes."""

    base: str
    adapters: tuple[str, ...]
    weights: tuple[float, ...] | None
    combination: str  # a PEFT combination type, or 'exact'
    method: str | None  # exact: the merge method
    density: float | None
    majority_sign_method: str
    svd_rank: int | None
    svd_clamp: float | None
    seed: int
    output: str
    format: str
    adapter_output: str
    tokenizer: str
    dtype: str | None
    overwrite: bool
    max_shard_size: Any

    @property
    def as_loaded(self) -> bool:
        """One adapter with weight 1 and a PEFT combination: merged as it is (no recombination)."""
        return len(self.adapters) == 1 and self.combination != EXACT and (self.weights is None
                                                                         or self.weights == (1.0,))


def _split(value, key: str) -> list[str]:
    from configurable_fm.errors import ConfigError

    if not isinstance(value, str):
        raise ConfigError(f"adapters config: `{key}` must be a comma-separated string, got {value!r}")
    items = [v.strip() for v in value.split(",")] if value.strip() else []
    if any(not v for v in items):
        raise ConfigError(f"adapters config: `{key}`={value!r} has an empty item")
    return items


def check_config(c) -> Settings:
    """The config's values checked, before anything is loaded: ConfigError / AdapterError / SourceNotFound naming
    the key, the option or the directory."""
    from configurable_fm.bricks.adapters.combine import check_options
    from configurable_fm.errors import ConfigError, SourceNotFound
    from configurable_fm.interop.atomic import check_overwritable
    from configurable_fm.interop.hf import export_dtype
    from configurable_fm.ops.merge import TASK_VECTOR_METHODS

    cli.require_config_keys(c, ("base", "adapters"), see="experiments/adapters/merge.py")
    output, adapter_output = c.get("output") or "", c.get("adapter_output") or ""
    if not output and not adapter_output:
        raise ConfigError("adapters config: set `output` (the merged model) and/or `adapter_output` (the combined "
                          "adapter, PEFT format)")
    dirs = _split(c.adapters, "adapters")
    words = _split(c.weights, "weights")
    weights = None
    if words:
        try:
            weights = tuple(float(w) for w in words)
        except ValueError:
            raise ConfigError(f"adapters config: `weights`={c.weights!r} must be numbers separated by commas") from None
        if not all(math.isfinite(w) for w in weights):
            raise ConfigError(f"adapters config: `weights`={c.weights!r} must be finite numbers")
        if len(weights) != len(dirs):
            raise ConfigError(f"adapters config: {len(weights)} weight(s) ({c.weights}) for {len(dirs)} adapter(s) "
                              f"({c.adapters}); give one weight per adapter")
    elif len(dirs) > 1:
        raise ConfigError(f"adapters config: {len(dirs)} adapters need `weights` (one number per adapter, "
                          "comma-separated, e.g. --config.weights=0.7,0.4)")
    combination = c.combination
    if not isinstance(combination, str):
        raise ConfigError(f"adapters config: `combination` must be a string, got {combination!r}")
    density, svd_rank, svd_clamp = c.get("density"), c.get("svd_rank"), c.get("svd_clamp")
    method = None
    if combination == EXACT or combination.startswith(EXACT + ":"):
        method = combination.partition(":")[2] or "task_arithmetic"
        # sce weighs the models itself (no per-model weight): not a combination of weighted adapters
        known = ("task_arithmetic", "linear", *[m for m in TASK_VECTOR_METHODS if m not in ("task_arithmetic", "sce")])
        if method not in known:
            raise ConfigError(f"adapters config: `combination`={combination!r}: unknown merge method {method!r}; "
                              f"exact:METHOD takes {', '.join(known)}")
        unused = [k for k in ("svd_clamp",) if c.get(k) is not None] + \
            (["majority_sign_method"] if c.majority_sign_method != "total" else [])
        if unused:
            raise ConfigError(f"adapters config: {unused} apply to the PEFT combinations, not to {combination!r}")
        if svd_rank is not None and svd_rank < 1:
            raise ConfigError(f"adapters config: `svd_rank` must be >= 1, got {svd_rank}")
        if density is not None and method in ("task_arithmetic", "linear"):
            raise ConfigError(f"adapters config: `density` does not apply to {combination!r} (it takes no "
                              "sparsification)")
        if density is not None and not math.isfinite(density):
            raise ConfigError(f"adapters config: `density` must be a finite number, got {density!r}")
        combination = EXACT
    else:  # the options must fit the combination, also for one adapter (combined linearly, or merged as it is)
        density, svd_clamp = check_options(combination, density=density, majority_sign_method=c.majority_sign_method,
                                           svd_rank=svd_rank, svd_clamp=svd_clamp, key=True,
                                           what=f"adapters config (combination={combination!r})")
    for d in dirs:
        path = Path(d)
        if not path.is_dir():
            raise SourceNotFound(f"adapter directory {d}: no such directory")
        if not (path / PEFT_CONFIG).is_file() and not (path / BRICKS_INDEX).is_file():
            raise SourceNotFound(f"adapter directory {d}: neither a PEFT adapter ({PEFT_CONFIG} + "
                                 f"adapter_model.safetensors) nor an adapter brick set ({BRICKS_INDEX} + "
                                 "bricks.safetensors, from bricks.adapters.save_adapter)")
    fmt = c.get("format") or "hf"
    if fmt not in cli.MODEL_FORMATS:
        raise ConfigError(f"adapters config: `format` must be one of {list(cli.MODEL_FORMATS)}, got {fmt!r}")
    dtype = export_dtype(c.dtype or None)
    if fmt != "hf" and (dtype or c.tokenizer):
        raise ConfigError("adapters config: `dtype` and `tokenizer` apply to format 'hf' only")
    if output and adapter_output and Path(output).resolve() == Path(adapter_output).resolve():
        raise ConfigError(f"adapters config: `output` and `adapter_output` are the same directory {output}")
    overwrite = bool(c.get("overwrite", False))
    for out in (output, adapter_output):
        if out:
            check_overwritable(out, overwrite, inputs=[c.base, *dirs])
    return Settings(base=c.base, adapters=tuple(dirs), weights=weights, combination=combination, method=method,
                    density=density, majority_sign_method=c.majority_sign_method, svd_rank=svd_rank,
                    svd_clamp=svd_clamp, seed=int(c.seed), output=output, format=fmt, adapter_output=adapter_output,
                    tokenizer=c.tokenizer, dtype=dtype, overwrite=overwrite, max_shard_size=c.max_shard_size)


def load_adapter_dir(base, directory):
    """`base` with the adapter of `directory` attached: a PEFT directory (adapter_config.json, `from_peft`) or an
    adapter brick set (bricks.json, `load_adapter`)."""
    from configurable_fm.bricks.adapters.io import load_adapter
    from configurable_fm.errors import SourceNotFound
    from configurable_fm.interop.peft import from_peft

    path = Path(directory)
    if (path / PEFT_CONFIG).is_file():
        return from_peft(base, path)
    if (path / BRICKS_INDEX).is_file():
        return load_adapter(base, path)
    raise SourceNotFound(f"adapter directory {directory}: neither a PEFT adapter ({PEFT_CONFIG}) nor an adapter "
                         f"brick set ({BRICKS_INDEX})")


@dataclasses.dataclass(frozen=True)
class AdapterResult:
    """What `adapters_from_config` returns: the base with the combined adapter attached (`adapted`; the single
    adapter itself when it is merged as loaded), the merged model, and the exact combination's CombineReport."""

    adapted: Any
    merged: Any
    report: Any


def adapters_from_config(c, *, log: Callable[[str], None] | None = None, settings: Settings | None = None
                         ) -> AdapterResult:
    """Loads the base and the adapters of an adapters config, combines them and merges the result (module
    docstring); writes nothing."""
    import jax

    from configurable_fm.bricks.adapters.combine import combine, combine_exact
    from configurable_fm.bricks.adapters.core import merge
    from configurable_fm.interop.loader import load_model
    from configurable_fm.ops.merge import merge_deltas

    s = settings or check_config(c)
    log = log or (lambda _: None)
    log(f"adapters: loading {s.base}")
    base = load_model(s.base)
    models = [load_adapter_dir(base, d) for d in s.adapters]
    report = None
    if s.as_loaded:
        adapted = models[0]
    elif s.combination == EXACT:
        parameters = {"density": s.density} if s.density is not None else None
        engine = None if s.method in ("task_arithmetic", "linear") else merge_deltas
        adapted, report = combine_exact(models, s.weights, rank=s.svd_rank, method=s.method, parameters=parameters,
                                        merge=engine, seed=s.seed)
    else:
        adapted = combine(models, s.weights, s.combination, density=s.density,
                          majority_sign_method=s.majority_sign_method, svd_rank=s.svd_rank, svd_clamp=s.svd_clamp,
                          key=jax.random.key(s.seed))
    return AdapterResult(adapted=adapted, merged=merge(adapted), report=report)


def _tokenizer(s: Settings):
    """The tokenizer written with an HF output: the base's own ('': none when it has none), none ('none'), or the
    source given."""
    from configurable_fm.interop.tokenizers import find_tokenizer, load_chat_tokenizer

    if s.format != "hf" or not s.output or s.tokenizer == "none":
        return None
    return find_tokenizer(s.base) if s.tokenizer == "" else load_chat_tokenizer(s.tokenizer)


def _write(s: Settings, result: AdapterResult, tokenizer) -> None:
    """The adapter (PEFT) and then the model; if the model cannot be written, the adapter written here is removed."""
    from configurable_fm.interop.peft import to_peft

    fresh = bool(s.adapter_output) and not Path(s.adapter_output).exists()
    if s.adapter_output:
        to_peft(result.adapted, s.adapter_output, base_model_name_or_path=s.base, overwrite=s.overwrite)
    if not s.output:
        return
    try:
        if s.format == "hf":
            from configurable_fm.interop.hf import to_hf

            to_hf(result.merged, s.output, tokenizer=tokenizer, dtype=s.dtype, overwrite=s.overwrite,
                  max_shard_size=s.max_shard_size)
        else:
            from configurable_fm.interop.orbax_io import save_model

            save_model(result.merged, s.output, overwrite=s.overwrite)
    except BaseException:
        if fresh:
            shutil.rmtree(s.adapter_output, ignore_errors=True)
        raise


def run(fv) -> None:
    c = fv.config
    s = check_config(c)
    tokenizer = _tokenizer(s)
    result = adapters_from_config(c, log=print, settings=s)
    _write(s, result, tokenizer)
    what = ("as it is" if s.as_loaded else f"exact:{s.method}" if s.combination == EXACT else s.combination)
    if result.report is not None:
        r = result.report
        worst = max(r.relative_error, key=r.relative_error.get)
        print(f"exact:{s.method}: {len(r.rank)} module(s) re-factorised at rank {min(r.rank.values())}"
              + (f"-{max(r.rank.values())}" if len(set(r.rank.values())) > 1 else "")
              + f", relative truncation error max {r.max_error:.3g} ({worst}), mean "
              f"{sum(r.relative_error.values()) / len(r.relative_error):.3g}")
    outputs = ([f"{s.output} ({s.format})"] if s.output else []) + (
        [f"{s.adapter_output} (PEFT adapter)"] if s.adapter_output else [])
    print(f"merged {len(s.adapters)} adapter(s) ({what}) into {s.base} -> {', '.join(outputs)}")


def main(argv: Sequence[str] | None = None) -> int:
    return cli.run(run, define, argv, prog="cfm-adapters", required=("config",))
