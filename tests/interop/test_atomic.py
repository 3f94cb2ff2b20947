"""Atomic outputs: stale temporaries of dead processes are swept, Ctrl-C cleans up, and overwrite replaces only
a previous output of the library (never files it did not write)."""
import json
import os
import subprocess
import sys

import pytest

from configurable_fm.errors import OutputExists, OutputNotWritable
from configurable_fm.interop.atomic import (MANIFEST, _temp_prefix, atomic_directory, atomic_file, check_overwritable,
                                           sweep_stale, write_json_atomic, write_text_atomic)


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_a_killed_writers_temporary_is_removed_by_the_next_run(tmp_path):
    out = tmp_path / "merged"
    stale = tmp_path / (_temp_prefix("merged", "tmp").replace(f"-{os.getpid()}@", f"-{dead_pid()}@") + "abc")
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"x" * 100)
    live = tmp_path / (_temp_prefix("merged", "tmp") + "mine")  # this (live) process's: kept
    live.mkdir()
    other = tmp_path / ".other.tmp-1@host-abc"  # another output's: kept
    other.mkdir()
    with atomic_directory(out) as tmp:
        (tmp / "a.txt").write_text("a")
    assert not stale.exists() and live.exists() and other.exists()
    assert (out / "a.txt").read_text() == "a"
    assert sweep_stale(out) == []


def test_interrupted_block_leaves_nothing(tmp_path):
    out = tmp_path / "o"
    with pytest.raises(KeyboardInterrupt):
        with atomic_directory(out) as tmp:
            (tmp / "half").write_text("x")
            raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []


def test_overwrite_replaces_a_previous_output_only(tmp_path):
    out = tmp_path / "o"
    with atomic_directory(out) as tmp:
        (tmp / "model.safetensors").write_text("old")
        (tmp / "config.json").write_text("{}")
    assert json.loads((out / MANIFEST).read_text())["entries"] == ["config.json", "model.safetensors"]
    with pytest.raises(OutputExists, match="already exists"):
        with atomic_directory(out) as tmp:
            pass
    with atomic_directory(out, overwrite=True) as tmp:  # a previous output: replaced
        (tmp / "model.safetensors").write_text("new")
    assert (out / "model.safetensors").read_text() == "new" and not (out / "config.json").exists()

    (out / "notes.txt").write_text("mine")  # a file the library did not write
    with pytest.raises(OutputExists, match=r"did not write \(notes.txt\)"):
        with atomic_directory(out, overwrite=True) as tmp:
            (tmp / "x").write_text("x")
    assert (out / "notes.txt").read_text() == "mine" and (out / "model.safetensors").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o"]  # refused before any temporary was made


def test_an_input_is_never_replaced(tmp_path):
    out = tmp_path / "o"
    with atomic_directory(out) as tmp:  # a previous output of the library, now read as an input
        (tmp / "model.safetensors").write_text("old")
    for inputs in ([out], [str(out / "model.safetensors")], ["smollm2", None, "", tmp_path / "nowhere", str(out)],
                   [tmp_path / "o" / ".." / "o"]):
        with pytest.raises(OutputExists, match=r"the output .*o (is|holds) the input .*would replace an input"):
            check_overwritable(out, True, inputs=inputs)
    assert (out / "model.safetensors").read_text() == "old"
    check_overwritable(out, True, inputs=["smollm2", tmp_path / "elsewhere", object()])  # not inputs inside it
    check_overwritable(tmp_path / "new", False, inputs=[tmp_path])  # an output inside an input directory: new


def test_overwrite_refuses_a_directory_without_manifest(tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    (out / "thesis.tex").write_text("years of work")
    with pytest.raises(OutputExists, match="thesis.tex"):
        with atomic_directory(out, overwrite=True):
            pass
    empty = tmp_path / "empty"
    empty.mkdir()
    with atomic_directory(empty, overwrite=True) as tmp:
        (tmp / "a").write_text("a")
    assert (empty / "a").exists()


def test_write_json_atomic(tmp_path):
    write_json_atomic(tmp_path / "c.json", {"b": 1, "a": tmp_path})
    assert json.loads((tmp_path / "c.json").read_text()) == {"a": str(tmp_path), "b": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["c.json"]


def test_atomic_file_replaces_on_success_and_keeps_the_old_file_on_error(tmp_path):
    out = tmp_path / "report.md"
    write_text_atomic(out, "old ü\n")
    with pytest.raises(RuntimeError):
        with atomic_file(out) as tmp:
            tmp.write_text("half")
            raise RuntimeError("writer failed")
    assert out.read_text(encoding="utf-8") == "old ü\n"  # untouched, and the temporary is gone
    with atomic_file(out) as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(".report.md.tmp-") and not tmp.exists()
        tmp.write_bytes(b"new")
    assert out.read_bytes() == b"new"
    assert [p.name for p in tmp_path.iterdir()] == ["report.md"]


def test_an_output_under_a_file_is_named_and_nothing_is_written(tmp_path):
    afile = tmp_path / "model.yml"
    afile.write_text("x")
    with pytest.raises(OutputNotWritable, match=r"cannot write .*model\.yml/out: .*model\.yml"):
        with atomic_directory(afile / "out"):
            raise AssertionError("not reached")
    assert afile.read_text() == "x" and sorted(p.name for p in tmp_path.iterdir()) == ["model.yml"]


def test_a_bad_shard_size_is_a_config_error():
    from configurable_fm.errors import ConfigError
    from configurable_fm.interop.safetensors_io import parse_size

    assert parse_size("5GB") == 5 * 10**9 and parse_size("2 KiB") == 2048 and parse_size(7) == 7
    with pytest.raises(ConfigError, match=r"shard size '5XB' is not a size"):
        parse_size("5XB")
