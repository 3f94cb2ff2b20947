"""Edit request sets: real facts a model knows (checked against the model), and a synthetic testbed at scale.

    facts = build_fact_set(model, tok, relations)      # RelationSpec candidates -> Requests the model knows
    facts.write("experiments/edit/data/smollm2_facts.jsonl"); print(facts.report.markdown())
    bed = synthetic_testbed(seed=0, n_entities=2000, n_requests=500)
    bed.texts          # pre-training corpus: every fact in every training template + augmented biographies
    bed.requests       # Requests: counterfactual targets, held-out paraphrase templates, neighbourhood prompts

Real facts (`build_fact_set`). A RelationSpec is a completion prompt with '{}' for the subject ('The capital of {}
is'), paraphrase templates and hand-written (subject, true object) pairs. A fact is *known* when the model's greedy
continuation of the prompt is exactly the tokens of ' ' + object: the teacher-forced argmax of every target token is
the target token, which is the same condition (evaluate.py's module docstring), so one batched forward pass checks
all candidates. Kept: the facts whose prompt is known and whose paraphrases are known for at least one template; a
request keeps only its known paraphrases (up to `n_paraphrases`, in template order). Counterfactual target: another
object of the same relation (same type), drawn with a generator seeded by (seed, relation, subject) among the
relation's objects whose first token differs from the true one's (so first-token metrics never tie). Neighbourhood:
up to `n_neighbours` other kept facts of the relation (their prompts, with their own true targets, so the model knows
them): those sharing the true object first (CounterFact's neighbourhood), then the others, each group in a seeded
order; never one whose object is the counterfactual target.

Synthetic testbed (`synthetic_testbed`): data.synthetic.FactsCorpus (invented entities, closed object sets, >= 3
training templates and held-out paraphrase templates per relation) turned into a pre-training text list and edit
requests (`Request.from_edit_request`) for a seeded sample of distinct (entity, relation) facts.
"""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Sequence

import numpy as np
from flax import nnx

from configurable_fm.data.synthetic import FactsCorpus
from configurable_fm.data.synthetic.tasks import stable_int
from configurable_fm.ops.update.evaluate import score_items
from configurable_fm.ops.update.keys import Encoder
from configurable_fm.ops.update.requests import PLACEHOLDER, Request, RequestError, dump_requests, fill


@dataclasses.dataclass(frozen=True)
class RelationSpec:
    """A relation of candidate facts: `prompt` and `paraphrases` hold one '{}' each for the subject and end where
    the object follows (after a space); `facts` are (subject, object) pairs, objects without a leading space."""

    name: str
    prompt: str
    paraphrases: tuple[str, ...]
    facts: tuple[tuple[str, str], ...]

    def __post_init__(self):
        object.__setattr__(self, "paraphrases", tuple(self.paraphrases))
        object.__setattr__(self, "facts", tuple((s, o) for s, o in self.facts))
        for t in (self.prompt,) + self.paraphrases:
            if t.count(PLACEHOLDER) != 1 or t != t.rstrip():
                raise RequestError(f"relation {self.name!r}: template {t!r} needs exactly one '{{}}' and no trailing "
                                   "space (the target carries it)")
        for s, o in self.facts:
            if not s.strip() or not o.strip() or o != o.strip():
                raise RequestError(f"relation {self.name!r}: bad fact {(s, o)!r} (non-empty subject and object, "
                                   "the object without surrounding spaces)")
        if len({o for _, o in self.facts}) < 2:
            raise RequestError(f"relation {self.name!r}: needs >= 2 distinct objects for counterfactual targets")


@dataclasses.dataclass
class FactReport:
    """Per relation: candidates, facts known at the prompt, facts kept (prompt and >= 1 paraphrase known)."""

    candidates: dict[str, int] = dataclasses.field(default_factory=dict)
    known: dict[str, int] = dataclasses.field(default_factory=dict)
    kept: dict[str, int] = dataclasses.field(default_factory=dict)
    paraphrases_known: dict[str, float] = dataclasses.field(default_factory=dict)

    def markdown(self) -> str:
        lines = ["| relation | candidates | known (prompt) | kept | paraphrases known |", "|---|---|---|---|---|"]
        for r in self.candidates:
            lines.append(f"| {r} | {self.candidates[r]} | {self.known[r]} | {self.kept[r]} | "
                         f"{100 * self.paraphrases_known[r]:.0f}% |")
        lines.append(f"| total | {sum(self.candidates.values())} | {sum(self.known.values())} | "
                     f"{sum(self.kept.values())} | |")
        return "\n".join(lines)


def known_targets(model: nnx.Module, tokenizer, pairs: Sequence[tuple[str, str]], *, batch_size: int = 32,
                  bos_id: int | None = None) -> list[bool]:
    """For each (prompt text, target): whether greedy decoding of len(target tokens) tokens gives the target."""
    enc = Encoder(tokenizer, bos_id)
    items = [(tuple(enc.ids(p)), tuple(enc.target(t))) for p, t in pairs]
    unique = list(dict.fromkeys(items))
    scored = score_items(model, unique, batch_size=batch_size)
    ok = {it: bool(np.array_equal(arg, np.asarray(it[1]))) for it, (_, arg) in zip(unique, scored)}
    return [ok[it] for it in items]


