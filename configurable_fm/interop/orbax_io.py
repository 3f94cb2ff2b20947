"""Orbax model checkpoints: `model_config.json` (family + config fields) + `params/` (an orbax PyTree).

    save_model(model, "ckpt")            # written under a temporary name, renamed when complete
    model = load_model("ckpt")           # rebuilds the abstract model from the JSON, restores the arrays
The parameters are saved as the flat {dotted path: array} dict, so checkpoints stay readable without the code
that made them.
"""
from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from configurable_fm.bricks.paths import flat_params, flat_state, with_params
from configurable_fm.interop.atomic import atomic_directory
from configurable_fm.interop.safetensors_io import CheckpointError

MODEL_CONFIG = "model_config.json"
PARAMS_DIR = "params"


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


def save_model(model: nnx.Module, path: str | Path, *, overwrite: bool = False) -> Path:
    from configurable_fm.models.factory import config_to_dict

    with atomic_directory(path, overwrite=overwrite) as tmp:
        (tmp / MODEL_CONFIG).write_text(json.dumps(config_to_dict(model.cfg), indent=2) + "\n")
        save_params(flat_params(model), tmp / PARAMS_DIR)
    return Path(path)


def load_model(path: str | Path, *, dtype=jnp.float32) -> nnx.Module:
    from configurable_fm.models.factory import build_model, config_from_dict

    path = Path(path)
    if not is_model_checkpoint(path):
        raise CheckpointError(f"{path}: not an orbax model checkpoint (needs {MODEL_CONFIG} and {PARAMS_DIR}/)")
    try:
        spec = json.loads((path / MODEL_CONFIG).read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path / MODEL_CONFIG}: invalid JSON ({e})") from None
    abstract = nnx.eval_shape(lambda: build_model(config_from_dict(spec), param_dtype=dtype))
    # An explicit target device: a checkpoint saved sharded over other devices or processes (a multi-host run's
    # best/) restores here too, whatever topology wrote it.
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    target = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=device) for k, v in flat_state(abstract).items()}
    try:
        values = restore_params(path / PARAMS_DIR, target)
    except Exception as e:  # orbax raises assorted errors for missing/mis-shaped entries
        raise CheckpointError(f"{path / PARAMS_DIR}: cannot restore the parameters of {spec.get('family')} "
                              f"model ({type(e).__name__}: {e})") from None
    bad = [k for k, v in values.items() if tuple(np.shape(v)) != target[k].shape]
    if bad:
        raise CheckpointError(f"{path}: mis-shaped parameters {bad}")
    return with_params(abstract, values, check_shapes=False)
