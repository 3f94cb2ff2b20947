"""Growing a training run mid-way (train/growth.py) and continuing it, and the re-warmed schedule (train/optim.py):
a small run of 6 steps grown (exact width, optimizer copied, re-warm) continues at step 7 with the loss the small
model has on the same batch, keeps learning, and a rerun resumes instead of regrowing; a grow killed mid-way
leaves nothing and completes when rerun; the checkpoint's optimizer state is copied or reset as asked."""
import json

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from flax import nnx

from configurable_fm.errors import ConfigError
from configurable_fm.train import growth as growth_mod
from configurable_fm.train.growth import grow_run
from configurable_fm.train.optim import learning_rate_schedule
from configurable_fm.train.task import loss_sums
from configurable_fm.train.trainer import restore_checkpoint, set_up, train
from tests.train.test_trainer import tiny_config, tiny_data

WIDE = [("width", dict(hidden_size=48, num_heads=6, num_kv_heads=3, intermediate_size=96))]
quiet = lambda s: None


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """(directory, the loss of step 7 had the run gone on): a 6-step run of the tiny llama (hidden 32) with its
    checkpoint at 6, and its model's loss on the batch of step 7."""
    root = tmp_path_factory.mktemp("growth")
    cfg = tiny_config(steps=6, eval_every=0, checkpoint_every=3)
    model = train(cfg, root / "small", data=tiny_data(cfg), log=quiet).model
    batches = tiny_data(cfg).train_batches(0, 1)
    for _ in range(7):
        batch = next(batches)
    total, weight = nnx.jit(loss_sums)(model, {k: jnp.asarray(v) for k, v in batch.items()})  # compiled: ~1 s less
    return root, float(total / weight)


def big_config(steps=12):
    return tiny_config(steps=steps, eval_every=0, checkpoint_every=6)


def test_grown_run_continues_the_run(small):
    root, loss_7 = small
    cfg = big_config()
    run = grow_run(root / "small", root / "big", cfg, WIDE, optimizer="copy", rewarm_steps=2, log=quiet)
    assert (run.status, run.step) == ("grown", 6)
    assert run.config.model.hidden_size == 48 and run.config.optimizer.rewarm_at == 6
    result = train(run.config, root / "big", data=tiny_data(cfg), log=quiet)
    losses = result.losses
    assert sorted(losses) == list(range(7, 13))
    assert all(np.isfinite(v) for v in losses.values())
    assert abs(losses[7] - loss_7) <= 1e-5  # function-preserving: the small model's loss on the same batch
    assert np.mean([losses[11], losses[12]]) < losses[7] - 0.05, losses
    records = [json.loads(line) for line in (root / "big" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 13))  # the source's steps 1-6, then the grown run's
    assert records[6]["lr"] == 0.0 and records[8]["lr"] == pytest.approx(cfg.optimizer.lr)  # re-warmed to the peak
    assert json.loads((root / "big" / "config.json").read_text())["init_from"] == str((root / "big" / "grown"))

    again = grow_run(root / "small", root / "big", cfg, WIDE, optimizer="copy", rewarm_steps=2, log=quiet)
    assert again.status == "existing" and again.config.to_dict() == run.config.to_dict()
    assert train(again.config, root / "big", data=tiny_data(cfg), log=quiet).losses == {}  # resumed at 12: done
    with pytest.raises(ConfigError, match="optimizer"):
        grow_run(root / "small", root / "big", cfg, WIDE, optimizer="reset", rewarm_steps=2, log=quiet)
    with pytest.raises(ConfigError, match="not a grown run"):
        grow_run(root / "big", root / "small", cfg, WIDE, log=quiet)


def opt_state_of(run, cfg):
    setup = set_up(run.config, data=tiny_data(cfg))
    manager = ocp.CheckpointManager((run.workdir / "checkpoints").absolute(),
                                    options=ocp.CheckpointManagerOptions(read_only=True))
    try:
        state, _, meta = restore_checkpoint(manager, run.step, setup.state, setup.mesh)
    finally:
        manager.close()
    is_adam = lambda x: isinstance(x, (optax.ScaleByAdamState, optax.ScaleByScheduleState))
    found = [x for x in jax.tree.leaves(state.opt_state, is_leaf=is_adam) if is_adam(x)]
    return found, meta