def _rng(seed: int, *parts: str) -> np.random.Generator:
    return np.random.default_rng([seed, stable_int("edit_facts", *parts)])


def build_fact_set(model: nnx.Module, tokenizer, relations: Sequence[RelationSpec], *, n_paraphrases: int = 2,
                   n_neighbours: int = 10, seed: int = 0, batch_size: int = 32,
                   bos_id: int | None = None) -> "FactSet":
    """Requests for the candidate facts the model knows (module docstring), relation by relation, case ids 0..n-1
    in that order, with each request's relation and the counts per relation."""
    names = [r.name for r in relations]
    if len(set(names)) != len(names):
        raise RequestError(f"relation names must be distinct, got {names}")
    enc = Encoder(tokenizer, bos_id)
    pairs = [(fill(t, s), " " + o) for r in relations for s, o in r.facts for t in (r.prompt,) + r.paraphrases]
    ok = iter(known_targets(model, tokenizer, pairs, batch_size=batch_size, bos_id=bos_id))
    report, out, rel = FactReport(), [], []
    for r in relations:
        kept: list[tuple[str, str, tuple[str, ...]]] = []
        n_known, para_hits = 0, []
        for s, o in r.facts:
            main = next(ok)
            paras = [t for t in r.paraphrases if next(ok)]
            n_known += main
            if main:
                para_hits.append(len(paras) / max(len(r.paraphrases), 1))
            if main and paras and s not in {k[0] for k in kept}:
                kept.append((s, o, tuple(paras[:n_paraphrases])))
        report.candidates[r.name], report.known[r.name], report.kept[r.name] = len(r.facts), n_known, len(kept)
        report.paraphrases_known[r.name] = float(np.mean(para_hits)) if para_hits else 0.0
        first = {o: enc.target(" " + o)[0] for o in {o for _, o in r.facts}}
        objects = sorted(first)
        for s, o, paras in kept:
            choices = [x for x in objects if first[x] != first[o]]
            if not choices:
                raise RequestError(f"relation {r.name!r}: no counterfactual for {s!r} (every object starts with "
                                   f"the token of {o!r})")
            new = choices[int(_rng(seed, r.name, s, "new").integers(len(choices)))]
            rng = _rng(seed, r.name, s, "neighbours")
            others = [(s2, o2) for s2, o2, _ in kept if s2 != s and o2 != new]
            same = [x for x in others if x[1] == o]
            rest = [x for x in others if x[1] != o]
            chosen = ([same[i] for i in rng.permutation(len(same))] + [rest[i] for i in rng.permutation(len(rest))])
            chosen = chosen[:n_neighbours]
            out.append(Request(prompt=r.prompt, subject=s, target_new=" " + new, target_true=" " + o,
                               paraphrase_prompts=paras,
                               neighborhood_prompts=tuple(fill(r.prompt, s2) for s2, _ in chosen),
                               neighborhood_targets=tuple(" " + o2 for _, o2 in chosen), case_id=len(out)))
            rel.append(r.name)
    return FactSet(tuple(out), tuple(rel), report)


@dataclasses.dataclass(frozen=True)
class FactSet:
    """Requests, the relation of each, and the counts per relation (FactReport)."""

    requests: tuple[Request, ...]
    relations: tuple[str, ...]
    report: FactReport

    def write(self, path: str | os.PathLike) -> Path:
        return write_fact_set(self.requests, path, self.relations)


