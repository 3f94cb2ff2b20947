"""The trainer on a tiny llama and a structured token stream: learning, resume, accumulation, frozen bricks,
non-finite stop, and sharded == unsharded losses on 8 fake CPU devices."""
import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configurable_fm.bricks import flat_params
from configurable_fm.train.data import TokenData
from configurable_fm.train.task import Task, next_token_loss
from configurable_fm.train.trainer import NonFiniteLoss, train
from experiments.pretrain import get_config

VOCAB = 64


def token_stream(n: int, seed: int) -> np.ndarray:
    """A learnable stream: mostly a fixed cycle over the vocabulary with 10% random tokens."""
    rng = np.random.default_rng(seed)
    cycle = rng.permutation(VOCAB)
    toks = cycle[np.arange(n) % VOCAB]
    noise = rng.random(n) < 0.1
    toks[noise] = rng.integers(0, VOCAB, noise.sum())
    return toks.astype(np.int32)


def tiny_config(**overrides):
    c = get_config("tiny")
    c.model.update(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                   num_kv_heads=2, max_position_embeddings=64)
    c.update(steps=20, batch_size=8, seq_len=16, log_every=1, eval_every=10, checkpoint_every=5, progress=False)
    c.optimizer.update(lr=1e-2, warmup_steps=2)
    c.mesh.shape = (1, 1, 1)
    c.checkpoint["async"] = False
    for key, value in overrides.items():
        target = c
        *parents, leaf = key.split(".")
        for p in parents:
            target = target[p]
        target[leaf] = value
    return c


def tiny_data(cfg, fail_at=None):
    data = TokenData(token_stream(4096, 0), token_stream(512, 1), cfg.seq_len, cfg.batch_size, cfg.seed,
                     eval_batch_size=cfg.batch_size, max_eval_batches=2)
    if fail_at is None:
        return data

    class Crashing(TokenData):
        def train_batches(self, *a, **k):
            it = TokenData.train_batches(self, *a, **k)

            class Wrapped:
                count = 0

                def __next__(w):
                    w.count += 1
                    if w.count == fail_at:
                        raise KeyboardInterrupt("simulated crash")
                    return next(it)

                get_state, set_state = it.get_state, it.set_state

            return Wrapped()

    return Crashing(**data.__dict__)


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
    cfg = tiny_config()
    workdir = tmp_path_factory.mktemp("ref")
    return cfg, workdir, train(cfg, workdir, data=tiny_data(cfg), log=lambda s: None)


@pytest.fixture(scope="module")
def short_run(tmp_path_factory):
    """5 steps without evaluation: the baseline for accumulation and sharding (same schedule length), and the run
    that test_resume_with_a_changed_config_is_refused_unless_allowed resumes (a copy of its workdir)."""
    cfg = tiny_config(steps=5, eval_every=0)
    return train(cfg, tmp_path_factory.mktemp("short"), data=tiny_data(cfg), log=lambda s: None)


def test_learns_and_writes_its_workdir(reference_run):
    cfg, workdir, result = reference_run
    losses = result.losses
    assert losses[20] < losses[1] - 1.0, losses  # 4.16 -> 2.56 measured
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 21))
    assert {"step", "loss", "tokens", "lr", "grad_norm", "tokens_per_s"} <= set(records[0])
    assert records[-1]["tokens"] == 20 * cfg.batch_size * cfg.seq_len
    assert "val_loss" in records[9] and "val_ppl" in records[9]
    for name in ("config.json", "run_info.json", "loss.png", "best/model_config.json"):
        assert (workdir / name).exists(), name
    assert json.loads((workdir / "config.json").read_text())["steps"] == 20
    assert sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()) == [15, 20]


@pytest.mark.slow  # CI time (~8 s); covered by test_non_param_variables_..._resume_bitwise in test_open_trainer.py
# (the same crash in a step, resumed in process, losses bitwise) and test_resume_kill.py (each step logged once)
def test_resume_after_crash_reproduces_losses_bitwise(reference_run, tmp_path):
    cfg, _, ref = reference_run
    with pytest.raises(KeyboardInterrupt):
        train(cfg, tmp_path, data=tiny_data(cfg, fail_at=13), log=lambda s: None)  # crashes in step 13
    assert (tmp_path / "checkpoints" / "10").exists()
    resumed = train(cfg, tmp_path, data=tiny_data(cfg), log=lambda s: None)
    assert min(resumed.losses) == 11
    for step in range(11, 21):
        assert resumed.losses[step] == ref.losses[step], step
    steps = [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 21))  # the crashed run's steps 11-12 were not duplicated


def test_gradient_accumulation_matches_full_batch(short_run, tmp_path):
    cfg = tiny_config(grad_accum_steps=4, steps=5, eval_every=0)
    acc = train(cfg, tmp_path, data=tiny_data(cfg), log=lambda s: None)
    for step in range(1, 6):
        assert acc.losses[step] == pytest.approx(short_run.losses[step], rel=1e-5, abs=1e-6), step


