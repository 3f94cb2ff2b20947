"""Evaluating edits: CounterFact's probability metrics (ROME/MEMIT), EasyEdit's token accuracies, fluency.

    m = evaluate_requests(edited, tok, reqs, reference=model)     # EditMetrics: per-case rows + summary
    m.summary["efficacy_score"]                                   # Stat(mean=0.98, stderr=0.01, n=150)
    print(summarize({"unedited": m0, "ROME": m}))                 # markdown table (percentages)
    ev = Evaluator(tok, reqs, reference=model)                    # tokenise once, call after every k edits
    ev(edited_1); ev(edited_2, which=range(10))                   # any model of the same structure, any subset
    EditSession(model, tok, "memit", ..., on_edit=ev.on_edit, every=100)   # the requests edited so far

Two families of metrics, named apart because they disagree (research/editing.md §1.4):

CounterFact probability comparison (ROME `experiments/py/eval_utils_counterfact.py` + `summarize.py`). For a
prompt x and a target y = (y_1..y_m) (its tokens, encoded on their own and appended to the prompt's:
`keys.Encoder`), teacher-forced:
    nll(y | x) = (1/m) sum_j -log p(y_j | x, y_<j)         (the authors' whole-target score: mean per-token NLL)
    P(y | x)   = exp(-nll(y | x))                           (geometric mean of the per-token probabilities)
    P1(y | x)  = p(y_1 | x)                                 (first-token variant: the `*_first` metrics)
Per case (a request), over its prompts:
    efficacy_score     ES = [P(new | x) > P(true | x)] on the rewrite prompt          (strict: a tie fails)
    efficacy_magnitude EM = P(new | x) - P(true | x)
    paraphrase_score / _magnitude  PS, PM: the same, averaged over the paraphrase prompts
    neighborhood_score NS = mean over neighbourhood prompts n of [P(t_n | n) > P(new | n)]   (t_n: its target,
                       CounterFact's target_true), neighborhood_magnitude NM = mean of P(t_n | n) - P(new | n)
    score = harmonic mean of the summary means of ES, PS, NS (ROME's S), over the cases that have all three.
    neighborhood_unedited_score / _magnitude  NS-u, NM-u: NS and NM over the neighbourhood prompts that name none of
                       `edited_subjects` (whole words) but the case's own: when one run edits several facts (batch,
                       sequential) and a neighbour's subject is one of them, its true target is meant to lose, so
                       NS counts an intended change as a failure; NS-u leaves those prompts out (NaN for a case
                       with no other prompt). Only with `edited_subjects`.
Requests without target_true get NaN for ES/EM/PS/PM (nothing to compare with; the case is left out of those means).

EasyEdit token accuracies (`evaluate_utils.test_prediction_acc`): a_j = argmax_v p(v | x, y_<j), teacher-forced.
    rewrite_acc / paraphrase_acc = mean_j [a_j == y_j] for target_new (a 3-token target can score 1/3)
    neighborhood_acc = the same for each neighbourhood prompt and its target
    locality = mean_j [a_j == a_j^ref] on the neighbourhood prompts (teacher-forced with their targets), a^ref from
               the `reference` (unedited) model: EasyEdit's locality; NaN when no reference is given.
Exact match (ROME's `*_acc`, all target tokens argmax-correct):
    rewrite_gen_acc / paraphrase_gen_acc / neighborhood_gen_acc = [a_j == y_j for every j].
These are also the free-generation accuracies (greedy decoding of len(y) tokens gives y): greedy decoding emits
y_1 iff a_1 == y_1, and then sees exactly the teacher-forced context, and so on; so they are computed from the same
forward pass (a test checks them against `models.generation.generate`).

Fluency (ROME's generation entropy, `n_gram_entropy`): for each request, generate `fluency_tokens` new tokens from
each of its generation prompts (default: the rewrite prompt and the paraphrases), text = prompt + continuation,
    H_n = -sum_g f_g log2 f_g over the frequencies f of the word n-grams of the text,
    ngram_entropy(text) = mean(2/3 H_2, 4/3 H_3);   fluency of a case = mean over its texts.
Deviations: words are `\\w+` runs and single punctuation marks (ROME uses nltk.word_tokenize, not a dependency
here: contractions split differently); a text with no n-grams of a size has H_n = 0 (ROME: NaN). Decoding is greedy
unless a `key` is given, then top-k sampling with `top_k` (ROME's generate_fast: top-k 5); no stop at end of sequence
(as ROME). RS (reference-snippet TF-IDF consistency) is not computed.

Summary: for each metric, Stat(mean, stderr, n) over the cases where it is defined, stderr = sample std / sqrt(n)
(NaN for n < 2). Tables (`summarize`) show scores and accuracies in percent, fluency in bits.

Scoring is batched: every distinct (prompt ids, target ids) pair of the requests is one row (prompt + target[:-1],
right-padded: a causal model's real positions never see the padding), rows sorted by length, `batch_size` rows per
call (the last batch padded), lengths rounded up to a multiple of 8, target length to the longest target; one jitted
program per (model structure, length bucket). Only the logits at target positions leave the program.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import re
from collections import Counter
from pathlib import Path
from typing import Any, Iterable, Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from configurable_fm.checks import is_int
from configurable_fm.errors import UserError
from configurable_fm.models.generation import generate
from configurable_fm.models.scoring import next_token_nll
from configurable_fm.ops.update.keys import Encoder
from configurable_fm.ops.update.requests import Request

METRIC_GROUPS = ("probability", "accuracy", "fluency")
PROBABILITY = ("efficacy_score", "efficacy_magnitude", "paraphrase_score", "paraphrase_magnitude",
               "neighborhood_score", "neighborhood_magnitude",
               "efficacy_score_first", "efficacy_magnitude_first", "paraphrase_score_first",
               "paraphrase_magnitude_first", "neighborhood_score_first", "neighborhood_magnitude_first",
               "neighborhood_unedited_score", "neighborhood_unedited_magnitude", "neighborhood_unedited_score_first",
               "neighborhood_unedited_magnitude_first")
ACCURACY = ("rewrite_acc", "paraphrase_acc", "neighborhood_acc", "locality",
            "rewrite_gen_acc", "paraphrase_gen_acc", "neighborhood_gen_acc")
FLUENCY = ("fluency",)
SHORT = {"efficacy_score": "ES", "paraphrase_score": "PS", "neighborhood_score": "NS", "score": "S",
         "efficacy_magnitude": "EM", "paraphrase_magnitude": "PM", "neighborhood_magnitude": "NM",
         "efficacy_score_first": "ES@1", "paraphrase_score_first": "PS@1", "neighborhood_score_first": "NS@1",
         "rewrite_acc": "Rel", "paraphrase_acc": "Gen", "locality": "Loc", "neighborhood_acc": "N-acc",
         "rewrite_gen_acc": "Rel-EM", "paraphrase_gen_acc": "Gen-EM", "neighborhood_gen_acc": "N-EM",
         "neighborhood_unedited_score": "NS-u", "neighborhood_unedited_magnitude": "NM-u", "fluency": "Flu"}
TABLE_COLUMNS = ("efficacy_score", "paraphrase_score", "neighborhood_score", "neighborhood_unedited_score", "score",
                 "efficacy_magnitude",
                 "paraphrase_magnitude", "neighborhood_magnitude", "rewrite_acc", "paraphrase_acc", "locality",
                 "rewrite_gen_acc", "paraphrase_gen_acc", "fluency")
LENGTH_MULTIPLE = 8


class EvaluationError(UserError, ValueError):
    """Bad arguments to the edit evaluation (unknown metric group, mismatched generation prompts, ...)."""


class Stat(NamedTuple):
    mean: float
    stderr: float
    n: int


def stat(values: Iterable[float]) -> Stat:
    """Mean, standard error (sample std / sqrt(n), NaN for n < 2) and count of the non-NaN values."""
    v = np.asarray([x for x in values if not math.isnan(x)], np.float64)
    if v.size == 0:
        return Stat(math.nan, math.nan, 0)
    se = float(v.std(ddof=1) / math.sqrt(v.size)) if v.size > 1 else math.nan
    return Stat(float(v.mean()), se, int(v.size))


# ------------------------------------------------------------------------------------------- fluency
_WORD = re.compile(r"\w+|[^\w\s]")


def ngram_entropy(text: str, ns: Sequence[int] = (2, 3), weights: Sequence[float] = (2 / 3, 4 / 3)) -> float:
    """ROME's weighted n-gram entropy of one text, in bits: mean over n of weight_n * H_n (module docstring)."""
    words = _WORD.findall(text)
    out = []
    for n, w in zip(ns, weights):
        counts = np.asarray(list(Counter(tuple(words[i:i + n]) for i in range(len(words) - n + 1)).values()),
                            np.float64)
        if counts.size == 0:
            out.append(0.0)
            continue
        f = counts / counts.sum()
        out.append(w * float(-(f * np.log2(f)).sum()))
    return float(np.mean(out))


