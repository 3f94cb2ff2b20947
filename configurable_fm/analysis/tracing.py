"""Causal tracing (Meng et al., 2022, "Locating and Editing Factual Associations in GPT", ROME §2): which hidden
states carry a fact from the subject to the prediction; and the layers it suggests for a locate-then-edit method.

    result = trace_fact(model, tok, "The capital of {} is", "France")          # target: the model's own answer
    result.p_clean, result.p_corrupted                     # p(answer | prompt), p(answer | noised subject)
    result.effects["mlp"]                                  # (T, L) indirect effects
    result.suggest_layers("mlp", k=3)                      # e.g. [4, 5, 3]: where to apply ROME
    plot_trace(result)                                     # the three heat maps of the paper

The method, for a prompt of T tokens whose tokens [s0, s1) are the subject, a target token o (by default the
model's greedy prediction, as the authors' `calculate_hidden_flow`), and a model of L layers:
  clean run       p_clean = P(o | prompt) at the last position; every hidden state is kept.
  corrupted run   the embeddings of the subject tokens get Gaussian noise: e_t' = e_t + sigma * z_t, z_t ~ N(0, I)
                  for t in [s0, s1) (the output of the token embedding, `embed_tokens.output` / gpt2 `wte.output`,
                  before gpt2 adds position embeddings: where the authors' code adds it); p_corrupted = the mean of
                  P(o) over `samples` noise draws.
  restored run    the corrupted run with the clean value put back at one token t and one place:
                    'residual': the residual stream after layer l (`layers.<l>.output`, gpt2 `h.<l>.output`),
                    'mlp':      the MLP outputs of the layers in the window around l (`layers.<j>.mlp.output`),
                    'attn':     the attention outputs of that window (`layers.<j>.self_attn.output`,
                                gpt2 `h.<j>.attn.output`),
                  with the window of the authors' `trace_important_window`:
                  j in [max(0, l - w//2), min(L, l + ceil(w/2))) (w = `window`, 10 in the paper; the residual
                  stream is restored at one layer, as theirs);
                  p_restored[t, l] = the mean of P(o) over the same noise draws.
  indirect effect IE[t, l] = p_restored[t, l] - p_corrupted;  total effect = p_clean - p_corrupted.
The noise draws are made once (from `key`) and shared by every cell, as the authors' code does (it reseeds its
generator in every run), so the cells differ only in what is restored.

Noise level. sigma = noise * std, noise = 3 by default (the paper's nu = 3 sigma_t) and std the standard deviation
of the embedding entries of subject tokens. The authors take std over the subjects of their whole fact set
(`collect_embedding_std` over the 1209 known facts); pass that as `embedding_std=` (computed by
`subject_embedding_std(model, tok, subjects)`); when it is not given, std is taken over this prompt's subject
tokens alone (enough for a single trace, but noisier from one fact to the next: use the corpus value to compare
facts).

Computation. Tokens before the subject are identical in the clean and corrupted runs (the models are causal), so
restoring them changes nothing: their rows are p_corrupted (effect 0) without being run. Every other cell (kind,
t, l) is a batch of `samples` rows of the same prompt, with the noise added and the clean values put in by the
analysis interventions (`add` at the embedding point, `replace` with a per-row token mask at every restorable
point). Cells are stacked along the batch, `rows_per_call` rows per forward (one jitted function, compiled once;
the last call padded); each forward computes the logits of the last position only. The cost is
(number of kinds) x (T - s0) x L x samples sequences of T tokens.

`suggest_layers(kind="mlp", k)` ranks layers by the indirect effect at the subject's last token (the authors'
criterion: the MLP window peak, layer 17 of GPT-2 XL, is where ROME edits); `suggest_layers([r1, r2, ...])`
averages that over several traces first. Hase et al. (2023) find that this localisation predicts the best layer
to edit poorly: treat it as a starting point for a sweep.

Families: llama (and Mistral/Qwen2/SmolLM2) and gpt2 (models/taps points; analysis/taps.py lists them).
"""
from __future__ import annotations

import dataclasses
import functools
import time
from typing import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from configurable_fm.analysis.capture import capture, intervene
from configurable_fm.analysis.interventions import add, replace
from configurable_fm.checks import is_int
from configurable_fm.data.synthetic.evaluate import encode_text

