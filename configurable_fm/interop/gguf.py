"""GGUF (llama.cpp) checkpoints -> configurable_fm models.

    model = from_gguf("SmolLM2-135M-Instruct.Q4_1.gguf")      # Llama with float32 parameters
    logits = model(ids_BxT)                                    # (B, T, V)

Reading goes through `gguf.GGUFReader` (memory-mapped) behind a validating front end: a bad magic, an
unknown version, counts that cannot fit in the file, or any read past its end is a `CheckpointError` that
names the file. Tensors are dequantized one at a time to float32 in Hugging Face's `(out, in)` layout and
renamed to HF names (`blk.3.attn_q.weight` -> `model.layers.3.self_attn.q_proj.weight`); the model is then
built by `interop.hf.state_from_tensors`, so missing / unexpected / mis-shaped tensors are reported exactly as
for safetensors checkpoints.

llama.cpp stores the rows of the q and k projections permuted for its interleaved rotary layout, which rotates
the pairs (2j, 2j+1) of a head where transformers rotates (j, j + H/2): within each head of size H, GGUF row
2j + i holds HF row i*H/2 + j (i in {0, 1}, j < H/2), i.e. W_gguf = W.reshape(n, 2, H/2, in).swapaxes(1, 2)
.reshape(out, in). We apply the inverse, W_gguf.reshape(n, H/2, 2, in).swapaxes(1, 2).reshape(out, in)
(n = head_count for q, head_count_kv for k; biases likewise), so the model keeps the rotate-half RoPE.
"""
from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Any, Iterator, Mapping

import gguf
import jax.numpy as jnp
import numpy as np

from configurable_fm.interop.safetensors_io import CheckpointError
from configurable_fm.models.attention import RopeScaling
from configurable_fm.models.llama import Llama, LlamaConfig

MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
SUPPORTED_ARCHITECTURES = ("llama",)

# Tensor encodings we dequantize (through gguf.quants) and check against scalar reference decoders in the tests.
SUPPORTED_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q5_K", "Q6_K")

# Metadata keys under "<arch>." that we read, or that do not change the forward pass.
_HANDLED_ARCH_KEYS = {
    "block_count", "embedding_length", "feed_forward_length", "attention.head_count", "attention.head_count_kv",
    "rope.freq_base", "attention.layer_norm_rms_epsilon", "context_length", "rope.dimension_count",
    "attention.key_length", "attention.value_length", "vocab_size", "rope.scaling.type", "rope.scaling.factor",
    "rope.scale_linear", "rope.scaling.original_context_length", "rope.scaling.finetuned",
    "expert_count", "expert_used_count",
}


# ------------------------------------------------------------------------------------ reading the file
class _BoundedReader(gguf.GGUFReader):
    """GGUFReader whose every read is bounds-checked (the stock reader silently returns short arrays)."""

    def _get(self, offset, dtype, count=1, override_order=None):
        """The stock `_get` (a view of `count` items at `offset`, in the file's byte order) on a plain ndarray view
        of the memory map: slicing np.memmap runs Python code per slice, and the metadata of a model with a 49k
        vocabulary is ~250k slices (SmolLM2's GGUF parsed in 6 s instead of ~1 s). Still lazily mapped."""
        count, offset, dtype = int(count), int(offset), np.dtype(dtype)
        plain = self.__dict__.get("_plain")
        if plain is None:
            plain = self._plain = self.data.view(np.ndarray)
        end = offset + dtype.itemsize * count
        if offset < 0 or count < 0 or end > len(plain):
            raise EOFError(f"needs bytes [{offset}, {end}) but the file has {len(plain)} bytes")
        arr = plain[offset:end].view(dtype)
        order = self.byte_order if override_order is None else override_order
        if order == "I" or (order == "<" and sys.byteorder == "little"):
            return arr
        return arr.view(arr.dtype.newbyteorder(order))

    def _build_tensors(self, start_offs, fields):
        # One tensor at a time, so that a read past the end names the tensor.
        built, seen = [], set()
        for field in fields:
            if field.name in seen:
                raise ValueError(f"duplicated tensor {field.name}")
            seen.add(field.name)
            try:
                super()._build_tensors(start_offs, [field])
            except EOFError as e:
                raise EOFError(f"tensor {field.name} {e}") from None
            built += self.tensors
        self.tensors = built


