"""Scanned layers (llama `scan_layers=True`): the loop's numerics with the layers run as one jax.lax.scan.

CPU, float32 unless said. Forward logits under jit: bit-identical to the loop's (every remat policy). Eager
forwards: float32 rounding (|diff| ~3e-8; the scan body is compiled, the eager loop runs op by op, and a jitted
layer already differs from an eager one by as much). Loss and per-layer gradients under jit: bit-identical with
remat full/dots; with remat none within 4e-7 of each tensor's max (the loop's program fuses across layer
boundaries), checked with rtol 1e-6. bf16 compute: bit-identical logits, loss and gradients once XLA's excess
precision is off (by default XLA keeps fused bf16 chains in float32, so rounding follows fusion boundaries; the
difference is no larger than the loop's own jit vs eager one). A LoRA adapter: float32 rounding (XLA rewrites its
branch differently in a loop body). Fallbacks: layers that differ (an adapter on one layer, a widened layer) cut
the stack into runs; taps, routing noise, KV caches and layers that change their own variables use the loop. The
option is a runtime option: in no model_config.json / config.json, and the trainer's curve is the loop's.
"""
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from configurable_fm.analysis import capture
from configurable_fm.bricks import adapters
from configurable_fm.bricks.paths import flat_params
from configurable_fm.interop.hf import to_hf
from configurable_fm.interop.orbax_io import load_model, save_model
from configurable_fm.models.factory import build_model, config_to_dict, with_compute_dtype
from configurable_fm.models.generation import generate
from configurable_fm.models.llama import REMAT_POLICIES, Llama, LlamaConfig, layer_runs
from configurable_fm.models.moe import routing_noise
from configurable_fm.models.structure import build_options, check_consistent, rebuild
from configurable_fm.train.trainer import ConfigError, train
from tests.helpers import random_llama
from tests.train.test_trainer import tiny_config, tiny_data

CFG = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=4, num_heads=4, num_kv_heads=2,
                  max_position_embeddings=64)
MOE = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=12, num_layers=3, num_heads=4, num_kv_heads=2,
                  num_experts=4, num_experts_per_tok=2, router="noisy_topk", max_position_embeddings=64)
IDS = jnp.asarray(np.random.default_rng(0).integers(0, 64, (2, 12)), jnp.int32)


def with_options(model, **options):
    """The same tree and arrays with other build options (remat, scan_layers)."""
    return rebuild(model, {}, options=options)


def jit_logits(model, ids=IDS):
    graphdef, state = nnx.split(model)
    return jax.jit(lambda s: nnx.merge(graphdef, s)(ids))(state)


def scanned(model, ids=IDS) -> bool:
    """True when the jitted forward's program holds a loop (the layers' scan)."""
    graphdef, state = nnx.split(model)
    return "stablehlo.while" in jax.jit(lambda s: nnx.merge(graphdef, s)(ids)).lower(state).as_text()


def nll(model, ids=IDS):
    logits = model(ids[:, :-1])
    return optax.softmax_cross_entropy_with_integer_labels(logits, ids[:, 1:]).mean()


def loss_and_grads(model):
    graphdef, state = nnx.split(model, nnx.Param)
    loss, grads = jax.jit(jax.value_and_grad(lambda s: nll(nnx.merge(graphdef, s))))(state)
    return loss, flat_params(nnx.merge(graphdef, grads))


@pytest.fixture(scope="module")
def base():
    return random_llama(CFG, 0)


@pytest.mark.parametrize("remat", [r if r == "dots" else pytest.param(r, marks=pytest.mark.slow)
                                   for r in sorted(REMAT_POLICIES)])
def test_logits_equal_the_loop(base, remat):
    loop, scan = with_options(base, remat=remat), with_options(base, remat=remat, scan_layers=True)
    assert scanned(scan) and not scanned(loop)
    np.testing.assert_array_equal(jit_logits(scan), jit_logits(loop))  # bit-identical under jit
    eager = np.max(np.abs(np.asarray(scan(IDS)) - np.asarray(loop(IDS))))
    assert eager <= 1e-6, eager  # float32 rounding: the scan body is compiled, the eager loop is not


