"""The 'grow_run' stage (grow a training run mid-way and continue it) and the grow config's `masked` section, in
studies on tiny llamas with a character tokenizer: pretrain -> grow_run resumes after a kill and continues the
source run's steps and metrics; pretrain -> grow (masked) -> train with the mask ramp; bad configs are errors
naming the key before anything trains."""
import json

import pytest

from configurable_fm.errors import ConfigError
from configurable_fm.interop.loader import load_model
from configurable_fm.stages import grow_run_config, run
from configurable_fm.stages import grow_run as grow_run_module
from configurable_fm.stages.grow import MASKED_KEYS, count_params, grow_from_config
from experiments import study_tiny
from experiments.grow import stage_config, width
from tests.train.test_finetune import use_char_tokenizer, write_char_tokenizer

WIDE = dict(hidden_size=48, num_heads=3, intermediate_size=96)


def pretrain_stage(tmp_path):
    tok = write_char_tokenizer(tmp_path / "tokenizer.json")
    pre = study_tiny.get_config("test").stages[0]
    use_char_tokenizer(pre, tok)
    pre.eval_every = 0
    return pre


def continued(pre, steps: int, **kw):
    """A grow_run stage continuing `pre` to `steps` in total."""
    train = pre.copy_and_resolve_references()
    del train["name"], train["kind"]
    train.steps = steps
    return grow_run_config("grown", source="@pretrain", train=train, **kw)


def test_grow_run_stage_continues_the_run_and_resumes_after_a_kill(pretrained_study, monkeypatch):
    _, pre, workdir = pretrained_study  # its pretrain stage is complete (conftest.py)
    c = study_tiny.get_config("test")
    c.stages = [pre, continued(pre, pre.steps + 4, width=WIDE, depth=dict(num_layers=3), optimizer_state="copy",
                               rewarm_steps=2)]

    from configurable_fm.train import trainer

    def killed(*a, **k):  # the grown run is killed before its first step
        raise KeyboardInterrupt("killed after the growth")

    monkeypatch.setattr(trainer, "train", killed)
    with pytest.raises(KeyboardInterrupt):
        run(c, workdir, log=lambda s: None)
    stage_dir = workdir / "stages" / "01_grown"
    assert (stage_dir / "train" / "growth.json").exists()  # the growth was written; training never started
    monkeypatch.undo()
    result = run(c, workdir, log=lambda s: None)
    assert [r.status for r in result.stages] == ["skipped", "resumed"]
    rec = result["grown"]
    assert rec.metrics["growth_step"] == pre.steps and rec.metrics["steps"] == pre.steps + 4
    model = load_model(rec.model_source(workdir))
    assert (model.cfg.hidden_size, model.cfg.num_layers) == (48, 3)
    assert rec.metrics["params_after"] == count_params(model)
    steps = [json.loads(line)["step"] for line in (stage_dir / "train" / "metrics.jsonl").read_text().splitlines()
             if "loss" in json.loads(line)]
    assert steps[0] <= pre.steps < steps[-1] == pre.steps + 4  # the source's records, then the grown run's
    growth = json.loads((stage_dir / "train" / "growth.json").read_text())
    assert growth["request"]["optimizer"] == "copy" and growth["request"]["rewarm_steps"] == 2
    assert "Grew the run of @pretrain at step 4" in (workdir / "report.md").read_text()
    assert [r.status for r in run(c, workdir, log=lambda s: None).stages] == ["skipped"] * 2


def test_masked_section_grows_exactly():
    """The grow config's `masked` section: grow_masked at ramp 0 keeps the source's logits; the metric says so."""
    from configurable_fm.models.llama import LlamaConfig
    from tests.helpers import random_llama

    source = random_llama(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=24, num_layers=2, num_heads=2,
                                      num_kv_heads=1, max_position_embeddings=32), 0)
    g = width.get_config()
    del g["width"]
    g.input, g.masked = "given", dict(MASKED_KEYS, hidden_size=24, num_heads=3, num_layers=3)
    grown, metrics = grow_from_config(g, with_metrics=True, load=lambda _: source)
    assert (grown.cfg.hidden_size, grown.cfg.num_layers) == (24, 3)
    assert metrics["max_logit_diff"] <= 1e-5 and metrics["params_after"] > metrics["params_before"]