# ------------------------------------------------------------------------------------------- scoring
@functools.partial(jax.jit, static_argnames="graphdef")
def _score(state, ids_BxT, pos_BxK, tgt_BxK, *, graphdef):
    out = nnx.merge(graphdef, state)(ids_BxT)
    logits_BxTxV = out[0] if isinstance(out, tuple) else out
    picked_BxKxV = logits_BxTxV[jnp.arange(ids_BxT.shape[0])[:, None], pos_BxK]
    return next_token_nll(picked_BxKxV, tgt_BxK), jnp.argmax(picked_BxKxV, axis=-1).astype(jnp.int32)


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


Item = tuple[tuple[int, ...], tuple[int, ...]]  # (prompt ids, target ids)


def score_items(model: nnx.Module, items: Sequence[Item], *,
                batch_size: int = 32) -> list[tuple[np.ndarray, np.ndarray]]:
    """For each (prompt ids, target ids): (per-token NLL (m,) float64, teacher-forced argmax (m,) int) of the
    target given the prompt, batched and jitted as the module docstring says."""
    if not items:
        return []
    if any(not p or not t for p, t in items):
        raise EvaluationError("every scored row needs a non-empty prompt and target")
    k = max(len(t) for _, t in items)
    order = sorted(range(len(items)), key=lambda i: len(items[i][0]) + len(items[i][1]))
    graphdef, state = nnx.split(model)
    out: list[Any] = [None] * len(items)
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        t = _round_up(max(len(items[i][0]) + len(items[i][1]) - 1 for i in chunk), LENGTH_MULTIPLE)
        ids = np.zeros((batch_size, t), np.int32)
        pos = np.zeros((batch_size, k), np.int32)
        tgt = np.zeros((batch_size, k), np.int32)
        for row, i in enumerate(chunk):
            p, y = items[i]
            x = list(p) + list(y[:-1])
            ids[row, :len(x)] = x
            pos[row, :len(y)] = np.arange(len(p) - 1, len(p) - 1 + len(y))
            tgt[row, :len(y)] = y
        nll, arg = _score(state, jnp.asarray(ids), jnp.asarray(pos), jnp.asarray(tgt), graphdef=graphdef)
        nll, arg = np.asarray(nll, np.float64), np.asarray(arg)
        for row, i in enumerate(chunk):
            m = len(items[i][1])
            out[i] = (nll[row, :m], arg[row, :m])
    return out


