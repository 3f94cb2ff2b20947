"""Multi-process / multi-host start-up.

`initialize()` calls `jax.distributed.initialize` before any other JAX computation. On SLURM, Open MPI, TPU
pods and most GPU cluster launchers every argument is auto-detected; elsewhere set
CFM_COORDINATOR=host:port, CFM_NUM_PROCESSES=N and CFM_PROCESS_ID=i (and optionally CFM_LOCAL_DEVICE_IDS=0,1)
in each process's environment. After it, `jax.devices()` lists every process's devices, the trainer builds one
global mesh over them, and each process reads its own rows of every global batch.
"""
from __future__ import annotations

import os

import jax


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
