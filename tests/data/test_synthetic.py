"""Synthetic tasks, training rows, exact-match evaluation and the facts corpus.

Answers are checked against independent computations (Python's sorted, [::-1], str.count, arithmetic on
the parsed prompt); encode_examples against hand-written rows of a character tokenizer; evaluate_task against
a monkeypatched oracle generator, a tiny random Llama (padding invariance) and a tiny Llama trained here to
memorise a few examples (train format == evaluation format, end to end).
"""
import dataclasses
import json
import operator
import re
import string

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

from tests.helpers import random_llama
from configurable_fm.data import synthetic
from configurable_fm.data.synthetic import evaluate as ev
from configurable_fm.data.synthetic.facts import SUBJECT_FINAL_RELATIONS
from configurable_fm.data.synthetic import (RELATIONS, TASKS, Example, Fact, FactsCorpus, Relation, encode_examples,
                                            evaluate_examples, evaluate_task, exact_match, make_task, normalize,
                                            task_metric)
from configurable_fm.models.llama import LlamaConfig

PAD, EOS, BOS = 0, 1, 2


@pytest.fixture(scope="module")
def tok():
    """Character-level tokenizer: ids 0-3 special (<pad>, <eos>, <bos>, <unk>), printable ASCII 4-98, newline 99."""
    chars = [chr(i) for i in range(32, 127)]
    vocab = {"<pad>": PAD, "<eos>": EOS, "<bos>": BOS, "<unk>": 3} | {c: i + 4 for i, c in enumerate(chars)}
    vocab["\n"] = len(vocab)
    t = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    t.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    t.decoder = decoders.Fuse()
    t.add_special_tokens(["<pad>", "<eos>", "<bos>"])
    return t


def cid(c):  # the character tokenizer's id of one character
    return ord(c) - 32 + 4


# ------------------------------------------------------------------------------------------------ tasks
def solve(prompt: str) -> str:
    """Independent solver: parses the prompt and computes the answer with plain Python."""
    if m := re.fullmatch(r"mod (\d+): (\d+) ([-+*]) (\d+) =", prompt):
        p, a, op, b = int(m[1]), int(m[2]), m[3], int(m[4])
        return " " + str({"+": operator.add, "-": operator.sub, "*": operator.mul}[op](a, b) % p)
    if m := re.fullmatch(r"add: (\d+) \+ (\d+) =", prompt):
        return f" {int(m[1]) + int(m[2])}"
    if m := re.fullmatch(r"sort: ([\d ]+) =", prompt):
        return " " + " ".join(map(str, sorted(int(x) for x in m[1].split())))
    if m := re.fullmatch(r"reverse: ([a-z]+) =", prompt):
        return " " + m[1][::-1]
    if m := re.fullmatch(r"copy: ([a-z]+) =", prompt):
        return " " + m[1]
    if m := re.fullmatch(r"recall: ((?:[a-z]+=\d+ ?)+); ([a-z]+) =", prompt):
        table = dict(pair.split("=") for pair in m[1].split())
        assert len(table) == len(m[1].split()), f"repeated key in {prompt!r}"
        return " " + table[m[2]]
    if m := re.fullmatch(r"parity: ([01]+) =", prompt):
        return " " + str(m[1].count("1") & 1)
    if m := re.fullmatch(r"count ([a-z]): ([a-z]+) =", prompt):
        return " " + str(m[2].count(m[1]))
    if m := re.fullmatch(r"uppercase: ([a-z]+) =", prompt):
        return " " + m[1].upper()
    if m := re.fullmatch(r"increment: (\d+) =", prompt):
        return f" {int(m[1]) + 1}"
    raise AssertionError(f"unparsed prompt {prompt!r}")


def test_registry_has_at_least_six_distinct_tasks():
    assert len(TASKS) >= 6
    keywords = {name: t.examples("train", 1, 0)[0].prompt.split(":")[0].split()[0] for name, t in TASKS.items()}
    assert len(set(keywords.values())) == len(TASKS), keywords  # each task announces itself differently
    assert all(TASKS[name].name == name for name in TASKS)


