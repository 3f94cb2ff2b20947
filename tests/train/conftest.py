"""The uninterrupted tiny `scripts/train.py` run that three modules check or compare with, run once per test process:
test_train_cli checks it as the docstring's command, test_resume_kill takes its losses as the reference of the
killed and resumed runs, test_multiprocess as the one-process run (one run instead of three, each ~10 s)."""
import shlex
import sys

import pytest

from tests.train.test_train_cli import (
    PRETRAIN, build_tiny_dataset, checked, child_env, docstring_commands, run_train, tiny_overrides)

TINY_STEPS = 15  # checkpoints at 5, 10 and 15 (the first deleted: keep=2), evaluations at 10 and 15


@pytest.fixture(scope="session")
def tiny_chars(tmp_path_factory):
    """The character-level dataset of test_train_cli.build_tiny_dataset (its `data` directory)."""
    return build_tiny_dataset(tmp_path_factory.mktemp("tiny_chars"))


@pytest.fixture(scope="session")
def tiny_run(tiny_chars, tmp_path_factory):
    """(workdir, CompletedProcess) of the tiny command of experiments/pretrain.py's docstring with
    tiny_overrides(tiny_chars, steps=TINY_STEPS): the same config as test_train_cli.train_command's with those
    overrides. Read it, never write into it."""
    (command,) = [c for c in docstring_commands(PRETRAIN) if ":tiny " in c + " "]
    args = shlex.split(command)
    assert args[:2] == ["python", "scripts/train.py"] and "--workdir" in args, command
    workdir = tmp_path_factory.mktemp("tiny_run") / "run"
    args[0] = sys.executable
    args[args.index("--workdir") + 1] = str(workdir)
    return workdir, checked(run_train(args + tiny_overrides(tiny_chars, steps=TINY_STEPS), child_env()))
