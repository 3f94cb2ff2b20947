"""LoraHub (Huang et al., 2023, "LoraHub: Efficient Cross-Task Generalization via Dynamic LoRA Composition"):
a gradient-free search for the weights w (N,) of a combination of N LoRA adapters, on a few examples.

    shots = few_shot_batch(tok, ["2 + 2 =", ...], [" 4", ...], pad_id=0)        # ids, attention, target masks
    result = lorahub(base, [lora_1, lora_2, lora_3], shots, budget=40, seed=0)
    result.weights, result.loss, result.trace      # (N,), its cross-entropy, the objective of every evaluation
    logits = result.model(ids)                     # base + the combined LoRA (an ordinary adapted model)
    m = lorahub_combine(base, adapters, [0.8, 0.1, -0.2])                         # the combination alone

The combination (LoraHub's own rule, `get_final_weights` / `get_score` in sail-sg/lorahub's algorithm.py): the
factors of the combined adapter are the weighted sums of the factors, per module,

    A' = Σ_i w_i A_i  (in, r),   B' = Σ_i w_i B_i  (r, out),   scale s (shared)
    ΔW' = s A' B' = s Σ_i Σ_j w_i w_j A_i B_j

which is quadratic in w and keeps the cross terms A_i B_j: it is neither the weighted sum of the updates Σ w_i ΔW_i
(bricks.adapters.combine(..., 'cat') / combine_exact) nor PEFT's add_weighted_adapter 'linear', which splits each
weight as sign·√|w s| on A and √|w s| on B. LoraHub loads every module into one PEFT config, so all adapters need
the same rank and scale (RouteError here; LoraHub checks shapes only and silently uses the first adapter's scale).
w = 0 gives a zero adapter: the base. ΔW'(−w) = ΔW'(w), so the objective is even in w and only the relative signs
of the weights mean something (a search may return −w for w).

The objective, minimised over the box [−1.5, 1.5]^N from w = 0 (LoraHub's bounds and start):

    J(w) = CE(w) + l1 · mean_i |w_i|        (LoraHub's default_l1_regularization: 0.05 · Σ|w_i| / N)

CE(w): the mean next-token cross-entropy over the target tokens of the examples (`few_shot_batch`: the output
tokens after each input), with the combined adapter attached. LoraHub's default_get_loss instead sums the
per-batch mean losses of its seq2seq model and divides by the number of examples (so with one batch its loss is
the mean token loss / N_examples, and the regulariser weighs N_examples times more); ours is the plain mean, and
`l1` sets the trade-off. The brief's 0.05 · Σ|w| is l1 = 0.05 · N here.

The optimiser: LoraHub runs nevergrad's NGOpt (budget `max_inference_step`, 40 in its example); here a seeded
CMA-ES in numpy (search.cma_es: the same budget semantics, bounds reflected then clipped, the best evaluated point
returned), so there is no new dependency and a seed gives the same weights bit for bit. The default step size
σ0 = 0.5 is a sixth of the box width (our choice). Each evaluation is one jitted forward of the examples (the
factors A', B' are computed inside the jitted function from w, so no per-evaluation model building or
recompilation): cost = budget forwards of the few-shot batch.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from configurable_fm.bricks.adapters import LoRAParam
from configurable_fm.bricks.paths import path_str
from configurable_fm.checks import is_int, is_real
from configurable_fm.interop.peft import attach_built
from configurable_fm.models.scoring import next_token_nll
from configurable_fm.ops.route.common import RouteError, adapted_models, lora_modules
from configurable_fm.ops.route.search import SearchResult, cma_es

DEFAULT_BUDGET = 40  # LoraHub's example (max_inference_step)
DEFAULT_L1 = 0.05  # LoraHub's default_l1_regularization: 0.05 · mean |w|
DEFAULT_BOUNDS = (-1.5, 1.5)  # LoraHub's nevergrad Array(lower=-1.5, upper=1.5)
DEFAULT_SIGMA0 = 0.5


@dataclasses.dataclass(frozen=True)
class FewShot:
    """A padded batch of examples: ids (B, T) int32, attention (B, T) (1: a real token), targets (B, T) (1: a
    token whose prediction is scored, i.e. an output token; position 0 is never scored)."""

    ids: np.ndarray
    attention: np.ndarray
    targets: np.ndarray

    def __post_init__(self):
        shapes = {tuple(np.shape(a)) for a in (self.ids, self.attention, self.targets)}
        if len(shapes) != 1 or len(shapes.pop()) != 2:
            raise RouteError(f"FewShot: ids, attention and targets must be (B, T) arrays of one shape, got "
                             f"{[tuple(np.shape(a)) for a in (self.ids, self.attention, self.targets)]}")
        scored = np.asarray(self.targets)[:, 1:] * np.asarray(self.attention)[:, 1:]
        if not scored.any():
            raise RouteError("FewShot: no target token to score (targets is 0 everywhere after position 0)")


def few_shot_batch(tokenizer, inputs: Sequence[str], outputs: Sequence[str], *, pad_id: int = 0,
                   bos_id: int | None = None, eos_id: int | None = None, pad_to: int = 1) -> FewShot:
    """A FewShot batch from example inputs and outputs (a `tokenizers.Tokenizer`): row b = [bos] input_b
    output_b [eos], right-padded with pad_id to the longest row rounded up to a multiple of `pad_to` (batches of
    other examples then share a shape, and `lorahub` one compiled loss); targets mark the output tokens (and eos).
    Tokenised without special tokens (the ids are given). RouteError for unequal lengths, no examples, an empty
    output or a pad_to < 1."""
    if isinstance(inputs, str) or isinstance(outputs, str) or len(inputs) != len(outputs) or not inputs:
        raise RouteError(f"few_shot_batch: give equal, non-empty lists of inputs and outputs, got "
                         f"{len(inputs)} and {len(outputs)}")
    if not is_int(pad_to) or pad_to < 1:
        raise RouteError(f"few_shot_batch: pad_to must be an int >= 1, got {pad_to!r}")
    rows, marks = [], []
    for i, (x, y) in enumerate(zip(inputs, outputs)):
        prompt = ([] if bos_id is None else [bos_id]) + tokenizer.encode(x, add_special_tokens=False).ids
        answer = tokenizer.encode(y, add_special_tokens=False).ids + ([] if eos_id is None else [eos_id])
        if not answer:
            raise RouteError(f"few_shot_batch: output {i} ({y!r}) has no tokens")
        rows.append(prompt + answer)
        marks.append([0] * len(prompt) + [1] * len(answer))
    t = -(-max(map(len, rows)) // pad_to) * pad_to
    ids = np.full((len(rows), t), pad_id, np.int32)
    attention = np.zeros((len(rows), t), np.int32)
    targets = np.zeros((len(rows), t), np.int32)
    for b, (row, mark) in enumerate(zip(rows, marks)):
        ids[b, :len(row)], attention[b, :len(row)], targets[b, :len(row)] = row, 1, mark
    return FewShot(ids, attention, targets)


def target_loss(model, ids_BxT, attention_BxT, targets_BxT) -> jax.Array:
    """Mean next-token cross-entropy over the scored tokens: Σ m_t · nll_t / Σ m_t with m_t = targets[t] ·
    attention[t] for t >= 1, nll_t = −log p(ids[t] | ids[<t]) (float32 scalar)."""
    logits = model(ids_BxT, attention_mask=attention_BxT)
    nll = next_token_nll(logits[:, :-1], ids_BxT[:, 1:])
    m = (targets_BxT[:, 1:] * attention_BxT[:, 1:]).astype(jnp.float32)
    return jnp.sum(nll * m) / jnp.sum(m)


def _checked(base, adapters, what: str):
    models = adapted_models(base, adapters, what)
    per_module = lora_modules(models, what, same_rank=True, same_scale=True)
    stacks = {p: {"lora_a": jnp.stack([m.lora_a[...] for m in mods]),
                  "lora_b": jnp.stack([m.lora_b[...] for m in mods])} for p, mods in per_module.items()}
    options = {p: {**mods[0].options(), "merged": False} for p, mods in per_module.items()}
    return stacks, options


def _weights(weights, n: int, what: str) -> np.ndarray:
    try:
        w = np.asarray(weights, np.float64)
    except (TypeError, ValueError):
        raise RouteError(f"{what}: weights must be {n} numbers, got {weights!r}") from None
    if w.shape != (n,) or not np.isfinite(w).all():
        raise RouteError(f"{what}: weights must be {n} finite numbers (one per adapter), got {weights!r}")
    return w


def combined_factors(stacks: dict, w) -> dict[str, dict[str, jax.Array]]:
    """{module: {'lora_a': Σ_i w_i A_i, 'lora_b': Σ_i w_i B_i}} (LoraHub's rule) from stacked factors."""
    w = jnp.asarray(w, jnp.float32)
    return {p: {k: jnp.tensordot(w.astype(v.dtype), v, axes=1) for k, v in s.items()} for p, s in stacks.items()}


def lorahub_combine(base: nnx.Module, adapters: Sequence, weights) -> nnx.Module:
    """`base` with one LoRA adapter per module: A' = Σ_i w_i A_i, B' = Σ_i w_i B_i and the adapters' common
    rank and scale (module docstring). adapters: N LoRA adapters of `base` (adapted models or brick sets; the same
    modules, ranks and scales). RouteError naming what differs; weights: N finite numbers."""
    stacks, options = _checked(base, adapters, "lorahub_combine")
    w = _weights(weights, next(iter(stacks.values()))["lora_a"].shape[0], "lorahub_combine")
    factors = combined_factors(stacks, w)
    return attach_built(base, [{"path": p, "kind": "lora", "options": options[p], "values": factors[p]}
                               for p in stacks])


@dataclasses.dataclass(frozen=True)
class LoraHubResult:
    """weights (N,): the best weights found; objective: J(weights); loss: CE(weights); trace (budget,): J of every
    evaluation in order (trace[0] is w = init); candidates (budget, N): the weights evaluated; model: base + the
    combined adapter; search: the optimiser's SearchResult."""

    weights: np.ndarray
    objective: float
    loss: float
    trace: np.ndarray
    candidates: np.ndarray
    model: Any
    search: SearchResult

    @property
    def best_trace(self) -> np.ndarray:
        return np.minimum.accumulate(self.trace)


@functools.partial(jax.jit, static_argnums=1)
def _combined_loss(w, graphdef, lora_state, rest, stacks, batch):
    """CE of `batch` with the LoRA factors of `lora_state` replaced by LoraHub's combination of `stacks` under w.
    Module-level and keyed by the graphdef: searches over the same model and batch shape share one compilation."""
    factors = combined_factors(stacks, w)
    items = []
    for path, var in nnx.to_flat_state(lora_state):
        module, leaf = path_str(path).rsplit(".", 1)
        items.append((path, var.replace(factors[module][leaf])))
    return target_loss(nnx.merge(graphdef, nnx.from_flat_state(items), rest), *batch)


def lorahub_objective(base: nnx.Module, adapters: Sequence, examples: FewShot, *, l1: float = DEFAULT_L1):
    """(J, CE): two functions of w (N,) -> float, J(w) = CE(w) + l1 · mean|w| (module docstring), each evaluation one
    jitted forward of `examples` with the combined adapter (compiled once per model structure and batch shape)."""
    stacks, options = _checked(base, adapters, "lorahub")
    if not isinstance(examples, FewShot):
        raise RouteError(f"lorahub: examples must be a FewShot batch (few_shot_batch), got {type(examples).__name__}")
    n = next(iter(stacks.values()))["lora_a"].shape[0]
    template = attach_built(base, [{"path": p, "kind": "lora", "options": options[p],
                                    "values": {k: v[0] for k, v in stacks[p].items()}} for p in stacks])
    graphdef, lora_state, rest = nnx.split(template, LoRAParam, ...)
    batch = tuple(jnp.asarray(a, jnp.int32) for a in (examples.ids, examples.attention, examples.targets))

    def ce(w) -> float:
        w = jnp.asarray(_weights(w, n, "lorahub"), jnp.float32)
        return float(_combined_loss(w, graphdef, lora_state, rest, stacks, batch))

    def objective(w) -> float:
        return ce(w) + float(l1) * float(np.mean(np.abs(np.asarray(w, np.float64))))

    return objective, ce


def lorahub(base: nnx.Module, adapters: Sequence, examples: FewShot, *, budget: int = DEFAULT_BUDGET,
            l1: float = DEFAULT_L1, bounds: tuple[float, float] = DEFAULT_BOUNDS, sigma0: float = DEFAULT_SIGMA0,
            init=None, seed: int = 0, popsize: int | None = None) -> LoraHubResult:
    """LoraHub's search (module docstring): minimise J(w) = CE(w) + l1 · mean|w| over w in [bounds]^N with a
    seeded CMA-ES of `budget` evaluations from `init` (default 0: the base), and return the best weights with
    the combined model. adapters: N LoRA adapters of `base` (models or brick sets; same modules, ranks and
    scales); examples: a FewShot batch. Deterministic for a seed. RouteError for unfit adapters or examples, a
    budget < 1, bounds that do not contain init, a negative l1."""
    if not (is_real(l1) and l1 >= 0):
        raise RouteError(f"lorahub: l1 must be a number >= 0, got {l1!r}")
    objective, ce = lorahub_objective(base, adapters, examples, l1=l1)
    n = len(adapters)
    x0 = np.zeros(n) if init is None else _weights(init, n, "lorahub(init=...)")
    try:
        lower, upper = (float(b) for b in bounds)
    except (TypeError, ValueError):
        raise RouteError(f"lorahub: bounds must be (lower, upper), got {bounds!r}") from None
    result = cma_es(objective, x0, sigma0=sigma0, budget=budget, lower=lower, upper=upper, seed=seed,
                    popsize=popsize)
    w = result.x
    return LoraHubResult(weights=w, objective=result.f, loss=ce(w), trace=result.trace, candidates=result.points,
                         model=lorahub_combine(base, adapters, w), search=result)
