"""Synthetic algorithmic tasks with exact-match scoring, for fine-tuning and multi-task (merging) studies.

    task = TASKS["reverse"]                           # or make_task("sort", min_len=5, max_len=12)
    train = task.examples("train", 10_000, seed=0)    # [Example(prompt="reverse: abcde =", answer=" edcba"), ...]
    test = task.examples("test", 500, seed=0)         # never shares a prompt with any train example
    task.score(" edcba\\n", " edcba")                  # 1.0

Every task renders a problem as a text prompt that starts with the task's own keyword ("mod 97:", "add:",
"sort:", ...), followed by a continuation (the answer) that starts with a space:

    modular_arithmetic  "mod 97: 45 + 71 ="        -> " 19"            (a op b) mod p, op in + - *
    addition            "add: 4821 + 77 ="         -> " 4898"          multi-digit integer sum
    sort                "sort: 31 5 9 5 ="         -> " 5 5 9 31"      ascending numeric order
    reverse             "reverse: abcde ="         -> " edcba"
    copy                "copy: qzkt ="             -> " qzkt"
    kv_recall           "recall: c=4 k=7 a=1; k =" -> " 7"             value of the queried key
    parity              "parity: 10110 ="          -> " 1"             number of ones mod 2
    count               "count b: abbacb ="        -> " 3"             occurrences of a letter

Splits are disjoint by construction: a problem belongs to the test split iff
    u(c) = int(sha256("split|" + c)[:8 bytes]) / 2**64 < test_fraction,   c = task.canonical(prompt),
a function of the prompt alone (the prompt encodes the whole problem, parameters included), so no seed,
sample size or difficulty setting can put one prompt in both splits. The canonical form merges prompts that
are the same problem up to a symmetry that keeps the answer, so they share a split: operand order for
addition and modular + and * ("add: 77 + 4821" ~ "add: 4821 + 77"), the order of the list for sort (so a
test answer is never a train answer), the order of the pairs for kv_recall; other tasks use the prompt.
`examples` draws problems from numpy's Generator seeded with (seed, stable hash of the task name, split)
and keeps those of the requested split (rejection sampling; with replacement unless unique=True).

Scoring: exact match after `normalize(text) = first line of text.strip(), stripped` (case and inner spaces
matter): score(prediction, answer) = 1.0 iff normalize(prediction) == normalize(answer), else 0.0.
"""
from __future__ import annotations

import dataclasses
import hashlib
import string
from typing import Callable, ClassVar, NamedTuple

import numpy as np

from configurable_fm.checks import is_int

SPLITS = ("train", "test")


class Example(NamedTuple):
    """One problem as text: the model reads `prompt` and should continue with `answer`."""

    prompt: str
    answer: str


