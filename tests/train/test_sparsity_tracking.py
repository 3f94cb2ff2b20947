"""Threshold tracking for activation-sparse models in training (train/sparsity_tracking.py): the zeroed fraction and
the update rule by hand, one loss call's exact update, the real trainer bringing thresholds calibrated for 20% to
the 50% level (the input model untouched, the thresholds checkpointed), the config entry and the errors."""
import json

import jax.numpy as jnp
import numpy as np
import pytest

from configurable_fm.analysis.capture import capture
from configurable_fm.analysis.sparsity import evaluate, sparsify_activations, thresholds_of
from configurable_fm.errors import ConfigError
from configurable_fm.interop.loader import load_model
from configurable_fm.models.factory import build_model
from configurable_fm.train.distill import DistillTask
from configurable_fm.train.moe import MoETask
from configurable_fm.train.ramp import task_from_config
from configurable_fm.train.sparsity_tracking import SparsityTrackingTask, fraction_below, tracked_threshold
from configurable_fm.train.task import NextTokenTask
from configurable_fm.train.trainer import train
from tests.train.test_trainer import tiny_config, tiny_data

quiet = lambda s: None
DOWN = ("layers.0.mlp.down_proj", "layers.1.mlp.down_proj")


def test_fraction_below_and_the_rule():
    scores = jnp.asarray([[[0.9, 0.1, 0.2, 0.8]], [[0.0, 0.3, 0.1, 0.2]]])  # (B=2, T=1, F=4); t = 0.5 zeroes 6
    assert float(fraction_below(scores, 0.5)) == pytest.approx(6 / 8)
    assert float(fraction_below(scores, 0.5, jnp.asarray([1, 0]))) == pytest.approx(2 / 4)  # the padded row left out
    assert float(fraction_below(scores, 0.5, jnp.asarray([0, 1]))) == pytest.approx(1.0)
    a = jnp.arange(1, 101, dtype=jnp.float32).reshape(1, 1, 100) / 100  # 0.01 .. 1.00
    assert float(fraction_below(a, 0.2)) == pytest.approx(0.2)
    # z = 0.2; slope: 0.2 e^0.1 = 0.221 keeps 22 at or below it, 0.2 e^-0.1 = 0.181 keeps 18: (0.22 - 0.18) / 0.2
    new, z = tracked_threshold(0.2, a, 0.5, 0.5)
    assert float(z) == pytest.approx(0.2) and float(new) == pytest.approx(0.2 * np.exp(0.5 * 0.3 / 0.2), rel=1e-6)
    new, _ = tracked_threshold(0.2, a, 0.5, 1.0)
    assert float(new) == pytest.approx(0.2 * np.e, rel=1e-6)  # a step of 1.5 clipped to max_step = 1
    new, z = tracked_threshold(0.5, a, 0.5, 1.0)
    assert float(z) == pytest.approx(0.5) and float(new) == pytest.approx(0.5, rel=1e-6)  # at the level: no move


@pytest.fixture(scope="module")
def sparse_run(tmp_path_factory):
    """(cfg, sparse model with thresholds at 20% of its inputs, batch, trained result, workdir)."""
    cfg = tiny_config(steps=10, eval_every=10, checkpoint_every=10, **{"optimizer.lr": 1e-3})
    model = build_model(cfg.model.to_dict(), seed=cfg.seed)
    data = tiny_data(cfg)
    batch = next(iter(data.train_batches(0)))
    _, hidden = capture(model, [f"{p}.input" for p in DOWN], jnp.asarray(batch["inputs"]))
    at20 = {p: float(np.quantile(np.abs(np.asarray(hidden[f"{p}.input"])), 0.2)) for p in DOWN}
    sparse = sparsify_activations(model, at20)
    workdir = tmp_path_factory.mktemp("track")
    result = train(cfg, workdir, model=sparse, task=SparsityTrackingTask(level=0.5, rate=1.0), data=data, log=quiet)
    return cfg, sparse, at20, batch, result, workdir


