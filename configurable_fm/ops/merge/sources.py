"""Lazy tensor sources for the streaming merge: {HF tensor name: array read on access} over any model input.

    src = open_source("smollm2-135m-instruct")      # or "x.gguf", "hf_dir/", "orbax_ckpt/"
    src.shape("model.layers.3.self_attn.q_proj.weight")    # (576, 576), from headers / metadata only
    w = src["model.layers.3.self_attn.q_proj.weight"]       # one tensor, read (and converted) now
    src.config                                              # the HF config.json dict
    src.write_tokenizer(out_dir)                            # copies or rebuilds the tokenizer files

Every source presents the tensors an HF checkpoint of the same model would hold, under the same names, in
HF's layout (torch Linear weights (out, in)), in the family's tensor order. Opening reads headers and metadata
only; each access reads and converts one tensor (or one group, below), so a consumer that holds a few tensors
at a time needs memory for those tensors only, never for whole models.

* HF directory (config.json + safetensors): `execute.PreadStore` (each tensor read with os.preadv into a fresh
  array: no memory map, so the file's pages never count in the process's RSS); values in their stored dtype.
* GGUF file (llama.cpp, llama architecture): the file is memory-mapped; tensor t is dequantized on access to
  float32 (F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q4_K, Q5_K, Q6_K: `interop.gguf.SUPPORTED_TYPES`), its
  GGUF name mapped to the HF name, and the q/k rows un-permuted back to rotate-half order
  (`interop.gguf.GGUFTensors`). Shapes are the reversed GGUF dims. The HF config comes from the `llama.*`
  metadata (+ bos/eos/pad ids); the tokenizer is rebuilt from `tokenizer.ggml.*` and saved as tokenizer.json.
* orbax model checkpoint (`interop.orbax_io`: model_config.json + params/): shapes and dtypes from orbax's
  metadata; on access the one parameter p that makes HF tensor k is restored alone (orbax partial restore,
  as numpy) and converted through the family's `TensorMapping` (e.g. kernel (in, out) -> weight (out, in)).
  A many-to-one mapping (Mixtral's stacked experts (E, in, out) -> E weights (out, in)) restores p once
  and keeps its E tensors until each has been read once (or another group is read).
* registry name (`models.registry.MODELS`): its packaged HF directory or GGUF file, as above.

GGUF and orbax sources are checked on opening against the family's abstract model built from their config:
missing, unexpected and mis-shaped tensors are reported together in one `CheckpointError` naming the file.
"""
from __future__ import annotations

import abc
import os
import shutil
from pathlib import Path
from typing import Iterator, Mapping, Optional

import numpy as np

from configurable_fm.interop.safetensors_io import CheckpointError

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "vocab.txt", "added_tokens.json", "generation_config.json")


class TensorSource(Mapping[str, np.ndarray]):
    """Lazy read-only {HF tensor name: numpy array}: names, shapes and dtypes known on opening, one tensor read
    per access (`_read`, by the subclass).

    location: the file or directory (and registry name) for messages; config: the HF config.json dict;
    tokenizer_dir: a directory whose tokenizer files `write_tokenizer` copies, or None.
    """

    def __init__(self, location: str, config: dict, shapes: dict[str, tuple[int, ...]], dtypes: dict[str, np.dtype],
                 tokenizer_dir: Optional[Path] = None):
        self.location, self.config, self.tokenizer_dir = location, config, tokenizer_dir
        self._shapes, self._dtypes = shapes, dtypes

    @abc.abstractmethod
    def _read(self, name: str) -> np.ndarray:
        """Reads (and converts) tensor `name`, which is known to exist."""

    def _check(self, name: str) -> None:
        if name not in self._shapes:
            raise KeyError(f"tensor {name!r} is not in {self.location}")

    def shape(self, name: str) -> tuple[int, ...]:
        """The shape `self[name]` has (no data read)."""
        self._check(name)
        return self._shapes[name]

    def dtype(self, name: str) -> np.dtype:
        """The dtype `self[name]` has (no data read)."""
        self._check(name)
        return self._dtypes[name]

    def __getitem__(self, name: str) -> np.ndarray:
        self._check(name)
        return self._read(name)

    def __contains__(self, name: object) -> bool:  # Mapping's default would read the tensor
        return name in self._shapes

    def __iter__(self) -> Iterator[str]:
        return iter(self._shapes)

    def __len__(self) -> int:
        return len(self._shapes)

    def write_tokenizer(self, out_dir: str | os.PathLike) -> list[str]:
        """Writes this model's tokenizer files into `out_dir` (which exists); returns their names ([] when the
        source has no tokenizer). Here: copies the TOKENIZER_FILES present in `tokenizer_dir`."""
        if self.tokenizer_dir is None:
            return []
        written = []
        for f in TOKENIZER_FILES:
            if (self.tokenizer_dir / f).is_file():
                shutil.copyfile(self.tokenizer_dir / f, Path(out_dir) / f)
                written.append(f)
        return written

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.location!r}, {len(self)} tensors)"


