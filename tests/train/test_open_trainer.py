"""The open trainer: a model passed in, custom tasks (step and rng reach them; an L2-anchored task trains),
variables other than parameters (trained by type, or carried and assigned by the task) that resume bitwise,
LoRA-style Param subclasses as the only trainable state, one compilation of the step, and config errors raised
before the workdir exists."""
import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configurable_fm.bricks import flat_params, tree_at
from configurable_fm.models.factory import build_model
from configurable_fm.models.factory import with_compute_dtype
from configurable_fm.models.structure import rebuild
from configurable_fm.train.state import ModelParts, variable_values
from configurable_fm.train.task import AnchoredTask, NextTokenTask
from configurable_fm.train.trainer import ConfigError, train
from tests.helpers import compiles
from tests.train.test_train_cli import PRETRAIN
from tests.train.test_trainer import tiny_config, tiny_data

try:  # modules that no config builds declare themselves (models/structure.py), so that best/ can be saved
    from configurable_fm.models.structure import register_extension
except ImportError:  # an older tree without the structure checks
    register_extension = None

quiet = lambda s: None


def records(workdir):
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


# ------------------------------------------------------------------------------------------ test modules
class Scale(nnx.Variable):
    """A per-channel output scale that is not a parameter (selected as trainable by type)."""


class Ramp(nnx.Variable):
    """A mask ramp in [0, 1] that is not a parameter: carried, and set by the task from the step."""


class RampedLinear(nnx.Module):
    """y = lin(x) * (1 + ramp * (scale - 1)): the Linear's output, scaled once the ramp is up."""

    def __init__(self, lin):
        self.lin = lin
        self.scale = Scale(jnp.ones((lin.kernel.shape[1],), jnp.float32))
        self.ramp = Ramp(jnp.zeros((), jnp.float32))

    def __call__(self, x):
        return self.lin(x) * (1.0 + self.ramp[...] * (self.scale[...] - 1.0))

    def structure_spec(self):
        return {"kind": "test_ramped_linear", "options": {}}

    def structure_base(self):
        return self.lin


class RampTask(NextTokenTask):
    """Next-token NLL; first sets every Ramp to min(step / ramp_steps, 1)."""

    ramp_steps = 4

    def loss(self, model, batch, step, rng):
        for _, module in nnx.iter_modules(model):
            if isinstance(module, RampedLinear):
                module.ramp[...] = jnp.minimum(step.astype(jnp.float32) / self.ramp_steps, 1.0)
        return super().loss(model, batch, step, rng)


class LoRAParam(nnx.Param):
    """A low-rank factor: a parameter subclass, selected with 'LoRAParam:**'."""


class LoRALinear(nnx.Module):
    def __init__(self, lin, rank: int = 2):
        d_in, d_out = lin.kernel.shape
        self.lin = lin
        self.a = LoRAParam(0.1 * jax.random.normal(jax.random.key(1), (d_in, rank)))
        self.b = LoRAParam(jnp.zeros((rank, d_out)))

    def __call__(self, x):
        return self.lin(x) + x @ self.a[...] @ self.b[...]

    def structure_spec(self):
        return {"kind": "test_lora_linear", "options": {"rank": self.a.shape[1]}}

    def structure_base(self):
        return self.lin


if register_extension is not None:
    register_extension("test_ramped_linear", lambda base, options, *, rngs: RampedLinear(base), replace=True)
    register_extension("test_lora_linear", lambda base, options, *, rngs: LoRALinear(base, **options), replace=True)


class ProbeTask(NextTokenTask):
    """Next-token NLL that reports the step it was given and a uniform draw from its rng."""

    def loss(self, model, batch, step, rng):
        loss, metrics = super().loss(model, batch, step, rng)
        return loss, {**metrics, "step_seen": step.astype(jnp.float32), "u": jax.random.uniform(rng)}


def ramped_model(cfg):
    base = build_model(cfg.model.to_dict(), seed=cfg.seed)
    return tree_at(base, "layers.1.mlp.down_proj", RampedLinear(base.layers[1].mlp.down_proj))


def key_of(seed, step, micro):
    return jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), step), micro)


# ------------------------------------------------------------------------------------------ tests
@pytest.fixture(scope="module")
def probe_run(tmp_path_factory):
    """(config, result, workdir, compilations of the step) of 6 steps of ProbeTask with evaluations at 3 and 6 and
    checkpoints every 2. Its updates are next-token NLL's (the metrics it adds leave them alone): it is also the
    plain run that test_anchored_task_trains_and_stays_closer_to_the_start compares with."""
    cfg = tiny_config(steps=6, eval_every=3, checkpoint_every=2)
    workdir = tmp_path_factory.mktemp("probe")
    with compiles() as c:
        result = train(cfg, workdir, task=ProbeTask(), data=tiny_data(cfg), log=quiet)
    return cfg, result, workdir, c.count


