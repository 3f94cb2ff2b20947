"""The multi-host path, exercised: `scripts/train.py --distributed` as 2 processes on localhost (one CPU device
each, gloo collectives, a global mesh over both) gives the losses of a 1-process run on 1 device to 1e-5; only
process 0 writes metrics and config; checkpoints and `best/` are saved by both processes, `best/` loads in one
process, and rerunning the finished command restores its last checkpoint in both. 15 steps (checkpoints at 5, 10 and
15, the first deleted under keep=2; evaluations at 10 and 15): a step of the 2-process run waits on gloo
collectives (~0.3 s against ~0.015 s on one process), so each step more costs the test. The 1-process run is
conftest.py's tiny_run (test_train_cli checks it as the docstring's command).
"""
from __future__ import annotations

import json
import socket
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

from tests.train.test_train_cli import ROOT, checked, child_env, losses_by_step, tiny_overrides, train_command

STEPS = 15


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def run_two_processes(command: list[str], env: dict, logs: Path,
                      timeout: float = 300) -> list[subprocess.CompletedProcess]:
    """Runs `command --distributed` as processes 0 and 1 of a localhost cluster (output to `logs`/process_I.log,
    so that neither can block on a full pipe); returns both, in order, with the log as stdout. When one fails
    or the time is up, the other is killed (exit code -9)."""
    port = free_port()
    logs.mkdir(parents=True, exist_ok=True)
    procs = []
    try:
        for i in range(2):
            with open(logs / f"process_{i}.log", "w") as out:
                procs.append(subprocess.Popen(
                    command + ["--distributed"], cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
                    env={**env, "CFM_COORDINATOR": f"localhost:{port}", "CFM_NUM_PROCESSES": "2",
                         "CFM_PROCESS_ID": str(i)}))
        deadline = time.monotonic() + timeout
        while any(p.poll() is None for p in procs) and time.monotonic() < deadline:
            if any(p.poll() not in (None, 0) for p in procs):
                break  # one failed: the other would wait for it in a collective
            time.sleep(0.1)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait(30)
    return [subprocess.CompletedProcess(p.args, p.returncode, (logs / f"process_{i}.log").read_text(), "")
            for i, p in enumerate(procs)]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_chars, tiny_run):
    """(one-process workdir, two-process workdir, env, dataset) after both runs finished."""
    base = tmp_path_factory.mktemp("multiprocess")
    data, env = tiny_chars, child_env()
    one, two = tiny_run[0], base / "two"
    for proc in run_two_processes(train_command(two, tiny_overrides(data, steps=STEPS, **{"mesh.shape": "(1,-1,1)"})),
                                  env, base / "logs"):
        checked(proc)
    return one, two, env, data


def test_two_processes_match_one(runs):  # runs in CI: the multi-host path is exercised, not only described
    one, two, _, _ = runs
    a, b = losses_by_step(one), losses_by_step(two)  # each step logged once: only process 0 writes
    assert sorted(a) == sorted(b) == list(range(1, STEPS + 1))
    for step in a:
        assert set(a[step]) == set(b[step]), step
        for key in a[step]:
            assert abs(a[step][key] - b[step][key]) <= 1e-5, (step, key, a[step][key], b[step][key])
    assert a[STEPS]["loss"] < a[1]["loss"] - 0.5  # it learns
    info = json.loads((two / "run_info.json").read_text())
    assert info["process_count"] == 2 and len(info["devices"]) == 2
    assert json.loads((two / "config.json").read_text())["mesh"]["shape"] == [1, -1, 1]
    assert len(list((two / "tensorboard").iterdir())) == 1  # one event file: process 0's
    assert sorted(p.name for p in two.iterdir()) == sorted(p.name for p in one.iterdir())  # no stray temporaries


@pytest.mark.slow
def test_two_process_checkpoints_restore(runs):
    """`best/` written by both processes loads in one process and equals the 1-process run's; rerunning the
    finished 2-process command restores its last checkpoint collectively and adds no step."""
    from configurable_fm.bricks import flat_params
    from configurable_fm.interop.loader import load_model

    one, two, env, data = runs
    best_one, best_two = flat_params(load_model(one / "best")), flat_params(load_model(two / "best"))
    assert sorted(best_one) == sorted(best_two)
    for k in best_one:
        np.testing.assert_allclose(np.asarray(best_two[k]), np.asarray(best_one[k]), atol=1e-5, err_msg=k)
    before = (two / "metrics.jsonl").read_text()
    procs = run_two_processes(train_command(two, tiny_overrides(data, steps=STEPS, **{"mesh.shape": "(1,-1,1)"})),
                              env, two.parent / "logs_rerun")
    for proc in procs:
        checked(proc)
        assert f"(step {STEPS})" in proc.stdout and f"done: step {STEPS}" in proc.stdout, proc.stdout
    assert (two / "metrics.jsonl").read_text() == before