def test_one_loss_call_moves_each_threshold_by_the_rule(sparse_run):
    cfg, sparse, at20, batch, _, _ = sparse_run
    task = SparsityTrackingTask(level=0.5, rate=0.7).setup(sparse, [])
    model = sparsify_activations(sparse, at20)  # a copy: the loss assigns the thresholds of the model it is given
    b = {k: jnp.asarray(v) for k, v in batch.items()}
    loss, metrics = task.loss(model, b, jnp.int32(1), None)
    plain, _ = NextTokenTask().loss(sparse, b, 1, None)
    assert float(loss) == pytest.approx(float(plain), rel=1e-6)  # computed with the thresholds it started with
    _, scores = capture(sparse, [f"{p}.score" for p in DOWN], b["inputs"])
    after = thresholds_of(model)
    z = {}
    for p in DOWN:  # the update by hand, in float64
        a, t = np.asarray(scores[f"{p}.score"], np.float64), np.float32(at20[p])
        z[p] = np.mean(a <= t)
        g = (np.mean(a <= np.float32(t * np.exp(0.1))) - np.mean(a <= np.float32(t * np.exp(-0.1)))) / 0.2
        assert after[p] == pytest.approx(t * np.exp(np.clip(0.7 * (0.5 - z[p]) / max(g, 0.05), -1, 1)), rel=1e-5)
    assert all(0.15 < v < 0.25 for v in z.values()), z  # calibrated for 20% on this batch
    assert float(metrics["sparsity"]) == pytest.approx(np.mean(list(z.values())), abs=1e-6)
    assert float(metrics["sparsity_spread"]) == pytest.approx(max(abs(v - 0.5) for v in z.values()), abs=1e-6)
    assert thresholds_of(sparse) == at20


def test_the_trainer_brings_the_sparsity_to_the_level(sparse_run):
    cfg, sparse, at20, batch, result, workdir = sparse_run
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    achieved = [r["sparsity"] for r in records]
    assert achieved[0] < 0.25 and all(abs(z - 0.5) < 0.03 for z in achieved[3:]), achieved  # 0.2, 0.39, 0.52, ...
    assert abs(records[-1]["val_sparsity"] - 0.5) < 0.05 and np.isfinite(records[-1]["val_loss"])
    info = json.loads((workdir / "run_info.json").read_text())
    assert info["task"] == "SparsityTrackingTask" and {f"{p}.threshold" for p in DOWN} <= set(info["other"])
    moved = thresholds_of(result.model)
    assert all(moved[p] > 1.5 * at20[p] for p in DOWN), (moved, at20)
    assert thresholds_of(sparse) == at20  # the model passed in is untouched
    ev = evaluate(result.model, [{k: jnp.asarray(v) for k, v in batch.items()}])
    assert all(abs(ev.sparsity()[p] - 0.5) < 0.06 for p in DOWN), ev.sparsity()
    assert thresholds_of(load_model(workdir / "best")) == pytest.approx(moved, rel=1e-6)  # checkpointed


def test_config_entry_wraps_any_kind_and_the_errors(sparse_run):
    _, sparse, _, _, _, _ = sparse_run
    task = task_from_config({"track_sparsity": 0.75})
    assert isinstance(task, SparsityTrackingTask) and task.level == 0.75 and task.rate == 1.0
    assert isinstance(task.inner, NextTokenTask)
    task = task_from_config({"kind": "distill", "teacher": "x", "track_sparsity": 0.6, "track_rate": 0.5})
    assert isinstance(task.inner, DistillTask) and (task.level, task.rate) == (0.6, 0.5)
    for spec, words in [({"track_rate": 0.5}, "needs task.track_sparsity"),
                        ({"kind": "moe", "track_sparsity": 0.5}, "kind 'moe'"),
                        ({"track_sparsity": 1.0}, "level=1.0"), ({"track_sparsity": 0.5, "track_rate": -1}, "rate")]:
        with pytest.raises(ConfigError, match=words):
            task_from_config(spec)
    with pytest.raises(ConfigError, match="cannot wrap a MoETask"):
        SparsityTrackingTask(inner=MoETask(), level=0.5)
    dense = build_model(tiny_config().model.to_dict(), seed=0)
    with pytest.raises(ConfigError, match="no activation-sparsity modules"):
        SparsityTrackingTask(level=0.5).setup(dense, [])
    with pytest.raises(ConfigError, match=r"select none.*layers\.0\.mlp\.down_proj"):
        SparsityTrackingTask(level=0.5, paths=("layers.*.self_attn.*",)).setup(sparse, [])
    with pytest.raises(ConfigError, match=r"layers\.1\.mlp\.down_proj'\] are <= 0"):
        SparsityTrackingTask(level=0.5).setup(sparsify_activations(sparse, {DOWN[1]: 0.0}), [])
    with pytest.raises(ConfigError, match="selects thresholds"):
        SparsityTrackingTask(level=0.5).setup(sparse, [f"{DOWN[0]}.threshold"])
