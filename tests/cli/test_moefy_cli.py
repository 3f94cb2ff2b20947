"""scripts/moefy.py (cfm-moefy) end to end on a tiny random llama with a character tokenizer: the orbax output is the
model `moefy` makes in-process, a cmoe split with an MLP router trained on a text corpus prints its per-layer
metrics, the HF output is a MixtralForCausalLM (with the source's tokenizer) that transformers loads and that
reproduces the dense source's logits; bad input is one line naming the key or value, with nothing written."""
from pathlib import Path

import numpy as np
import pytest

from configurable_fm.analysis.moefication import MoefiedMLP, moefy, splits_of
from configurable_fm.interop.hf import to_hf
from configurable_fm.interop.loader import load_model
from configurable_fm.interop.orbax_io import load_model as load_orbax
from configurable_fm.interop.orbax_io import save_model
from configurable_fm.models import check_consistent, scoring
from configurable_fm.models.llama import LlamaConfig
from experiments.analysis import moefy as moefy_experiment
from tests.analysis.tiny import GPT2, random_model
from tests.helpers import char_tokenizer, random_llama, run_script

ROOT = Path(__file__).resolve().parents[2]
CONFIG = f"{ROOT}/experiments/analysis/moefy.py:test"
CFG = LlamaConfig(vocab_size=104, hidden_size=16, intermediate_size=32, num_layers=2, num_heads=2, num_kv_heads=1,
                  max_position_embeddings=128)
IDS = np.random.RandomState(1).randint(4, 100, (2, 12)).astype(np.int32)
TEXT = "The quick brown fox jumps over the lazy dog; pack my box with five dozen liquor jugs. " * 12


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """{root, hf (with tokenizer), orbax (no tokenizer), gpt2 (HF), corpus (.txt), model}."""
    root = tmp_path_factory.mktemp("moefy_world")
    model = random_llama(CFG, 3)
    tok = char_tokenizer(special=("<pad>", "<eos>", "<bos>"))
    (root / "corpus.txt").write_text(TEXT)
    return dict(root=root, hf=to_hf(model, root / "hf", tokenizer=tok), orbax=save_model(model, root / "orbax"),
                gpt2=to_hf(random_model(dict(GPT2, n_inner=32), 0), root / "gpt2"), corpus=root / "corpus.txt",
                model=model)


def moefy_cli(world, out, *args, source="hf", capsys):
    return run_script("moefy", ["--config", CONFIG, f"--config.input={world[source]}", f"--config.output={out}",
                                *args], capsys)


def logits(model):
    return scoring.logits(model, IDS)  # one compiled program per model structure: not an eager forward


def test_orbax_output_is_the_moefied_model(world, tmp_path, capsys):
    code, io = moefy_cli(world, tmp_path / "out", capsys=capsys)
    assert code == 0, io.err
    assert f"moefied {world['hf']}: 2 FFNs into 4 experts, top 2 routed, split 'kmeans', router 'centroid'" in io.out
    got = load_orbax(tmp_path / "out")
    check_consistent(got, "test")
    assert isinstance(got.layers[0].mlp, MoefiedMLP) and got.layers[0].mlp.top_k == 2
    want = moefy(load_model(world["hf"]), num_experts=4, num_experts_per_tok=2, split="kmeans", router="centroid",
                 key=0)  # the config's seed
    assert np.array_equal(logits(got), logits(want))
    assert all(np.array_equal(a.groups, b.groups) for a, b in zip(splits_of(got).values(), splits_of(want).values()))


def test_cmoe_with_an_mlp_router_on_a_text_corpus(world, tmp_path, capsys):
    code, io = moefy_cli(world, tmp_path / "out", "--config.split=cmoe", "--config.router=mlp",
                         f"--config.calibration.corpus={world['corpus']}", capsys=capsys)
    assert code == 0, io.err
    assert "co-activation counts over 256 tokens" in io.out and "layers.1.mlp router trained on 256 tokens" in io.out
    assert "(1 shared), top 2 routed, split 'cmoe', router 'mlp'" in io.out
    table = io.out[io.out.index("rel_error"):].splitlines()
    assert [line.split()[0] for line in table[2:]] == ["layers.0.mlp", "layers.1.mlp", "mean"]
    got = load_orbax(tmp_path / "out")
    assert got.layers[1].mlp.num_shared == 1 and got.layers[1].mlp.router_kind == "mlp"