@pytest.mark.slow  # CI time (~2 s); covered by test_mlp_finetune_changes_only_mlp_bricks_... in test_finetune.py (a
# trainable glob: exactly its kernels change) and test_bad_options_... in test_open_trainer.py (the glob's error)
def test_only_selected_bricks_train(tmp_path):
    cfg = tiny_config(steps=3, eval_every=0, trainable=("layers.1.mlp.**",))
    from configurable_fm.models.factory import build_model

    before = flat_params(build_model(cfg.model.to_dict(), seed=cfg.seed))
    after = flat_params(train(cfg, tmp_path, data=tiny_data(cfg), log=lambda s: None).model)
    changed = sorted(k for k in before if not np.array_equal(np.asarray(before[k]), np.asarray(after[k])))
    assert changed == ["layers.1.mlp.down_proj.kernel", "layers.1.mlp.gate_proj.kernel", "layers.1.mlp.up_proj.kernel"]
    with pytest.raises(ValueError, match="trainable glob 'layers.9.\\*\\*' matches no parameter"):
        train(tiny_config(trainable=("layers.9.**",)), tmp_path / "bad", data=tiny_data(cfg), log=lambda s: None)


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    cfg = tiny_config(steps=20, eval_every=0, checkpoint_every=2)
    cfg.optimizer.update(lr=1e12, grad_clip=0.0, warmup_steps=1, schedule="constant")
    with pytest.raises(NonFiniteLoss, match=r"loss is (nan|inf) at step \d+; stopping. The last good checkpoint is"):
        train(cfg, tmp_path, data=tiny_data(cfg), log=lambda s: None)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert all(np.isfinite(r["loss"]) for r in records)


class NaNGradientAtStep3(Task):
    """next_token_loss's value at every step, with a NaN gradient at step 3 (0 * d sqrt(s)/ds at s = 0)."""

    def loss(self, model, batch, step, rng):
        loss, aux = next_token_loss(model, batch)
        at3 = (step == 3).astype(jnp.float32)
        return loss + 0.0 * jnp.sqrt(1.0 - at3 + 0.0 * jnp.sum(model(batch["inputs"][:1, :2]))), aux


def test_a_non_finite_gradient_with_a_finite_loss_is_not_checkpointed(tmp_path):
    """Step 3's loss is finite but its gradient NaN, so its update makes the parameters NaN: the run stops at step 3,
    before its checkpoint (the first, so none is left; it once saved step 3's NaN parameters and named them the
    last good checkpoint)."""
    cfg = tiny_config(steps=6, eval_every=0, checkpoint_every=3)
    with pytest.raises(NonFiniteLoss, match=r"gradient norm is nan \(loss [0-9.]+\) at step 3; stopping. The last good "
                                            r"checkpoint is None"):
        train(cfg, tmp_path, data=tiny_data(cfg), task=NaNGradientAtStep3(), log=lambda s: None)
    assert not (tmp_path / "checkpoints" / "3").exists()


# (1, 8, 1) and (2, 2, 2) are slow (18 and 9 s on 2 cores): in CI (8, 1, 1) shards the batch, and the run of
# test_checkpoint_written_on_8_devices_resumes_on_fewer FSDP 4 x tensor 2 (its losses against short_run's)
@pytest.mark.parametrize("shape", [pytest.param((1, 8, 1), marks=pytest.mark.slow),
                                   pytest.param((2, 2, 2), marks=pytest.mark.slow), (8, 1, 1)])
def test_sharded_losses_match_unsharded(short_run, tmp_path, shape):
    assert jax.device_count() == 8
    cfg = tiny_config(steps=5, eval_every=0, **{"mesh.shape": shape})
    sharded = train(cfg, tmp_path, data=tiny_data(cfg), log=lambda s: None)
    for step in range(1, 6):
        assert abs(sharded.losses[step] - short_run.losses[step]) <= 1e-5, (shape, step)


