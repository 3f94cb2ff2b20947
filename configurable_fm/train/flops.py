"""Model FLOPs per token and model-FLOPs utilisation (MFU).

Model FLOPs count the matmuls the model mathematically needs, 2 FLOPs per multiply-add, independent of how
they are executed (rematerialisation, padding, or this repository's dense-over-all-experts MoE are not counted).
Per token and per layer, forward pass, with D width, N query heads, K key/value heads, H head dim,
d_attn = N*H, F MLP width, V vocabulary, T sequence length:

    q, k, v, o projections     2*D*N*H + 2*2*D*K*H + 2*N*H*D          (GQA: k and v have K heads)
    attention scores + values  2*2*S*d_attn,   S = keys per query (below)
    llama MLP (SwiGLU)         3 * 2*D*F                              (gate, up, down)
    llama MoE                  2*D*E (router) + k * 3 * 2*D*F         (only the k active experts)
    gpt2 MLP                   2 * 2*D*F ; gpt2 qkv/o 2*D*3D + 2*D*D
    LM head (once per token)   2*D*V                                  (tied or not; embedding lookups are free)

Keys per query S: `causal_halving=False` (default; the PaLM appendix-B convention "6N + 12*L*H*Q*T" and MaxText's
before its PR #1988) counts S = T, i.e. the full T x T score matrix although causality masks half of it;
`causal_halving=True` counts the keys a causal query actually sees on average, S = (T + 1) / 2 (MaxText's
current convention up to the +1). With a sliding window W < T: S = W, resp. the exact mean of min(t + 1, W).
Training = 3 x forward (the backward pass costs two matmuls per forward matmul); norms, softmax, activations
and the optimizer update are not counted.

    fpt = flops_per_token(cfg, seq_len=2048)                        # training, PaLM convention
    fpt = flops_per_token_of_model(model, seq_len=2048)             # the same, after checking model against model.cfg
    util = mfu(tokens_per_s, fpt, jax.device_count(), peak_flops_per_device())   # None on CPU
"""
from __future__ import annotations

from typing import Any, Mapping

from flax import nnx

from configurable_fm.models.gpt2 import GPT2Config
from configurable_fm.models.llama import LlamaConfig


def _keys_per_query(seq_len: int, window: int | None, causal_halving: bool) -> float:
    w = seq_len if window is None else min(window, seq_len)
    if not causal_halving:
        return float(w)
    # mean over t = 0..T-1 of min(t + 1, w) = (sum_{t<w} (t + 1) + (T - w) * w) / T
    return (w * (w + 1) / 2 + (seq_len - w) * w) / seq_len


def _checked_config(model: nnx.Module):
    """model.cfg, after checking that the module tree agrees with it (models.InconsistentModel otherwise)."""
    from configurable_fm.models.structure import check_consistent

    check_consistent(model, "flops_per_token")
    return model.cfg


def flops_breakdown(cfg, seq_len: int, *, causal_halving: bool = False,
                    moe_experts_computed: int | None = None) -> dict[str, float]:
    """Forward FLOPs per token, by part, summed over layers: {'qkvo', 'attention', 'mlp', 'router', 'lm_head'}.

    `cfg`: a llama/gpt2 config, its dict, or a model (checked against its config first: the count is the config's).

    `moe_experts_computed` replaces the k active experts of a MoE layer (default `num_experts_per_tok`); pass
    `num_experts` for the FLOPs this repository's dense MoE combine actually executes.
    """
    if isinstance(cfg, nnx.Module):
        cfg = _checked_config(cfg)
    if isinstance(cfg, Mapping):
        from configurable_fm.models.factory import config_from_dict

        cfg = config_from_dict(cfg)
    if seq_len < 1:
        raise ValueError(f"seq_len must be positive, got {seq_len}")
    if isinstance(cfg, LlamaConfig):
        d, n, kv, h, f = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.dim_per_head, cfg.intermediate_size
        qkvo = 2 * d * n * h + 2 * 2 * d * kv * h + 2 * n * h * d
        if cfg.num_experts:
            active = cfg.num_experts_per_tok if moe_experts_computed is None else moe_experts_computed
            mlp, router = active * 3 * 2 * d * f, 2 * d * cfg.num_experts
        else:
            mlp, router = 3 * 2 * d * f, 0
        window = cfg.sliding_window
    elif isinstance(cfg, GPT2Config):
        d, n, h, f = cfg.n_embd, cfg.n_head, cfg.dim_per_head, cfg.intermediate_size
        qkvo = 2 * d * 3 * d + 2 * d * d
        mlp, router, window = 2 * 2 * d * f, 0, None
    else:
        raise TypeError(f"flops_per_token supports LlamaConfig and GPT2Config, not {type(cfg).__name__}")
    layers = cfg.num_layers
    attention = 2 * 2 * _keys_per_query(seq_len, window, causal_halving) * n * h
    return {"qkvo": float(layers * qkvo), "attention": float(layers * attention), "mlp": float(layers * mlp),
            "router": float(layers * router), "lm_head": float(2 * d * cfg.vocab_size)}


