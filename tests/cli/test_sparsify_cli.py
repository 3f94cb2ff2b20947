"""scripts/sparsify.py (cfm-sparsify) end to end on a tiny random llama with a character tokenizer: the orbax output
is the model `sparsify_activations(model, calibrate(...).thresholds(p))` makes in-process (with score 'fisher', its
Fisher scales too), a sparse input (a recovery run's model) is re-calibrated on itself with its adapters kept, the
held-out line reports perplexity and the achieved sparsity; bad input is one line naming the key or value, with
nothing written."""
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

from configurable_fm.analysis import sparsity as sp
from configurable_fm.analysis.moefication import corpus_batches
from configurable_fm.bricks.adapters import adapted_modules, attach
from configurable_fm.cli.sparsify import check_config, target_paths
from configurable_fm.errors import ConfigError
from configurable_fm.interop.hf import to_hf
from configurable_fm.interop.loader import load_model
from configurable_fm.interop.orbax_io import load_model as load_orbax
from configurable_fm.interop.orbax_io import save_model
from configurable_fm.models import check_consistent
from configurable_fm.models.llama import LlamaConfig
from experiments.analysis import sparsify as sparsify_experiment
from tests.analysis.tiny import BERT, GPT2, random_model
from tests.helpers import char_tokenizer, random_llama, run_script

ROOT = Path(__file__).resolve().parents[2]
CONFIG = f"{ROOT}/experiments/analysis/sparsify.py:test"
CFG = LlamaConfig(vocab_size=104, hidden_size=16, intermediate_size=32, num_layers=2, num_heads=2, num_kv_heads=1,
                  max_position_embeddings=128)
