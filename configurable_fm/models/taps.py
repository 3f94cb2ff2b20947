"""The tap hook: the one call model code makes so that analysis can read and replace intermediate values.

Model code marks a value as a named tap point and uses what comes back:

    h_BxTxF = tap(self, "hidden", act(gate) * up)       # inside LlamaMLP.__call__
    return self.down_proj(h_BxTxF)

and `@tapped` on a module's `__call__` marks its first positional argument as the point `input` and its return
value as `output` (the first element when it returns a tuple such as (hidden, cache)); the module computes with
the returned input and returns the returned output.

With no tap context active (every ordinary forward) `tap` returns `value` after one ContextVar read, and
`tapped` calls the method directly: tracing adds nothing to the computation, so a jitted `model(ids)` compiles
to the same program as without taps. A context (`TapContext`, entered with `activate`) is built for one model
object; it maps every sub-module of that model to its dotted path (`{id(module): 'layers.3.mlp'}`, from
`nnx.iter_modules`), and `tap(module, name, value)` calls its `on_point(f"{path}.{name}", value)` (the root
module's points have no prefix: 'input', 'output'). Modules that are not part of that model object (a copy made
by `nnx.merge` inside a transform, another model) are not tapped. Taps run while Python traces the model, so
they work under `jax.jit`, `jax.grad` and `jax.vmap` when the context is entered inside the transformed function
(jit around the capture, not inside it).

The user-facing API (capture, interventions, streamed reductions, the list of points) is
`configurable_fm.analysis`; this module only holds the hook, so that the models layer does not depend on it.
"""
from __future__ import annotations

import contextlib
import contextvars
import functools
from typing import Any, Callable, Iterator

from flax import nnx

_ACTIVE: contextvars.ContextVar["TapContext | None"] = contextvars.ContextVar("configurable_fm_taps", default=None)


def module_paths(model: nnx.Module) -> dict[int, str]:
    """{id(module): dotted path} of `model` and every sub-module ('' for the root, 'layers.3.mlp', ...)."""
    return {id(m): ".".join(str(p) for p in path) for path, m in nnx.iter_modules(model)}


class TapContext:
    """What the tap points of one model object report to: subclasses implement `on_point(point, value)`.

    paths: {id(module): dotted path} of the model the context was made for (`module_paths(model)`).
    """

    def __init__(self, model: nnx.Module):
        self.paths = module_paths(model)

    def visit(self, module, name: str, value):
        """The value the model goes on with at tap point `name` of `module` (unchanged if `module` is foreign)."""
        path = self.paths.get(id(module))
        if path is None:
            return value
        return self.on_point(f"{path}.{name}" if path else name, value)

    def on_point(self, point: str, value):
        """Called with the full point name ('layers.3.mlp.hidden') and value; returns the value to use."""
        raise NotImplementedError


def active() -> bool:
    """True while a tap context is active (e.g. models skip their rematerialisation, which would hide taps)."""
    return _ACTIVE.get() is not None


@contextlib.contextmanager
def activate(context: TapContext) -> Iterator[TapContext]:
    """Makes `context` receive the tap points of the forwards run inside the `with` block; not re-entrant."""
    if _ACTIVE.get() is not None:
        raise RuntimeError("a tap context is already active: capture, intervene and reductions cannot be nested "
                           "(one call can capture and intervene at once: capture(..., interventions=...))")
    token = _ACTIVE.set(context)
    try:
        yield context
    finally:
        _ACTIVE.reset(token)


def tap(module: nnx.Module, name: str, value: Any) -> Any:
    """Marks `value` as the tap point `<module path>.<name>`; returns it, or its replacement by an intervention."""
    context = _ACTIVE.get()
    if context is None:
        return value
    return context.visit(module, name, value)


def tapped(call: Callable) -> Callable:
    """Decorator for a module's `__call__`: tap points `input` (first positional argument) and `output`
    (the return value, or its first element when it is a tuple)."""

    @functools.wraps(call)
    def with_taps(self, *args, **kwargs):
        context = _ACTIVE.get()
        if context is None:
            return call(self, *args, **kwargs)
        if args:
            args = (context.visit(self, "input", args[0]),) + args[1:]
        out = call(self, *args, **kwargs)
        if isinstance(out, tuple) and out:
            return (context.visit(self, "output", out[0]),) + out[1:]
        return context.visit(self, "output", out)

    return with_taps
