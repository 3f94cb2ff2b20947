"""The survey's neuron analyses (Xiao et al. 2024, arXiv 2409.02877, section 4) on any decoder of this library.

    data = build_functions(n_score=100, n_eval=24, facts=...)              # functions.py
    result = specialisation_study(model, tokenizer, data, options=StudyOptions(), log=print)
    result["pruning"]["change"]        # (K rows pruned, K functions evaluated) relative perplexity change

Notation: K functions, N instances, L layers (FFN hidden tap points '**.mlp.hidden', analysis/neurons.py), F neurons
per layer, a[t, l, i] the activation of neuron (l, i) at token t (act(gate x) * up x for SwiGLU).

Encoding (`encode`): each instance is rendered with the tokenizer's chat template as a system/user/assistant chat (or
'User: p\\nAssistant: r' without one). The user content is tokenized on its own between the template's prefix and
suffix, so its span is known; the sequence is cut to max_len tokens (the prompt first to max_len - min_response).
`span` marks the user-content tokens, `score` the response tokens (and the end-of-turn token) as next-token targets.

1. Per-instance activations (`prompt_activations`): A[n, l, i] = mean over the user-content tokens of instance n of
   |a[t, l, i]| (the survey averages over the prompt tokens; the whole chat prefix is attended to).
2. Functionality score (neurons.specialisation_scores): S[k, l, i] = AP(A[:, l, i], y_k), y_k the one-vs-rest labels
   of function k on the scoring split. Chance level: the positive rate pi_k = N_k / N (the AP of an uninformative
   ranking in expectation). Null: the same scores against labels permuted with `seed` (S0), whose per-layer mean and
   max are the "random activation" baselines of the survey's Fig. 8.
3. Normalized indicators (`indicator_histograms`), on the evaluation split's tokens: per token and layer,
   r_i = v_i / max_j v_j with v = |a| (activation) or |a_i| ||W_out[i]|| (output magnitude, llama/gpt2 FFNs), pooled
   into `bins` equal bins of [0, 1]: the survey's Fig. 6(a, c) CDFs ("80% of neurons below 0.2").
4. Dynamic masking (neurons.mask_low_activation): per token and layer the floor(p F) lowest-|a| neurons are zeroed;
   the mean response NLL per function on the first `n_mask` evaluation instances of each function, for every p in
   `mask_levels` (Fig. 6(b)).
5. Pruning (Fig. 9): for each function k the top `fraction` of all L F neurons by S[k] (neurons.top_mask) are zeroed
   at every token; the perplexity of each function's evaluation responses, PPL = exp(sum NLL / #tokens), against the
   unpruned model: change[k, g] = PPL_k(g) / PPL(g) - 1. Control rows: `random_rows` random sets of the same size.
   Uncertainty: a paired bootstrap over the evaluation instances of g (`bootstrap` resamples), 95% interval.
6. Overlap (Fig. 10): neurons.partition_overlap(S, fraction) = |T_k ∩ T_g| / |T_k|; two random sets give `fraction`.
"""
from __future__ import annotations

import dataclasses
import functools
import time
from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from configurable_fm.analysis.capture import capture, intervene
from configurable_fm.analysis.interventions import mask
from configurable_fm.analysis.neurons import (FFN_HIDDEN, mask_low_activation, partition_overlap,
                                              specialisation_scores, top_mask)
from configurable_fm.analysis.specialisation.functions import FunctionData, Instance
from configurable_fm.analysis.taps import Matcher, tap_points
from configurable_fm.checks import is_int, is_real
from configurable_fm.models.scoring import next_token_nll

SYSTEM_FREE = "User: {prompt}\nAssistant:"


class StudyError(ValueError):
    """The model or the options cannot run the study (no FFN hidden points, a bad option value)."""


