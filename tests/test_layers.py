"""The package's layer order, checked by parsing every import of every module (including imports inside
functions): a module imports only from its own layer or the layers before it, and never a private name
(`_x`) of another module. The order is README's "Architecture" section:

    errors, checks, sharding, profiling, prng < models < interop < bricks < data < analysis < ops < train < stages < cli

A package `__init__` may re-export its own package's public API; `experiments/` and `scripts/` sit above
everything and are not checked here."""
import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "configurable_fm"
ORDER = [("errors", "checks", "sharding", "profiling", "prng"), ("models",), ("interop",), ("bricks",), ("data",),
         ("analysis",), ("ops",), ("train",), ("stages",), ("cli",)]
RANK = {name: i for i, names in enumerate(ORDER) for name in names}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer_of(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "configurable_fm"


def imports(path: Path, source: str | None = None):
    """(imported module, [imported names], line) for every import statement of the file."""
    tree = ast.parse(path.read_text() if source is None else source, filename=str(path))
    me = module_name(path)
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative import
                anchor = me.split(".")[: len(me.split(".")) - node.level + (path.name == "__init__.py")]
                base = ".".join(anchor + ([base] if base else []))
            yield base, [a.name for a in node.names], node.lineno
        elif isinstance(node, ast.Import):
            for a in node.names:
                yield a.name, [], node.lineno


def layer_violations(path: Path, source: str | None = None) -> list[str]:
    me = module_name(path)
    mine = layer_of(me)
    bad = []
    for target, names, line in imports(path, source):
        if not target.startswith("configurable_fm"):
            continue
        theirs = layer_of(target)
        if theirs == "configurable_fm":  # `from configurable_fm import x`: x is the layer
            theirs_names = [n for n in names if n in RANK]
        else:
            theirs_names = [theirs]
        for name in theirs_names:
            if mine != "configurable_fm" and RANK[name] > RANK[mine]:
                bad.append(f"line {line}: {me} ({mine}) imports {target} ({name}), a later layer")
    return bad


def private_imports(path: Path, source: str | None = None) -> list[str]:
    me = module_name(path)
    return [f"line {line}: from {target} import {', '.join(n for n in names if n.startswith('_'))}"
            for target, names, line in imports(path, source)
            if target.startswith("configurable_fm") and target != me
            and any(n.startswith("_") and not n.startswith("__") for n in names)]


MODULES = sorted(PACKAGE.rglob("*.py"))


def test_every_module_has_a_layer():
    unplaced = sorted({layer_of(module_name(p)) for p in MODULES} - set(RANK) - {"configurable_fm"})  # the root
    assert not unplaced, f"modules outside the layer order {ORDER}: {unplaced}"


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(ROOT)))
def test_imports_follow_the_layer_order(path):
    bad = layer_violations(path)
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_private_names_from_other_modules(path):
    bad = private_imports(path)
    assert not bad, "\n".join(bad)


def test_the_checker_sees_violations():
    """Function-level imports of a later layer and private names are found (a checker that sees nothing would
    pass anything)."""
    fake = PACKAGE / "models" / "probe.py"
    source = "def f():\n    from configurable_fm.train.trainer import _private\n    from configurable_fm import ops\n"
    assert len(layer_violations(fake, source)) == 2
    assert private_imports(fake, source) == ["line 2: from configurable_fm.train.trainer import _private"]
    assert layer_violations(PACKAGE / "train" / "probe.py", "from configurable_fm.models import llama\n") == []
