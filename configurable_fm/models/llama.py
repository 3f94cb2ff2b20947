"""The llama decoder family: Llama 2/3, Mistral, Qwen2, SmolLM2, and Mixtral-style sparse MoE.

RMSNorm -> attention (RoPE, MHA/GQA/MQA, optional q/k/v bias, optional sliding window) -> residual ->
RMSNorm -> SwiGLU MLP or sparse MoE -> residual; final RMSNorm; tied (embedding.attend) or untied head.

Parameter paths mirror transformers' module names without the `model.` prefix, e.g.
`layers.3.self_attn.q_proj.kernel` (embed, heads) or `layers.3.mlp.down_proj.kernel` (mlp, embed).

Tap points (configurable_fm.analysis): every module's `<path>.input` / `<path>.output` (`layers.3.output` is the
residual stream after layer 3), plus `layers.3.mlp.hidden` (act(gate) * up, (B, T, F)), `layers.3.self_attn.heads`
(per-head attention outputs before o_proj, (B, T, N, H)) and, for MoE layers, `layers.3.mlp.router_logits`.
While a tap context is active the layers run without remat (a nested checkpoint would hide the taps).

Scanned layers (`scan_layers=True`, a runtime option like `remat`, never part of the config or a checkpoint). The
module tree stays the truth: `model.layers` is still the list of per-layer modules at `layers.N...`, so checkpoints,
HF export, bricks, growing, merging and adapters see no difference. At call time, in cache-free forwards (training,
scoring) with no tap context and no routing-noise context active, every maximal run of two or more consecutive
layers that `layer_runs` finds identical in structure (one graphdef: module classes, static attributes, extensions;
one state structure with the same variable types, metadata, shapes and dtypes) is run as one `jax.lax.scan` over
the layers' stacked states (nnx.split each layer, jnp.stack leaf by leaf; the body merges one layer's slice and
calls it, under `jax.checkpoint` with the model's remat policy), so XLA compiles one layer body instead of
num_layers copies. Gradients reach each layer's own variables through the stack (jnp.stack's gradient slices
them back). The stack is a copy of the run's variables (and its gradient one more) while the step runs. Per-layer
computation is the same as the loop's (tests/models/test_scan_layers.py says where XLA's fusion makes the last bit
differ); runs of one layer (e.g. the one layer that carries an adapter or was widened) are called directly, as the
loop does. The loop is used instead:
  - with a KV cache (prefill and cached decoding): a scan would stack and unstack the whole cache every step;
  - while a tap context is active (capture/intervention points name each layer; the scan body is traced once);
  - inside `routing_noise` (noisy_topk draws from fold_in(key, i) for the i-th call, counted while tracing);
  - inside `loop_layers()` (bricks.adapters.lora_dropout enters it: its draws are counted while tracing too, so
    a scan would give every layer of a run the same dropout masks);
  - for a run whose layer changes its own variables when called, or whose output dtype or shape differs from its
    input (found while tracing; that run's scan is discarded and the loop runs it).
"""
from __future__ import annotations