def read_gguf(path) -> "gguf.GGUFReader":
    """Opens and validates a GGUF file (memory-mapped; tensor data is read lazily).

    Checks the magic, the version, that the header counts fit in the file, that every read stays inside the
    file, and that every tensor's data lies inside the file. Any failure is a `CheckpointError` naming the file.
    An already open reader is returned as is (so callers can parse a file once and pass the reader around).
    """
    if isinstance(path, gguf.GGUFReader):
        return path
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(24)
    if len(head) < 4 or head[:4] != MAGIC:
        raise CheckpointError(f"{path}: not a GGUF file (magic {head[:4]!r}, expected {MAGIC!r})")
    if len(head) < 24:
        raise CheckpointError(f"{path}: truncated GGUF header ({size} bytes)")
    version = int.from_bytes(head[4:8], "little")
    if version and version & 0xFFFF == 0:
        raise CheckpointError(f"{path}: big-endian GGUF files are not supported")
    if version not in SUPPORTED_VERSIONS:
        raise CheckpointError(f"{path}: GGUF version {version} is not supported (supported: {SUPPORTED_VERSIONS})")
    n_tensors, n_kv = int.from_bytes(head[8:16], "little"), int.from_bytes(head[16:24], "little")
    # A key/value pair takes at least 8 (key length) + 4 (type) + 1 bytes; a tensor info at least 8+4+8+4+8.
    if 13 * n_kv + 32 * n_tensors > size - 24:
        raise CheckpointError(f"{path}: corrupt or truncated GGUF header ({n_kv} metadata entries and "
                              f"{n_tensors} tensors cannot fit in {size} bytes)")
    try:
        reader = _BoundedReader(path)
    except EOFError as e:
        raise CheckpointError(f"{path}: truncated or corrupt GGUF file ({e})") from None
    except Exception as e:  # the reader raises ValueError/KeyError/IndexError/UnicodeDecodeError on bad data
        raise CheckpointError(f"{path}: corrupt GGUF file ({type(e).__name__}: {e})") from None
    for t in reader.tensors:
        end = t.data_offset + t.n_bytes
        if t.data_offset < reader.data_offset or end > size:
            raise CheckpointError(f"{path}: tensor {t.name} data [{t.data_offset}, {end}) lies outside the file "
                                  f"({size} bytes): the file is truncated or corrupt")
    return reader


def metadata(reader, key: str, default: Any = ..., *, source: str = "") -> Any:
    """The value of one metadata key (str, int, float, bool or list); `default` when absent (else an error)."""
    field = reader.get_field(key)
    if field is None:
        if default is ...:
            raise CheckpointError(f"{source or 'GGUF file'}: missing metadata key {key!r}")
        return default
    try:
        value = field.contents()
    except Exception as e:
        raise CheckpointError(f"{source or 'GGUF file'}: metadata key {key!r} is corrupt ({e})") from None
    if field.types == [gguf.GGUFValueType.FLOAT32]:
        value = float(str(np.float32(value)))  # shortest decimal of the float32: 1e-05, not 9.99999974e-06
    return value


# ------------------------------------------------------------------------------------ dequantization
def dequantize(tensor, *, source: str = "") -> np.ndarray:
    """One GGUF tensor -> float32 numpy array with numpy shape = reversed GGUF dims, i.e. HF's (out, in).

    Types: SUPPORTED_TYPES (others are an error naming the tensor and its type).
    """
    kind = tensor.tensor_type.name
    if kind not in SUPPORTED_TYPES:
        raise NotImplementedError(f"{source}: tensor {tensor.name} has type {kind}, which is not supported "
                                  f"(supported: {list(SUPPORTED_TYPES)})")
    shape = tuple(int(d) for d in reversed(tensor.shape.tolist()))
    out = gguf.quants.dequantize(np.asarray(tensor.data), tensor.tensor_type)
    return np.array(out, dtype=np.float32, copy=True).reshape(shape)


