"""Named tap points of a forward, selected by glob patterns; the session that capture, interventions and
reductions run a forward under.

A tap point is a value a forward computes, named by the dotted path of the module that computes it and a point
name: `layers.3.mlp.hidden`, `layers.3.output`, `embed_tokens.input`; the root module's points have no prefix
(`input`, `output`). Model code marks them with `configurable_fm.models.taps` (`tap`, `@tapped`); when no
session is active they cost nothing. `tap_points(model, ids)` lists the points a forward produces with their
shapes (traced with `jax.eval_shape`, nothing computed).

Points of every module (each `__call__` in models/ is `@tapped`):
    <path>.input    the first positional argument of the module's call (token ids for Embed and the root)
    <path>.output   its return value; for modules that return (value, cache), the value
A point that an intervention replaces is what the module then uses: a replaced `.input` is what the module
computes on; a replaced `.output` is what its caller receives.

The points of each family, B batch, T time, D width, F MLP width, N query heads, H head dim, E experts, V vocab:
  llama (Llama, Mistral, Qwen2, SmolLM2, Mixtral-style MoE)
    input (B, T) ids                       output (B, T, V) logits
    embed_tokens.{input, output}           (B, T) ids -> (B, T, D)
    layers.<i>.input                       residual stream entering decoder layer i (B, T, D)
    layers.<i>.output                      residual stream after decoder layer i (B, T, D)
    layers.<i>.input_layernorm.{input, output}
    layers.<i>.self_attn.{input, output}   normed x -> attention output after o_proj (B, T, D)
    layers.<i>.self_attn.heads             per-head attention outputs before o_proj (B, T, N, H)
    layers.<i>.self_attn.{q,k,v,o}_proj.{input, output}
    layers.<i>.post_attention_layernorm.input    the mid-layer residual x + attn(x) (B, T, D)
    layers.<i>.post_attention_layernorm.output
    layers.<i>.mlp.{input, output}
    layers.<i>.mlp.hidden                  act(gate_proj(x)) * up_proj(x) (B, T, F): down_proj's input
    layers.<i>.mlp.{gate,up,down}_proj.{input, output}
    (MoE) layers.<i>.mlp.router_logits     (B, T, E);  layers.<i>.mlp.router.{input, output}
    (MoE) layers.<i>.mlp.hidden            act(gate_e(x)) * up_e(x) for every expert e (B, T, E, F)
    norm.{input, output}                   final RMSNorm (output: the last hidden states)
    lm_head.{input, output}                untied head only (a tied head is embed_tokens.attend: no point)
  gpt2
    input, output; wte.{input, output}; wpe.{input (positions), output}
    h.<i>.{input, output}                  residual stream entering / after block i
    h.<i>.ln_1, h.<i>.ln_2, ln_f           .{input, output}
    h.<i>.attn.{input, output, heads}; h.<i>.attn.c_attn, h.<i>.attn.c_proj   .{input, output}
    h.<i>.mlp.{input, output}; h.<i>.mlp.hidden = act(c_fc(x)) (B, T, F); h.<i>.mlp.c_fc, h.<i>.mlp.c_proj
  bert
    input (B, T) ids; output (B, T, D) last hidden states
    embeddings.{input, output}; embeddings.{word,position,token_type}_embeddings.{input, output}
      (position_embeddings.input is arange(T), shape (T,)); embeddings.LayerNorm.{input, output}
    encoder.{input, output}; encoder.layer.<i>.{input, output}   hidden state entering / after layer i
    encoder.layer.<i>.attention.{input, output}; .attention.self.{input, output, heads}
    .attention.self.{query,key,value}.{input, output}; .attention.output.{input, output} (input: the attention
      context before the dense); .attention.output.dense, .attention.output.LayerNorm
    encoder.layer.<i>.intermediate.{input, output, hidden} (hidden = output = act(dense(x)), (B, T, F))
    encoder.layer.<i>.output.{input, output, dense, LayerNorm}
    pooler.{input, output}, pooler.dense   (only in `model.pooled(...)`)

Patterns are globs over the dotted names, segment by segment (bricks.select.glob_to_regex): `*` is any text
within one segment, `**` any number of segments: `layers.*.mlp.hidden`, `**.down_proj.input`, `layers.3.**`.
A pattern that matches no point of the forward is an error (`TapError`) that lists close matches.

A session is made for one model object when the forward starts (inside the jitted function if there is one), so
`capture(...)` works under `jax.jit`, `nnx.jit` and `jax.grad`; a jitted function called *inside* the session's
forward would hide its points (it may have been traced without them): put jit around the capture, not inside.
A point computed several times in one forward (a module called twice, or a function calling the model twice)
visits the session each time. Llama layers run without remat while a session is active.
"""
from __future__ import annotations