import contextlib
import contextvars
import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from configurable_fm.checks import is_real
from configurable_fm.models import attention as attn
from configurable_fm.models import one_token_layer
from configurable_fm.models.layers import CausalLM, Embed, Linear, RMSNorm, activation, project
from configurable_fm.models.moe import ROUTERS, SparseMoE, noise_active
from configurable_fm.models.one_token import layer_options
from configurable_fm.models.taps import active as taps_active, tap, tapped


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int | None = None  # defaults to hidden_size // num_heads
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: attn.RopeScaling | None = None
    attention_bias: bool = False  # q/k/v bias (Qwen2, Llama's attention_bias)
    o_proj_bias: bool = False  # Llama's attention_bias also biases o_proj; Qwen2's does not
    mlp_bias: bool = False
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 2048
    hidden_act: str = "silu"
    sliding_window: int | None = None
    # Mixtral-style sparse MoE in place of the MLP (num_experts == 0 means dense).
    num_experts: int = 0
    num_experts_per_tok: int = 2
    router: str = "topk_softmax"  # or softmax_topk, noisy_topk, expert_choice (models/moe.py)
    router_capacity_factor: float | None = None  # token-choice capacity per row (None: none); expert choice's C
    # Informational: which HF architecture this config came from / is written as.
    architecture: str = "LlamaForCausalLM"

    def __post_init__(self):
        for name in ("num_heads", "num_kv_heads"):
            if not getattr(self, name) >= 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)!r}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}")
        if self.router not in ROUTERS:
            raise ValueError(f"router must be one of {list(ROUTERS)}, got {self.router!r}")
        e, k = self.num_experts, self.num_experts_per_tok
        if e < 0:
            raise ValueError(f"num_experts must be >= 0 (0: a dense MLP), got {e!r}")
        if e and not (k >= 1 and (k <= e or self.router == "expert_choice")):
            raise ValueError(f"num_experts_per_tok={k!r} must be in 1..num_experts={e} (router {self.router!r} "
                             "picks that many of the experts per token)")
        cf = self.router_capacity_factor
        if cf is not None and (not is_real(cf) or not cf > 0):
            raise ValueError(f"router_capacity_factor must be None or a number > 0, got {cf!r}")

    @property
    def dim_per_head(self) -> int:
        return self.head_dim or self.hidden_size // self.num_heads


class LlamaAttention(nnx.Module):
    def __init__(self, cfg: LlamaConfig, *, rngs: nnx.Rngs, param_dtype=jnp.float32, dtype=None):
        d, h = cfg.hidden_size, cfg.dim_per_head
        kw = dict(rngs=rngs, param_dtype=param_dtype, dtype=dtype)
        self.q_proj = Linear(d, cfg.num_heads * h, axes=("embed", "heads"), use_bias=cfg.attention_bias, **kw)
        self.k_proj = Linear(d, cfg.num_kv_heads * h, axes=("embed", "kv_heads"), use_bias=cfg.attention_bias, **kw)
        self.v_proj = Linear(d, cfg.num_kv_heads * h, axes=("embed", "kv_heads"), use_bias=cfg.attention_bias, **kw)
        self.o_proj = Linear(cfg.num_heads * h, d, axes=("heads", "embed"), use_bias=cfg.o_proj_bias, **kw)
        self.cfg = cfg

    @tapped
    def __call__(self, x_BxTxD, positions_BxT, *, mask=None, is_causal=False, cache=None, layer=0):
        cfg = self.cfg
        b, t, _ = x_BxTxD.shape
        q, k, v = project((self.q_proj, self.k_proj, self.v_proj), x_BxTxD)  # one matmul in fuse_projections()
        q = q.reshape(b, t, cfg.num_heads, cfg.dim_per_head)
        k = k.reshape(b, t, cfg.num_kv_heads, cfg.dim_per_head)
        v = v.reshape(b, t, cfg.num_kv_heads, cfg.dim_per_head)
        inv_freq = attn.rope_inverse_frequencies(cfg.dim_per_head, cfg.rope_theta, cfg.rope_scaling)
        q, k = attn.apply_rope(q, positions_BxT, inv_freq), attn.apply_rope(k, positions_BxT, inv_freq)
        if cache is not None:
            cache, k, v = attn.write_cache(cache, layer, k, v)
        out_BxTxNxH = tap(self, "heads", attn.dot_product_attention(q, k, v, mask=mask, is_causal=is_causal))
        return self.o_proj(out_BxTxNxH.reshape(b, t, -1)), cache


class LlamaMLP(nnx.Module):
    """SwiGLU: down(h), h = act(gate(x)) * up(x) (B, T, F) the tap point `hidden`."""

    def __init__(self, cfg: LlamaConfig, *, rngs: nnx.Rngs, param_dtype=jnp.float32, dtype=None):
        d, f = cfg.hidden_size, cfg.intermediate_size
        kw = dict(rngs=rngs, param_dtype=param_dtype, dtype=dtype, use_bias=cfg.mlp_bias)
        self.gate_proj = Linear(d, f, axes=("embed", "mlp"), **kw)
        self.up_proj = Linear(d, f, axes=("embed", "mlp"), **kw)
        self.down_proj = Linear(f, d, axes=("mlp", "embed"), **kw)
        self.act = cfg.hidden_act

    @tapped
    def __call__(self, x_BxTxD):
        gate, up = project((self.gate_proj, self.up_proj), x_BxTxD)  # one matmul in fuse_projections()
        hidden_BxTxF = tap(self, "hidden", activation(self.act)(gate) * up)
        return self.down_proj(hidden_BxTxF)