@pytest.mark.parametrize("name", sorted(TASKS))
def test_examples_deterministic_correct_and_splits_disjoint(name):
    task = TASKS[name]
    train = task.examples("train", 3000, seed=1)
    test = task.examples("test", 1000, seed=1)
    assert task.examples("train", 3000, seed=1) == train                    # same seed: identical
    assert task.examples("train", 100, seed=1) == train[:100]               # a prefix for smaller n
    assert task.examples("train", 100, seed=2) != train[:100]               # different seed: different
    assert all(isinstance(e, Example) for e in train + test)
    assert not {e.prompt for e in train} & {e.prompt for e in test}         # disjoint splits
    assert all(task.split_of(e.prompt) == "train" for e in train)
    for e in train[:500] + test[:500]:
        assert e.answer == solve(e.prompt), e
        assert e.answer.startswith(" ") and "\n" not in e.answer
    assert all(task.split_of(e.prompt) == "test" for e in test)


def test_symmetric_problems_share_a_split():
    rng = np.random.default_rng(5)
    for _ in range(300):
        a, b = (int(x) for x in rng.integers(0, 10_000, 2))
        assert TASKS["addition"].split_of(f"add: {a} + {b} =") == TASKS["addition"].split_of(f"add: {b} + {a} =")
        a, b = a % 97, b % 97
        for op in "+*":
            mod = TASKS["modular_arithmetic"]
            assert mod.split_of(f"mod 97: {a} {op} {b} =") == mod.split_of(f"mod 97: {b} {op} {a} =")
        xs = [str(x) for x in rng.integers(0, 100, 5)]
        perm = [xs[i] for i in rng.permutation(5)]
        assert TASKS["sort"].split_of(f"sort: {' '.join(xs)} =") == TASKS["sort"].split_of(f"sort: {' '.join(perm)} =")
    kv = TASKS["kv_recall"]
    assert kv.canonical("recall: c=4 k=7 a=1; k =") == kv.canonical("recall: a=1 c=4 k=7; k =") \
        == "recall: a=1 c=4 k=7; k ="
    assert kv.canonical("recall: a=1 c=4 k=7; a =") != kv.canonical("recall: a=1 c=4 k=7; k =")
    assert TASKS["modular_arithmetic"].canonical("mod 97: 5 - 3 =") != TASKS["modular_arithmetic"].canonical(
        "mod 97: 3 - 5 =")  # subtraction is not commutative
    # Sorting: a test answer is never a train answer.
    train = {e.answer for e in TASKS["sort"].examples("train", 3000, 0)}
    assert not train & {e.answer for e in TASKS["sort"].examples("test", 1000, 0)}


def test_split_fraction_over_random_problems():
    rng = np.random.default_rng(0)
    task = TASKS["addition"]
    fraction = np.mean([task.split_of(task.sample(rng).prompt) == "test" for _ in range(5000)])
    assert abs(fraction - task.test_fraction) < 0.03


def test_difficulty_parameters():
    add = make_task("addition", min_digits=5, max_digits=5)
    for e in add.examples("test", 50, 0):
        a, b = re.fullmatch(r"add: (\d+) \+ (\d+) =", e.prompt).groups()
        assert len(a) == len(b) == 5
    srt = make_task("sort", min_len=10, max_len=12, max_value=9)
    assert all(10 <= len(e.prompt.split()) - 2 <= 12 and max(map(int, e.prompt.split()[1:-1])) <= 9
               for e in srt.examples("train", 50, 0))
    kv = make_task("kv_recall", min_pairs=8, max_pairs=8, key_len=2)
    assert all(len(re.findall(r"[a-z]+=\d+", e.prompt)) == 8 for e in kv.examples("train", 20, 0))
    mod = make_task("modular_arithmetic", p=13, ops=["*"])
    assert all(e.prompt.startswith("mod 13: ") and " * " in e.prompt for e in mod.examples("train", 20, 0))
    # A renamed variant is a separate task with its own random stream but the same split rule.
    variant = make_task("reverse", name="reverse_long", min_len=9, max_len=9)
    assert variant.name == "reverse_long" and TASKS["reverse"].name == "reverse"
    assert all(variant.split_of(e.prompt) == TASKS["reverse"].split_of(e.prompt)
               for e in variant.examples("test", 20, 0))


def test_unique_examples_and_small_problem_spaces():
    tiny = make_task("modular_arithmetic", p=5, ops=("+",))  # 25 problems in all
    all_prompts = {f"mod 5: {a} + {b} =" for a in range(5) for b in range(5)}
    test_space = {p for p in all_prompts if tiny.split_of(p) == "test"}
    got = tiny.examples("test", len(test_space), 0, unique=True)
    assert {e.prompt for e in got} == test_space
    with pytest.raises(ValueError, match=r"task 'modular_arithmetic': found only \d+ of \d+ distinct test"):
        tiny.examples("test", len(test_space) + 1, 0, unique=True)


