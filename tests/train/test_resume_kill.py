"""Kill -9 and resume through the real command line: a run SIGKILLed in the middle of writing a checkpoint (and,
with --runslow, first after a checkpoint), restarted each time with the same command, logs exactly the losses of an
uninterrupted run (bitwise on CPU), each step once, and never restores the partly written checkpoint.

Each run is `python scripts/train.py --config experiments/pretrain.py:tiny --workdir W --config.<tiny overrides>`
(15 steps, checkpoints every 3, async orbax saves) on a character-level dataset; the uninterrupted run is
conftest.py's tiny_run (the same config with checkpoints every 5: when a run checkpoints does not change its losses).
"""
from __future__ import annotations

import json
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.train.test_train_cli import (
    ROOT, checked, child_env, losses_by_step, run_train, tiny_overrides, train_command)

TMP_SUFFIX = ".orbax-checkpoint-tmp"  # orbax writes a step into STEP.orbax-checkpoint-tmp, then renames it STEP
STEPS = 15
EVERY = 3  # checkpoints at 3, 6, 9, 12, 15: four saves after the first to be caught in


@pytest.fixture(scope="module")
def setup(tiny_chars, tiny_run):
    """(command maker, env, reference losses, reference config) with the reference = one uninterrupted run
    (conftest.py)."""
    command = lambda workdir: train_command(workdir, tiny_overrides(tiny_chars, steps=STEPS, checkpoint_every=EVERY))
    reference = losses_by_step(tiny_run[0])
    assert sorted(reference) == list(range(1, STEPS + 1))
    assert all("val_loss" in reference[s] for s in (10, 15))
    return command, child_env(), reference, json.loads((tiny_run[0] / "config.json").read_text())


def finalized_steps(workdir: Path) -> list[int]:
    d = workdir / "checkpoints"
    return sorted(int(p.name) for p in d.iterdir() if p.name.isdigit()) if d.is_dir() else []


def partial_steps(workdir: Path) -> list[tuple[str, int, int]]:
    """(name, inode, ctime ns) of the STEP.orbax-checkpoint-tmp entries: checkpoints being (or left half) written."""
    out = []
    d = workdir / "checkpoints"
    for p in (d.iterdir() if d.is_dir() else ()):
        if TMP_SUFFIX in p.name:
            try:
                st = p.stat()
            except FileNotFoundError:  # renamed (finalised) or removed meanwhile
                continue
            out.append((p.name, st.st_ino, st.st_ctime_ns))
    return sorted(out)


def logged_steps(workdir: Path) -> list[int]:
    path = workdir / "metrics.jsonl"
    if not path.exists():
        return []
    return [int(m.group(1)) for m in re.finditer(r'\{"step": (\d+),', path.read_text())]


def kill_when(command, env, until, log: Path, timeout: float = 240) -> None:
    """Starts `command` (stdout and stderr to `log`), polls `until(proc)` every few ms, and SIGKILLs the run as
    soon as it returns True."""
    with open(log, "w") as out:
        proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + timeout
    try:
        while True:
            if proc.poll() is not None:
                pytest.fail(f"the run ended (exit {proc.returncode}) before the kill point:\n{log.read_text()[-4000:]}")
            if time.monotonic() > deadline:
                pytest.fail("the kill point was not reached in time")
            if until(proc):
                proc.send_signal(signal.SIGKILL)
                proc.wait(30)
                return
            time.sleep(0.003)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)


def freeze(proc) -> None:
    """SIGSTOPs `proc` and waits until every one of its threads is stopped (signal delivery is asynchronous)."""
    proc.send_signal(signal.SIGSTOP)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        states = []
        for stat in Path(f"/proc/{proc.pid}/task").glob("*/stat"):
            try:
                states.append(stat.read_text().rsplit(")", 1)[1].split()[0])
            except (OSError, IndexError):  # a thread that just ended
                pass
        if states and all(s in "tTZX" for s in states):
            return
        time.sleep(0.001)
    pytest.fail(f"process {proc.pid} did not stop")


