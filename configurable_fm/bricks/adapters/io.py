"""Adapters as bricks: saved and loaded apart from the base model, with bricks' own brick-set files.

    save_adapter(m, "out/lora", source="smollm2-lora-r8")     # bricks.safetensors + bricks.json (atomic)
    m2 = load_adapter(base, "out/lora")                        # the same adapter attached to `base`

One Brick per adapted module: name = the module path (`layers.0.self_attn.q_proj`), kind = the adapter kind ('lora',
'dora', 'ia3', 'bottleneck'), params = its adapter parameters (`lora_a`, `lora_b`, `lora_magnitude`, `ia3_scale`,
the bottleneck's `adapter_down`, `adapter_down_bias`, `adapter_up`, `adapter_up_bias`: tensors
`layers.0.self_attn.q_proj/lora_a`, ...), metadata = {"options": {rank, alpha, rslora}, {feedforward} or {size,
non_linearity, scaling}}. A LoRA on a stacked expert weight (experts.py) is one brick named by the weight's path
(`layers.0.mlp.experts.gate_proj`), kind 'expert_lora', tensors lora_a (E, D_in, r) and lora_b (E, r, D_out). The base
weights are not in it; whether the adapter was merged is not either (an adapter is loaded unmerged). Loading checks
every brick against the model (kind, options, module path, a plain Linear there, the tensors and their shapes) and
reports all problems in one AdapterError. Virtual tokens (prompts.py) are one brick named 'prompt' or 'prefix', of
kind 'prompt_tuning' / 'prefix_tuning', with the tensor `values` ((P, D) or (P, L, 2, K, H)); the base's adapters
follow as usual, and loading wraps the adapted base last.
"""
from __future__ import annotations

import os
from pathlib import Path

import jax.numpy as jnp

from configurable_fm.bricks.adapters.bottleneck import BottleneckLinear
from configurable_fm.bricks.adapters.core import adapted_modules, expert_weight_shape
from configurable_fm.bricks.adapters.experts import ExpertLoRA, expert_loras
from configurable_fm.bricks.adapters.modules import ADAPTER_TYPES, AdapterError
from configurable_fm.bricks.brickset import Brick, BrickSet, load_bricks, save_bricks
from configurable_fm.bricks.select import module_index
from configurable_fm.interop.peft import ADAPTER_LEAVES, attach_built
from configurable_fm.interop.peft_experts import attach_expert_adapters
from configurable_fm.models.layers import Linear
from configurable_fm.models.virtual_tokens import VirtualTokens, with_virtual_tokens

VIRTUAL_KINDS = {"prompt_tuning": "prompt", "prefix_tuning": "prefix"}
# The adapted-Linear kinds a brick may hold and their tensors: PEFT's kinds and the bottleneck (no PEFT format).
BRICK_TYPES = {**ADAPTER_TYPES, BottleneckLinear.kind: BottleneckLinear}
BRICK_LEAVES = {**ADAPTER_LEAVES, BottleneckLinear.kind: BottleneckLinear.LEAVES}
EXPERT_LEAVES = ("lora_a", "lora_b")  # an 'expert_lora' brick, named by the stacked weight it adapts (experts.py)


def adapter_bricks(model, *, source: str = "") -> BrickSet:
    """The adapters of `model` as a BrickSet (module docstring); AdapterError when it has none."""
    bricks = []
    if isinstance(model, VirtualTokens):
        bricks.append(Brick(model.kind, f"{model.kind}_tuning", source, {"values": model.values},
                            {"num_virtual_tokens": model.num_virtual_tokens}))
        model = model.base
    modules = adapted_modules(model)
    experts = expert_loras(model)
    if not modules and not bricks and not experts:
        raise AdapterError("adapter_bricks: the model has no adapters")
    for path, m in modules.items():
        options = {k: v for k, v in m.options().items() if k != "merged"}
        params = {leaf: getattr(m, leaf).get_value() for leaf in BRICK_LEAVES[m.kind]}
        bricks.append(Brick(path, m.kind, source, params, {"options": options}))
    for path, a in experts.items():  # merged or not, the factors are what is saved (loaded unmerged)
        options = {"rank": a.rank, "alpha": a.alpha, "rslora": a.rslora}
        bricks.append(Brick(path, a.kind, source, {leaf: getattr(a, leaf).get_value() for leaf in EXPERT_LEAVES},
                            {"options": options}))
    return BrickSet(bricks)