def test_resume_with_a_changed_config_is_refused_unless_allowed(short_run, tmp_path):
    shutil.copytree(short_run.workdir, tmp_path, dirs_exist_ok=True)  # finished at 5: cfg = tiny_config(steps=5, ...)
    longer = tiny_config(steps=8, eval_every=0)
    longer.optimizer.lr = 5e-3
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(ValueError, match=r"another config: optimizer.lr: 0.01 -> 0.005; steps: 5 -> 8\. .*"
                                         r"allow_changes=\('optimizer', 'steps'\)"):
        train(longer, tmp_path, data=tiny_data(longer), log=lambda s: None)
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing written
    assert json.loads((tmp_path / "config.json").read_text())["steps"] == 5
    with pytest.raises(ValueError, match=r"optimizer.lr: 0.01 -> 0.005"):  # allowing steps alone is not enough
        train(longer, tmp_path, data=tiny_data(longer), log=lambda s: None, allow_changes=("steps",))
    result = train(longer, tmp_path, data=tiny_data(longer), log=lambda s: None, allow_changes=("steps", "optimizer"))
    assert sorted(result.losses) == [6, 7, 8]
    assert json.loads((tmp_path / "config.json").read_text())["steps"] == 8  # the config in force
    resumes = [json.loads(line) for line in (tmp_path / "resumes.jsonl").read_text().splitlines()]
    assert len(resumes) == 1 and resumes[0]["step"] == 5
    assert resumes[0]["changes"] == {"optimizer.lr": {"before": 0.01, "after": 0.005},
                                     "steps": {"before": 5, "after": 8}}


@pytest.mark.parametrize("resume_shape", [pytest.param((1, 1, 1), marks=pytest.mark.slow), (1, 4, 1)])
def test_checkpoint_written_on_8_devices_resumes_on_fewer(short_run, tmp_path, resume_shape):
    """A run sharded over 8 devices (FSDP 4 x tensor 2) logs the losses of an unsharded run, is checkpointed at
    step 2 and crashes in step 4; it resumes on one device or on 4 (orbax reshards every array to the new mesh:
    `restore_checkpoint` restores with the new run's shardings), with `mesh` allowed to change, and continues with
    the losses of an unsharded run."""
    assert jax.device_count() == 8
    cfg = tiny_config(steps=5, eval_every=0, checkpoint_every=2, **{"mesh.shape": (1, 4, 2)})
    with pytest.raises(KeyboardInterrupt):
        train(cfg, tmp_path, data=tiny_data(cfg, fail_at=4), log=lambda s: None)
    assert (tmp_path / "checkpoints" / "2").exists()
    sharded = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in sharded] == [1, 2, 3]  # logged before the crash
    for r in sharded:
        assert abs(r["loss"] - short_run.losses[r["step"]]) <= 1e-5, r
    fewer = tiny_config(steps=5, eval_every=0, checkpoint_every=2, **{"mesh.shape": resume_shape})
    with pytest.raises(ValueError, match=r"mesh.shape"):  # a changed mesh is a config change like any other
        train(fewer, tmp_path, data=tiny_data(fewer), log=lambda s: None)
    resumed = train(fewer, tmp_path, data=tiny_data(fewer), log=lambda s: None, allow_changes=("mesh",))
    assert min(resumed.losses) == 3
    devices = {d for leaf in jax.tree.leaves(nnx_state(resumed.model)) for d in leaf.sharding.device_set}
    assert len(devices) == int(np.prod(resume_shape))
    for step in range(3, 6):
        assert abs(resumed.losses[step] - short_run.losses[step]) <= 1e-5, (resume_shape, step)


def nnx_state(model):
    from flax import nnx

    return nnx.state(model, nnx.Param)


def test_mfu_divides_by_the_devices_of_the_mesh(tmp_path, monkeypatch):
    """A run on a mesh of 1 of the 8 devices: MFU = tokens/s x FLOPs per token / (1 x peak), not / 8 (it once
    divided by jax.device_count()). The peak is faked: the CPU has none."""
    from configurable_fm.models.factory import build_model
    from configurable_fm.train import flops

    assert jax.device_count() == 8
    monkeypatch.setattr(flops, "matmul_peak_dtype", lambda dtype, device=None: "bfloat16")
    monkeypatch.setattr(flops, "peak_flops_per_device", lambda device=None, dtype="bfloat16": 1e9)
    cfg = tiny_config(steps=3, eval_every=0)
    train(cfg, tmp_path, data=tiny_data(cfg), log=lambda s: None)
    fpt = flops.flops_per_token(build_model(cfg.model.to_dict()).cfg, cfg.seq_len)
    for r in [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]:
        assert r["mfu"] == pytest.approx(r["tokens_per_s"] * fpt / 1e9, rel=1e-9), r


def test_evaluation_without_any_batch_is_refused(tmp_path):
    """A validation stream shorter than one window (or max_eval_batches=0) gives no evaluation batch: the run once
    logged val_loss 0.0 (val_ppl 1.0) and saved that model as best/; now a ConfigError before the workdir exists."""
    from configurable_fm.errors import ConfigError

    cfg = tiny_config(steps=3, eval_every=2)
    short = TokenData(token_stream(4096, 0), token_stream(cfg.seq_len, 1), cfg.seq_len, cfg.batch_size, cfg.seed,
                      eval_batch_size=cfg.batch_size)
    with pytest.raises(ConfigError, match=r"eval_every=2 but the evaluation data has no batch"):
        train(cfg, tmp_path / "run", data=short, log=lambda s: None)
    assert not (tmp_path / "run").exists()
