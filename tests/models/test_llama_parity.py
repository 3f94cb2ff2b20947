"""Llama-family parity with transformers (float32, CPU) and the HF round trip.

Tiny random models are built in transformers inside the tests (no downloads); tolerance max |logit diff| <= 1e-4.
"""
import json

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from configurable_fm.bricks import flat_params  # noqa: E402
from configurable_fm.models import from_hf, to_hf  # noqa: E402

TOL = 1e-4
BASE = dict(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2, max_position_embeddings=64)

CASES = {
    "llama-mha-untied": ("Llama", dict(num_attention_heads=4, num_key_value_heads=4)),
    "llama-gqa-tied": ("Llama", dict(num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)),
    "llama-mqa-bias": ("Llama", dict(num_attention_heads=4, num_key_value_heads=1, attention_bias=True, mlp_bias=True)),
    "llama3-rope-scaling": ("Llama", dict(num_attention_heads=4, num_key_value_heads=2, rope_theta=500000.0,
                                           rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                                                             high_freq_factor=4.0, original_max_position_embeddings=8))),
    "llama-linear-rope": ("Llama", dict(num_attention_heads=4, num_key_value_heads=2,
                                         rope_scaling=dict(rope_type="linear", factor=2.0))),
    "llama-head-dim": ("Llama", dict(num_attention_heads=4, num_key_value_heads=2, head_dim=16)),
    "mistral-window": ("Mistral", dict(num_attention_heads=4, num_key_value_heads=2, sliding_window=4)),
    "qwen2-bias": ("Qwen2", dict(num_attention_heads=4, num_key_value_heads=2)),
    "mixtral-top2": ("Mixtral", dict(num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
                                     num_experts_per_tok=2)),
}


def make_hf(kind, kw, seed=0):
    torch.manual_seed(seed)
    cfg = getattr(transformers, f"{kind}Config")(**BASE, **kw)
    model = getattr(transformers, f"{kind}ForCausalLM")(cfg).eval()
    # Random non-trivial norms and biases so that every parameter matters.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith(".bias"):
                p.copy_(torch.randn_like(p) * 0.1 + (1.0 if "norm" in name else 0.0))
    return model


def hf_logits(model, ids, mask=None):
    with torch.no_grad():
        kw = {} if mask is None else {"attention_mask": torch.tensor(mask)}
        return model(torch.tensor(ids), **kw).logits.numpy()


@pytest.mark.parametrize("case", sorted(CASES))
def test_logits_match_transformers(case, tmp_path):
    kind, kw = CASES[case]
    hf = make_hf(kind, kw)
    hf.save_pretrained(tmp_path / "hf")
    ids = np.random.RandomState(1).randint(0, BASE["vocab_size"], (2, 11))
    ours = from_hf(tmp_path / "hf")
    diff = np.abs(np.asarray(ours(jnp.asarray(ids))) - hf_logits(hf, ids)).max()
    assert diff <= TOL, f"{case}: max |logit diff| {diff}"


def test_padding_mask_matches_transformers(tmp_path):
    hf = make_hf("Llama", CASES["llama-gqa-tied"][1])
    hf.save_pretrained(tmp_path / "hf")
    ids = np.random.RandomState(2).randint(0, BASE["vocab_size"], (2, 9))
    mask = np.ones_like(ids)
    mask[1, 6:] = 0  # right padding in row 1
    ours = np.asarray(from_hf(tmp_path / "hf")(jnp.asarray(ids), attention_mask=jnp.asarray(mask)))
    ref = hf_logits(hf, ids, mask)
    keep = mask.astype(bool)
    assert np.abs(ours[keep] - ref[keep]).max() <= TOL


@pytest.mark.parametrize("case", ["llama-gqa-tied", "mixtral-top2", "qwen2-bias", "mistral-window"])
def test_round_trip_is_bit_exact_and_transformers_loads_it(case, tmp_path):
    kind, kw = CASES[case]
    hf = make_hf(kind, kw)
    hf.save_pretrained(tmp_path / "hf")
    first = from_hf(tmp_path / "hf")
    to_hf(first, tmp_path / "out", max_shard_size=20_000)  # small limit: forces shards + index
    assert (tmp_path / "out" / "model.safetensors.index.json").exists()
    second = from_hf(tmp_path / "out")
    a, b = flat_params(first), flat_params(second)
    assert list(a) == list(b)
    for k in a:
        assert np.array_equal(np.asarray(a[k]), np.asarray(b[k])), k
    reloaded = getattr(transformers, f"{kind}ForCausalLM").from_pretrained(tmp_path / "out").eval()
    ids = np.random.RandomState(3).randint(0, BASE["vocab_size"], (1, 7))
    assert np.abs(hf_logits(reloaded, ids) - hf_logits(hf, ids)).max() == 0.0
    assert json.loads((tmp_path / "out" / "config.json").read_text())["architectures"] == [f"{kind}ForCausalLM"]


