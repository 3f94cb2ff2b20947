"""Readable errors for ml-collections command-line overrides, shared by the scripts."""
from __future__ import annotations

import difflib
import re

from ml_collections import config_dict


def bad_override(config, argv: list[str]) -> str | None:
    """A message for the first `--config.a.b=...` in `argv` whose path is not in `config`: it names the missing
    key, the closest valid one, and every valid key of that level; None when every override path exists."""
    for arg in argv:
        m = re.match(r"--?config\.([^=]+)", arg)
        if not m:
            continue
        node, where = config, "config"
        for key in m.group(1).split("."):
            name = re.sub(r"\[.*\]$", "", key)  # a tuple element override: field[0]
            if not isinstance(node, (config_dict.ConfigDict, dict)):
                return (f"{arg.split('=')[0]}: {where} is a value of type {type(node).__name__}, "
                        "not a config with keys")
            if name not in node:
                valid = sorted(node.keys())
                close = difflib.get_close_matches(name, valid, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                return (f"{arg.split('=')[0]}: {where} has no key {name!r}{hint}; "
                        f"valid keys of {where}: {', '.join(valid)}")
            node, where = node[name], f"{where}.{name}"
    return None
