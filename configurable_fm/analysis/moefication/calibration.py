"""Calibration statistics for MoEfication, streamed over token batches with `reduce_over` (analysis/reduce.py).

    counts, tokens = coactivation_counts(model, batches, ["layers.0.mlp", ...], active_fraction=0.1)
    data = router_data(model, batches, {"layers.0.mlp": split.groups[split.num_shared:], ...}, max_tokens=16384)
    batches = corpus_batches("corpus.txt", tokenizer, seq_len=256, batch_size=8, n_tokens=65536)

Batches are pipeline dicts ({'inputs': (B, T) ids, 'attention_mask'?, 'loss_mask'?, 'mask'?}; analysis/batches.py
token_mask says which tokens count) or plain (B, T) id arrays. With an attention_mask the forward passes it.

Active markers (`TopCoActivation`, a Reduction): for a token t with FFN activations h_t (F,), neuron i is marked
active, z_ti = 1, when |h_ti| > 0 and |h_ti| >= the ceil(active_fraction F)-th largest |h_t.| (ties are all marked).
A fixed threshold (neurons.activation_stats' `coactivation`, |h| > c) suits ReLU models; SwiGLU activations are
almost never 0, so a per-token top fraction (CMoE's activation markers) is used instead. The statistic is
    C = sum_t m_t z_t z_t^T   (F, F) integer, C_ii = the number of tokens on which neuron i is active
one jitted reduction per batch (nothing per token leaves the device); memory F^2 int32 per layer on the device.

Router data (`router_data`): per FFN, the inputs x_t (N, D) and the activation masses of the routed experts
M_te = ||h_{t, S_e}||_2 (N, R) (`ExpertMass`, computed on the device from the expert groups), for the first
`max_tokens` masked-in tokens (whole batches: a little more when a batch crosses the limit). Host memory
N (D + R) float32 per FFN.
"""
from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from configurable_fm.analysis.batches import masked_forward, token_mask
from configurable_fm.analysis.reduce import HIGHEST, Reduction, Values, reduce_over, token_mask_like
from configurable_fm.analysis.moefication.errors import MoefyError


@dataclasses.dataclass(frozen=True)
class TopCoActivation(Reduction):
    """C = sum_t m_t z_t z_t^T of the top-`fraction` activation markers z_t (module docstring): (F, F) int32."""

    fraction: float = 0.1
    name: str = "top_coactivation"

    def batch(self, x, m):
        f = x.shape[-1]
        k = max(1, min(f, int(math.ceil(self.fraction * f - 1e-9))))
        a = jnp.abs(x.astype(jnp.float32))
        kth = jax.lax.top_k(a, k)[0][..., -1:]
        z = ((a >= kth) & (a > 0) & token_mask_like(m, x)).astype(jnp.float32).reshape(-1, f)
        c = jnp.dot(z.T, z, precision=HIGHEST, preferred_element_type=jnp.float32)
        return jnp.round(c).astype(jnp.int32)


@dataclasses.dataclass(frozen=True)
class ExpertMass(Values):
    """The masked-in tokens' expert masses ||h_{S_e}||_2 for the groups (R, m) of neuron indices: (N, R) numpy,
    concatenated over batches as Values is."""

    groups: tuple = ()
    name: str = "expert_mass"

    def batch(self, x, m):
        idx = jnp.asarray(np.asarray(self.groups, np.int32))
        h = x.astype(jnp.float32)[..., idx]  # (B, T, R, m)
        return jnp.sqrt(jnp.sum(h * h, axis=-1))


def as_batch(b) -> Mapping[str, Any]:
    """A pipeline dict as is; a (B, T) id array as {'inputs': ids}."""
    return b if isinstance(b, Mapping) else {"inputs": np.asarray(b)}


def batch_source(calibration, what: str) -> Callable[[], Iterator[Mapping[str, Any]]]:
    """A function returning a fresh iterator over the calibration batches (several passes read them): a callable
    returning an iterable is called for each pass; one batch (a dict or an id array) is a list of one; any other
    iterable is read once into a list. MoefyError naming `what` when there are none."""
    if calibration is None:
        raise MoefyError(f"{what}: no calibration data")
    if callable(calibration) and not hasattr(calibration, "shape"):
        return lambda: (as_batch(b) for b in calibration())
    if isinstance(calibration, Mapping) or hasattr(calibration, "shape"):
        items = [as_batch(calibration)]
    else:
        items = [as_batch(b) for b in calibration]
    if not items:
        raise MoefyError(f"{what}: the calibration data holds no batches")
    return lambda: iter(items)


def _forward_of(first: Mapping[str, Any]):
    if "attention_mask" in first:
        return masked_forward, ("inputs", "attention_mask")
    return None, ("inputs",)


def _reduce(model, source, spec, *, desc: str, max_batches=None, max_tokens=None, progress=False, log=None):
    it = source()
    try:
        first = next(it)
    except StopIteration:
        raise MoefyError(f"{desc}: the calibration data holds no batches") from None
    stream = _chain(first, it)
    if max_tokens is not None:
        stream = first_tokens(stream, max_tokens)
    forward, keys = _forward_of(first)
    return reduce_over(model, stream, spec, forward=forward, batch_keys=keys, max_batches=max_batches,
                       progress=progress, log=log, desc=desc)