def write_fact_set(requests: Sequence[Request], path: str | os.PathLike,
                   relations: Sequence[str] | None = None) -> Path:
    """Flat-form JSONL (requests.load_requests reads it); with `relations`, one extra key per record, 'relation'."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = []
    for i, r in enumerate(requests):
        record = {"case_id": r.case_id} | ({} if relations is None else {"relation": relations[i]}) | {
                  "prompt": r.prompt, "subject": r.subject,
                  "target_new": r.target_new, "target_true": r.target_true,
                  "paraphrase_prompts": list(r.paraphrase_prompts),
                  "neighborhood_prompts": list(r.neighborhood_prompts),
                  "neighborhood_targets": list(r.neighborhood_targets)}
        lines.append(json.dumps(record, ensure_ascii=False))
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


# ---------------------------------------------------------------------------------------- synthetic testbed
@dataclasses.dataclass(frozen=True)
class Testbed:
    """A synthetic facts world: `corpus` (the FactsCorpus), `texts` (pre-training text, shuffled), `requests`
    (edit requests in the flat Request form), `held_out` (the paraphrase templates never in `texts`)."""

    corpus: FactsCorpus
    texts: tuple[str, ...]
    requests: tuple[Request, ...]

    @property
    def held_out(self) -> tuple[str, ...]:
        return tuple(t for r in self.corpus.relations for t in r.paraphrases)

    def write(self, directory: str | os.PathLike, *, lines_per_file: int = 256) -> Path:
        """directory/{corpus.json, requests.jsonl, train.txt (one text per line), texts/NNNNN.txt (the same lines,
        `lines_per_file` per file: documents for the trainer's `files` dataset, e.g.
        `cfm-prepare-data --config experiments/data.py:files --config.files.root=DIR/texts`)}."""
        d = Path(directory)
        (d / "texts").mkdir(parents=True, exist_ok=True)
        self.corpus.save(d / "corpus.json")
        (d / "train.txt").write_text("".join(t + "\n" for t in self.texts), encoding="utf-8")
        for k, i in enumerate(range(0, len(self.texts), lines_per_file)):
            (d / "texts" / f"{k:05d}.txt").write_text("".join(t + "\n" for t in self.texts[i:i + lines_per_file]),
                                                      encoding="utf-8")
        dump_requests(self.requests, d / "requests.jsonl")
        return d


def profiles(corpus: FactsCorpus, n_per_entity: int, seed: int) -> list[str]:
    """Profile lines, n_per_entity per entity: the name followed directly by all its objects in a seeded random
    order, '{subject} {o_1}, {o_2}, ..., {o_R}.' (entity-major order). The token after the subject's last token is
    any one of its objects, so next-token prediction at that token needs every attribute of the entity there: the
    model stores facts at the subject (its early MLPs enrich the name with its attributes), as causal tracing
    finds in real LMs (Meng et al. 2022; Geva et al. 2023), instead of looking them up at the query's last token
    only. Objects of different relations are distinct strings, so a list needs no relation labels."""
    rng = _rng(seed, "profiles")
    out = []
    for e in corpus.entities:
        objs = [corpus.facts[e][r.name] for r in corpus.relations]
        for _ in range(n_per_entity):
            out.append(f"{e} " + ", ".join(objs[int(i)] for i in rng.permutation(len(objs))) + ".")
    return out


def shared_first_names(corpus: FactsCorpus, n_first: int, seed: int) -> FactsCorpus:
    """The corpus with every entity renamed '{first} {last}': its own last name and a first name drawn (seeded)
    from a pool of `n_first` (the first names of the first entities), redrawn on a clash, facts unchanged. With
    unique invented first names a model identifies the entity at the first name's tokens and looks its facts up
    there (causal traces: the whole effect at the first name, none at the subject's last token); with a few shared
    first names the entity is known only at the last name, so the facts are read at the subject's last token, as
    ROME and MEMIT assume (experiments/edit/README.md)."""
    pool = list(dict.fromkeys(e.split(" ")[0] for e in corpus.entities))[:n_first]
    if len(pool) < 1:
        raise ValueError(f"shared_first_names: need n_first >= 1, got {n_first}")
    rng = _rng(seed, "first_names")
    names, seen = {}, set()
    for e in corpus.entities:
        last = e.split(" ", 1)[1]
        for _ in range(100):
            name = f"{pool[int(rng.integers(len(pool)))]} {last}"
            if name not in seen:
                break
        else:
            raise ValueError(f"shared_first_names: no free first name for {last!r} among {len(pool)}")
        seen.add(name)
        names[e] = name
    return FactsCorpus(corpus.seed, corpus.relations, tuple(names[e] for e in corpus.entities),
                       {names[e]: f for e, f in corpus.facts.items()})


def synthetic_testbed(seed: int, n_entities: int, n_requests: int, *, relations=None, biographies: int = 2,
                      n_profiles: int = 0, first_names: int = 0, n_neighbours: int = 10) -> Testbed:
    """A FactsCorpus of n_entities (data.synthetic.facts; default relations: all of RELATIONS) with its
    pre-training texts (every fact in every training template, plus `biographies` augmented documents and
    `n_profiles` profile lines (`profiles`) per entity, shuffled by a generator seeded by seed; with
    `first_names` > 0 the entities share that many first names, `shared_first_names`) and `n_requests`
    edit requests of distinct (entity, relation) facts drawn by a generator seeded by seed (case ids 0..n-1).
    Deterministic in its arguments."""
    kw = {} if relations is None else {"relations": relations}
    corpus = FactsCorpus.generate(seed=seed, n_entities=n_entities, **kw)
    if first_names:
        corpus = shared_first_names(corpus, first_names, seed)
    facts = corpus.all_facts()
    if not 0 <= n_requests <= len(facts):
        raise ValueError(f"n_requests must be in [0, {len(facts)}] (the corpus has {len(facts)} facts), "
                         f"got {n_requests}")
    texts = corpus.training_texts() + corpus.biographies(n_per_entity=biographies, seed=seed)
    texts += profiles(corpus, n_profiles, seed) if n_profiles else []
    order = _rng(seed, "texts").permutation(len(texts))
    picks = _rng(seed, "requests").choice(len(facts), size=n_requests, replace=False)
    requests = tuple(Request.from_edit_request(corpus.edit_request(facts[int(i)], seed=seed, n_neighbours=n_neighbours),
                                               case_id=k) for k, i in enumerate(picks))
    return Testbed(corpus, tuple(texts[i] for i in order), requests)
