"""Byte-level BPE tokenizers trained on a dataset's own training documents (for studies that want a small
vocabulary: at 20-80M parameters a 49152-word head is half of every step's FLOPs).

    tok = train_bpe(texts, vocab_size=8192)          # tokenizers.Tokenizer; id 0 = '<|endoftext|>'
    spec = parse_bpe_spec("bpe:8192")                # 8192, or None for any other tokenizer spec

A dataset config with `tokenizer = 'bpe:<vocab_size>'` (data/shards.build_dataset) trains one on (at most
`BPE_TRAIN_CHARS` characters of) its training split, in split order, and stores it as DIR/tokenizer.json; the
validation split never contributes. The model is GPT-2's byte-level BPE (every byte sequence is encodable, no
unknown token) without added prefix spaces; the special tokens come first, so '<|endoftext|>' is id 0 (the
datasets' default eos_id). Training is deterministic: the same texts in the same order give the same JSON
(tokenizers' BPE trainer breaks frequency ties by the pair's bytes); a test checks it.
"""
from __future__ import annotations

import re
from typing import Iterable, Sequence

SPECIAL_TOKENS = ("<|endoftext|>",)
BPE_TRAIN_CHARS = 200_000_000  # characters of training text the merges are learnt from (the rest is only encoded)
_SPEC = re.compile(r"bpe:(\d+)")


def parse_bpe_spec(spec: str) -> int | None:
    """The vocabulary size of a 'bpe:<n>' tokenizer spec; None for any other spec. ValueError for n < 512."""
    m = _SPEC.fullmatch(str(spec).strip())
    if m is None:
        return None
    n = int(m.group(1))
    if n < 512:
        raise ValueError(f"tokenizer {spec!r}: a byte-level BPE needs a vocabulary of at least 512 "
                         "(256 byte symbols + merges)")
    return n


def limited(texts: Iterable[str], max_chars: int) -> Iterable[str]:
    """The texts in order until `max_chars` characters have been yielded (the last one cut)."""
    left = int(max_chars)
    for t in texts:
        if left <= 0:
            return
        yield t[:left]
        left -= len(t)


def train_bpe(texts: Iterable[str], vocab_size: int, *, special_tokens: Sequence[str] = SPECIAL_TOKENS,
              min_frequency: int = 2, max_chars: int = BPE_TRAIN_CHARS):
    """A byte-level BPE `tokenizers.Tokenizer` with `vocab_size` entries (special tokens included, first) learnt
    from `texts` (at most `max_chars` characters). Decoding inverts encoding for any text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=int(vocab_size), min_frequency=int(min_frequency),
                                  special_tokens=list(special_tokens), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(limited(texts, max_chars), trainer=trainer)
    return tok