KINDS = ("residual", "mlp", "attn")
PLACEHOLDER = "{}"
CMAPS = {"residual": "Purples", "mlp": "Greens", "attn": "Reds"}
NAMES = {"residual": "hidden state", "mlp": "MLP", "attn": "attention"}


@dataclasses.dataclass(frozen=True)
class Layout:
    """Where a family's tap points are: the embedding module, the layer container and the point suffixes."""

    embed: str  # the token embedding module ('embed_tokens' / 'wte'); its output is noised
    container: str  # 'layers' / 'h'
    points: tuple[tuple[str, str], ...]  # (kind, suffix after '<container>.<l>'): '' is the layer's output

    def point(self, kind: str, layer: int) -> str:
        suffix = dict(self.points)[kind]
        return f"{self.container}.{layer}.{suffix}output" if suffix else f"{self.container}.{layer}.output"


LAYOUTS = {
    "llama": Layout("embed_tokens", "layers", (("residual", ""), ("mlp", "mlp."), ("attn", "self_attn."))),
    "gpt2": Layout("wte", "h", (("residual", ""), ("mlp", "mlp."), ("attn", "attn."))),
}


def layout_of(model: nnx.Module) -> tuple[Layout, int]:
    """(the Layout of `model`'s family, its number of layers); TypeError for other models."""
    for layout in LAYOUTS.values():
        if hasattr(model, layout.embed) and hasattr(model, layout.container) and hasattr(model, "hidden_states"):
            return layout, len(getattr(model, layout.container))
    raise TypeError(f"causal tracing needs a decoder of the llama or gpt2 family (token embedding `embed_tokens` + "
                    f"`layers`, or `wte` + `h`); got {type(model).__name__}")