class LlamaDecoderLayer(nnx.Module):
    def __init__(self, cfg: LlamaConfig, *, rngs: nnx.Rngs, param_dtype=jnp.float32, dtype=None):
        kw = dict(rngs=rngs, param_dtype=param_dtype, dtype=dtype)
        self.input_layernorm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, param_dtype=param_dtype)
        self.self_attn = LlamaAttention(cfg, **kw)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, param_dtype=param_dtype)
        self.mlp = SparseMoE(cfg, **kw) if cfg.num_experts else LlamaMLP(cfg, **kw)

    @tapped
    def __call__(self, x_BxTxD, positions_BxT, *, mask=None, is_causal=False, cache=None, layer=0):
        fused = one_token_decoder_layer(self, x_BxTxD, positions_BxT, mask, cache, layer)
        if fused is not None:
            return fused
        h, cache = self.self_attn(self.input_layernorm(x_BxTxD), positions_BxT, mask=mask,
                                  is_causal=is_causal, cache=cache, layer=layer)
        x_BxTxD = x_BxTxD + h
        return x_BxTxD + self.mlp(self.post_attention_layernorm(x_BxTxD)), cache


def one_token_decoder_layer(layer: LlamaDecoderLayer, x_BxTxD, positions_BxT, mask, cache, index: int):
    """(x after the layer, cache) computed by models/one_token_layer.py's kernels, or None where they do not apply:
    outside one_token_matmuls() with options.layers (or on a CPU without interpret), more than one token, no
    KVCache or mask, a tap context, a layer that is not plain (exact types: an adapter, an MoE or a masked module
    computes something else), mixed compute dtypes or biases, or shapes the kernels do not take (`fits`)."""
    found = layer_options()
    if (found is None or cache is None or mask is None or not isinstance(cache, attn.KVCache)
            or x_BxTxD.shape[:2] != (1, 1) or taps_active()):
        return None
    options, interpret = found
    sa, mlp = layer.self_attn, layer.mlp
    if not (type(sa) is LlamaAttention and type(mlp) is LlamaMLP and type(layer.input_layernorm) is RMSNorm
            and type(layer.post_attention_layernorm) is RMSNorm):
        return None
    projections = dict(q=sa.q_proj, k=sa.k_proj, v=sa.v_proj, o=sa.o_proj, gate=mlp.gate_proj, up=mlp.up_proj,
                       down=mlp.down_proj)
    if any(type(m) is not Linear for m in projections.values()):
        return None
    dtypes = {m.dtype or jnp.result_type(x_BxTxD, m.kernel[...]) for m in projections.values()}
    biased = lambda *names: {projections[n].bias is not None for n in names}
    cfg = sa.cfg
    if (len(dtypes) != 1 or len(biased("q", "k", "v")) != 1 or len(biased("gate", "up")) != 1
            or not one_token_layer.fits(cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.dim_per_head,
                                        cfg.intermediate_size, mlp.act, options)):
        return None
    w = dict(ln_1=layer.input_layernorm.weight[...], ln_2=layer.post_attention_layernorm.weight[...])
    for name, m in projections.items():
        w[name] = m.kernel[...]
        if m.bias is not None:
            w[name + "_bias"] = m.bias[...]
    x, k, v = one_token_layer.decoder_layer(
        x_BxTxD, positions_BxT[0, 0], cache.index, mask.reshape(-1), cache.k[index], cache.v[index], w,
        heads=cfg.num_heads, kv_heads=cfg.num_kv_heads, head_dim=cfg.dim_per_head, act=mlp.act,
        eps_1=layer.input_layernorm.eps, eps_2=layer.post_attention_layernorm.eps,
        inv_freq=attn.rope_inverse_frequencies(cfg.dim_per_head, cfg.rope_theta, cfg.rope_scaling),
        dtype=dtypes.pop(), options=options, interpret=interpret)
    ks, vs = list(cache.k), list(cache.v)
    ks[index], vs[index] = k, v
    return x, dataclasses.replace(cache, k=ks, v=vs)