import difflib
import re
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from configurable_fm.bricks.select import glob_to_regex
from configurable_fm.models.taps import TapContext, activate

Call = Callable[[nnx.Module], Any]
_GLOB_CHARS = re.compile(r"[*?\[]")


class TapError(ValueError):
    """A pattern matches no tap point, a point is captured twice, or an intervention does not fit its point."""


def as_call(call) -> Call:
    """`call` when it is a function model -> output; token ids (B, T) become `lambda model: model(ids)`."""
    if callable(call):
        return call
    if hasattr(call, "shape"):
        return lambda model: model(call)
    raise TypeError(f"expected a function model -> output or token ids (B, T), got {type(call).__name__}")


def patterns_of(points: str | Sequence[str], what: str) -> list[str]:
    """A list of glob patterns from one pattern or a sequence of them (empty strings rejected)."""
    patterns = [points] if isinstance(points, str) else list(points)
    bad = [p for p in patterns if not isinstance(p, str) or not p]
    if bad:
        raise TypeError(f"{what}: tap point patterns are non-empty strings, got {bad}")
    return patterns


class Matcher:
    """Which of a list of glob patterns match a point name (exact names by lookup, globs by regex), cached."""

    def __init__(self, patterns: Sequence[str]):
        self.patterns = list(patterns)
        self._compiled = [(i, None if not _GLOB_CHARS.search(p) else re.compile(glob_to_regex(p)))
                          for i, p in enumerate(self.patterns)]
        self._cache: dict[str, tuple[int, ...]] = {}

    def __call__(self, point: str) -> tuple[int, ...]:
        """Indices of the patterns that match `point`."""
        hit = self._cache.get(point)
        if hit is None:
            hit = tuple(i for i, rx in self._compiled
                        if (rx.fullmatch(point) is not None if rx is not None else self.patterns[i] == point))
            self._cache[point] = hit
        return hit


def generic_name(point: str) -> str:
    """'layers.3.mlp.hidden' -> 'layers.*.mlp.hidden' (list indices as '*')."""
    return re.sub(r"(?<=\.)\d+(?=\.|$)|^\d+(?=\.|$)", "*", point)


def no_match_error(what: str, pattern: str, seen: Sequence[str]) -> TapError:
    """The error for a pattern that matched none of the points `seen` in a forward, with close matches."""
    if not seen:
        return TapError(f"{what}: pattern {pattern!r} matches no tap point: the forward produced none (is the model "
                        "run inside the call, and not inside a jitted function of its own?)")
    shapes = list(dict.fromkeys(generic_name(p) for p in seen))
    close = difflib.get_close_matches(pattern, list(dict.fromkeys(shapes + list(seen))), n=6, cutoff=0.5)
    hint = f"close matches: {close}" if close else f"the forward's points include {shapes[:12]}"
    return TapError(f"{what}: pattern {pattern!r} matches no tap point of this forward; {hint} (list them all with "
                    "configurable_fm.analysis.tap_points(model, ids))")


class Intervention:
    """Base of the interventions made by `replace`, `add`, `mask`, `patch_from` (analysis/interventions.py).

    `apply(value, point)` returns the value the model uses at `point` instead of `value`. A plain function
    `fn(value) -> value` can be given wherever an Intervention is accepted."""

    def apply(self, value, point: str):
        raise NotImplementedError


def apply_intervention(fn, value, point: str):
    """`fn` (an Intervention or a function value -> value) applied at `point`, errors naming the point."""
    try:
        new = fn.apply(value, point) if isinstance(fn, Intervention) else fn(value)
    except TapError:
        raise
    except (ValueError, TypeError, IndexError) as e:
        raise TapError(f"intervention at {point} (a {jnp.dtype(value.dtype).name} value of shape "
                       f"{tuple(value.shape)}): {e}") from e
    if not hasattr(new, "shape") or tuple(new.shape) != tuple(value.shape):
        got = tuple(new.shape) if hasattr(new, "shape") else type(new).__name__
        raise TapError(f"intervention at {point} returned {got}; the point's value is {tuple(value.shape)}")
    return new if new.dtype == value.dtype else new.astype(value.dtype)


