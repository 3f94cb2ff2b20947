"""Atomic outputs: a directory or JSON file appears complete or not at all, and overwriting never deletes what
the library did not write.

    with atomic_directory("out/merged", overwrite=True) as tmp:    # write into tmp; renamed to out/merged on success
        ...
    write_json_atomic(Path("run/config.json"), config)
    write_text_atomic(Path("run/report.md"), text)
    with atomic_file(Path("run/loss.png")) as tmp:                  # any writer: tmp is renamed over the output
        fig.savefig(tmp, format="png")

Temporary directories are siblings of the output named `.<name>.tmp-<pid>@<host>-<random>`. On error (including
Ctrl-C) the block's temporary directory is removed; a process killed outright (SIGKILL, a power cut) cannot clean
up, so every `atomic_directory` first removes the temporaries of *the same output* left by processes of this host
that are no longer running (`sweep_stale`); temporaries of live processes and of other hosts are left alone.

Overwriting: each output directory gets a small manifest `.configurable_fm_output.json` listing the entries the
library wrote. `overwrite=True` replaces an existing directory only when it is empty or every entry in it is
listed in its manifest (a previous output of the library); otherwise it raises `OutputExists` naming the entries
it would delete, before any work is done. The replacement itself happens only once the new content is complete.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import socket
import tempfile
from pathlib import Path
from typing import Iterable, Iterator

from configurable_fm.errors import OutputExists, OutputNotWritable

MANIFEST = ".configurable_fm_output.json"


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9_.]", "_", socket.gethostname()) or "host"


def _temp_prefix(name: str, kind: str) -> str:
    return f".{name}.{kind}-{os.getpid()}@{_host()}-"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # a live process of another user
        return True
    return True


def sweep_stale(out_dir: str | os.PathLike) -> list[Path]:
    """Removes the temporaries of `out_dir` (`.<name>.tmp-...` / `.<name>.old-...`) left by dead processes of this
    host; returns what was removed."""
    out_dir = Path(out_dir)
    if not out_dir.parent.is_dir():
        return []
    pattern = re.compile(rf"\.{re.escape(out_dir.name)}\.(?:tmp|old)-(\d+)@([A-Za-z0-9_.]+)-[^/]+")
    removed = []
    for entry in out_dir.parent.iterdir():
        m = pattern.fullmatch(entry.name)
        if m and m.group(2) == _host() and int(m.group(1)) != os.getpid() and not _pid_alive(int(m.group(1))):
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(entry)
    return removed


def _written_by_us(out_dir: Path) -> list[str]:
    """The entries of an existing `out_dir` that its manifest does not list (all of them without a manifest)."""
    entries = sorted(p.name for p in out_dir.iterdir() if p.name != MANIFEST)
    try:
        listed = set(json.loads((out_dir / MANIFEST).read_text())["entries"])
    except (OSError, ValueError, KeyError, TypeError):
        listed = set()
    return [e for e in entries if e not in listed]


def check_overwritable(out_dir: str | os.PathLike, overwrite: bool, *, inputs: Iterable = ()) -> None:
    """Raises OutputExists unless `out_dir` is absent, or `overwrite` and it holds only a previous output; and
    always when it is one of `inputs` (the paths the command reads; entries that are no existing path, such as
    registry names or None, are skipped) or a directory holding one: an input is never replaced."""
    out_dir = Path(out_dir)
    if not out_dir.exists():
        return
    inside = input_inside(out_dir, inputs)
    if inside is not None:
        where = "is" if Path(inside).resolve() == out_dir.resolve() else "holds"
        raise OutputExists(f"the output {out_dir} {where} the input {inside}: writing it would replace an input; "
                           "choose another output directory")
    if not overwrite:
        raise OutputExists(f"{out_dir} already exists (pass overwrite=True / --overwrite to replace it)")
    if not out_dir.is_dir():
        raise OutputExists(f"{out_dir} exists and is not a directory; not replacing it")
    foreign = _written_by_us(out_dir)
    if foreign:
        shown = ", ".join(foreign[:8]) + (f" and {len(foreign) - 8} more" if len(foreign) > 8 else "")
        raise OutputExists(f"{out_dir} holds files this library did not write ({shown}); overwrite replaces only a "
                           "previous output. Move them away or choose another output directory")


def input_inside(out_dir: str | os.PathLike, inputs: Iterable) -> str | None:
    """The first of `inputs` (paths; other entries skipped) that is `out_dir` or lies inside it, else None."""
    out = Path(out_dir).resolve()
    for x in inputs:
        if not isinstance(x, (str, os.PathLike)) or not str(x) or not Path(x).exists():
            continue
        p = Path(x).resolve()
        if p == out or out in p.parents:
            return str(x)
    return None


def make_directory(directory: str | os.PathLike, what: str = "directory") -> Path:
    """`directory` made with its parents (kept when it exists); OutputNotWritable naming it when it or a parent
    is a file, or the location is read-only (a run's workdir, a report's directory)."""
    directory = Path(directory)
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputNotWritable(f"cannot make the {what} {directory}: {e.strerror or e} ({e.filename or directory})"
                                ) from None
    return directory


@contextlib.contextmanager
def atomic_directory(out_dir: str | os.PathLike, *, overwrite: bool = False) -> Iterator[Path]:
    """Yields a fresh temporary directory next to `out_dir`; renames it to `out_dir` on success (module docstring).

    An existing `out_dir` is refused unless `overwrite` and it is a previous output (or empty); it is replaced
    only after the new content is complete. On error the temporary directory is removed and `out_dir` is
    untouched."""
    out_dir = Path(out_dir)
    check_overwritable(out_dir, overwrite)
    try:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        sweep_stale(out_dir)
        tmp = Path(tempfile.mkdtemp(prefix=_temp_prefix(out_dir.name, "tmp"), dir=out_dir.parent))
    except OSError as e:  # a parent that is a file, a read-only location, ...
        raise OutputNotWritable(f"cannot write {out_dir}: {e.strerror or e} ({e.filename or out_dir.parent})") \
            from None
    try:
        yield tmp
        (tmp / MANIFEST).write_text(json.dumps({"entries": sorted(p.name for p in tmp.iterdir())}) + "\n")
        usual_permissions(tmp)
        if out_dir.exists():
            check_overwritable(out_dir, overwrite)  # nothing foreign appeared while we were writing
            old = Path(tempfile.mkdtemp(prefix=_temp_prefix(out_dir.name, "old"), dir=out_dir.parent))
            os.rename(out_dir, old / "x")
            os.rename(tmp, out_dir)
            shutil.rmtree(old)
        else:
            os.rename(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def usual_permissions(directory: Path) -> None:
    """mkdtemp makes 0700 directories: give the output the permissions the umask gives ordinary files."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(directory, 0o777 & ~mask)
    for f in directory.iterdir():
        if f.is_file():
            os.chmod(f, 0o666 & ~mask)


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[Path]:
    """Yields a temporary sibling of `path` (`.<name>.tmp-<pid>`) for the block to write; when the block ends
    normally it is renamed over `path` (atomic on one file system), and on any error it is removed, so `path` is
    either its old self or complete. Writers that add a suffix to the name they are given (np.savez) must be
    handed an open file instead."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Writes `text` (UTF-8) to `path` via a temporary file (atomic_file)."""
    with atomic_file(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json_atomic(path: str | os.PathLike, obj) -> None:
    """Writes `obj` as indented JSON (sorted keys; non-JSON values as str) to `path` via a temporary file."""
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")
