"""Multi-process / multi-host start-up.

`initialize()` calls `jax.distributed.initialize` before any other JAX computation. On SLURM, Open MPI, TPU
pods and most GPU cluster launchers every argument is auto-detected; elsewhere set
CFM_COORDINATOR=host:port, CFM_NUM_PROCESSES=N and CFM_PROCESS_ID=i (and optionally CFM_LOCAL_DEVICE_IDS=0,1)
in each process's environment. After it, `jax.devices()` lists every process's devices, the trainer builds one
global mesh over them, and each process reads its own rows of every global batch. Checkpoints must be on a
filesystem that every process sees (orbax saves are collective); `save_model_collective` writes the trainer's
`best/` model from all processes.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import jax

from configurable_fm.errors import OutputExists


def initialize() -> None:
    kwargs = {}
    if os.environ.get("CFM_COORDINATOR"):
        kwargs = dict(coordinator_address=os.environ["CFM_COORDINATOR"],
                      num_processes=int(os.environ["CFM_NUM_PROCESSES"]),
                      process_id=int(os.environ["CFM_PROCESS_ID"]))
        if os.environ.get("CFM_LOCAL_DEVICE_IDS"):
            kwargs["local_device_ids"] = [int(i) for i in os.environ["CFM_LOCAL_DEVICE_IDS"].split(",")]
    if os.environ.get("JAX_PLATFORMS", "").startswith("cpu"):
        jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU collectives across processes
    jax.distributed.initialize(**kwargs)


def barrier(name: str) -> None:
    """All processes wait here until every one has arrived (a no-op in a single process)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def save_model_collective(model, path: str | os.PathLike, *, overwrite: bool = True) -> Path:
    """`interop.orbax_io.save_model` for a model whose arrays may be sharded over the devices of several
    processes; EVERY process must call it (orbax saves are collective: each process writes its own shards).

    Process 0 prepares a fixed temporary sibling `.NAME.tmp-collective` (removing one left by a killed run), all
    processes write `params/` into it, then process 0 adds `model_config.json` and swaps it into place (the old
    `path` is renamed away first and removed last); a barrier ends the call, so `path` is complete on return in
    every process. In a single process this is exactly `orbax_io.save_model` (a unique temporary name).
    """
    from configurable_fm.interop import orbax_io

    if jax.process_count() == 1:
        return orbax_io.save_model(model, path, overwrite=overwrite)
    spec = orbax_io.model_spec(model, "save_model_collective")  # refuses an inconsistent model before any write
    params, others = orbax_io.model_arrays(model)
    path = Path(path).absolute()
    if path.exists() and not overwrite:
        raise OutputExists(f"{path} already exists (pass overwrite=True to replace it)")
    tmp, old = path.with_name(f".{path.name}.tmp-collective"), path.with_name(f".{path.name}.old-collective")
    if jax.process_index() == 0:
        for stale in (tmp, old):
            if stale.exists():
                shutil.rmtree(stale)
        tmp.mkdir(parents=True)
    barrier(f"save_model_collective:{path}:start")
    orbax_io.save_params(params, tmp / orbax_io.PARAMS_DIR)  # collective, synchronised by orbax
    if others:
        orbax_io.save_params(others, tmp / orbax_io.VARIABLES_DIR)
    if jax.process_index() == 0:
        (tmp / orbax_io.MODEL_CONFIG).write_text(json.dumps(spec, indent=2) + "\n")
        if path.exists():
            os.rename(path, old)
        os.rename(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    barrier(f"save_model_collective:{path}:done")
    return path