def attach_bricks(model, bricks: BrickSet | Brick):
    """A new model with each adapter brick attached at the module its name gives (unmerged); AdapterError listing
    every brick that does not fit."""
    if isinstance(bricks, Brick):
        bricks = BrickSet([bricks])
    index = module_index(model)
    problems, specs, virtual, expert_specs = [], [], [], []
    for name, brick in bricks.items():
        label = f"brick {name!r}"
        if brick.kind == ExpertLoRA.kind:
            problem, spec = _expert_brick(index, name, brick)
            problems += [f"{label}: {problem}"] if problem else []
            expert_specs += [spec] if spec else []
            continue
        if brick.kind in VIRTUAL_KINDS:
            if set(brick.params) != {"values"}:
                problems.append(f"{label}: a {brick.kind} brick has one tensor 'values', found {sorted(brick.params)}")
            else:
                virtual.append((label, VIRTUAL_KINDS[brick.kind], brick.params["values"]))
            continue
        if brick.kind not in BRICK_TYPES:
            problems.append(f"{label}: kind {brick.kind!r} is not an adapter kind {sorted(BRICK_TYPES)}")
            continue
        node = index.get(name, (None, None))[1]
        if type(node) is not Linear:
            what = "no module" if node is None else f"a {type(node).__name__}, not a plain Linear"
            problems.append(f"{label}: the model has {what} at {name}")
            continue
        options = brick.metadata.get("options")
        if not isinstance(options, dict):
            problems.append(f"{label}: metadata has no 'options' object")
            continue
        try:
            module = BRICK_TYPES[brick.kind].from_options(node, {**options, "merged": False})
        except AdapterError as e:
            problems.append(f"{label}: {e}")
            continue
        want = BRICK_LEAVES[brick.kind]
        missing = [f"{name}/{t}" for t in want if t not in brick.params]
        extra = [f"{name}/{t}" for t in brick.params if t not in want]
        if missing or extra:
            problems.append(f"{label}: a {brick.kind} adapter has tensors {list(want)}"
                            + (f"; missing {missing}" if missing else "") + (f"; unexpected {extra}" if extra else ""))
            continue
        bad = [f"{name}/{t} is {tuple(brick.params[t].shape)} but the module needs "
               f"{tuple(getattr(module, t).get_value().shape)}" for t in want
               if tuple(brick.params[t].shape) != tuple(getattr(module, t).get_value().shape)]
        if bad:
            problems.append(f"{label}: " + "; ".join(bad))
            continue
        specs.append({"path": name, "kind": brick.kind, "options": module.options(),
                      "values": {t: jnp.asarray(brick.params[t]) for t in want}})
    if len(virtual) > 1:
        problems.append(f"{[v[0] for v in virtual]}: one model takes one set of virtual tokens")
    if problems:
        raise AdapterError(f"attach_bricks: {len(problems)} brick(s) do not fit the model:\n  " + "\n  ".join(problems))
    adapted = attach_built(model, specs) if specs else model
    adapted = attach_expert_adapters(adapted, expert_specs) if expert_specs else adapted
    if not virtual:
        return adapted
    label, kind, values = virtual[0]
    try:
        return with_virtual_tokens(adapted, kind, jnp.asarray(values))
    except (ValueError, TypeError) as e:
        raise AdapterError(f"attach_bricks: {label}: {e}") from None


def _expert_brick(index: dict, name: str, brick: Brick) -> tuple[str | None, dict | None]:
    """(problem, None) or (None, spec for attach_expert_adapters) for an 'expert_lora' brick named by the stacked
    expert weight it adapts."""
    shape = expert_weight_shape(index, name)
    if len(shape) != 3:
        return f"the model has no stacked expert weight at {name}", None
    options = brick.metadata.get("options")
    if not isinstance(options, dict):
        return "metadata has no 'options' object", None
    try:
        module = ExpertLoRA.from_options({**options, "shape": list(shape), "merged": False})
    except AdapterError as e:
        return str(e), None
    if set(brick.params) != set(EXPERT_LEAVES):
        return f"an expert_lora brick has tensors {list(EXPERT_LEAVES)}, found {sorted(brick.params)}", None
    bad = [f"{name}/{t} is {tuple(brick.params[t].shape)} but the weight {shape} needs "
           f"{tuple(getattr(module, t).get_value().shape)}" for t in EXPERT_LEAVES
           if tuple(brick.params[t].shape) != tuple(getattr(module, t).get_value().shape)]
    if bad:
        return "; ".join(bad), None
    opts = {"rank": module.rank, "alpha": module.alpha, "rslora": module.rslora}
    return None, {"path": name, "options": opts, "values": {t: brick.params[t] for t in EXPERT_LEAVES}}


def save_adapter(model, directory: str | os.PathLike, *, source: str = "", overwrite: bool = False) -> Path:
    """Writes the adapters of `model` (not its base weights) as a brick set (bricks.save_bricks: atomic, refused
    over an existing directory unless `overwrite`); returns the directory."""
    return save_bricks(adapter_bricks(model, source=source), directory, overwrite=overwrite)


def load_adapter(model, directory: str | os.PathLike):
    """`model` with the adapters saved by `save_adapter` attached (bricks.load_bricks checks the files;
    `attach_bricks` checks them against the model)."""
    return attach_bricks(model, load_bricks(directory))
