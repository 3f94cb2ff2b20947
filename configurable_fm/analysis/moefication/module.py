"""The MoEfied FFN: a dense FFN's neurons regrouped into E experts, of which each token uses the shared ones and the
top-k routed ones, each with weight 1 (MoEfication keeps the neurons' own values).

It replaces the FFN at its path (`layers.<i>.mlp` of a llama-family model, `h.<i>.mlp` of GPT-2) as an extension
module of kind 'moefied_mlp' (models/structure.py), registered when this package is imported: the model's config
stays the dense one (intermediate_size F = E m), the options below say how the module regroups it, so
`check_consistent`, orbax checkpoints (save_model / load_model, after importing configurable_fm.analysis.moefication)
and `config_from_tree` (through `structure_base()`: the dense FFN it is equivalent to) all work.

Variables, E experts of m neurons, the first S of them shared, R = E - S routed, D the model width:
    gate_proj (E, D, m)   gate columns of each expert's neurons (SwiGLU only)
    up_proj   (E, D, m)   up columns (GPT-2: c_fc columns)
    down_proj (E, m, D)   down rows (GPT-2: c_proj rows)
    gate_bias, up_bias (E, m); down_bias (D,)    when the dense FFN has biases (GPT-2; llama mlp_bias)
    neurons   (E, m) int32, a NeuronIndex (not a parameter): the dense index of the neuron at each column
    router    the routed experts' scores (below)
Forward, x (..., D):
    h_e = act(x G_e + b^g_e) * (x U_e + b^u_e)    (SwiGLU)     or   act(x U_e + b^u_e)   (GPT-2)     (..., E, m)
    s = router(x, h) (..., R);  chosen = the top_k of s (ties: lower index);  c_e = 1 for shared and chosen experts
    y = sum_e c_e h_e D_e + b^d
With top_k = R every c_e = 1 and y = sum_i h_i d_i + b^d, the dense FFN (up to the order of the float sums).
The experts are computed densely and masked (E / k times the FLOPs of a dispatching kernel, as models/moe.py).
The attribute `dispatch` (a runtime execution choice, not an option: not in the structure spec nor a checkpoint)
switches this forward: 'masked' (the default, above), 'gather' or 'pallas', which compute only the shared and chosen
experts for inference (dispatch.py; set by dispatch.with_dispatch; `dispatch_options` the Pallas options).

Gradient of the routing (what router-only recovery fine-tuning trains on, experiments/analysis/moefy_recover.py):
the top-k mask has zero derivative in the scores, so the forward uses the straight-through weights
    c~_e = c_e + (p_e - stop_gradient(p_e)),   p = softmax(s) over the routed experts (0 added for shared ones)
whose value is exactly c_e (p - p = 0 in floating point), so the function is unchanged, and whose derivative gives
    dL/ds_j = p_j (g_j - sum_e p_e g_e),       g_e = dL/dc_e = sum_tokens <h_e D_e, dL/dy>
(every expert's g_e exists: the experts are computed densely): the scores of experts whose output would lower the
loss more than the p-weighted average rise. Not for the oracle router (no parameters) nor with top_k = R (every
expert on: the routing is constant). The experts' own gradients are those of the hard mask; the FFN input x (and
so everything before it, e.g. an attention LoRA) also receives the router's term through s(x).

Routers (scores of the R routed experts; top-k of them is used):
    oracle    s_e = ||h_e||_2, the activation mass of the expert (MoEfication's ground-truth selection, with the
              L2 norm since SwiGLU activations are signed); no parameters; needs the activations, so no speed-up
    centroid  s_e = <x / ||x||, c_e>, kernel (D, R) = [c_1 .. c_R], c_e = the mean of the expert's L2-normalised
              input rows (gate rows for SwiGLU, c_fc rows for GPT-2): training-free and data-free (MoEfication's
              ParamCenter; its score -||x^ - c_e||^2 = 2 <x^, c_e> - ||c_e||^2 - 1 also subtracts ||c_e||^2, left
              out here so that the ranking is that of the linear score x . c_e, which a Mixtral gate can express)
    mlp       s = tanh(x^ W1 + b1) W2 + b2, x^ = x / ||x||, W1 (D, H), W2 (H, R) (MoEfication's MLP router), trained
              to predict each expert's normalised activation mass (routers.py)
Router arithmetic is float32.

Tap points (configurable_fm.analysis), for a module at `<path>`: `<path>.hidden` h of every expert (..., E, m)
(before the routing mask, as models/moe.py), `<path>.router_logits` s (..., R), `<path>.router.{input, output}`,
and the module's `input` / `output`.
"""
from __future__ import annotations

