"""scripts/train.py through its real command line: the config file's docstring command runs, a mistyped key fails
naming the key and the valid keys, a bad variant fails naming the known ones.

The helpers here (a tiny character-level token dataset, the child environment, running the CLI) are shared with
test_resume_kill.py and test_multiprocess.py; the docstring's command is run once for the three (conftest.py).
"""
from __future__ import annotations

import json
import os
import re
import string
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
TRAIN = ROOT / "scripts" / "train.py"
PRETRAIN = ROOT / "experiments" / "pretrain.py"
CHARS = ["<eos>", "<unk>"] + list(string.printable[:95])  # ids 0, 1, then digits, letters, punctuation, space
VOCAB = len(CHARS)  # 97
WORDS = ("the a model learns tokens from text and data in steps with loss over time each batch of small "
         "checkpoints resume after kill").split()


def build_tiny_dataset(root: Path) -> Path:
    """A character-level tokenizer (tokenizer.json, 97 ids) and ~5k tokens of seeded word salad, built with
    `shards.build_dataset` from a `files` source; returns the dataset directory (train ~4.4k, validation ~0.9k)."""
    from tokenizers import Tokenizer, models

    from configurable_fm.data.shards import build_dataset

    root.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(CHARS)}, merges=[], unk_token="<unk>"))
    tok.save(str(root / "tokenizer.json"))
    rng = np.random.default_rng(0)
    (root / "text").mkdir(exist_ok=True)
    for d in range(6):
        (root / "text" / f"doc{d}.txt").write_text(" ".join(rng.choice(WORDS, 170)) + ".\n")
    build_dataset({"name": "tiny_chars", "sources": ("files",), "tokenizer": str(root / "tokenizer.json"),
                   "eos_id": 0, "files": {"root": str(root / "text")}, "validation_fraction": 0.2},
                  root / "data")
    return root / "data"


def tiny_overrides(data_dir: Path, **extra) -> list[str]:
    """--config.* flags making experiments/pretrain.py:tiny a seconds-long CPU run on `data_dir`."""
    values = {"data.dir": str(data_dir), "model.vocab_size": VOCAB, "model.hidden_size": 32,
              "model.intermediate_size": 64, "model.num_layers": 2, "model.num_heads": 4, "model.num_kv_heads": 2,
              "seq_len": 16, "batch_size": 8, "steps": 30, "checkpoint_every": 5, "log_every": 1,
              "eval_every": 10, "data.max_eval_batches": 2, "progress": False, "mesh.shape": "(1,1,1)",
              "optimizer.warmup_steps": 3, **extra}
    return [f"--config.{k}={v}" for k, v in values.items()]


DEVICE_COUNT_FLAG = "--xla_force_host_platform_device_count"


def child_env(**extra: str) -> dict:
    """The environment of a training subprocess: CPU, one host device, the suite's own XLA_FLAGS otherwise (the
    compilation flags scripts/test.sh sets: LLVM at -O0 without its expensive passes), no persistent compilation
    cache (CFM_COMPILATION_CACHE=off: nothing written under ~/.cache; with -O0 jax crashed writing executables to
    one, scripts/test.sh). What that costs the modules that run scripts/train.py:
    benchmarks/suite_time_2026-12-06/README.md."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_", "XLA_", "CFM_"))}
    flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if not f.startswith(DEVICE_COUNT_FLAG)]
    env.update(JAX_PLATFORMS="cpu", XLA_FLAGS=" ".join([f"{DEVICE_COUNT_FLAG}=1", *flags]),
               CFM_COMPILATION_CACHE="off", PYTHONUNBUFFERED="1", PYTHONPATH=str(ROOT))
    env.update(extra)
    return env


def train_command(workdir: Path, overrides: list[str], *, variant: str = "tiny") -> list[str]:
    return [sys.executable, str(TRAIN), "--config", f"{PRETRAIN}:{variant}", "--workdir", str(workdir), *overrides]


def run_train(args: list[str], env: dict, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def metric_records(workdir: Path) -> list[dict]:
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def losses_by_step(workdir: Path) -> dict[int, dict]:
    """{step: {'loss', 'val_loss'?}} from metrics.jsonl; a duplicated step is an error."""
    out = {}
    for r in metric_records(workdir):
        assert r["step"] not in out, f"step {r['step']} is logged twice in {workdir / 'metrics.jsonl'}"
        out[r["step"]] = {k: r[k] for k in ("loss", "val_loss", "grad_norm") if k in r}
    return out


def checked(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, (f"exit {proc.returncode}\n--- stdout\n{proc.stdout[-3000:]}\n"
                                  f"--- stderr\n{proc.stderr[-6000:]}")
    return proc


# --------------------------------------------------------------------------------------------------- the tests
def docstring_commands(path: Path) -> list[str]:
    """The `python scripts/train.py ...` lines of a config file's module docstring (comments removed)."""
    import ast

    doc = ast.get_docstring(ast.parse(path.read_text()))
    return [line.split("#")[0].strip() for line in doc.splitlines()
            if line.strip().startswith("python scripts/train.py")]