def resumed_from(stdout: str) -> int:
    m = re.search(r"resumed from \S+ \(step (\d+)\)", stdout)
    assert m, f"the rerun did not resume:\n{stdout[-2000:]}"
    return int(m.group(1))


# kills=2 is slow (CI time ~10 s, a third run): kills=1 is the same kill during a save after a final checkpoint, with
# steps logged beyond it, and the same resume; 2 adds a kill between two saves and the restart of a restarted run
@pytest.mark.parametrize("kills", [1, pytest.param(2, marks=pytest.mark.slow)])
def test_kill_after_a_checkpoint_then_during_a_save_resumes_bitwise(setup, tmp_path, kills):
    """kills=2: run 1 is killed a few steps after its first checkpoint is final; its restart (run 2) is killed while
    it writes a later checkpoint; run 3 finishes. kills=1: the first run is killed while it writes a checkpoint
    after its first final one; its restart finishes. Each restart resumes from the last final checkpoint (never the
    partial one), and the log of the runs equals the uninterrupted run's, bitwise, each step once."""
    command, env, reference, reference_config = setup
    workdir = tmp_path / "run"

    if kills == 2:
        # Run 1: kill once checkpoint 3 is final and the run has logged at least two steps beyond it.
        kill_when(command(workdir), env,
                  lambda p: finalized_steps(workdir) and max(logged_steps(workdir), default=0) >= EVERY + 2,
                  tmp_path / "run1.log")
        done = finalized_steps(workdir)
        assert done and done[-1] < STEPS, done
        assert max(logged_steps(workdir)) > done[-1]  # steps after the checkpoint were done, and will be redone

    # Run 2 (kills=1: the first run): killed while a step after a final checkpoint is being written, i.e. frozen
    # (SIGSTOP) at a moment when STEP.orbax-checkpoint-tmp exists and STEP does not; a save that completed before the
    # freeze is let go on.
    caught = {}
    stale = set(partial_steps(workdir))  # left by run 1's kill, if any; not what run 2 writes

    def mid_save(proc):
        final = finalized_steps(workdir) or [STEPS]  # none final yet: no partial counts
        partial = [p for p in partial_steps(workdir) if p not in stale and int(p[0].split(".")[0]) > final[-1]]
        if not partial:
            return False
        freeze(proc)
        step = int(partial[0][0].split(".")[0])
        if partial[0] in partial_steps(workdir) and step not in finalized_steps(workdir):
            caught.update(step=step, finalized=finalized_steps(workdir))
            return True  # killed while stopped: nothing more is written
        proc.send_signal(signal.SIGCONT)
        return False

    kill_when(command(workdir), env, mid_save, tmp_path / "run2.log")
    assert partial_steps(workdir), "the kill left no partial checkpoint"
    finalized = caught["finalized"]
    assert caught["step"] not in finalized_steps(workdir) and finalized and finalized[-1] < caught["step"]
    assert max(logged_steps(workdir)) > finalized[-1]  # steps after the checkpoint were done, and will be redone

    # Run 3 (kills=1: the second run): skips the partial checkpoint, resumes from the last final one and completes.
    proc = checked(run_train(command(workdir), env))
    assert resumed_from(proc.stdout) == finalized[-1]
    got = losses_by_step(workdir)  # also asserts that no step is logged twice
    assert sorted(got) == list(range(1, STEPS + 1))
    for step in range(1, STEPS + 1):
        assert got[step] == reference[step], (step, got[step], reference[step])  # bitwise: == on the floats
    assert finalized_steps(workdir) == [STEPS - EVERY, STEPS]  # keep=2
    assert partial_steps(workdir) == []  # the partial one replaced
    config = json.loads((workdir / "config.json").read_text())
    assert config["checkpoint_every"] == EVERY and {**config, "checkpoint_every": 5} == reference_config