def stable_int(*parts) -> int:
    """A 63-bit integer from sha256 of the parts' str() joined by '\\x1f' (stable across runs and machines,
    unlike hash())."""
    digest = hashlib.sha256("\x1f".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


def split_unit(key: str) -> float:
    """u(key) in [0, 1): the position of a canonical problem for the train/test assignment."""
    digest = hashlib.sha256(("split|" + key).encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0 ** 64


def normalize(text: str) -> str:
    """The scored part of a generation: strip, keep the first line, strip it again."""
    lines = text.strip().splitlines()
    return lines[0].strip() if lines else ""


def exact_match(prediction: str, answer: str) -> float:
    """1.0 iff normalize(prediction) == normalize(answer), else 0.0."""
    return float(normalize(prediction) == normalize(answer))


def _check_seed(seed) -> int:
    if not is_int(seed) or seed < 0:
        raise ValueError(f"seed must be an int >= 0, got {seed!r}")
    return int(seed)


def _check_count(name: str, value, low: int) -> None:
    if not is_int(value) or value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value!r}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class Task:
    """A synthetic task: `sample(rng) -> Example` (one random problem) plus the shared split, generation and
    scoring logic. Subclasses are frozen dataclasses whose fields set the difficulty; `name` names the task in
    metrics ('<name>/exact_match') and seeds its random streams."""

    name: str
    test_fraction: float = 0.2
    description: ClassVar[str] = ""

    def __post_init__(self):
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"task name must be a non-empty string, got {self.name!r}")
        if not 0.0 < self.test_fraction < 1.0:
            raise ValueError(f"task {self.name!r}: test_fraction must be in (0, 1), got {self.test_fraction!r}")
        self.validate()

    def validate(self) -> None:
        """Checks the difficulty fields (errors name the task and the field)."""

    def _error(self, field: str, message: str) -> ValueError:
        return ValueError(f"task {self.name!r}: {field}={getattr(self, field)!r} {message}")

    def sample(self, rng: np.random.Generator) -> Example:
        """One random problem, rendered."""
        raise NotImplementedError(type(self).__name__)

    def canonical(self, prompt: str) -> str:
        """The problem's representative under the task's answer-preserving symmetries (default: the prompt)."""
        return prompt

    def split_of(self, prompt: str) -> str:
        """'test' iff split_unit(canonical(prompt)) < test_fraction, else 'train'."""
        return "test" if split_unit(self.canonical(prompt)) < self.test_fraction else "train"

    def rng(self, split: str, seed: int) -> np.random.Generator:
        """numpy Generator seeded with (seed, stable_int(name), index of split)."""
        return np.random.default_rng([_check_seed(seed), stable_int("task", self.name), SPLITS.index(split)])

    def examples(self, split: str, n: int, seed: int, *, unique: bool = False) -> list[Example]:
        """`n` examples of `split` ('train' or 'test'), a deterministic function of (task, split, n, seed);
        the first k examples for n >= k are the same. unique=True draws distinct prompts (an error names the
        task when its split has too few problems for n)."""
        if split not in SPLITS:
            raise ValueError(f"task {self.name!r}: split must be one of {SPLITS}, got {split!r}")
        _check_count("n", n, 0)
        rng = self.rng(split, seed)
        out: list[Example] = []
        seen: set[str] = set()
        draws, limit = 0, 1000 + 200 * n
        while len(out) < n:
            if draws >= limit:
                raise ValueError(f"task {self.name!r}: found only {len(out)} of {n} {'distinct ' * unique}"
                                 f"{split} problems in {draws} draws; the {split} split of this difficulty "
                                 f"setting is too small for n={n} (raise the difficulty or lower n)")
            draws += 1
            ex = self.sample(rng)
            if self.split_of(ex.prompt) != split or (unique and ex.prompt in seen):
                continue
            seen.add(ex.prompt)
            out.append(ex)
        return out

    def score(self, prediction: str, answer: str) -> float:
        """exact_match(prediction, answer): 1.0 or 0.0."""
        return exact_match(prediction, answer)


def _letters(rng: np.random.Generator, alphabet: str, length: int) -> str:
    return "".join(alphabet[i] for i in rng.integers(0, len(alphabet), length))


def _check_alphabet(task: Task, field: str = "alphabet") -> None:
    alphabet = getattr(task, field)
    if not alphabet or len(set(alphabet)) != len(alphabet) or not all(c.isalnum() for c in alphabet):
        raise task._error(field, "must be a non-empty string of distinct letters or digits")


