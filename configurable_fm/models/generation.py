"""Autoregressive generation with a KV cache, compiled into one XLA program.

    out_BxL = generate(model, ids_BxT, max_new_tokens=32)                                     # greedy
    out_BxL = generate(model, ids_BxT, max_new_tokens=32, temperature=0.8, top_p=0.95,
                       rng=jax.random.key(0), eos_token_id=2)                                   # nucleus sampling
    gen = Generator(model); out_BxL = gen(ids_BxT, max_new_tokens=32)     # split once, call many times
    text = generate_text(model, chat_tokenizer, "What is the capital of France?")   # chat template, stops at eos

Any causal LM with Llama's interface works: `model(ids_BxT, attention_mask=, positions=, cache=)` returns
(logits (B, T, V), new cache) when given a cache, and `model.init_cache(batch, max_len)` makes an empty one.
Family models (llama, gpt2) are first checked against their config (`models.structure.check_consistent`), since
`init_cache` sizes the cache from it.

Batches are left-padded: row b's prompt is `ids[b][mask[b] == 1]`, right-aligned, and its positions are
`cumsum(mask) - 1` (as transformers computes them), so a padded row generates what its prompt alone would.

Program (L = T + max_new_tokens): `nnx.split` the model outside (once per `Generator`); inside one `jax.jit`
merge it, prefill the prompt into a cache of L slots (padding slots' ids read as 0, masked whatever they held),
choose the first new token from the last logits, then a
`lax.while_loop` feeds one token per step until max_new_tokens tokens or every row has emitted an eos; after its
eos a row emits `pad_token_id`. Static (one compilation each): the graphdef, the shapes, max_new_tokens, greedy
or sampling, and how many logits sampling ranks (below).
A model whose weights sit on one device is traced inside `models.layers.fuse_projections()`: llama layers run
q/k/v and gate/up as one matmul each (`fused_linears`; plain Linears only, an adapter keeps its own call), and XLA
hoists the concatenated kernels out of the loop (seen in the CPU program), so one more copy of them (52% of the
weights at the SmolLM2-135M shape, 59% at the 1B shape) lives while the program runs. Weights split over devices
keep the projections apart. Such a model is also traced inside `models.one_token.one_token_matmuls()` (unless
`Generator(model, one_token=False)`): on a GPU, one-row products with mid-sized kernels (batch-1 decode's q/k/v
and o projections at the 1B shape, every projection at 135M) run as split-K Pallas kernels instead of XLA's
reduction kernels: the 1B shape's batch-1 step 1.415 -> 1.123 ms on an H100, the 135M shape's 1.008 -> 0.867 ms
(BENCHMARKS.md, "One-token kernels"). Elsewhere, and for batches of several rows, it changes nothing.
With them (`OneTokenMatmuls.layers`, on by default) each plain llama decoder layer of a batch-1 step whose
kernels are below XLA's 10M-element bound runs as five kernels instead of ~14 (models/one_token_layer.py: norms,
RoPE, the cache write, attention and SwiGLU in the products' prologues; the attention split over cache blocks; the
residual sums as atomic adds into a float32 stream): the 135M shape's step 0.866 -> 0.794 ms on an H200, since then
0.652 ms (0.660 ms with 1,024 new tokens), and 0.658 -> 0.637 ms on an H100 with the atomic residual (BENCHMARKS.md,
"One-token decoder layers"); `OneTokenMatmuls(layers=False)` keeps the products alone, `residual_atomic=False` the
bit-reproducible residual sums.
Cache windows (`Generator(model, cache_window=w)`, default 512): a step's attention need not read the slots not
yet written, so the decode loop runs as one loop per window of the cache, over its first T + w, T + 2w, T + 4w,
... slots and finally all of it (`attention.cache_prefix` / `put_prefix`); each step attends over its window only.
Up to w new tokens this is the single loop of before; past it the average step reads about a third less of the
cache than the whole (at most twice the filled part), for one more compiled loop body per doubling (135M, 2048
new tokens, CPU: compiled in 8.7 s against 3.8 s for one loop). The masked slots contribute exact zeros, so the
tokens are the same (a test compares them). 0 turns it off.
Streaming (`Generator.stream`, `stream_text`): the same program with an ordered io_callback that hands the new
tokens to the host every `chunk` steps while the device goes on (no round trip per chunk: a program per chunk
re-ran the fused projections' concatenation each time, 260 ms per chunk at 135M on the 2-core CPU).
Traced (no recompilation): the weights, temperature, top_k (within its bucket, below), top_p, up to 8 eos ids,
pad_token_id, the key.

Token choice from the logits z (V,) of one row, in float32:
    greedy (temperature == 0):  argmax z
    sampling:  z <- z / temperature
               top_k:  z_v <- -inf unless z_v is among the k largest
               top_p:  sort descending; keep v when the probability mass ranked above it is < top_p
                       (the smallest set of most probable tokens whose mass reaches top_p)
               v ~ softmax(z), with key fold_in(rng, step)
This is the order of transformers' logits warpers (temperature, top-k, top-p). Tokens tied with the last kept
logit are kept too.

Only as many logits are ranked as the filters need (`candidates`, static): none without top_k and top_p;
the C = max(64, 2^ceil(log2 k)) largest (`top_values`: through the maxima of groups of 16 logits on GPUs;
C < V) with top_k = k, since top-p then acts on the k
kept tokens only; the whole sorted row for top_p alone. The kept set is the same as with a full sort (top-p's
normaliser sums every logit >= the k-th over the whole row, ties ranked past C included), so the same key draws
the same token. Programs: greedy, unfiltered sampling, one per C bucket, top_p alone.
"""
from __future__ import annotations