def test_softmax_then_topk_router_differs_from_mixtral_rule():
    """The two routing rules agree on which experts are chosen but weight them differently (no renormalisation)."""
    from configurable_fm.models.moe import route

    logits = jnp.array([[[2.0, 1.0, 0.0, -1.0]]])
    w1, i1 = route(logits, 2, "topk_softmax")
    w2, i2 = route(logits, 2, "softmax_topk")
    assert np.array_equal(i1, i2)
    e = np.exp([2.0, 1.0, 0.0, -1.0])
    np.testing.assert_allclose(np.asarray(w1)[0, 0], e[:2] / e[:2].sum(), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(w2)[0, 0], e[:2] / e.sum(), rtol=1e-6)


def test_config_keys_left_out_take_transformers_defaults_per_architecture(tmp_path):
    """A config.json without rms_norm_eps / rope_theta / sliding_window runs with transformers' defaults for its
    architecture (Mixtral: 1e-5 and 1e6, not Llama's 1e-6 and 1e4); Llama reads no sliding window (transformers'
    LlamaModel ignores the key), and a llama-family model with a window is not written as Llama or Qwen2."""
    from configurable_fm.interop.hf import UnsupportedModel
    from configurable_fm.models.llama import LlamaConfig
    from configurable_fm.models.factory import build_model

    hf = make_hf("Mixtral", CASES["mixtral-top2"][1])
    hf.save_pretrained(tmp_path / "mixtral")
    path = tmp_path / "mixtral" / "config.json"
    c = json.loads(path.read_text())
    for key in ("rms_norm_eps", "rope_theta", "rope_parameters"):
        c.pop(key, None)
    path.write_text(json.dumps(c))
    reloaded = transformers.MixtralForCausalLM.from_pretrained(tmp_path / "mixtral").eval()
    ours = from_hf(tmp_path / "mixtral")
    assert (ours.cfg.rms_norm_eps, ours.cfg.rope_theta) == (1e-5, 1e6)
    ids = np.random.RandomState(4).randint(0, BASE["vocab_size"], (1, 11))
    assert np.abs(np.asarray(ours(jnp.asarray(ids))) - hf_logits(reloaded, ids)).max() <= TOL

    llama = make_hf("Llama", dict(CASES["llama-gqa-tied"][1], sliding_window=3))
    llama.save_pretrained(tmp_path / "llama")
    ours = from_hf(tmp_path / "llama")
    assert ours.cfg.sliding_window is None
    assert np.abs(np.asarray(ours(jnp.asarray(ids))) - hf_logits(llama, ids)).max() <= TOL
    # Mistral with layer_types: transformers ignores them (and warns), its window applies to every layer
    mistral = make_hf("Mistral", CASES["mistral-window"][1])
    mistral.save_pretrained(tmp_path / "mistral")
    path = tmp_path / "mistral" / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "layer_types": ["full_attention"] * 2}))
    reloaded = transformers.MistralForCausalLM.from_pretrained(tmp_path / "mistral").eval()
    ours = from_hf(tmp_path / "mistral")
    assert ours.cfg.sliding_window == 4
    assert np.abs(np.asarray(ours(jnp.asarray(ids))) - hf_logits(reloaded, ids)).max() <= TOL
    windowed = build_model(LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=48, num_layers=1,
                                       num_heads=4, num_kv_heads=2, sliding_window=3), seed=0)
    with pytest.raises(UnsupportedModel, match="LlamaForCausalLM as transformers runs it has no sliding window"):
        to_hf(windowed, tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("max_window_layers, window", [(2, None), (0, 3)])
def test_qwen2_sliding_window_as_transformers_applies_it(tmp_path, max_window_layers, window):
    """Qwen2 windows the layers from max_window_layers on, and only with use_sliding_window: none of the two
    (max_window_layers 2) is a plain model, all of them (0) one window; some of them is refused (one window per
    model here)."""
    from configurable_fm.interop.hf import UnsupportedModel

    kw = dict(CASES["qwen2-bias"][1], use_sliding_window=True, sliding_window=3, max_window_layers=max_window_layers)
    hf = make_hf("Qwen2", kw)
    hf.save_pretrained(tmp_path / "q")
    ours = from_hf(tmp_path / "q")
    assert ours.cfg.sliding_window == window
    ids = np.random.RandomState(5).randint(0, BASE["vocab_size"], (1, 9))
    assert np.abs(np.asarray(ours(jnp.asarray(ids))) - hf_logits(hf, ids)).max() <= TOL
    if window is not None:
        path = tmp_path / "q" / "config.json"
        path.write_text(json.dumps({**json.loads(path.read_text()),
                                    "layer_types": ["full_attention", "sliding_attention"]}))
        with pytest.raises(UnsupportedModel, match=r"windows layers \[1\] of 2.*per-layer windows"):
            from_hf(tmp_path / "q")


def test_rope_scaling_types_it_cannot_compute_are_refused_not_run_as_llama3():
    """RopeScaling('yarn' / 'dynamic' / 'longrope', ...) built directly or by config_from_dict used to be accepted
    and then given llama3's frequencies; 'default' scales nothing; a factor must be a finite number > 0."""
    from configurable_fm.models.attention import RopeScaling, rope_inverse_frequencies
    from configurable_fm.models.factory import config_from_dict

    spec = dict(family="llama", vocab_size=11, hidden_size=16, intermediate_size=24, num_layers=1, num_heads=2,
                num_kv_heads=1)
    for kind in ("yarn", "dynamic", "longrope"):
        with pytest.raises(NotImplementedError, match=f"rope_scaling type '{kind}' is not implemented"):
            config_from_dict(dict(spec, rope_scaling=dict(rope_type=kind, factor=4.0)))
    plain = rope_inverse_frequencies(8, 1e4)
    np.testing.assert_array_equal(rope_inverse_frequencies(8, 1e4, RopeScaling("default")), plain)
    for factor in (0.0, -2.0, float("nan"), float("inf"), "2"):
        with pytest.raises(ValueError, match="rope_scaling factor must be a finite number > 0"):
            RopeScaling("linear", factor=factor)


def test_config_refuses_zero_heads_and_a_top_k_beyond_the_experts():
    """num_heads / num_kv_heads of 0 were a ZeroDivisionError; num_experts_per_tok > num_experts (or < 1) was
    accepted and failed inside jax.lax.top_k at the first forward (k = 0 ran with every routing weight 0)."""
    from configurable_fm.models.llama import LlamaConfig

    kw = dict(vocab_size=11, hidden_size=16, intermediate_size=24, num_layers=1, num_heads=2, num_kv_heads=1)
    for name in ("num_heads", "num_kv_heads"):
        with pytest.raises(ValueError, match=f"{name} must be >= 1, got 0"):
            LlamaConfig(**dict(kw, **{name: 0}))
    for k in (0, 3):
        with pytest.raises(ValueError, match=rf"num_experts_per_tok={k} must be in 1\.\.num_experts=2"):
            LlamaConfig(**kw, num_experts=2, num_experts_per_tok=k)
    with pytest.raises(ValueError, match="num_experts must be >= 0"):
        LlamaConfig(**kw, num_experts=-1)
    LlamaConfig(**kw, num_experts=2, num_experts_per_tok=3, router="expert_choice")  # k only sets the capacity
    LlamaConfig(**kw, num_experts=0, num_experts_per_tok=2)  # dense: k unused


def test_input_shapes_that_do_not_match_are_refused_with_their_names():
    """1-D ids and an attention_mask of another length used to end in jax reshape / broadcasting tracebacks."""
    from configurable_fm.models.llama import Llama, LlamaConfig

    cfg = LlamaConfig(vocab_size=11, hidden_size=16, intermediate_size=24, num_layers=1, num_heads=2, num_kv_heads=1)
    model = Llama(cfg, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"ids must have shape \(batch, length\).*got \(5,\)"):
        model(jnp.zeros((5,), jnp.int32))
    with pytest.raises(ValueError, match=r"attention_mask must have shape \(batch, 5\).*got \(2, 4\)"):
        model(jnp.zeros((2, 5), jnp.int32), attention_mask=jnp.ones((2, 4), jnp.int32))
    with pytest.raises(ValueError, match=r"attention_mask must have shape \(batch, 5\).*got \(5,\)"):
        model(jnp.zeros((2, 5), jnp.int32), attention_mask=jnp.ones((5,), jnp.int32))


def test_a_cached_forward_past_the_caches_end_is_refused():
    """Writing past the cache's last slot was clamped by dynamic_update_slice onto the last slots: wrong logits and
    an index beyond max_len, no error (eager; under jit the index is traced and generation sizes the cache)."""
    import dataclasses

    from configurable_fm.models.llama import Llama, LlamaConfig

    cfg = LlamaConfig(vocab_size=11, hidden_size=16, intermediate_size=24, num_layers=1, num_heads=2, num_kv_heads=1)
    model = Llama(cfg, rngs=nnx.Rngs(0))
    cache = dataclasses.replace(model.init_cache(1, 4), index=jnp.asarray(3, jnp.int32))  # 3 slots written
    with pytest.raises(ValueError, match="the KV cache has 4 slots; 3 are written and 2 new tokens do not fit"):
        model(jnp.zeros((1, 2), jnp.int32), cache=cache)
