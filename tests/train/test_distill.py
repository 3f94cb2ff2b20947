"""Knowledge distillation (train/distill.py): the KL term against a hand computation, the loss's mix of NLL and KL,
a student distilled through the trainer towards its teacher (the KL falls, the teacher is never trained), the
config entry and its errors."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configurable_fm.bricks.paths import flat_params, with_params
from configurable_fm.errors import ConfigError
from configurable_fm.interop.orbax_io import save_model
from configurable_fm.models.llama import LlamaConfig
from configurable_fm.models.scoring import logits
from configurable_fm.train.data import TokenData
from configurable_fm.train.distill import DistillTask, distill_kl
from configurable_fm.train.ramp import task_from_config
from configurable_fm.train.trainer import train
from experiments import pretrain
from tests.helpers import random_llama

CFG = LlamaConfig(vocab_size=32, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                  max_position_embeddings=64)
SEQ = 16


def stream_data(batch=4) -> TokenData:
    tokens = np.tile(np.asarray([3, 9, 4, 17, 4, 25, 11, 30, 2], np.int32), 300)
    return TokenData(tokens, tokens[:200], SEQ, batch, 0, batch, max_eval_batches=1, manifest={"kind": "periodic"})


def batch():
    rows = np.stack([np.random.RandomState(i).randint(0, 32, SEQ + 1) for i in range(3)]).astype(np.int32)
    return {"inputs": jnp.asarray(rows[:, :-1]), "targets": jnp.asarray(rows[:, 1:]),
            "loss_mask": jnp.asarray(np.random.RandomState(9).rand(3, SEQ) > 0.3)}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """(teacher, its orbax path, student): the student is the teacher with every kernel perturbed."""
    teacher = random_llama(CFG, 0)
    rs = np.random.RandomState(1)
    student = with_params(teacher, {k: v + (0.02 * rs.normal(size=v.shape) if k.endswith("kernel") else 0)
                                     for k, v in flat_params(teacher).items()})
    return teacher, save_model(teacher, tmp_path_factory.mktemp("teacher") / "ckpt"), student


def test_kl_by_hand():
    rs = np.random.RandomState(0)
    s, t = rs.normal(size=(2, 3, 7)), rs.normal(size=(2, 3, 7))
    for tau in (1.0, 2.0):
        q = np.exp(t / tau) / np.exp(t / tau).sum(-1, keepdims=True)
        p = np.exp(s / tau) / np.exp(s / tau).sum(-1, keepdims=True)
        want = tau ** 2 * (q * (np.log(q) - np.log(p))).sum(-1)
        np.testing.assert_allclose(np.asarray(distill_kl(jnp.asarray(s), jnp.asarray(t), tau)), want, rtol=1e-5,
                                   atol=1e-6)
    assert float(jnp.abs(distill_kl(jnp.asarray(s), jnp.asarray(s), 1.0)).max()) < 1e-6


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def test_loss_mixes_nll_and_kl_over_the_scored_tokens(models):
    """The task's loss, nll and kd against references from the two models' logits (the NLL in numpy, float64; the
    KL by distill_kl, checked by hand above); the task's methods run compiled (nnx.jit), as in the trainer: a few
    compilations instead of the eager ops of five forwards and the losses (~5 s -> ~2.5 s)."""
    teacher, path, student = models
    b = batch()
    w = np.asarray(b["loss_mask"], np.float64)
    s_logits, t_logits = logits(student, b["inputs"]), logits(teacher, b["inputs"])  # one structure: one program
    log_p = log_softmax(np.asarray(s_logits, np.float64))
    nll = float((-np.take_along_axis(log_p, np.asarray(b["targets"])[..., None], -1)[..., 0] * w).sum() / w.sum())
    kd = float((np.asarray(distill_kl(s_logits, t_logits, 2.0)) * w).sum() / w.sum())
    task_loss = nnx.jit(lambda task, m, b: task.loss(m, b, jnp.int32(1), jax.random.key(0)))
    task = DistillTask(teacher=str(path), alpha=0.25, temperature=2.0).setup(student, [])
    loss, metrics = task_loss(task, student, b)
    np.testing.assert_allclose(float(metrics["nll"]), nll, rtol=1e-5)
    np.testing.assert_allclose(float(metrics["kd"]), kd, rtol=1e-5)
    np.testing.assert_allclose(float(loss), 0.75 * nll + 0.25 * kd, rtol=1e-5)
    assert float(metrics["weight"]) == w.sum()
    same = DistillTask(teacher=str(path)).setup(teacher, [])  # the teacher distilled into itself: KL 0
    assert abs(float(task_loss(same, teacher, b)[1]["kd"])) < 1e-6
    eval_loss = nnx.jit(lambda task, m, b: task.eval_loss(m, b, jnp.int32(1)))
    np.testing.assert_allclose(float(eval_loss(task, student, b)[0]), nll, rtol=1e-6)


def test_trainer_distils_the_student_towards_its_teacher(models, tmp_path):
    teacher, path, student = models
    cfg = pretrain.get_config("tiny")
    cfg.update(dict(init_from="", steps=10, log_every=10, eval_every=0, checkpoint_every=10, batch_size=4,
                    seq_len=SEQ, compute_dtype="float32", progress=False, trainable=("layers.*.mlp.**",)))
    cfg.mesh.shape = (1, 1, 1)
    cfg.checkpoint["async"] = False
    cfg.optimizer.update(lr=1e-2, warmup_steps=0, weight_decay=0.0)
    cfg.task = {"kind": "distill", "teacher": str(path)}
    ids = jnp.asarray(next(iter(stream_data().eval_batches(0, 1)))["inputs"])  # the training stream's pattern
    kl = nnx.jit(lambda m, t: distill_kl(m(ids), t(ids), 1.0).mean())  # compiled: not eager forwards (~3 s)
    kd = lambda m: float(kl(m, teacher))
    before = kd(student)
    result = train(cfg, tmp_path / "run", model=student, data=stream_data(), log=lambda s: None)
    assert kd(result.model) < 0.5 * before
    assert all(np.array_equal(np.asarray(v), np.asarray(flat_params(teacher)[k]))
               for k, v in flat_params(teacher).items())  # the teacher object is untouched
    changed = [k for k, v in flat_params(result.model).items()
               if not np.array_equal(np.asarray(v), np.asarray(flat_params(student)[k]))]
    assert changed and all(".mlp." in k for k in changed)


def test_config_entry_and_errors(models):
    _, path, student = models
    task = task_from_config({"kind": "distill", "teacher": str(path), "alpha": 0.5, "temperature": 2.0})
    assert isinstance(task, DistillTask) and (task.alpha, task.temperature) == (0.5, 2.0)
    cases = [({"kind": "distill"}, "task.kind='distill' needs task.teacher"),
             ({"kind": "distill", "teacher": "x", "tau": 2}, r"unknown key\(s\) \['tau'\]"),
             ({"kind": "distill", "teacher": "x", "alpha": 1.5}, r"alpha=1.5 must be a number in \[0, 1\]"),
             ({"kind": "distill", "teacher": "x", "temperature": 0}, "temperature=0 must be a number > 0")]
    for spec, message in cases:
        with pytest.raises(ConfigError, match=message):
            task_from_config(spec)
    other = random_llama(LlamaConfig(**{**CFG.__dict__, "vocab_size": 40}), 0)
    with pytest.raises(ConfigError, match="has a vocabulary of 32 tokens, the student 40"):
        DistillTask(teacher=str(path)).setup(other, [])