def test_task_errors_name_the_thing():
    with pytest.raises(KeyError, match="unknown task 'nope'.*known tasks"):
        make_task("nope")
    with pytest.raises(ValueError, match=r"task 'sort' has no parameter\(s\) \['lenght'\]; valid parameters"):
        make_task("sort", lenght=3)
    with pytest.raises(ValueError, match=r"task 'sort': min_len=9 must be <= max_len=8"):
        make_task("sort", min_len=9)
    with pytest.raises(ValueError, match=r"task 'modular_arithmetic': ops=\('/',\) must be distinct operators"):
        make_task("modular_arithmetic", ops=("/",))
    with pytest.raises(ValueError, match=r"task 'kv_recall': max_pairs=30 exceeds the 26 possible keys"):
        make_task("kv_recall", max_pairs=30)
    with pytest.raises(ValueError, match=r"task 'copy': test_fraction must be in \(0, 1\)"):
        make_task("copy", test_fraction=1.0)
    with pytest.raises(ValueError, match="split must be one of"):
        TASKS["copy"].examples("validation", 3, 0)
    with pytest.raises(ValueError, match="seed must be an int >= 0"):
        TASKS["copy"].examples("train", 3, -1)


def test_scoring_normalisation_edge_cases():
    assert normalize("  19 \n20\n") == "19" and normalize("\n\n  x y  \n") == "x y" and normalize(" \n ") == ""
    assert exact_match(" 19", " 19") == 1.0
    assert exact_match("19", " 19") == 1.0               # leading space of the answer does not matter
    assert exact_match(" 19 \nmod 97: 1 + 2 = 3", " 19") == 1.0   # only the first line counts
    assert exact_match("\n 19", " 19") == 1.0            # leading blank lines are stripped first
    assert exact_match(" 190", " 19") == 0.0
    assert exact_match(" 1 9", " 19") == 0.0             # inner spaces matter
    assert exact_match(" Edcba", " edcba") == 0.0        # case matters
    assert exact_match("", " 19") == 0.0 and exact_match("", "") == 1.0
    assert TASKS["sort"].score(" 1 2 3\n", " 1 2 3") == 1.0


# --------------------------------------------------------------------------------------- encode_examples
def test_encode_examples_hand_checked(tok):
    out = encode_examples(tok, [Example("ab=", " c"), ("x=", " yz")], 8, eos_id=EOS, pad_id=PAD)
    assert set(out) == {"inputs", "targets", "loss_mask"}
    assert out["inputs"].dtype == np.int32 and out["targets"].dtype == np.int32
    assert out["loss_mask"].dtype == np.float32 and out["inputs"].shape == (2, 8)
    a, b, eq, sp, c, x, y, z = (cid(ch) for ch in "ab= cxyz")
    # row 0: s = a b = ' ' c <eos>   (prompt 3 tokens, answer 2, eos)
    np.testing.assert_array_equal(out["inputs"][0], [a, b, eq, sp, c, PAD, PAD, PAD])
    np.testing.assert_array_equal(out["targets"][0], [b, eq, sp, c, EOS, PAD, PAD, PAD])
    np.testing.assert_array_equal(out["loss_mask"][0], [0, 0, 1, 1, 1, 0, 0, 0])
    # row 1: s = x = ' ' y z <eos>
    np.testing.assert_array_equal(out["inputs"][1], [x, eq, sp, y, z, PAD, PAD, PAD])
    np.testing.assert_array_equal(out["targets"][1], [eq, sp, y, z, EOS, PAD, PAD, PAD])
    np.testing.assert_array_equal(out["loss_mask"][1], [0, 1, 1, 1, 1, 0, 0, 0])
    # With a BOS the prompt grows by one token and the mask moves with it.
    with_bos = encode_examples(tok, [("ab=", " c")], 6, eos_id=EOS, pad_id=PAD, bos_id=BOS)
    np.testing.assert_array_equal(with_bos["inputs"][0], [BOS, a, b, eq, sp, c])
    np.testing.assert_array_equal(with_bos["targets"][0], [a, b, eq, sp, c, EOS])
    np.testing.assert_array_equal(with_bos["loss_mask"][0], [0, 0, 0, 1, 1, 1])