import types

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from configurable_fm.models.gpt2 import GPT2MLP
from configurable_fm.models.layers import activation, param
from configurable_fm.models.llama import LlamaMLP
from configurable_fm.models.moe import expert_weight
from configurable_fm.models.structure import fill, register_extension
from configurable_fm.models.taps import tap, tapped

KIND = "moefied_mlp"
ROUTERS = ("oracle", "centroid", "mlp")
HIGHEST = jax.lax.Precision.HIGHEST
DENSE_TYPES = (LlamaMLP, GPT2MLP)


class NeuronIndex(nnx.Variable):
    """The dense neuron index of each expert column, (E, m) int32: not a parameter (no gradient, not trained)."""


def unit_rows(x, eps: float = 1e-12):
    """x / ||x|| over the last axis, in float32 (a zero vector stays zero)."""
    x = x.astype(jnp.float32)
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), eps)


def expert_mass(hidden_ExM):
    """||h_e||_2 over each expert's neurons: (..., E, m) -> (..., E) float32."""
    h = hidden_ExM.astype(jnp.float32)
    return jnp.sqrt(jnp.sum(h * h, axis=-1))


def top_k_mask(scores, k: int):
    """(..., R) float32 with 1 at the k largest scores (ties: lower index), 0 elsewhere."""
    _, idx = jax.lax.top_k(scores, k)
    return jnp.sum(jax.nn.one_hot(idx, scores.shape[-1], dtype=jnp.float32), axis=-2)


def expert_activations(x, up_ExDxM, up_bias_ExM, gate_ExDxM, gate_bias_ExM, *, act: str, dtype):
    """h (..., E, m) = act(x G_e + b^g_e) * (x U_e + b^u_e) (gate None: act(x U_e + b^u_e)) in `dtype`, for the
    experts whose weights are given (all of a MoefiedMLP's, or a gathered subset: dispatch.gather_ffn); biases may
    be None."""
    xd = x.astype(dtype)

    def proj(w, b):
        y = jnp.einsum("...d,edm->...em", xd, w.astype(dtype))
        return y if b is None else y + b.astype(dtype)

    up = proj(up_ExDxM, up_bias_ExM)
    fn = activation(act)
    return fn(proj(gate_ExDxM, gate_bias_ExM)) * up if gate_ExDxM is not None else fn(up)


def expert_sum(hidden, weights, down_ExMxD, down_bias_D=None):
    """y (..., D) = sum_e c_e h_e D_e + b^d in hidden's dtype: hidden (..., E, m), weights c (..., E), down (E, m, D)
    (all experts, or a gathered subset with its weights)."""
    dtype = hidden.dtype
    y = jnp.einsum("...em,emd->...d", hidden * weights[..., None].astype(dtype), down_ExMxD.astype(dtype))
    return y if down_bias_D is None else y + down_bias_D.astype(dtype)


class OracleRouter(nnx.Module):
    """s_e = ||h_e||_2 (module docstring); no parameters."""

    kind = "oracle"

    @tapped
    def __call__(self, x_BxTxD, hidden_BxTxRxM):
        return expert_mass(hidden_BxTxRxM)


class CentroidRouter(nnx.Module):
    """s = (x / ||x||) @ kernel, kernel (D, R) the experts' centroids of normalised input rows."""

    kind = "centroid"

    def __init__(self, kernel):
        self.kernel = param(kernel, ("embed", "experts"))

    @tapped
    def __call__(self, x_BxTxD, hidden_BxTxRxM):
        return jnp.dot(unit_rows(x_BxTxD), self.kernel[...].astype(jnp.float32), precision=HIGHEST)


class MLPRouter(nnx.Module):
    """s = tanh(x^ w1 + b1) w2 + b2, x^ = x / ||x||; w1 (D, H), b1 (H,), w2 (H, R), b2 (R,)."""

    kind = "mlp"

    def __init__(self, w1, b1, w2, b2):
        self.w1 = param(w1, ("embed", None))
        self.b1 = param(b1, (None,))
        self.w2 = param(w2, (None, "experts"))
        self.b2 = param(b2, ("experts",))

    @tapped
    def __call__(self, x_BxTxD, hidden_BxTxRxM):
        f32 = lambda v: v[...].astype(jnp.float32)  # noqa: E731
        hid = jnp.tanh(jnp.dot(unit_rows(x_BxTxD), f32(self.w1), precision=HIGHEST) + f32(self.b1))
        return jnp.dot(hid, f32(self.w2), precision=HIGHEST) + f32(self.b2)


def make_router(kind: str, d: int, routed: int, hidden: int, dtype):
    """A router of `kind` with zero placeholder parameters (filled by moefy or a checkpoint)."""
    if kind == "oracle":
        return OracleRouter()
    if kind == "centroid":
        return CentroidRouter(jnp.zeros((d, routed), dtype))
    if kind == "mlp":
        h = hidden or routed
        return MLPRouter(jnp.zeros((d, h), dtype), jnp.zeros((h,), dtype), jnp.zeros((h, routed), dtype),
                         jnp.zeros((routed,), dtype))
    raise ValueError(f"unknown router {kind!r}; choose one of {list(ROUTERS)}")


