"""GPT-2 family: float32 parity with transformers' GPT2LMHeadModel, HF round trips, KV-cache decoding, bad input.

Reference: transformers (torch, CPU, float32) on tiny random models built here. Tolerances: logits max |diff|
<= 1e-4 against transformers; cached decoding vs our own full forward <= 1e-5; round trips bit-exact.
"""
import json

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from safetensors.numpy import load_file, save_file  # noqa: E402

from tests.helpers import assert_params_equal, hf_dir_with_config_change
from configurable_fm.bricks.paths import flat_params, flat_state  # noqa: E402
from configurable_fm.interop.hf import from_hf, to_hf  # noqa: E402
from configurable_fm.interop.safetensors_io import CheckpointError  # noqa: E402
from configurable_fm.models.gpt2 import GPT2, GPT2Config  # noqa: E402

VOCAB = 97
BASE = dict(vocab_size=VOCAB, n_positions=24, n_embd=32, n_layer=2, n_head=4, bos_token_id=0, eos_token_id=0)


def hf_gpt2(tmp_path, name="hf", **overrides):
    """A tiny random GPT2LMHeadModel (every weight random, LayerNorm gains near 1), saved to tmp_path/name."""
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(**{**BASE, **overrides})).eval()
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if ".ln_" in pname or pname.startswith(("transformer.ln_f", "ln_")):
                p.normal_(1.0 if pname.endswith("weight") else 0.0, 0.2)
            else:
                p.normal_(0.0, 0.2)
    path = tmp_path / name
    model.save_pretrained(path)
    return model, path


def hf_logits(model, ids, mask=None):
    with torch.no_grad():
        out = model(torch.tensor(ids), attention_mask=None if mask is None else torch.tensor(mask))
    return out.logits.numpy()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return hf_gpt2(tmp_path_factory.mktemp("gpt2"))


def batch(t=11, seed=0):
    ids = np.random.RandomState(seed).randint(0, VOCAB, (3, t))
    mask = np.ones((3, t), np.int64)
    mask[0, :4] = 0  # left padding
    mask[1, -3:] = 0  # right padding
    return ids, mask


@pytest.mark.parametrize("overrides", [
    {},
    dict(tie_word_embeddings=False, n_inner=48, activation_function="gelu", scale_attn_by_inverse_layer_idx=True),
    dict(scale_attn_weights=False, reorder_and_upcast_attn=True, activation_function="relu",
         layer_norm_epsilon=1e-3),
])
def test_logits_match_transformers(tmp_path, overrides):
    hf, path = hf_gpt2(tmp_path, **overrides)
    model = from_hf(path)
    assert isinstance(model, GPT2) and model.cfg.tie_word_embeddings == overrides.get("tie_word_embeddings", True)
    ids, mask = batch()
    full = np.asarray(model(jnp.asarray(ids)))
    assert full.shape == (3, 11, VOCAB)
    assert np.abs(full - hf_logits(hf, ids)).max() <= 1e-4
    padded = np.asarray(model(jnp.asarray(ids), attention_mask=jnp.asarray(mask)))
    assert np.isfinite(padded).all()  # fully masked (padding) query rows must not produce NaN
    keep = mask.astype(bool)
    assert np.abs(padded - hf_logits(hf, ids, mask))[keep].max() <= 1e-4
    # The mask matters: the left-padded row differs from the unmasked forward.
    assert np.abs(padded[0, 4:] - full[0, 4:]).max() > 1e-3


def test_parameter_paths_and_logical_axes(tiny):
    model = from_hf(tiny[1])
    state = flat_state(model)
    axes = {k: v.get_metadata()["out_sharding"] for k, v in state.items()}
    assert axes["wte.embedding"] == ("vocab", "embed")
    assert axes["wpe.embedding"] == (None, "embed")
    assert axes["h.1.attn.c_attn.kernel"] == ("embed", "heads") and state["h.1.attn.c_attn.kernel"].shape == (32, 96)
    assert axes["h.1.attn.c_proj.kernel"] == ("heads", "embed")
    assert axes["h.1.mlp.c_fc.kernel"] == ("embed", "mlp") and state["h.1.mlp.c_fc.kernel"].shape == (32, 128)
    assert axes["h.1.mlp.c_proj.kernel"] == ("mlp", "embed")
    assert axes["ln_f.weight"] == ("norm",) and "h.0.ln_1.bias" in state and "h.0.ln_2.weight" in state
    assert all(len(a) == v.ndim for a, v in zip(axes.values(), state.values()))
    assert "lm_head.kernel" not in state  # tied: the head is wte.attend
    # Conv1D weights are (in, out): copied without a transpose.
    hf_w = tiny[0].transformer.h[1].attn.c_attn.weight.detach().numpy()
    np.testing.assert_array_equal(np.asarray(flat_params(model)["h.1.attn.c_attn.kernel"]), hf_w)


@pytest.mark.parametrize("tied", [True, False])
def test_round_trip_is_exact_and_transformers_loads_it(tmp_path, tied):
    hf, path = hf_gpt2(tmp_path, tie_word_embeddings=tied)
    model = from_hf(path)
    out = to_hf(model, tmp_path / "ours")
    again = from_hf(out)
    assert again.cfg == model.cfg
    assert_params_equal(model, again)
    written = load_file(out / "model.safetensors")
    assert ("lm_head.weight" in written) == (not tied) and "wte.weight" in written
    reloaded, info = transformers.GPT2LMHeadModel.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    ids, mask = batch(seed=1)
    np.testing.assert_array_equal(hf_logits(reloaded.eval(), ids, mask), hf_logits(hf, ids, mask))