@dataclasses.dataclass(frozen=True)
class StudyOptions:
    """The study's settings (module docstring): max_len tokens per instance, min_response tokens kept for the
    response, batch_size rows per forward (padded to a multiple of pad_to tokens), fraction of neurons per function
    (top set and random control), mask_levels (fractions p for dynamic masking), n_mask instances per function for
    it, magnitude (also mask by output magnitude), random_rows control rows, bootstrap resamples, bins of the
    indicator histograms, seed (label permutation, random rows, bootstrap)."""

    max_len: int = 128
    min_response: int = 16
    batch_size: int = 8
    pad_to: int = 32
    fraction: float = 0.05
    mask_levels: tuple = (0.3, 0.5, 0.7, 0.9)
    n_mask: int = 8
    magnitude: bool = False
    random_rows: int = 2
    bootstrap: int = 1000
    bins: int = 50
    seed: int = 0

    def check(self, what: str = "specialisation study") -> "StudyOptions":
        def need_int(name, low):
            v = getattr(self, name)
            if not is_int(v) or v < low:
                raise StudyError(f"{what}: `{name}` must be an int >= {low}, got {v!r}")

        for name, low in (("max_len", 8), ("min_response", 1), ("batch_size", 1), ("pad_to", 1), ("n_mask", 0),
                          ("random_rows", 0), ("bootstrap", 0), ("bins", 2), ("seed", 0)):
            need_int(name, low)
        if self.min_response >= self.max_len:
            raise StudyError(f"{what}: `min_response` ({self.min_response}) must be below `max_len` ({self.max_len})")
        if not (isinstance(self.fraction, (int, float)) and 0 < self.fraction < 0.5):
            raise StudyError(f"{what}: `fraction` must be in (0, 0.5), got {self.fraction!r}")
        levels = tuple(self.mask_levels)
        if any(not is_real(p) or not 0 < p < 1 for p in levels):
            raise StudyError(f"{what}: `mask_levels` must be fractions in (0, 1), got {levels!r}")
        return self


# ------------------------------------------------------------------------------------------------ encoding
@dataclasses.dataclass
class Encoded:
    """Token sequences of instances: ids [(T_n,) int32], span / score [(T_n,) float32] (module docstring),
    function (N,) int, the index of each instance's function."""

    ids: list
    span: list
    score: list
    function: np.ndarray

    def __len__(self):
        return len(self.ids)

    def subset(self, rows) -> "Encoded":
        rows = list(rows)
        return Encoded([self.ids[i] for i in rows], [self.span[i] for i in rows], [self.score[i] for i in rows],
                       self.function[rows])


def _template_parts(tokenizer) -> tuple[str, str]:
    """(text before the user content, text after it up to the assistant's turn) of the chat template."""
    template = getattr(tokenizer, "chat_template", None)
    if not template:
        before, after = SYSTEM_FREE.split("{prompt}")
        return before, after
    marker = "\u2063CONTENT\u2063"
    text = tokenizer.apply_chat_template([{"role": "user", "content": marker}], add_generation_prompt=True)
    if text.count(marker) != 1:
        raise StudyError("the tokenizer's chat template does not render the user message once")
    before, after = text.split(marker)
    return before, after


def encode(tokenizer, instances: Sequence[Instance], functions: Sequence[str], *, max_len: int = 128,
           min_response: int = 16) -> Encoded:
    """The instances as token sequences (module docstring): prefix + content + suffix + response + end of turn."""
    before, after = _template_parts(tokenizer)
    enc = lambda text: list(tokenizer.encode(text, add_special_tokens=False).ids)  # noqa: E731
    pre, post = enc(before), enc(after)
    end_id = getattr(tokenizer, "eos_token_id", None) if getattr(tokenizer, "chat_template", None) else None
    ids, span, score, fn = [], [], [], []
    for inst in instances:
        content = enc(inst.prompt)[:max(1, max_len - min_response - len(pre) - len(post))]
        response = enc(inst.response if end_id is not None else " " + inst.response)
        response = (response + ([end_id] if end_id is not None else []))
        seq = (pre + content + post + response)[:max_len]
        s = np.zeros(len(seq), np.float32)
        s[len(pre):len(pre) + len(content)] = 1
        r = np.zeros(len(seq), np.float32)
        r[len(pre) + len(content) + len(post):] = 1
        ids.append(np.asarray(seq, np.int32))
        span.append(s)
        score.append(r)
        fn.append(list(functions).index(inst.function))
    return Encoded(ids, span, score, np.asarray(fn, np.int64))