# ------------------------------------------------------------------------------------------- results
@dataclasses.dataclass(frozen=True)
class EditMetrics:
    """Per-case rows ({'case_id', metric: value, ...}, NaN where undefined), the summary {metric: Stat}, and the
    teacher-forced argmax of every neighbourhood (prompt, target) row, keyed by token ids (what `locality`
    compares against when these metrics are passed as another evaluation's `reference`)."""

    rows: tuple[dict, ...]
    summary: Mapping[str, Stat]
    predictions: Mapping[Item, tuple[int, ...]] = dataclasses.field(default_factory=dict, repr=False)

    def mean(self, name: str) -> float:
        return self.summary[name].mean

    def to_json(self) -> dict:
        """{'summary': {metric: {'mean', 'stderr', 'n'}}, 'rows': [...]} (NaN as null)."""
        clean = lambda x: None if isinstance(x, float) and math.isnan(x) else x
        return {"summary": {k: {"mean": clean(s.mean), "stderr": clean(s.stderr), "n": s.n}
                            for k, s in self.summary.items()},
                "rows": [{k: clean(v) for k, v in r.items()} for r in self.rows]}


def summarize_rows(rows: Sequence[Mapping[str, Any]]) -> dict[str, Stat]:
    """Stat of every metric column of the rows, plus 'score': the harmonic mean of the ES, PS and NS means over the
    cases that have all three (when any has)."""
    names = [k for k in (PROBABILITY + ACCURACY + FLUENCY) if any(k in r for r in rows)]
    summary = {k: stat(float(r.get(k, math.nan)) for r in rows) for k in names}
    parts = ("efficacy_score", "paraphrase_score", "neighborhood_score")
    full = [r for r in rows if all(not math.isnan(float(r.get(k, math.nan))) for k in parts)]
    if full:  # the three means over the same cases: those that have all three
        means = [sum(float(r[k]) for r in full) / len(full) for k in parts]
        s = 0.0 if min(means) <= 0 else len(means) / sum(1 / m for m in means)
        summary["score"] = Stat(s, math.nan, len(full))
    return summary