import contextlib
import functools
import itertools
import queue
import warnings
from typing import Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import io_callback

from configurable_fm.checks import is_int
import configurable_fm.models.attention as attn
from configurable_fm.models.layers import fuse_projections
from configurable_fm.models.one_token import OneTokenMatmuls, one_token_matmuls
from configurable_fm.models.structure import check_consistent, is_family_model

MIN_CANDIDATES = 64  # the smallest top_k bucket: top_k <= 64 shares one program
RANK_ALL = np.iinfo(np.int32).max  # `candidates` for top_p alone: sort the whole row
TOP_K_GROUP = 16  # top_values' group size on GPUs (bench_sampling.py --groups: 8-128 within noise of each other)


def default_group() -> int:
    """top_values' group size on the default backend: TOP_K_GROUP on GPUs, 0 (one lax.top_k) elsewhere, where
    XLA:CPU's top_k is a partial sort that the group maxima do not speed up (bench_sampling.py, BENCHMARKS)."""
    return TOP_K_GROUP if jax.default_backend() == "gpu" else 0


def top_values(z_BxV, c: int, group: int | None = None):
    """The c largest values of each row, descending, through the row's group maxima: (..., V) -> (..., c);
    exactly `lax.top_k(z, c)[0]`.

    The row in n = ceil(V / group) groups of `group` logits (the last padded with -inf); M = each group's max
    (..., n); the c groups of largest M gathered (..., c * group); their top c. Exact: the c largest M are c
    values of the row, so the row's c-th largest value v_c >= the c-th largest M, and every value >= v_c lies in a
    group whose max is >= v_c, one of the c gathered (a group tied with the c-th M and left out holds nothing
    above the c values already gathered). One reduction and two short top_k (over n and over c * group) instead
    of one over V, which a GPU runs in one block per row. One `lax.top_k` unless group > 0, n > c and
    c * group < V. group None: `default_group()`.
    """
    v = z_BxV.shape[-1]
    group = default_group() if group is None else group
    n = -(-v // group) if group > 0 else 0
    if n <= c or c * group >= v:
        return jax.lax.top_k(z_BxV, c)[0]
    lead = z_BxV.shape[:-1]
    padded = jnp.pad(z_BxV, [(0, 0)] * len(lead) + [(0, n * group - v)], constant_values=-jnp.inf)
    groups = padded.reshape(*lead, n, group)
    chosen = jax.lax.top_k(jnp.max(groups, axis=-1), c)[1]
    gathered = jnp.take_along_axis(groups, chosen[..., None], axis=-2)
    return jax.lax.top_k(gathered.reshape(*lead, c * group), c)[0]


def sampling_candidates(top_k: int | None, top_p: float | None) -> int:
    """How many of the largest logits sampling must rank (static; 0: none, RANK_ALL: all): see the module
    docstring. top_k <= 64 -> 64, else the next power of two; the model's V caps it at trace time."""
    if top_k is not None:
        return max(MIN_CANDIDATES, 1 << (int(top_k) - 1).bit_length())
    return 0 if top_p is None or top_p >= 1 else RANK_ALL


def choose_tokens(logits_BxV, key, temperature, top_k, top_p, *, greedy: bool, candidates: int = RANK_ALL,
                  group: int | None = None):
    """One token per row (B,) int32 from float logits (B, V); see the module docstring.

    temperature, top_k (1..V; V keeps all) and top_p ((0, 1]; 1 keeps all) are traced scalars, so every
    sampling configuration with the same `candidates` (sampling_candidates; top_k <= candidates) shares one
    compiled program. `group` (static) is top_values' group size (None: the backend's default; 0: one top_k).
    """
    z = logits_BxV.astype(jnp.float32)
    if greedy:
        return jnp.argmax(z, axis=-1).astype(jnp.int32)
    z = z / temperature
    if candidates > 0:
        c = min(candidates, z.shape[-1])
        ranked_BxC = -jnp.sort(-z, axis=-1) if c == z.shape[-1] else top_values(z, c, group)
        # The k-th largest as a masked min, not a dynamic slice: XLA:CPU folds a slice of top_k's result into its
        # sort, and then sorts the whole row again (8.5 ms instead of 0.1 at V = 49,152).
        rank_C = jnp.arange(c)
        kth_Bx1 = jnp.min(jnp.where(rank_C < top_k, ranked_BxC, jnp.inf), axis=-1, keepdims=True)
        in_top_k = ranked_BxC >= kth_Bx1
        # Renormalised over the top k: every logit >= the k-th, ties ranked past C included (so the kept set is
        # the full sort's exactly).
        max_Bx1 = jnp.max(ranked_BxC, axis=-1, keepdims=True)
        norm_Bx1 = jnp.sum(jnp.where(z >= kth_Bx1, jnp.exp(z - max_Bx1), 0.0), axis=-1, keepdims=True)
        probs = jnp.where(in_top_k, jnp.exp(ranked_BxC - max_Bx1), 0.0) / norm_Bx1
        mass_above = jnp.cumsum(probs, axis=-1) - probs
        # The most probable token always stays (the mass above it is 0).
        keep = in_top_k & ((mass_above < top_p) | (top_p >= 1))
        threshold_Bx1 = jnp.min(jnp.where(keep, ranked_BxC, jnp.inf), axis=-1, keepdims=True)
        z = jnp.where(z < threshold_Bx1, -jnp.inf, z)
    return jax.random.categorical(key, z, axis=-1).astype(jnp.int32)


def on_one_device(state) -> bool:
    """Whether every jax array of `state` lives on one common device (host values count as none; traced values,
    whose placement is unknown, make it False)."""
    devices = set()
    for leaf in jax.tree.leaves(state):
        if isinstance(leaf, jax.core.Tracer):
            return False
        sharding = getattr(leaf, "sharding", None)
        if sharding is not None:
            devices |= set(sharding.device_set)
    return len(devices) <= 1


class _Decoding:
    """The traced pieces of a generate program, shared by the call's and the stream's programs (`_decoding` builds
    it inside the jitted function): the model merged from its state, the token choice with its traced sampling
    arguments.
    carry = (step, last token (B,), next position (B,), cache, done (B,), new tokens so far (B, max_new_tokens))."""

    def __init__(self, state, rng, temperature, top_k, top_p, eos_E, pad_id, *, graphdef, greedy: bool,
                 candidates: int, window: int = 0):
        self.model = nnx.merge(graphdef, state)
        self.window = window  # the decode loop's first cache window, in new tokens (module docstring); 0: none
        self.rng, self.eos_E, self.pad_id = rng, eos_E, pad_id
        self.choose = functools.partial(choose_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                                        greedy=greedy, candidates=candidates)

    def is_eos(self, tok_B):
        return jnp.any(tok_B[:, None] == self.eos_E[None, :], axis=-1)

    def start(self, ids_BxT, mask_BxT, max_new_tokens: int):
        """Prefill the prompt into a cache of T + max_new_tokens slots and choose the first new token. Padding
        slots are read as id 0: masked out, but an id past the embedding table would read NaN there, and 0 weights
        times NaN values would poison the row."""
        b, t = ids_BxT.shape
        cache = self.model.init_cache(b, t + max_new_tokens)
        ids_BxT = jnp.where(mask_BxT != 0, ids_BxT, 0)
        positions_BxT = jnp.maximum(jnp.cumsum(mask_BxT, axis=1) - 1, 0)  # padding slots get position 0
        logits, cache = self.model(ids_BxT, attention_mask=mask_BxT, positions=positions_BxT, cache=cache)
        tok_B = self.choose(logits[:, -1], jax.random.fold_in(self.rng, 0))
        out_BxN = jnp.full((b, max_new_tokens), self.pad_id, jnp.int32).at[:, 0].set(tok_B)
        return jnp.int32(1), tok_B, positions_BxT[:, -1] + 1, cache, self.is_eos(tok_B), out_BxN

    def windows(self, prompt_slots: int, max_len: int) -> list[int]:
        """The decode loop's cache windows, in slots: T + w, T + 2w, T + 4w, ... below max_len, then max_len (T =
        prompt_slots: the slots written before the loop)."""
        if not self.window:
            return [max_len]
        ends, size = [], self.window
        while prompt_slots + size < max_len:
            ends.append(prompt_slots + size)
            size *= 2
        return ends + [max_len]

    def decode(self, carry, stop, after_step=None):
        """One token per step while step < stop and some row has not emitted an eos; after_step(carry) -> carry
        runs at the end of each step (the streamed program's hand-over). With a window, one loop per cache window
        (`windows`): the steps whose slots lie below a window's end attend over that window only. A model whose
        cache is not a KVCache decodes in one loop."""
        cache, out_BxN = carry[3], carry[5]
        if not isinstance(cache, attn.KVCache):
            return self._loop(carry, stop, after_step)
        # slots written before the loop: the prompt's, after any a model puts first (virtual tokens)
        prompt_slots = cache.max_len - out_BxN.shape[1]
        for end in self.windows(prompt_slots, cache.max_len)[:-1]:  # the last is the whole cache: the final loop's
            # step s writes slot T + s - 1 (the prefill wrote T slots and the first token is step 0's)
            carry = carry[:3] + (attn.cache_prefix(cache, end),) + carry[4:]
            carry = self._loop(carry, jnp.minimum(stop, end - prompt_slots + 1), after_step)
            cache = attn.put_prefix(cache, carry[3])
            carry = carry[:3] + (cache,) + carry[4:]
        return self._loop(carry, stop, after_step)

    def _loop(self, carry, stop, after_step):
        def cond(carry):
            step, _, _, _, done_B, _ = carry
            return (step < stop) & ~jnp.all(done_B)

        def body(carry):
            step, tok_B, pos_B, cache, done_B, out_BxN = carry
            logits, cache = self.model(tok_B[:, None], positions=pos_B[:, None], cache=cache)
            tok_B = self.choose(logits[:, -1], jax.random.fold_in(self.rng, step))
            emitted_B = jnp.where(done_B, self.pad_id, tok_B)
            out_BxN = jax.lax.dynamic_update_slice(out_BxN, emitted_B[:, None], (0, step))
            # A finished row keeps decoding its own (ignored) tokens: rows never interact.
            carry = step + 1, tok_B, pos_B + 1, cache, done_B | self.is_eos(emitted_B), out_BxN
            return carry if after_step is None else after_step(carry)

        return jax.lax.while_loop(cond, body, carry)


@contextlib.contextmanager
def _decoding(state, rng, temperature, top_k, top_p, eos_E, pad_id, *, graphdef, greedy: bool, candidates: int,
              fuse: bool, one_token: bool | OneTokenMatmuls, window: int) -> Iterator[_Decoding]:
    """A `_Decoding` traced inside fuse_projections(fuse) and one_token_matmuls(...): both are read while tracing,
    so the whole program, loop body included, is traced inside them."""
    options = one_token if isinstance(one_token, OneTokenMatmuls) else None
    with fuse_projections(fuse), one_token_matmuls(bool(one_token), options):
        yield _Decoding(state, rng, temperature, top_k, top_p, eos_E, pad_id, graphdef=graphdef, greedy=greedy,
                        candidates=candidates, window=window)


_STATIC = ("graphdef", "max_new_tokens", "greedy", "candidates", "fuse", "one_token", "window")


@functools.partial(jax.jit, static_argnames=_STATIC)
def _generate(state, ids_BxT, mask_BxT, rng, temperature, top_k, top_p, eos_E, pad_id, *, graphdef,
              max_new_tokens: int, greedy: bool, candidates: int, fuse: bool,
              one_token: bool | OneTokenMatmuls = False, window: int = 0):
    with _decoding(state, rng, temperature, top_k, top_p, eos_E, pad_id, graphdef=graphdef, greedy=greedy,
                   candidates=candidates, fuse=fuse, one_token=one_token, window=window) as run:
        out_BxN = run.decode(run.start(ids_BxT, mask_BxT, max_new_tokens), max_new_tokens)[-1]
        return jnp.concatenate([ids_BxT, out_BxN], axis=1)


_STREAMS: dict[int, queue.Queue] = {}  # Generator.stream's open streams by id: what `_emit` feeds
_STREAM_IDS = itertools.count()


def _emit(stream_id, step, out_BxN, done_B) -> None:
    """Host side of a streamed program's callback: the new tokens so far (the first `step` columns of out)."""
    stream = _STREAMS.get(int(stream_id))
    if stream is not None:  # a stream abandoned by its reader is gone: the program finishes unheard
        stream.put((int(step), np.array(out_BxN), bool(np.all(done_B))))


@functools.partial(jax.jit, static_argnames=_STATIC)
def _generate_streamed(state, ids_BxT, mask_BxT, rng, temperature, top_k, top_p, eos_E, pad_id, stream_id, chunk, *,
                       graphdef, max_new_tokens: int, greedy: bool, candidates: int, fuse: bool,
                       one_token: bool | OneTokenMatmuls = False, window: int = 0):
    """`_generate` that also hands the new tokens to the host (`_emit`, an ordered io_callback) after the first
    token and whenever the step count reaches a multiple of `chunk` (traced), the end, or every row's eos."""
    with _decoding(state, rng, temperature, top_k, top_p, eos_E, pad_id, graphdef=graphdef, greedy=greedy,
                   candidates=candidates, fuse=fuse, one_token=one_token, window=window) as run:
        def emit(carry):
            step, _, _, _, done_B, out_BxN = carry
            io_callback(_emit, None, stream_id, step, out_BxN, done_B, ordered=True)

        def emit_when_due(carry):
            step, done_B = carry[0], carry[4]
            due = (step % chunk == 0) | (step >= max_new_tokens) | jnp.all(done_B)
            jax.lax.cond(due, emit, lambda carry: None, carry)
            return carry

        carry = run.start(ids_BxT, mask_BxT, max_new_tokens)
        emit(carry)
        out_BxN = run.decode(carry, max_new_tokens, after_step=emit_when_due)[-1]
        return jnp.concatenate([ids_BxT, out_BxN], axis=1)


def _concrete(x) -> np.ndarray | None:
    """x as a numpy array, None when it is traced (its values unknown)."""
    try:
        return np.asarray(x)
    except jax.errors.TracerArrayConversionError:
        return None


def _check_left_padded(mask: np.ndarray) -> None:
    if np.any(mask[:, -1] == 0):
        rows = np.flatnonzero(mask[:, -1] == 0).tolist()
        raise ValueError(f"attention_mask rows {rows} end in padding: generate needs left padding "
                         "(padding first, then the prompt, ending in a real token)")
    if np.any(np.diff(mask, axis=1) < 0):
        rows = np.flatnonzero(np.any(np.diff(mask, axis=1) < 0, axis=1)).tolist()
        raise ValueError(f"attention_mask rows {rows} have padding inside the prompt: generate needs left padding")


class Generator:
    """`generate` bound to one model: the model is split once, so repeated calls skip the graph traversal.

        gen = Generator(model)
        out_BxL = gen(ids_BxT, max_new_tokens=32)          # the arguments of `generate`, less the model

    The generator holds the weights the model had when it was made (later in-place changes to the model do not
    reach it: make a new one). Calls with the same shapes, max_new_tokens and greedy/sampling reuse one compiled
    program.
    """

    def __init__(self, model: nnx.Module, *, one_token: bool | OneTokenMatmuls | None = None,
                 cache_window: int = 512):
        if not callable(getattr(model, "init_cache", None)):
            raise TypeError(f"generate needs a causal LM with init_cache(batch, max_len); "
                            f"{type(model).__name__} has none")
        if is_family_model(model):
            check_consistent(model, "generate")
        # the prompt ids' bound (a family model's config; None: unchecked)
        self.vocab_size = int(model.cfg.vocab_size) if is_family_model(model) else None
        # a rotary model's trained context (positions past it extrapolate: warned, as transformers does; a model
        # with learned positions refuses them itself)
        self.context = (int(model.cfg.max_position_embeddings) if is_family_model(model)
                        and getattr(model.cfg, "rope_theta", None) is not None else None)
        self.graphdef, self.state = nnx.split(model)
        self.fuse = on_one_device(self.state)  # fused projections in the decode loop (module docstring)
        # models.one_token's kernels for one-row products (module docstring); OneTokenMatmuls: with these bounds;
        # None: on where the projections are fused (weights on one device)
        self.one_token = one_token if isinstance(one_token, OneTokenMatmuls) else bool(
            self.fuse if one_token is None else one_token)
        if not is_int(cache_window) or cache_window < 0:
            raise ValueError(f"cache_window must be an int >= 0 (0: attend over the whole cache), got {cache_window!r}")
        self.window = int(cache_window)  # the decode loop's first cache window, in new tokens (module docstring)

    def __call__(self, ids_BxT, *, max_new_tokens: int, attention_mask=None, temperature: float = 0.0,
                 top_k: int | None = None, top_p: float | None = None, rng: jax.Array | None = None,
                 eos_token_id: int | Sequence[int] | None = None, pad_token_id: int = 0) -> jax.Array:
        ids, args, static = self._arguments(ids_BxT, max_new_tokens, attention_mask, temperature, top_k, top_p, rng,
                                            eos_token_id, pad_token_id)
        if static is None:
            return ids
        return _generate(self.state, ids, *args, **static)

    def stream(self, ids_BxT, *, max_new_tokens: int, chunk: int = 16, attention_mask=None,
               temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
               rng: jax.Array | None = None, eos_token_id: int | Sequence[int] | None = None,
               pad_token_id: int = 0) -> Iterator[np.ndarray]:
        """The new tokens of `__call__` as they are made: yields int32 arrays (B, n), the first holding the first
        new token (the prefill's), the next ones ending at multiples of `chunk` new tokens, in order; their
        concatenation is `__call__(...)[:, T:]` for the same arguments (same key: the same draws), except that the
        stream ends as soon as every row has emitted an eos (the rest would be pad_token_id). One program, as
        `__call__`'s, with `chunk` traced: the device runs ahead while the host hands the tokens over (an ordered
        io_callback every `chunk` steps). A reader that stops early leaves the program to finish unheard."""
        if not is_int(chunk) or chunk < 1:
            raise ValueError(f"chunk must be an int >= 1, got {chunk!r}")
        ids, args, static = self._arguments(ids_BxT, max_new_tokens, attention_mask, temperature, top_k, top_p, rng,
                                            eos_token_id, pad_token_id)
        if static is None:
            return
        stream_id = next(_STREAM_IDS)
        _STREAMS[stream_id] = handed = queue.Queue()
        try:
            result = _generate_streamed(self.state, ids, *args, jnp.int32(stream_id), jnp.int32(chunk), **static)
            shown = 0
            while True:
                try:
                    step, out_BxN, all_done = handed.get(timeout=0.05)
                except queue.Empty:
                    if result.is_ready() and handed.empty():
                        result.block_until_ready()  # raises the program's error, if it failed
                        return
                    continue
                if step > shown:
                    yield out_BxN[:, shown:step]
                    shown = step
                if all_done or shown >= max_new_tokens:
                    return
        finally:
            del _STREAMS[stream_id]

    def _arguments(self, ids_BxT, max_new_tokens, attention_mask, temperature, top_k, top_p, rng, eos_token_id,
                   pad_token_id):
        """Checked arguments of a call: (ids int32, the traced arguments after ids, the static ones), static None
        when max_new_tokens is 0."""
        ids = jnp.asarray(ids_BxT)
        if ids.ndim != 2 or ids.shape[1] == 0 or not jnp.issubdtype(ids.dtype, jnp.integer):
            raise ValueError(f"ids_BxT must be a non-empty (batch, time) integer array, got {ids.dtype} {ids.shape}")
        if not is_int(max_new_tokens) or max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
        concrete_mask = None
        if attention_mask is None:
            mask = jnp.ones(ids.shape, jnp.int32)
        else:
            mask = jnp.asarray(attention_mask)
            if mask.shape != ids.shape:
                raise ValueError(f"attention_mask has shape {mask.shape} but ids_BxT has shape {ids.shape}")
            mask = mask.astype(jnp.int32)
            concrete_mask = _concrete(mask)  # None under a trace: the caller vouches for it
            if concrete_mask is not None:
                _check_left_padded(concrete_mask)
        concrete_ids = _concrete(ids) if self.vocab_size is not None else None
        if concrete_ids is not None:
            real = np.ones(ids.shape, bool) if concrete_mask is None else concrete_mask != 0
            bad = np.unique(concrete_ids[real & ((concrete_ids < 0) | (concrete_ids >= self.vocab_size))])
            if bad.size:
                raise ValueError(f"ids_BxT holds token ids outside the vocabulary [0, {self.vocab_size}): "
                                 f"{bad[:8].tolist()}")
        if not temperature >= 0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature!r}")
        greedy = temperature == 0
        if top_k is not None and (not is_int(top_k) or top_k < 1):
            raise ValueError(f"top_k must be an int >= 1 or None, got {top_k!r}")
        if top_p is not None and not 0 < top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1] or None, got {top_p!r}")
        if greedy and (top_k is not None or top_p is not None):
            raise ValueError(f"top_k={top_k!r} / top_p={top_p!r} only apply when sampling: set temperature > 0")
        if not greedy and rng is None:
            raise ValueError("sampling (temperature > 0) needs an explicit rng key, e.g. rng=jax.random.key(0)")
        if rng is not None:
            dtype, shape = getattr(rng, "dtype", None), getattr(rng, "shape", None)
            is_key = dtype is not None and (jnp.issubdtype(dtype, jax.dtypes.prng_key) and shape == ()
                                            or dtype == jnp.uint32 and shape == (2,))
            if not is_key:
                raise ValueError(f"rng must be one jax.random key (jax.random.key(seed)), got {rng!r}")
        eos = [] if eos_token_id is None else (
            [eos_token_id] if isinstance(eos_token_id, (int, np.integer)) else list(eos_token_id))
        if not all(is_int(e) for e in eos):
            raise ValueError(f"eos_token_id must be an int, a sequence of ints or None, got {eos_token_id!r}")
        int32 = np.iinfo(np.int32)
        if not is_int(pad_token_id) or not int32.min <= pad_token_id <= int32.max:
            raise ValueError(f"pad_token_id must be an int (int32), got {pad_token_id!r}")
        ids = ids.astype(jnp.int32)
        if max_new_tokens == 0:
            return ids, (), None
        if self.context is not None and ids.shape[1] + max_new_tokens > self.context:
            warnings.warn(f"generate: {ids.shape[1]} prompt + {max_new_tokens} new tokens run past the model's "
                          f"max_position_embeddings={self.context}; positions beyond it were not trained and the "
                          "output may degrade", UserWarning, stacklevel=3)
        # eos ids padded with -1 (never a token) to a multiple of 8: one compilation for 0..8 eos ids.
        eos_E = np.full(max(8, -(-len(eos) // 8) * 8), -1, np.int32)
        eos_E[:len(eos)] = eos
        candidates = 0 if greedy else sampling_candidates(top_k, top_p)
        top_k = min(np.iinfo(np.int32).max if top_k is None else int(top_k), np.iinfo(np.int32).max)  # V at most
        args = (mask, jax.random.key(0) if rng is None else rng, jnp.float32(1.0 if greedy else temperature),
                jnp.int32(top_k), jnp.float32(1.0 if top_p is None else top_p), jnp.asarray(eos_E),
                jnp.int32(pad_token_id))
        static = dict(graphdef=self.graphdef, max_new_tokens=int(max_new_tokens), greedy=bool(greedy),
                      candidates=candidates, fuse=self.fuse, one_token=self.one_token, window=self.window)
        return ids, args, static


def generate(model: nnx.Module, ids_BxT, *, max_new_tokens: int, attention_mask=None, temperature: float = 0.0,
             top_k: int | None = None, top_p: float | None = None, rng: jax.Array | None = None,
             eos_token_id: int | Sequence[int] | None = None, pad_token_id: int = 0) -> jax.Array:
    """Continues each prompt by `max_new_tokens` tokens; returns ids (B, T + max_new_tokens) int32.

    ids_BxT: int prompt ids, left-padded; attention_mask (B, T): 1 for prompt tokens, 0 for padding (default
    all ones); padding slots may hold any id, prompt ids outside [0, vocab_size) of a family model raise.
    temperature == 0 decodes greedily; temperature > 0 samples (optionally restricted by top_k and/or top_p) and
    needs an explicit `rng` key. eos_token_id (one id or several): a row stops after its
    first eos and is filled with `pad_token_id`. The model is not modified. A rotary model asked to run past
    its max_position_embeddings warns (UserWarning, as transformers does); GPT-2's learned positions refuse it.

    A family model whose module tree disagrees with its config (its cache would be sized from the config) raises
    models.InconsistentModel; the check runs once per call, before anything is compiled. Calling it repeatedly on
    one model splits the model each time: `Generator(model)` does that once.
    """
    return Generator(model)(
        ids_BxT, max_new_tokens=max_new_tokens, attention_mask=attention_mask, temperature=temperature,
        top_k=top_k, top_p=top_p, rng=rng, eos_token_id=eos_token_id, pad_token_id=pad_token_id)


# ------------------------------------------------------------------------------------ text in, text out
def _ids_of(encoding) -> list[int]:
    """Token ids of what a tokenizer's `encode` returned: a `tokenizers.Encoding` (.ids) or a list of ints."""
    return [int(i) for i in (encoding.ids if hasattr(encoding, "ids") else encoding)]


def _is_conversation(x) -> bool:
    return isinstance(x, (list, tuple)) and len(x) > 0 and all(isinstance(m, dict) for m in x)


def _stop_ids(tokenizer, eos_token_id) -> list[int]:
    """eos_token_id when given (an int, ints, or () for none), else the tokenizer's: `stop_token_ids`
    (interop.tokenizers.ChatTokenizer), else `eos_token_id`, else none."""
    if eos_token_id is not None:
        return [int(eos_token_id)] if isinstance(eos_token_id, (int, np.integer)) else [int(e) for e in eos_token_id]
    stop = getattr(tokenizer, "stop_token_ids", None)
    if stop is None:
        eos = getattr(tokenizer, "eos_token_id", None)
        stop = () if eos is None else [eos] if isinstance(eos, (int, np.integer)) else eos
    return [int(e) for e in stop]


def generate_text(model: nnx.Module, tokenizer, prompt, *, max_new_tokens: int = 64, chat: bool | None = None,
                  temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
                  rng: jax.Array | None = None, eos_token_id: int | Sequence[int] | None = None,
                  stop: str | Sequence[str] = (), skip_special_tokens: bool = True) -> str | list[str]:
    """Text in, text out: the continuation of `prompt` by `generate`, decoded, stopping at the end of sequence.

        chat = interop.tokenizers.load_chat_tokenizer("smollm2-135m-instruct")
        generate_text(model, chat, "What is the capital of France?")       # through the chat template
        generate_text(model, chat, [{"role": "system", "content": "Be brief."},
                                    {"role": "user", "content": "Name a colour."}], max_new_tokens=16)
        generate_text(model, chat, "The capital of France is", chat=False)  # plain continuation

    prompt: a string, a conversation (a list of {'role': ..., 'content': ...} dicts), or a list of these (a batch,
    left-padded; returns a list of strings). chat: True renders each prompt with
    `tokenizer.apply_chat_template(messages, add_generation_prompt=True)` (a string becomes one user message) and
    encodes it without adding special tokens, as transformers does; False encodes a string prompt as it is
    (`tokenizer.encode(text)`); None (default): True when the tokenizer has a chat template (instruct models).
    Generation stops at `eos_token_id` (an id, several ids, or () for never), by default the tokenizer's:
    `stop_token_ids` of an interop.tokenizers.ChatTokenizer, else its `eos_token_id`. The stop token is not part
    of the text; `skip_special_tokens` is passed to `tokenizer.decode`. Sampling arguments as in `generate`.
    `stop` (a string or several): the text ends just before the first occurrence of any of them in the decoded
    continuation, the stop string itself excluded (as vLLM's and OpenAI's `stop`; transformers' `stop_strings`
    keep it in the returned ids). The device program still runs to eos or max_new_tokens; stream_text stops
    reading at the stop string.

    `tokenizer` needs `encode(text)` (returning a tokenizers.Encoding or a list of ids) and `decode(ids)`; chat
    prompts need `apply_chat_template` (a plain `tokenizers.Tokenizer` has none: wrap it in a ChatTokenizer).
    """
    batch = isinstance(prompt, (list, tuple)) and not _is_conversation(prompt)
    stop_strings = as_stop_strings(stop)
    ids_BxT, mask_BxT, stop, pad = _encoded_prompts(tokenizer, list(prompt) if batch else [prompt], chat,
                                                    eos_token_id, "generate_text")
    width = ids_BxT.shape[1]
    out = np.asarray(generate(model, ids_BxT, max_new_tokens=max_new_tokens, attention_mask=mask_BxT,
                              temperature=temperature, top_k=top_k, top_p=top_p, rng=rng,
                              eos_token_id=stop or None, pad_token_id=pad))[:, width:]
    texts = []
    for row in out.tolist():
        end = next((i for i, t in enumerate(row) if t in stop), len(row))
        text = tokenizer.decode(row[:end], skip_special_tokens=skip_special_tokens)
        texts.append(text[:_first_stop(text, stop_strings)])
    return texts if batch else texts[0]


def as_stop_strings(stop) -> tuple[str, ...]:
    """`stop` as a tuple of non-empty strings (one string: one stop string)."""
    stops = (stop,) if isinstance(stop, str) else tuple(stop) if isinstance(stop, (list, tuple)) else (None,)
    if not all(isinstance(t, str) and t for t in stops):
        raise ValueError(f"stop must be a non-empty string or a sequence of them, got {stop!r}")
    return stops


def _first_stop(text: str, stops: tuple[str, ...]) -> int:
    """Where the earliest occurrence of any stop string begins in `text`; len(text) if none occurs."""
    return min((i for i in (text.find(t) for t in stops) if i >= 0), default=len(text))


def _undecided_tail(text: str, stops: tuple[str, ...]) -> int:
    """Length of the longest end of `text` that begins some stop string without completing it: text that more
    tokens may turn into a stop string, so a stream holds it back."""
    return max((n for t in stops for n in range(1, len(t)) if text.endswith(t[:n])), default=0)


def stream_text(model: nnx.Module, tokenizer, prompt, *, max_new_tokens: int = 64, chunk: int = 8,
                chat: bool | None = None, temperature: float = 0.0, top_k: int | None = None,
                top_p: float | None = None, rng: jax.Array | None = None,
                eos_token_id: int | Sequence[int] | None = None, stop: str | Sequence[str] = (),
                skip_special_tokens: bool = True) -> Iterator[str]:
    """`generate_text` for one prompt, as it is made: yields pieces of text (after every `chunk` new tokens,
    `Generator.stream`) whose concatenation is generate_text's result for the same arguments.

        for piece in stream_text(model, chat, "Tell me a story.", max_new_tokens=256):
            print(piece, end="", flush=True)

    Each piece is the decoded text so far less what was already yielded; a trailing U+FFFD (the first bytes of a
    character whose last byte has not been generated yet) is held back until the next chunk completes it, and so
    is an end that begins a stop string; at a stop string the stream ends (the string excluded)."""
    if isinstance(prompt, (list, tuple)) and not _is_conversation(prompt):
        raise ValueError("stream_text takes one prompt (a string or a conversation); for a batch use generate_text")
    stop_strings = as_stop_strings(stop)
    ids_BxT, mask_BxT, stop, pad = _encoded_prompts(tokenizer, [prompt], chat, eos_token_id, "stream_text")
    tokens, shown = [], ""
    pieces = Generator(model).stream(ids_BxT, max_new_tokens=max_new_tokens, chunk=chunk, attention_mask=mask_BxT,
                                     temperature=temperature, top_k=top_k, top_p=top_p, rng=rng,
                                     eos_token_id=stop or None, pad_token_id=pad)
    try:
        for new_1xN in pieces:
            row = new_1xN[0].tolist()
            end = next((i for i, t in enumerate(row) if t in stop), None)
            tokens += row[:end]
            text = tokenizer.decode(tokens, skip_special_tokens=skip_special_tokens)
            cut = _first_stop(text, stop_strings)
            last = end is not None or cut < len(text) or len(tokens) >= max_new_tokens
            text = text[:cut]
            if not last:
                text = text.rstrip("\ufffd")
                text = text[:len(text) - _undecided_tail(text, stop_strings)]
            if text.startswith(shown) and len(text) > len(shown):
                yield text[len(shown):]
                shown = text
            if last:
                return
    finally:
        pieces.close()  # a stop string ends the reading early: the stream is dropped


def _encoded_prompts(tokenizer, prompts: list, chat: bool | None, eos_token_id, caller: str):
    """Prompts encoded (through the chat template when chat) and left-padded: (ids (B, T) int32, mask (B, T), stop
    ids, pad id); see generate_text."""
    if not prompts:
        raise ValueError(f"{caller} needs at least one prompt")
    template = getattr(tokenizer, "chat_template", None)
    if chat is None:
        chat = bool(template) or any(_is_conversation(p) for p in prompts)
    rows = []
    for p in prompts:
        if not isinstance(p, str) and not _is_conversation(p):
            raise ValueError(f"a prompt is a string or a list of {{'role': ..., 'content': ...}} dicts, got {p!r}")
        if chat:
            if not callable(getattr(tokenizer, "apply_chat_template", None)) or not template:
                raise ValueError("chat prompts need a tokenizer with a chat template "
                                 "(interop.tokenizers.load_chat_tokenizer); pass chat=False for plain text")
            messages = [{"role": "user", "content": p}] if isinstance(p, str) else p
            ids = _ids_of(tokenizer.encode(tokenizer.apply_chat_template(messages, add_generation_prompt=True),
                                           add_special_tokens=False))
        elif isinstance(p, str):
            ids = _ids_of(tokenizer.encode(p))
        else:
            raise ValueError("a conversation prompt needs chat=True (or None) and a tokenizer with a chat template")
        if not ids:
            raise ValueError(f"prompt {p!r} encodes to no tokens")
        rows.append(ids)
    stop = _stop_ids(tokenizer, eos_token_id)
    pad = getattr(tokenizer, "pad_token_id", None)
    pad = int(pad) if pad is not None else (stop[0] if stop else 0)
    width = max(len(r) for r in rows)
    ids_BxT = np.full((len(rows), width), pad, np.int32)
    mask_BxT = np.zeros((len(rows), width), np.int32)
    for b, r in enumerate(rows):
        ids_BxT[b, width - len(r):], mask_BxT[b, width - len(r):] = r, 1
    return ids_BxT, mask_BxT, stop, pad