def test_killed_grow_leaves_nothing_then_reset_completes(small, monkeypatch):
    """A grow that dies after writing the grown model and the checkpoint (in its temporary) leaves no dst and no
    temporary; the rerun completes. optimizer='reset': zero moments, Adam's count 0, the schedule's count kept."""
    root, _ = small
    cfg = big_config(10)
    dst = root / "reset"

    def boom(*a, **k):
        raise RuntimeError("killed mid-grow")

    monkeypatch.setattr(growth_mod, "_copy_metrics", boom)
    with pytest.raises(RuntimeError, match="killed"):
        grow_run(root / "small", dst, cfg, WIDE, optimizer="reset", log=quiet)
    assert not dst.exists() and not [p for p in root.iterdir() if p.name.startswith(".reset")]
    monkeypatch.undo()
    run = grow_run(root / "small", dst, cfg, WIDE, optimizer="reset", log=quiet)
    assert run.status == "grown" and "rewarm_at" not in run.config.optimizer
    (adam, sched), meta = opt_state_of(run, cfg)
    assert (int(adam.count), int(sched.count), meta["step"]) == (0, 6, 6)
    assert not any(np.asarray(v).any() for v in adam.mu.values())

    copied = grow_run(root / "small", root / "copied", cfg, WIDE, log=quiet)
    (adam, sched), _ = opt_state_of(copied, cfg)
    assert (int(adam.count), int(sched.count)) == (6, 6)
    mu = np.asarray(adam.mu["layers.0.mlp.up_proj.kernel"])
    assert mu[:32, :64].any() and not mu[32:].any() and not mu[:, 64:].any()


def test_wsd_schedule_by_hand_and_its_decay_ends_at_the_last_step():
    """wsd: warmup to the peak, constant, then linear to the floor over the last decay_fraction of the steps; where
    warmup and decay overlap (W + decay_fraction S > S) the decay takes the steps after the warmup, so the floor is
    still reached at S (it once ended at 0.595 x peak for W 90, fraction 0.2, S 100)."""
    opt = ml_collections.ConfigDict(dict(lr=1.0, schedule="wsd", warmup_steps=10, min_lr_ratio=0.1,
                                         decay_fraction=0.2))
    sched = learning_rate_schedule(opt, 100)
    assert [float(sched(s)) for s in (0, 5, 10, 50, 80, 90, 100)] == pytest.approx([0, .5, 1, 1, 1, .55, .1])
    opt.warmup_steps = 90
    late = learning_rate_schedule(opt, 100)
    assert [float(late(s)) for s in (90, 95, 100)] == pytest.approx([1.0, .55, .1])


def test_rewarm_schedule():
    opt = ml_collections.ConfigDict(dict(lr=1.0, schedule="cosine", warmup_steps=2, min_lr_ratio=0.1))
    base = learning_rate_schedule(opt, 20)
    opt.rewarm_at, opt.rewarm_steps = 8, 4
    sched = learning_rate_schedule(opt, 20)
    assert [float(sched(s)) for s in range(8)] == [float(base(s)) for s in range(8)]
    assert [float(sched(s)) for s in (8, 10, 12)] == pytest.approx([0.0, 0.5, 1.0])
    assert float(sched(20)) == pytest.approx(0.1) and float(sched(16)) < 1.0
    opt.rewarm_steps = 0
    assert float(learning_rate_schedule(opt, 20)(8)) == pytest.approx(1.0)  # MSG: rewind to the peak
    for at, steps, match in ((20, 0, "rewarm_at"), (8, 12, "rewarm_steps")):
        opt.rewarm_at, opt.rewarm_steps = at, steps
        with pytest.raises(ValueError, match=match):
            learning_rate_schedule(opt, 20)


def test_a_run_with_an_adapter_or_a_frozen_dtype_is_refused(small):
    """(its checkpoint holds adapter leaves, or its frozen parameters were cast: the source model rebuilt from
    the config alone would not be the run's; refused before anything is read or written)"""
    from configurable_fm.train.adapters import adapter_config

    root, _ = small
    src = ml_collections.ConfigDict(json.loads((root / "small" / "config.json").read_text()))
    with_adapter, frozen = src.copy_and_resolve_references(), src.copy_and_resolve_references()
    with_adapter.adapter = adapter_config("lora")
    frozen.frozen_dtype = "bfloat16"
    for config, what in ((with_adapter, "trains a lora adapter"), (frozen, "frozen_dtype='bfloat16'")):
        with pytest.raises(ConfigError, match=f"grow_run: the source run .* {what}.*not implemented"):
            grow_run(root / "small", root / "refused", big_config(), WIDE, src_config=config, log=quiet)
        assert not (root / "refused").exists()