class Session(TapContext):
    """One forward's view of the tap points of `model`: applies interventions, hands selected points to `record`.

    record_patterns: globs of the points passed to `record(point, value)` (after the interventions at that point).
    interventions: [(glob, Intervention or fn)], applied in order to every matching point.
    `seen` collects {point: ShapeDtypeStruct} of every point visited (in forward order); `check()` raises a
    TapError for every pattern that matched nothing.
    """

    def __init__(self, model: nnx.Module, *, what: str, record_patterns: Sequence[str] = (),
                 record: Callable[[str, Any], None] | None = None,
                 interventions: Sequence[tuple[str, Any]] = ()):
        super().__init__(model)
        self.what = what
        self.record_patterns = list(record_patterns)
        self.record = record
        self.interventions = list(interventions)
        self._record_matcher = Matcher(self.record_patterns)
        self._intervention_matcher = Matcher([p for p, _ in self.interventions])
        self.seen: dict[str, jax.ShapeDtypeStruct] = {}
        self.visits: dict[str, int] = {}
        self._used_record: set[int] = set()
        self._used_interventions: set[int] = set()

    def on_point(self, point: str, value):
        if not hasattr(value, "shape") or not hasattr(value, "dtype"):
            return value
        self.seen.setdefault(point, jax.ShapeDtypeStruct(tuple(value.shape), value.dtype))
        self.visits[point] = self.visits.get(point, 0) + 1
        for i in self._intervention_matcher(point):
            self._used_interventions.add(i)
            value = apply_intervention(self.interventions[i][1], value, point)
        hits = self._record_matcher(point)
        if hits:
            self._used_record.update(hits)
            self.record(point, value)
        return value

    def check(self):
        for i, pattern in enumerate(self.record_patterns):
            if i not in self._used_record:
                raise no_match_error(self.what, pattern, list(self.seen))
        for i, (pattern, _) in enumerate(self.interventions):
            if i not in self._used_interventions:
                raise no_match_error(f"{self.what} (intervention)", pattern, list(self.seen))


def run_session(model: nnx.Module, call, session_factory: Callable[[nnx.Module], Session]):
    """(output of `call(model)` run under the session `session_factory(model)`, the session), patterns checked."""
    session = session_factory(model)
    with activate(session):
        out = as_call(call)(model)
    session.check()
    return out, session


def intervention_items(interventions, what: str) -> list[tuple[str, Any]]:
    """[(glob, intervention)] from a mapping {glob: Intervention or fn}, or None (no interventions)."""
    if interventions is None:
        return []
    if not isinstance(interventions, Mapping):
        raise TypeError(f"{what}: interventions are a mapping {{pattern: intervention}}, got "
                        f"{type(interventions).__name__}")
    items = list(interventions.items())
    for pattern, fn in items:
        patterns_of(pattern, what)
        if not (isinstance(fn, Intervention) or callable(fn)):
            raise TypeError(f"{what}: the intervention for {pattern!r} is a {type(fn).__name__}, not an "
                            "Intervention (replace, add, mask, patch_from) or a function value -> value")
    return items


def tap_points(model: nnx.Module, call) -> dict[str, jax.ShapeDtypeStruct]:
    """{point: ShapeDtypeStruct} of every tap point the forward `call` produces, in the order it produces them.

    call: token ids (B, T) (an array or a jax.ShapeDtypeStruct) to run `model(ids)`, or a function model ->
    output. Nothing is computed: the forward is traced with `jax.eval_shape` (abstract models work too).
    """
    graphdef, state = nnx.split(model)
    found: dict[str, jax.ShapeDtypeStruct] = {}

    def forward(state, ids):
        m = nnx.merge(graphdef, state)
        _, session = run_session(m, (lambda mm: mm(ids)) if ids is not None else call,
                                 lambda mm: Session(mm, what="tap_points"))
        found.update(session.seen)

    ids = call if not callable(call) else None
    if ids is not None and not hasattr(ids, "shape"):
        raise TypeError(f"tap_points: expected token ids (B, T) or a function model -> output, got "
                        f"{type(call).__name__}")
    jax.eval_shape(forward, state, ids)
    return found
