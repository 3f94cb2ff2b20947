"""The mask ramp task (train/ramp.py): r(step) = clip((step - start) / steps, 0, 1) set on every GrowthRamp of a
grow_masked model through the real trainer (logged as `ramp`, carried in the 'other' partition, finite losses),
the trained model unmasked at r = 1, the task selected from a config, and the errors."""
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configurable_fm.errors import ConfigError
from configurable_fm.models.factory import build_model
from configurable_fm.models.structure import extension_specs
from configurable_fm.ops.grow import grow_masked, mask_ramps, unmask
from configurable_fm.stages.train import TRAIN_KEYS
from configurable_fm.train.ramp import MaskRampTask, ramp_value, task_from_config
from configurable_fm.train.task import AnchoredTask, NextTokenTask
from configurable_fm.train.trainer import train
from tests.ops.grow.grow_helpers import logits, max_diff
from tests.train.test_trainer import tiny_config, tiny_data

quiet = lambda s: None


def test_ramp_values():
    got = [float(ramp_value(jnp.int32(s), start=2, steps=4)) for s in range(0, 9)]
    assert got == [0.0, 0.0, 0.0, 0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert float(jax.jit(lambda s: ramp_value(s, start=0, steps=3))(jnp.int32(1))) == pytest.approx(1 / 3)


@pytest.fixture(scope="module")
def ramped_run(tmp_path_factory):
    cfg = tiny_config(steps=6, eval_every=6, checkpoint_every=6)
    source = build_model(cfg.model.to_dict(), seed=cfg.seed)
    grown = grow_masked(source, intermediate_size=96, num_layers=3, key=0)
    workdir = tmp_path_factory.mktemp("ramp")
    task = MaskRampTask(start=1, steps=4)
    result = train(cfg, workdir, model=grown, task=task, data=tiny_data(cfg), log=quiet)
    return cfg, source, grown, workdir, result


def test_the_trainer_ramps_the_masks_with_the_step(ramped_run):
    cfg, source, grown, workdir, result = ramped_run
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 7))
    # step s (1 for the first) trains with r = clip((s - 1) / 4, 0, 1): 0 at step 1, 1 from step 5 on
    assert [r["ramp"] for r in records] == [0.0, 0.25, 0.5, 0.75, 1.0, 1.0]
    assert all(np.isfinite(r["loss"]) for r in records) and "val_loss" in records[5]
    info = json.loads((workdir / "run_info.json").read_text())
    assert info["task"] == "MaskRampTask" and set(info["other"]) == set(mask_ramps(grown))  # carried, not trained
    assert set(mask_ramps(result.model).values()) == {1.0}
    assert set(mask_ramps(grown).values()) == {0.0}  # the model passed in is untouched
    # Fully ramped: the masks fold into a plain model computing the same function.
    plain = unmask(result.model)
    assert extension_specs(plain) == []
    ids = np.arange(16, dtype=np.int32).reshape(2, 8) % cfg.model.vocab_size
    assert max_diff(logits(plain, ids), logits(result.model, ids)) <= 1e-5


def test_setup_refuses_models_without_ramps_and_trainable_ramps(ramped_run):
    cfg, source, grown, workdir, _ = ramped_run
    with pytest.raises(ConfigError, match="MaskRampTask: the model has no GrowthRamp variables"):
        MaskRampTask(steps=4).setup(source, ["embed_tokens.embedding"])
    ramps = sorted(mask_ramps(grown))
    with pytest.raises(ConfigError, match=r"config.trainable selects growth ramps \(\['layers\.0\.mlp\.down_proj"):
        MaskRampTask(steps=4).setup(grown, ramps)
    anchored = MaskRampTask(inner=AnchoredTask(strength=0.1), steps=4).setup(grown, ["norm.weight"])
    assert list(anchored.inner.anchor) == ["norm.weight"]  # the inner task is set up too
    assert jax.tree.leaves(anchored)[0].shape == (cfg.model.hidden_size,)  # its arrays are the task's leaves


def test_the_train_stage_passes_the_configured_task(monkeypatch):
    from configurable_fm.stages.train import train_stage
    from configurable_fm.train import trainer

    seen = {}

    class Stop(Exception):
        pass

    def fake_train(cfg, workdir, *, task=None, **kw):
        seen["task"] = task
        raise Stop

    monkeypatch.setattr(trainer, "train", fake_train)
    cfg = tiny_config()
    cfg.task = {"kind": "mask_ramp", "start": 3, "steps": 7}

    class Context:  # what train_stage reads of a StageContext before it calls train
        stage_dir, log = Path("/nonexistent"), quiet

    with pytest.raises(Stop):
        train_stage(cfg, Context())
    assert isinstance(seen["task"], MaskRampTask) and (seen["task"].start, seen["task"].steps) == (3, 7)
    cfg.task = {"kind": "mask_ramp"}
    with pytest.raises(ConfigError, match="needs task.steps"):
        train_stage(cfg, Context())


def test_task_from_config():
    assert isinstance(task_from_config(None), NextTokenTask)
    assert isinstance(task_from_config({"kind": ""}), NextTokenTask)
    task = task_from_config({"kind": "mask_ramp", "start": 10, "steps": 100})
    assert isinstance(task, MaskRampTask) and (task.start, task.steps) == (10, 100)
    moe = task_from_config({"kind": "moe", "aux_loss_coef": 0.02})
    assert type(moe).__name__ == "MoETask" and moe.aux_loss_coef == 0.02
    assert "task" in TRAIN_KEYS  # the train stage takes a `task` entry
    for spec, message in [
        ({"kind": "nope"}, r"task.kind='nope' is not one of \['next_token', 'mask_ramp', 'moe', 'distill'\]"),
        ({"kind": "moe", "aux": 1}, r"MoETask: unknown key\(s\) \['aux'\]"),
        ({"kind": "mask_ramp", "start": 0}, r"task.kind='mask_ramp' needs task.steps"),
        ({"kind": "mask_ramp", "steps": 5, "rate": 1}, r"unknown key\(s\) \['rate'\] for kind 'mask_ramp'"),
        ({"kind": "mask_ramp", "steps": 0}, r"MaskRampTask: steps=0 must be an int >= 1"),
        ({"kind": "mask_ramp", "steps": 5, "start": -1}, r"MaskRampTask: start=-1 must be an int >= 0"),
        ({"kind": "next_token", "steps": 5}, r"task.kind='next_token' takes no settings"),
    ]:
        with pytest.raises(ConfigError, match=message):
            task_from_config(spec)
