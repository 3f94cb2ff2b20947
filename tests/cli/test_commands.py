"""The console commands (setup.cfg `console_scripts`): each is `configurable_fm.cli.<module>:main`, a
`define` / `run` pair passed to `cli.run`; scripts/<name>.py are shims over them; an installed command works from
any directory (paths on its command line relative to that directory)."""
import configparser
import importlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
COMMANDS = {"cfm-train": ("train", "--workdir"), "cfm-run": ("study", "--rerun_from"),
            "cfm-merge": ("merge", "--mergekit_yaml"), "cfm-prepare-data": ("prepare_data", "--out:"),
            "cfm-quickstart": ("quickstart", "--pretrain_steps"), "cfm-convert": ("convert", "--config"),
            "cfm-generate": ("generate", "--config"),
            "cfm-grow": ("grow", "--config"), "cfm-edit": ("edit", "--config"),
            "cfm-adapters": ("adapters", "--config"), "cfm-moefy": ("moefy", "--config"),
            "cfm-sparsify": ("sparsify", "--config"), "cfm-analyze-neurons": ("analyze_neurons", "--config")}
SHIMS = {"train": "train", "run": "study", "merge": "merge", "prepare_data": "prepare_data",
         "quickstart": "quickstart", "grow": "grow", "edit": "edit", "adapters": "adapters", "moefy": "moefy",
         "sparsify": "sparsify", "analyze_neurons": "analyze_neurons",
         "generate": "generate"}


def console_scripts() -> dict[str, str]:
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    lines = [x.strip() for x in cfg["options.entry_points"]["console_scripts"].splitlines() if x.strip()]
    return dict(tuple(p.strip() for p in x.split("=")) for x in lines)


def test_setup_cfg_declares_every_command():
    scripts = console_scripts()
    assert scripts == {name: f"configurable_fm.cli.{module}:main" for name, (module, _) in COMMANDS.items()}
    for target in scripts.values():
        module, func = target.split(":")
        assert callable(getattr(importlib.import_module(module), func)), target


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_help_lists_the_flags(name, capsys):
    module, flag = COMMANDS[name]
    mod = importlib.import_module(f"configurable_fm.cli.{module}")
    with pytest.raises(SystemExit) as e:
        mod.main(["--help"])
    assert e.value.code == 0
    assert flag in capsys.readouterr().out


@pytest.mark.parametrize("name, argv, message", [
    ("cfm-train", ["--workdir", "w"], "cfm-train: error: --config is required"),
    ("cfm-run", ["--config", "experiments/study_tiny.py"], "cfm-run: error: --workdir is required"),
    ("cfm-merge", ["--mergekit_yaml", "m.yml"], "cfm-merge: error: --output is required"),
    ("cfm-prepare-data", [], "cfm-prepare-data: error: --config is required"),
    ("cfm-quickstart", ["--max_new_tokens", "x"], "cfm-quickstart: error:"),
    # were ValueError tracebacks after loading the model and writing bricks.png
    ("cfm-quickstart", ["--max_new_tokens=-1"], "cfm-quickstart: error: flag --max_new_tokens=-1: -1 is not"),
    ("cfm-quickstart", ["--pretrain_steps=-5"], "cfm-quickstart: error: flag --pretrain_steps=-5: -5 is not"),
])
def test_usage_errors_name_the_command(name, argv, message, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    mod = importlib.import_module(f"configurable_fm.cli.{COMMANDS[name][0]}")
    with pytest.raises(SystemExit) as e:
        mod.main(argv)
    assert e.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("script", sorted(SHIMS))
def test_scripts_are_shims_over_the_commands(script):
    text = (ROOT / "scripts" / f"{script}.py").read_text()
    assert f"from configurable_fm.cli.{SHIMS[script]} import main" in text and "sys.exit(main())" in text
    assert len(text.splitlines()) < 16


def _installed(name: str) -> Path:
    path = Path(sys.executable).parent / name
    if not path.exists():
        pytest.skip(f"{name} is not installed (pip install -e .)")
    return path


def test_installed_commands_run_from_another_directory(tmp_path):
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([str(_installed("cfm-train")), "--help"], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0 and "--workdir" in proc.stdout, proc.stderr[-2000:]
    # the config file is found from the command line (an absolute path); its inputs, relative paths, are not
    proc = subprocess.run([str(_installed("cfm-merge")), f"--config={ROOT}/experiments/merge/task_arithmetic_tiny.py",
                           "--output", "x"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert ("cfm-merge: error: cannot load a model from 'runs/study_tiny/stages/00_pretrain/model': the path does "
            "not exist") in proc.stderr and "Traceback" not in proc.stderr
    assert os.listdir(tmp_path) == []
    proc = subprocess.run([str(_installed("cfm-train")), "--config=experiments/pretrain.py:tiny", "--workdir", "w"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "no such config file 'experiments/pretrain.py' (relative to " \
        f"{tmp_path})" in proc.stderr, proc.stderr[-2000:]


@pytest.mark.parametrize("name, argv", [
    ("cfm-run", ["--config", f"{ROOT}/experiments/study_tiny.py:test"]),
    ("cfm-quickstart", ["--pretrain_steps=0"]),
])
def test_a_workdir_that_is_a_file_is_one_line(name, argv, tmp_path, capsys):
    (tmp_path / "file").write_text("x")  # were FileExistsError / NotADirectoryError tracebacks
    mod = importlib.import_module(f"configurable_fm.cli.{COMMANDS[name][0]}")
    for workdir in (tmp_path / "file", tmp_path / "file" / "w"):
        with pytest.raises(SystemExit) as e:
            mod.main([*argv, f"--workdir={workdir}"])
        err = capsys.readouterr().err
        assert e.value.code == 1 and err.startswith(f"{name}: error: cannot make the ") and f"{workdir}: " in err, err
        assert len(err.splitlines()) == 1
    assert os.listdir(tmp_path) == ["file"] and (tmp_path / "file").read_text() == "x"
