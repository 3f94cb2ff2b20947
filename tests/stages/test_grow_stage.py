"""Growing from configs (stages/grow.py), scripts/grow.py (cfm-grow) and the 'grow' stage of a study: tiny random
llamas saved as HF directories / orbax checkpoints, grown by width, depth and upcycling; the exact methods keep
the logits (our loader and transformers'), upcycling writes a Mixtral directory, a study train -> grow -> train
runs and resumes, and bad configs are errors naming the key with nothing written."""
import json
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

from configurable_fm.errors import ConfigError
from configurable_fm.interop.hf import from_hf, to_hf
from configurable_fm.interop.loader import load_model
from configurable_fm.interop.orbax_io import save_model
from configurable_fm.models.llama import LlamaConfig
from configurable_fm.ops.grow import state as grow_state
from configurable_fm.stages import STAGES, run
from configurable_fm.stages.grow import grow_from_config
from experiments import study_tiny
from experiments.grow import depth, stage_config, to_shape, upcycle, width
from tests.helpers import char_tokenizer, random_llama, run_script
from tests.train.test_finetune import use_char_tokenizer

ROOT = Path(__file__).resolve().parents[2]
CFG = LlamaConfig(vocab_size=104, hidden_size=16, intermediate_size=24, num_layers=2, num_heads=2, num_kv_heads=1,
                  max_position_embeddings=32)
IDS = np.random.RandomState(1).randint(0, 104, (2, 12)).astype(np.int32)


def logits(model):
    return np.asarray(model(jnp.asarray(IDS)), np.float32)


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    """(HF directory with a character tokenizer, orbax checkpoint, the model) of a tiny random llama."""
    root = tmp_path_factory.mktemp("grow_src")
    model = random_llama(CFG, 3)
    hf = to_hf(model, root / "hf", tokenizer=char_tokenizer())
    return hf, save_model(model, root / "orbax"), model


def grow_cli(argv, capsys):
    return run_script("grow", argv, capsys)


def torch_logits(out):
    transformers = pytest.importorskip("transformers")
    torch = pytest.importorskip("torch")
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(out), torch_dtype=torch.float32)
    with torch.no_grad():
        return hf(torch.tensor(IDS, dtype=torch.long)).logits.numpy()


@pytest.mark.parametrize("config, overrides, arch", [
    ("width.py", ["--config.width.hidden_size=24", "--config.width.num_heads=3", "--config.width.intermediate_size=40",
                  "--config.width.noise=0.1"], "LlamaForCausalLM"),
    pytest.param("width.py", ["--config.width.hidden_size=32", "--config.width.num_heads=4",
                              "--config.width.num_kv_heads=2", "--config.width.method=hypercloning"],
                 "LlamaForCausalLM",  # CI time (~2.6 s): the same command and format as the case above; hypercloning
                 marks=pytest.mark.slow),  # is exact in tests/ops/grow/test_grow_width (float64 and float32 cases)
    ("depth.py", ["--config.depth.num_layers=4"], "LlamaForCausalLM"),
    ("to_shape.py", ["--config.width.hidden_size=24", "--config.width.num_heads=3", "--config.depth.num_layers=3"],
     "LlamaForCausalLM"),
    ("upcycle.py", ["--config.upcycle.num_experts=4"], "MixtralForCausalLM"),
])
def test_script_writes_hf_with_the_source_logits(src, tmp_path, capsys, config, overrides, arch):
    hf, _, model = src
    out = tmp_path / "out"
    code, io = grow_cli(["--config", str(ROOT / "experiments" / "grow" / config), f"--config.input={hf}",
                         f"--config.output={out}", *overrides], capsys)
    assert code == 0, io.err
    assert "with the source's tokenizer" in io.out
    assert json.loads((out / "config.json").read_text())["architectures"] == [arch]
    assert (out / "tokenizer.json").is_file()
    grown = from_hf(out)
    ref = logits(model)
    assert grown.cfg != model.cfg
    np.testing.assert_allclose(logits(grown), ref, atol=1e-5)
    if arch == "LlamaForCausalLM":
        np.testing.assert_allclose(torch_logits(out), ref, atol=1e-5)


