"""Vocabulary alignment for merges of models whose tokenizers differ (mergekit 0.1.5's `tokenizer_source` and
`tokenizer: {source, tokens, pad_to_multiple_of}`).

    al = alignment_for_checkpoints("union", "base_dir", {"ft_b": "b_dir", "ft_c": "c_dir"}, pad_to_multiple_of=8)
    rows = al.align_all({"base": e_base, "ft_b": e_b, "ft_c": e_c}, axis=0)   # each (al.padded_size, D)
    al.tokenizer.save("out/tokenizer.json")

1. The output vocabulary (`build_vocabulary`). Every input i has a vocabulary size n_i (its config's
   vocab_size: the number of embedding rows); tokens with id >= n_i are unused. The *tokenizer base* is the merge
   base, else the first model; its tokenizer is first stripped of unused tokens (BPE only).
   - 'base': the stripped base tokenizer;  '<model name>': that model's tokenizer as it is;
   - 'union': the stripped base tokenizer, then as plain added tokens (normalized, not special) every used
     non-added token of the other tokenizers that the base lacks (models in order, ids ascending), then every
     used added token of all tokenizers (base first, first settings win) with its own settings.
   Tokens named in `tokens` that the result lacks are added last (plain added tokens). V = its size (ids 0..V-1).
2. The index maps: for input i and output id t, index_i[t] = the id of t's token in input i's tokenizer (the
   stripped one for the tokenizer base), or -1 when absent or unused there.
3. The rows. Aligned row t of input i is its own row x_i[index_i[t]] unless absent or forced; else the token's
   fill row, decided per token (in this order, over the inputs of the tensor): an override in `tokens`
   (source model m: x_m[index_m[t]]; {kind: model_token, model: m, token | token_id}: x_m[that id in m's own
   tokenizer]; {kind: zero}: 0; `force: true` makes every input take the fill row); else exactly one input has
   it: its row; none has it: 0 (a warning); the merge base has it: the base's row; else the average
   (1/|H|) Σ_{j in H} x_j[index_j[t]] over the inputs H that have it (summed in input order, as mergekit).
   With `pad_to_multiple_of` m the output has V' = m·ceil(V/m) rows; rows V..V'-1 of every input are the mean of
   its aligned rows 0..V-1.

The vocabulary axis: HF tensors (embed_tokens.weight, lm_head.weight) have it at axis 0 (V, D); our flat paths
store lm_head as a Linear kernel (D, V). `align(..., axis=k)` takes it explicitly; `axis=None` detects it as the
single axis whose length is the input's vocabulary size n_i (an error when none or several match);
`vocab_axis_of_path` is the naming rule used by tree.merge (`*.kernel` -> last axis, everything else axis 0).

Where we differ from mergekit 0.1.5, on purpose: mergekit adds the union's non-base tokens in the iteration
order of `tokenizer.get_vocab()` (a Rust HashMap: random per process) and, without a base model, takes the
tokenizer base from `list(set(models))[0]` (Python hash order), so its token ids for those tokens are not
reproducible; we use the input order and ascending ids. A token that an input's tokenizer has at an id >= n_i
makes mergekit fail with a KeyError; here it counts as absent from that input.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Union

import numpy as np
from tokenizers import AddedToken, Tokenizer

from configurable_fm.checks import is_int
from configurable_fm.errors import UserError

LOG = logging.getLogger(__name__)

# Fill kinds of an output token (VocabularyAlignment.fill_kind).
KEEP, ROW, ZERO, AVERAGE = 0, 1, 2, 3


class VocabularyError(UserError, ValueError):
    """A tokenizer configuration that cannot be built or applied; the message names the token/model/tensor."""


# ----------------------------------------------------------------------------------------------- token overrides
@dataclasses.dataclass(frozen=True)
class TokenOverride:
    """`tokens: {tok: {source: ..., force: ...}}` of mergekit's tokenizer config, for one token.

    kind: 'model' (the token's own row in `model`), 'model_token' (row `token_id`, or the id of `token` in
    `model`'s own tokenizer), 'zero', or None (no source: an error if the row is needed)."""
    kind: Optional[str]
    model: Optional[str] = None
    token: Optional[str] = None
    token_id: Optional[int] = None
    force: bool = False


def parse_token_overrides(tokens: Optional[Mapping[str, Any]]) -> dict[str, TokenOverride]:
    """Validates mergekit-style `tokens` settings ({token: {source: model | {kind: zero} | {kind: model_token,
    model, token | token_id}, force: bool}}, or TokenOverride values) into TokenOverride values."""
    out = {}
    for tok, cfg in (tokens or {}).items():
        where = f"tokens[{tok!r}]"
        if isinstance(cfg, TokenOverride):
            out[tok] = cfg
            continue
        if not isinstance(cfg, Mapping):
            raise VocabularyError(f"{where}: expected a mapping {{source: ..., force: ...}}, got {cfg!r}")
        unknown = sorted(set(cfg) - {"source", "force"})
        if unknown:
            raise VocabularyError(f"{where}: unknown key(s) {unknown} (allowed: source, force)")
        force = cfg.get("force", False)
        if not isinstance(force, bool):
            raise VocabularyError(f"{where}.force must be true or false, got {force!r}")
        src = cfg.get("source")
        if src is None:
            out[tok] = TokenOverride(None, force=force)
        elif isinstance(src, str):
            out[tok] = TokenOverride("model", model=src, force=force)
        elif isinstance(src, Mapping):
            kind = src.get("kind")
            if kind == "zero":
                if set(src) != {"kind"}:
                    raise VocabularyError(f"{where}.source: {{kind: zero}} takes no other keys, got {dict(src)}")
                out[tok] = TokenOverride("zero", force=force)
            elif kind == "model_token":
                extra = sorted(set(src) - {"kind", "model", "token", "token_id"})
                if extra:
                    raise VocabularyError(f"{where}.source: unknown key(s) {extra} for kind model_token")
                if not isinstance(src.get("model"), str):
                    raise VocabularyError(f"{where}.source: kind model_token needs a model name")
                if (src.get("token") is None) == (src.get("token_id") is None):
                    raise VocabularyError(f"{where}.source: kind model_token needs exactly one of token, token_id")
                tid = src.get("token_id")
                if tid is not None and not is_int(tid):
                    raise VocabularyError(f"{where}.source.token_id must be an integer, got {tid!r}")
                out[tok] = TokenOverride("model_token", model=src["model"], token=src.get("token"),
                                         token_id=tid, force=force)
            else:
                raise VocabularyError(f"{where}.source: kind must be 'zero' or 'model_token', got {kind!r}")
        else:
            raise VocabularyError(f"{where}.source must be a model name or a {{kind: ...}} mapping, got {src!r}")
    return out


# ----------------------------------------------------------------------------------------------- vocabularies
def _copy(tok: Tokenizer) -> Tokenizer:
    return Tokenizer.from_str(tok.to_str())


def _full_vocab(tok: Tokenizer) -> dict[str, int]:
    return tok.get_vocab(with_added_tokens=True)


def strip_unused(tok: Tokenizer, vocab_size: int, *, name: str = "base") -> Tokenizer:
    """A copy of `tok` without its tokens of id >= vocab_size (vocabulary, added tokens, BPE merges using or
    producing them).

    Returns a copy even when nothing is unused. Only BPE tokenizers can be stripped (as in mergekit)."""
    unused = {t for t, i in _full_vocab(tok).items() if i >= vocab_size}
    if not unused:
        return _copy(tok)
    d = json.loads(tok.to_str())
    if d["model"]["type"] != "BPE":
        raise VocabularyError(f"tokenizer of {name} has {len(unused)} token(s) beyond its vocab_size {vocab_size} "
                              f"and is a {d['model']['type']} tokenizer; only BPE ones can be stripped")
    d["added_tokens"] = [e for e in d["added_tokens"] if e["id"] < vocab_size]
    d["model"]["vocab"] = {t: i for t, i in d["model"]["vocab"].items() if t not in unused}

    def keep(m):  # mergekit checks the two parts only; a merge whose result is gone would make BPE panic
        parts = m.split(" ") if isinstance(m, str) else list(m)
        return not any(p in unused for p in parts + ["".join(parts)])

    d["model"]["merges"] = [m for m in d["model"]["merges"] if keep(m)]
    return Tokenizer.from_str(json.dumps(d))


def _same_settings(a: AddedToken, b: AddedToken) -> bool:
    fields = ("content", "special", "normalized", "lstrip", "rstrip", "single_word")
    return all(getattr(a, f) == getattr(b, f) for f in fields)


def _union(base: Tokenizer, others: Sequence[tuple[str, Tokenizer, int]]) -> Tokenizer:
    """The union tokenizer (module docstring, 1); `others` = [(name, tokenizer, vocab size)], the base first."""
    plain: dict[str, None] = {}
    added: dict[str, AddedToken] = {}
    for name, tok, size in others:
        decoder = tok.get_added_tokens_decoder()
        added_here = {a.content for a in decoder.values()}
        for t, i in sorted(_full_vocab(tok).items(), key=lambda kv: kv[1]):
            if i >= size:
                LOG.warning("token %r of %s has id %d >= its vocab_size %d: not used", t, name, i, size)
            elif t not in added_here:
                plain.setdefault(t, None)
        for i in sorted(decoder):
            info = decoder[i]
            if i >= size:
                continue
            if info.content in added:
                if not _same_settings(added[info.content], info):
                    LOG.warning("added token %r has different settings in %s; using the first", info.content, name)
                continue
            added[info.content] = info
    out = _copy(base)
    base_vocab = _full_vocab(base)
    for t in plain:
        if t not in added and t not in base_vocab:
            out.add_tokens([t])
    for info in added.values():
        out.add_tokens([info])
    return out


def _check_contiguous(vocab: Mapping[str, int], what: str) -> None:
    ids = sorted(vocab.values())
    if ids != list(range(len(ids))):
        missing = sorted(set(range(ids[-1] + 1)) - set(ids))[:5] if ids else []
        raise VocabularyError(f"{what}: token ids are not 0..{len(ids) - 1} (e.g. missing {missing}); cannot "
                              "index embedding rows by them")


def build_vocabulary(
    source: str,
    base_tokenizer: Tokenizer,
    tokenizers: Mapping[str, Optional[Tokenizer]],
    *,
    base_name: str = "base",
    vocab_sizes: Optional[Mapping[str, int]] = None,
    tokens: Optional[Mapping[str, Any]] = None,
    pad_to_multiple_of: Optional[int] = None,
) -> tuple[dict[str, int], Tokenizer]:
    """The output vocabulary {token: id} (ids 0..V-1) and output tokenizer, as mergekit 0.1.5 builds them.

    source: 'base', 'union' or the name of a model (`base_name` or a key of `tokenizers`).
    base_tokenizer: the tokenizer base's tokenizer (the merge base, else the first model), named `base_name`.
    tokenizers: {name: tokenizer} of the other inputs in merge order (None: the same as the base's).
    vocab_sizes: {name: n} embedding rows per input (config vocab_size); default: each tokenizer's size.
    tokens: the per-token overrides (their tokens are added when missing); pad_to_multiple_of: checked here,
    used by the alignment (the returned vocabulary is never padded: padding rows have no token).
    The inputs are never modified (the result is a new Tokenizer).
    """
    _check_pad(pad_to_multiple_of)
    overrides = parse_token_overrides(tokens)
    sizes = _sizes(base_name, base_tokenizer, tokenizers, vocab_sizes)
    stripped = strip_unused(base_tokenizer, sizes[base_name], name=base_name)
    if source == "base" or source == base_name:
        out = stripped if source == "base" else _copy(base_tokenizer)
    elif source == "union":
        others = [(base_name, stripped, sizes[base_name])]
        others += [(n, t if t is not None else stripped, sizes[n]) for n, t in tokenizers.items() if n != base_name]
        out = _union(stripped, others)
    elif source in tokenizers:
        chosen = tokenizers[source]
        out = _copy(chosen if chosen is not None else base_tokenizer)
    else:
        raise VocabularyError(f"tokenizer source {source!r} is not 'base', 'union' or a model of the merge "
                              f"({[base_name, *[n for n in tokenizers if n != base_name]]})")
    have = set(_full_vocab(out))
    for tok in overrides:
        if tok not in have:
            out.add_tokens([tok])
            have.add(tok)
    vocab = _full_vocab(out)
    _check_contiguous(vocab, f"output tokenizer (source {source!r})")
    return dict(sorted(vocab.items(), key=lambda kv: kv[1])), out


def _check_pad(pad_to_multiple_of) -> None:
    if pad_to_multiple_of is not None and (not is_int(pad_to_multiple_of) or pad_to_multiple_of < 1):
        raise VocabularyError(f"pad_to_multiple_of must be a positive integer, got {pad_to_multiple_of!r}")


def _sizes(base_name, base_tokenizer, tokenizers, vocab_sizes) -> dict[str, int]:
    vocab_sizes = dict(vocab_sizes or {})
    known = {base_name, *tokenizers}
    unknown = sorted(set(vocab_sizes) - known)
    if unknown:
        raise VocabularyError(f"vocab_sizes for unknown model(s) {unknown}; models: {sorted(known)}")
    out = {}
    for name in [base_name, *tokenizers]:
        tok = tokenizers.get(name) if name != base_name else base_tokenizer
        tok = tok if tok is not None else base_tokenizer
        out[name] = int(vocab_sizes.get(name, tok.get_vocab_size(with_added_tokens=True)))
        if out[name] < 1:
            raise VocabularyError(f"vocab size of {name} must be positive, got {out[name]}")
    return out


# ----------------------------------------------------------------------------------------------- alignment
@dataclasses.dataclass(frozen=True, eq=False)
class VocabularyAlignment:
    """How every input's vocabulary rows map into the output vocabulary (module docstring, 2 and 3).

    names: the inputs of a vocabulary tensor, in merge order; base: the merge base (or None).
    vocab: output {token: id}, V = size entries; padded_size: V' >= V rows of every aligned tensor.
    index[name]: (V,) int64, the input's row for each output id, -1 where it has none.
    input_sizes[name]: the input's vocabulary size n_i (rows of its embedding).
    force, fill_kind (KEEP/ROW/ZERO/AVERAGE), fill_model (index into names), fill_row: (V,) each, the fill
    row rule per output token (fill_row is a row of input fill_model's *own* tensor).
    """
    names: tuple[str, ...]
    base: Optional[str]
    vocab: Mapping[str, int]
    tokenizer: Tokenizer
    size: int
    padded_size: int
    index: Mapping[str, np.ndarray]
    input_sizes: Mapping[str, int]
    force: np.ndarray
    fill_kind: np.ndarray
    fill_model: np.ndarray
    fill_row: np.ndarray

    def restricted(self, names: Sequence[str], base: Optional[str], tokens: Optional[Mapping] = None, *,
                   tensor: str = "tensor") -> "VocabularyAlignment":
        """This alignment for a tensor made from only the inputs `names` (merge base `base`, or None): the same
        vocabulary and index maps, the fill rows decided over these inputs only (as mergekit, whose row rules
        see only the tensor's inputs; e.g. the first/last slice's sources): default_fill, then each override of
        `tokens` as in this alignment, its source model needed among `names`."""
        names = tuple(names)
        if names == self.names and base == self.base:
            return self
        index = {n: self.index[n] for n in names}
        kind, model, row = default_fill(names, index, base, self.force, what=tensor)
        need = ~np.stack([index[n] >= 0 for n in names]).all(0) | self.force
        for tok in tokens or {}:
            t = self.vocab[tok]
            if not need[t]:
                continue
            kind[t], model[t], row[t] = self.fill_kind[t], -1, self.fill_row[t]
            if self.fill_kind[t] == ROW:
                src = self.names[self.fill_model[t]]
                if src not in names:
                    raise VocabularyError(f"{tensor}: tokens[{tok!r}] needs a vocabulary row from model {src!r}, "
                                          f"which is not an input of this tensor ({list(names)})")
                model[t] = names.index(src)
        for a in (kind, model, row):
            a.setflags(write=False)
        return dataclasses.replace(self, names=names, base=base, index=index, fill_kind=kind, fill_model=model,
                                   fill_row=row)

    def vocab_axis(self, name: str, shape: Sequence[int], tensor: str = "tensor") -> int:
        """The single axis of `shape` whose length is input `name`'s vocabulary size."""
        n = self.input_sizes[name]
        axes = [a for a, s in enumerate(shape) if s == n]
        if len(axes) != 1:
            raise VocabularyError(f"{tensor} of {name} is {tuple(shape)}: cannot tell its vocabulary axis "
                                  f"({'no' if not axes else 'several'} axes of length {n}); pass axis=")
        return axes[0]

    def _rows(self, name: str, arrays: Mapping[str, Any], axis: Optional[int], tensor: str) -> np.ndarray:
        """Input `name`'s tensor with the vocabulary axis first, its rows checked against what is needed."""
        if name not in arrays:
            raise VocabularyError(f"{tensor}: alignment needs the tensor of {name} (given: {sorted(arrays)})")
        x = np.asarray(arrays[name])
        ax = self.vocab_axis(name, x.shape, tensor) if axis is None else axis
        if not -x.ndim <= ax < x.ndim:
            raise VocabularyError(f"{tensor} of {name} is {x.shape}: no axis {ax}")
        return np.moveaxis(x, ax, 0)

    def needed(self, name: str) -> tuple[str, ...]:
        """The inputs whose tensors `align(name, ...)` reads: `name` and the sources of its fill rows."""
        i = self.names.index(name)
        need = (self.index[name] < 0) | self.force
        kinds = self.fill_kind[need]
        used = set(self.fill_model[need][kinds == ROW].tolist())
        if (kinds == AVERAGE).any():
            used |= {j for j, nm in enumerate(self.names) if (self.index[nm][need & (self.fill_kind == AVERAGE)]
                                                              >= 0).any()}
        return tuple(self.names[j] for j in sorted(used | {i}))

    def align(self, name: str, arrays: Mapping[str, Any], *, axis: Optional[int] = None,
              tensor: str = "tensor") -> np.ndarray:
        """Input `name`'s tensor with its vocabulary axis permuted into the output vocabulary (padded_size along
        `axis`, the other axes unchanged). arrays: {input name: its tensor}; at least the inputs `needed(name)`.
        axis: the vocabulary axis (None: detected by size). dtype: numpy's promotion of the arrays read."""
        used = self.needed(name)
        rows = {nm: self._rows(nm, arrays, axis, tensor) for nm in used}
        return self._align(name, rows, used, axis if axis is not None else self.vocab_axis(
            name, np.shape(arrays[name]), tensor), tensor)

    def align_all(self, arrays: Mapping[str, Any], *, axis: Optional[int] = None,
                  tensor: str = "tensor") -> dict[str, np.ndarray]:
        """{name: align(name, arrays)} for every input (arrays must hold all of them)."""
        rows = {nm: self._rows(nm, arrays, axis, tensor) for nm in self.names}
        out = {}
        for nm in self.names:
            ax = axis if axis is not None else self.vocab_axis(nm, np.shape(arrays[nm]), tensor)
            out[nm] = self._align(nm, rows, self.names, ax, tensor)
        return out

    def _align(self, name, rows, used, axis, tensor) -> np.ndarray:
        trailing = {nm: rows[nm].shape[1:] for nm in used}
        if len(set(trailing.values())) != 1:
            raise VocabularyError(f"{tensor}: non-vocabulary dimensions differ: "
                                  + ", ".join(f"{s} in {nm}" for nm, s in trailing.items()))
        dtype = np.result_type(*[rows[nm].dtype for nm in used])
        x = rows[name]
        idx = self.index[name]
        V = self.size
        out = np.zeros((self.padded_size, *x.shape[1:]), dtype=dtype)
        own = (idx >= 0) & ~self.force
        self._check_rows(name, x, idx[own], tensor)
        out[:V][own] = x[idx[own]]
        fill = ~own
        for j in np.unique(self.fill_model[fill & (self.fill_kind == ROW)]).tolist():
            sel = fill & (self.fill_kind == ROW) & (self.fill_model == j)
            src = rows[self.names[j]]
            self._check_rows(self.names[j], src, self.fill_row[sel], tensor)
            out[:V][sel] = src[self.fill_row[sel]]
        avg = fill & (self.fill_kind == AVERAGE)
        if avg.any():
            acc = np.zeros((int(avg.sum()), *x.shape[1:]), dtype=dtype)
            count = np.zeros(int(avg.sum()), dtype=np.int64)
            for nm in self.names:  # summed in input order from zero, as mergekit
                have = self.index[nm][avg] >= 0
                if have.any():
                    acc[have] = acc[have] + rows[nm][self.index[nm][avg][have]].astype(dtype)
                    count += have
            out[:V][avg] = acc / count.reshape((-1,) + (1,) * (acc.ndim - 1)).astype(dtype)
        if self.padded_size > V:
            acc_dtype = np.float32 if np.dtype(dtype).itemsize < 4 else dtype
            out[V:] = np.mean(out[:V], axis=0, dtype=acc_dtype).astype(dtype)
        return np.moveaxis(out, 0, axis)

    @staticmethod
    def _check_rows(name, x, rows, tensor) -> None:
        if rows.size and int(rows.max()) >= x.shape[0]:
            raise VocabularyError(f"{tensor} of {name} has {x.shape[0]} vocabulary rows but row {int(rows.max())} "
                                  "is needed")


def default_fill(names: Sequence[str], index: Mapping[str, np.ndarray], base: Optional[str],
                 force: np.ndarray, *, what: str = "") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """mergekit's rows for the output tokens some input lacks (or that are forced), over the inputs `names`:
    exactly one holder -> its row (ROW); none -> ZERO (a warning); the base holds it -> the base's row; else
    AVERAGE over the holders. Tokens every input has (and not forced) stay KEEP.
    Returns (kind (V,) int8, model (V,) index into names or -1, row (V,) the holder's row or -1)."""
    present = np.stack([index[n] >= 0 for n in names])  # (N, V)
    count = present.sum(0)
    need = ~present.all(0) | force
    V = present.shape[1]
    kind = np.full(V, KEEP, dtype=np.int8)
    model = np.full(V, -1, dtype=np.int64)
    row = np.full(V, -1, dtype=np.int64)
    one = need & (count == 1)
    holder = np.argmax(present, axis=0)
    kind[one], model[one] = ROW, holder[one]
    row[one] = np.stack([index[n] for n in names])[holder[one], np.flatnonzero(one)]
    none = need & (count == 0)
    kind[none] = ZERO
    if none.any():
        LOG.warning("%s%d token(s) are in none of the inputs %s: zero rows", f"{what}: " if what else "",
                    int(none.sum()), list(names))
    many = need & (count >= 2)
    kind[many] = AVERAGE
    if base is not None and base in names:
        from_base = many & (index[base] >= 0)
        kind[from_base], model[from_base], row[from_base] = ROW, list(names).index(base), index[base][from_base]
    return kind, model, row


def vocabulary_alignment(
    source: str,
    tokenizers: Mapping[str, Optional[Tokenizer]],
    *,
    base: Optional[str],
    vocab_sizes: Optional[Mapping[str, int]] = None,
    tokens: Optional[Mapping[str, Any]] = None,
    pad_to_multiple_of: Optional[int] = None,
) -> VocabularyAlignment:
    """The alignment of the inputs `tokenizers` ({name: tokenizer or None = same as the tokenizer base's}, in
    merge order; the merge base among them, named `base`, or base=None for methods without one).

    The tokenizer base is `base`, else the first input. source: 'base' | 'union' | an input's name.
    vocab_sizes: {name: embedding rows} (default: each tokenizer's size); tokens: per-token overrides
    (parse_token_overrides); pad_to_multiple_of: pad the output rows to a multiple of it.
    Raises VocabularyError naming the token/model for overrides that cannot be applied.
    """
    names = tuple(tokenizers)
    if not names:
        raise VocabularyError("vocabulary alignment needs at least one input")
    if base is not None and base not in tokenizers:
        raise VocabularyError(f"merge base {base!r} is not among the inputs {list(names)}")
    tok_base = base if base is not None else names[0]
    if tokenizers[tok_base] is None:
        raise VocabularyError(f"the tokenizer base {tok_base!r} needs a tokenizer")
    _check_pad(pad_to_multiple_of)
    overrides = parse_token_overrides(tokens)
    others = {n: t for n, t in tokenizers.items() if n != tok_base}
    sizes = _sizes(tok_base, tokenizers[tok_base], others, vocab_sizes)
    vocab, out_tok = build_vocabulary(source, tokenizers[tok_base], others, base_name=tok_base,
                                      vocab_sizes=sizes, tokens=overrides)
    stripped = strip_unused(tokenizers[tok_base], sizes[tok_base], name=tok_base)
    own_vocab = {n: _full_vocab(stripped if n == tok_base or tokenizers[n] is None else tokenizers[n])
                 for n in names}
    V = len(vocab)
    toks = list(vocab)  # id order
    index = {}
    for n in names:
        ids = np.array([own_vocab[n].get(t, -1) for t in toks], dtype=np.int64)
        unused = ids >= sizes[n]
        if unused.any():
            LOG.warning("%s: %d token(s) have ids >= its vocab_size %d; treated as absent", n, int(unused.sum()),
                        sizes[n])
        ids[unused] = -1
        ids.setflags(write=False)
        index[n] = ids
    force = np.zeros(V, dtype=bool)
    for t, cfg in overrides.items():
        force[vocab[t]] = cfg.force
    kind, model, row = default_fill(names, index, base, force)
    present_all = np.stack([index[n] >= 0 for n in names]).all(0)
    for t, cfg in overrides.items():
        t_id = vocab[t]
        if cfg.force or not present_all[t_id]:  # else every input has it and nothing is forced: no fill row
            kind[t_id], model[t_id], row[t_id] = _override_fill(t, cfg, names, index, own_vocab, t_id)
    padded = V if not pad_to_multiple_of else math.ceil(V / pad_to_multiple_of) * pad_to_multiple_of
    for a in (force, kind, model, row):
        a.setflags(write=False)
    return VocabularyAlignment(names=names, base=base, vocab=vocab, tokenizer=out_tok, size=V, padded_size=padded,
                               index=index, input_sizes=sizes, force=force, fill_kind=kind, fill_model=model,
                               fill_row=row)


def _override_fill(t, cfg: TokenOverride, names, index, own_vocab, t_id):
    where = f"tokens[{t!r}]"
    if cfg.kind == "zero":
        return ZERO, -1, -1
    if cfg.kind is None:
        raise VocabularyError(f"{where}: a row is needed (forced or missing in some input) but no source is given")
    if cfg.model not in names:
        raise VocabularyError(f"{where} needs a vocabulary row from model {cfg.model!r}, which is not an input "
                              f"of the merge ({list(names)})")
    j = names.index(cfg.model)
    if cfg.kind == "model":
        r = index[cfg.model][t_id]
        if r < 0:
            raise VocabularyError(f"{where}: token {t!r} is not in model {cfg.model!r}")
        return ROW, j, r
    if cfg.token_id is not None:
        if cfg.token_id < 0:
            raise VocabularyError(f"{where}: token_id {cfg.token_id} is negative")
        return ROW, j, cfg.token_id
    if cfg.token not in own_vocab[cfg.model]:
        raise VocabularyError(f"{where}: token {cfg.token!r} is not in the tokenizer of {cfg.model!r}")
    return ROW, j, own_vocab[cfg.model][cfg.token]


def vocab_axis_of_path(path: str, ndim: int) -> int:
    """The vocabulary axis of a tensor by our naming rule: a Linear kernel `*.kernel` (D, V) -> the last axis;
    embeddings and HF tensors (`*.embedding`, `*.weight`: (V, D)) -> 0."""
    return ndim - 1 if path.endswith("kernel") else 0


# ----------------------------------------------------------------------------------------------- checkpoints
def _config_vocab_size(model_dir: Path) -> Optional[int]:
    cfg_path = model_dir / "config.json"
    if not cfg_path.is_file():
        return None
    with open(cfg_path) as f:
        cfg = json.load(f)
    for c in (cfg, cfg.get("text_config") or {}):
        if isinstance(c.get("vocab_size"), int):
            return c["vocab_size"]
    return None


def alignment_for_checkpoints(
    source: str,
    base_dir: Optional[Union[str, os.PathLike]],
    model_dirs: Union[Mapping[str, Union[str, os.PathLike]], Sequence[Union[str, os.PathLike]]],
    *,
    base_name: str = "base",
    tokens: Optional[Mapping[str, Any]] = None,
    pad_to_multiple_of: Optional[int] = None,
) -> VocabularyAlignment:
    """The alignment of HF checkpoint directories (each with tokenizer.json and config.json's vocab_size).

    model_dirs: {name: dir} in the merge's `models:` order without the base (a sequence: named by their
    directory names); base_dir: the merge base (None for methods without one: the first model is the tokenizer
    base). The input order is mergekit's: the models, then the base. A model without tokenizer.json is taken to
    share the base's tokenizer (a warning, as mergekit). Names in `tokens` and `source` refer to these names.
    Per tensor: `alignment.align_all({name: tensor}, axis=0)` (HF layout), or `align(name, ...)` per input.
    """
    from configurable_fm.interop.tokenizers import load_tokenizer

    if not isinstance(model_dirs, Mapping):
        model_dirs = {Path(d).name: d for d in model_dirs}
    dirs = {str(n): Path(d) for n, d in model_dirs.items()}
    if base_dir is not None:
        if base_name in dirs:
            raise VocabularyError(f"model name {base_name!r} is used both for the base and a model")
        dirs[base_name] = Path(base_dir)
    tokenizers: dict[str, Optional[Tokenizer]] = {}
    sizes = {}
    for n, d in dirs.items():
        if not d.is_dir():
            raise VocabularyError(f"{n}: {d} is not a directory")
        if (d / "tokenizer.json").is_file():
            tokenizers[n] = load_tokenizer(d)
        else:
            LOG.warning("%s: no tokenizer.json in %s; assuming the base's tokenizer", n, d)
            tokenizers[n] = None
        size = _config_vocab_size(d)
        if size is not None:
            sizes[n] = size
    tok_base = base_name if base_dir is not None else next(iter(dirs))
    for n in tokenizers:
        if tokenizers[n] is None and n not in sizes:
            sizes[n] = sizes.get(tok_base, tokenizers[tok_base].get_vocab_size(with_added_tokens=True)
                                 if tokenizers[tok_base] is not None else 0)
    return vocabulary_alignment(source, tokenizers, base=base_name if base_dir is not None else None,
                                vocab_sizes=sizes, tokens=tokens, pad_to_multiple_of=pad_to_multiple_of)