def test_encode_examples_masks_exactly_the_answers(tok):
    examples = [e for name in sorted(TASKS) for e in TASKS[name].examples("train", 5, 3)]
    out = encode_examples(tok, examples, 64, eos_id=EOS, pad_id=PAD)
    for row, (prompt, answer) in enumerate(examples):
        m = out["loss_mask"][row].astype(bool)
        assert tok.decode(out["targets"][row][m][:-1].tolist()) == answer and out["targets"][row][m][-1] == EOS
        visible = out["inputs"][row][: len(prompt) + len(answer)]
        assert tok.decode(visible.tolist()) == prompt + answer
        assert not m[: len(prompt) - 1].any() and not m[len(prompt) + len(answer):].any()


def test_encode_examples_truncation_and_bad_input_errors(tok):
    encode_examples(tok, [("abc=", " d")], 6, eos_id=EOS, pad_id=PAD)  # exactly fits: 4 + 2 + 1 - 1 = 6
    with pytest.raises(ValueError, match=r"example 1 \('abcd=' -> ' de'\) needs 8 positions \(5 prompt \+ 3 "
                                         r"answer tokens \+ eos, minus one for the shift\) but seq_len=6"):
        encode_examples(tok, [("a=", " b"), ("abcd=", " de")], 6, eos_id=EOS, pad_id=PAD)
    with pytest.raises(ValueError, match=r"example 0: answer '' \(prompt 'a='\) encodes to no tokens"):
        encode_examples(tok, [("a=", "")], 6, eos_id=EOS, pad_id=PAD)
    with pytest.raises(ValueError, match="example 0: prompt '' encodes to no tokens"):
        encode_examples(tok, [("", " a")], 6, eos_id=EOS, pad_id=PAD)
    with pytest.raises(TypeError, match="example 0 must be an Example or a \\(prompt, answer\\) pair"):
        encode_examples(tok, ["abc"], 6, eos_id=EOS, pad_id=PAD)
    with pytest.raises(ValueError, match="eos_id must be a token id"):
        encode_examples(tok, [("a=", " b")], 6, eos_id=None, pad_id=PAD)
    with pytest.raises(ValueError, match="seq_len must be an int >= 1"):
        encode_examples(tok, [("a=", " b")], 0, eos_id=EOS, pad_id=PAD)


@pytest.mark.real_model
def test_encode_examples_with_smollm2_tokenizer():
    from configurable_fm.interop.tokenizers import gguf_special_tokens, tokenizer_from_gguf
    from configurable_fm.models.registry import ModelNotInstalled, model_path

    try:
        path = model_path("smollm2-135m-instruct")
    except ModelNotInstalled as e:
        pytest.skip(str(e))
    tk, special = tokenizer_from_gguf(path), gguf_special_tokens(path)
    examples = [e for name in ("reverse", "modular_arithmetic", "sort") for e in TASKS[name].examples("test", 4, 0)]
    out = encode_examples(tk, examples, 48, eos_id=special["eos"], pad_id=special["pad"], bos_id=special["bos"])
    for row, (prompt, answer) in enumerate(examples):
        m = out["loss_mask"][row].astype(bool)
        assert tk.decode(out["targets"][row][m][:-1].tolist()) == answer
        assert out["targets"][row][m][-1] == special["eos"] and out["inputs"][row][0] == special["bos"]
        assert tk.decode(out["inputs"][row][1:np.flatnonzero(m)[0] + 1].tolist()) == prompt


# ------------------------------------------------------------------------------------------- evaluation


CFG = LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                  max_position_embeddings=128)


def oracle_generate(tok, answers, wrong=()):
    """A stand-in for models.generation.generate that continues each prompt with its answer (' x' for
    prompts in `wrong`), then either eos and junk (odd-length prompts: the eos must cut it) or a second line
    and junk (even-length prompts: the first-line rule must drop it), padded to max_new_tokens."""
    def fake(model, ids, *, attention_mask, max_new_tokens, eos_token_id, pad_token_id):
        ids, mask = np.asarray(ids), np.asarray(attention_mask)
        assert np.all(mask[:, -1] == 1) and np.all(np.diff(mask, axis=1) >= 0)  # left-padded
        rows = []
        for r in range(ids.shape[0]):
            prompt = tok.decode(ids[r][mask[r] == 1].tolist(), skip_special_tokens=True)
            new = tok.encode(" x" if prompt in wrong else answers[prompt], add_special_tokens=False).ids
            new += [eos_token_id] if len(prompt) % 2 else tok.encode("\nmore", add_special_tokens=False).ids
            new = (new + [cid("9")] * max_new_tokens)[:max_new_tokens]
            rows.append(np.concatenate([ids[r], new]))
        return jnp.asarray(np.stack(rows), jnp.int32)
    return fake


