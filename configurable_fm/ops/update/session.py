"""Sequential editing, made explicit: a session carries what sequential methods need between edits.

    session = EditSession(model, tok, "alphaedit", layers=[3, 4, 5], stats=stats, key=jax.random.key(0),
                          on_edit=lambda s, delta: evaluate(s.model), every=100)
    for batch in chunks(requests, 100):
        session.edit(batch)              # the delta of this batch; session.model is the edited model
    session.finish()                     # runs on_edit once more unless it just ran
    session.model, session.deltas, session.total(), session.state, session.log
    session.rollback(1)                  # the model and the method's state before the last edit

Independent edits share nothing: each `rome(...)`, `memit(...)`, `alphaedit(..., state=None)` call starts from
scratch. Sequential editing is a fold over batches with an explicit state, and this module is that fold:

    SessionState = (model, method state, deltas, undo records, edits, steps)
    edit_step(config, state, requests, key) -> (state', delta)     state' holds apply(model, delta)
    undo_step(config, state) -> state                              the state before the last step
    init_session(model, config) -> SessionState

all pure (inputs are never modified). `EditSession` is a thin convenience wrapper that keeps the current
SessionState, derives each step's PRNG key as fold_in(key, step), and calls `on_edit(session, delta)` after the
edits that cross a multiple of `every` requests (every=1: after each edit; every=N: every N requests; None:
only on `finish()`); what on_edit returns is appended to `session.log` as (edits, steps, result).

Methods (`EDITORS`, or any `Editor`): 'rome' (one request after another, each applied before the next: the
classic sequential ROME; layers = [l]), 'memit' (sequential MEMIT: stateless, each batch a fresh MEMIT on the
current model), 'alphaedit' (state: null-space projectors and key histories, alphaedit.py), 'rlsedit' (state:
Grams and inverses, rlsedit.py), 'ft' (FT-L, stateless; layers = [l]). An Editor is (name, hparams class,
init(model, layers, stats, hparams) -> state, step(model, tokenizer, requests, state, layers, stats, hparams, key,
bos_id) -> (delta, state, record), undo(state, record, n_requests) -> state); the record is what undoing needs
(the keys the step added), kept per step with the step's number of requests.

Context templates that are sampled (keys.Generated in hparams.context) are generated once when the session
starts, from the unedited model with fold_in(key, 2**31 - 1), and reused for every step (the authors cache
them once per run too), so that the steps' keys are comparable.

Deltas: `session.deltas` lists every step's delta; their sum (`total()`, bricks.deltas.add) is the whole change,
`apply(session.base, session.total())` equals `session.model` up to float rounding. Rollback undoes the last
steps (model: bricks.deltas.rollback; state: the editor's undo); an earlier step cannot be removed alone, since
every later step was computed on top of it. Memory: the deltas and records of every step are kept (per step and
layer about E (F + D) numbers each).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import jax
from flax import nnx

from configurable_fm.bricks import deltas as D
from configurable_fm.bricks.deltas import Delta
from configurable_fm.ops.update.alphaedit import AlphaEditHparams, alphaedit, alphaedit_init, alphaedit_undo
from configurable_fm.ops.update.finetune import FTHparams, ft
from configurable_fm.ops.update.keys import Generated, context_templates
from configurable_fm.ops.update.memit import MEMITHparams, memit
from configurable_fm.ops.update.requests import Request
from configurable_fm.ops.update.rlsedit import RLSEditHparams, rls_init, rls_undo, rlsedit
from configurable_fm.ops.update.rome import ROMEHparams, rome

CONTEXT_SALT = 2**31 - 1


@dataclasses.dataclass(frozen=True)
class Editor:
    """How a session runs one method (module docstring). undo None: the method has no state to undo."""

    name: str
    hparams: type
    init: Callable[..., Any]
    step: Callable[..., tuple[Delta, Any, Any]]
    undo: Callable[[Any, Any, int], Any] | None = None


def _one_layer(layers, name):
    if len(layers) != 1:
        raise ValueError(f"{name} edits one layer; got layers={list(layers)}")
    return layers[0]


def _no_state(model, layers, stats, hparams):
    return None


def _rome_step(model, tokenizer, requests, state, layers, stats, hparams, key, bos_id):
    layer = _one_layer(layers, "rome")
    total, current, metadata = None, model, []
    for i, r in enumerate(requests):
        d = rome(current, tokenizer, r, layer=layer, stats=stats, hparams=hparams,
                 key=None if key is None else jax.random.fold_in(key, i), bos_id=bos_id)
        current = D.apply(current, d)
        total = d if total is None else D.add(total, d)
        metadata.append(dict(d.metadata))
    return Delta(dict(total), kind="rome", source=f"rome:{len(requests)} edits",
                 metadata={"method": "rome", "layer": layer, "edits": len(requests), "operands": metadata}), None, None


def _memit_step(model, tokenizer, requests, state, layers, stats, hparams, key, bos_id):
    return memit(model, tokenizer, requests, layers=layers, stats=stats, hparams=hparams, key=key,
                 bos_id=bos_id), None, None


def _ft_step(model, tokenizer, requests, state, layers, stats, hparams, key, bos_id):
    return ft(model, tokenizer, requests, layer=_one_layer(layers, "ft"), hparams=hparams, bos_id=bos_id), None, None


def _alphaedit_init(model, layers, stats, hparams):
    return alphaedit_init(stats, layers, nullspace_threshold=hparams.nullspace_threshold)


def _alphaedit_step(model, tokenizer, requests, state, layers, stats, hparams, key, bos_id):
    delta, new = alphaedit(model, tokenizer, requests, layers=layers, state=state, hparams=hparams, key=key,
                           bos_id=bos_id)
    return delta, new, dict(new.last_keys)


def _rls_init(model, layers, stats, hparams):
    return rls_init(stats, layers, mom2_update_weight=hparams.mom2_update_weight, ridge=hparams.ridge)


def _rls_step(model, tokenizer, requests, state, layers, stats, hparams, key, bos_id):
    delta, new = rlsedit(model, tokenizer, requests, layers=layers, state=state, hparams=hparams, key=key,
                         bos_id=bos_id)
    return delta, new, dict(new.last_keys)


EDITORS: dict[str, Editor] = {
    "rome": Editor("rome", ROMEHparams, _no_state, _rome_step),
    "memit": Editor("memit", MEMITHparams, _no_state, _memit_step),
    "alphaedit": Editor("alphaedit", AlphaEditHparams, _alphaedit_init, _alphaedit_step,
                        alphaedit_undo),
    "rlsedit": Editor("rlsedit", RLSEditHparams, _rls_init, _rls_step, rls_undo),
    "ft": Editor("ft", FTHparams, _no_state, _ft_step),
}


def editor(method: str | Editor) -> Editor:
    """The Editor named `method` (EDITORS), or `method` itself; ValueError listing the names otherwise."""
    if isinstance(method, Editor):
        return method
    if method not in EDITORS:
        raise ValueError(f"unknown editing method {method!r}; known: {sorted(EDITORS)}")
    return EDITORS[method]


@dataclasses.dataclass(frozen=True, eq=False)
class SessionConfig:
    """What stays fixed during a session: the editor, tokenizer, layers, key statistics, hparams (with any
    sampled context templates already generated) and bos id."""

    editor: Editor
    tokenizer: Any
    layers: tuple[int, ...]
    stats: Any = None
    hparams: Any = None
    bos_id: int | None = None


@dataclasses.dataclass(frozen=True, eq=False)
class SessionState:
    """A session at one point: the current model, the method's state, every step's delta and (undo record,
    number of requests), the number of requests edited and of steps."""

    model: nnx.Module
    method_state: Any
    deltas: tuple[Delta, ...] = ()
    records: tuple[Any, ...] = ()
    edits: int = 0
    steps: int = 0


def session_config(model: nnx.Module, tokenizer, method: str | Editor, *, layers: Sequence[int], stats=None,
                   hparams=None, key: jax.Array | None = None, bos_id: int | None = None) -> SessionConfig:
    """The SessionConfig of a method: default hparams of the editor when None; sampled context templates
    (Generated items in hparams.context) generated once from `model` (module docstring)."""
    ed = editor(method)
    hp = ed.hparams() if hparams is None else hparams
    if not isinstance(hp, ed.hparams):
        raise TypeError(f"{ed.name}: hparams must be {ed.hparams.__name__}, got {type(hp).__name__}")
    context = getattr(hp, "context", None)
    if context is not None and any(isinstance(item, Generated) for group in context for item in group):
        groups = context_templates(model, tokenizer, context, bos_id=bos_id,
                                   key=None if key is None else jax.random.fold_in(key, CONTEXT_SALT))
        hp = dataclasses.replace(hp, context=groups)
    layers = tuple(sorted(set(int(l) for l in layers)))
    if not layers:
        raise ValueError(f"{ed.name}: no layers given")
    return SessionConfig(ed, tokenizer, layers, stats, hp, bos_id)


def init_session(model: nnx.Module, config: SessionConfig) -> SessionState:
    """The SessionState before any edit: the model and the editor's initial state."""
    return SessionState(model, config.editor.init(model, list(config.layers), config.stats, config.hparams))


