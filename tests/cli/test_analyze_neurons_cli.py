"""scripts/analyze_neurons.py (cfm-analyze-neurons) on a tiny random llama with a character tokenizer: the work
directory holds results.json (config, data manifest, the study), results.md and the figures, written atomically;
bad input is one line naming the key, value or source, with nothing written."""
import json
from pathlib import Path

import numpy as np
import pytest

from configurable_fm.interop.hf import to_hf
from configurable_fm.interop.orbax_io import save_model
from configurable_fm.models.llama import LlamaConfig
from experiments.analysis import specialisation as experiment
from tests.analysis.tiny import BERT, random_model
from tests.helpers import char_tokenizer, random_llama, run_script

ROOT = Path(__file__).resolve().parents[2]
CONFIG = f"{ROOT}/experiments/analysis/specialisation.py:test"
CFG = LlamaConfig(vocab_size=104, hidden_size=16, intermediate_size=32, num_layers=2, num_heads=2, num_kv_heads=1,
                  max_position_embeddings=128)
FAST = "--config.data.functions=('math', 'ethics', 'translation')"  # no corpus to read: seconds


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("neurons_world")
    tok = char_tokenizer(special=("<pad>", "<eos>", "<bos>"))
    model = random_llama(CFG, 3)
    return dict(root=root, hf=to_hf(model, root / "hf", tokenizer=tok), orbax=save_model(model, root / "orbax"),
                bert=to_hf(random_model({**BERT, "vocab_size": 104}, 0), root / "bert", tokenizer=tok))


def analyze(world, workdir, *args, source="hf", capsys):
    return run_script("analyze_neurons", ["--config", CONFIG, f"--config.input={world[source]}",
                                          f"--workdir={workdir}", *args], capsys)


def test_writes_the_study_to_the_workdir(world, tmp_path, capsys):
    code, io = analyze(world, tmp_path / "w", FAST, "--config.save_scores=True", capsys=capsys)
    assert code == 0, io.err
    got = json.loads((tmp_path / "w" / "results.json").read_text())
    assert got["functions"] == ["math", "ethics", "translation"]
    assert got["data"]["functions"]["math"] == {"score": 6, "eval": 4, "sources": got["data"]["functions"]["math"][
        "sources"], "groups": {"score": 6, "eval": 4}}
    assert got["config"]["input"] == str(world["hf"]) and "revision" in got["git"]
    assert len(got["pruning"]["change"]) == 4 and got["overlap"]["random_baseline"] == 0.05
    assert (tmp_path / "w" / "results.md").read_text().startswith("2 FFN layers x 32 neurons")
    assert len(list((tmp_path / "w" / "figures").glob("*.png"))) == 6
    with np.load(tmp_path / "w" / "scores.npz") as z:
        assert z["scores"].shape == z["null_scores"].shape == (3, 2, 32)
    assert "wrote" in io.out and "rises most in" in io.out
    code, io = analyze(world, tmp_path / "w", FAST, capsys=capsys)  # an existing output needs overwrite
    assert code == 1 and "already exists" in io.err and (tmp_path / "w" / "results.json").is_file()


def test_the_experiment_variants_are_valid_configs():
    for arg in ("", "test"):
        c = experiment.get_config(arg)
        assert c.data.n_score >= 1 and 0 < c.study.fraction < 0.5
    assert experiment.get_config("").input == "smollm2-135m-instruct"
    with pytest.raises(ValueError, match="unknown variant 'nope'"):
        experiment.get_config("nope")


@pytest.mark.parametrize("args, status, message", [
    (["--config.study.fraction=0.7"], 1, "`fraction` must be in (0, 0.5), got 0.7"),
    (["--config.data.n_score=0"], 1, "`data.n_score` must be an int >= 1, got 0"),
    (["--config.data.functions=('math', 'poetry')"], 1, "`data.functions` must be two or more distinct names"),
    (["--config.data.facts=/no/such.jsonl"], 1, "`data.facts` '/no/such.jsonl' is not a file"),
    (["--config.study.mask_levels=(0.5, 1.5)"], 1, "`mask_levels` must be fractions in (0, 1)"),
    (["--config.studdy.seed=1"], 2, "config has no key 'studdy' (did you mean 'study'?)"),
    (["--config.data.n_score=1000", FAST], 1, "function 'ethics' has 200 instances in 50 groups, too few"),
])
def test_bad_input_is_one_line_and_writes_nothing(world, tmp_path, capsys, args, status, message):
    code, io = analyze(world, tmp_path / "w", *args, capsys=capsys)
    assert code == status, io.err
    assert message in io.err and len(io.err.strip().splitlines()) == 1
    assert not (tmp_path / "w").exists() and list(tmp_path.iterdir()) == []


def test_sources_the_command_cannot_use(world, tmp_path, capsys):
    code, io = analyze(world, tmp_path / "w", source="orbax", capsys=capsys)  # no tokenizer in an orbax checkpoint
    assert code == 1 and "carries no tokenizer: set `tokenizer`" in io.err
    code, io = run_script("analyze_neurons", ["--config", CONFIG, f"--config.input={tmp_path / 'nothing'}",
                                              f"--workdir={tmp_path / 'w'}"], capsys)
    assert code == 1 and "the path does not exist" in io.err
    code, io = analyze(world, tmp_path / "w", FAST, source="bert", capsys=capsys)
    assert code == 1 and "no FFN hidden tap point" in io.err
    code, io = run_script("analyze_neurons", ["--config", CONFIG, f"--config.input={world['hf']}"], capsys)
    assert code == 2 and "--workdir is required" in io.err
    assert not (tmp_path / "w").exists()
