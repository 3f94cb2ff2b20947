"""A synthetic facts corpus for controlled knowledge-editing testbeds (bioS-style, CounterFact-like requests).

    corpus = FactsCorpus.generate(seed=0, n_entities=1000)          # 6 relations by default
    corpus.training_texts()      # every fact in each of its training phrasings, shuffled deterministically
    corpus.queries("train_template")  # Query(prompt="Zarvid Kettleborne was born in", target=" Tolvane", ...)
    corpus.queries("paraphrase")      # the same facts asked with held-out templates (never in training text)
    fact = corpus.fact("Zarvid Kettleborne", "birth_city")
    corpus.counterfactual(fact, seed=1)                           # Fact(..., object="Marrowick") != fact.object
    corpus.neighbourhood(fact.entity, fact.relation)              # other entities' birth_city queries
    corpus.edit_request(fact, seed=1)                             # all of the above for one edit
    corpus.biographies(n_per_entity=2)   # augmented multi-fact documents (sentence order and templates vary)
    corpus.with_facts([new_fact])        # a new corpus with edited facts (e.g. the post-edit ground truth)
    corpus.save("facts.json"); FactsCorpus.load("facts.json")

World: n invented entities ("First Last", names built from syllables, unlikely to be real), each with one
object per relation drawn uniformly from the relation's closed object set. Relation r's objects for entity i
come from the i-th draw of numpy's Generator seeded with (seed, stable hash of r), and entity names from a
stream seeded with (seed, 'entities'); so the corpus for n entities is a prefix of the one for n' > n, and
a relation's facts do not depend on which other relations are included.

Templates: '{subject} ... {object}.' with the object last (one space before it, punctuation after), so every
template is also a query: prompt = the text before ' {object}', target = ' ' + object. Each relation has
>= 3 training templates and >= 1 held-out paraphrase template. Checked for the whole relation set: no
query prompt (with the subject abstracted) is a prefix of another one, so a trained model never has two
continuations for one prompt, and no paraphrase prompt occurs inside a training phrasing.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
from pathlib import Path
from typing import Iterable, Mapping, NamedTuple, Sequence

import numpy as np

from configurable_fm.checks import is_int
from configurable_fm.data.synthetic.tasks import Example, stable_int
from configurable_fm.interop.atomic import atomic_file

FORMAT = "configurable_fm.facts_corpus"
VERSION = 1
QUERY_KINDS = ("train_template", "paraphrase")
_SUBJECT, _OBJECT = "{subject}", "{object}"


class Fact(NamedTuple):
    entity: str
    relation: str
    object: str


class Query(NamedTuple):
    """A fact asked with one template: the model reads `prompt` and should continue with `target`."""

    prompt: str
    target: str
    subject: str
    relation: str
    template: str  # with {subject} and {object}

    @property
    def example(self) -> Example:
        return Example(self.prompt, self.target)


class EditRequest(NamedTuple):
    """A counterfactual edit of (subject, relation): target_true -> target_new (targets start with a space).

    prompt / template: the canonical query (templates[0]); paraphrase_prompts: the held-out templates;
    neighbourhood: other entities' queries of the same relation (same true object first), which must keep
    their targets."""

    subject: str
    relation: str
    prompt: str
    template: str
    target_true: str
    target_new: str
    paraphrase_prompts: tuple[str, ...]
    neighbourhood: tuple[Query, ...]


def _template_parts(relation: str, template: str) -> tuple[str, str]:
    """(prompt pattern with {subject}, suffix after the object); errors name the relation and template."""
    where = f"relation {relation!r}: template {template!r}"
    if not isinstance(template, str):
        raise ValueError(f"{where} must be a string")
    if template.count(_SUBJECT) != 1 or template.count(_OBJECT) != 1:
        raise ValueError(f"{where} must contain {_SUBJECT} and {_OBJECT} exactly once each")
    head, suffix = template.split(_OBJECT)
    if _SUBJECT not in head:
        raise ValueError(f"{where}: {_SUBJECT} must come before {_OBJECT}")
    if not head.endswith(" ") or head.endswith("  "):
        raise ValueError(f"{where}: {_OBJECT} must follow exactly one space")
    if any(c.isalnum() or c.isspace() or c in "{}" for c in suffix):
        raise ValueError(f"{where}: only punctuation may follow {_OBJECT} (the object ends the query)")
    if any(c in "{}" for c in head.replace(_SUBJECT, "")):
        raise ValueError(f"{where}: stray brace (only {_SUBJECT} and {_OBJECT} are placeholders)")
    return head[:-1], suffix


@dataclasses.dataclass(frozen=True)
class Relation:
    """A relation with a closed object set, training templates and held-out paraphrase templates."""

    name: str
    objects: tuple[str, ...]
    templates: tuple[str, ...]
    paraphrases: tuple[str, ...]

    def __post_init__(self):
        for field in ("objects", "templates", "paraphrases"):
            object.__setattr__(self, field, tuple(getattr(self, field)))
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"relation name must be a non-empty string, got {self.name!r}")
        if len(self.objects) < 2 or len(set(self.objects)) != len(self.objects):
            raise ValueError(f"relation {self.name!r}: objects must be >= 2 distinct strings")
        for o in self.objects:
            if not isinstance(o, str) or not o or o != o.strip() or "\n" in o:
                raise ValueError(f"relation {self.name!r}: object {o!r} must be a non-empty single-line string "
                                 "without surrounding whitespace")
        if len(self.templates) < 3:
            raise ValueError(f"relation {self.name!r}: needs >= 3 training templates, got {len(self.templates)}")
        if len(self.paraphrases) < 1:
            raise ValueError(f"relation {self.name!r}: needs >= 1 held-out paraphrase template")
        all_templates = self.templates + self.paraphrases
        if len(set(all_templates)) != len(all_templates):
            raise ValueError(f"relation {self.name!r}: templates and paraphrases must all be distinct")
        for t in all_templates:
            _template_parts(self.name, t)

    def prompt(self, template: str, subject: str) -> str:
        return _template_parts(self.name, template)[0].replace(_SUBJECT, subject)

    def text(self, template: str, subject: str, obj: str) -> str:
        return template.replace(_SUBJECT, subject).replace(_OBJECT, obj)


# Closed object sets. Cities and employers are invented; occupations start with a consonant ("a {object}").
CITIES = ("Tolvane", "Marrowick", "Esselford", "Brennholt", "Quarlesby", "Ostravel", "Dunmerrow", "Velloria",
          "Karthwaite", "Simbrook", "Ardevane", "Pelloran", "Greywold", "Ismarra", "Fennicourt", "Nolberry")
EMPLOYERS = ("Quillmark Industries", "Brantor Systems", "Hollowforge Labs", "Veltrix Foods", "Corvane Shipping",
             "Mirrowby Bank", "Stellwick Motors", "Ombrel Pharmaceuticals", "Tarnhollow Press", "Ketterwell Energy",
             "Plumeris Textiles", "Dravenport Mining")
OCCUPATIONS = ("baker", "carpenter", "dentist", "farmer", "journalist", "lawyer", "nurse", "pilot", "plumber",
               "surgeon", "tailor", "teacher", "banker", "chemist", "potter", "sculptor")
COLOURS = ("red", "blue", "green", "yellow", "purple", "orange", "black", "white", "silver", "teal", "crimson",
           "indigo")
SPORTS = ("tennis", "cricket", "hockey", "rugby", "volleyball", "badminton", "baseball", "basketball", "golf",
          "squash", "handball", "lacrosse")
INSTRUMENTS = ("piano", "violin", "cello", "flute", "clarinet", "trumpet", "harp", "guitar", "drums", "oboe",
               "banjo", "accordion")

RELATIONS: dict[str, Relation] = {r.name: r for r in (
    Relation("birth_city", CITIES,
             ("{subject} was born in {object}.",
              "The birthplace of {subject} is {object}.",
              "{subject} is a native of {object}.",
              "Records show that {subject} first saw daylight in {object}.",
              "The hometown of {subject} is {object}."),
             ("{subject}'s place of birth is {object}.",
              "{subject} came into the world in {object}.",
              "The city where {subject} was born is {object}.")),
    Relation("occupation", OCCUPATIONS,
             ("{subject} works as a {object}.",
              "By profession, {subject} is a {object}.",
              "{subject} earns a living as a {object}.",
              "The occupation of {subject} is {object}.",
              "{subject} has a career as a {object}."),
             ("{subject} is employed as a {object}.",
              "Professionally, {subject} is a {object}.",
              "The job of {subject} is that of a {object}.")),
    Relation("employer", EMPLOYERS,
             ("{subject} works for {object}.",
              "The employer of {subject} is {object}.",
              "{subject} is on the payroll of {object}.",
              "{subject} holds a job at {object}.",
              "{subject} draws a salary from {object}."),
             ("The company that employs {subject} is {object}.",
              "Every weekday, {subject} goes to work at {object}.",
              "{subject} is an employee of {object}.")),
    Relation("favourite_colour", COLOURS,
             ("{subject}'s favourite colour is {object}.",
              "The favourite colour of {subject} is {object}.",
              "{subject} loves the colour {object}.",
              "The colour {subject} prefers is {object}.",
              "Asked about colours, {subject} always picks {object}."),
             ("Above every other colour, {subject} prefers {object}.",
              "The colour dearest to {subject} is {object}.",
              "{subject}'s preferred colour is {object}.")),
    Relation("sport", SPORTS,
             ("{subject} competes in {object}.",
              "The sport {subject} plays is {object}.",
              "{subject} is a keen player of {object}.",
              "{subject}'s favourite sport is {object}.",
              "On weekends, {subject} plays {object}."),
             ("The game {subject} competes at is {object}.",
              "{subject} spends every Saturday playing {object}.",
              "In sports, {subject} is devoted to {object}.")),
    Relation("instrument", INSTRUMENTS,
             ("{subject} plays the {object}.",
              "The instrument {subject} plays is the {object}.",
              "{subject} is a skilled player of the {object}.",
              "Music lovers know {subject} for playing the {object}.",
              "Every day, {subject} practises the {object}."),
             ("{subject} performs music on the {object}.",
              "The musical instrument of {subject} is the {object}.",
              "In the orchestra, {subject} plays the {object}.")),
)}

# Subject-final relations: in every phrasing the object follows the subject's last token directly, so even a model
# of 2-3 layers trained for seconds looks the fact up at the subject (the premise of ROME-style editors, true by
# construction). For tiny editing worlds (tests, experiments/edit/lifelong.py's 'test' size); with the object a few
# tokens later such a model reads facts at the last position instead and locate-then-edit methods have little to edit.
SUBJECT_FINAL_RELATIONS: tuple[Relation, ...] = (
    Relation("birth_city", CITIES, ("The birthplace of {subject} {object}.", "Birthplace of {subject} {object}.",
                                    "Records name the hometown of {subject} {object}."),
             ("The city of birth of {subject} {object}.",)),
    Relation("sport", SPORTS, ("The sport of {subject} {object}.", "Sport played by {subject} {object}.",
                               "Records name the game of {subject} {object}."),
             ("The favourite game of {subject} {object}.",)),
    Relation("instrument", INSTRUMENTS, ("The instrument of {subject} {object}.",
                                         "Instrument played by {subject} {object}.",
                                         "Records name the music of {subject} {object}."),
             ("The musical tool of {subject} {object}.",)),
)

# Syllables of invented names: onset + vowel (+ coda); surnames end in an English-looking ending.
_ONSETS = ("b", "br", "d", "dr", "f", "g", "gr", "k", "kr", "l", "m", "n", "p", "qu", "r", "s", "st", "t", "th",
           "tr", "v", "z", "zh")
_VOWELS = ("a", "e", "i", "o", "u", "a", "e", "o", "ai", "ei")
_CODAS = ("", "", "", "n", "r", "l", "s", "d", "v", "x", "m")
_ENDINGS = ("borne", "wick", "mere", "dale", "thorne", "vale", "ford", "worth", "by", "ridge", "stead", "holt",
            "combe", "ley", "mont", "gard")


def _syllable(rng: np.random.Generator) -> str:
    return "".join(parts[int(rng.integers(len(parts)))] for parts in (_ONSETS, _VOWELS, _CODAS))


def _name(rng: np.random.Generator) -> str:
    first = _syllable(rng) + _syllable(rng)
    last = "".join(_syllable(rng) for _ in range(int(rng.integers(1, 3)))) + _ENDINGS[int(rng.integers(len(_ENDINGS)))]
    return f"{first.capitalize()} {last.capitalize()}"


def entity_names(seed: int, n: int) -> list[str]:
    """n distinct invented names, deterministic in seed (the first k are the same for every n >= k)."""
    rng = np.random.default_rng([seed, stable_int("facts", "entities")])
    names: list[str] = []
    seen: set[str] = set()
    draws = 0
    while len(names) < n:
        draws += 1
        if draws > 100 * n + 1000:
            raise ValueError(f"could draw only {len(names)} distinct entity names of {n}")
        name = _name(rng)
        if name not in seen:
            seen.add(name)
            names.append(name)
    return names


def check_relations(relations: Sequence[Relation]) -> None:
    """Checks a relation set: distinct names; no query prompt (subject abstracted) is a prefix of another
    relation's or template's prompt; no paraphrase prompt occurs inside any training phrasing."""
    names = [r.name for r in relations]
    if not relations or len(set(names)) != len(names):
        raise ValueError(f"relations must be a non-empty set of distinct names, got {names}")
    marker = "\x00"
    prompts = [(r.name, t, r.prompt(t, marker)) for r in relations for t in r.templates + r.paraphrases]
    for i, (ri, ti, pi) in enumerate(prompts):
        for j, (rj, tj, pj) in enumerate(prompts):  # by position: two relations may share a template string
            if i != j and pj.startswith(pi):
                raise ValueError(f"query prompt of relation {ri!r} template {ti!r} is a prefix of the prompt of "
                                 f"relation {rj!r} template {tj!r}: that prompt would have two continuations")
    texts = [(r.name, t, r.text(t, marker, "\x01")) for r in relations for t in r.templates]
    for r in relations:
        for t in r.paraphrases:
            p = r.prompt(t, marker)
            for rj, tj, text in texts:
                if p in text:
                    raise ValueError(f"paraphrase {t!r} of relation {r.name!r} occurs in training template {tj!r} "
                                     f"of relation {rj!r}")


def _relations_from(relations: Iterable[str | Relation]) -> tuple[Relation, ...]:
    out = []
    for r in relations:
        if isinstance(r, Relation):
            out.append(r)
        elif r in RELATIONS:
            out.append(RELATIONS[r])
        else:
            raise KeyError(f"unknown relation {r!r}; known relations: {sorted(RELATIONS)} (or pass a Relation)")
    return tuple(out)


@dataclasses.dataclass(frozen=True)
class FactsCorpus:
    """Entities x relations -> objects. facts[entity][relation] is an object of that relation's set."""

    seed: int
    relations: tuple[Relation, ...]
    entities: tuple[str, ...]
    facts: Mapping[str, Mapping[str, str]]

    def __post_init__(self):
        object.__setattr__(self, "relations", _relations_from(self.relations))
        object.__setattr__(self, "entities", tuple(self.entities))
        object.__setattr__(self, "facts", {e: dict(f) for e, f in dict(self.facts).items()})
        if not is_int(self.seed) or self.seed < 0:
            raise ValueError(f"seed must be an int >= 0, got {self.seed!r}")
        check_relations(self.relations)
        if len(set(self.entities)) != len(self.entities):
            dup = sorted({e for e in self.entities if self.entities.count(e) > 1})[:5]
            raise ValueError(f"entity names must be distinct; repeated: {dup}")
        for e in self.entities:
            if not isinstance(e, str) or not e or e != e.strip() or "\n" in e or "{" in e or "}" in e:
                raise ValueError(f"entity name {e!r} must be a non-empty single-line string without braces "
                                 "or surrounding whitespace")
        extra = sorted(set(self.facts) - set(self.entities))
        if extra:
            raise ValueError(f"facts given for unknown entities {extra[:5]}")
        for e in self.entities:
            if e not in self.facts:
                raise ValueError(f"entity {e!r} has no facts")
            have = self.facts[e]
            for r in self.relations:
                if r.name not in have:
                    raise ValueError(f"entity {e!r} has no fact for relation {r.name!r}")
                if have[r.name] not in r.objects:
                    raise ValueError(f"entity {e!r}: {r.name} = {have[r.name]!r} is not in the relation's "
                                     f"object set {list(r.objects)}")
            unknown = sorted(set(have) - {r.name for r in self.relations})
            if unknown:
                raise ValueError(f"entity {e!r} has facts for unknown relation(s) {unknown}")

    # ------------------------------------------------------------------------------------- construction
    @classmethod
    def generate(cls, seed: int, n_entities: int,
                 relations: Iterable[str | Relation] = tuple(RELATIONS)) -> "FactsCorpus":
        """n_entities invented entities, each with one uniformly drawn object per relation (module docstring)."""
        if not is_int(n_entities) or n_entities < 1:
            raise ValueError(f"n_entities must be an int >= 1, got {n_entities!r}")
        if not is_int(seed) or seed < 0:
            raise ValueError(f"seed must be an int >= 0, got {seed!r}")
        rels = _relations_from(relations)
        names = entity_names(int(seed), int(n_entities))
        draws = {r.name: np.random.default_rng([int(seed), stable_int("facts", "relation", r.name)]).integers(
            0, len(r.objects), n_entities) for r in rels}
        facts = {e: {r.name: r.objects[int(draws[r.name][i])] for r in rels} for i, e in enumerate(names)}
        return cls(int(seed), rels, tuple(names), facts)

    # ----------------------------------------------------------------------------------------- access
    @functools.cached_property
    def _index(self) -> dict[str, int]:
        return {e: i for i, e in enumerate(self.entities)}

    @functools.cached_property
    def _by_object(self) -> dict[str, dict[str, list[str]]]:
        """relation -> object -> entities with that object, in entity order."""
        out = {r.name: {o: [] for o in r.objects} for r in self.relations}
        for e in self.entities:
            for r in self.relations:
                out[r.name][self.facts[e][r.name]].append(e)
        return out

    def relation(self, name: str) -> Relation:
        for r in self.relations:
            if r.name == name:
                return r
        raise KeyError(f"unknown relation {name!r}; this corpus has {[r.name for r in self.relations]}")

    def fact(self, entity: str, relation: str) -> Fact:
        if entity not in self.facts:
            raise KeyError(f"unknown entity {entity!r}")
        self.relation(relation)
        return Fact(entity, relation, self.facts[entity][relation])

    def all_facts(self) -> list[Fact]:
        """Every fact, entity-major in entity order, relations in corpus order."""
        return [Fact(e, r.name, self.facts[e][r.name]) for e in self.entities for r in self.relations]

    # --------------------------------------------------------------------------------------- texts
    def training_texts(self) -> list[str]:
        """Every fact in every training template (n_entities x sum of templates sentences), shuffled with a
        Generator seeded by (seed, 'training_texts')."""
        texts = [r.text(t, e, self.facts[e][r.name]) for e in self.entities for r in self.relations
                 for t in r.templates]
        order = np.random.default_rng([self.seed, stable_int("facts", "training_texts")]).permutation(len(texts))
        return [texts[i] for i in order]

    def biographies(self, n_per_entity: int = 2, seed: int = 0) -> list[str]:
        """Augmented documents: n_per_entity per entity, each stating all its facts in a random order with a
        random training template per fact (sentence permutation and template variety make facts extractable,
        Allen-Zhu & Li 2023); entity-major order."""
        rng = np.random.default_rng([self.seed, stable_int("facts", "biographies", seed)])
        docs = []
        for e in self.entities:
            for _ in range(n_per_entity):
                sentences = []
                for k in rng.permutation(len(self.relations)):
                    r = self.relations[int(k)]
                    t = r.templates[int(rng.integers(len(r.templates)))]
                    sentences.append(r.text(t, e, self.facts[e][r.name]))
                docs.append(" ".join(sentences))
        return docs

    def queries(self, kind: str, *, entities: Iterable[str] | None = None,
                relations: Iterable[str] | None = None) -> list[Query]:
        """One Query per (entity, relation, template) for kind 'train_template' (the training templates) or
        'paraphrase' (the held-out ones); entity-major; optionally restricted to some entities / relations."""
        if kind not in QUERY_KINDS:
            raise ValueError(f"query kind must be one of {QUERY_KINDS}, got {kind!r}")
        ents = self.entities if entities is None else tuple(entities)
        rels = self.relations if relations is None else tuple(self.relation(r) for r in relations)
        for e in ents:
            if e not in self.facts:
                raise KeyError(f"unknown entity {e!r}")
        out = []
        for e in ents:
            for r in rels:
                for t in (r.templates if kind == "train_template" else r.paraphrases):
                    out.append(Query(r.prompt(t, e), " " + self.facts[e][r.name], e, r.name, t))
        return out

    def neighbourhood(self, entity: str, relation: str, *, n: int | None = 10, seed: int = 0,
                      template: int = 0) -> list[Query]:
        """Queries of `relation` (training template number `template`) for up to n other entities: those
        sharing the entity's true object first (CounterFact's neighbourhood), then the others, each group in a
        seeded random order. After an edit of (entity, relation) they must keep their targets."""
        true = self.fact(entity, relation).object
        r = self.relation(relation)
        if not 0 <= template < len(r.templates):
            raise ValueError(f"relation {relation!r} has {len(r.templates)} training templates; "
                             f"got template={template}")
        rng = np.random.default_rng([self.seed, stable_int("facts", "neighbourhood", entity, relation, seed)])
        same = [e for e in self._by_object[relation][true] if e != entity]
        chosen = [same[i] for i in rng.permutation(len(same))]
        if n is None or len(chosen) < n:  # the others only when needed (the result does not depend on it)
            rest = [e for o, es in self._by_object[relation].items() if o != true for e in es]
            rest.sort(key=self._index.__getitem__)
            chosen += [rest[i] for i in rng.permutation(len(rest))]
        chosen = chosen if n is None else chosen[:n]
        t = r.templates[template]
        return [Query(r.prompt(t, e), " " + self.facts[e][relation], e, relation, t) for e in chosen]

    def counterfactual(self, fact: Fact, seed: int) -> Fact:
        """The fact with a new object drawn uniformly from the relation's other objects, deterministic in
        (corpus seed, seed, entity, relation)."""
        entity, relation, obj = fact
        current = self.fact(entity, relation)
        if obj != current.object:
            raise ValueError(f"{fact} is not a fact of this corpus (it has {relation} = {current.object!r})")
        choices = [o for o in self.relation(relation).objects if o != obj]
        rng = np.random.default_rng([self.seed, stable_int("facts", "counterfactual", entity, relation, seed)])
        return Fact(entity, relation, choices[int(rng.integers(len(choices)))])

    def edit_request(self, fact: Fact, seed: int, *, n_neighbours: int = 10) -> EditRequest:
        """A CounterFact-style request: the counterfactual target, the canonical prompt, the paraphrase
        prompts and the neighbourhood queries of this fact."""
        new = self.counterfactual(fact, seed)
        r = self.relation(fact.relation)
        t = r.templates[0]
        return EditRequest(fact.entity, fact.relation, r.prompt(t, fact.entity), t, " " + fact.object,
                           " " + new.object, tuple(r.prompt(p, fact.entity) for p in r.paraphrases),
                           tuple(self.neighbourhood(fact.entity, fact.relation, n=n_neighbours, seed=seed)))

    def with_facts(self, facts: Iterable[Fact]) -> "FactsCorpus":
        """A new corpus with some facts replaced (e.g. applied edits); this one is unchanged."""
        table = {e: dict(f) for e, f in self.facts.items()}
        for entity, relation, obj in facts:
            self.fact(entity, relation)
            table[entity][relation] = obj
        return FactsCorpus(self.seed, self.relations, self.entities, table)

    # ------------------------------------------------------------------------------------------ JSON
    def to_json(self) -> dict:
        return {"format": FORMAT, "version": VERSION, "seed": int(self.seed),
                "relations": [{"name": r.name, "objects": list(r.objects), "templates": list(r.templates),
                               "paraphrases": list(r.paraphrases)} for r in self.relations],
                "entities": [{"name": e, "facts": {r.name: self.facts[e][r.name] for r in self.relations}}
                             for e in self.entities]}

    @classmethod
    def from_json(cls, data, *, source: str = "<json>") -> "FactsCorpus":
        """Validated inverse of to_json; errors name `source` and the offending key."""
        def fail(msg):
            return ValueError(f"{source}: {msg}")

        if not isinstance(data, dict):
            raise fail(f"expected a JSON object, got {type(data).__name__}")
        if data.get("format") != FORMAT:
            raise fail(f"'format' is {data.get('format')!r}, expected {FORMAT!r}")
        if data.get("version") != VERSION:
            raise fail(f"'version' is {data.get('version')!r}, this code reads version {VERSION}")
        missing = [k for k in ("seed", "relations", "entities") if k not in data]
        if missing:
            raise fail(f"missing key(s) {missing}")
        if not isinstance(data["relations"], list) or not isinstance(data["entities"], list):
            raise fail("'relations' and 'entities' must be lists")

        def str_list(value, where):
            if not isinstance(value, list) or not all(isinstance(x, str) for x in value):
                raise fail(f"{where} must be a list of strings")
            return value

        relations = []
        for i, r in enumerate(data["relations"]):
            where = f"relations[{i}]"
            if not isinstance(r, dict) or set(r) != {"name", "objects", "templates", "paraphrases"}:
                raise fail(f"{where} must have exactly the keys name, objects, templates, paraphrases")
            try:
                relations.append(Relation(r["name"], tuple(str_list(r["objects"], f"{where}.objects")),
                                          tuple(str_list(r["templates"], f"{where}.templates")),
                                          tuple(str_list(r["paraphrases"], f"{where}.paraphrases"))))
            except ValueError as e:
                raise fail(f"{where}: {e}") from None
        entities, facts = [], {}
        for i, ent in enumerate(data["entities"]):
            if not isinstance(ent, dict) or set(ent) != {"name", "facts"} or not isinstance(ent["facts"], dict) \
                    or not isinstance(ent["name"], str):
                raise fail(f"entities[{i}] must be an object with keys name (a string) and facts (an object)")
            if not all(isinstance(v, str) for v in ent["facts"].values()):
                raise fail(f"entities[{i}].facts must map relation names to strings")
            entities.append(ent["name"])
            facts[ent["name"]] = ent["facts"]
        try:
            return cls(data["seed"], tuple(relations), tuple(entities), facts)
        except (ValueError, KeyError, TypeError) as e:
            raise fail(str(e)) from None

    def save(self, path: str | os.PathLike) -> Path:
        """Writes the corpus as JSON (to a temporary file in the same directory, then renamed)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_file(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
            json.dump(self.to_json(), f, ensure_ascii=False, indent=1)
            f.flush()
            os.fsync(f.fileno())
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> "FactsCorpus":
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise FileNotFoundError(f"{path}: no such facts corpus file") from None
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from None
        return cls.from_json(data, source=str(path))