# ------------------------------------------------------------------------------------ llama config and names
def _unpermute_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """Inverse of llama.cpp's q/k permutation: (out, ...) rows from interleaved to rotate-half order per head."""
    out = w.shape[0]
    return w.reshape(n_head, out // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def llama_config_from_gguf(reader, *, source: str = "") -> LlamaConfig:
    """LlamaConfig from the `llama.*` metadata; unsupported features raise NotImplementedError."""
    arch = metadata(reader, "general.architecture", source=source)
    if arch not in SUPPORTED_ARCHITECTURES:
        raise NotImplementedError(f"{source}: GGUF architecture {arch!r} is not supported "
                                  f"(supported: {list(SUPPORTED_ARCHITECTURES)})")

    def get(key, default=...):
        return metadata(reader, f"{arch}.{key}", default, source=source)

    unknown = sorted(k for k in reader.fields if k.startswith(f"{arch}.")
                     and k[len(arch) + 1:] not in _HANDLED_ARCH_KEYS)
    if unknown:
        raise NotImplementedError(f"{source}: GGUF metadata {unknown} is not implemented for {arch!r}")
    if get("expert_count", 0):
        raise NotImplementedError(f"{source}: mixture-of-experts GGUF ({arch}.expert_count="
                                  f"{get('expert_count')}) is not implemented")
    names = {t.name for t in reader.tensors}
    if "rope_freqs.weight" in names:
        raise NotImplementedError(f"{source}: per-frequency rope factors (tensor rope_freqs.weight, Llama 3.1 "
                                  f"style rope scaling) are not implemented")
    emb = next((t for t in reader.tensors if t.name == "token_embd.weight"), None)
    if emb is None:
        raise CheckpointError(f"{source}: no token_embd.weight tensor")
    hidden, n_head = get("embedding_length"), get("attention.head_count")
    n_kv = get("attention.head_count_kv", n_head)
    if isinstance(n_head, list) or isinstance(n_kv, list):
        raise NotImplementedError(f"{source}: per-layer head counts ({n_head}, {n_kv}) are not implemented")
    hidden, n_head, n_kv = int(hidden), int(n_head), int(n_kv)
    head_dim = int(get("attention.key_length", hidden // n_head))
    if int(get("attention.value_length", head_dim)) != head_dim:
        raise NotImplementedError(f"{source}: attention.value_length {get('attention.value_length')} != "
                                  f"key_length {head_dim} is not implemented")
    rot = int(get("rope.dimension_count", head_dim))
    if rot != head_dim:
        raise NotImplementedError(f"{source}: partial rotary embeddings (rope.dimension_count={rot}, "
                                  f"head dim {head_dim}) are not implemented")
    # As llama.cpp reads them: the type defaults to "linear" when the key is absent; the factor is
    # rope.scaling.factor, else the older rope.scale_linear, and 0 (or absent) means unscaled; "none" never scales.
    scaling = None
    explicit = get("rope.scaling.type", None)
    kind = "linear" if explicit is None else explicit
    factor = float(get("rope.scaling.factor", get("rope.scale_linear", 0.0)))
    if kind not in ("none", "linear"):
        raise NotImplementedError(f"{source}: rope scaling type {kind!r} ({arch}.rope.scaling.type) is not "
                                  f"implemented (supported: 'none', 'linear')")
    if kind == "linear" and factor != 0.0 and (explicit is not None or factor != 1.0):
        scaling = RopeScaling(rope_type="linear", factor=factor)
    vocab = int(emb.shape[1]) if len(emb.shape) == 2 else -1
    declared = get("vocab_size", vocab)
    if vocab < 0 or int(declared) != vocab:
        raise CheckpointError(f"{source}: token_embd.weight has dims {emb.shape.tolist()} but the vocabulary "
                              f"size is {declared}")
    tokens = reader.get_field("tokenizer.ggml.tokens")
    if tokens is not None and len(tokens.data) != vocab:  # llama.cpp refuses such a file too
        raise CheckpointError(f"{source}: tokenizer.ggml.tokens holds {len(tokens.data)} tokens but token_embd.weight "
                              f"has {vocab} rows")
    return LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=int(get("feed_forward_length")),
        num_layers=int(get("block_count")), num_heads=n_head, num_kv_heads=n_kv, head_dim=head_dim,
        rms_norm_eps=float(get("attention.layer_norm_rms_epsilon", 1e-5)),
        rope_theta=float(get("rope.freq_base", 10000.0)), rope_scaling=scaling,
        attention_bias="blk.0.attn_q.bias" in names, o_proj_bias="blk.0.attn_output.bias" in names,
        mlp_bias="blk.0.ffn_up.bias" in names,
        tie_word_embeddings="output.weight" not in names,
        max_position_embeddings=int(get("context_length", 2048)), hidden_act="silu",
        architecture="LlamaForCausalLM")


_GLOBAL_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_BLOCK_NAMES = {
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}
_BLOCK_RE = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")
_GLOBAL_RE = re.compile(r"(\w+)\.(weight|bias)")


def hf_name(gguf_name: str) -> str | None:
    """HF (LlamaForCausalLM) name of a llama GGUF tensor, or None when it has none."""
    if m := _BLOCK_RE.fullmatch(gguf_name):
        layer, part, kind = m.groups()
        return f"model.layers.{layer}.{_BLOCK_NAMES[part]}.{kind}" if part in _BLOCK_NAMES else None
    if m := _GLOBAL_RE.fullmatch(gguf_name):
        part, kind = m.groups()
        return f"{_GLOBAL_NAMES[part]}.{kind}" if part in _GLOBAL_NAMES else None
    return None


class GGUFTensors(Mapping[str, np.ndarray]):
    """Lazy read-only {HF tensor name: float32 array (out, in)} view of a llama GGUF file.

    Each access dequantizes one tensor (and un-permutes q/k rows), so memory stays at one tensor beyond the
    caller's own copies. Unknown GGUF names and unsupported tensor types are reported, all at once, on creation.
    """

    def __init__(self, reader, cfg: LlamaConfig, *, source: str = ""):
        self._source, self._cfg = source, cfg
        self._tensors, unknown, bad_types = {}, [], []
        for t in reader.tensors:
            name = hf_name(t.name)
            if name is None:
                unknown.append(t.name)
                continue
            if t.tensor_type.name not in SUPPORTED_TYPES:
                bad_types.append(f"{t.name} ({t.tensor_type.name})")
            self._tensors[name] = t
        problems = []
        if unknown:
            problems.append(f"unknown GGUF tensor name(s) for the llama architecture: {unknown}")
        if bad_types:
            problems.append(f"unsupported tensor type(s): {bad_types} (supported: {list(SUPPORTED_TYPES)})")
        if problems:
            raise CheckpointError(f"{source}: " + "; ".join(problems))

    def __getitem__(self, key: str) -> np.ndarray:
        w = dequantize(self._tensors[key], source=self._source)
        heads = (self._cfg.num_heads if ".self_attn.q_proj." in key else
                 self._cfg.num_kv_heads if ".self_attn.k_proj." in key else 0)
        if heads and w.shape[0] == heads * self._cfg.dim_per_head:  # else: left for the shape check to report
            w = _unpermute_rows(w, heads)
        return w

    def gguf_name(self, key: str) -> str:
        return self._tensors[key].name

    def shape(self, key: str) -> tuple[int, ...]:
        """HF shape (out, in) of tensor `key` = reversed GGUF dims, from the header (no data read)."""
        return tuple(int(d) for d in reversed(self._tensors[key].shape.tolist()))

    def __iter__(self) -> Iterator[str]:
        return iter(self._tensors)

    def __len__(self) -> int:
        return len(self._tensors)


def source_name(path) -> str:
    """The file name of a path or of an open reader (for messages)."""
    return str(path.data.filename) if isinstance(path, gguf.GGUFReader) else str(path)


def gguf_tensors(path) -> tuple[LlamaConfig, GGUFTensors]:
    """(config, lazy {HF name: float32 array}) of a llama GGUF file (path or open reader), without a model."""
    reader, source = read_gguf(path), source_name(path)
    cfg = llama_config_from_gguf(reader, source=source)
    return cfg, GGUFTensors(reader, cfg, source=source)


def from_gguf(path, dtype=jnp.float32) -> Llama:
    """Loads a llama-architecture GGUF file (path or open reader) as a `Llama` with parameters in `dtype`.

    Quantized tensors are dequantized to float32 one at a time (then cast to `dtype`); the result equals
    loading the HF checkpoint the GGUF was made from, up to the quantization error.
    """
    from configurable_fm.interop.hf import state_from_tensors
    from configurable_fm.interop.hf_llama import LLAMA

    cfg, tensors = gguf_tensors(path)
    return state_from_tensors(LLAMA, cfg, tensors, source=source_name(path), param_dtype=dtype)