def test_docstring_command_runs(tiny_run, tiny_chars):
    """The tiny command of experiments/pretrain.py's docstring, made seconds long by overrides (15 steps), trains
    and writes its workdir (conftest.py's tiny_run, also the reference of test_resume_kill and test_multiprocess)."""
    run, proc = tiny_run
    assert re.search(r"done: step 15, last loss \d+\.\d+", proc.stdout), proc.stdout
    steps = [r["step"] for r in metric_records(run)]
    assert steps == list(range(1, 16))
    config = json.loads((run / "config.json").read_text())
    assert config["steps"] == 15 and config["model"]["vocab_size"] == VOCAB and config["data"]["dir"] == str(tiny_chars)
    for name in ("run_info.json", "loss.png", "best/model_config.json", "checkpoints/15", "tensorboard"):
        assert (run / name).exists(), name
    assert "Finished saving checkpoint" not in proc.stdout + proc.stderr  # orbax's INFO logs stay quiet


@pytest.mark.parametrize("flag, bad, level", [
    ("--config.stpes=3", "stpes", "config"),
    ("--config.optimizer.lrr=1e-3", "lrr", "config.optimizer"),
    ("--config.mesh.shapes=(1,1,1)", "shapes", "config.mesh"),
])
def test_mistyped_key_names_it_and_the_valid_keys(tmp_path, flag, bad, level):
    from experiments.pretrain import get_config

    proc = run_train(train_command(tmp_path / "run", [flag]), child_env(), timeout=120)
    assert proc.returncode != 0
    err = proc.stderr
    assert f"{flag.split('=')[0]}: {level} has no key {bad!r}" in err, err[-3000:]
    listed = re.search(rf"valid keys of {re.escape(level)}: (.*)", err)
    assert listed, err[-3000:]
    node = get_config("tiny")
    for key in level.split(".")[1:]:
        node = node[key]
    assert [k.strip() for k in listed.group(1).split(",")] == sorted(node.keys())
    assert "Traceback" not in err  # a usage error, not a crash
    assert not (tmp_path / "run").exists()  # nothing started


def test_mistyped_key_suggests_the_close_one(tmp_path):
    proc = run_train(train_command(tmp_path / "run", ["--config.stpes=3"]), child_env(), timeout=120)
    assert "did you mean 'steps'?" in proc.stderr, proc.stderr[-2000:]


def test_override_below_a_leaf_is_refused(tmp_path):
    proc = run_train(train_command(tmp_path / "run", ["--config.steps.x=3"]), child_env(), timeout=120)
    assert proc.returncode != 0
    assert "--config.steps.x: config.steps is a value of type int, not a config with keys" in proc.stderr, \
        proc.stderr[-2000:]


def test_bad_variant_names_the_known_ones(tmp_path):
    proc = run_train(train_command(tmp_path / "run", [], variant="tinyy"), child_env(), timeout=120)
    assert proc.returncode != 0
    assert "unknown pretrain variant 'tinyy'; known: ['125m', '1b', '3b', '7b', 'small', 'tiny']" in proc.stderr, \
        proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "run").exists()


def test_missing_config_file_is_named(tmp_path):
    proc = run_train([sys.executable, str(TRAIN), "--config", "experiments/nope.py:tiny", "--workdir",
                      str(tmp_path / "run"), "--config.steps=3"], child_env(), timeout=120)
    assert proc.returncode != 0
    assert "--config=experiments/nope.py:tiny: no such config file 'experiments/nope.py'" in proc.stderr, proc.stderr


@pytest.mark.parametrize("workdir, flags, message", [
    ("{file}", [], "cannot make the workdir {file}: File exists"),  # were FileExistsError / NotADirectoryError /
    ("{file}/run", [], "cannot make the workdir {file}/run: Not a directory"),  # ValueError tracebacks
    ("{run}", ["--config.seed=-1"], "seed=-1 must be an int >= 0"),
    ("{run}", ["--config.batch_size=0"], "batch_size=0 must be an int >= 1"),
])
def test_bad_workdir_or_numbers_are_one_line(tmp_path, capsys, workdir, flags, message):
    from configurable_fm.cli.train import main

    (tmp_path / "file").write_text("x")
    names = {"file": tmp_path / "file", "run": tmp_path / "run"}
    with pytest.raises(SystemExit) as e:
        main(["--config", f"{ROOT}/experiments/finetune.py:sort_mlp,runlocal", "--workdir", workdir.format(**names),
              "--config.compute_dtype=float32", "--config.mesh.shape=(1,1,1)", "--config.steps=2", *flags])
    err = capsys.readouterr().err
    assert e.value.code == 1 and err.startswith(f"cfm-train: error: {message.format(**names)}"), err
    assert len(err.splitlines()) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"] and (tmp_path / "file").read_text() == "x"
