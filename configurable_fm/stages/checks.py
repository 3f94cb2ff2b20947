"""Checks of operation configs (grow, edit, ...) before anything is loaded: one ConfigError per bad key or value,
naming the config, the key and what it must be.

    check = Checks("grow config")
    d = check.plain(cfg, allowed=GROW_KEYS + SCRIPT_KEYS, shown=GROW_KEYS)    # plain dict; unknown keys refused
    source = check.source(d)                                                 # `input`: a model source
    n = check.int("width.hidden_size", d["width"]["hidden_size"], 0)
    c = operation_config("grow", input=IN, name=None, output=OUT, format="hf", overwrite=False)   # a config's head
"""
from __future__ import annotations

from typing import Any, Sequence

import ml_collections

from configurable_fm.checks import is_int, is_real
from configurable_fm.errors import ConfigError
from configurable_fm.stages.study import to_plain


class Checks:
    """Value checks whose errors start with `what` (e.g. 'grow config')."""

    def __init__(self, what: str):
        self.what = what

    def error(self, message: str) -> ConfigError:
        return ConfigError(f"{self.what}: {message}")

    def plain(self, cfg, *, allowed: Sequence[str], shown: Sequence[str]) -> dict[str, Any]:
        """`cfg` (a ConfigDict or mapping) as plain values; ConfigError for another type or a key outside
        `allowed` (the message lists `shown`, the keys a user sets)."""
        d = to_plain(cfg, self.what)
        if not isinstance(d, dict):
            raise ConfigError(f"{self.what} must be a ConfigDict or mapping, got {type(cfg).__name__}")
        unknown = sorted(set(d) - set(allowed))
        if unknown:
            raise self.error(f"unknown key(s) {unknown}; valid keys: {sorted(shown)}")
        return d

    def source(self, d: dict, key: str = "input") -> str:
        """d[key] as a model source: a non-empty string."""
        source = d.get(key)
        if not isinstance(source, str) or not source:
            raise self.error(f"`{key}` must be a model source (a registry name, HF directory, .gguf, orbax "
                             f"checkpoint or training workdir), got {source!r}")
        return source

    def int(self, where: str, v, low: int) -> int:
        if not is_int(v) or v < low:
            raise self.error(f"`{where}` must be an integer >= {low}, got {v!r}")
        return int(v)

    def number(self, where: str, v, low: float, high: float | None = None) -> float:
        if not is_real(v) or not (v >= low) or (high is not None and v > high):
            span = f"in [{low}, {high}]" if high is not None else f">= {low}"
            raise self.error(f"`{where}` must be a number {span}, got {v!r}")
        return float(v)

    def choice(self, where: str, v, choices) -> Any:
        if v not in choices:
            raise self.error(f"`{where}` must be one of {list(choices)}, got {v!r}")
        return v

    def section(self, d: dict, section: str, defaults: dict) -> dict | None:
        """d[section] (a sub-config) over its `defaults`; None when absent; ConfigError for a non-mapping or a key
        outside the defaults."""
        s = d.get(section)
        if s is None:
            return None
        if not isinstance(s, dict):
            raise self.error(f"`{section}` must be a config with keys {sorted(defaults)}, got {s!r}")
        bad = sorted(set(s) - set(defaults))
        if bad:
            raise self.error(f"unknown key(s) {[f'{section}.{k}' for k in bad]}; valid keys of {section}: "
                             f"{sorted(defaults)}")
        return {**defaults, **s}

    def string(self, where: str, v, *, empty: bool = True) -> str:
        if not isinstance(v, str) or (not empty and not v):
            raise self.error(f"`{where}` must be a {'' if empty else 'non-empty '}string, got {v!r}")
        return v


def operation_config(kind: str, *, input: str, name: str | None, output: str | None, format: str,
                     overwrite: bool) -> ml_collections.ConfigDict:
    """The head of an operation's config: with `name`, a study stage of `kind` (name, kind); with `output`, a
    script config (output, format, overwrite); `input` either way. The operation adds its own keys."""
    c = ml_collections.ConfigDict()
    if name is not None:
        c.name, c.kind = name, kind
    c.input = input
    if output is not None:
        c.output, c.format, c.overwrite = output, format, overwrite
    return c