def edit_step(config: SessionConfig, state: SessionState, requests: Sequence[Request],
              key: jax.Array | None = None) -> tuple[SessionState, Delta]:
    """One sequential step: the editor's delta for `requests` on the current model, and the state with the delta
    applied, the method state advanced and the step recorded."""
    requests = list(requests)
    if not requests:
        raise ValueError("edit_step: no requests")
    delta, method_state, record = config.editor.step(state.model, config.tokenizer, requests, state.method_state,
                                                     list(config.layers), config.stats, config.hparams, key,
                                                     config.bos_id)
    new = SessionState(D.apply(state.model, delta), method_state, state.deltas + (delta,),
                       state.records + ((record, len(requests)),), state.edits + len(requests), state.steps + 1)
    return new, delta


def undo_step(config: SessionConfig, state: SessionState) -> SessionState:
    """The state before the last step: its delta rolled back (bricks.deltas.rollback, exact up to float
    rounding) and the method state undone (the editor's undo with the step's record)."""
    if not state.deltas:
        raise ValueError("undo_step: nothing to undo (no edits in this session)")
    delta, (record, n) = state.deltas[-1], state.records[-1]
    method_state = state.method_state
    if config.editor.undo is not None:
        method_state = config.editor.undo(method_state, record, n)
    return SessionState(D.rollback(state.model, delta), method_state, state.deltas[:-1], state.records[:-1],
                        state.edits - n, state.steps - 1)