@functools.lru_cache(maxsize=None)
def _subject_pattern(subject: str) -> re.Pattern:
    return re.compile(rf"(?<!\w){re.escape(subject)}(?!\w)")


def names_edited_subject(request: Request, edited_subjects: Iterable[str]) -> list[bool]:
    """Per neighbourhood prompt of `request`: whether it names (as a whole word) one of `edited_subjects` other than
    the request's own subject, i.e. a neighbour that the same edit run changes (left out of NS-u)."""
    others = [s for s in set(edited_subjects) if s != request.subject]
    return [any(_subject_pattern(s).search(p) for s in others) for p in request.neighborhood_prompts]


def _cmp(nll_a: float, nll_b: float) -> tuple[float, float]:
    """([P(a) > P(b)], P(a) - P(b)) with P = exp(-nll)."""
    return float(nll_a < nll_b), math.exp(-nll_a) - math.exp(-nll_b)


def _mean(xs: Sequence[float]) -> float:
    return float(np.mean(xs)) if len(xs) else math.nan


class Evaluator:
    """Tokenises `requests` once; calling it on a model (any number of times, e.g. after every k edits) returns
    EditMetrics. Arguments as `evaluate_requests`."""

    def __init__(self, tokenizer, requests: Sequence[Request], *, metrics: Sequence[str] = ("probability", "accuracy"),
                 reference=None, batch_size: int = 32, bos_id: int | None = None,
                 generation_prompts: Sequence[Sequence[str]] | None = None, fluency_tokens: int = 100,
                 top_k: int | None = 5, edited_subjects: Sequence[str] = ()):
        unknown = sorted(set(metrics) - set(METRIC_GROUPS))
        if unknown or not metrics:
            raise EvaluationError(f"metrics must be a non-empty subset of {METRIC_GROUPS}, got {list(metrics)}")
        if not is_int(batch_size) or batch_size < 1:
            raise EvaluationError(f"batch_size must be an int >= 1, got {batch_size!r}")
        for i, r in enumerate(requests):
            if not isinstance(r, Request):
                raise EvaluationError(f"requests[{i}] is a {type(r).__name__}, not a Request")
        if generation_prompts is not None and len(generation_prompts) != len(requests):
            raise EvaluationError(f"{len(generation_prompts)} lists of generation_prompts for {len(requests)} requests")
        self.requests = tuple(requests)
        self.metrics = tuple(metrics)
        self.batch_size = batch_size
        self.enc = Encoder(tokenizer, bos_id)
        self.fluency_tokens = fluency_tokens
        self.top_k = top_k
        self.generation_prompts = (tuple((r.text,) + r.paraphrases for r in requests) if generation_prompts is None
                                   else tuple(tuple(g) for g in generation_prompts))
        self._items: dict[Item, int] = {}
        self.edited_subjects = frozenset(edited_subjects)
        self.layout = [self._layout(r) for r in self.requests]
        self._reference = reference
        self._reference_predictions: Mapping[Item, tuple[int, ...]] | None = (
            reference.predictions if isinstance(reference, EditMetrics) else None)

    @property
    def n_rows(self) -> int:
        """Distinct (prompt, target) rows one full evaluation scores."""
        return len(self._items)

    def _item(self, prompt: str, target: str) -> Item:
        item = (tuple(self.enc.ids(prompt)), tuple(self.enc.target(target)))
        self._items.setdefault(item, len(self._items))
        return item

    def _layout(self, r: Request) -> dict[str, list[tuple[Item, Item | None]]]:
        """kind -> [(item of the scored target, item of the compared target or None)] for one request."""
        pair = lambda prompt, a, b: (self._item(prompt, a), None if b is None else self._item(prompt, b))
        out = {"rewrite": [pair(r.text, r.target_new, r.target_true)],
               "paraphrase": [pair(p, r.target_new, r.target_true) for p in r.paraphrases],
               "neighborhood": [pair(p, t, r.target_new) for p, t in zip(r.neighborhood_prompts,
                                                                         r.neighborhood_targets)]}
        if self.edited_subjects:
            edited = names_edited_subject(r, self.edited_subjects)
            out["neighborhood_unedited"] = [pr for pr, e in zip(out["neighborhood"], edited) if not e]
        return out

    def _score(self, model, which: Sequence[int]) -> dict[Item, tuple[np.ndarray, np.ndarray]]:
        needed: dict[Item, None] = {}
        for i in which:
            for pairs in self.layout[i].values():
                for a, b in pairs:
                    needed[a] = None
                    if b is not None:
                        needed[b] = None
        items = list(needed)
        return dict(zip(items, score_items(model, items, batch_size=self.batch_size)))

    def reference_predictions(self, which: Sequence[int]) -> Mapping[Item, tuple[int, ...]] | None:
        """Argmax tokens of the reference on the neighbourhood rows (computed once for a reference model)."""
        if self._reference is None:
            return None
        if self._reference_predictions is None:
            self._reference_predictions = self(self._reference, metrics=("accuracy",), reference=False).predictions
        return self._reference_predictions

    def __call__(self, model: nnx.Module, *, which: Iterable[int] | None = None, key=None,
                 metrics: Sequence[str] | None = None, reference: Any = None) -> EditMetrics:
        """Metrics of `model` on the requests (or those at indices `which`); `key` samples fluency generations.
        reference: what the locality metrics compare with: None (the constructor's reference), another evaluation's
        EditMetrics, a model (its predictions computed here), or False (none)."""
        which = list(range(len(self.requests)) if which is None else which)
        groups = self.metrics if metrics is None else tuple(metrics)
        scores = self._score(model, which) if {"probability", "accuracy"} & set(groups) else {}
        ref = None
        if "accuracy" in groups and reference is not False:
            if isinstance(reference, EditMetrics):
                ref = reference.predictions
            elif isinstance(reference, nnx.Module):
                ref = self(reference, which=which, metrics=("accuracy",), reference=False).predictions
            elif reference is None:
                ref = self.reference_predictions(which)
            else:
                raise TypeError(f"Evaluator: reference must be None, False, EditMetrics or a model, got "
                                f"{type(reference).__name__}")
        fluency = self._fluency(model, which, key) if "fluency" in groups else {}
        rows, predictions = [], {}
        for i in which:
            row: dict[str, Any] = {"case_id": self.requests[i].case_id}
            lay = self.layout[i]
            if "probability" in groups:
                row.update(self._probability(lay, scores))
            if "accuracy" in groups:
                row.update(self._accuracy(lay, scores, ref))
                for a, _ in lay["neighborhood"]:
                    predictions[a] = tuple(int(x) for x in scores[a][1])
            if "fluency" in groups:
                row["fluency"] = fluency[i]
            rows.append(row)
        return EditMetrics(tuple(rows), summarize_rows(rows), predictions)

    def on_edit(self, session, delta=None) -> EditMetrics:
        """For sequential editing, `EditSession(..., on_edit=evaluator.on_edit, every=N)`: the metrics of
        `session.model` on the requests edited so far (the first `session.edits`, when the session edits this
        evaluator's requests in order); every request when `session.edits` is 0 or more than there are."""
        n = int(getattr(session, "edits", 0))
        return self(session.model, which=range(min(n, len(self.requests)) if n else len(self.requests)))

    @staticmethod
    def _probability(lay, scores) -> dict[str, float]:
        out = {}
        kinds = [("rewrite", "efficacy"), ("paraphrase", "paraphrase"), ("neighborhood", "neighborhood")]
        if "neighborhood_unedited" in lay:
            kinds.append(("neighborhood_unedited", "neighborhood_unedited"))
        for kind, name in kinds:
            whole, first = [], []
            for a, b in lay[kind]:
                if b is None:
                    continue
                na, nb = scores[a][0], scores[b][0]
                whole.append(_cmp(float(na.mean()), float(nb.mean())))
                first.append(_cmp(float(na[0]), float(nb[0])))
            for suffix, vals in (("", whole), ("_first", first)):
                out[f"{name}_score{suffix}"] = _mean([v[0] for v in vals])
                out[f"{name}_magnitude{suffix}"] = _mean([v[1] for v in vals])
        return out

    @staticmethod
    def _accuracy(lay, scores, ref) -> dict[str, float]:
        out = {}
        for kind, name in (("rewrite", "rewrite"), ("paraphrase", "paraphrase"), ("neighborhood", "neighborhood")):
            hits = [scores[a][1] == np.asarray(a[1]) for a, _ in lay[kind]]
            out[f"{name}_acc"] = _mean([float(h.mean()) for h in hits])
            out[f"{name}_gen_acc"] = _mean([float(h.all()) for h in hits])
        loc = []
        if ref is not None:
            for a, _ in lay["neighborhood"]:
                if a not in ref:
                    raise EvaluationError("the reference has no prediction for a neighbourhood prompt of this "
                                          "evaluation (pass the reference model, or metrics of the same requests)")
                loc.append(float(np.mean(scores[a][1] == np.asarray(ref[a]))))
        out["locality"] = _mean(loc)
        return out

    def _fluency(self, model, which: Sequence[int], key) -> dict[int, float]:
        texts = fluency_texts(model, self.enc, [self.generation_prompts[i] for i in which],
                              max_new_tokens=self.fluency_tokens, key=key, top_k=self.top_k,
                              batch_size=self.batch_size)
        return {i: _mean([ngram_entropy(t) for t in ts]) for i, ts in zip(which, texts)}