def test_task_gets_the_step_and_its_rng_and_the_step_compiles_once(probe_run, tmp_path):
    cfg, result, workdir, count = probe_run
    assert count == 1  # steps with evaluation and checkpoints reuse the one executable
    recs = records(workdir)
    assert [r["step"] for r in recs] == list(range(1, 7))
    for r in recs:
        assert r["step_seen"] == r["step"]
        assert r["u"] == float(jax.random.uniform(key_of(cfg.seed, r["step"], 0)))
        assert "weight" not in r
    assert "val_loss" in recs[2] and result.losses[6] == recs[-1]["loss"]

    # Two micro-batches: the metrics are averaged with the weights (here equal: 64 tokens each).
    cfg2 = tiny_config(steps=3, eval_every=0, grad_accum_steps=2)
    train(cfg2, tmp_path / "a2", task=ProbeTask(), data=tiny_data(cfg2), log=quiet)
    for r in records(tmp_path / "a2"):
        u0, u1 = (jax.random.uniform(key_of(cfg2.seed, r["step"], a)) for a in (0, 1))
        assert r["u"] == pytest.approx(float((u0 + u1) / 2), rel=1e-6)


def test_anchored_task_trains_and_stays_closer_to_the_start(probe_run, tmp_path):
    _, plain, _, _ = probe_run  # 6 steps of next-token NLL from the same start
    cfg = tiny_config(steps=6, eval_every=6)
    start = flat_params(build_model(cfg.model.to_dict(), seed=cfg.seed))
    strength = 0.5
    anchored = train(cfg, tmp_path / "anchored", task=AnchoredTask(strength=strength), data=tiny_data(cfg),
                     log=quiet)

    def distance(model):
        return sum(float(np.sum((np.asarray(v) - np.asarray(start[k])) ** 2)) for k, v in flat_params(model).items())

    assert distance(anchored.model) < 0.5 * distance(plain.model)
    recs = records(tmp_path / "anchored")
    assert recs[-1]["nll"] < recs[0]["nll"] - 0.1  # it learns
    for r in recs:  # the logged objective is NLL + strength * squared distance to the start
        assert r["loss"] == pytest.approx(r["nll"] + strength * r["sq_distance"], rel=1e-5)
    assert recs[0]["sq_distance"] == 0.0  # step 1 is taken from the start
    assert "val_loss" in recs[-1] and "val_nll" not in recs[-1]  # evaluation: the NLL alone


def test_non_param_variables_train_by_type_are_carried_and_resume_bitwise(tmp_path):
    cfg = tiny_config(steps=10, eval_every=0, checkpoint_every=5, trainable=("**", "Scale:**"))  # no evaluation step
    # to compile in each of the three runs (test_ramp evaluates and saves best/ with carried variables)
    model = ramped_model(cfg)
    before = {k: np.array(v) for k, v in variable_values(model).items()}
    ref = train(cfg, tmp_path / "ref", model=model, task=RampTask(), data=tiny_data(cfg), log=quiet)

    # The caller's model is untouched (the trainer copies what it donates) ...
    assert all(np.array_equal(np.asarray(v), before[k]) for k, v in variable_values(model).items())
    # ... the trained scale moved; the carried ramp holds what the task set at the last step.
    after = variable_values(ref.model)
    assert not np.array_equal(np.asarray(after["layers.1.mlp.down_proj.scale"]), before["layers.1.mlp.down_proj.scale"])
    assert float(after["layers.1.mlp.down_proj.ramp"]) == 1.0
    assert isinstance(ref.model.layers[1].mlp.down_proj.ramp, Ramp)
    info = json.loads((tmp_path / "ref" / "run_info.json").read_text())
    assert info["other"] == ["layers.1.mlp.down_proj.ramp"]
    assert "layers.1.mlp.down_proj.scale" in info["trainable"] and info["initial_model"] == "model argument"
    assert (tmp_path / "ref" / "checkpoints" / "10" / "other").is_dir()

    # Crash in step 8, resume from checkpoint 5: the same losses and final variables, bitwise, one compilation.
    with pytest.raises(KeyboardInterrupt):
        train(cfg, tmp_path / "run", model=model, task=RampTask(), data=tiny_data(cfg, fail_at=8), log=quiet)
    with compiles() as c:
        resumed = train(cfg, tmp_path / "run", model=model, task=RampTask(), data=tiny_data(cfg), log=quiet)
    assert c.count == 1
    assert min(resumed.losses) == 6
    assert all(resumed.losses[s] == ref.losses[s] for s in range(6, 11))
    final = variable_values(resumed.model)
    assert all(np.array_equal(np.asarray(final[k]), np.asarray(after[k])) for k in after)

    # A resume that selects other partitions is refused, naming the difference.
    other = cfg.copy_and_resolve_references()
    other.trainable = ("**",)
    with pytest.raises(ConfigError, match=r"another config: trainable: .* allow_changes=\('trainable',\)"):
        train(other, tmp_path / "run", model=model, task=RampTask(), data=tiny_data(cfg), log=quiet)
    with pytest.raises(ConfigError, match=r"holds other partitions .*layers.1.mlp.down_proj.scale"):
        train(other, tmp_path / "run", model=model, task=RampTask(), data=tiny_data(cfg), log=quiet,
              allow_changes=("trainable",))