def flops_per_token(cfg, seq_len: int, *, training: bool = True, causal_halving: bool = False,
                    moe_experts_computed: int | None = None) -> float:
    """Model FLOPs per token of a llama/gpt2 config (or its dict, or a model) at sequence length `seq_len`.

    Sum of `flops_breakdown` (the module docstring gives every term), times 3 when `training`.
    """
    if isinstance(cfg, nnx.Module):
        cfg = _checked_config(cfg)
    total = sum(flops_breakdown(cfg, seq_len, causal_halving=causal_halving,
                                moe_experts_computed=moe_experts_computed).values())
    return 3 * total if training else total


def flops_per_token_of_model(model: nnx.Module, seq_len: int, *, training: bool = True,
                             causal_halving: bool = False, moe_experts_computed: int | None = None) -> float:
    """`flops_per_token(model.cfg, ...)` after checking that the model's tree agrees with its config
    (models.InconsistentModel otherwise): a count from a stale config would be silently wrong.

    Extension modules (adapters, masks) are not counted: the count is that of the config-built model."""
    return flops_per_token(_checked_config(model), seq_len, training=training, causal_halving=causal_halving,
                           moe_experts_computed=moe_experts_computed)


# Dense (no structured sparsity) peak FLOP/s per device, from the vendors' datasheets. NVIDIA lists tensor-core
# figures "with sparsity" (*); the dense figure is half of it.
#   H100 SXM5 and H200 SXM (NVIDIA H100 / H200 datasheets): BF16/FP16 1,979*, FP8 3,958*, TF32 989* TFLOPS,
#     FP32 67 -> dense 989 / 1979 / 494.5 TFLOP/s (989 is also MaxText's figure for a3mega/a3ultra). GH200's
#     GPU is an H100-class Hopper with the same figures.
#   H100 PCIe: BF16 1,513*, FP8 3,026*, TF32 756*, FP32 51.  H100 NVL / H200 NVL: BF16 1,671*, FP8 3,341*,
#     TF32 835*, FP32 60.
#   A100 (SXM4 and PCIe, 40/80 GB; NVIDIA A100 datasheet): BF16/FP16 312, TF32 156, FP32 19.5 TFLOPS (dense).
#   Cloud TPU system-architecture pages, per chip, BF16: v4 275, v5e 197, v5p 459, v6e (Trillium) 918 TFLOP/s;
#     int8: v5e 394, v5p 918, v6e 1836. (MaxText's benchmarks/upload_metrics_to_bq.py uses the same BF16 figures.)
_HOPPER_SXM = {"bfloat16": 989e12, "float16": 989e12, "float8": 1979e12, "tf32": 494.5e12, "float32": 67e12}
_HOPPER_NVL = {"bfloat16": 835.5e12, "float16": 835.5e12, "float8": 1670.5e12, "tf32": 417.5e12, "float32": 60e12}
_PEAKS: list[tuple[tuple[str, ...], dict[str, float]]] = [
    # (substrings of the lower-cased device_kind, all required), {dtype: FLOP/s}; the first match wins.
    (("h100", "pcie"), {"bfloat16": 756.5e12, "float16": 756.5e12, "float8": 1513e12, "tf32": 378e12,
                        "float32": 51e12}),
    (("h100", "nvl"), _HOPPER_NVL),
    (("h200", "nvl"), _HOPPER_NVL),
    (("h100",), _HOPPER_SXM),  # "NVIDIA H100 80GB HBM3"
    (("h200",), _HOPPER_SXM),  # "NVIDIA H200", and "NVIDIA GH200 480GB"
    (("a100",), {"bfloat16": 312e12, "float16": 312e12, "tf32": 156e12, "float32": 19.5e12}),
    (("tpu v4",), {"bfloat16": 275e12}),
    (("tpu v5 lite",), {"bfloat16": 197e12, "int8": 394e12}),  # v5e
    (("tpu v5e",), {"bfloat16": 197e12, "int8": 394e12}),
    (("tpu v5",), {"bfloat16": 459e12, "int8": 918e12}),  # v5p reports "TPU v5" (or "TPU v5p")
    (("tpu v6",), {"bfloat16": 918e12, "int8": 1836e12}),  # v6e reports "TPU v6 lite"
]