def test_evaluate_task_oracle_gives_one_and_half_oracle_one_half(tok, monkeypatch):
    task = TASKS["sort"]
    examples = task.examples("test", 10, seed=4)
    assert {len(e.prompt) % 2 for e in examples} == {0, 1}  # both endings occur
    answers = {e.prompt: e.answer for e in examples}
    monkeypatch.setattr(ev, "generate", oracle_generate(tok, answers))
    res = evaluate_task(None, tok, "sort", n=10, seed=4, batch_size=4, eos_id=EOS, pad_id=PAD, max_new_tokens=40)
    assert res["exact_match"] == 1.0 and res["n"] == 10 and len(res["examples"]) == 4
    assert res["examples"][0]["prompt"] == examples[0].prompt and res["examples"][0]["answer"] == examples[0].answer
    assert normalize(res["examples"][0]["prediction"]) == normalize(examples[0].answer)
    wrong = {e.prompt for e in examples[::2]}
    monkeypatch.setattr(ev, "generate", oracle_generate(tok, answers, wrong))
    res = evaluate_task(None, tok, task, n=10, seed=4, batch_size=3, eos_id=EOS, pad_id=PAD, max_new_tokens=40)
    assert res["exact_match"] == 0.5
    metric = task_metric("sort", tokenizer=tok, n=10, seed=4, batch_size=4, eos_id=EOS, pad_id=PAD, max_new_tokens=40)
    assert metric(None) == {"sort/exact_match": 0.5}      # the trainer's call: fn(model)
    assert metric(None, tok) == {"sort/exact_match": 0.5}  # fn(model, tokenizer)


def test_task_metric_errors():
    with pytest.raises(TypeError, match=r"task_metric\('copy'\): unknown keyword\(s\) \['nn'\]"):
        task_metric("copy", nn=3)
    with pytest.raises(ValueError, match="needs a tokenizer"):
        task_metric("copy", n=2)(None)
    with pytest.raises(KeyError, match="unknown task"):
        task_metric("nope")


def test_evaluate_task_on_tiny_random_llama_is_padding_invariant(tok):
    model = random_llama(CFG, 0)
    kw = dict(n=6, seed=0, eos_id=EOS, pad_id=PAD, max_new_tokens=6, n_show=6)
    batched = evaluate_task(model, tok, "kv_recall", batch_size=4, **kw)   # prompts of different lengths
    assert isinstance(batched["exact_match"], float) and 0.0 <= batched["exact_match"] <= 1.0
    assert batched["n"] == 6 and len(batched["examples"]) == 6
    shown = batched["examples"]
    assert [(e["prompt"], e["answer"]) for e in shown] == TASKS["kv_recall"].examples("test", 6, 0)
    assert len({len(e["prompt"]) for e in shown}) > 1
    # The shortest prompt (the most left padding) generated alone, without padding: the same prediction.
    e = min(shown, key=lambda e: len(e["prompt"]))
    ids = np.asarray([ev.prompt_ids(tok, e["prompt"])], np.int32)
    out = np.asarray(ev.generate(model, ids, max_new_tokens=6, eos_token_id=EOS, pad_token_id=PAD))
    assert e["prediction"] == tok.decode(ev._cut(out[0, ids.shape[1]:], EOS), skip_special_tokens=True)
    assert any(e["prediction"] for e in shown)  # a random model does not stop at once everywhere


