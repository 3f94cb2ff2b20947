"""Tasks from real text (configurable_fm/data/text_tasks.py): deterministic examples, disjoint splits (by canonical
problem), few-shot prompts built from train problems only, the registry."""
import pytest

from configurable_fm.data.corpora import FetchError
from configurable_fm.data.synthetic import TASKS, make_task, split_unit
from configurable_fm.data.text_tasks import (POOLS, SYNTHETIC_VARIANTS, TEXT_TASKS, FewShotTask, TextTask, few_shot,
                                             get_library_task, keyword_items)


def _wordnet_or_skip():
    try:
        TEXT_TASKS["lemma"].pool()
    except (FetchError, OSError) as e:  # no cached WordNet and no apt: not this machine's corpora
        pytest.skip(f"WordNet not available: {e}")


def test_keyword_task_is_deterministic_and_splits_without_overlap():
    task = TEXT_TASKS["keyword"]
    a, b = task.examples("test", 30, seed=0), task.examples("test", 30, seed=0)
    assert a == b and len({e.prompt for e in a}) == 30
    assert task.examples("test", 10, seed=0) == a[:10]  # the first k of n are those of any larger n
    assert task.examples("test", 30, seed=1) != a
    train = {task.canonical(e.prompt) for e in task.split_items("train")}
    test = {task.canonical(e.prompt) for e in task.split_items("test")}
    assert train and test and not train & test
    assert all(e.answer.strip() in ("if", "for", "return", "while", "with", "raise", "import", "from", "def",
                                   "class", "elif", "try", "assert", "yield", "del") for e in a)
    line, kw = keyword_items()[0]
    assert line.startswith("... ") and kw


def test_too_many_examples_is_an_error_naming_the_task():
    with pytest.raises(ValueError, match="keyword.*fewer than n"):
        TEXT_TASKS["keyword"].examples("test", 10 ** 7, 0)


@pytest.mark.parametrize("name", ["antonym", "pos", "lemma", "plural", "pertainym", "nominal"])
def test_wordnet_tasks_split_by_canonical_problem(name):
    _wordnet_or_skip()
    task = TEXT_TASKS[name]
    train, test = task.split_items("train"), task.split_items("test")
    assert len(test) >= 20 and len(train) > len(test)
    keys = lambda exs: {task.canonical(e.prompt) for e in exs}
    assert not keys(train) & keys(test)
    if task.canonical_by == "answer":  # a word is an answer in one split only
        assert not {e.answer for e in train} & {e.answer for e in test}
    assert task.examples("test", 5, 3) == task.examples("test", 5, 3)


def test_nominal_items_are_nominalisations_of_their_verb():
    _wordnet_or_skip()
    items = {e.prompt.split("'")[1]: e.answer for e in TEXT_TASKS["nominal"].pool()}  # verb -> " noun"
    assert len(items) >= 500
    assert items["reduce"] == " reduction" and items["develop"] == " development"
    assert all(n.strip()[:3] == v[:3] and not n.endswith(("er", "or", "ing")) for v, n in items.items())


def test_antonym_pairs_share_a_split():
    _wordnet_or_skip()
    task = TEXT_TASKS["antonym"]
    items = {(e.prompt, e.answer) for e in task.pool()}
    for prompt, answer in list(items)[:200]:
        word = prompt.split("'")[1]
        back = task.template.format(x=answer.strip())
        if (back, " " + word) in items:
            assert task.split_of(prompt) == task.split_of(back)


def test_few_shot_prompts_use_train_demonstrations_only():
    fs = few_shot("addition", shots=2)
    assert isinstance(fs, FewShotTask) and fs.name == "addition"
    demos = TASKS["addition"].examples("train", 2, fs.demo_seed)
    prefix = "".join(d.prompt + d.answer + "\n" for d in demos)
    test = fs.examples("test", 8, 0)
    assert all(e.prompt.startswith(prefix) for e in test)
    assert [fs.query(e.prompt) for e in test] == [e.prompt for e in TASKS["addition"].examples("test", 8, 0)]
    assert all(fs.split_of(e.prompt) == "test" for e in test)
    train = few_shot("keyword", shots=2).examples("train", 20, 0)
    demo_prompts = {d.prompt for d in TEXT_TASKS["keyword"].examples("train", 2, 12345)}
    assert not {few_shot("keyword", 2).query(e.prompt) for e in train} & demo_prompts
    assert few_shot("copy", shots=0).examples("test", 3, 0) == TASKS["copy"].examples("test", 3, 0)


def test_few_shot_train_examples_are_n_even_when_demonstrations_are_drawn_often():
    """A small synthetic problem space (parity of 2 bits: 4 problems, 2 of them the demonstrations): `n` train
    queries, none a demonstration, the first k of n those of any larger n."""
    fs = few_shot(make_task("parity", name="parity2", min_len=2, max_len=2), shots=2)
    demos = {d.prompt for d in fs.inner.examples("train", 2, fs.demo_seed)}
    exs = fs.examples("train", 40, 0)
    assert len(exs) == 40 and not {fs.query(e.prompt) for e in exs} & demos
    assert fs.examples("train", 10, 0) == exs[:10]


def test_split_of_a_text_task_works_before_its_pool_is_read(monkeypatch):
    """canonical / split_of of a task split by answer read the item table that pool() fills: they must fill it
    themselves (a fresh process may ask split_of first), and name the task for a prompt outside the pool."""
    monkeypatch.setattr("configurable_fm.data.text_tasks._ITEM_OF", {})  # nothing read yet, as in a fresh process
    monkeypatch.setitem(POOLS, "plural", lambda: [("child", "children"), ("mouse", "mice"), ("ox", "oxen")])
    task = TextTask(name="plural_tiny", source="plural", template="plural of '{x}':", canonical_by="answer")
    assert task.canonical("plural of 'mouse':") == "mice"
    assert task.split_of("plural of 'ox':") == ("test" if split_unit("oxen") < task.test_fraction else "train")
    with pytest.raises(KeyError, match="plural_tiny.*not a prompt of its pool"):
        task.split_of("plural of 'goose':")


def test_registry():
    assert get_library_task("copy") is TASKS["copy"]
    assert get_library_task("keyword") is TEXT_TASKS["keyword"]
    assert get_library_task("sort_short") is SYNTHETIC_VARIANTS["sort_short"]
    assert not set(TEXT_TASKS) & set(TASKS) and not set(SYNTHETIC_VARIANTS) & set(TASKS)
    with pytest.raises(KeyError, match="unknown task 'nope'"):
        get_library_task("nope")
