"""The wall time of one tiny `scripts/train.py` run as the suite's training subprocesses run it (the settings
and environment of tests/train/test_train_cli: 2 layers of width 32, a character-level dataset, the suite's XLA
flags, one host device), at 30 and 10 steps. From the repository root:
    XLA_FLAGS="--xla_llvm_disable_expensive_passes=true --xla_backend_optimization_level=0" \\
      .venv/bin/python benchmarks/suite_time_2026-12-06/train_start.py
2-core machine, 2026-12-06: 8.4 s (30 steps) and 7.6 s (10 steps) with tensorboardX importing torch, 7.0 s and
5.8 s after `train.metrics.import_tensorboardx` (0d44950)."""
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from tests.train.test_train_cli import (build_tiny_dataset, child_env, run_train, tiny_overrides,  # noqa: E402
                                        train_command)

base = Path(tempfile.mkdtemp(prefix="cfm_train_start_"))
data = build_tiny_dataset(base / "data")
for steps in (30, 10):
    start = time.time()
    proc = run_train(train_command(base / f"run{steps}", tiny_overrides(data, steps=steps)), child_env())
    if proc.returncode:
        sys.exit(f"train.py exited {proc.returncode}:\n{proc.stderr[-2000:]}")
    print(f"{steps} steps: {time.time() - start:.1f} s")
