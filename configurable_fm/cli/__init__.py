"""Command-line plumbing shared by every script (the top layer): one way to parse flags and experiment configs
(absl + `ml_collections.config_flags`), one logging set-up, one error path.

    def define(fv):                                   # the script's flags, on a fresh absl FlagValues
        cli.config_flag(fv, "config", "experiment config file (path.py:variant)")
        flags.DEFINE_string("workdir", None, "run directory", flag_values=fv)

    def main(fv) -> int | None:                       # fv.config is a locked ConfigDict
        train(fv.config, fv.workdir)

    if __name__ == "__main__":
        sys.exit(cli.run(main, define, required=("config", "workdir")))

`run` parses a fresh FlagValues on every call (so a script's `main(argv)` can be called in-process, as the tests
do), then:
- a usage error (unknown flag, missing required flag, missing config file, `--config.KEY=...` naming no key of
  the config, an error raised by `get_config`) prints `<prog>: error: <message>` and exits with status 2;
- logging: absl (and with it orbax) at WARNING unless `-v N` / `--verbosity=N` is given;
- compiled programs are kept between runs in jax's persistent cache (`set_up_compilation_cache`:
  ~/.cache/configurable_fm/jax, or CFM_COMPILATION_CACHE=DIR; CFM_COMPILATION_CACHE=off, or an explicit
  JAX_COMPILATION_CACHE_DIR, leaves jax's own setting);
- a `configurable_fm.errors.UserError` raised by the library (bad checkpoint, shape mismatch, missing packaged
  model, existing output, changed stage config, ...) prints `<prog>: error: <message>` without a traceback and
  exits with status 1; the library writes outputs under temporary names, so nothing partial is left;
- any other exception keeps its traceback (it is a bug, not an input problem).
"""
from __future__ import annotations

import contextvars
import difflib
import os
import re
import sys
from typing import Callable, Iterable, Sequence

from absl import flags
from ml_collections import config_dict, config_flags

from configurable_fm.errors import UserError


class UsageError(UserError):
    """A command line that cannot be run as given."""


# The command line being parsed: config_flags registers the `--config.KEY` override flags from it.
_ARGV: contextvars.ContextVar[list[str]] = contextvars.ContextVar("argv")


def config_flag(fv: flags.FlagValues, name: str, help: str) -> None:
    """An ml-collections config-file flag `--<name>=path.py[:arg]` with `--<name>.KEY=VALUE` overrides (locked:
    an override naming no key of the config is an error)."""
    config_flags.DEFINE_config_file(name, None, help, flag_values=fv, lock_config=True,
                                    sys_argv=_ARGV.get(sys.argv))
    fv[name]._is_config_file = True  # noqa: SLF001 (our own marker, read by _config_names)


def _config_names(fv: flags.FlagValues) -> list[str]:
    return [name for name in fv if getattr(fv[name], "_is_config_file", False)]


def _flag_value(argv: Sequence[str], name: str) -> str | None:
    """The value of `--name` in argv (`--name=X` or `--name X`)."""
    for i, arg in enumerate(argv):
        if re.fullmatch(rf"--?{re.escape(name)}", arg) and i + 1 < len(argv):
            return argv[i + 1]
        m = re.fullmatch(rf"--?{re.escape(name)}=(.*)", arg)
        if m:
            return m.group(1)
    return None