def fluency_texts(model: nnx.Module, enc: Encoder, prompts: Sequence[Sequence[str]], *, max_new_tokens: int = 100,
                  key=None, top_k: int | None = 5, batch_size: int = 32) -> list[list[str]]:
    """prompt + decoded continuation of `max_new_tokens` tokens for every prompt (greedy without `key`, top-k
    sampling with it; left-padded batches of `batch_size` rows, lengths rounded up to a multiple of 8)."""
    flat = [(i, p) for i, ps in enumerate(prompts) for p in ps]
    ids = [enc.ids(p) for _, p in flat]
    out: list[list[str]] = [[] for _ in prompts]
    for start in range(0, len(flat), batch_size):
        chunk = ids[start:start + batch_size]
        t = _round_up(max(len(x) for x in chunk), LENGTH_MULTIPLE)
        x = np.zeros((batch_size, t), np.int32)
        mask = np.zeros((batch_size, t), np.int32)
        for row, s in enumerate(chunk):
            x[row, t - len(s):] = s
            mask[row, t - len(s):] = 1
        mask[len(chunk):, -1] = 1  # padding rows: one token, so that every row has a prompt
        sample = {} if key is None else dict(temperature=1.0, top_k=top_k,
                                             rng=jax.random.fold_in(key, start))
        gen = np.asarray(generate(model, jnp.asarray(x), attention_mask=jnp.asarray(mask),
                                  max_new_tokens=max_new_tokens, **sample))[:, t:]
        for row in range(len(chunk)):
            i, p = flat[start + row]
            out[i].append(p + enc.decode(gen[row]))
    return out


