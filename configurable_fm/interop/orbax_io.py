"""Orbax model checkpoints: `model_config.json` (family + config fields [+ extensions]) + `params/` [+ `variables/`].

    save_model(model, "ckpt")            # checks the tree against model.cfg; written under a temporary name
    model = load_model("ckpt")           # rebuilds the abstract model from the JSON, restores the arrays
The parameters (nnx.Param) are saved as the flat {dotted path: array} dict in `params/`, so checkpoints stay readable
without the code that made them (the merge sources read them tensor by tensor). Variables of other types (a
growth mask, an adapter's scale, an RNG key stored as its raw key data) go to `variables/`, which exists only when
the model has some. Extension modules (see `models.structure`) are listed under "extensions" in the JSON and rebuilt
by their registered builders on load; checkpoints without the key (or without `variables/`) load as before.
"""
from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from configurable_fm.interop.atomic import atomic_directory
from configurable_fm.interop.safetensors_io import CheckpointError, read_json_object

MODEL_CONFIG = "model_config.json"
PARAMS_DIR = "params"
VARIABLES_DIR = "variables"
EXTENSIONS_KEY = "extensions"


def is_model_checkpoint(path: str | Path) -> bool:
    path = Path(path)
    return (path / MODEL_CONFIG).is_file() and (path / PARAMS_DIR).is_dir()


def save_params(params: dict[str, jax.Array], directory: Path) -> None:
    """Saves a flat {path: array} dict as an orbax PyTree at `directory` (which must not exist)."""
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(directory.absolute(), dict(params))
        ckptr.wait_until_finished()


def restore_params(directory: Path, target: dict[str, jax.ShapeDtypeStruct]) -> dict[str, jax.Array]:
    with ocp.StandardCheckpointer() as ckptr:
        return ckptr.restore(directory.absolute(), target)


def model_spec(model: nnx.Module, action: str = "save_model") -> dict:
    """The content of model_config.json: {'family', config fields..., 'extensions': [...] when there are any}.

    Checks first that the module tree agrees with model.cfg (raises models.InconsistentModel otherwise)."""
    from configurable_fm.models.factory import config_to_dict
    from configurable_fm.models.structure import check_consistent, extension_specs

    check_consistent(model, action)
    spec = config_to_dict(model.cfg)
    extensions = extension_specs(model)
    if extensions:
        spec[EXTENSIONS_KEY] = extensions
    return spec


def model_arrays(model: nnx.Module) -> tuple[dict[str, jax.Array], dict[str, jax.Array]]:
    """(params, other variables): flat {path: array} of the nnx.Param variables and of every other (non-transient)
    variable type; PRNG keys are given as their raw key data."""
    from configurable_fm.models.structure import variables_of

    params, others = {}, {}
    for key, var in variables_of(model).items():
        value = var.get_value()
        if jnp.issubdtype(getattr(value, "dtype", np.float32), jax.dtypes.prng_key):
            value = jax.random.key_data(value)
        (params if isinstance(var, nnx.Param) else others)[key] = value
    return params, others


def save_model(model: nnx.Module, path: str | Path, *, overwrite: bool = False) -> Path:
    """Writes an orbax model checkpoint at `path` (atomically). Raises models.InconsistentModel, writing nothing,
    when the module tree disagrees with model.cfg."""
    spec = model_spec(model, "save_model")
    params, others = model_arrays(model)
    with atomic_directory(path, overwrite=overwrite) as tmp:
        (tmp / MODEL_CONFIG).write_text(json.dumps(spec, indent=2) + "\n")
        save_params(params, tmp / PARAMS_DIR)
        if others:
            save_params(others, tmp / VARIABLES_DIR)
    return Path(path)


def read_model_spec(path: str | Path):
    """(config, extension specs) from a checkpoint's model_config.json; CheckpointError when it is unreadable."""
    from configurable_fm.models.factory import config_from_dict

    file = Path(path) / MODEL_CONFIG
    spec = read_json_object(file)
    extensions = spec.pop(EXTENSIONS_KEY, [])
    if not isinstance(extensions, list) or not all(isinstance(e, dict) for e in extensions):
        raise CheckpointError(f"{file}: {EXTENSIONS_KEY!r} must be a list of {{path, kind, options}} objects")
    return config_from_dict(spec), extensions


def _key_data_target(abstract_value):
    """For a PRNG-key ShapeDtypeStruct: (the ShapeDtypeStruct of its key data, the key impl name); else None.
    Checkpoints store keys as their raw uint32 data (`jax.random.key_data`)."""
    dtype = getattr(abstract_value, "dtype", None)
    if dtype is None or not jnp.issubdtype(dtype, jax.dtypes.prng_key):
        return None
    impl = []
    jax.eval_shape(lambda k: impl.append(str(jax.random.key_impl(k))), abstract_value)
    return jax.eval_shape(jax.random.key_data, abstract_value), impl[0]


def load_model(path: str | Path, *, dtype=jnp.float32) -> nnx.Module:
    """The model saved at `path`, its parameters in `dtype` (other variables keep the dtype their module gives)."""
    from configurable_fm.models.factory import family_name
    from configurable_fm.models.structure import InconsistentModel, abstract_model, fill

    path = Path(path)
    if not is_model_checkpoint(path):
        raise CheckpointError(f"{path}: not an orbax model checkpoint (needs {MODEL_CONFIG} and {PARAMS_DIR}/)")
    cfg, extensions = read_model_spec(path)
    try:
        abstract = abstract_model(cfg, extensions, param_dtype=dtype)
    except InconsistentModel as e:
        raise CheckpointError(f"{path}: cannot rebuild the model's extensions ({e})") from None
    # An explicit target device: a checkpoint saved sharded over other devices or processes (a multi-host run's
    # best/) restores here too, whatever topology wrote it.
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    _, state = nnx.split(abstract)
    targets: dict[str, dict[str, jax.ShapeDtypeStruct]] = {PARAMS_DIR: {}, VARIABLES_DIR: {}}
    keys = {}  # path -> PRNG key impl, for variables stored as raw key data
    for p, var in nnx.to_flat_state(state):
        key = ".".join(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in p)
        value = var.get_value()
        as_data = _key_data_target(value)
        if as_data is not None:
            value, keys[key] = as_data
        target = jax.ShapeDtypeStruct(value.shape, value.dtype, sharding=device)
        targets[PARAMS_DIR if isinstance(var, nnx.Param) else VARIABLES_DIR][key] = target
    values = {}
    for directory, target in targets.items():
        if not target:
            continue
        if not (path / directory).is_dir():
            raise CheckpointError(f"{path}: the {family_name(cfg)} model needs variables {sorted(target)[:8]} but "
                                  f"the checkpoint has no {directory}/")
        try:
            restored = restore_params(path / directory, target)
        except Exception as e:  # orbax raises assorted errors for missing/mis-shaped entries
            what = "parameters" if directory == PARAMS_DIR else "variables"
            raise CheckpointError(f"{path / directory}: cannot restore the {what} of {family_name(cfg)} "
                                  f"model ({type(e).__name__}: {e})") from None
        bad = [k for k, v in restored.items() if tuple(np.shape(v)) != target[k].shape]
        if bad:
            raise CheckpointError(f"{path}: mis-shaped {directory} {bad}")
        values.update(restored)
    for key, impl in keys.items():
        values[key] = jax.random.wrap_key_data(values[key], impl=impl)
    return fill(abstract, values)