def _check_range(task: Task, low: str, high: str, minimum: int) -> None:
    for field in (low, high):
        value = getattr(task, field)
        if not is_int(value) or value < minimum:
            raise task._error(field, f"must be an int >= {minimum}")
    if getattr(task, low) > getattr(task, high):
        raise task._error(low, f"must be <= {high}={getattr(task, high)!r}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModularArithmetic(Task):
    """'mod p: a op b =' -> ' (a op b) mod p', a, b uniform in [0, p), op uniform over `ops` (+, -, *)."""

    name: str = "modular_arithmetic"
    p: int = 97
    ops: tuple[str, ...] = ("+", "-", "*")
    description: ClassVar[str] = "(a op b) mod p"

    def validate(self):
        _check_count(f"task {self.name!r}: p", self.p, 2)
        if not self.ops or not set(self.ops) <= {"+", "-", "*"} or len(set(self.ops)) != len(self.ops):
            raise self._error("ops", "must be distinct operators from ('+', '-', '*')")

    def sample(self, rng):
        op = self.ops[int(rng.integers(len(self.ops)))]
        a, b = (int(x) for x in rng.integers(0, self.p, 2))
        value = {"+": a + b, "-": a - b, "*": a * b}[op] % self.p
        return Example(f"mod {self.p}: {a} {op} {b} =", f" {value}")

    def canonical(self, prompt):
        """Commutative + and *: operands in increasing order."""
        head, a, op, b, eq = prompt.rsplit(" ", 4)
        if op in "+*" and int(a) > int(b):
            a, b = b, a
        return " ".join((head, a, op, b, eq))


@dataclasses.dataclass(frozen=True, kw_only=True)
class Addition(Task):
    """'add: a + b =' -> ' a+b'; each operand has a uniform number of digits in [min_digits, max_digits],
    then a uniform value with exactly that many digits (one digit includes 0)."""

    name: str = "addition"
    min_digits: int = 1
    max_digits: int = 4
    description: ClassVar[str] = "multi-digit addition"

    def validate(self):
        _check_range(self, "min_digits", "max_digits", 1)

    def _operand(self, rng) -> int:
        d = int(rng.integers(self.min_digits, self.max_digits + 1))
        low = 0 if d == 1 else 10 ** (d - 1)
        return int(rng.integers(low, 10 ** d))

    def sample(self, rng):
        a, b = self._operand(rng), self._operand(rng)
        return Example(f"add: {a} + {b} =", f" {a + b}")

    def canonical(self, prompt):
        """Operands in increasing order."""
        head, a, plus, b, eq = prompt.split(" ")
        a, b = sorted((a, b), key=int)
        return " ".join((head, a, plus, b, eq))


@dataclasses.dataclass(frozen=True, kw_only=True)
class Sort(Task):
    """'sort: x1 ... xk =' -> the list in ascending numeric order; k uniform in [min_len, max_len],
    values uniform in [0, max_value] (repeats allowed)."""

    name: str = "sort"
    min_len: int = 3
    max_len: int = 8
    max_value: int = 99
    description: ClassVar[str] = "sort a list of integers"

    def validate(self):
        _check_range(self, "min_len", "max_len", 1)
        _check_count(f"task {self.name!r}: max_value", self.max_value, 1)

    def sample(self, rng):
        k = int(rng.integers(self.min_len, self.max_len + 1))
        xs = [int(x) for x in rng.integers(0, self.max_value + 1, k)]
        return Example("sort: " + " ".join(map(str, xs)) + " =", " " + " ".join(map(str, sorted(xs))))

    def canonical(self, prompt):
        """The multiset of values (the sorted list): permutations share a split, and so do their answers."""
        xs = prompt.split(" ")[1:-1]
        return "sort: " + " ".join(sorted(xs, key=int)) + " ="


@dataclasses.dataclass(frozen=True, kw_only=True)
class StringTask(Task):
    """'<keyword>: s =' -> ' transform(s)'; |s| uniform in [min_len, max_len], letters uniform over `alphabet`
    (the string tasks differ only in `keyword` and `transform`)."""

    min_len: int = 3
    max_len: int = 8
    alphabet: str = string.ascii_lowercase
    keyword: ClassVar[str] = ""

    def validate(self):
        _check_range(self, "min_len", "max_len", 1)
        _check_alphabet(self)

    def transform(self, s: str) -> str:
        raise NotImplementedError(type(self).__name__)

    def sample(self, rng):
        s = _letters(rng, self.alphabet, int(rng.integers(self.min_len, self.max_len + 1)))
        return Example(f"{self.keyword}: {s} =", f" {self.transform(s)}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class Reverse(StringTask):
    """'reverse: s =' -> ' s reversed'."""

    name: str = "reverse"
    keyword: ClassVar[str] = "reverse"
    description: ClassVar[str] = "reverse a string"

    def transform(self, s):
        return s[::-1]


@dataclasses.dataclass(frozen=True, kw_only=True)
class Copy(StringTask):
    """'copy: s =' -> ' s'."""

    name: str = "copy"
    keyword: ClassVar[str] = "copy"
    description: ClassVar[str] = "copy a string"

    def transform(self, s):
        return s


@dataclasses.dataclass(frozen=True, kw_only=True)
class KeyValueRecall(Task):
    """'recall: k1=v1 ... kn=vn; kq =' -> ' vq'; n uniform in [min_pairs, max_pairs] distinct keys of
    `key_len` letters, values uniform in [0, max_value], the queried key uniform among them."""

    name: str = "kv_recall"
    min_pairs: int = 2
    max_pairs: int = 6
    key_len: int = 1
    max_value: int = 9
    alphabet: str = string.ascii_lowercase
    description: ClassVar[str] = "recall the value of a key from a context of key=value pairs"

    def validate(self):
        _check_range(self, "min_pairs", "max_pairs", 1)
        _check_count(f"task {self.name!r}: key_len", self.key_len, 1)
        _check_count(f"task {self.name!r}: max_value", self.max_value, 1)
        _check_alphabet(self)
        if self.max_pairs > len(self.alphabet) ** self.key_len:
            raise self._error("max_pairs", f"exceeds the {len(self.alphabet) ** self.key_len} possible keys")

    def sample(self, rng):
        n = int(rng.integers(self.min_pairs, self.max_pairs + 1))
        keys: list[str] = []
        while len(keys) < n:
            key = _letters(rng, self.alphabet, self.key_len)
            if key not in keys:
                keys.append(key)
        values = [int(v) for v in rng.integers(0, self.max_value + 1, n)]
        q = int(rng.integers(n))
        context = " ".join(f"{k}={v}" for k, v in zip(keys, values))
        return Example(f"recall: {context}; {keys[q]} =", f" {values[q]}")

    def canonical(self, prompt):
        """The set of pairs (sorted by key) and the query."""
        context, query = prompt[len("recall: "):].split("; ")
        return "recall: " + " ".join(sorted(context.split(" "))) + "; " + query


@dataclasses.dataclass(frozen=True, kw_only=True)
class Parity(Task):
    """'parity: b1...bk =' -> ' (sum of bits) mod 2'; k uniform in [min_len, max_len], fair random bits."""

    name: str = "parity"
    min_len: int = 4
    max_len: int = 12
    description: ClassVar[str] = "parity of a bit string"

    def validate(self):
        _check_range(self, "min_len", "max_len", 1)

    def sample(self, rng):
        bits = [int(b) for b in rng.integers(0, 2, int(rng.integers(self.min_len, self.max_len + 1)))]
        return Example("parity: " + "".join(map(str, bits)) + " =", f" {sum(bits) % 2}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class Count(Task):
    """'count c: s =' -> ' number of c in s'; |s| uniform in [min_len, max_len] over `alphabet` (small, so
    counts vary), c uniform over `alphabet`."""

    name: str = "count"
    min_len: int = 4
    max_len: int = 12
    alphabet: str = "abcd"
    description: ClassVar[str] = "count the occurrences of a letter"

    def validate(self):
        _check_range(self, "min_len", "max_len", 1)
        _check_alphabet(self)

    def sample(self, rng):
        s = _letters(rng, self.alphabet, int(rng.integers(self.min_len, self.max_len + 1)))
        c = self.alphabet[int(rng.integers(len(self.alphabet)))]
        return Example(f"count {c}: {s} =", f" {s.count(c)}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class Uppercase(StringTask):
    """'uppercase: s =' -> ' S' (s in capitals); `alphabet` must be lower case."""

    name: str = "uppercase"
    keyword: ClassVar[str] = "uppercase"
    description: ClassVar[str] = "write a string in capitals"

    def validate(self):
        super().validate()
        if not self.alphabet.islower():
            raise self._error("alphabet", "must be lower-case letters")

    def transform(self, s):
        return s.upper()


@dataclasses.dataclass(frozen=True, kw_only=True)
class Increment(Task):
    """'increment: a =' -> ' a + 1'; a uniform in [0, max_value]."""

    name: str = "increment"
    max_value: int = 999
    description: ClassVar[str] = "add one to a number"

    def validate(self):
        if not is_int(self.max_value) or self.max_value < 1:
            raise self._error("max_value", "must be an int >= 1")

    def sample(self, rng):
        a = int(rng.integers(0, self.max_value + 1))
        return Example(f"increment: {a} =", f" {a + 1}")


TASK_TYPES: dict[str, Callable[..., Task]] = {
    "modular_arithmetic": ModularArithmetic, "addition": Addition, "sort": Sort, "reverse": Reverse,
    "copy": Copy, "kv_recall": KeyValueRecall, "parity": Parity, "count": Count, "uppercase": Uppercase,
    "increment": Increment}

TASKS: dict[str, Task] = {name: make() for name, make in TASK_TYPES.items()}


def make_task(name: str, /, **params) -> Task:
    """TASKS[name] with some fields replaced (difficulty, test_fraction, or `name=` to run two variants of one
    task side by side); unknown names and fields are errors listing the valid ones."""
    if name not in TASKS:
        raise KeyError(f"unknown task {name!r}; known tasks: {sorted(TASKS)}")
    base = TASKS[name]
    valid = [f.name for f in dataclasses.fields(base)]
    unknown = sorted(set(params) - set(valid))
    if unknown:
        raise ValueError(f"task {name!r} has no parameter(s) {unknown}; valid parameters: {valid}")
    if "ops" in params and isinstance(params["ops"], (list, str)):
        params["ops"] = tuple(params["ops"])
    return dataclasses.replace(base, **params)


def get_task(task: str | Task) -> Task:
    """A Task, given one or its registry name."""
    if isinstance(task, Task):
        return task
    if task not in TASKS:
        raise KeyError(f"unknown task {task!r}; known tasks: {sorted(TASKS)}")
    return TASKS[task]