class EditSession:
    """A sequential editing session over `model` (module docstring): `.edit(requests)` edits the current model
    and returns the step's delta; `.model`, `.base`, `.deltas`, `.total()`, `.state` (the method's state),
    `.edits`, `.steps`, `.log`; `.rollback(n)`, `.finish()`."""

    def __init__(self, model: nnx.Module, tokenizer, method: str | Editor, *, layers: Sequence[int], stats=None,
                 hparams=None, key: jax.Array | None = None, bos_id: int | None = None,
                 on_edit: Callable[["EditSession", Delta | None], Any] | None = None, every: int | None = 1):
        if every is not None and (isinstance(every, bool) or int(every) < 1):
            raise ValueError(f"EditSession: every must be a positive number of edits or None, got {every!r}")
        self.base = model
        self.key = key
        self.config = session_config(model, tokenizer, method, layers=layers, stats=stats, hparams=hparams, key=key,
                                     bos_id=bos_id)
        self.current = init_session(model, self.config)
        self.on_edit = on_edit
        self.every = None if every is None else int(every)
        self.log: list[tuple[int, int, Any]] = []
        self._called_at: int | None = None

    # views of the current SessionState
    @property
    def model(self) -> nnx.Module:
        return self.current.model

    @property
    def state(self) -> Any:
        return self.current.method_state

    @property
    def deltas(self) -> tuple[Delta, ...]:
        return self.current.deltas

    @property
    def edits(self) -> int:
        return self.current.edits

    @property
    def steps(self) -> int:
        return self.current.steps

    @property
    def method(self) -> str:
        return self.config.editor.name

    def total(self) -> Delta:
        """The sum of every step's delta (bricks.deltas.add): the whole change from `base`; empty before any
        edit."""
        out = Delta({}, kind=self.method, source=f"{self.method}: no edits")
        for d in self.deltas:
            out = d if not out else D.add(out, d)
        return out

    def edit(self, requests: Request | Sequence[Request]) -> Delta:
        """Edits the current model with `requests` (one Request or a batch); returns the step's delta. Runs
        on_edit when the edit count crosses a multiple of `every`."""
        requests = [requests] if isinstance(requests, Request) else list(requests)
        before = self.edits
        key = None if self.key is None else jax.random.fold_in(self.key, self.steps)
        self.current, delta = edit_step(self.config, self.current, requests, key)
        if self.on_edit is not None and self.every is not None and self.edits // self.every > before // self.every:
            self._callback(delta)
        return delta

    def edit_all(self, requests: Sequence[Request], batch_size: int = 1) -> list[Delta]:
        """Edits `requests` in order, `batch_size` per step; returns the steps' deltas."""
        if batch_size < 1:
            raise ValueError(f"edit_all: batch_size must be >= 1, got {batch_size}")
        requests = list(requests)
        return [self.edit(requests[i:i + batch_size]) for i in range(0, len(requests), batch_size)]

    def rollback(self, n: int = 1) -> None:
        """Undoes the last `n` steps (model and method state)."""
        if n < 0 or n > self.steps:
            raise ValueError(f"rollback: cannot undo {n} steps of {self.steps}")
        for _ in range(n):
            self.current = undo_step(self.config, self.current)

    def finish(self) -> Any:
        """Runs on_edit for the current model unless it already ran at this edit count; returns its result."""
        if self.on_edit is None or self._called_at == self.edits:
            return None
        return self._callback(self.deltas[-1] if self.deltas else None)

    def _callback(self, delta):
        result = self.on_edit(self, delta)
        self._called_at = self.edits
        self.log.append((self.edits, self.steps, result))
        return result

    def __repr__(self) -> str:
        return f"EditSession({self.method}, layers={list(self.config.layers)}, edits={self.edits}, steps={self.steps})"