def _tokenizer_dir(directory: Path) -> Optional[Path]:
    return directory if any((directory / f).is_file() for f in TOKENIZER_FILES) else None


# ------------------------------------------------------------------------------------ HF directories
class HFSource(TensorSource):
    """An HF checkpoint directory: `execute.PreadStore` (positioned reads of each tensor, no memory map) +
    config.json; stored dtypes."""

    def __init__(self, path: Path, *, location: str | None = None):
        from configurable_fm.interop.hf import read_config
        from configurable_fm.ops.merge.execute import PreadStore

        self.path = Path(path)
        config = read_config(self.path)
        self._store = PreadStore(self.path)
        super().__init__(location or str(self.path), config, {k: self._store.shape(k) for k in self._store},
                         {k: self._store.dtype(k) for k in self._store}, _tokenizer_dir(self.path))

    def _read(self, name: str) -> np.ndarray:
        return self._store[name]


# ------------------------------------------------------------------------------------ checks against a family
def _hf_views(m, shape: tuple[int, ...], dtype) -> list[np.ndarray]:
    """`m.to_hf` applied to a zero-strided stand-in of the parameter: the HF tensors' shapes and dtypes
    without allocating (the mappings only transpose and index, which give views)."""
    return m.to_hf(np.broadcast_to(np.zeros((), dtype), shape))


def _expected_hf_shapes(family, cfg) -> dict[str, tuple[int, ...]]:
    """{HF name: shape} of the family's checkpoint for `cfg`, from the abstract model (nothing allocated)."""
    from configurable_fm.bricks.paths import flat_state
    from configurable_fm.interop.hf import abstract_model

    params = flat_state(abstract_model(family, cfg))
    out = {}
    for m in family.tensor_map(cfg):
        p = params[m.path]
        out.update({k: v.shape for k, v in zip(m.hf_keys, _hf_views(m, tuple(p.shape), np.float32))})
    return out


def _report(location: str, family: str, missing, unexpected, misshaped) -> None:
    from configurable_fm.interop.hf import check_tensor_match

    check_tensor_match(location, family, sorted(missing), sorted(unexpected), misshaped)