@pytest.mark.slow
def test_bf16_compute_differs_only_by_xlas_excess_precision(base):
    """In bf16, XLA (by default) keeps fused elementwise chains in float32 (excess precision), so where bf16 rounding
    happens depends on fusion boundaries: the scan's logits differ from the loop's by no more than the loop's jitted
    logits differ from its own eager ones. Without excess precision they are bit-identical (next test)."""
    loop = with_compute_dtype(base, jnp.bfloat16, remat="dots")
    scan = with_compute_dtype(base, jnp.bfloat16, remat="dots", scan_layers=True)
    assert scan.scan_layers and not loop.scan_layers and scanned(scan)
    as32 = lambda x: np.asarray(x, np.float32)
    diff = np.max(np.abs(as32(jit_logits(scan)) - as32(jit_logits(loop))))
    loops_own = np.max(np.abs(as32(jit_logits(loop)) - as32(loop(IDS))))
    assert 0 < diff <= loops_own, (diff, loops_own)


BF16_EXACT = """
import jax, jax.numpy as jnp, numpy as np
jax.config.update("jax_default_matmul_precision", "float32")
from tests.models import test_scan_layers as t
from configurable_fm.models.factory import with_compute_dtype
base = t.random_llama(t.CFG, 0)
for remat in ("none", "dots"):
    loop = with_compute_dtype(base, jnp.bfloat16, remat=remat)
    scan = with_compute_dtype(base, jnp.bfloat16, remat=remat, scan_layers=True)
    assert t.scanned(scan)
    np.testing.assert_array_equal(np.asarray(t.jit_logits(scan), np.float32), np.asarray(t.jit_logits(loop), np.float32))
    (l1, g1), (l2, g2) = t.loss_and_grads(loop), t.loss_and_grads(scan)
    assert float(l1) == float(l2)
    for k in g1:
        np.testing.assert_array_equal(g1[k], g2[k], err_msg=k)
print("bit-identical")
"""