def test_orbax_in_orbax_out_and_dtype(src, tmp_path, capsys):
    _, orbax, model = src
    out = tmp_path / "deep"
    code, io = grow_cli(["--config", f"{ROOT}/experiments/grow/depth.py:llama_pro", f"--config.input={orbax}",
                         f"--config.output={out}", "--config.format=orbax", "--config.depth.positions=(1, 2)"], capsys)
    assert code == 0, io.err
    grown = load_model(out)
    assert grown.cfg.num_layers == 4
    np.testing.assert_allclose(logits(grown), logits(model), atol=1e-5)
    code, io = grow_cli(["--config", f"{ROOT}/experiments/grow/depth.py:stack", f"--config.input={orbax}",
                         f"--config.output={tmp_path / 'hf'}", "--config.dtype=bfloat16"], capsys)
    assert code == 0, io.err
    assert "no tokenizer" in io.out and not (tmp_path / "hf" / "tokenizer.json").exists()
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["num_hidden_layers"] == 4


@pytest.mark.parametrize("overrides, message", [
    (["--config.input=/nonexistent/model"], "/nonexistent/model"),
    (["--config.width.hidden_size=8"], "hidden_size"),
    (["--config.width.method=magic"], "width.method"),
    (["--config.format=gguf"], "format"),
    (["--config.dtype=int8"], "dtype"),
    (["--config.width.intermediate_size=0"], "nothing to grow"),
])
def test_script_errors_are_one_line_and_write_nothing(src, tmp_path, capsys, overrides, message):
    hf = src[0]
    out = tmp_path / "out"
    code, io = grow_cli(["--config", f"{ROOT}/experiments/grow/width.py", f"--config.input={hf}",
                         f"--config.output={out}", "--config.width.intermediate_size=40", *overrides], capsys)
    assert code == 1
    assert io.err.startswith("cfm-grow: error:") and message in io.err and "Traceback" not in io.err
    assert len(io.err.strip().splitlines()) == 1
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_script_refuses_unknown_key_and_existing_output(src, tmp_path, capsys):
    hf = src[0]
    code, io = grow_cli(["--config", f"{ROOT}/experiments/grow/width.py", f"--config.input={hf}",
                         f"--config.output={tmp_path / 'o'}", "--config.width.hiden_size=32"], capsys)
    assert code == 2 and "hiden_size" in io.err and "hidden_size" in io.err and not (tmp_path / "o").exists()
    (tmp_path / "o").mkdir()
    code, io = grow_cli(["--config", f"{ROOT}/experiments/grow/upcycle.py", f"--config.input={hf}",
                         f"--config.output={tmp_path / 'o'}"], capsys)
    assert code == 1 and "already exists" in io.err and list((tmp_path / "o").iterdir()) == []


def _cfg(module, arg="", **sections):
    c = module.get_config(arg).to_dict()
    c["input"] = "/nonexistent/never/loaded"
    for section, values in sections.items():
        c[section].update(values) if isinstance(values, dict) else c.__setitem__(section, values)
    return c


@pytest.mark.parametrize("cfg, key", [
    (dict(_cfg(width, width=dict(hidden_size=32)), hidden=3), "hidden"),
    (_cfg(width, width=dict(hidden_size=32, typo=1)), "width.typo"),
    (_cfg(width, width=dict(hidden_size=-1)), "width.hidden_size"),
    (_cfg(width, width=dict(hidden_size=32, noise=-0.5)), "width.noise"),
    (_cfg(width, width=dict(hidden_size=32, noise=float("inf"))), "width.noise"),  # once loaded, then NaN weights
    (_cfg(width, width=dict(hidden_size=32), seed=1.5), "seed"),
    (_cfg(depth, depth=dict(method="grow")), "depth.method"),
    (_cfg(depth, depth=dict(num_layers=4, factor=2)), "depth.factor"),
    (_cfg(depth, "stack", depth=dict(factor=1)), "depth.factor"),
    (_cfg(depth, "dus", depth=dict(num_layers=4)), "depth.num_layers"),
    (_cfg(depth, depth=dict(positions=[0, -1])), "depth.positions[1]"),
    (_cfg(upcycle, upcycle=dict(num_experts=1)), "upcycle.num_experts"),
    (_cfg(upcycle, upcycle=dict(num_experts_per_tok=9)), "upcycle.num_experts_per_tok"),
    (_cfg(upcycle, upcycle=dict(router_init="ones")), "upcycle.router_init"),
    (_cfg(upcycle, upcycle=dict(drop_fraction=2.0)), "upcycle.drop_fraction"),
    (dict(_cfg(to_shape, "smollm2_360m"), input=""), "input"),
])
def test_bad_config_names_the_key_before_loading(cfg, key):
    with pytest.raises(ConfigError, match=key.replace("[", r"\[").replace("]", r"\]")):
        grow_from_config(cfg)