def test_reads_base_model_layout_with_legacy_buffers(tmp_path, tiny):
    """OpenAI's layout: keys without `transformer.`, causal-mask buffers attn.bias/masked_bias, a stored tied head."""
    hf, path = tiny
    tensors = {k.removeprefix("transformer."): v for k, v in load_file(path / "model.safetensors").items()}
    for i in range(BASE["n_layer"]):
        tensors[f"h.{i}.attn.bias"] = np.tril(np.ones((1, 1, 24, 24), np.float32))
        tensors[f"h.{i}.attn.masked_bias"] = np.array(-1e4, np.float32)
    tensors["lm_head.weight"] = tensors["wte.weight"].copy()
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    save_file(tensors, legacy / "model.safetensors")
    (legacy / "config.json").write_text((path / "config.json").read_text())
    a, b = flat_params(from_hf(path)), flat_params(from_hf(legacy))
    for k in a:
        np.testing.assert_array_equal(np.asarray(a[k]), np.asarray(b[k]), err_msg=k)


# One jitted step for prefill and decode (compiled once per input shape).
_step = nnx.jit(lambda m, ids, mask, pos, cache: m(ids, attention_mask=mask, positions=pos, cache=cache))


def cached_logits(model, ids, mask, positions, prefill):
    """Logits from a prefill of `prefill` tokens then one-token decode steps, through the KV cache.

    `mask` / `positions` None use the model's defaults (all tokens real; positions from the cache index)."""
    b, t = ids.shape
    cache = model.init_cache(b, t)
    outs = []
    for lo, hi in [(0, prefill)] + [(i, i + 1) for i in range(prefill, t)]:
        part = lambda a: None if a is None else jnp.asarray(a[:, lo:hi])  # noqa: E731
        logits, cache = _step(model, jnp.asarray(ids[:, lo:hi]), part(mask), part(positions), cache)
        outs.append(np.asarray(logits))
    assert int(cache.index) == t
    return np.concatenate(outs, axis=1)


def test_kv_cache_decoding_matches_full_forward(tiny):
    model = from_hf(tiny[1])
    ids = np.random.RandomState(2).randint(0, VOCAB, (2, 12))
    full = np.asarray(model(jnp.asarray(ids)))
    np.testing.assert_allclose(cached_logits(model, ids, None, None, 6), full, atol=1e-5, rtol=0)


def test_kv_cache_with_left_padding(tiny):
    """Left-padded prompts: positions count real tokens; cached decoding equals the masked full forward."""
    model = from_hf(tiny[1])
    ids = np.random.RandomState(3).randint(0, VOCAB, (2, 12))
    mask = np.ones((2, 12), np.int32)
    mask[0, :3] = 0
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
    full = np.asarray(model(jnp.asarray(ids), attention_mask=jnp.asarray(mask), positions=jnp.asarray(positions)))
    keep = mask.astype(bool)
    assert np.abs(cached_logits(model, ids, mask, positions, 6) - full)[keep].max() <= 1e-5
    # Row 0 equals the same prompt without padding, as a batch of one.
    alone = np.asarray(model(jnp.asarray(ids[:1, 3:])))
    assert np.abs(full[0, 3:] - alone[0]).max() <= 1e-5


@pytest.mark.parametrize("key, value, needle", [
    ("add_cross_attention", True, "add_cross_attention"),
    ("activation_function", "swiglu_nonsense", "activation_function"),
    ("rotary_dim", 8, "rotary_dim"),
])
def test_unsupported_config_is_refused(tmp_path, tiny, key, value, needle):
    bad = hf_dir_with_config_change(tiny[1], tmp_path / "bad", key, value)
    with pytest.raises(NotImplementedError, match=needle):
        from_hf(bad)


def test_shape_mismatch_and_lengths_are_refused(tmp_path, tiny):
    bad = tmp_path / "bad"
    bad.mkdir()
    config = json.loads((tiny[1] / "config.json").read_text())
    config["n_inner"] = 64  # the checkpoint's MLP is 128 wide
    (bad / "config.json").write_text(json.dumps(config))
    (bad / "model.safetensors").symlink_to(tiny[1] / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"h\.0\.mlp\.c_fc\.weight"):
        from_hf(bad)
    cfg = GPT2Config(vocab_size=11, n_positions=8, n_embd=8, n_layer=1, n_head=2)
    model = nnx.eval_shape(lambda: GPT2(cfg, rngs=nnx.Rngs(0)))  # the checks come before any parameter is read
    with pytest.raises(ValueError, match="n_positions=8"):
        model.init_cache(1, 9)
    with pytest.raises(ValueError, match="n_positions=8"):
        model(jnp.zeros((1, 9), jnp.int32))
    with pytest.raises(ValueError, match="n_head=3"):
        GPT2Config(n_embd=8, n_head=3)


def test_zero_heads_and_mismatched_input_shapes_are_refused():
    """n_head=0 was a ZeroDivisionError; 1-D ids and a mask of another length ended in jax broadcasting errors."""
    with pytest.raises(ValueError, match="n_head must be >= 1, got 0"):
        GPT2Config(n_embd=8, n_head=0)
    model = GPT2(GPT2Config(vocab_size=11, n_positions=8, n_embd=8, n_layer=1, n_head=2), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"ids must have shape \(batch, length\).*got \(5,\)"):
        model(jnp.zeros((5,), jnp.int32))
    with pytest.raises(ValueError, match=r"attention_mask must have shape \(batch, 5\).*got \(2, 4\)"):
        model(jnp.zeros((2, 5), jnp.int32), attention_mask=jnp.ones((2, 4), jnp.int32))