@pytest.mark.slow
def test_masked_growth_stage_then_the_mask_ramp(pretrained_study):
    """pretrain -> grow (masked: new structure at ramp 0, exactly the source) -> train with the mask_ramp task."""
    tok, pre, workdir = pretrained_study
    g = width.get_config()
    del g["width"]
    g.input, g.masked = "@pretrain", dict(MASKED_KEYS, hidden_size=48, num_heads=3)
    c = study_tiny.get_config("test")
    ramp = use_char_tokenizer(c.stages[1], tok)
    ramp.name, ramp.init_from, ramp.eval_every = "ramp", "@grow", 0
    ramp.task = dict(kind="mask_ramp", start=0, steps=2)
    c.stages = [pre, stage_config(g, "grow"), ramp]
    result = run(c, workdir, log=lambda s: None)
    assert result["grow"].metrics["max_logit_diff"] <= 1e-5  # ramp 0: exactly the source's function
    assert result["ramp"].metrics["steps"] == ramp.steps
    assert load_model(result["ramp"].model_source(workdir)).cfg.hidden_size == 48


@pytest.mark.parametrize("change, key", [
    (dict(optimizer_state="keep"), "optimizer_state"),
    (dict(rewarm_steps=-2), "rewarm_steps"),
    (dict(width=dict(hidden_size=-1)), "width.hidden_size"),
    (dict(), "nothing to grow"),
])
def test_grow_run_config_errors_name_the_key(tmp_path, change, key):
    pre = pretrain_stage(tmp_path)
    kw = dict(width=WIDE) if "width" not in change and change else {}
    cfg = continued(pre, pre.steps + 2, **kw, **change)
    with pytest.raises(ConfigError, match=key):
        grow_run_module.check_growth(cfg)


@pytest.mark.parametrize("key, value", [("dtype", "bfloat16"), ("input", "@other"), ("output", "out"),
                                        ("format", "orbax")])
def test_grow_run_refuses_grow_config_keys_that_it_would_ignore(tmp_path, key, value):
    """`growth` holds the growth sections and `seed` only; a grow config's other keys (dtype, input, output, ...)
    were once accepted there and silently ignored."""
    pre = pretrain_stage(tmp_path)
    cfg = continued(pre, pre.steps + 2, width=WIDE)
    cfg.growth[key] = value
    with pytest.raises(ConfigError, match=rf"`growth` has unknown key\(s\) \['{key}'\]"):
        grow_run_module.check_growth(cfg)


def test_grow_run_refuses_masked_growth_and_a_source_without_a_run(tmp_path):
    pre = pretrain_stage(tmp_path)
    cfg = continued(pre, pre.steps + 2)
    cfg.growth.masked = dict(dict(MASKED_KEYS), hidden_size=48)
    with pytest.raises(ConfigError, match="growth.masked"):
        grow_run_module.check_growth(cfg)
    with pytest.raises(ConfigError, match="not the output of a 'train'"):
        grow_run_module.source_workdir(str(tmp_path / "stages" / "01_grow" / "model"))


def test_masked_section_grows_alone_and_asks_for_something():
    g = width.get_config()
    g.input, g.width.hidden_size = "x", 48
    g.masked = dict(dict(MASKED_KEYS), hidden_size=48)
    with pytest.raises(ConfigError, match="`masked` grows alone"):
        grow_from_config(g)
    del g["width"]
    g.masked = dict(MASKED_KEYS)
    with pytest.raises(ConfigError, match="asks for nothing"):
        grow_from_config(g)