def _chain(first, rest):
    yield first
    yield from rest


def first_tokens(batches: Iterable[Mapping[str, Any]], n: int) -> Iterator[Mapping[str, Any]]:
    """The batches until they hold at least n masked-in tokens (token_mask)."""
    seen = 0
    for i, b in enumerate(batches):
        if seen >= n:
            return
        yield b
        seen += int(token_mask(b, f"batch {i}").sum())


def coactivation_counts(model, calibration, paths: Sequence[str], *, active_fraction: float = 0.1,
                        max_batches: Optional[int] = None, progress: bool = False,
                        log=None) -> tuple[dict[str, np.ndarray], int]:
    """({FFN path: C (F, F) int64}, N tokens): the active-marker co-activation counts of every FFN at `paths`
    (their `<path>.hidden` tap points) over the calibration batches (module docstring)."""
    source = batch_source(calibration, "coactivation_counts")
    reduction = TopCoActivation(float(active_fraction))
    got = _reduce(model, source, {f"{p}.hidden": reduction for p in paths}, desc="moefy: co-activation",
                  max_batches=max_batches, progress=progress, log=log)
    return {p: np.asarray(got[f"{p}.hidden"][reduction.name], np.int64) for p in paths}, got.tokens


def router_data(model, calibration, groups: Mapping[str, Any], *, max_tokens: int = 16384,
                max_batches: Optional[int] = None, progress: bool = False,
                log=None) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{FFN path: (x (N, D) float32, M (N, R) float32)}: the FFN inputs and the routed experts' masses for the
    groups (R, m) of dense neuron indices given per path (module docstring)."""
    source = batch_source(calibration, "router_data")
    spec = {}
    for p, g in groups.items():
        spec[f"{p}.input"] = Values()
        spec[f"{p}.hidden"] = ExpertMass(groups=tuple(tuple(int(i) for i in row) for row in np.asarray(g)))
    got = _reduce(model, source, spec, desc="moefy: router data", max_batches=max_batches, max_tokens=max_tokens,
                  progress=progress, log=log)
    return {p: (np.asarray(got[f"{p}.input"]["values"], np.float32),
                np.asarray(got[f"{p}.hidden"]["expert_mass"], np.float32)) for p in groups}


# ------------------------------------------------------------------------------------------------ text corpora
def corpus_batches(corpus: str, tokenizer, *, split: str = "train", seq_len: int = 256, batch_size: int = 8,
                   n_tokens: int = 65536, what: str = "calibration corpus") -> list[dict[str, np.ndarray]]:
    """Calibration batches of about n_tokens tokens (consecutive windows of seq_len, data.pipeline.eval_batches)
    from `corpus`: a token dataset (a name in the data root or a directory of cfm-prepare-data shards; its `split`,
    checked to be tokenized with `tokenizer`), a .txt file, or a directory of .txt files (tokenized here, files in
    sorted order, until n_tokens). tokenizer: a tokenizers.Tokenizer or a ChatTokenizer. MoefyError naming the
    corpus (as `what` calls it) otherwise."""
    from configurable_fm.data import pipeline
    from configurable_fm.data.shards import MANIFEST, TokenStream, dataset_dir, is_text_corpus, sha256_text

    tok = getattr(tokenizer, "tokenizer", tokenizer)
    path = Path(corpus).expanduser()
    want = n_tokens + 1
    if is_text_corpus(path):
        files = [path] if path.is_file() else sorted(path.glob("*.txt"))
        if not files:
            raise MoefyError(f"{what} {corpus!r} is a directory with neither a token dataset manifest "
                              f"({MANIFEST}) nor .txt files")
        if tok is None:
            raise MoefyError(f"{what} {corpus!r} is text: it needs a tokenizer")
        ids: list[int] = []
        for f in files:
            ids += tok.encode(f.read_text(encoding="utf-8"), add_special_tokens=False).ids
            if len(ids) >= want:
                break
        tokens = np.asarray(ids[:want], np.int32)
    else:
        directory = dataset_dir(corpus)
        if not (directory / MANIFEST).is_file():
            raise MoefyError(f"{what} {corpus!r} is not a token dataset ({directory} has no {MANIFEST}; "
                              "build one with cfm-prepare-data --config experiments/data.py:NAME), a .txt file or a "
                              "directory of .txt files")
        try:
            stream = TokenStream(directory, split)
        except KeyError as e:
            raise MoefyError(f"{what} {corpus!r}: {e.args[0]}") from None
        want_sha = stream.manifest.get("tokenizer", {}).get("sha256")
        if want_sha and tok is not None and hasattr(tok, "to_str") and sha256_text(tok.to_str()) != want_sha:
            raise MoefyError(f"{what} {directory} was tokenized with "
                              f"{stream.manifest['tokenizer'].get('spec')!r}, not with the model's tokenizer")
        tokens = np.asarray(stream[:min(want, len(stream))], np.int32)
    if len(tokens) < seq_len + 1:
        raise MoefyError(f"{what} {corpus!r} gives {len(tokens)} tokens, fewer than one window of "
                          f"seq_len={seq_len} (+1)")
    return list(pipeline.eval_batches(tokens, seq_len, batch_size))
