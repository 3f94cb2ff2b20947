"""Tokenizers (HF `tokenizers`) from tokenizer.json files and from GGUF metadata.

    tok = load_tokenizer("path/to/hf_dir")          # or a tokenizer.json file, or a .gguf file
    tok = tokenizer_from_gguf("model.gguf")         # byte-level BPE rebuilt from tokenizer.ggml.*
    ids = tok.encode("The capital of France is").ids

A GGUF file stores the vocabulary (`tokenizer.ggml.tokens`, index = id), token types (1 normal, 2 unknown,
3 control, 4 user-defined, 5 unused, 6 byte), BPE merges ("a b" in priority order), the pre-tokenizer family
(`tokenizer.ggml.pre`), special ids (`tokenizer.ggml.{bos,eos,unknown,padding,...}_token_id`) and the chat
template. Byte-level BPE ('gpt2' models) is rebuilt exactly; other tokenizer models are an error.
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

from configurable_fm.interop.gguf import metadata, read_gguf, source_name
from configurable_fm.interop.safetensors_io import CheckpointError

SUPPORTED_GGUF_MODELS = ("gpt2",)

# tokenizer.ggml.token_type values.
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

_SPECIAL_KEYS = {"bos": "bos_token_id", "eos": "eos_token_id", "unk": "unknown_token_id",
                 "pad": "padding_token_id", "sep": "seperator_token_id", "cls": "cls_token_id",
                 "mask": "mask_token_id", "eot": "eot_token_id"}


def _pre_tokenizer(pre: str):
    """Pre-tokenizer for a `tokenizer.ggml.pre` value."""
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre == "smollm":  # digits one by one, then GPT-2's regex split and byte-level mapping
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    if pre not in ("gpt2", "default"):
        warnings.warn(f"GGUF tokenizer.ggml.pre={pre!r} has no dedicated pre-tokenizer here; using GPT-2's "
                      f"regex split, which may split some text differently", stacklevel=3)
    return byte_level


def gguf_special_tokens(path) -> dict[str, int]:
    """{'bos': id, 'eos': id, 'unk': id, 'pad': id, ...} for the special ids the GGUF metadata names.

    `path`: a GGUF file or an open reader (`interop.gguf.read_gguf`)."""
    reader = read_gguf(path)
    out = {}
    for name, key in _SPECIAL_KEYS.items():
        value = metadata(reader, f"tokenizer.ggml.{key}", None, source=source_name(path))
        if value is not None:
            out[name] = int(value)
    return out


def gguf_chat_template(path) -> str | None:
    """The Jinja chat template stored in the GGUF metadata (`tokenizer.chat_template`), or None."""
    return metadata(read_gguf(path), "tokenizer.chat_template", None, source=source_name(path))


def tokenizer_from_gguf(path) -> Tokenizer:
    """Rebuilds the tokenizer of a GGUF file (byte-level BPE, tokenizer.ggml.model == 'gpt2').

    Control tokens (type 3) become special added tokens (never split, skipped by decode(skip_special_tokens));
    user-defined tokens (type 4) become plain added tokens. When `tokenizer.ggml.add_bos_token` (or
    add_eos_token) is true, a post-processor adds the BOS (EOS) id to every encoding. The special ids are
    available from `gguf_special_tokens(path)`. `path`: a GGUF file or an open reader.
    """
    reader = read_gguf(path)
    source = source_name(path)

    def get(key, default=...):
        return metadata(reader, f"tokenizer.ggml.{key}", default, source=source)

    kind = get("model", None)
    if kind is None:
        raise CheckpointError(f"{source}: no tokenizer in the GGUF metadata (tokenizer.ggml.model is absent)")
    if kind not in SUPPORTED_GGUF_MODELS:
        raise NotImplementedError(f"{source}: GGUF tokenizer model {kind!r} is not supported "
                                  f"(supported: {list(SUPPORTED_GGUF_MODELS)})")
    tokens = get("tokens")
    types = get("token_type", [NORMAL] * len(tokens))
    merges = get("merges")
    if len(types) != len(tokens):
        raise CheckpointError(f"{source}: {len(tokens)} tokens but {len(types)} token types")
    vocab = {}
    for i, t in enumerate(tokens):
        vocab.setdefault(t, i)
    if len(vocab) != len(tokens):
        raise CheckpointError(f"{source}: the vocabulary has {len(tokens) - len(vocab)} duplicated token(s)")
    pairs = []
    for m in merges:
        parts = m.split(" ")
        if len(parts) != 2:
            raise CheckpointError(f"{source}: malformed BPE merge {m!r} (expected 'left right')")
        pairs.append((parts[0], parts[1]))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=pairs, fuse_unk=False, byte_fallback=False))
    tok.pre_tokenizer = _pre_tokenizer(get("pre", "default"))
    tok.decoder = decoders.ByteLevel()
    special = [AddedToken(t, special=True, normalized=False) for t, k in zip(tokens, types) if k == CONTROL]
    user = [AddedToken(t, special=False, normalized=False) for t, k in zip(tokens, types) if k == USER_DEFINED]
    if special:
        tok.add_special_tokens(special)
    if user:
        tok.add_tokens(user)
    add_bos, add_eos = bool(get("add_bos_token", False)), bool(get("add_eos_token", False))
    if add_bos or add_eos:
        ids = {name: get(key, None) for name, key in (("bos", "bos_token_id"), ("eos", "eos_token_id"))}
        for name, wanted in (("bos", add_bos), ("eos", add_eos)):
            if wanted and not (ids[name] is not None and 0 <= ids[name] < len(tokens)):
                raise CheckpointError(f"{source}: add_{name}_token is set but {name}_token_id is "
                                      f"{ids[name]} (vocabulary of {len(tokens)})")
        pre = [tokens[ids["bos"]]] if add_bos else []
        post = [tokens[ids["eos"]]] if add_eos else []
        tok.post_processor = processors.TemplateProcessing(
            single=" ".join(pre + ["$A"] + post), pair=" ".join(pre + ["$A"] + post + pre + ["$B:1"] + post),
            special_tokens=[(tokens[ids[n]], ids[n]) for n, want in (("bos", add_bos), ("eos", add_eos)) if want])
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    return tok


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """A tokenizer from a tokenizer.json file, a directory holding one, or a GGUF file."""
    path = Path(path)
    if path.is_dir():
        path = path / "tokenizer.json"
    elif path.suffix == ".gguf":
        return tokenizer_from_gguf(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such tokenizer file")
    try:
        return Tokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises its own Exception type on bad JSON
        raise CheckpointError(f"{path}: cannot read tokenizer ({e})") from None
