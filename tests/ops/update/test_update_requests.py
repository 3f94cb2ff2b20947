"""Edit requests: the dataclass, the JSONL reader (flat and CounterFact forms), and errors that name the line."""
import json

import pytest

from configurable_fm.data.synthetic import FactsCorpus
from configurable_fm.errors import UserError
from configurable_fm.ops.update import Request, RequestError, dump_requests, load_requests, parse_lines

FLAT = {"case_id": 7, "prompt": "{} plays the sport of", "subject": "LeBron James", "target_new": " football",
        "target_true": " basketball", "paraphrase_prompts": ["Everyone knows that LeBron James plays"],
        "neighborhood_prompts": ["Michael Jordan plays the sport of"], "neighborhood_targets": [" basketball"]}
COUNTERFACT = {"case_id": 0, "pararel_idx": 2796,
               "requested_rewrite": {"prompt": "The mother tongue of {} is", "relation_id": "P103",
                                     "target_new": {"str": "English", "id": "Q1860"},
                                     "target_true": {"str": "French", "id": "Q150"}, "subject": "Danielle Darrieux"},
               "paraphrase_prompts": ["Shayna does this and Yossel goes still and dies. Danielle Darrieux, a native"],
               "neighborhood_prompts": ["The mother tongue of Léon Blum is", "Raymond Barre, a native"],
               "attribute_prompts": ["J. R. R. Tolkien is a native speaker of"],
               "generation_prompts": ["Danielle Darrieux's mother tongue is"]}


def write(tmp_path, records, name="r.jsonl"):
    path = tmp_path / name
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def test_flat_and_counterfact_records(tmp_path):
    path = write(tmp_path, [FLAT, "", COUNTERFACT])
    flat, cf = load_requests(path)
    assert flat == Request("{} plays the sport of", "LeBron James", " football", " basketball",
                           ("Everyone knows that LeBron James plays",), ("Michael Jordan plays the sport of",),
                           (" basketball",), 7)
    assert flat.text == "LeBron James plays the sport of"
    # CounterFact targets get the leading space the authors' code adds; neighbours expect target_true
    assert (cf.prompt, cf.subject, cf.target_new, cf.target_true) == (
        "The mother tongue of {} is", "Danielle Darrieux", " English", " French")
    assert cf.neighborhood_targets == (" French", " French")
    assert cf.case_id == 0
    # a JSON array of records (CounterFact's own file) reads the same
    array = tmp_path / "cf.json"
    array.write_text(json.dumps([COUNTERFACT, FLAT]))
    assert load_requests(array) == [cf, flat]
    # flat JSONL round trip
    assert load_requests(dump_requests([flat, cf], tmp_path / "out.jsonl")) == [flat, cf]


def test_targets_keep_their_leading_space():
    r = parse_lines([json.dumps(dict(FLAT, target_new=" foot ball"))])[0]
    assert r.target_new == " foot ball"
    r = parse_lines([json.dumps(dict(FLAT, target_new="football"))])[0]
    assert r.target_new == "football"  # flat targets are taken as given


def test_from_edit_request_of_the_facts_corpus():
    corpus = FactsCorpus.generate(seed=0, n_entities=12, relations=("birth_city",))
    er = corpus.edit_request(corpus.fact(corpus.entities[0], "birth_city"), seed=1)
    r = Request.from_edit_request(er, case_id=3)
    assert r.prompt == "{} was born in" and r.text == er.prompt
    assert (r.target_new, r.target_true) == (er.target_new, er.target_true)
    assert r.neighborhood_prompts == tuple(q.prompt for q in er.neighbourhood)
    assert r.paraphrases == er.paraphrase_prompts


@pytest.mark.parametrize("record, message", [
    ('{"prompt": "{} is", "subject": "A"', "not valid JSON"),
    (dict(FLAT, prompt="LeBron James plays the sport of"), "exactly one '{}'"),
    (dict(FLAT, prompt="{} and {} play"), "found 2"),
    ({k: v for k, v in FLAT.items() if k != "subject"}, "lacks key(s) ['subject']"),
    (dict(FLAT, target_new=" "), "target_new of prompt '{} plays the sport of' is empty"),
    (dict(FLAT, subject=""), "subject of prompt"),
    (dict(FLAT, paraphrase_prompts=["Everyone knows that he plays"]), "absent from paraphrase_prompts[0]"),
    (dict(FLAT, neighborhood_targets=[" a", " b"]), "2 neighborhood_targets for 1"),
    (dict(FLAT, paraphrase_prompts="one string"), "must be a list of strings"),
    ({"requested_rewrite": {"prompt": "{} is", "subject": "A"}}, "requested_rewrite lacks key(s) ['target_new']"),
    ({"requested_rewrite": dict(COUNTERFACT["requested_rewrite"], target_new={"id": "Q1"})}, "target_new must be"),
])
def test_bad_input_names_the_line(tmp_path, record, message):
    path = write(tmp_path, [FLAT, "", record])
    with pytest.raises(RequestError, match=r"r\.jsonl:3: ") as e:
        load_requests(path)
    assert message in str(e.value)
    assert isinstance(e.value, UserError) and isinstance(e.value, ValueError)


def test_missing_file_and_bad_array_record(tmp_path):
    with pytest.raises(RequestError, match="no such requests file"):
        load_requests(tmp_path / "nope.jsonl")
    array = tmp_path / "cf.json"
    array.write_text(json.dumps([FLAT, dict(FLAT, prompt="no placeholder")]))
    with pytest.raises(RequestError, match=r"cf\.json: record 1: prompt 'no placeholder'"):
        load_requests(array)


def test_line_separators_inside_strings_do_not_split_records(tmp_path):
    """JSONL records are separated by '\\n' only: U+2028, U+0085 (which json.dumps(ensure_ascii=False) writes raw)
    and the like inside a string neither split a record nor shift the line numbers of errors."""
    reqs = [Request("{} plays the sport of", "LeBron\u2028James", " foot\x85ball", " basketball"),
            Request("{} lives in", "A\u2029B", " Paris\x1c")]
    assert load_requests(dump_requests(reqs, tmp_path / "out.jsonl")) == reqs
    path = tmp_path / "r.jsonl"
    path.write_text(json.dumps(dict(FLAT, subject="Le\u2028Bron", paraphrase_prompts=[]), ensure_ascii=False) + "\n"
                    + json.dumps(dict(FLAT, target_new=" ")) + "\n", encoding="utf-8")
    with pytest.raises(RequestError, match=r"r\.jsonl:2: target_new"):
        load_requests(path)
