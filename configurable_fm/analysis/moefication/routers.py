"""Router parameters: the centroid router's kernel from the weights, the MLP router trained on calibration data.

    kernel = centroid_kernel(rows_FxD, groups_RxM)                         # (D, R), no data
    params = train_mlp_router(x_NxD, mass_NxR, kernel, RouterTraining(), key)   # {'w1', 'b1', 'w2', 'b2'}
    recall = routing_recall(scores_NxR, mass_NxR, k)                      # how often the router picks the oracle's

Centroid (module.py CentroidRouter): c_e = (1/m) sum_{i in S_e} r_i / ||r_i|| over the expert's neurons' input
rows r_i (gate rows for SwiGLU, c_fc rows for GPT-2), kernel = [c_1 .. c_R] (D, R). Not re-normalised: an expert
whose neurons point the same way has a longer centroid, and it fires as a whole when x points that way.

MLP router (MoEfication's MLP selection, module.py MLPRouter): s = tanh(x^ W1 + b1) W2 + b2 with x^ = x / ||x||,
trained to predict the normalised masses of the routed experts
    t_te = M_te / max_e' M_te'   (0 for a token whose masses are all 0),  M_te = ||h_{t, S_e}||_2
with the mean binary cross-entropy of sigmoid(s) against t (MoEfication divides its ReLU masses by their maximum and
uses BCEWithLogitsLoss), Adam (optax), `steps` steps of `batch_size` tokens drawn with replacement from the key.
Initialisation as MoEfication's: with H = R hidden units (router_hidden 0), W1 = the centroid kernel, W2 = I,
biases 0, so that before training the router ranks the experts as the centroid router does (tanh is monotone);
H > R adds hidden units with W1 columns N(0, 1/D) and zero W2 rows; H < R draws W1 N(0, 1/D) and W2 N(0, 1/H).
One jitted `lax.scan` over the steps, compiled once per (N, D, R, H, steps, batch) and reused across layers.

Recall of a router against the oracle (what MoEfication's validation measures in spirit): for each token, the
fraction of the oracle's top-k experts (by M) that the router's top-k (by s) also chooses, averaged over tokens
(ties: lower index, as module.top_k_mask).
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from configurable_fm.analysis.moefication.module import top_k_mask, unit_rows
from configurable_fm.analysis.moefication.splits import normalized_rows
from configurable_fm.checks import is_int


@dataclasses.dataclass(frozen=True)
class RouterTraining:
    """How the MLP router is trained (module docstring): steps, batch_size (tokens per step), learning_rate (Adam),
    hidden (H; 0 = the number of routed experts), max_tokens (calibration tokens collected per FFN)."""

    steps: int = 300
    batch_size: int = 512
    learning_rate: float = 1e-2
    hidden: int = 0
    max_tokens: int = 16384

    def check(self, what: str = "router_training") -> "RouterTraining":
        for name in ("steps", "batch_size", "max_tokens"):
            value = getattr(self, name)
            if not is_int(value) or value < 1:
                raise ValueError(f"{what}: {name} must be a positive int, got {value!r}")
        if not is_int(self.hidden) or self.hidden < 0:
            raise ValueError(f"{what}: hidden must be an int >= 0 (0: one unit per routed expert), got "
                             f"{self.hidden!r}")
        if not (float(self.learning_rate) > 0 and np.isfinite(float(self.learning_rate))):
            raise ValueError(f"{what}: learning_rate must be a positive number, got {self.learning_rate!r}")
        return self


def centroid_kernel(rows, groups) -> np.ndarray:
    """(D, R): the mean normalised input row of each group (R, m) of neuron indices (module docstring)."""
    x = normalized_rows(rows)
    return np.stack([x[np.asarray(g)].mean(axis=0) for g in np.asarray(groups)], axis=1).astype(np.float32)


def mass_targets(mass) -> np.ndarray:
    """t = M / max_e M per token (0 where all masses are 0): (N, R) float32."""
    mass = np.asarray(mass, np.float32)
    top = mass.max(axis=1, keepdims=True)
    return np.where(top > 0, mass / np.where(top > 0, top, 1.0), 0.0).astype(np.float32)


def init_mlp_router(kernel, hidden: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Initial {'w1', 'b1', 'w2', 'b2'} from the centroid kernel (D, R) (module docstring)."""
    d, r = kernel.shape
    h = hidden or r
    if h >= r:
        w1 = np.concatenate([kernel, rng.normal(0.0, d ** -0.5, (d, h - r))], axis=1)
        w2 = np.concatenate([np.eye(r), np.zeros((h - r, r))], axis=0)
    else:
        w1, w2 = rng.normal(0.0, d ** -0.5, (d, h)), rng.normal(0.0, h ** -0.5, (h, r))
    return {"w1": w1.astype(np.float32), "b1": np.zeros(h, np.float32), "w2": w2.astype(np.float32),
            "b2": np.zeros(r, np.float32)}


def mlp_scores(params, x):
    """s = tanh(x^ w1 + b1) w2 + b2 (float32) for x (..., D)."""
    hid = jnp.tanh(jnp.dot(unit_rows(x), params["w1"], precision=jax.lax.Precision.HIGHEST) + params["b1"])
    return jnp.dot(hid, params["w2"], precision=jax.lax.Precision.HIGHEST) + params["b2"]


@functools.partial(jax.jit, static_argnums=(0,))
def _train(learning_rate: float, params, x, t, idx):
    import optax

    opt = optax.adam(learning_rate)

    def loss(p, xb, tb):
        return jnp.mean(optax.sigmoid_binary_cross_entropy(mlp_scores(p, xb), tb))

    def step(carry, rows):
        p, state = carry
        value, grads = jax.value_and_grad(loss)(p, x[rows], t[rows])
        updates, state = opt.update(grads, state, p)
        return (optax.apply_updates(p, updates), state), value

    (params, _), losses = jax.lax.scan(step, (params, opt.init(params)), idx)
    return params, losses


def train_mlp_router(x, mass, kernel, training: RouterTraining, rng: np.random.Generator
                     ) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """({'w1', 'b1', 'w2', 'b2'} float32 numpy, the loss of every step) of an MLP router trained on the FFN inputs
    x (N, D) and routed-expert masses (N, R), initialised from the centroid kernel (D, R) (module docstring)."""
    training = training.check()
    x = np.asarray(x, np.float32)
    t = mass_targets(mass)
    params = {k: jnp.asarray(v) for k, v in init_mlp_router(np.asarray(kernel, np.float32), training.hidden,
                                                             rng).items()}
    idx = rng.integers(0, x.shape[0], (training.steps, min(training.batch_size, x.shape[0])))
    params, losses = _train(float(training.learning_rate), params, jnp.asarray(x), jnp.asarray(t),
                            jnp.asarray(idx, jnp.int32))
    return {k: np.asarray(v) for k, v in params.items()}, np.asarray(losses)


def routing_recall(scores, mass, k: int) -> float:
    """Mean over tokens of |top_k(scores) ∩ top_k(mass)| / k (module docstring); scores, mass (N, R)."""
    chosen = np.asarray(top_k_mask(jnp.asarray(scores, jnp.float32), k))
    oracle = np.asarray(top_k_mask(jnp.asarray(mass, jnp.float32), k))
    return float((chosen * oracle).sum(axis=-1).mean() / k)