def evaluate_requests(model: nnx.Module, tokenizer, requests: Sequence[Request], *, reference=None,
                      metrics: Sequence[str] = ("probability", "accuracy"), batch_size: int = 32,
                      bos_id: int | None = None, generation_prompts: Sequence[Sequence[str]] | None = None,
                      fluency_tokens: int = 100, top_k: int | None = 5, key=None,
                      edited_subjects: Sequence[str] = ()) -> EditMetrics:
    """Metrics of `model` on edit requests (module docstring).

    reference: the unedited model (or the EditMetrics of evaluating it on these requests with 'accuracy'), for
    EasyEdit's locality. metrics: groups of METRIC_GROUPS ('probability', 'accuracy': one forward pass over every
    distinct (prompt, target); 'fluency': generation). bos_id: prepended to every prompt when given.
    generation_prompts: per request, the prompts for fluency (default: the rewrite prompt and the paraphrases).
    key: top-k sampling of fluency generations (greedy without). edited_subjects: the subjects that the edit run
    being scored changes (batch or sequential editing of several requests): neighbourhood prompts naming one of
    them (other than the case's own) are left out of the additional NS-u / NM-u (module docstring)."""
    ev = Evaluator(tokenizer, requests, metrics=metrics, reference=reference, batch_size=batch_size, bos_id=bos_id,
                   generation_prompts=generation_prompts, fluency_tokens=fluency_tokens, top_k=top_k,
                   edited_subjects=edited_subjects)
    return ev(model, key=key)