@pytest.mark.slow
def test_bf16_compute_is_bit_identical_without_excess_precision():
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "XLA_FLAGS": "--xla_allow_excess_precision=false", "JAX_PLATFORMS": "cpu",
           "PYTHONPATH": str(root)}
    out = subprocess.run([sys.executable, "-c", BF16_EXACT], cwd=root, env=env, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0 and "bit-identical" in out.stdout, out.stderr[-3000:]


@pytest.mark.parametrize("remat", [r if r == "dots" else pytest.param(r, marks=pytest.mark.slow)
                                   for r in sorted(REMAT_POLICIES)])
def test_loss_and_gradients_equal_the_loop(base, remat):
    loss_loop, g_loop = loss_and_grads(with_options(base, remat=remat))
    loss_scan, g_scan = loss_and_grads(with_options(base, remat=remat, scan_layers=True))
    assert list(g_scan) == list(g_loop) and "layers.3.mlp.down_proj.kernel" in g_scan  # per-layer paths
    if remat != "none":  # both programs checkpoint each layer: the same computation, bit for bit
        assert float(loss_scan) == float(loss_loop)
        for k in g_loop:
            np.testing.assert_array_equal(g_scan[k], g_loop[k], err_msg=k)
    np.testing.assert_allclose(loss_scan, loss_loop, rtol=1e-6)
    for k in g_loop:
        assert np.any(np.asarray(g_loop[k]) != 0), k
        np.testing.assert_allclose(g_scan[k], g_loop[k], rtol=1e-6, atol=1e-6 * float(jnp.max(jnp.abs(g_loop[k]))),
                                   err_msg=k)


@pytest.mark.slow
def test_an_adapter_on_one_layer_splits_the_scan(base):
    assert layer_runs(base.layers) == [(0, 4)]
    one = adapters.attach(base, "lora", "layers.1.self_attn.q_proj", init="random", seed=1)
    assert layer_runs(one.layers) == [(0, 1), (1, 2), (2, 4)]  # layers 2-3 are scanned, 0 and 1 called
    every = adapters.attach(base, "lora", "layers.*.self_attn.q_proj", init="random", seed=1)
    assert layer_runs(every.layers) == [(0, 4)]
    # float32 rounding, not bit-identity: XLA rewrites the LoRA branch ((x A) B * s) differently inside a loop body
    # than in straight-line code (measured: logits |diff| <= 4.5e-8, gradients <= 4.4e-7 x their tensor's max)
    np.testing.assert_allclose(jit_logits(with_options(every, scan_layers=True)), jit_logits(every), rtol=1e-6,
                               atol=1e-7)
    loop, scan = with_options(one, remat="full"), with_options(one, remat="full", scan_layers=True)
    assert scanned(scan)
    np.testing.assert_allclose(jit_logits(scan), jit_logits(loop), rtol=1e-6, atol=1e-7)
    (loss_loop, g_loop), (loss_scan, g_scan) = loss_and_grads(loop), loss_and_grads(scan)
    assert list(g_scan) == list(g_loop) and "layers.1.self_attn.q_proj.lora_b" in g_scan
    np.testing.assert_allclose(loss_scan, loss_loop, rtol=1e-6)
    for k in g_loop:
        np.testing.assert_allclose(g_scan[k], g_loop[k], rtol=1e-6, atol=1e-6 * float(jnp.max(jnp.abs(g_loop[k]))),
                                   err_msg=k)


def widen(model, i=2):
    """A copy whose layer i has twice the MLP width (duplicated units, down_proj halved: the same function), by tree
    surgery (no config describes it)."""
    model = rebuild(model, {}, params={})
    mlp = model.layers[i].mlp
    mlp.up_proj.kernel = nnx.Param(jnp.concatenate([mlp.up_proj.kernel[...]] * 2, axis=1))
    mlp.gate_proj.kernel = nnx.Param(jnp.concatenate([mlp.gate_proj.kernel[...]] * 2, axis=1))
    mlp.down_proj.kernel = nnx.Param(jnp.concatenate([mlp.down_proj.kernel[...]] * 2, axis=0) / 2)
    return model


def test_a_widened_layer_is_its_own_run(base):
    loop, scan = widen(base), widen(with_options(base, scan_layers=True))
    assert layer_runs(scan.layers) == [(0, 2), (2, 3), (3, 4)]
    assert scanned(scan)
    np.testing.assert_array_equal(jit_logits(scan), jit_logits(loop))


@pytest.mark.slow
def test_moe_layers_scan_and_routing_noise_uses_the_loop():
    model = random_llama(MOE, 0)
    scan = with_options(model, scan_layers=True)
    assert scanned(scan)
    np.testing.assert_array_equal(jit_logits(scan), jit_logits(model))
    graphdef_l, state_l = nnx.split(model)
    graphdef_s, state_s = nnx.split(scan)

    def noisy(graphdef, state):  # layer i draws from fold_in(key, i): only the loop keeps the count
        with routing_noise(jax.random.key(3)):
            return nnx.merge(graphdef, state)(IDS)

    with_noise = jax.jit(noisy, static_argnums=0)
    np.testing.assert_array_equal(with_noise(graphdef_s, state_s), with_noise(graphdef_l, state_l))
    dots = lambda graphdef, state: jax.jit(noisy, static_argnums=0).lower(graphdef, state).as_text().count(
        "stablehlo.dot_general")  # one copy of each layer's matmuls per layer: the loop (the noise has a while)
    assert dots(graphdef_s, state_s) == dots(graphdef_l, state_l)
    assert not np.array_equal(with_noise(graphdef_s, state_s), jit_logits(model))  # the noise is drawn


@pytest.mark.slow
def test_taps_and_kv_cache_use_the_loop(base):
    scan = with_options(base, remat="full", scan_layers=True)
    out_s, taps_s = capture(scan, ["layers.*.output", "layers.2.mlp.hidden"], IDS)
    out_l, taps_l = capture(base, ["layers.*.output", "layers.2.mlp.hidden"], IDS)
    assert list(taps_s) == list(taps_l) == [f"layers.{i}.output" for i in range(2)] + ["layers.2.mlp.hidden"] + \
        [f"layers.{i}.output" for i in range(2, 4)]
    for k in taps_l:
        np.testing.assert_array_equal(taps_s[k], taps_l[k], err_msg=k)
    np.testing.assert_array_equal(out_s, out_l)
    np.testing.assert_array_equal(generate(scan, IDS[:, :5], max_new_tokens=4),
                                  generate(base, IDS[:, :5], max_new_tokens=4))


class Counted(nnx.Module):
    """Wraps a module and counts its calls in a variable (a layer that changes its own state when called)."""

    def __init__(self, inner):
        self.inner = inner
        self.calls = nnx.Variable(jnp.zeros((), jnp.int32))

    def __call__(self, x):
        self.calls[...] = self.calls[...] + 1
        return self.inner(x)


def test_a_layer_that_changes_its_state_uses_the_loop(base):
    def counted(model):
        model = rebuild(model, {}, params={})
        for layer in model.layers:
            layer.mlp = Counted(layer.mlp)
        return model

    loop, scan = counted(base), counted(with_options(base, scan_layers=True))
    assert layer_runs(scan.layers) == [(0, 4)]
    np.testing.assert_array_equal(scan(IDS), loop(IDS))
    assert [int(l.mlp.calls[...]) for l in scan.layers] == [int(l.mlp.calls[...]) for l in loop.layers] == [1] * 4


def test_the_option_is_no_part_of_the_config_or_checkpoints(base, tmp_path):
    with pytest.raises(ValueError, match="scan_layers='yes' must be True or False"):
        Llama(CFG, rngs=nnx.Rngs(0), scan_layers="yes")
    gpt2 = build_model({"family": "gpt2", "vocab_size": 32, "n_positions": 16, "n_embd": 16, "n_layer": 1,
                        "n_head": 2})
    with pytest.raises(ValueError, match="scan_layers=True: GPT2 has no scan_layers option"):
        with_compute_dtype(gpt2, jnp.float32, scan_layers=True)
    scan = with_options(base, scan_layers=True)
    assert build_options(scan)["scan_layers"] is True and rebuild(scan, {}).scan_layers is True
    check_consistent(scan, "save_model")
    assert "scan_layers" not in config_to_dict(scan.cfg)
    save_model(scan, tmp_path / "scan")
    save_model(base, tmp_path / "loop")
    spec = json.loads((tmp_path / "scan" / "model_config.json").read_text())
    assert spec == json.loads((tmp_path / "loop" / "model_config.json").read_text()) and "scan_layers" not in spec
    restored = load_model(tmp_path / "scan")
    assert restored.scan_layers is False  # a runtime option: set it again after loading
    to_hf(scan, tmp_path / "hf_scan")
    to_hf(base, tmp_path / "hf_loop")
    assert (tmp_path / "hf_scan" / "config.json").read_text() == (tmp_path / "hf_loop" / "config.json").read_text()
    assert (tmp_path / "hf_scan" / "model.safetensors").read_bytes() == \
        (tmp_path / "hf_loop" / "model.safetensors").read_bytes()


@pytest.mark.slow
def test_trainer_scan_layers_gives_the_loops_run(tmp_path):
    runs = {}
    for scan in (False, True):
        cfg = tiny_config(steps=3, eval_every=3, checkpoint_every=3, remat="full")
        cfg.model.num_layers = 3
        cfg.scan_layers = scan
        runs[scan] = train(cfg, tmp_path / f"scan_{scan}", data=tiny_data(cfg), log=lambda *_: None)
    loop, scan = runs[False], runs[True]
    assert scan.model.scan_layers and not loop.model.scan_layers
    assert sorted(scan.losses) == [1, 2, 3]
    assert scan.losses == loop.losses  # bit-identical curve (remat full: the same per-layer computation)
    assert scan.best_val_loss == loop.best_val_loss
    a, b = flat_params(scan.model), flat_params(loop.model)
    assert list(a) == list(b)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    # the orbax checkpoint and the HF export of the scanned run are the loop run's
    save_model(scan.model, tmp_path / "ck_scan")
    save_model(loop.model, tmp_path / "ck_loop")
    assert (tmp_path / "ck_scan" / "model_config.json").read_text() == \
        (tmp_path / "ck_loop" / "model_config.json").read_text()
    ra, rb = flat_params(load_model(tmp_path / "ck_scan")), flat_params(load_model(tmp_path / "ck_loop"))
    assert list(ra) == list(rb)
    for k in ra:
        np.testing.assert_array_equal(ra[k], rb[k], err_msg=k)
    to_hf(scan.model, tmp_path / "hf_scan")
    to_hf(loop.model, tmp_path / "hf_loop")
    for name in ("config.json", "model.safetensors"):
        assert (tmp_path / "hf_scan" / name).read_bytes() == (tmp_path / "hf_loop" / name).read_bytes(), name
    # sharded (FSDP x tensor over 8 fake devices): the stacked layers follow the per-layer shardings
    cfg = tiny_config(steps=3, eval_every=0, remat="full", **{"mesh.shape": (2, 2, 2)})
    cfg.model.num_layers = 3
    cfg.scan_layers = True
    sharded = train(cfg, tmp_path / "sharded", data=tiny_data(cfg), log=lambda *_: None)
    for step in (1, 2, 3):
        assert abs(sharded.losses[step] - scan.losses[step]) <= 1e-5, step
    cfg = tiny_config(steps=3)
    with cfg.ignore_type():  # ml_collections refuses a str for a bool field; the trainer must refuse it too
        cfg.scan_layers = "yes"
    with pytest.raises(ConfigError, match="scan_layers='yes' must be True or False"):
        train(cfg, tmp_path / "bad", data=tiny_data(cfg), log=lambda *_: None)
    assert not (tmp_path / "bad").exists()