def test_memorised_examples_are_recalled_exactly(tok):
    """End to end: fit a tiny Llama on encode_examples rows (masked loss), then evaluate_task on the same
    examples must give 1.0 -- training and evaluation agree on the prompt/answer format."""
    task = make_task("copy", min_len=3, max_len=4, alphabet="abcdef")
    examples = task.examples("train", 8, seed=0)
    batch = {k: jnp.asarray(v) for k, v in encode_examples(tok, examples, 20, eos_id=EOS, pad_id=PAD).items()}
    model = random_llama(dataclasses.replace(CFG, hidden_size=64, intermediate_size=128), 1)
    graphdef, params = nnx.split(model)
    tx = optax.adam(3e-3)
    opt = tx.init(params)

    @jax.jit
    def step(params, opt):
        def loss(p):
            logits = nnx.merge(graphdef, p)(batch["inputs"])
            nll = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"])
            return jnp.sum(nll * batch["loss_mask"]) / jnp.sum(batch["loss_mask"])
        value, grads = jax.value_and_grad(loss)(params)
        updates, opt = tx.update(grads, opt, params)
        return optax.apply_updates(params, updates), opt, value

    for _ in range(100):  # the loss is below 0.02 from about step 75 on
        params, opt, value = step(params, opt)
    assert float(value) < 0.02
    trained = nnx.merge(graphdef, params)
    before = evaluate_task(model, tok, task, n=8, seed=0, split="train", eos_id=EOS, pad_id=PAD, batch_size=8)
    after = evaluate_task(trained, tok, task, n=8, seed=0, split="train", eos_id=EOS, pad_id=PAD, batch_size=8)
    assert before["exact_match"] == 0.0 and after["exact_match"] == 1.0
    # Facts queries go through the same path.
    res = evaluate_examples(trained, tok, examples[:3], eos_id=EOS, pad_id=PAD, batch_size=2)
    assert res["exact_match"] == 1.0 and res["n"] == 3


# ------------------------------------------------------------------------------------------ facts corpus
@pytest.fixture(scope="module")
def corpus():
    return FactsCorpus.generate(seed=3, n_entities=200)


def test_facts_corpus_invariants(corpus):
    assert len(corpus.entities) == 200 == len(set(corpus.entities))
    assert [r.name for r in corpus.relations] == list(RELATIONS) and len(RELATIONS) >= 6
    for e in corpus.entities:
        assert set(corpus.facts[e]) == set(RELATIONS)  # every entity has every relation
        for r in corpus.relations:
            assert corpus.facts[e][r.name] in r.objects
        first, last = e.split(" ")
        assert first[0].isupper() and last[0].isupper() and first[1:].islower() and last[1:].islower()
    for r in corpus.relations:
        assert len(r.templates) >= 3 and len(r.paraphrases) >= 1 and not set(r.templates) & set(r.paraphrases)
        used = {corpus.facts[e][r.name] for e in corpus.entities}
        assert len(used) > len(r.objects) // 2  # objects actually vary
    # Determinism, seed dependence, and the prefix property.
    again = FactsCorpus.generate(seed=3, n_entities=200)
    assert again == corpus and again.training_texts() == corpus.training_texts()
    other = FactsCorpus.generate(seed=4, n_entities=200)
    assert other.entities != corpus.entities
    small = FactsCorpus.generate(seed=3, n_entities=50)
    assert small.entities == corpus.entities[:50]
    assert all(small.facts[e] == corpus.facts[e] for e in small.entities)
    only = FactsCorpus.generate(seed=3, n_entities=50, relations=["sport", "birth_city"])
    assert all(only.facts[e] == {k: corpus.facts[e][k] for k in ("sport", "birth_city")} for e in only.entities)


def test_training_texts_and_queries(corpus):
    texts = corpus.training_texts()
    n_templates = sum(len(r.templates) for r in corpus.relations)
    assert len(texts) == len(set(texts)) == 200 * n_templates
    expected = {t.replace("{subject}", e).replace("{object}", corpus.facts[e][r.name])
                for e in corpus.entities for r in corpus.relations for t in r.templates}
    assert set(texts) == expected
    ordered = [t.replace("{subject}", e).replace("{object}", corpus.facts[e][r.name])
               for e in corpus.entities for r in corpus.relations for t in r.templates]
    assert texts != ordered  # shuffled
    names = re.compile("|".join(map(re.escape, corpus.entities)))
    by_subject = {}
    for t in texts:
        by_subject.setdefault(names.search(t)[0], []).append(t)
    train_q, para_q = corpus.queries("train_template"), corpus.queries("paraphrase")
    assert len(train_q) == len(texts)
    for q in train_q:  # every training query is the start of a training text that ends with its target
        assert q.prompt + q.target + "." in by_subject[q.subject]
    for q in para_q:   # paraphrase prompts never appear in any training text
        assert q.target == " " + corpus.facts[q.subject][q.relation]
        assert not any(q.prompt in t for t in by_subject[q.subject])
    for r in corpus.relations:  # nor does any paraphrase template's longest literal part
        for template in r.paraphrases:
            fixed = max(re.split(r"\{subject\}|\{object\}", template), key=len).strip()
            assert not any(fixed in t for t in texts), fixed
    assert {q.relation for q in para_q} == set(RELATIONS)
    sub = corpus.queries("paraphrase", entities=corpus.entities[:2], relations=["sport"])
    assert len(sub) == 2 * len(RELATIONS["sport"].paraphrases) and sub[0].example == (sub[0].prompt, sub[0].target)
    with pytest.raises(ValueError, match="query kind must be one of"):
        corpus.queries("test")