def _cell(name: str, s: Stat | None) -> str:
    if s is None or s.n == 0:
        return "–"
    scale = 1.0 if name in FLUENCY else 100.0
    text = f"{scale * s.mean:.1f}" if name not in FLUENCY else f"{s.mean:.2f}"
    if not math.isnan(s.stderr):
        text += f" ± {scale * s.stderr:.1f}" if name not in FLUENCY else f" ± {s.stderr:.2f}"
    return text


def summarize(results: EditMetrics | Mapping[str, EditMetrics], columns: Sequence[str] = TABLE_COLUMNS) -> str:
    """A markdown table, one row per labelled result (mean ± stderr; scores, magnitudes and accuracies in percent,
    fluency in bits); columns that no result has are left out."""
    if isinstance(results, EditMetrics):
        results = {"model": results}
    cols = [c for c in columns if any(c in m.summary for m in results.values())]
    n = max((s.n for m in results.values() for s in m.summary.values()), default=0)
    head = "| | " + " | ".join(SHORT.get(c, c) for c in cols) + " |"
    lines = [head, "|---" * (len(cols) + 1) + "|"]
    for label, m in results.items():
        lines.append(f"| {label} | " + " | ".join(_cell(c, m.summary.get(c)) for c in cols) + " |")
    legend = ", ".join(f"{SHORT.get(c, c)} = {c}" for c in cols)
    return "\n".join(lines) + f"\n\n{n} cases; {legend}.\n"


def write_summary(path: str | Path, results: EditMetrics | Mapping[str, EditMetrics],
                  columns: Sequence[str] = TABLE_COLUMNS) -> Path:
    """Writes `summarize(results, columns)` to `path` (a markdown file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(summarize(results, columns), encoding="utf-8")
    return path