# Rematerialisation policies for training: what each decoder layer keeps for the backward pass.
REMAT_POLICIES = {
    "none": None,  # no remat: keep every activation
    "full": jax.checkpoint_policies.nothing_saveable,  # keep only the layer inputs
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,  # keep matmul outputs, recompute the rest
}


def _remat_layer(layer, x, positions, mask, is_causal, policy):
    graphdef, state = nnx.split(layer)

    def run(state, x, positions, mask):
        return nnx.merge(graphdef, state)(x, positions, mask=mask, is_causal=is_causal)[0]

    return jax.checkpoint(run, policy=policy)(state, x, positions, mask)


def _scan_signature(layer):
    """What must agree for two layers to share one scan body: graphdef, state tree (variable types and metadata),
    leaf shapes and dtypes."""
    graphdef, state = nnx.split(layer)
    leaves, treedef = jax.tree.flatten(state)
    return graphdef, treedef, tuple((tuple(jnp.shape(v)), jnp.result_type(v)) for v in leaves)


_LOOP: contextvars.ContextVar[int] = contextvars.ContextVar("llama_loop_layers", default=0)


@contextlib.contextmanager
def loop_layers():
    """Inside the block, cache-free forwards run the layer loop even with scan_layers (module docstring): for code
    that draws from fold_in(key, i) for its i-th call, counted while tracing (a scan body is traced once)."""
    token = _LOOP.set(_LOOP.get() + 1)
    try:
        yield
    finally:
        _LOOP.reset(token)


def layer_runs(layers) -> list[tuple[int, int]]:
    """[(start, stop), ...]: `layers` cut into maximal runs of consecutive layers with one graphdef (module classes,
    static attributes, extensions) and one state structure (variable types, metadata, shapes, dtypes); a
    scanned forward runs each run of two or more layers as one `jax.lax.scan` (module docstring)."""
    runs: list[tuple[int, int]] = []
    start, first = 0, None
    for i, layer in enumerate(layers):
        sig = _scan_signature(layer)
        if first is None or sig != first:
            if first is not None:
                runs.append((start, i))
            start, first = i, sig
    if first is not None:
        runs.append((start, len(layers)))
    return runs


def _scan_run(layers, x, positions, mask, is_causal, policy):
    """x after `layers` (identical in structure) as one jax.lax.scan over their stacked states, or None when the
    scan cannot reproduce the loop: a layer that changes its variables when called, or whose output differs from
    its input in dtype or shape (a scan carry cannot)."""
    graphdef, first = nnx.split(layers[0])
    out = jax.eval_shape(lambda s, x: nnx.merge(graphdef, s)(x, positions, mask=mask, is_causal=is_causal)[0],
                         first, x)
    if out.shape != x.shape or out.dtype != x.dtype:
        return None
    stacked = jax.tree.map(lambda *leaves: jnp.stack(leaves), first, *(nnx.split(l)[1] for l in layers[1:]))
    mutated = []

    def body(x, state):
        before = jax.tree.leaves(state)  # merge may reuse state's Variables: read the values before the call
        layer = nnx.merge(graphdef, state)
        y = layer(x, positions, mask=mask, is_causal=is_causal)[0]
        after = jax.tree.leaves(nnx.split(layer)[1])
        if len(before) != len(after) or any(a is not b for a, b in zip(before, after)):
            mutated.append(True)
        return y, None

    if policy is not None:
        body = jax.checkpoint(body, policy=policy, prevent_cse=False)
    y, _ = jax.lax.scan(body, x, stacked)
    return None if mutated else y