def batches(enc: Encoded, batch_size: int, pad_to: int):
    """Right-padded batches {'ids', 'am', 'span', 'score'} (B, T) of `batch_size` rows (the last one filled with
    empty rows) and the number of real rows, T a multiple of pad_to; rows sorted by length (fewer shapes), with
    'rows' the instance indices."""
    order = np.argsort([len(x) for x in enc.ids], kind="stable")
    for b0 in range(0, len(order), batch_size):
        rows = order[b0:b0 + batch_size]
        t = max(pad_to, -(-max(len(enc.ids[i]) for i in rows) // pad_to) * pad_to)
        out = {k: np.zeros((batch_size, t), np.int32 if k in ("ids", "am") else np.float32)
               for k in ("ids", "am", "span", "score")}
        for j, i in enumerate(rows):
            n = len(enc.ids[i])
            out["ids"][j, :n], out["am"][j, :n] = enc.ids[i], 1
            out["span"][j, :n], out["score"][j, :n] = enc.span[i], enc.score[i]
        yield out, rows


# ------------------------------------------------------------------------------------------------ activations
def hidden_points(model: nnx.Module, points: str | Sequence[str] = FFN_HIDDEN) -> tuple[str, ...]:
    """The FFN hidden tap points of the model (forward order); StudyError when there are none or they are not
    (B, T, F) (MoE hidden points are (B, T, E, F))."""
    found = tap_points(model, jax.ShapeDtypeStruct((1, 2), jnp.int32))
    matcher = Matcher([points] if isinstance(points, str) else list(points))
    names = tuple(p for p in found if matcher(p))
    if not names:
        raise StudyError(f"the model ({type(model).__name__}) has no FFN hidden tap point matching {points!r}")
    bad = [p for p in names if len(found[p].shape) != 3]
    if bad:
        raise StudyError(f"the study takes dense FFNs with (B, T, F) hidden points; {bad[0]} is "
                         f"{tuple(found[bad[0]].shape)} (a mixture of experts)")
    return names


@functools.partial(jax.jit, static_argnums=(0, 1))
def _span_means(graphdef, names, state, ids, am, span):
    """(B, L, F) mean of |a| over each row's span tokens."""
    _, values = capture(nnx.merge(graphdef, state), list(names), lambda m: m(ids, attention_mask=am))
    n = jnp.maximum(span.sum(axis=1), 1.0)
    return jnp.stack([jnp.einsum("btf,bt->bf", jnp.abs(values[p].astype(jnp.float32)), span,
                                 precision=jax.lax.Precision.HIGHEST) / n[:, None] for p in names], axis=1)


def prompt_activations(model: nnx.Module, enc: Encoded, names: Sequence[str], *, batch_size: int = 8,
                       pad_to: int = 32, log: Optional[Callable[[str], None]] = None) -> np.ndarray:
    """A (N, L, F) float32: mean |a| of every neuron over each instance's user-content tokens (module docstring)."""
    graphdef, state = nnx.split(model)
    ends = [int(np.flatnonzero(s)[-1]) + 1 if s.any() else 1 for s in enc.span]  # causal: later tokens do not matter
    enc = Encoded([x[:e] for x, e in zip(enc.ids, ends)], [x[:e] for x, e in zip(enc.span, ends)],
                  [x[:e] for x, e in zip(enc.score, ends)], enc.function)
    out = np.zeros((len(enc), len(names), 0), np.float32)
    for k, (b, rows) in enumerate(batches(enc, batch_size, pad_to)):
        a = np.asarray(_span_means(graphdef, tuple(names), state, jnp.asarray(b["ids"]), jnp.asarray(b["am"]),
                                   jnp.asarray(b["span"])))
        if out.shape[2] == 0:
            out = np.zeros((len(enc),) + a.shape[1:], np.float32)
        out[rows] = a[:len(rows)]
        if log and k % 20 == 19:
            log(f"activations: {min(len(enc), (k + 1) * batch_size)}/{len(enc)} instances")
    return out


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _indicator_counts(graphdef, names, bins, state, scales, ids, am):
    """(L, 2, bins) counts of r = v / max v per token (v = |a| and |a| * scale) over the real tokens."""
    _, values = capture(nnx.merge(graphdef, state), list(names), lambda m: m(ids, attention_mask=am))
    keep = am.astype(bool)[..., None]
    out = []
    for layer, p in enumerate(names):
        x = jnp.abs(values[p].astype(jnp.float32))
        rows = []
        for v in (x, x * scales[layer]):
            r = v / jnp.maximum(v.max(axis=-1, keepdims=True), jnp.finfo(jnp.float32).tiny)
            idx = jnp.clip(jnp.floor(r * bins).astype(jnp.int32), 0, bins - 1)
            idx = jnp.where(jnp.broadcast_to(keep, idx.shape), idx, bins)
            rows.append(jnp.zeros((bins,), jnp.int32).at[idx.reshape(-1)].add(1, mode="drop"))
        out.append(jnp.stack(rows))
    return jnp.stack(out)


def output_scales(model: nnx.Module, names: Sequence[str]) -> Optional[np.ndarray]:
    """(L, F) ||W_out[i]||_2 of each neuron (the rows of down_proj / c_proj) for llama and gpt2 FFNs, else None."""
    from configurable_fm.analysis.moefication import dense_layout, ffn_layers

    try:
        layers = dict(ffn_layers(model, "specialisation study"))
    except ValueError:
        return None
    out = []
    for p in names:
        mlp = layers.get(p.rsplit(".", 1)[0])
        if mlp is None:
            return None
        down = getattr(mlp, dense_layout(mlp)["names"]["down"]).kernel.get_value()  # (F, D)
        out.append(np.linalg.norm(np.asarray(down, np.float32), axis=1))
    return np.stack(out)


def indicator_histograms(model: nnx.Module, enc: Encoded, names: Sequence[str], scales: Optional[np.ndarray], *,
                         bins: int = 50, batch_size: int = 8, pad_to: int = 32) -> np.ndarray:
    """(L, 2, bins) int64 counts of the normalized activation (0) and output magnitude (1) over all real tokens of
    `enc` (module docstring; without scales the output-magnitude row repeats the activation)."""
    graphdef, state = nnx.split(model)
    s = jnp.asarray(scales if scales is not None else np.ones((len(names), 1), np.float32))
    total = None
    for b, _ in batches(enc, batch_size, pad_to):
        c = np.asarray(_indicator_counts(graphdef, tuple(names), int(bins), state, s, jnp.asarray(b["ids"]),
                                         jnp.asarray(b["am"])), np.int64)
        total = c if total is None else total + c
    return total


# ------------------------------------------------------------------------------------------------ losses
@functools.partial(jax.jit, static_argnums=0)
def _response_nll(graphdef, state, interventions, ids, am, score):
    """((B,) summed NLL of the score tokens, (B,) their number) under the interventions ({} = none)."""
    model = nnx.merge(graphdef, state)
    call = lambda m: m(ids, attention_mask=am)  # noqa: E731
    logits = intervene(model, interventions, call) if interventions else call(model)
    w = score[:, 1:]
    nll = next_token_nll(logits[:, :-1], ids[:, 1:])
    return jnp.sum(jnp.where(w > 0, nll, 0.0), axis=1), jnp.sum(w, axis=1)


def response_nll(model: nnx.Module, enc: Encoded, interventions: Optional[dict] = None, *, batch_size: int = 8,
                 pad_to: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """((N,) summed next-token NLL over each instance's response tokens, (N,) their count), under `interventions`
    ({point glob: Intervention}, pytrees passed to one jitted forward per batch shape)."""
    graphdef, state = nnx.split(model)
    nll = np.zeros(len(enc))
    count = np.zeros(len(enc))
    for b, rows in batches(enc, batch_size, pad_to):
        s, n = _response_nll(graphdef, state, interventions or {}, jnp.asarray(b["ids"]), jnp.asarray(b["am"]),
                             jnp.asarray(b["score"]))
        nll[rows], count[rows] = np.asarray(s, np.float64)[:len(rows)], np.asarray(n, np.float64)[:len(rows)]
    return nll, count


def ppl_change(base, pruned, count, groups, k: int, *, bootstrap: int = 0, seed: int = 0):
    """Relative perplexity change per group: exp((sum pruned - sum base) / sum count) - 1 over the instances of
    each of the k groups, and its paired-bootstrap 95% interval ((k, 2), NaN without resamples)."""
    change = np.zeros(k)
    ci = np.full((k, 2), np.nan)
    rng = np.random.default_rng(seed)
    for g in range(k):
        idx = np.flatnonzero(groups == g)
        d, n = pruned[idx] - base[idx], count[idx]
        change[g] = np.expm1(d.sum() / n.sum())
        if bootstrap and idx.size:
            r = rng.integers(0, idx.size, (bootstrap, idx.size))
            boot = np.expm1(d[r].sum(1) / np.maximum(n[r].sum(1), 1))
            ci[g] = np.quantile(boot, [0.025, 0.975])
    return change, ci


def neuron_interventions(names: Sequence[str], chosen: np.ndarray) -> dict:
    """{point: mask((F,) bool)} for every layer (a fixed structure: one compilation for every neuron set)."""
    return {p: mask(jnp.asarray(chosen[i])) for i, p in enumerate(names)}


# ------------------------------------------------------------------------------------------------ the study
def _summary(scores: np.ndarray, null: np.ndarray, chance: np.ndarray, functions) -> dict:
    """Per function: the distribution of the scores over all neurons, the null's, and the per-layer curves."""
    out = {}
    for k, f in enumerate(functions):
        s, s0 = scores[k].reshape(-1), null[k].reshape(-1)
        per_layer = scores[k].reshape(scores.shape[1], -1)
        null_layer = null[k].reshape(null.shape[1], -1)
        out[f] = {
            "chance": float(chance[k]), "mean": float(s.mean()), "median": float(np.median(s)),
            "p99": float(np.quantile(s, 0.99)), "p995": float(np.quantile(s, 0.995)), "max": float(s.max()),
            "below_0.2": float((s < 0.2).mean()), "above_0.5": float((s > 0.5).mean()),
            "above_0.8": float((s > 0.8).mean()),
            "null_mean": float(s0.mean()), "null_p999": float(np.quantile(s0, 0.999)), "null_max": float(s0.max()),
            "above_null_max": float((s > s0.max()).mean()),
            "layer_best": per_layer.max(1).tolist(), "layer_p995": np.quantile(per_layer, 0.995, axis=1).tolist(),
            "layer_mean": per_layer.mean(1).tolist(), "layer_null_mean": null_layer.mean(1).tolist(),
            "layer_null_best": null_layer.max(1).tolist(),
        }
    return out


def specialisation_study(model: nnx.Module, tokenizer, data: FunctionData, *, options: StudyOptions = StudyOptions(),
                         log: Optional[Callable[[str], None]] = None) -> dict:
    """All of the survey's section-4 analyses (module docstring) on `data`; returns a JSON-able dict with
    'scores' / 'null_scores' (K, L, F) float32 arrays added (not JSON: the caller saves or drops them)."""
    opt = options.check()
    start = time.perf_counter()
    say = (lambda line: log(f"[{time.perf_counter() - start:6.0f} s] {line}")) if log else (lambda line: None)
    functions = data.functions
    k = len(functions)
    names = hidden_points(model)
    score_enc = encode(tokenizer, data.split("score"), functions, max_len=opt.max_len, min_response=opt.min_response)
    eval_enc = encode(tokenizer, data.split("eval"), functions, max_len=opt.max_len, min_response=opt.min_response)
    tokens = {s: int(sum(len(x) for x in e.ids)) for s, e in (("score", score_enc), ("eval", eval_enc))}
    say(f"{len(names)} FFN layers; {len(score_enc)} scoring and {len(eval_enc)} evaluation instances "
        f"({tokens['score']} and {tokens['eval']} tokens)")

    acts = prompt_activations(model, score_enc, names, batch_size=opt.batch_size, pad_to=opt.pad_to, log=say)
    labels = np.eye(k, dtype=np.int64)[score_enc.function]
    spec = specialisation_scores(acts, labels, functions=functions)
    perm = np.random.default_rng(opt.seed).permutation(len(score_enc))
    null = specialisation_scores(acts, labels[perm], functions=functions)
    chance = labels.mean(0)
    say("functionality scores: " + ", ".join(f"{f} max {spec.scores[i].max():.3f}" for i, f in enumerate(functions)))

    scales = output_scales(model, names)
    hist = indicator_histograms(model, eval_enc, names, scales, bins=opt.bins, batch_size=opt.batch_size,
                                pad_to=opt.pad_to)
    below = hist[..., :int(round(0.2 * opt.bins))].sum(-1) / np.maximum(hist.sum(-1), 1)  # (L, 2)
    say(f"normalized indicator < 0.2: activation {below[:, 0].mean():.3f}, output magnitude {below[:, 1].mean():.3f}")

    base_nll, count = response_nll(model, eval_enc, batch_size=opt.batch_size, pad_to=opt.pad_to)
    fn = eval_enc.function
    base_ppl = [float(np.exp(base_nll[fn == g].sum() / count[fn == g].sum())) for g in range(k)]
    say("perplexity: " + ", ".join(f"{f} {p:.2f}" for f, p in zip(functions, base_ppl)))

    # dynamic masking on the first n_mask evaluation instances of each function
    rows = [i for g in range(k) for i in np.flatnonzero(fn == g)[:opt.n_mask]]
    masking = {"levels": [0.0] + [float(p) for p in opt.mask_levels], "instances": len(rows), "loss": {}}
    if rows:
        sub = eval_enc.subset(rows)
        indicators = ["activation"] + (["magnitude"] if opt.magnitude and scales is not None else [])
        for ind in indicators:
            losses = [[float(base_nll[rows][sub.function == g].sum() / count[rows][sub.function == g].sum())
                       for g in range(k)]]
            for p in opt.mask_levels:
                if ind == "activation":
                    iv = {FFN_HIDDEN: mask_low_activation(float(p))}
                else:
                    iv = {n: mask_low_activation(float(p), scale=jnp.asarray(scales[i])) for i, n in enumerate(names)}
                s, c = response_nll(model, sub, iv, batch_size=opt.batch_size, pad_to=opt.pad_to)
                losses.append([float(s[sub.function == g].sum() / c[sub.function == g].sum()) for g in range(k)])
                say(f"masking {ind} {p:.0%}: loss " + ", ".join(f"{x:.3f}" for x in losses[-1]))
            masking["loss"][ind] = losses

    # pruning the top neurons of each function, and random control sets
    L, F = spec.scores.shape[1:]
    n_top = int(round(opt.fraction * L * F))
    rows_out, change, ci, rng = [], [], [], np.random.default_rng(opt.seed + 1)
    sets = [(f, top_mask(spec, f, opt.fraction)) for f in functions]
    for r in range(opt.random_rows):
        chosen = np.zeros(L * F, bool)
        chosen[rng.choice(L * F, n_top, replace=False)] = True
        sets.append((f"random {r + 1}", chosen.reshape(L, F)))
    for name, chosen in sets:
        pruned, _ = response_nll(model, eval_enc, neuron_interventions(names, chosen), batch_size=opt.batch_size,
                                 pad_to=opt.pad_to)
        ch, interval = ppl_change(base_nll, pruned, count, fn, k, bootstrap=opt.bootstrap, seed=opt.seed)
        rows_out.append(name)
        change.append(ch.tolist())
        ci.append(interval.tolist())
        say(f"pruned {name}: " + ", ".join(f"{f} {c:+.1%}" for f, c in zip(functions, ch)))
    change_a = np.asarray(change)
    diag_max = [int(np.argmax(change_a[i]) == i) for i in range(k)]
    random_mean = change_a[k:].mean(0) if opt.random_rows else np.zeros(k)
    specific = change_a[:k] - random_mean[None, :]

    overlap = partition_overlap(spec, opt.fraction)
    off = overlap[~np.eye(k, dtype=bool)]
    per_layer = top_mask(spec, functions[0], opt.fraction).sum(1)
    say(f"overlap of the top {opt.fraction:.0%}: off-diagonal mean {off.mean():.3f}, max {off.max():.3f}")

    return {
        "functions": list(functions), "points": list(names), "layers": L, "neurons_per_layer": F,
        "options": dataclasses.asdict(opt), "tokens": tokens,
        "instances": {"score": len(score_enc), "eval": len(eval_enc)},
        "eval_tokens_scored": {f: int(count[fn == g].sum()) for g, f in enumerate(functions)},
        "score_distribution": _summary(spec.scores, null.scores, chance, functions),
        "all_neurons_below_0.2": float((spec.scores < 0.2).mean()),
        "indicators": {"bins": opt.bins, "counts": hist.tolist(), "below_0.2": below.tolist(),
                       "below_0.2_mean": below.mean(0).tolist(), "magnitude_available": scales is not None},
        "perplexity": dict(zip(functions, base_ppl)),
        "masking": masking,
        "pruning": {"rows": rows_out, "fraction": opt.fraction, "neurons": n_top, "change": change,
                    "ci95": ci, "target_is_row_max": diag_max, "rows_target_max": int(sum(diag_max)),
                    "minus_random": specific.tolist(),
                    "rows_target_max_minus_random": int(sum(int(np.argmax(specific[i]) == i) for i in range(k))),
                    "top_per_layer_first_function": per_layer.tolist()},
        "overlap": {"matrix": overlap.tolist(), "random_baseline": opt.fraction, "off_diagonal_mean": float(off.mean()),
                    "off_diagonal_max": float(off.max())},
        "seconds": time.perf_counter() - start,
        "scores": spec.scores.astype(np.float32), "null_scores": null.scores.astype(np.float32),
    }