_DTYPE_ALIASES = {"bf16": "bfloat16", "fp16": "float16", "half": "float16", "fp32": "float32",
                  "fp8": "float8", "float8_e4m3fn": "float8", "float8_e5m2": "float8"}


def peak_flops_per_device(device: Any = None, dtype: str = "bfloat16") -> float | None:
    """Dense peak FLOP/s of one device for `dtype`, or None when unknown (CPU, an unlisted chip or dtype).

    `device`: a jax Device (default `jax.devices()[0]`) or its `device_kind` string ("NVIDIA H200", "TPU v5 lite").
    None means MFU is not available; it is never guessed.
    """
    if device is None:
        import jax

        device = jax.devices()[0]
    if isinstance(device, str):
        kind = device
    else:
        if getattr(device, "platform", "") == "cpu":
            return None
        kind = getattr(device, "device_kind", "")
    kind = kind.lower()
    dtype = _DTYPE_ALIASES.get(str(dtype), str(dtype))
    for needles, peaks in _PEAKS:
        if all(s in kind for s in needles):
            return peaks.get(dtype)
    return None


def matmul_peak_dtype(compute_dtype: str, device: Any = None) -> str | None:
    """The row of the peak table that matmuls in `compute_dtype` run at, under jax_default_matmul_precision:
    bfloat16 / float16 themselves; float32 at the default precision (or 'tensorfloat32' / 'high') on an NVIDIA
    GPU 'tf32' (XLA runs float32 dots on TF32 tensor cores from Ampere on), on a TPU at the default (or
    'bfloat16') 'bfloat16' (one bf16 pass); 'highest' / 'float32' 'float32'. None for any other combination
    (MFU unknown rather than guessed). `device`: as peak_flops_per_device."""
    import jax

    dtype = _DTYPE_ALIASES.get(str(compute_dtype), str(compute_dtype))
    if dtype != "float32":
        return dtype
    precision = str(jax.config.jax_default_matmul_precision or "default").lower()
    if precision in ("highest", "float32"):
        return "float32"
    device = jax.devices()[0] if device is None else device
    kind = (device if isinstance(device, str) else getattr(device, "device_kind", "")).lower()
    if "tpu" in kind:
        return "bfloat16" if precision in ("default", "bfloat16", "fastest") else None
    if "nvidia" in kind or any(chip in kind for chip in ("h100", "h200", "a100")):
        return "tf32" if precision in ("default", "tensorfloat32", "high") else None
    return None


def mfu(tokens_per_s: float, flops_per_token: float, n_devices: int, peak: float | None) -> float | None:
    """Model-FLOPs utilisation tokens_per_s * flops_per_token / (n_devices * peak); None when `peak` is None."""
    if peak is None:
        return None
    if n_devices < 1 or peak <= 0:
        raise ValueError(f"need n_devices >= 1 and peak > 0, got n_devices={n_devices}, peak={peak}")
    return tokens_per_s * flops_per_token / (n_devices * peak)