class Llama(CausalLM):
    """Causal LM. `model(ids_BxT)` -> logits (B, T, V); with `cache=` -> (logits, new cache).

    remat: one of REMAT_POLICIES, applied per decoder layer in cache-free (training) forwards.
    scan_layers: run runs of identical layers as one jax.lax.scan in cache-free forwards (module docstring); the
    parameters, their paths and the results are those of the loop.
    """

    def __init__(self, cfg: LlamaConfig, *, rngs: nnx.Rngs, param_dtype=jnp.float32, dtype=None,
                 remat: str = "none", scan_layers: bool = False):
        if remat not in REMAT_POLICIES:
            raise ValueError(f"remat={remat!r} is unknown; choose one of {sorted(REMAT_POLICIES)}")
        if not isinstance(scan_layers, bool):
            raise ValueError(f"scan_layers={scan_layers!r} must be True or False")
        kw = dict(rngs=rngs, param_dtype=param_dtype, dtype=dtype)
        self.cfg = cfg
        self.remat = remat
        self.scan_layers = scan_layers
        self.embed_tokens = Embed(cfg.vocab_size, cfg.hidden_size, **kw)
        self.layers = nnx.List([LlamaDecoderLayer(cfg, **kw) for _ in range(cfg.num_layers)])
        self.norm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, param_dtype=param_dtype)
        self.lm_head = None if cfg.tie_word_embeddings else Linear(
            cfg.hidden_size, cfg.vocab_size, axes=("embed", "vocab"), **kw)

    def hidden_states(self, ids_BxT, *, attention_mask=None, positions=None, cache=None, inputs_embeds=None):
        """Final-norm hidden states (B, T, D), and the updated cache (None without one).

        inputs_embeds (B, T, D): the input vectors in place of `embed_tokens(ids_BxT)` (ids_BxT is then ignored and
        may be None), e.g. prompt tuning's virtual tokens."""
        cfg = self.cfg
        x = self.embed_tokens(ids_BxT) if inputs_embeds is None else inputs_embeds
        if x.ndim != 3:
            raise ValueError(f"ids must have shape (batch, length) (inputs_embeds (batch, length, hidden)), got "
                             f"{tuple(jnp.shape(ids_BxT if inputs_embeds is None else inputs_embeds))}")
        stream_dtype = x.dtype
        b, t = x.shape[:2]
        offset = cache.index if cache is not None else 0
        if positions is None:
            positions = jnp.broadcast_to(offset + jnp.arange(t), (b, t))
        mask, is_causal = attn.decoder_mask(t, attention_mask_BxT=attention_mask, cache=cache,
                                            sliding_window=cfg.sliding_window)
        policy = REMAT_POLICIES[self.remat]
        scan = cache is None and self.scan_layers and not taps_active() and not noise_active() and not _LOOP.get()
        for start, stop in layer_runs(self.layers) if scan else [(0, len(self.layers))]:
            scanned = None
            if scan and stop - start > 1:
                scanned = _scan_run(self.layers[start:stop], x, positions, mask, is_causal, policy)
            if scanned is not None:
                x = scanned
                continue
            for i in range(start, stop):  # the loop
                if cache is None and policy is not None and not taps_active():
                    x = _remat_layer(self.layers[i], x, positions, mask, is_causal, policy)
                else:
                    x, cache = self.layers[i](x, positions, mask=mask, is_causal=is_causal, cache=cache, layer=i)
        if cache is not None:
            cache = attn.advance_cache(cache, attention_mask, t)
        if cache is not None and layer_options() is not None:  # one-token layers carry the residual stream in
            x = x.astype(stream_dtype)  # float32 (OneTokenMatmuls.residual_atomic): back to the embeddings' dtype
        return self.norm(x), cache

    def logits(self, h_BxTxD):
        return self.embed_tokens.attend(h_BxTxD) if self.lm_head is None else self.lm_head(h_BxTxD)

    def init_cache(self, batch: int, max_len: int, dtype=None) -> attn.KVCache:
        cfg = self.cfg
        return attn.KVCache.empty(cfg.num_layers, batch, max_len, cfg.num_kv_heads, cfg.dim_per_head,
                                   dtype or self.embed_tokens.embedding.dtype)