def test_biographies(corpus):
    docs = corpus.biographies(n_per_entity=2, seed=0)
    assert len(docs) == 400 and docs == corpus.biographies(n_per_entity=2, seed=0)
    assert docs != corpus.biographies(n_per_entity=2, seed=1)
    texts = set(corpus.training_texts())
    e = corpus.entities[0]
    sentences = re.split(r"(?<=\.) ", docs[0])
    assert len(sentences) == len(RELATIONS) and all(s in texts and e in s for s in sentences)


def test_counterfactual_neighbourhood_and_edit_request(corpus):
    for fact in corpus.all_facts()[:60]:
        new = corpus.counterfactual(fact, seed=0)
        assert new.entity == fact.entity and new.relation == fact.relation
        assert new.object != fact.object and new.object in corpus.relation(fact.relation).objects
        assert corpus.counterfactual(fact, seed=0) == new
    fact = corpus.fact(corpus.entities[5], "birth_city")
    assert len({corpus.counterfactual(fact, seed=s).object for s in range(40)}) > 5
    with pytest.raises(ValueError, match="is not a fact of this corpus"):
        corpus.counterfactual(Fact(fact.entity, fact.relation, corpus.counterfactual(fact, 0).object), 1)
    hood = corpus.neighbourhood(fact.entity, "birth_city", n=None)
    assert len(hood) == 199 and fact.entity not in {q.subject for q in hood}
    same = sum(corpus.facts[e]["birth_city"] == fact.object for e in corpus.entities) - 1
    assert all(q.target == " " + fact.object for q in hood[:same])  # same-object neighbours first
    assert all(q.target != " " + fact.object for q in hood[same:])
    assert corpus.neighbourhood(fact.entity, "birth_city") == hood[:10]  # n only truncates
    assert corpus.neighbourhood(fact.entity, "birth_city", n=same + 3) == hood[:same + 3]
    assert corpus.neighbourhood(fact.entity, "birth_city", n=max(same - 1, 1)) == hood[:max(same - 1, 1)]
    assert corpus.neighbourhood(fact.entity, "birth_city", seed=1) != hood[:10]
    req = corpus.edit_request(fact, seed=2)
    assert req.prompt == f"{fact.entity} was born in" and req.target_true == " " + fact.object
    assert req.target_new == " " + corpus.counterfactual(fact, 2).object != req.target_true
    assert len(req.paraphrase_prompts) == len(RELATIONS["birth_city"].paraphrases) and len(req.neighbourhood) == 10
    edited = corpus.with_facts([corpus.counterfactual(fact, 2)])
    assert edited.facts[fact.entity]["birth_city"] == req.target_new[1:]
    assert corpus.facts[fact.entity]["birth_city"] == fact.object  # unchanged


def test_relation_checks():
    with pytest.raises(ValueError, match=r"relation 'r': needs >= 3 training templates"):
        Relation("r", ("a", "b"), ("{subject} x {object}.", "{subject} y {object}."), ("{subject} z {object}.",))
    with pytest.raises(ValueError, match=r"only punctuation may follow \{object\}"):
        Relation("r", ("a", "b"), ("{subject} x {object} today.", "{subject} y {object}.", "{subject} w {object}."),
                 ("{subject} z {object}.",))
    good = Relation("r", ("a", "b"), ("{subject} plays {object}.", "{subject} y {object}.", "{subject} w {object}."),
                    ("{subject} z {object}.",))
    clash = Relation("s", ("c", "d"),
                     ("{subject} plays the {object}.", "{subject} v {object}.", "{subject} u {object}."),
                     ("{subject} t {object}.",))
    with pytest.raises(ValueError, match=r"relation 'r' template '\{subject\} plays \{object\}.' is a prefix"):
        FactsCorpus.generate(0, 3, relations=[good, clash])
    leak = Relation("s", ("c", "d"), ("{subject} q {object}.", "{subject} v {object}.", "{subject} u {object}."),
                    ("Yes, {subject} q {object}.",))
    FactsCorpus.generate(0, 3, relations=[good, leak])  # 'Yes, X q' does not occur in 'X q c.'
    leak2 = Relation("s", ("c", "d"), ("Yes, {subject} q {object}.", "{subject} v {object}.", "{subject} u {object}."),
                     ("{subject} q {object}.",))
    with pytest.raises(ValueError, match=r"paraphrase '\{subject\} q \{object\}.' of relation 's' occurs in "
                                         r"training template 'Yes, \{subject\} q \{object\}.' of relation 's'"):
        FactsCorpus.generate(0, 3, relations=[good, leak2])
    with pytest.raises(KeyError, match="unknown relation 'nope'"):
        FactsCorpus.generate(0, 3, relations=["nope"])