def test_hf_output_is_a_mixtral_that_reproduces_the_dense_source(world, tmp_path, capsys):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    code, io = moefy_cli(world, tmp_path / "out", "--config.format=hf", "--config.num_experts_per_tok=4",
                         capsys=capsys)
    assert code == 0, io.err
    assert (tmp_path / "out" / "tokenizer.json").is_file()
    mixtral = transformers.MixtralForCausalLM.from_pretrained(tmp_path / "out").eval()
    dense = transformers.LlamaForCausalLM.from_pretrained(world["hf"]).eval()
    with torch.no_grad():
        theirs, reference = (m(torch.tensor(IDS)).logits.numpy() for m in (mixtral, dense))
    assert mixtral.config.num_local_experts == 4 and mixtral.config.num_experts_per_tok == 4
    assert np.abs(theirs - reference).max() <= 1e-5


def test_the_experiment_variants_are_valid_configs():
    from configurable_fm.cli.moefy import check_config

    for variant in ("", "mlp", "cmoe", "mixtral", "test"):
        c = moefy_experiment.get_config(variant)
        d = check_config(c)
        assert d["options"]["split"] == c.split and d["format"] == c.format
    with pytest.raises(ValueError, match=r"unknown variant 'big'; known: \['mlp', 'cmoe', 'mixtral', 'test'\]"):
        moefy_experiment.get_config("big")


ERRORS = {
    "divides": (["--config.num_experts=5"], 1, "moefy: the FFN has 32 neurons, which num_experts=5 does not divide "
                                                "into equal experts"),
    "k": (["--config.num_experts_per_tok=5"], 1, "moefy config: num_experts_per_tok must be an int in 1..4 (the "
                                                 "routed experts), got 5"),
    "split": (["--config.split=metis"], 1, "moefy config: split='metis' is unknown; choose one of"),
    "router": (["--config.router=hash"], 1, "moefy config: router='hash' is unknown"),
    "split-data": (["--config.split=coactivation"], 1, "moefy config: split='coactivation' needs calibration data (its "
                                                       "statistics come from the activations): set "
                                                       "--config.calibration.corpus"),
    "router-data": (["--config.router=mlp"], 1, "moefy config: router='mlp' is trained on calibration data: set "
                                                "--config.calibration.corpus"),
    "hf-sparse": (["--config.format=hf"], 1, "moefy config (format=hf): with num_experts_per_tok=2 of 4 routed experts "
                                             "the model is not expressible as MixtralForCausalLM"),
    "hf-mlp": (["--config.format=hf", "--config.router=mlp", "--config.mixtral_router_scale=0.001",
                "--config.calibration.corpus=x.txt"], 1, "its router='mlp' is not a linear map of the FFN input"),
    "format": (["--config.format=gguf"], 1, "moefy config: `format` must be one of ['hf', 'orbax'], got 'gguf'"),
    "scale": (["--config.mixtral_router_scale=-1.0"], 1, "moefy config: `mixtral_router_scale` must be a number >= 0"),
    "scale-nan": (["--config.format=hf", "--config.num_experts_per_tok=4", "--config.mixtral_router_scale=nan"], 1,
                  "moefy config: `mixtral_router_scale` must be a number >= 0"),  # was accepted
    "training": (["--config.router_training.steps=0"], 1,
                 "moefy config: router_training: steps must be a positive int, got 0"),
    "shared": (["--config.num_shared=1"], 1, "moefy config: num_shared=1: shared experts belong to split='cmoe' only"),
    "corpus": (["--config.split=cmoe", "--config.calibration.corpus=/no/such/corpus"], 1,
               "calibration corpus '/no/such/corpus' is not a token dataset"),
    "key": (["--config.num_expert=4"], 2, "--config.num_expert: config has no key 'num_expert' (did you mean "
                                          "'num_experts'?)"),
}


@pytest.mark.parametrize("case", sorted(ERRORS))
def test_bad_input_is_one_line_and_writes_nothing(world, tmp_path, capsys, case):
    args, status, message = ERRORS[case]
    code, io = moefy_cli(world, tmp_path / "out", *args, capsys=capsys)
    assert code == status and message in io.err, io.err
    assert io.err.startswith("cfm-moefy: error:") and "Traceback" not in io.err
    assert not (tmp_path / "out").exists() and list(tmp_path.iterdir()) == []


def test_sources_the_command_cannot_use(world, tmp_path, capsys):
    code, io = moefy_cli(world, tmp_path / "out", "--config.format=hf", "--config.num_experts_per_tok=4",
                         source="gpt2", capsys=capsys)
    assert code == 1 and "MixtralForCausalLM holds llama-family FFNs without biases; " in io.err, io.err
    code, io = moefy_cli(world, tmp_path / "out", "--config.router=mlp", f"--config.calibration.corpus="
                         f"{world['corpus']}", source="orbax", capsys=capsys)
    assert code == 1 and "carries no tokenizer for the calibration corpus: set `calibration.tokenizer`" in io.err
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "mine.txt").write_text("keep")
    code, io = moefy_cli(world, tmp_path / "out", "--config.overwrite=True", capsys=capsys)
    assert code == 1 and "holds files this library did not write (mine.txt)" in io.err
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["mine.txt"]