def test_to_shape_smollm2_360m_is_the_360m_shape():
    c = to_shape.get_config("smollm2_360m")
    assert (c.width.hidden_size, c.width.num_heads, c.width.num_kv_heads, c.width.intermediate_size) == (
        960, 15, 5, 2560)
    assert (c.depth.method, c.depth.num_layers) == ("identity", 32)
    with pytest.raises(ValueError, match="variant"):
        to_shape.get_config("smollm2_1b")


def test_study_train_grow_train_runs_and_resumes(pretrained_study, monkeypatch):
    """pretrain (study_tiny:test, character tokenizer; complete: conftest.py) -> grow (exact width + identity
    depth) -> finetune from the grown model; the grow stage's metrics show exactness, and a rerun skips every
    stage. Before that, a grow killed mid-way (after its width step) leaves no output, and the rerun skips
    pretrain and completes it."""
    assert "grow" in STAGES
    tok, pre, workdir = pretrained_study
    c = study_tiny.get_config("test")
    ft = use_char_tokenizer(c.stages[1], tok)
    ft.eval_every = 0
    ft.init_from = "@grow"
    g = to_shape.get_config()
    g.input = "@pretrain"
    g.width.update(hidden_size=48, num_heads=3, intermediate_size=96)
    g.depth.num_layers = 3
    c.stages = [pre, stage_config(g, "grow"), ft]
    logs = []

    def killed(*a, **k):
        raise KeyboardInterrupt("killed during grow")

    monkeypatch.setattr(grow_state, "grow_depth", killed)  # the width step has run
    with pytest.raises(KeyboardInterrupt):
        run(c, workdir, log=logs.append)
    grow_dir = workdir / "stages" / "01_grow"
    assert (grow_dir / "stage.pending.json").exists() and sorted(p.name for p in grow_dir.iterdir()) == [
        "stage.pending.json"]
    monkeypatch.undo()
    result = run(c, workdir, log=logs.append)
    assert [r.status for r in result.stages] == ["skipped", "resumed", "ran"]
    rec = result["grow"]
    assert rec.metrics["params_after"] > rec.metrics["params_before"]
    assert rec.metrics["max_logit_diff"] <= 1e-4
    grown = load_model(rec.model_source(workdir))
    assert (grown.cfg.hidden_size, grown.cfg.num_heads, grown.cfg.num_layers) == (48, 3, 3)
    tuned = load_model(result["finetune"].model_source(workdir))
    assert tuned.cfg.hidden_size == 48 and result["finetune"].metrics["steps"] == ft.steps
    assert "Grew @pretrain" in (workdir / "report.md").read_text()
    again = run(c, workdir, log=logs.append)
    assert [r.status for r in again.stages] == ["skipped"] * 3


def test_grow_stage_refuses_script_keys(tmp_path):
    """A grow stage takes the grow config without output/format/overwrite: those are unknown stage keys."""
    from configurable_fm.stages import stage

    c = study_tiny.get_config("test")
    g = width.get_config()
    g.input, g.width.hidden_size = "@pretrain", 64
    c.stages = [c.stages[0], stage("grow", "grow", g)]
    with pytest.raises(ConfigError, match="output"):
        run(c, tmp_path / "study", log=lambda s: None)
    assert not (tmp_path / "study").exists()