def test_lora_factors_as_the_only_trainable_state(tmp_path):
    cfg = tiny_config(steps=4, eval_every=0, trainable=("LoRAParam:**",))
    base = build_model(cfg.model.to_dict(), seed=cfg.seed)
    model = tree_at(base, "layers.0.self_attn.q_proj", LoRALinear(base.layers[0].self_attn.q_proj))
    parts = ModelParts.of(model, cfg.trainable)
    lora = ["layers.0.self_attn.q_proj.a", "layers.0.self_attn.q_proj.b"]
    assert list(parts.trainable) == lora and not parts.other
    assert len(parts.frozen) == len(flat_params(base))

    result = train(cfg, tmp_path / "lora", model=model, data=tiny_data(cfg), log=quiet)
    old, new = variable_values(model), variable_values(result.model)
    changed = sorted(k for k in old if not np.array_equal(np.asarray(old[k]), np.asarray(new[k])))
    assert changed == lora
    assert json.loads((tmp_path / "lora" / "run_info.json").read_text())["trainable"] == lora
    assert result.losses[4] < result.losses[1]

    with pytest.raises(ValueError, match=r"trainable entry 'Nope:\*\*': the model has no variable of type Nope; "
                                         r"its variable types: \['LoRAParam', 'Param'\]"):
        train(tiny_config(trainable=("Nope:**",)), tmp_path / "bad", model=model, data=tiny_data(cfg), log=quiet)
    with pytest.raises(ValueError, match=r"trainable glob 'LoRAParam:layers.9.\*\*' matches no LoRAParam variable"):
        train(tiny_config(trainable=("LoRAParam:layers.9.**",)), tmp_path / "bad", model=model,
              data=tiny_data(cfg), log=quiet)
    assert not (tmp_path / "bad").exists()


def test_with_compute_dtype_equals_a_rebuild_and_keeps_surgery():
    cfg = tiny_config()
    model = build_model(cfg.model.to_dict(), seed=0)
    ids = jnp.asarray(np.random.default_rng(0).integers(0, 64, (2, 8)), jnp.int32)
    forward = nnx.jit(lambda m: m(ids))  # compiled per model structure: not four eager forwards (~2.5 s)
    for dtype in (jnp.bfloat16, jnp.float32):
        a, b = forward(with_compute_dtype(model, dtype)), forward(rebuild(model, {}, options={"dtype": dtype}))
        assert a.dtype == b.dtype and np.array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))
    assert model.layers[0].mlp.up_proj.dtype is None  # the input is not modified
    ramped = with_compute_dtype(ramped_model(cfg), jnp.bfloat16, remat="dots")
    assert isinstance(ramped.layers[1].mlp.down_proj, RampedLinear) and ramped.remat == "dots"
    assert ramped.layers[1].mlp.down_proj.lin.dtype == jnp.bfloat16
    assert ramped.layers[1].mlp.down_proj.lin.kernel[...].dtype == jnp.float32


