"""What the routing operations share: their error, and the checks that turn a list of LoRA adapters of one base
into per-module lists of LoRA modules.

    models = adapted_models(base, [m1, bricks2], "arrow")          # brick sets attached to `base`
    per_module = lora_modules(models, "arrow", same_rank=True)     # {module path: [LoRALinear per adapter]}

An adapter is a model of `base` with LoRA adapters attached (bricks.adapters.attach / from_peft / load_adapter,
unmerged) or its adapter brick set (bricks.adapters.adapter_bricks / load_bricks). Routing mixes the adapters' LoRA
updates ΔW_i = s_i A_i B_i (A_i (in, r_i), B_i (r_i, out)), so every adapter must be LoRA (rsLoRA included) and
target the same modules: DoRA and IA3 change the function in other ways, and an adapter missing at a module has no
update to route to there. Checks name every offending adapter and module at once.
"""
from __future__ import annotations

from typing import Sequence

from flax import nnx

from configurable_fm.bricks.adapters import AdapterError, LoRALinear, adapted_modules, attach_bricks, expert_loras
from configurable_fm.bricks.brickset import Brick, BrickSet
from configurable_fm.errors import UserError

LISTED = 6  # how many paths an error message lists before "(+n more)"


class RouteError(UserError, ValueError):
    """Adapters, weights, examples or options that a routing operation cannot use (the message names them)."""


def few(items, n: int = LISTED) -> str:
    """'a, b, c (+4 more)': the first n items of a list, for messages."""
    items = list(items)
    return ", ".join(map(str, items[:n])) + (f" (+{len(items) - n} more)" if len(items) > n else "")


def adapted_models(base: nnx.Module, adapters: Sequence, what: str) -> list[nnx.Module]:
    """Each adapter as a model of `base` with its adapters attached (brick sets attached here); RouteError for an
    empty list or an item that is neither a model nor a brick set, AdapterError for a brick set that does not
    fit `base`."""
    if isinstance(adapters, (nnx.Module, BrickSet, Brick, str)) or not isinstance(adapters, Sequence) or not adapters:
        raise RouteError(f"{what}: give a non-empty list of adapted models or adapter brick sets, got "
                         f"{type(adapters).__name__}")
    models = []
    for i, item in enumerate(adapters):
        if isinstance(item, (BrickSet, Brick)):
            try:
                item = attach_bricks(base, item)
            except AdapterError as e:
                raise RouteError(f"{what}: adapter {i} (a brick set) does not fit the base: {e}") from None
        if not isinstance(item, nnx.Module):
            raise RouteError(f"{what}: adapter {i} is a {type(item).__name__}; give models with LoRA adapters "
                             "attached (bricks.adapters.attach / from_peft / load_adapter) or adapter brick sets")
        models.append(item)
    return models


def lora_modules(models: Sequence[nnx.Module], what: str, *, same_rank: bool = False,
                 same_scale: bool = False) -> dict[str, list[LoRALinear]]:
    """{module path: [the LoRA module of adapter i]} in model order, after checking that every adapter has only
    unmerged LoRA adapters (not DoRA, not IA3), on the same modules as adapter 0; with `same_rank` / `same_scale`
    also that the ranks / scales s_i agree per module. RouteError naming every problem otherwise."""
    problems = []
    found = []
    for i, model in enumerate(models):
        modules = adapted_modules(model)
        if not modules:
            problems.append(f"adapter {i} has no adapters attached")
        other = [f"{p} ({m.kind})" for p, m in modules.items() if type(m) is not LoRALinear]
        other += [f"{p} (expert_lora)" for p in expert_loras(model)]
        if other:
            problems.append(f"adapter {i} has non-LoRA adapters at {few(other, 3)} (routing mixes LoRA updates "
                            "s·A·B only)")
        merged = [p for p, m in modules.items() if m.merged]
        if merged:
            problems.append(f"adapter {i} has merged adapters at {few(merged, 3)} (bricks.adapters.unmerge first)")
        found.append(modules)
    if problems:
        raise RouteError(f"{what}: {len(problems)} adapter(s) cannot be routed:\n  " + "\n  ".join(problems))
    ref = list(found[0])
    for i, modules in enumerate(found[1:], 1):
        only_i = [p for p in modules if p not in found[0]]
        only_0 = [p for p in ref if p not in modules]
        if only_i:
            problems.append(f"adapter {i} adapts {few(only_i, 3)}, which adapter 0 does not")
        if only_0:
            problems.append(f"adapter 0 adapts {few(only_0, 3)}, which adapter {i} does not")
    if problems:
        raise RouteError(f"{what}: the adapters target different modules (each must adapt the same modules):\n  "
                         + "\n  ".join(problems))
    per_module = {p: [modules[p] for modules in found] for p in ref}
    for p, mods in per_module.items():
        if same_rank and len({m.rank for m in mods}) > 1:
            problems.append(f"{p} has ranks {[m.rank for m in mods]}")
        if same_scale and len({m.scale for m in mods}) > 1:
            problems.append(f"{p} has scales {[round(m.scale, 6) for m in mods]}")
    if problems:
        need = " and ".join(n for n, on in (("ranks", same_rank), ("scales alpha/r", same_scale)) if on)
        raise RouteError(f"{what}: needs equal {need} at every module (adapters in order):\n  "
                         + "\n  ".join(problems[:LISTED]) + (f"\n  (+{len(problems) - LISTED} more)"
                                                             if len(problems) > LISTED else ""))
    return per_module