IDS = np.random.RandomState(1).randint(4, 100, (2, 12)).astype(np.int32)
TEXT = "The quick brown fox jumps over the lazy dog; pack my box with five dozen liquor jugs. " * 12
HELD_OUT = "Sphinx of black quartz, judge my vow. How vexingly quick daft zebras jump! " * 12
DOWN = ["layers.0.mlp.down_proj", "layers.1.mlp.down_proj"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """{root, hf (with tokenizer), corpus and held_out (.txt), model, tokenizer}."""
    root = tmp_path_factory.mktemp("sparsify_world")
    model = random_llama(CFG, 3)
    tok = char_tokenizer(special=("<pad>", "<eos>", "<bos>"))
    (root / "corpus.txt").write_text(TEXT)
    (root / "held_out.txt").write_text(HELD_OUT)
    return dict(root=root, hf=to_hf(model, root / "hf", tokenizer=tok), corpus=root / "corpus.txt",
                held_out=root / "held_out.txt", model=model, tokenizer=tok)


def sparsify_cli(world, out, *args, source=None, capsys):
    return run_script("sparsify", ["--config", CONFIG, f"--config.input={source or world['hf']}",
                                   f"--config.output={out}", f"--config.calibration.corpus={world['corpus']}",
                                   f"--config.evaluation.corpus={world['held_out']}", *args], capsys)


def logits(model):
    return np.asarray(model(jnp.asarray(IDS)), np.float32)


def calibration_batches(world):
    # the `test` variant's calibration: 64 tokens in windows of 16, 4 per batch
    return corpus_batches(str(world["corpus"]), world["tokenizer"], seq_len=16, batch_size=4, n_tokens=64)


def test_output_is_the_model_calibrated_in_process(world, tmp_path, capsys):
    code, io = sparsify_cli(world, tmp_path / "out", "--config.sparsity=0.75", capsys=capsys)
    assert code == 0, io.err
    assert f"sparsified {world['hf']}: 2 Linears (layers.0.mlp.down_proj ...) zero 75% of their input" in io.out
    assert f"(64 of '{world['corpus']}', score 'magnitude')" in io.out
    got = load_orbax(tmp_path / "out")
    check_consistent(got, "test")
    model = load_model(world["hf"])
    want = sp.sparsify_activations(model, sp.calibrate(model, calibration_batches(world), DOWN).thresholds(0.75))
    assert sp.thresholds_of(got) == pytest.approx(sp.thresholds_of(want), rel=0, abs=0)
    assert list(sp.thresholds_of(got)) == DOWN
    assert np.array_equal(logits(got), logits(want))
    held = corpus_batches(str(world["held_out"]), world["tokenizer"], seq_len=16, batch_size=4, n_tokens=64)
    ev = sp.evaluate(want, held)
    line = next(x for x in io.out.splitlines() if x.startswith("held out"))
    assert f"held out (64 tokens of '{world['held_out']}'): perplexity " in line
    assert f"-> {ev.perplexity():.4f}" in line
    change, se = sp.perplexity_change(ev, sp.evaluate(model, held))  # 64 tokens = 4 windows of 16
    assert f"({change:+.2%} ± {se:.2%} SE over 4 windows)" in line
    assert f"achieved sparsity mean {np.mean(list(ev.sparsity().values())):.4f}" in line


def test_a_sparse_input_is_recalibrated_on_itself_and_keeps_its_adapters(world, tmp_path, capsys):
    """A recovery run's model: down_proj sparse at 50%, a LoRA adapter on up_proj; the command re-sets the
    thresholds to the 75% quantiles of the inputs as this model produces them and keeps the adapter unmerged."""
    model = load_model(world["hf"])
    sparse = sp.sparsify_activations(model, sp.calibrate(model, calibration_batches(world), DOWN).thresholds(0.5))
    adapted = attach(sparse, "lora", ("layers.*.mlp.up_proj",), rank=2, alpha=4.0, init="random", seed=5)
    save_model(adapted, tmp_path / "in")
    code, io = sparsify_cli(world, tmp_path / "out", "--config.sparsity=0.75", source=tmp_path / "in", capsys=capsys)
    assert code == 1 and "carries no tokenizer for the calibration corpus: set `calibration.tokenizer`" in io.err
    code, io = sparsify_cli(world, tmp_path / "out", "--config.sparsity=0.75", f"--config.calibration.tokenizer="
                            f"{world['hf']}", source=tmp_path / "in", capsys=capsys)
    assert code == 0, io.err
    got = load_orbax(tmp_path / "out")
    assert list(adapted_modules(got)) == ["layers.0.mlp.up_proj", "layers.1.mlp.up_proj"]
    cal = sp.calibrate(adapted, calibration_batches(world), DOWN)  # the inputs of the sparse, adapted model
    # the checkpoint's round trip through orbax reorders float sums in the adapter: 2e-8 relative seen
    assert sp.thresholds_of(got) == pytest.approx(cal.thresholds(0.75), rel=1e-6)
    assert all(t > u for t, u in zip(sp.thresholds_of(got).values(), sp.thresholds_of(sparse).values()))
    # the held-out line compares against the same model with its targets dense
    dense = sp.desparsify(adapted)
    held = corpus_batches(str(world["held_out"]), world["tokenizer"], seq_len=16, batch_size=4, n_tokens=64)
    assert f"perplexity {sp.evaluate(dense, held).perplexity():.4f} with the targets dense" in io.out


def test_fisher_score_writes_the_scales_it_calibrated_with(world, tmp_path, capsys):
    """score 'fisher': the output keeps s = fisher_scales on the calibration tokens as each module's scale, and its
    thresholds are the quantiles of |x_i| s_i, as made in-process."""
    code, io = sparsify_cli(world, tmp_path / "out", "--config.score=fisher", capsys=capsys)
    assert code == 0, io.err
    assert "score 'fisher')" in io.out
    got = load_orbax(tmp_path / "out")
    model = load_model(world["hf"])
    scales = sp.fisher_scales(model, calibration_batches(world), DOWN)
    cal = sp.calibrate(model, calibration_batches(world), DOWN, score="scaled", scales=scales)
    assert sp.thresholds_of(got) == pytest.approx(cal.thresholds(0.5), rel=1e-6)
    for path in DOWN:
        np.testing.assert_allclose(sp.scales_of(got)[path], scales[path], rtol=1e-6)
    assert [m.score for m in sp.sparse_linears(got).values()] == ["scaled", "scaled"]


def test_target_sets():
    llama, gpt2 = random_llama(CFG, 0), random_model(GPT2, 0)
    assert target_paths(llama, "ffn") == DOWN
    assert target_paths(gpt2, "ffn") == ["h.0.mlp.c_proj", "h.1.mlp.c_proj"]
    assert len(target_paths(llama, "all")) == 14
    with pytest.raises(ConfigError, match=r"targets='ffn' knows the FFN of \['gpt2', 'llama'\] models, not of a "
                                          "BertConfig model"):
        target_paths(random_model(BERT, 0), "ffn")
    assert sorted(target_paths(llama, ("layers.1.mlp.*_proj",))) == ["layers.1.mlp.down_proj",
                                                                     "layers.1.mlp.gate_proj", "layers.1.mlp.up_proj"]


def test_the_experiment_variants_are_valid_configs():
    variants = {"": (0.5, "ffn", "stdlib"), "quarter,code": (0.75, "ffn", "code"),
                "teal,english": (0.5, "all", "english"), "test": (0.5, "ffn", "stdlib")}
    for variant, (p, targets, corpus) in variants.items():
        d = check_config(sparsify_experiment.get_config(variant))
        assert (d["sparsity"], d["targets"], d["calibration"]["corpus"]) == (p, targets, corpus)
    with pytest.raises(ValueError, match=r"variant 'half,quarter': give at most one of"):
        sparsify_experiment.get_config("half,quarter")


ERRORS = {
    "sparsity": (["--config.sparsity=1.0"], 1, "sparsity for the sparsify config must be a number in [0, 1)"),
    "score": (["--config.score=wina"], 1, "sparsify config: `score` must be one of ['magnitude', 'weighted', "
                                          "'fisher'], got 'wina'"),
    "format": (["--config.format=hf"], 1, "sparsify config: `format` must be 'orbax' (an HF checkpoint cannot "
                                          "express the thresholds), got 'hf'"),
    "target": (["--config.targets=layers.*.mlp.gate"], 1, "layers.*.mlp.gate"),
    "empty-target": (["--config.targets=ffn,,x"], 1, "sparsify config: `targets` has an empty entry"),
    "no-corpus": (["--config.calibration.corpus="], 1, "sparsify config: set `calibration.corpus`"),
    "text-held-out": (["--config.evaluation.corpus="], 1, "is text, which has no held-out split: set "
                                                          "`evaluation.corpus`"),
    "held-out-corpus": (["--config.evaluation.corpus=/no/such/text"], 1, "evaluation corpus '/no/such/text' is not a "
                                                                         "token dataset"),
    "tokens": (["--config.evaluation.n_tokens=0"], 1, "sparsify config: `evaluation.n_tokens` must be a positive int"),
    "key": (["--config.sparsty=0.5"], 2, "--config.sparsty: config has no key 'sparsty' (did you mean 'sparsity'?)"),
}


@pytest.mark.parametrize("case", sorted(ERRORS))
def test_bad_input_is_one_line_and_writes_nothing(world, tmp_path, capsys, case):
    args, status, message = ERRORS[case]
    code, io = sparsify_cli(world, tmp_path / "out", *args, capsys=capsys)
    assert code == status and message in io.err, io.err
    assert io.err.startswith("cfm-sparsify: error:") and "Traceback" not in io.err
    assert list(tmp_path.iterdir()) == []