@pytest.mark.parametrize("key, value, message", [
    ("compute_dtype", "fp32", "compute_dtype='fp32' is not one of ['bfloat16', 'float16', 'float32']"),
    ("remat", "some", "remat='some' is not one of ['dots', 'full', 'none']"),
    ("optimizer.schedule", "linear", "optimizer.schedule='linear' is not one of ['constant', 'cosine', 'wsd']"),
    ("grad_accum_steps", 3, "batch_size=8 must be divisible by grad_accum_steps=3 x processes=1"),
    # these once divided by zero in the loop, plotted an empty run, or were taken silently, after writing the workdir
    ("log_every", 0, "log_every=0 must be an int >= 1"),
    ("checkpoint_every", 0, "checkpoint_every=0 must be an int >= 1"),
    ("steps", 0, "steps=0 must be an int >= 1"),
    ("eval_every", -1, "eval_every=-1 must be an int >= 0"),
    ("optimizer.warmup_steps", -3, "optimizer.warmup_steps=-3 must be an int >= 0"),
    ("optimizer.grad_clip", -1.0, "optimizer.grad_clip=-1.0 must be a number >= 0"),
    # these were plain ValueErrors (a traceback from cfm-train), not ConfigErrors
    ("optimizer.warmup_steps", 20, "optimizer.warmup_steps=20 must be smaller than steps=20"),
    ("optimizer.name", "sgd", "optimizer.name='sgd' is unknown"),
    ("trainable", ("layers.9.**",), "trainable glob 'layers.9.**' matches no parameter"),
])
def test_bad_options_are_named_before_the_workdir_is_made(tmp_path, key, value, message):
    cfg = tiny_config(**{key: value})
    with pytest.raises(ConfigError, match=re.escape(message)):
        train(cfg, tmp_path / "run", data=tiny_data(tiny_config()), log=quiet)
    assert not (tmp_path / "run").exists()


def test_model_and_init_from_together_are_refused(tmp_path):
    cfg = tiny_config(init_from="smollm2-135m-instruct")
    with pytest.raises(ConfigError, match="both a model argument and config.init_from='smollm2-135m-instruct'"):
        train(cfg, tmp_path / "run", model=build_model(cfg.model.to_dict()), data=tiny_data(cfg), log=quiet)
    assert not (tmp_path / "run").exists()


def test_bad_compute_dtype_on_the_command_line(tmp_path, capsys):
    """cfm-train's main, in this process (~3 s less than a subprocess; test_train_cli runs scripts/train.py itself):
    the ConfigError is one line on stderr, no traceback, and nothing is written."""
    from configurable_fm.cli.train import main

    with pytest.raises(SystemExit) as e:
        main(["--config", f"{PRETRAIN}:tiny", "--workdir", str(tmp_path / "run"), "--config.compute_dtype=fp32"])
    err = capsys.readouterr().err
    assert e.value.code == 1
    assert err == "cfm-train: error: compute_dtype='fp32' is not one of ['bfloat16', 'float16', 'float32']\n", err
    assert not (tmp_path / "run").exists()


class MeanSquareTask(NextTokenTask):
    """The mean square of the model's output (any model mapping ids to an array: no vocabulary needed)."""

    def loss(self, model, batch, step, rng):
        out = model(batch["inputs"])
        return jnp.mean(jnp.square(out.astype(jnp.float32))), {}

    def eval_loss(self, model, batch, step):
        return self.loss(model, batch, step, None)


class Toy(nnx.Module):
    """Any model: an embedding and a Linear, with a `cfg` attribute that is not a model family's config."""

    def __init__(self):
        self.cfg = {"width": 8}
        self.embed = nnx.Embed(64, 8, rngs=nnx.Rngs(0))
        self.out = nnx.Linear(8, 8, rngs=nnx.Rngs(1))

    def __call__(self, ids):
        return self.out(self.embed(ids))


@pytest.mark.parametrize("kind", ["bert", "toy"])
def test_models_without_a_flop_count_train(tmp_path, kind):
    """A BERT (a family without a FLOP count) or a model whose `cfg` is no model config trains, with MFU unknown;
    both once raised a TypeError after the workdir was written (flops_per_token, run_info's config_to_dict)."""
    from configurable_fm.models.bert import Bert, BertConfig

    model = Bert(BertConfig(vocab_size=64, hidden_size=16, num_layers=1, num_heads=2, intermediate_size=32),
                 rngs=nnx.Rngs(0)) if kind == "bert" else Toy()
    cfg = tiny_config(steps=3, eval_every=0)
    result = train(cfg, tmp_path, model=model, task=MeanSquareTask(), data=tiny_data(cfg), log=quiet)
    assert sorted(result.losses) == [1, 2, 3] and "mfu" not in records(tmp_path)[-1]
    model_info = json.loads((tmp_path / "run_info.json").read_text())["model"]
    assert (model_info["family"] == "bert") if kind == "bert" else model_info is None