def bad_override(config, argv: Iterable[str], name: str = "config") -> str | None:
    """A message for the first `--<name>.a.b=...` in `argv` whose path is not in `config`: it names the missing
    key, the closest valid one, and every valid key of that level; None when every override path exists.
    A list element is addressed as `key[i]` (e.g. `--config.stages[1].steps=90`)."""
    for arg in argv:
        m = re.match(rf"--?{re.escape(name)}\.([^=]+)", arg)
        if not m:
            continue
        node, where = config, name
        for key in m.group(1).split("."):
            km = re.fullmatch(r"([^\[\]]+)((?:\[\d+\])*)", key)
            field, indices = (km.group(1), re.findall(r"\[(\d+)\]", km.group(2))) if km else (key, [])
            if not isinstance(node, (config_dict.ConfigDict, dict)):
                return (f"{arg.split('=')[0]}: {where} is a value of type {type(node).__name__}, "
                        "not a config with keys")
            if field not in node:
                valid = sorted(node.keys())
                close = difflib.get_close_matches(field, valid, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                return (f"{arg.split('=')[0]}: {where} has no key {field!r}{hint}; "
                        f"valid keys of {where}: {', '.join(valid)}")
            node, where = node[field], f"{where}.{field}"
            for i in indices:
                if not isinstance(node, (list, tuple)):
                    return f"{arg.split('=')[0]}: {where} is a {type(node).__name__}, not a list to index"
                if int(i) >= len(node):
                    return f"{arg.split('=')[0]}: {where} has {len(node)} element(s); [{i}] is out of range"
                node, where = node[int(i)], f"{where}[{i}]"
    return None


def _parse_error_message(message: str, argv: Sequence[str], names: Sequence[str]) -> str:
    """absl wraps an error raised while loading a config file in its traceback: keep its last line."""
    if "Error whilst parsing config file" in message:
        lines = [line.strip() for line in message.splitlines() if line.strip()]
        where = [line for line in lines if line.startswith("File ")]
        spec = next((_flag_value(argv, n) for n in names if _flag_value(argv, n)), "")
        return f"--config={spec}: {lines[-1]}" + (f" ({where[-1]})" if where else "")
    return message


def parse(argv: Sequence[str], define: Callable[[flags.FlagValues], None], *, prog: str,
          required: Sequence[str] = (), doc: str | None = None) -> flags.FlagValues:
    """A fresh FlagValues with the script's flags (`define`) parsed from `argv` (without the program name).

    Raises UsageError with a readable message (module docstring); `--help` prints `doc` (default: the running
    script's docstring) and the flags, and exits 0."""
    fv = flags.FlagValues()
    token = _ARGV.set([prog, *argv])
    try:
        define(fv)
    finally:
        _ARGV.reset(token)
    if "verbosity" not in fv:
        flags.DEFINE_integer("verbosity", None, "absl log level (default: WARNING; 0: INFO, 1: DEBUG)",
                             short_name="v", flag_values=fv)
    if any(a in ("-h", "--help", "-help", "--helpshort", "--helpfull") for a in argv):
        doc = doc or getattr(sys.modules.get("__main__"), "__doc__", None) or ""
        print(doc.strip() + "\n\nflags:\n" + fv.get_help())
        raise SystemExit(0)
    names = _config_names(fv)
    for name in names:
        spec = _flag_value(argv, name)
        if spec and not os.path.isfile(spec.split(":")[0]):
            raise UsageError(f"--{name}={spec}: no such config file {spec.split(':')[0]!r} (relative to {os.getcwd()})")
        if spec is None and any(re.match(rf"--?{re.escape(name)}\.", a) for a in argv):
            raise UsageError(f"--{name}.KEY=VALUE overrides need --{name}=FILE")
    try:
        rest = fv([prog, *argv])
    except flags.Error as e:
        raise UsageError(_parse_error_message(str(e), argv, names)) from None
    except (AttributeError, KeyError, IndexError, TypeError) as e:  # an override the locked config does not have
        message = None
        for name in names:
            try:
                message = bad_override(fv[name].parser.parse(_flag_value(argv, name)), argv, name)
            except Exception:  # noqa: BLE001: fall back to ml_collections' own error below
                message = None
            if message:
                break
        raise UsageError(message or f"{type(e).__name__}: {e}") from None
    if len(rest) > 1:
        raise UsageError(f"unexpected argument(s) {rest[1:]}; flags are written --name=value")
    missing = [f"--{n}" for n in required if fv[n].value is None]
    if missing:
        raise UsageError(f"{', '.join(missing)} {'is' if len(missing) == 1 else 'are'} required")
    for name in names:
        value = fv[name].value
        if value is not None and not isinstance(value, config_dict.ConfigDict):
            raise UsageError(f"--{name}={_flag_value(argv, name)}: get_config() returned {type(value).__name__}, "
                             "not a ConfigDict")
    return fv


def require_config_keys(config, keys: Sequence[str], see: str) -> None:
    """UsageError naming every `--config.KEY` of `keys` that the config leaves empty (`see`: where they are
    documented)."""
    missing = [f"--config.{k}" for k in keys if not config.get(k)]
    if missing:
        raise UsageError(f"{' and '.join(missing)} {'is' if len(missing) == 1 else 'are'} required (see {see})")


MODEL_FORMATS = ("hf", "orbax")  # what commands that write a model write (--config.format)


def sectioned_config(what: str, keys: dict, sections: dict[str, dict], overrides: dict):
    """A ConfigDict of `keys` ({key: default}) and `sections` ({name: {key: default}}) with `overrides`
    ({key: value}; a section as a dict of some of its keys, merged into its defaults); an unknown key or section key
    is a ConfigError naming `what` and the known keys."""
    from configurable_fm.errors import ConfigError

    values = {**keys, **{name: dict(defaults) for name, defaults in sections.items()}}
    for key, value in overrides.items():
        if key not in values:
            raise ConfigError(f"{what}: unknown key {key!r}; keys: {sorted(values)}")
        if key in sections:
            unknown = sorted(set(value) - set(values[key]))
            if unknown:
                raise ConfigError(f"{what}: unknown key(s) {unknown} in {key}; keys: {sorted(values[key])}")
            values[key] = {**values[key], **value}
        else:
            values[key] = value
    return config_dict.ConfigDict(values)


def model_output(config, what: str, *, required: Sequence[str], see: str,
                 inputs: Sequence[str] = ("input",)) -> tuple[str, bool]:
    """(format, overwrite) of a command that writes a model to `config.output`: the `required` keys are set
    (UsageError), `format` is one of MODEL_FORMATS (ConfigError naming `what`), and the output is new or a previous
    output of this library when `overwrite` is set, and neither is nor holds the path of an `inputs` key
    (interop.atomic.check_overwritable), all before any work."""
    from configurable_fm.errors import ConfigError
    from configurable_fm.interop.atomic import check_overwritable

    require_config_keys(config, required, see=see)
    fmt = config.get("format") or "hf"
    if fmt not in MODEL_FORMATS:
        raise ConfigError(f"{what}: `format` must be one of {list(MODEL_FORMATS)}, got {fmt!r}")
    overwrite = bool(config.get("overwrite", False))
    check_overwritable(config.output, overwrite, inputs=[config.get(k) for k in inputs])
    return fmt, overwrite


def set_up_logging(verbosity: int | None) -> None:
    """absl (and orbax, which logs through it) at WARNING unless a verbosity is given."""
    from absl import logging

    logging.set_verbosity(logging.WARNING if verbosity is None else verbosity)


COMPILATION_CACHE_ENV = "CFM_COMPILATION_CACHE"  # a directory, or "off"
COMPILATION_CACHE_MAX_BYTES = 2 << 30


def compilation_cache_dir(environ=os.environ) -> str | None:
    """Where the commands keep compiled XLA programs between runs: None when JAX_COMPILATION_CACHE_DIR is set (jax
    reads it itself) or CFM_COMPILATION_CACHE is 'off'; else CFM_COMPILATION_CACHE, or
    $XDG_CACHE_HOME/configurable_fm/jax (default ~/.cache/configurable_fm/jax)."""
    if environ.get("JAX_COMPILATION_CACHE_DIR"):
        return None
    chosen = environ.get(COMPILATION_CACHE_ENV, "")
    if chosen.lower() in ("off", "0", "false", "no"):
        return None
    if chosen:
        return chosen
    home = environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(home, "configurable_fm", "jax")


def set_up_compilation_cache(environ=os.environ) -> str | None:
    """jax's persistent compilation cache in `compilation_cache_dir()` (every program, however quick to compile: a
    merge compiles one small program per tensor shape, 0.5-1 s of a 1B linear merge's ~8 s (BENCHMARKS.md); at
    most 2 GiB, least recently used entries dropped). A second run of the same command, or another command
    compiling the same programs, skips those compilations. Returns the directory, or None when the cache is off or the directory cannot be made
    (then every program compiles, as without a cache)."""
    path = compilation_cache_dir(environ)
    if path is None:
        return None
    try:
        os.makedirs(path, exist_ok=True)
    except OSError:
        return None
    import jax

    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    jax.config.update("jax_compilation_cache_max_size", COMPILATION_CACHE_MAX_BYTES)
    return path


def fail(prog: str, message: str, status: int) -> None:
    sys.stderr.write(f"{prog}: error: {message}\n")
    sys.stderr.flush()
    raise SystemExit(status)


def run(main: Callable[[flags.FlagValues], int | None], define: Callable[[flags.FlagValues], None],
        argv: Sequence[str] | None = None, *, prog: str | None = None, required: Sequence[str] = ()) -> int:
    """Parses `argv` (default sys.argv[1:]) and calls `main(fv)`; returns its status (0 when it returns None).

    Usage errors exit with status 2, library UserErrors with status 1, both as one line on stderr."""
    prog = prog or os.path.basename(sys.argv[0] or "configurable_fm")
    argv = list(sys.argv[1:] if argv is None else argv)
    doc = getattr(sys.modules.get(getattr(main, "__module__", "")), "__doc__", None)  # the command's own module
    try:
        fv = parse(argv, define, prog=prog, required=required, doc=doc)
    except UsageError as e:
        fail(prog, str(e), 2)
    set_up_logging(fv.verbosity)
    set_up_compilation_cache()
    try:
        return int(main(fv) or 0)
    except UserError as e:
        fail(prog, str(e), 1)
    return 1  # unreachable: fail() raises