def test_relation_check_refuses_one_template_shared_by_two_relations():
    """The same training template in two relations gives one prompt two continuations (' x' and ' p')."""
    a = Relation("a", ("x", "y"), ("{subject} has {object}.", "{subject} owns {object}.", "{subject} keeps {object}."),
                 ("{subject} holds {object}.",))
    b = Relation("b", ("p", "q"), ("{subject} has {object}.", "{subject} got {object}.", "{subject} won {object}."),
                 ("{subject} lost {object}.",))
    with pytest.raises(ValueError, match=r"relation 'a' template '\{subject\} has \{object\}.' is a prefix of the "
                                         r"prompt of relation 'b'"):
        FactsCorpus.generate(0, 3, relations=[a, b])
    FactsCorpus.generate(0, 3, relations=list(RELATIONS))  # the shipped relations still pass
    FactsCorpus.generate(0, 3, relations=SUBJECT_FINAL_RELATIONS)


def test_json_round_trip_and_validated_load(corpus, tmp_path):
    path = corpus.save(tmp_path / "sub" / "facts.json")
    assert sorted(p.name for p in path.parent.iterdir()) == ["facts.json"]  # no temporary file left
    loaded = FactsCorpus.load(path)
    assert loaded == corpus and loaded.training_texts() == corpus.training_texts()
    assert loaded.queries("paraphrase") == corpus.queries("paraphrase")
    data = json.loads(path.read_text())

    def bad(mutate, match):
        d = json.loads(json.dumps(data))
        mutate(d)
        p = tmp_path / "bad.json"
        p.write_text(json.dumps(d))
        with pytest.raises(ValueError, match=match):
            FactsCorpus.load(p)

    e0 = data["entities"][0]["name"]
    bad(lambda d: d["entities"][0]["facts"].pop("sport"), f"bad.json: entity '{e0}' has no fact for relation 'sport'")
    bad(lambda d: d["entities"][0]["facts"].update(sport="chess"),
        r"sport = 'chess' is not in the relation's object set")
    bad(lambda d: d.update(format="other"), r"'format' is 'other'")
    bad(lambda d: d.update(version=99), r"'version' is 99")
    bad(lambda d: d.pop("seed"), r"missing key\(s\) \['seed'\]")
    bad(lambda d: d["relations"][1].update(templates=["{subject} works {object}"]),
        r"relations\[1\]: relation 'occupation': needs >= 3")
    bad(lambda d: d["entities"].append(d["entities"][0]), "entity names must be distinct")
    bad(lambda d: d["entities"][1].update(extra=1),
        r"entities\[1\] must be an object with keys name \(a string\) and facts")
    bad(lambda d: d["entities"][2].update(name=["x"]), r"entities\[2\] must be an object")
    (tmp_path / "broken.json").write_text("{not json")
    with pytest.raises(ValueError, match="broken.json: not valid JSON"):
        FactsCorpus.load(tmp_path / "broken.json")
    with pytest.raises(FileNotFoundError, match="missing.json: no such facts corpus file"):
        FactsCorpus.load(tmp_path / "missing.json")


def test_package_exports():
    assert set(synthetic.__all__) <= set(dir(synthetic))
    assert string.ascii_lowercase == TASKS["reverse"].alphabet


@pytest.mark.parametrize("name, params, message", [
    ("uppercase", dict(alphabet="aBc"), "must be lower-case letters"),
    ("uppercase", dict(min_len=0), "must be an int >= 1"),
    ("increment", dict(max_value=0), "must be an int >= 1"),
    ("increment", dict(max_value=True), "must be an int >= 1"),
])
def test_uppercase_and_increment_refuse_bad_settings(name, params, message):
    with pytest.raises(ValueError, match=message):
        make_task(name, **params)
