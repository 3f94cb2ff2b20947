"""Model FLOPs per token: hand counts, the parameter count, the attention mask, XLA's cost analysis; peaks, MFU."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configurable_fm.models.attention import attention_mask
from configurable_fm.models.bert import BertConfig
from configurable_fm.models.factory import build_model, config_to_dict
from configurable_fm.models.gpt2 import GPT2Config
from configurable_fm.models.llama import LlamaConfig
from configurable_fm.train.flops import (flops_breakdown, flops_per_token, matmul_peak_dtype, mfu,
                                         peak_flops_per_device)

TINY = LlamaConfig(vocab_size=100, hidden_size=16, intermediate_size=40, num_layers=2, num_heads=4, num_kv_heads=2)


def test_hand_count_tiny_llama():
    # D=16, N=4, K=2, H=4 (d_attn=16), F=40, V=100, 2 layers, T=8. Per layer:
    #   q 2*16*16=512, k 2*16*8=256, v 256, o 512            -> 1536
    #   SwiGLU 3 * 2*16*40                                    -> 3840
    #   scores + weighted sum 2*2*T*d_attn = 4*8*16           ->  512 (full T x T, no causal halving)
    # 2 layers: 2*(1536+3840+512) = 11776; LM head 2*16*100 = 3200 -> forward 14976, training 3x = 44928.
    assert flops_per_token(TINY, 8, training=False) == 14976
    assert flops_per_token(TINY, 8) == 44928
    assert flops_breakdown(TINY, 8) == {"qkvo": 3072, "attention": 1024, "mlp": 7680, "router": 0, "lm_head": 3200}
    # Causal halving: a query sees (T+1)/2 = 4.5 keys on average: 4*4.5*16 = 288 per layer.
    assert flops_per_token(TINY, 8, training=False, causal_halving=True) == 14976 - 2 * (512 - 288)
    assert flops_per_token(config_to_dict(TINY), 8) == 44928  # a config dict works too


def test_hand_count_moe_and_gpt2():
    moe = LlamaConfig(vocab_size=100, hidden_size=16, intermediate_size=40, num_layers=2, num_heads=4,
                      num_kv_heads=2, num_experts=8, num_experts_per_tok=2)
    # router 2*16*8 = 256 and 2 active experts 2*3840 = 7680 per layer, instead of 3840.
    assert flops_per_token(moe, 8, training=False) == 14976 + 2 * (256 + 3840)
    assert flops_breakdown(moe, 8, moe_experts_computed=8)["mlp"] == 2 * 8 * 3840
    gpt2 = GPT2Config(vocab_size=100, n_positions=32, n_embd=16, n_layer=2, n_head=4)
    # qkv 2*16*48=1536, o 2*16*16=512, MLP (F=64) 2*2*16*64=4096, attention 4*8*16=512 per layer; head 3200.
    assert flops_per_token(gpt2, 8, training=False) == 2 * (1536 + 512 + 4096 + 512) + 3200
    bert = BertConfig(vocab_size=10, hidden_size=8, num_layers=1, num_heads=2, intermediate_size=16)
    with pytest.raises(TypeError, match="not BertConfig"):
        flops_per_token(bert, 8)


@pytest.mark.parametrize("seq_len,window", [(8, None), (8, 3), (13, 5), (6, 10)])
def test_attention_term_matches_the_models_causal_mask(seq_len, window):
    cfg = LlamaConfig(vocab_size=10, hidden_size=16, intermediate_size=8, num_layers=1, num_heads=4,
                      num_kv_heads=1, sliding_window=window)
    pos = jnp.arange(seq_len)
    visible = int(attention_mask(pos, pos, causal=True, sliding_window=window).sum())  # allowed (query, key) pairs
    d_attn = cfg.num_heads * cfg.dim_per_head
    got = flops_breakdown(cfg, seq_len, causal_halving=True)["attention"]
    assert got == pytest.approx(2 * 2 * d_attn * visible / seq_len)
    full = flops_breakdown(cfg, seq_len)["attention"]
    assert full == 2 * 2 * d_attn * min(seq_len, window or seq_len)


@pytest.mark.parametrize("tied", [False, True])
def test_matmul_terms_equal_twice_the_kernel_parameters(tied):
    cfg = LlamaConfig(vocab_size=64, hidden_size=24, intermediate_size=40, num_layers=3, num_heads=6,
                      num_kv_heads=2, tie_word_embeddings=tied)
    state = nnx.to_flat_state(nnx.state(build_model(cfg, seed=0), nnx.Param))
    matmul_params = sum(np.size(v.get_value()) for path, v in state
                        if path[-1] == "kernel" or (tied and path[-1] == "embedding"))
    b = flops_breakdown(cfg, 16)
    assert b["qkvo"] + b["mlp"] + b["lm_head"] == 2 * matmul_params


def _xla_flops_per_token(cfg, batch, seq_len, *, training):
    graphdef, state = nnx.split(build_model(cfg, seed=0))

    def forward(state, ids):
        return nnx.merge(graphdef, state)(ids)

    def loss(state, ids):
        return jnp.mean(jax.nn.logsumexp(forward(state, ids), axis=-1))

    fn = jax.grad(loss) if training else forward
    # XLA's cost analysis of the lowered program: not compiled (~1-5 s each at -O0); the compiled program's count
    # differs by < 0.5% (2026-12-07: forward the same to 0.15%, training +1.1% here against +1.6% compiled)
    cost = jax.jit(fn).lower(state, jnp.zeros((batch, seq_len), jnp.int32)).cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return cost["flops"] / (batch * seq_len)


COST_CONFIGS = {
    "llama_gqa": LlamaConfig(vocab_size=512, hidden_size=128, intermediate_size=384, num_layers=2, num_heads=4,
                             num_kv_heads=2),
    "llama_moe": LlamaConfig(vocab_size=512, hidden_size=128, intermediate_size=256, num_layers=2, num_heads=4,
                             num_kv_heads=2, num_experts=4, num_experts_per_tok=2),
    "gpt2": GPT2Config(vocab_size=512, n_positions=64, n_embd=128, n_layer=2, n_head=4),
}


@pytest.mark.parametrize("name", sorted(COST_CONFIGS))
def test_forward_matches_xla_cost_analysis(name):
    """XLA counts every op, so it is a little above the matmul count: within +3% (measured +1.0..+2.0%).

    The XLA attention computes the full T x T scores (no causal halving), and this repository's MoE combines all
    experts densely, so those are the settings compared.
    """
    cfg = COST_CONFIGS[name]
    xla = _xla_flops_per_token(cfg, 2, 64, training=False)
    ours = flops_per_token(cfg, 64, training=False, moe_experts_computed=getattr(cfg, "num_experts", 0) or None)
    assert 1.0 <= xla / ours <= 1.03, (xla, ours)


def test_training_is_three_forwards_per_xla():
    cfg = COST_CONFIGS["llama_gqa"]
    xla = _xla_flops_per_token(cfg, 2, 64, training=True)
    assert 1.0 <= xla / flops_per_token(cfg, 64) <= 1.05  # measured +1.1%


def test_peaks_and_mfu():
    assert peak_flops_per_device("NVIDIA H200") == 989e12
    assert peak_flops_per_device("NVIDIA H100 80GB HBM3", "bf16") == 989e12
    assert peak_flops_per_device("NVIDIA H100 PCIe") == 756.5e12
    assert peak_flops_per_device("NVIDIA A100-SXM4-80GB") == 312e12
    assert peak_flops_per_device("NVIDIA A100-SXM4-80GB", "float32") == 19.5e12
    assert peak_flops_per_device("TPU v4") == 275e12
    assert peak_flops_per_device("TPU v5 lite") == 197e12
    assert peak_flops_per_device("TPU v5p") == 459e12
    assert peak_flops_per_device("TPU v6 lite") == 918e12
    assert peak_flops_per_device("NVIDIA H200", "float8") == 1979e12
    assert peak_flops_per_device("TPU v4", "float8") is None  # unlisted dtype: unknown, not guessed
    assert peak_flops_per_device("Some Future Chip") is None
    assert peak_flops_per_device() is None and peak_flops_per_device(jax.devices("cpu")[0]) is None
    # the peak that matches the compute dtype: float32 dots run on TF32 (GPU) or one bf16 pass (TPU) by default
    assert matmul_peak_dtype("bfloat16", "NVIDIA H200") == "bfloat16" and matmul_peak_dtype("fp16") == "float16"
    with jax.default_matmul_precision("default"):  # (the suite runs at 'highest', conftest.py)
        assert matmul_peak_dtype("float32", "NVIDIA H200") == "tf32"
        assert matmul_peak_dtype("float32", "TPU v4") == "bfloat16" and matmul_peak_dtype("float32", "cpu") is None
    with jax.default_matmul_precision("highest"):
        assert matmul_peak_dtype("float32", "NVIDIA H200") == "float32"
    with jax.default_matmul_precision("high"):
        assert matmul_peak_dtype("float32", "TPU v5 lite") is None  # bf16_3x: no datasheet row
    assert mfu(1e4, 6e9, 8, None) is None
    assert mfu(20_000, 7.5e9 * 6, 1, 989e12) == pytest.approx(20_000 * 45e9 / 989e12)
    with pytest.raises(ValueError, match="n_devices"):
        mfu(1.0, 1.0, 0, 989e12)