def dense_layout(base) -> dict:
    """What a dense FFN module is, read from it: {'type', 'gated', 'width' D, 'neurons' F, 'act', 'in_bias',
    'out_bias', 'dtype' (compute), 'param_dtype'} and its kernels' attribute names."""
    if isinstance(base, LlamaMLP):
        names = dict(gate="gate_proj", up="up_proj", down="down_proj")
        gated = True
    elif isinstance(base, GPT2MLP):
        names = dict(up="c_fc", down="c_proj")
        gated = False
    else:
        raise TypeError(f"a MoEfied FFN replaces a llama SwiGLU MLP or a GPT-2 MLP, got {type(base).__name__}")
    up = getattr(base, names["up"])
    d, f = tuple(up.kernel.get_value().shape)
    return dict(type=type(base), gated=gated, width=d, neurons=f, act=base.act, names=names,
                in_bias=up.bias is not None, out_bias=getattr(base, names["down"]).bias is not None,
                dtype=up.dtype, param_dtype=up.kernel.get_value().dtype)


class MoefiedMLP(nnx.Module):
    """A dense FFN regrouped into experts (module docstring). Built from the dense module it replaces and the
    options {'num_experts', 'num_shared', 'top_k', 'router', 'router_hidden', 'split'}; the variables are zero
    placeholders until `moefy` (or a checkpoint) fills them. The stacked weights can take a LoRA each
    (bricks.adapters.experts; the forward reads them through models.moe.expert_weight)."""

    EXPERT_WEIGHTS = ("gate_proj", "up_proj", "down_proj")

    def __init__(self, base, *, num_experts: int, top_k: int, router: str, num_shared: int = 0,
                 router_hidden: int = 0, split: str = ""):
        lay = dense_layout(base)
        d, f = lay["width"], lay["neurons"]
        if num_experts < 1 or f % num_experts:
            raise ValueError(f"MoefiedMLP: {f} neurons cannot be split into {num_experts} equal experts")
        if not 0 <= num_shared < num_experts or not 1 <= top_k <= num_experts - num_shared:
            raise ValueError(f"MoefiedMLP: need 0 <= num_shared < num_experts and 1 <= top_k <= routed experts; "
                             f"got num_experts={num_experts}, num_shared={num_shared}, top_k={top_k}")
        m, dt = f // num_experts, lay["param_dtype"]
        self.dense_type = lay["type"]
        self.act, self.dtype = lay["act"], lay["dtype"]
        self.num_shared, self.top_k, self.split = int(num_shared), int(top_k), str(split)
        self.router_kind, self.router_hidden = str(router), int(router_hidden)
        self.gate_proj = param(jnp.zeros((num_experts, d, m), dt), ("experts", "embed", "mlp")) if lay["gated"] \
            else None
        self.up_proj = param(jnp.zeros((num_experts, d, m), dt), ("experts", "embed", "mlp"))
        self.down_proj = param(jnp.zeros((num_experts, m, d), dt), ("experts", "mlp", "embed"))
        self.gate_bias = param(jnp.zeros((num_experts, m), dt), ("experts", "mlp")) if lay["gated"] and \
            lay["in_bias"] else None
        self.up_bias = param(jnp.zeros((num_experts, m), dt), ("experts", "mlp")) if lay["in_bias"] else None
        self.down_bias = param(jnp.zeros((d,), dt), ("embed",)) if lay["out_bias"] else None
        self.neurons = NeuronIndex(jnp.zeros((num_experts, m), jnp.int32))
        self.router = make_router(router, d, num_experts - num_shared, router_hidden, dt)
        self.dispatch, self.dispatch_options = "masked", None  # runtime choices (dispatch.with_dispatch)

    # ---------------------------------------------------------------------------------------- description
    @property
    def num_experts(self) -> int:
        return int(self.up_proj.get_value().shape[0])

    @property
    def num_routed(self) -> int:
        return self.num_experts - self.num_shared

    @property
    def options(self) -> dict:
        return {"num_experts": self.num_experts, "num_shared": self.num_shared, "top_k": self.top_k,
                "router": self.router_kind, "router_hidden": self.router_hidden, "split": self.split}

    def structure_spec(self):
        return {"kind": KIND, "options": self.options}

    def _dense_abstract(self):
        e, d, m = self.up_proj.get_value().shape
        dt = self.up_proj.get_value().dtype
        bias = self.up_bias is not None
        if self.dense_type is LlamaMLP:
            cfg = types.SimpleNamespace(hidden_size=d, intermediate_size=e * m, mlp_bias=bias, hidden_act=self.act)
        else:
            cfg = types.SimpleNamespace(n_embd=d, intermediate_size=e * m, activation_function=self.act)
        return nnx.eval_shape(lambda: self.dense_type(cfg, rngs=nnx.Rngs(0), param_dtype=dt, dtype=self.dtype))

    def structure_base(self):
        """The dense FFN this module regroups, abstract (shapes only): config_from_tree reads it."""
        return self._dense_abstract()

    def dense(self) -> nnx.Module:
        """The dense FFN module with this module's neurons put back in their dense order (exact: a permutation; an
        unmerged expert LoRA's change is merged into the weights, rounded once to their dtype)."""
        abstract = self._dense_abstract()
        names = dense_layout(abstract)["names"]
        order = np.argsort(np.asarray(self.neurons.get_value()).reshape(-1), kind="stable")

        def columns(w):  # (E, D, m) -> (D, F) dense order
            w = np.asarray(w)
            return np.moveaxis(w, 0, 1).reshape(w.shape[1], -1)[:, order]

        def weight(name):  # with an unmerged expert LoRA's change, in the parameter's dtype
            return np.asarray(expert_weight(self, name)).astype(getattr(self, name).get_value().dtype)

        down = weight("down_proj")
        values = {f"{names['up']}.kernel": columns(weight("up_proj")),
                  f"{names['down']}.kernel": down.reshape(-1, down.shape[-1])[order]}
        if self.gate_proj is not None:
            values[f"{names['gate']}.kernel"] = columns(weight("gate_proj"))
        for name, var in (("gate", self.gate_bias), ("up", self.up_bias)):
            if var is not None:
                values[f"{names[name]}.bias"] = np.asarray(var.get_value()).reshape(-1)[order]
        if self.down_bias is not None:
            values[f"{names['down']}.bias"] = np.asarray(self.down_bias.get_value())
        return fill(abstract, {k: jnp.asarray(v) for k, v in values.items()})

    # ---------------------------------------------------------------------------------------- computation
    def expert_hidden(self, x):
        """h (..., E, m): every expert's activations (module docstring), in the compute dtype."""
        get = lambda v: None if v is None else v[...]  # noqa: E731
        return expert_activations(x, expert_weight(self, "up_proj"), get(self.up_bias),
                                  expert_weight(self, "gate_proj"), get(self.gate_bias), act=self.act,
                                  dtype=self.dtype or x.dtype)

    def router_scores(self, x, hidden):
        """s (..., R) float32: the router's scores of the routed experts."""
        return self.router(x, hidden[..., self.num_shared:, :]).astype(jnp.float32)

    def expert_mask(self, scores):
        """c (..., E) float32: 1 for the shared experts and the top_k routed experts by `scores`, else 0."""
        routed = top_k_mask(scores, self.top_k) if self.top_k < self.num_routed else jnp.ones_like(scores)
        shared = jnp.ones(scores.shape[:-1] + (self.num_shared,), jnp.float32)
        return jnp.concatenate([shared, routed], axis=-1)

    def routing_weights(self, scores):
        """c~ (..., E) float32: `expert_mask(scores)` in value, with the straight-through derivative in the scores
        of a trainable router (module docstring)."""
        mask = self.expert_mask(scores)
        if self.router_kind == "oracle" or self.top_k >= self.num_routed:
            return mask
        p = jax.nn.softmax(scores, axis=-1)
        st = p - jax.lax.stop_gradient(p)  # exactly 0 in value
        shared = jnp.zeros(scores.shape[:-1] + (self.num_shared,), jnp.float32)
        return mask + jnp.concatenate([shared, st], axis=-1)

    def oracle_mask(self, hidden):
        """The mask (..., E) the oracle router would choose: shared experts and the top_k routed ones by ||h_e||."""
        return self.expert_mask(expert_mass(hidden[..., self.num_shared:, :]))

    def combine(self, hidden, mask):
        """y (..., D) = sum_e c_e h_e D_e + b^d."""
        return expert_sum(hidden, mask, expert_weight(self, "down_proj"),
                          None if self.down_bias is None else self.down_bias[...])

    @tapped
    def __call__(self, x_BxTxD):
        if self.dispatch != "masked":
            from configurable_fm.analysis.moefication.dispatch import dispatched  # it imports this module
            return dispatched(self, x_BxTxD)
        hidden = tap(self, "hidden", self.expert_hidden(x_BxTxD))
        scores = tap(self, "router_logits", self.router_scores(x_BxTxD, hidden))
        return self.combine(hidden, self.routing_weights(scores))


register_extension(KIND, lambda base, options, *, rngs: MoefiedMLP(base, **options))