# ------------------------------------------------------------------------------------ GGUF files
class GGUFSource(TensorSource):
    """A llama-architecture GGUF file: float32 HF tensors, each dequantized (and q/k un-permuted) on access.

    The reader's parsed metadata (for SmolLM2 the 49k-token vocabulary: ~160 MB of small arrays) is released
    after opening; `write_tokenizer` parses the file again.
    """

    def __init__(self, path: Path, *, location: str | None = None):
        from configurable_fm.interop.tokenizers import gguf_special_tokens
        from configurable_fm.interop import gguf
        from configurable_fm.interop.hf_llama import LLAMA

        self.path = Path(path)
        location = location or str(self.path)
        reader = gguf.read_gguf(self.path)
        self.cfg = gguf.llama_config_from_gguf(reader, source=location)
        self._tensors = gguf.GGUFTensors(reader, self.cfg, source=location)
        expected = _expected_hf_shapes(LLAMA, self.cfg)  # in the family's order, as interop.hf writes them
        present = {k: self._tensors.shape(k) for k in self._tensors}
        _report(location, "llama", set(expected) - set(present), set(present) - set(expected),
                [f"{k} ({self._tensors.gguf_name(k)}) has shape {present[k]}, expected {expected[k]}"
                 for k in expected if k in present and present[k] != expected[k]])
        config = LLAMA.config_to_hf(self.cfg)
        for name, value in gguf_special_tokens(reader).items():
            if name in ("bos", "eos", "pad"):
                config[f"{name}_token_id"] = value
        self.has_tokenizer = gguf.metadata(reader, "tokenizer.ggml.model", None, source=location) is not None
        self.context_length = int(gguf.metadata(reader, "llama.context_length", self.cfg.max_position_embeddings,
                                                source=location))
        del reader  # the tensors keep only their memory-mapped views
        super().__init__(location, config, expected, {k: np.dtype(np.float32) for k in expected})

    def _read(self, name: str) -> np.ndarray:
        return self._tensors[name]

    def write_tokenizer(self, out_dir: str | os.PathLike) -> list[str]:
        """tokenizer.json (the BPE tokenizer rebuilt from the GGUF metadata), tokenizer_config.json
        (PreTrainedTokenizerFast, the special tokens, the chat template) and special_tokens_map.json, written by
        `interop.tokenizers.write_tokenizer_files` as every HF export is; [] when the file holds no tokenizer."""
        if not self.has_tokenizer:
            return []
        from configurable_fm.interop.tokenizers import load_chat_tokenizer

        return load_chat_tokenizer(self.path).save_pretrained(out_dir)


