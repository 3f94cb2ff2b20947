"""Resuming a run only with the config it was started with (or with changes the caller names).

    check_resume(workdir, config.to_dict(), allow=("steps",))     # ConfigError naming every other changed key
    record_resume(workdir, step, config.to_dict(), changes)        # appended to WORKDIR/resumes.jsonl

A workdir's config.json holds the config in force. Re-running `train` in a workdir with checkpoints compares the new
config with it, key by dotted key (`optimizer.lr`); any difference not allowed is refused before anything is
written, so a changed schedule never silently continues an old run. An allowed key covers itself and the keys
under it (`optimizer` allows `optimizer.lr`). Every resume appends {time, step, changes} to resumes.jsonl, and
config.json is rewritten with the new config when keys changed.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Iterable, Mapping

from configurable_fm.errors import ConfigError
from configurable_fm.interop.atomic import write_json_atomic

CONFIG_FILE = "config.json"
RESUMES_FILE = "resumes.jsonl"
COSMETIC_KEYS = ("progress",)  # keys that change no result
ABSENT = "<absent>"
NEUTRAL_ADDITIONS = {"scan_layers": False, "model.hidden_act": "silu"}
"""Keys added to the train config after runs had been recorded, each with the value that does what a config
without the key did (the trainer's default, llama's activation): an absent key and this value are the same
config, for resuming (config_changes) and for stages' fingerprints (stages.study), so a framework update that adds a
key does not invalidate finished work."""
NEUTRAL_ONLY_IF = {"model.hidden_act": ("family", "llama")}
"""A NEUTRAL_ADDITIONS key is neutral only where its sibling holds this value (absent counts as it): 'silu' is
llama's default activation, not gpt2's or bert's, so there it is a change."""


def plain(config: Mapping) -> dict:
    """The config as JSON would store it (tuples become lists, other values their str)."""
    return json.loads(json.dumps(config, sort_keys=True, default=str))


def flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    """{'a.b': leaf} of a nested dict (an empty dict is a leaf)."""
    if isinstance(value, Mapping) and value:
        return {k: v for key, sub in value.items() for k, v in flatten(sub, f"{prefix}{key}.").items()}
    return {prefix[:-1]: value}


def drop_neutral(config: Mapping) -> dict:
    """The plain config without the NEUTRAL_ADDITIONS that hold their neutral value (nested dicts kept nested)."""
    out = plain(config)
    for key, neutral in NEUTRAL_ADDITIONS.items():
        *parents, leaf = key.split(".")
        node = out
        for part in parents:
            node = node.get(part) if isinstance(node, dict) else None
        sibling, wanted = NEUTRAL_ONLY_IF.get(key, (None, None))
        if (isinstance(node, dict) and leaf in node and node[leaf] == plain({"v": neutral})["v"]
                and (sibling is None or node.get(sibling, wanted) == wanted)):
            del node[leaf]
    return out


def config_changes(old: Mapping, new: Mapping, *, ignore: Iterable[str] = ()) -> dict[str, tuple[Any, Any]]:
    """{dotted key: (old value, new value)} for every leaf that differs (ABSENT on the side that lacks it; a
    NEUTRAL_ADDITIONS key at its neutral value counts as absent)."""
    a, b = flatten(drop_neutral(old)), flatten(drop_neutral(new))
    skip = tuple(ignore)
    return {k: (a.get(k, ABSENT), b.get(k, ABSENT)) for k in sorted(set(a) | set(b))
            if a.get(k, ABSENT) != b.get(k, ABSENT) and not _covered(k, skip)}


def describe_changes(changes: Mapping[str, tuple[Any, Any]], limit: int = 8) -> str:
    items = [f"{k}: {old!r} -> {new!r}" for k, (old, new) in changes.items()]
    return "; ".join(items[:limit]) + (f"; and {len(items) - limit} more" if len(items) > limit else "")


def _covered(key: str, allowed: Iterable[str]) -> bool:
    return any(key == a or key.startswith(a + ".") for a in allowed)


def check_resume(workdir: Path, config: Mapping, allow: Iterable[str] = ()) -> dict[str, tuple[Any, Any]]:
    """The allowed changes between WORKDIR/config.json and `config`; ConfigError naming the others (module doc)."""
    file = Path(workdir) / CONFIG_FILE
    if not file.exists():
        return {}
    try:
        previous = json.loads(file.read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"{file}: cannot read the config this run was started with ({e})") from None
    changes = config_changes(previous, config, ignore=COSMETIC_KEYS)
    allow = tuple(allow)
    refused = {k: v for k, v in changes.items() if not _covered(k, allow)}
    if refused:
        keys = sorted({k.split(".")[0] for k in refused})
        raise ConfigError(f"{workdir} holds a run started with another config: {describe_changes(refused)}. Resume "
                          f"with the same config, allow the change explicitly (train(..., allow_changes={tuple(keys)})"
                          f" or --allow_changes={','.join(keys)}), or use a new workdir")
    return changes


def record_resume(workdir: Path, step: int, config: Mapping, changes: Mapping[str, tuple[Any, Any]]) -> None:
    """Appends this resume to resumes.jsonl and, when keys changed, makes config.json the config now in force."""
    workdir = Path(workdir)
    entry = {"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "step": int(step),
             "changes": {k: {"before": old, "after": new} for k, (old, new) in changes.items()}}
    with open(workdir / RESUMES_FILE, "a") as f:
        f.write(json.dumps(entry, sort_keys=True, default=str) + "\n")
    if changes:
        write_json_atomic(workdir / CONFIG_FILE, plain(config))
