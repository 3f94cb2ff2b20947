"""Prompt tuning and prefix tuning as bricks: learned virtual tokens before every input.

    m = attach_virtual_tokens(base, "prompt", 20, init="text", init_ids=tok.encode("Classify the review:").ids)
    m = attach_virtual_tokens(base, "prefix", 10, seed=0)
    m(ids_BxT); generate(m, ids_BxT, max_new_tokens=8)       # a decoder: the real tokens' logits; generation
    m(ids_BxT, attention_mask=mask)                           # a Bert: the real tokens' hidden states
    detach(m)                                                 # the base back (bricks.adapters.detach)
    to_peft(m, "out/prompt"); from_peft(base, "out/prompt")   # PEFT's PROMPT_TUNING / PREFIX_TUNING

The model is a models.virtual_tokens.VirtualTokens (its docstring has the math: for a causal decoder a KV cache
prefilled with the P virtual tokens, for a Bert PEFT's prompt / prefix on BertModel). Initial values, as PEFT's
(P virtual tokens, D hidden size; prefix: L layers, K key-value heads (a Bert's attention heads), H head dim):
    prompt  'random'  N(0, 1) entries, (P, D)                 (PEFT's RANDOM: torch.nn.Embedding's default)
            'vocab'   rows of the token embedding at P token ids drawn uniformly (PEFT's SAMPLE_VOCAB)
            'text'    the embeddings of `init_ids` (a tokenised text), repeated and cut to P (PEFT's TEXT)
    prefix  'random'  N(0, 1) entries, (P, L, 2, K, H)        (PEFT's PrefixEncoder embedding, no projection)
            'zeros'   zeros (PEFT's init_weights='zero')
Random values use `path_key(seed, kind, 'init')`: reproducible, independent of call order.
"""
from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from configurable_fm.bricks.adapters.core import path_key
from configurable_fm.bricks.adapters.modules import AdapterError
from configurable_fm.checks import is_int
from configurable_fm.interop.peft import virtual_token_geometry
from configurable_fm.models.bert import Bert
from configurable_fm.models.virtual_tokens import KINDS, VirtualTokens, with_virtual_tokens

INITS = {"prompt": ("random", "vocab", "text"), "prefix": ("random", "zeros")}


def _token_embedding(model) -> jax.Array:
    if isinstance(model, Bert):
        return model.embeddings.word_embeddings.embedding[...]
    for name in ("embed_tokens", "wte"):
        module = getattr(model, name, None)
        if module is not None:
            return module.embedding[...]
    raise AdapterError(f"prompt tuning's 'vocab' / 'text' init needs the token embedding (embed_tokens, wte or a "
                       f"Bert's embeddings.word_embeddings); {type(model).__name__} has none")


def attach_virtual_tokens(model, kind: str, num_virtual_tokens: int, *, init: str = "random",
                          init_ids: Sequence[int] | None = None, seed: int = 0) -> VirtualTokens:
    """`model` preceded by `num_virtual_tokens` learned virtual tokens: kind 'prompt' (prompt tuning) or 'prefix'
    (prefix tuning); init as in the module docstring. `model` (a causal decoder or a Bert) is untouched (its arrays
    are shared). AdapterError for a bad kind, count, init or init_ids, or a model that is neither."""
    if kind not in KINDS:
        raise AdapterError(f"virtual tokens: kind must be one of {list(KINDS)}, got {kind!r}")
    if not is_int(num_virtual_tokens) or num_virtual_tokens < 1:
        raise AdapterError(f"virtual tokens: num_virtual_tokens must be an int >= 1, got {num_virtual_tokens!r}")
    if init not in INITS[kind]:
        raise AdapterError(f"{kind} tuning: init must be one of {list(INITS[kind])}, got {init!r}")
    if isinstance(model, VirtualTokens):
        raise AdapterError("virtual tokens: the model has virtual tokens already (detach them first)")
    try:
        g = virtual_token_geometry(model)
    except Exception as e:  # noqa: BLE001: UnsupportedModel, or a model without a cache interface
        raise AdapterError(f"virtual tokens: {e}") from None
    p = int(num_virtual_tokens)
    key = path_key(seed, kind, "init")
    if kind == "prefix":
        shape = (p, g["layers"], 2, g["kv_heads"], g["head_dim"])
        values = jnp.zeros(shape, jnp.float32) if init == "zeros" else jax.random.normal(key, shape, jnp.float32)
    elif init == "random":
        values = jax.random.normal(key, (p, g["hidden"]), jnp.float32)
    else:
        table = _token_embedding(model)
        if init == "vocab":
            ids = jax.random.randint(key, (p,), 0, table.shape[0])
        else:
            if init_ids is None or len(init_ids) == 0:
                raise AdapterError("prompt tuning: init='text' needs init_ids, the token ids of the text")
            ids = np.asarray(list(init_ids), np.int64)
            if ids.min() < 0 or ids.max() >= table.shape[0]:
                raise AdapterError(f"prompt tuning: init_ids must lie in [0, {table.shape[0]}), got {ids.min()}.."
                                   f"{ids.max()}")
            ids = np.tile(ids, -(-p // len(ids)))[:p]
        values = jnp.asarray(table)[jnp.asarray(ids)].astype(jnp.float32)
    return with_virtual_tokens(model, kind, values)