# ------------------------------------------------------------------------------------ orbax model checkpoints
class OrbaxSource(TensorSource):
    """An `interop.orbax_io` model checkpoint: HF tensors made on access from parameters restored one at a time.

    HF tensor k comes from the family mapping m with k in m.hf_keys: restore m.path alone (orbax partial
    restore, as numpy), apply m.to_hf. The unread outputs of the last many-to-one mapping are kept, so the E
    tensors of a stacked mapping cost one restore when read one after the other.
    """

    def __init__(self, path: Path, *, location: str | None = None):
        import orbax.checkpoint as ocp

        from configurable_fm.bricks.paths import flat_state
        from configurable_fm.interop import orbax_io
        from configurable_fm.interop.hf import abstract_model, families
        from configurable_fm.models.factory import FAMILIES, family_name

        self.path = Path(path)
        location = location or str(self.path)
        spec_file = self.path / orbax_io.MODEL_CONFIG
        try:
            self.cfg, extensions = orbax_io.read_model_spec(self.path)
        except (ValueError, TypeError) as e:
            raise CheckpointError(f"{spec_file}: not a valid model config ({e})") from None
        if extensions:
            added = ", ".join(f"{e.get('path')} ({e.get('kind')})" for e in extensions)
            raise CheckpointError(f"{location}: the model has modules no config builds ({added}); a streamed merge "
                                  "reads HF-expressible models only: merge it in memory (ops.merge.merge) instead")
        module_type = FAMILIES[family_name(self.cfg)][1]
        family = next((f for f in families().values() if f.module_type is module_type), None)
        if family is None:
            raise NotImplementedError(f"{location}: the {family_name(self.cfg)} family has no HF conversion")
        self._params_dir = (self.path / orbax_io.PARAMS_DIR).absolute()
        try:
            meta = ocp.PyTreeCheckpointer().metadata(self._params_dir)
        except Exception as e:  # orbax raises assorted errors for unreadable metadata
            raise CheckpointError(f"{self._params_dir}: cannot read the orbax metadata "
                                  f"({type(e).__name__}: {e})") from None
        meta = getattr(meta, "item_metadata", meta)
        self._meta = dict(getattr(meta, "tree", meta))
        mappings = family.tensor_map(self.cfg)
        expected = {k: tuple(v.shape) for k, v in flat_state(abstract_model(family, self.cfg)).items()}
        needed = {m.path for m in mappings}
        stored = {k: tuple(getattr(v, "shape", None) or ()) for k, v in self._meta.items()}
        _report(location, family.name, needed - set(stored), set(stored) - needed,
                [f"{k} has shape {stored[k]}, expected {expected[k]}"
                 for k in sorted(needed & set(stored)) if stored[k] != expected[k]])
        self._mapping, shapes, dtypes = {}, {}, {}
        for m in mappings:
            for k, v in zip(m.hf_keys, _hf_views(m, stored[m.path], np.dtype(self._meta[m.path].dtype))):
                self._mapping[k] = m
                shapes[k], dtypes[k] = tuple(v.shape), np.dtype(v.dtype)
        self._group: tuple[str, dict[str, np.ndarray]] | None = None  # unserved tensors of the last group
        super().__init__(location, family.config_to_hf(self.cfg), shapes, dtypes, _tokenizer_dir(self.path))

    def _restore(self, path: str) -> np.ndarray:
        """Parameter `path` alone, as a numpy array (orbax partial restore)."""
        import orbax.checkpoint as ocp

        args = ocp.args.PyTreeRestore(item={path: self._meta[path]},
                                      restore_args={path: ocp.RestoreArgs(restore_type=np.ndarray)},
                                      partial_restore=True)
        try:
            with ocp.PyTreeCheckpointer() as ckptr:
                value = ckptr.restore(self._params_dir, args=args)[path]
        except Exception as e:  # orbax raises assorted errors for missing / corrupt array data
            raise CheckpointError(f"{self._params_dir}: cannot restore parameter {path} "
                                  f"({type(e).__name__}: {e})") from None
        return np.asarray(value)

    def _read(self, name: str) -> np.ndarray:
        m = self._mapping[name]
        if len(m.hf_keys) == 1:
            return np.ascontiguousarray(m.to_hf(self._restore(m.path))[0])
        if self._group is None or self._group[0] != m.path or name not in self._group[1]:
            self._group = None  # release the previous group before reading the next
            self._group = (m.path, {k: np.ascontiguousarray(v)
                                    for k, v in zip(m.hf_keys, m.to_hf(self._restore(m.path)))})
        value = self._group[1].pop(name)
        if not self._group[1]:
            self._group = None
        return value


# ------------------------------------------------------------------------------------ dispatch
def open_source(source: str | os.PathLike) -> TensorSource:
    """A lazy TensorSource for a registry name, a .gguf file, an HF directory (config.json) or an orbax model
    checkpoint (model_config.json + params/). Only headers and metadata are read here."""
    from configurable_fm.interop import orbax_io
    from configurable_fm.models import registry

    text = str(source)
    if text in registry.MODELS:
        entry, path = registry.MODELS[text], registry.model_path(text)
        location = f"{text} ({path})"
        if entry.format == "gguf":
            return GGUFSource(path, location=location)
        if entry.format == "hf":
            return HFSource(path, location=location)
        raise ValueError(f"registry model {text!r}: unknown format {entry.format!r}")
    path = Path(source).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return GGUFSource(path)
    if path.is_dir() and (path / "config.json").is_file():
        return HFSource(path)
    if orbax_io.is_model_checkpoint(path):
        return OrbaxSource(path)
    what = ("no such file or directory" if not path.exists() else
            "is neither a .gguf file, an HF directory (config.json) nor an orbax model checkpoint "
            f"({orbax_io.MODEL_CONFIG} + {orbax_io.PARAMS_DIR}/)")
    raise CheckpointError(f"{text}: {what} (and not a registry name: {sorted(registry.MODELS)})")