def window_layers(layer: int, window: int, num_layers: int) -> range:
    """The layers restored for the cell centred at `layer`: [max(0, l - w//2), min(L, l + ceil(w/2)))."""
    return range(max(0, layer - window // 2), min(num_layers, layer - (-window // 2)))


@dataclasses.dataclass(frozen=True, eq=False)
class Trace:
    """The result of a causal trace (module docstring). Grids are (T, L) float64, row t = token t.

    tokens: the token strings; ids (T,); subject: the subject's tokens [start, end); target_id / target: the
    token whose probability is measured at the last position; p_clean, p_corrupted: floats; p_restored:
    {kind: (T, L)}; noise_std: sigma (noise x embedding std); noise: the draws used, (samples, end - start, D)
    standard normal; window: the MLP / attention window; seconds: wall time of the trace.
    """

    tokens: tuple[str, ...]
    ids: np.ndarray
    subject: tuple[int, int]
    target_id: int
    target: str
    p_clean: float
    p_corrupted: float
    p_restored: Mapping[str, np.ndarray]
    noise_std: float
    noise: np.ndarray
    samples: int
    window: int
    seconds: float = 0.0

    @property
    def kinds(self) -> tuple[str, ...]:
        return tuple(self.p_restored)

    @property
    def num_layers(self) -> int:
        return next(iter(self.p_restored.values())).shape[1]

    @property
    def last_subject(self) -> int:
        """The position of the subject's last token."""
        return self.subject[1] - 1

    @property
    def effects(self) -> dict[str, np.ndarray]:
        """{kind: indirect effect (T, L)} = p_restored - p_corrupted."""
        return {k: v - self.p_corrupted for k, v in self.p_restored.items()}

    @property
    def total_effect(self) -> float:
        """p_clean - p_corrupted."""
        return self.p_clean - self.p_corrupted

    def effect(self, kind: str = "mlp") -> np.ndarray:
        return self.effects[_kind(kind, self.kinds)]

    def suggest_layers(self, kind: str = "mlp", k: int = 1) -> list[int]:
        """The `k` layers with the largest indirect effect of `kind` at the subject's last token, largest first
        (for 'mlp' / 'attn': the centres of the restored windows)."""
        return suggest_layers([self], kind, k)

    def summary(self) -> str:
        lines = [f"p({self.target!r}): clean {self.p_clean:.4f}, corrupted {self.p_corrupted:.4f} "
                 f"(total effect {self.total_effect:+.4f}; noise sigma {self.noise_std:.4f}, {self.samples} samples, "
                 f"{self.seconds:.1f} s)"]
        for kind in self.kinds:
            e = self.effect(kind)[self.last_subject]
            best = int(np.argmax(e))
            last = self.effect(kind)[-1].max()
            lines.append(f"  {kind:8s} at the last subject token {self.tokens[self.last_subject]!r}: max indirect "
                         f"effect {e[best]:+.4f} at layer {best}; at the last token: max {last:+.4f}")
        return "\n".join(lines)

    def __repr__(self) -> str:
        return (f"Trace({''.join(self.tokens)!r}, subject={self.subject}, target={self.target!r}, "
                f"p_clean={self.p_clean:.4f}, p_corrupted={self.p_corrupted:.4f}, kinds={self.kinds}, "
                f"layers={self.num_layers})")


def _kind(kind: str, available: Sequence[str]) -> str:
    if kind not in available:
        raise ValueError(f"kind {kind!r} is not in this trace; it has {list(available)}")
    return kind


def suggest_layers(results: Sequence[Trace] | Trace, kind: str = "mlp", k: int = 1) -> list[int]:
    """The `k` layers with the largest indirect effect of `kind` at the subject's last token, averaged over the
    traces `results` (ROME's criterion; module docstring), largest first."""
    results = [results] if isinstance(results, Trace) else list(results)
    if not results:
        raise ValueError("suggest_layers: no traces given")
    if k < 1:
        raise ValueError(f"suggest_layers: k must be >= 1, got {k}")
    sizes = {r.num_layers for r in results}
    if len(sizes) != 1:
        raise ValueError(f"suggest_layers: the traces have different numbers of layers {sorted(sizes)}")
    mean = np.mean([r.effect(kind)[r.last_subject] for r in results], axis=0)
    return [int(i) for i in np.argsort(-mean, kind="stable")[:k]]


# ----------------------------------------------------------------------------------------------- computation
@functools.partial(jax.jit, static_argnames=("graphdef", "embed", "points"))
def _clean_run(state, ids_1xT, *, graphdef, embed: str, points: tuple[str, ...]):
    model = nnx.merge(graphdef, state)

    def forward(m):
        h = m.hidden_states(ids_1xT)[0]
        return m.logits(h[:, -1:])[:, 0]

    logits_1xV, values = capture(model, (embed,) + points, forward)
    return jax.nn.softmax(logits_1xV.astype(jnp.float32), axis=-1)[0], values


@functools.partial(jax.jit, static_argnames=("graphdef", "embed", "points"))
def _restored_probs(state, ids_1xT, noise_SxTxD, clean, pos_C, restore_CxP, target, *, graphdef, embed: str,
                    points: tuple[str, ...]):
    """P(target) at the last position, averaged over the noise draws, for C cells: cell c restores the clean
    value of points[j] at token pos_C[c] for every j with restore_CxP[c, j] (pos -1: nothing restored)."""
    model = nnx.merge(graphdef, state)
    c, s, t = pos_C.shape[0], noise_SxTxD.shape[0], ids_1xT.shape[1]
    ids = jnp.broadcast_to(ids_1xT, (c * s, t))
    at_CxT = jnp.arange(t)[None, :] == pos_C[:, None]
    interventions = {embed: add(jnp.tile(noise_SxTxD, (c, 1, 1)))}  # row c * s + i: cell c, draw i
    for j, point in enumerate(points):
        rows = jnp.repeat(at_CxT & restore_CxP[:, j][:, None], s, axis=0)
        interventions[point] = replace(clean[point], positions=rows)

    def forward(m):
        return m.logits(m.hidden_states(ids)[0][:, -1:])[:, 0]

    logits = intervene(model, interventions, forward)
    p = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)[:, target]
    return p.reshape(c, s).mean(axis=1)


def causal_trace(model: nnx.Module, ids: Sequence[int], subject: tuple[int, int], *, target: int | None = None,
                 kinds: Sequence[str] = KINDS, samples: int = 10, noise: float = 3.0,
                 embedding_std: float | None = None, window: int = 10, key: jax.Array | None = None,
                 rows_per_call: int = 256, token_strings: Sequence[str] | None = None,
                 target_string: str | None = None) -> Trace:
    """Causal tracing of one prompt given as token ids (module docstring).

    ids: the prompt's token ids (T,) (a 1-D sequence, or (1, T)). subject: the subject's token positions
    [start, end). target: the token whose probability is traced; None: the model's greedy prediction at the last
    position. kinds: any of 'residual', 'mlp', 'attn'. samples: noise draws per cell. noise: the noise scale in
    units of the embedding std; embedding_std: that std (None: the std of the embedding entries of this prompt's
    subject tokens). window: the number of MLP / attention layers restored around each layer. key: PRNG key of
    the noise (default key 0). rows_per_call: batch rows per forward (memory ~ rows x T x width).
    token_strings / target_string: labels for the result (default: the ids as text).
    """
    t0 = time.perf_counter()
    layout, num_layers = layout_of(model)
    given = np.asarray(ids)
    if (given.ndim not in (1, 2) or given.ndim == 2 and given.shape[0] != 1 or given.size == 0
            or not np.issubdtype(given.dtype, np.integer)):
        raise ValueError(f"ids must be the token ids of one prompt, integers (T,) or (1, T), got {given.dtype} "
                         f"{given.shape}")
    ids_T = given.astype(np.int32).reshape(-1)
    t = len(ids_T)
    s0, s1 = (int(subject[0]), int(subject[1]))
    if not 0 <= s0 < s1 <= t:
        raise ValueError(f"subject token range {subject} is not a non-empty range inside the {t} tokens of the prompt")
    kinds = tuple(kinds)
    bad = [k for k in kinds if k not in KINDS]
    if bad or not kinds or len(set(kinds)) != len(kinds):
        raise ValueError(f"kinds must be distinct names among {list(KINDS)}, got {list(kinds)}")
    counts = (samples, window, rows_per_call)
    if any(not is_int(n) or n < 1 for n in counts):
        raise ValueError(f"samples, window and rows_per_call must be ints >= 1 (got {samples!r}, {window!r}, "
                         f"{rows_per_call!r})")
    for name, value in (("noise", noise), ("embedding_std", embedding_std)):
        if value is not None and not (isinstance(value, (int, float, np.number)) and np.isfinite(value)
                                      and value >= 0):
            raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    graphdef, state = nnx.split(model)
    points = tuple(layout.point(k, l) for k in kinds for l in range(num_layers))
    ids_1xT = jnp.asarray(ids_T[None])
    probs_V, clean = _clean_run(state, ids_1xT, graphdef=graphdef, embed=f"{layout.embed}.output", points=points)
    probs_V = np.asarray(probs_V, np.float64)
    target = int(np.argmax(probs_V)) if target is None else int(target)
    if not 0 <= target < probs_V.shape[0]:
        raise ValueError(f"target token {target} is outside the vocabulary ({probs_V.shape[0]})")
    emb = np.asarray(clean.pop(f"{layout.embed}.output"), np.float64)[0]  # (T, D)
    std = float(np.std(emb[s0:s1])) if embedding_std is None else float(embedding_std)
    sigma = float(noise) * std
    key = jax.random.key(0) if key is None else key
    z = np.asarray(jax.random.normal(key, (samples, s1 - s0, emb.shape[1]), jnp.float32))
    noise_SxTxD = np.zeros((samples, t, emb.shape[1]), np.float32)
    noise_SxTxD[:, s0:s1] = sigma * z

    # cells: (kind, position, layer) for positions from the subject on, plus one cell restoring nothing
    cells = [(None, -1, -1)] + [(k, p, l) for k in kinds for p in range(s0, t) for l in range(num_layers)]
    index = {pt: j for j, pt in enumerate(points)}
    pos = np.array([p for _, p, _ in cells], np.int32)
    restore = np.zeros((len(cells), len(points)), bool)
    for c, (k, _, l) in enumerate(cells):
        if k is not None:
            for j in ([l] if k == "residual" else window_layers(l, window, num_layers)):
                restore[c, index[layout.point(k, j)]] = True
    per_call = max(1, min(len(cells), rows_per_call // samples))
    out = np.zeros(len(cells), np.float64)
    run = functools.partial(_restored_probs, graphdef=graphdef, embed=f"{layout.embed}.output", points=points)
    noise_j = jnp.asarray(noise_SxTxD)
    target_j = jnp.asarray(target, jnp.int32)
    for start in range(0, len(cells), per_call):
        stop = min(len(cells), start + per_call)
        p_c, r_c = pos[start:stop], restore[start:stop]
        if stop - start < per_call:  # pad with the nothing-restored cell: one compilation
            p_c = np.concatenate([p_c, np.full(per_call - (stop - start), -1, np.int32)])
            r_c = np.concatenate([r_c, np.zeros((per_call - (stop - start), len(points)), bool)])
        got = run(state, ids_1xT, noise_j, clean, jnp.asarray(p_c), jnp.asarray(r_c), target_j)
        out[start:stop] = np.asarray(got, np.float64)[:stop - start]
    p_corrupted = float(out[0])
    grids = {}
    for k in kinds:
        g = np.full((t, num_layers), p_corrupted)
        for c, (kk, p, l) in enumerate(cells):
            if kk == k:
                g[p, l] = out[c]
        grids[k] = g
    tokens = tuple(token_strings) if token_strings is not None else tuple(str(i) for i in ids_T)
    if len(tokens) != t:
        raise ValueError(f"{len(tokens)} token strings for {t} tokens")
    return Trace(tokens=tokens, ids=ids_T, subject=(s0, s1), target_id=target,
                 target=target_string if target_string is not None else str(target), p_clean=float(probs_V[target]),
                 p_corrupted=p_corrupted, p_restored=grids, noise_std=sigma, noise=z, samples=samples, window=window,
                 seconds=time.perf_counter() - t0)


# ----------------------------------------------------------------------------------------------- text
def _encoding(tokenizer, text: str):
    return tokenizer.encode(text, add_special_tokens=False)


def subject_tokens(tokenizer, text: str, start: int, end: int, offset: int = 0) -> tuple[int, int]:
    """Token positions [s0, s1) covering the characters [start, end) of `text` (+ `offset` tokens before it):
    from the tokenizer's character offsets when it gives them (a `tokenizers.Encoding`), else by encoding the
    text before and up to the end of the span (the tokens shared with the whole text's start, and the count up
    to the span's end)."""
    enc = _encoding(tokenizer, text)
    offsets = getattr(enc, "offsets", None)
    if offsets:
        hit = [i for i, (a, b) in enumerate(offsets) if a < end and b > start and b > a]
        if not hit:
            raise ValueError(f"no token of {text!r} covers the characters [{start}, {end})")
        return offset + hit[0], offset + hit[-1] + 1
    full, before = encode_text(tokenizer, text), encode_text(tokenizer, text[:start])
    s0 = 0
    while s0 < min(len(full), len(before)) and full[s0] == before[s0]:
        s0 += 1
    s1 = len(encode_text(tokenizer, text[:end]))
    if not s0 < s1:
        raise ValueError(f"cannot locate the characters [{start}, {end}) among the tokens of {text!r}")
    return offset + s0, offset + s1


def trace_fact(model: nnx.Module, tokenizer, prompt: str, subject: str, *, target: str | int | None = None,
               bos_id: int | None = None, **kwargs) -> Trace:
    """Causal tracing of a prompt given as text (module docstring).

    prompt: text with '{}' where the subject goes ('The capital of {} is'), or a text that contains `subject`
    (its first occurrence is traced). target: a string (its first token is traced; a leading space is part of
    it: ' Paris'), a token id, or None (the model's greedy prediction). bos_id: prepended when the model expects
    it. Other keywords go to `causal_trace` (kinds, samples, noise, embedding_std, window, key, rows_per_call).
    tokenizer: a tokenizers.Tokenizer or anything with encode(text, add_special_tokens=False) and decode(ids).
    """
    if PLACEHOLDER in prompt:
        i = prompt.index(PLACEHOLDER)
        text = prompt[:i] + subject + prompt[i + len(PLACEHOLDER):]
    else:
        i = prompt.find(subject)
        if i < 0:
            raise ValueError(f"prompt {prompt!r} holds neither '{{}}' nor the subject {subject!r}")
        text = prompt
    bos = [] if bos_id is None else [int(bos_id)]
    ids = bos + encode_text(tokenizer, text)
    span = subject_tokens(tokenizer, text, i, i + len(subject), offset=len(bos))
    if isinstance(target, str):
        tids = encode_text(tokenizer, target)
        if not tids:
            raise ValueError(f"target {target!r} encodes to no tokens")
        target = tids[0]
    decode = lambda xs: tokenizer.decode([int(x) for x in xs], skip_special_tokens=False)  # noqa: E731
    result = causal_trace(model, ids, span, target=target, token_strings=[decode([x]) for x in ids], **kwargs)
    return dataclasses.replace(result, target=decode([result.target_id]))


def subject_embedding_std(model: nnx.Module, tokenizer, subjects: Sequence[str]) -> float:
    """The standard deviation of the token-embedding entries of the subjects' tokens, each subject encoded on its
    own (the authors' `collect_embedding_std`); 3 x this is the paper's noise level."""
    if not subjects:
        raise ValueError("subject_embedding_std: no subjects given")
    layout, _ = layout_of(model)
    embed = getattr(model, layout.embed)
    ids = sorted({i for s in subjects for i in encode_text(tokenizer, s)})
    _, values = capture(model, f"{layout.embed}.output", lambda m: embed(jnp.asarray([ids], jnp.int32)))
    # every token of every subject counts once per occurrence, as in the authors' concatenation
    rows = {i: r for i, r in zip(ids, np.asarray(values[f"{layout.embed}.output"], np.float64)[0])}
    allrows = np.stack([rows[i] for s in subjects for i in encode_text(tokenizer, s)])
    return float(np.std(allrows))


# ----------------------------------------------------------------------------------------------- plot
def plot_trace(result: Trace, ax=None, *, kind: str | None = None, effect: bool = False):
    """The paper's heat maps: p(target) after restoring each (token, layer) state, tokens on y (subject tokens
    marked '*'), layers on x, the colour scale starting at p_corrupted (effect=True: the indirect effect from 0).
    kind: one kind on `ax` (a matplotlib Axes; a new figure when None); kind=None draws every kind of the trace
    side by side (`ax`: a sequence of Axes, or None). Returns the figure."""
    import matplotlib.pyplot as plt

    kinds = result.kinds if kind is None else (_kind(kind, result.kinds),)
    if ax is None:
        fig, axes = plt.subplots(1, len(kinds), figsize=(3.6 * len(kinds), 0.3 * len(result.tokens) + 1.6),
                                 squeeze=False, constrained_layout=True)
        axes = list(axes[0])
    else:
        axes = list(ax) if isinstance(ax, (list, tuple, np.ndarray)) else [ax]
        if len(axes) != len(kinds):
            raise ValueError(f"plot_trace: {len(axes)} axes for {len(kinds)} kinds")
        fig = axes[0].figure
    labels = [repr(tok)[1:-1] + ("*" if result.subject[0] <= i < result.subject[1] else "")
              for i, tok in enumerate(result.tokens)]
    for a, k in zip(axes, kinds):
        grid = result.effect(k) if effect else result.p_restored[k]
        vmin = 0.0 if effect else result.p_corrupted
        im = a.pcolormesh(grid, cmap=CMAPS[k], vmin=vmin, vmax=max(vmin + 1e-9, float(grid.max())))
        a.invert_yaxis()
        a.set_yticks(np.arange(len(labels)) + 0.5, labels, fontsize=8)
        step = max(1, result.num_layers // 6)
        ticks = list(range(0, result.num_layers, step))
        a.set_xticks(np.asarray(ticks) + 0.5, [str(x) for x in ticks], fontsize=8)
        if k == "residual":
            a.set_title("restoring the hidden state", fontsize=9)
            a.set_xlabel("single restored layer", fontsize=8)
        else:
            a.set_title(f"restoring {NAMES[k]} outputs", fontsize=9)
            a.set_xlabel(f"centre of {result.window} restored layers", fontsize=8)
        cb = fig.colorbar(im, ax=a)
        cb.ax.tick_params(labelsize=7)
        cb.set_label(("IE on " if effect else "") + f"p({result.target.strip()})", fontsize=8)
    return fig


__all__ = ["Trace", "causal_trace", "trace_fact", "suggest_layers", "subject_embedding_std", "subject_tokens",
           "plot_trace", "window_layers", "KINDS"]
