"""Reading and writing (sharded) safetensors checkpoints, lazily and atomically.

* `TensorStore(dir_or_file)` opens `model.safetensors` or `model.safetensors.index.json` + shards, memory-maps
  them, and reads one tensor at a time (`store[key]` -> numpy array); corrupt or truncated files raise
  `CheckpointError` naming the file.
* `write_sharded(tensors, out_dir, max_shard_bytes)` writes shards plus an index when more than one.
Nothing here uses pickle.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterator, Mapping

import ml_dtypes  # noqa: F401  (registers bfloat16 with numpy, so bf16 safetensors read as numpy arrays)
import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from configurable_fm.checks import is_int
from configurable_fm.errors import ConfigError, UserError

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
SAFETENSORS_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
                      "F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2, "I64": np.int64,
                      "I32": np.int32, "I16": np.int16, "I8": np.int8, "U64": np.uint64, "U32": np.uint32,
                      "U16": np.uint16, "U8": np.uint8, "BOOL": np.bool_}


class CheckpointError(UserError, ValueError):
    """A checkpoint file or directory is missing, truncated, corrupt or inconsistent."""


def read_json_object(file: Path, *, what: str = "JSON object", format: str | None = None,
                     max_version: int | None = None) -> dict:
    """The JSON object in `file` (which exists); CheckpointError naming the file when it is not valid JSON, not an
    object, or (with `format`) has another "format" field, or (with `max_version`) a missing or newer "version"."""
    try:
        obj = json.loads(Path(file).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{file}: not valid JSON ({e})") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{file}: expected a JSON object, got {type(obj).__name__}")
    if format is not None and obj.get("format") != format:
        raise CheckpointError(f"{file}: not a {what} (format should be {format!r})")
    if max_version is not None and (not isinstance(obj.get("version"), int) or obj["version"] > max_version):
        raise CheckpointError(f"{file}: version {obj.get('version')!r} is not supported (this code reads up to "
                              f"version {max_version})")
    return obj


def read_index(index: Path) -> dict[str, str]:
    """The weight_map {tensor name: shard file name} of a sharded checkpoint's `model.safetensors.index.json`;
    CheckpointError naming the file when it is not JSON, has no "weight_map" object, or maps a name to anything
    but a plain file name in the same directory."""
    weight_map = read_json_object(index, what="safetensors index").get("weight_map")
    if not isinstance(weight_map, dict):
        raise CheckpointError(f"{index}: not a valid safetensors index (no \"weight_map\" object)")
    for name, file in weight_map.items():
        if not isinstance(file, str) or not file or Path(file).name != file:
            raise CheckpointError(f"{index}: weight_map[{name!r}] = {file!r} is not a shard file name")
    return weight_map


class TensorStore(Mapping[str, np.ndarray]):
    """Lazy read-only view {tensor name: numpy array} over one safetensors file or a sharded directory."""

    def __init__(self, path: str | os.PathLike):
        path = Path(path)
        if path.is_dir():
            index = path / INDEX_FILE
            if (path / SINGLE_FILE).exists():  # before an index, as transformers' from_pretrained looks
                files = None
                path = path / SINGLE_FILE
            elif index.exists():
                files = {k: path / f for k, f in read_index(index).items()}
            else:
                found = sorted(p.name for p in path.glob("*.safetensors"))
                raise CheckpointError(f"{path}: no {SINGLE_FILE} or {INDEX_FILE}"
                                      + (f" (found {found})" if found else ""))
        elif path.exists():
            files = None
        else:
            raise CheckpointError(f"{path}: no such file or directory")
        self._handles: dict[Path, object] = {}
        if files is None:
            self._files = {k: path for k in self._open(path).keys()}
        else:
            missing = sorted({str(f) for f in files.values() if not f.exists()})
            if missing:
                raise CheckpointError(f"index {path / INDEX_FILE} names missing shard(s): {missing}")
            self._files = {}
            for shard in sorted(set(files.values())):
                present = set(self._open(shard).keys())
                claimed = {k for k, f in files.items() if f == shard}
                if claimed - present:
                    raise CheckpointError(f"{shard}: the index lists tensors the shard lacks: {sorted(claimed - present)[:10]}")
            self._files = files

    def _open(self, file: Path):
        if file not in self._handles:
            try:
                self._handles[file] = safe_open(str(file), framework="numpy")
            except Exception as e:  # safetensors raises its own error types for bad headers / sizes
                raise CheckpointError(f"{file}: cannot read safetensors file ({e})") from None
        return self._handles[file]

    def __getitem__(self, key: str) -> np.ndarray:
        try:
            file = self._files[key]
        except KeyError:
            raise KeyError(f"tensor {key!r} is not in the checkpoint") from None
        try:
            return self._open(file).get_tensor(key)
        except Exception as e:
            raise CheckpointError(f"{file}: cannot read tensor {key!r} ({e})") from None

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._open(self._files[key]).get_slice(key).get_shape())

    def dtype(self, key: str) -> np.dtype:
        """The numpy dtype of tensor `key`, from the file header (no data read)."""
        code = self._open(self._files[key]).get_slice(key).get_dtype()
        if code not in SAFETENSORS_DTYPES:
            raise CheckpointError(f"{self._files[key]}: tensor {key!r} has dtype {code}, which numpy cannot hold")
        return np.dtype(SAFETENSORS_DTYPES[code])

    def __iter__(self) -> Iterator[str]:
        return iter(self._files)

    def __len__(self) -> int:
        return len(self._files)

    def metadata(self) -> dict:
        out = {}
        for f in sorted(set(self._files.values())):
            out.update(self._open(f).metadata() or {})
        return out


def parse_size(size: int | str) -> int:
    """'5GB' / '500MB' / '100KB' / int bytes -> bytes (decimal units, as transformers uses); ConfigError unless a
    positive size."""
    s = str(size).strip().upper()
    units = (("GIB", 2**30), ("MIB", 2**20), ("KIB", 2**10), ("GB", 10**9), ("MB", 10**6), ("KB", 10**3), ("B", 1))
    try:
        if is_int(size):
            n = int(size)
        else:
            unit, mult = next(((u, m) for u, m in units if s.endswith(u)), ("", 1))
            n = int(float(s[: len(s) - len(unit)]) * mult) if unit else int(s)
    except (ValueError, OverflowError):  # not a number, or inf / nan
        n = None
    if n is None or n < 1:
        raise ConfigError(f"shard size {size!r} is not a size: give a positive number of bytes or of GB / MB / KB / "
                          "GiB / MiB / KiB / B, e.g. '5GB'")
    return n


def write_sharded(tensors: Mapping[str, np.ndarray], out_dir: str | os.PathLike, *,
                  max_shard_bytes: int | str = "5GB", metadata: dict | None = None) -> list[str]:
    """Writes `tensors` as safetensors into `out_dir` (which must exist); returns the file names.

    One file `model.safetensors` when everything fits in `max_shard_bytes`, else
    `model-0000i-of-0000n.safetensors` shards (tensors kept in order) plus `model.safetensors.index.json`.
    """
    limit = parse_size(max_shard_bytes)
    shards: list[dict[str, np.ndarray]] = [{}]
    size = 0
    for key, value in tensors.items():
        value = np.ascontiguousarray(value)
        if shards[-1] and size + value.nbytes > limit:
            shards.append({})
            size = 0
        shards[-1][key] = value
        size += value.nbytes
    meta = {"format": "np", **(metadata or {})}
    out_dir = Path(out_dir)
    if len(shards) == 1:
        save_file(shards[0], str(out_dir / SINGLE_FILE), metadata=meta)
        return [SINGLE_FILE]
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    for name, shard in zip(names, shards):
        save_file(shard, str(out_dir / name), metadata=meta)
    index = {"metadata": {"total_size": int(sum(v.nbytes for s in shards for v in s.values()))},
             "weight_map": {k: name for name, s in zip(names, shards) for k in s}}
    (out_dir / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    return names + [INDEX_FILE]
