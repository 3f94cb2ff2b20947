"""Tasks built from real text available offline (WordNet 3.0, the State of the Union corpus, the Python standard
library), with the synthetic tasks' interface (data/synthetic/tasks.py: `Task`, exact match, hash splits), and
few-shot prompting of any task.

    task = TEXT_TASKS["antonym"]                      # or get_library_task("antonym"), which also knows TASKS
    task.examples("test", 50, seed=0)                 # [Example("antonym of 'hot':", " cold"), ...]
    fs = few_shot(get_library_task("addition"), shots=2)
    fs.examples("test", 4, 0)[0].prompt               # two train-split demonstrations, then the query

Every text task draws from a finite pool of (prompt, answer) items read once from its source (cached per process):

  antonym   WordNet's antonym pointers ('!', word to word) of adjectives, verbs, nouns, adverbs:
            "antonym of 'hot':" -> " cold"                        canonical: the unordered pair
  pos       words with one part of speech in WordNet (noun / verb / adjective / adverb):
            "part of speech of 'quickly':" -> " adverb"            canonical: the word
  define    WordNet glosses (the definition before the first ';') of common words (at least `min_count`
            occurrences in the State of the Union corpus): "word for 'a young person of either sex':" -> " child"
                                                                 canonical: the word (a word is in one split)
  lemma     WordNet's verb exception list (verb.exc: irregular inflections): "base form of 'went':" -> " go"
                                                                 canonical: the base form
  plural    WordNet's noun exception list (noun.exc) reversed: "plural of 'child':" -> " children"
                                                                 canonical: the singular
  funcname  top-level functions of pure-Python standard-library modules with a docstring: "python function
            that does: Return the number of ...\\nname:" -> " count"   canonical: the name
  nominal   WordNet's derivational pointers from a verb to its nominalisation (not '-er', '-or', '-ing'), both
            common in the State of the Union corpus: "noun of the verb 'reduce':" -> " reduction"
                                                                 canonical: the noun
  cloze     the last word of a State of the Union sentence (8-30 words, the last word alphabetic):
            "complete the sentence: We must protect our" -> " children."     canonical: the prompt

Splits are those of `Task` (data/synthetic/tasks.py): an item is in the test split iff
u(canonical(prompt)) < test_fraction, a function of the problem alone. `examples(split, n, seed)` of a text task
is the first n items of a seeded permutation of that split's items (distinct prompts; an error when the split has
fewer than n), so the first k of n examples are those of any larger n.

Few-shot (`few_shot(task, shots)`): the prompt becomes
    d_1.prompt + d_1.answer + "\\n" + ... + d_k.prompt + d_k.answer + "\\n" + query.prompt
with k fixed demonstrations d_i drawn from the task's train split (seed `demo_seed`), the same for every query;
the answer is unchanged. Its split is the query's (the demonstrations are train problems). The scored answer is
followed by a newline, so a model continues the pattern (answer, newline), which instruct models do without a chat
template.
"""
from __future__ import annotations

import ast
import dataclasses
import functools
import re
from pathlib import Path
from typing import Callable, ClassVar

from configurable_fm.checks import is_int
from configurable_fm.data.synthetic.tasks import SPLITS, TASKS, Example, Task, get_task, make_task

WORD = re.compile(r"[a-z]+")
POS_NAMES = {"n": "noun", "v": "verb", "a": "adjective", "s": "adjective", "r": "adverb"}
WORDNET_FILES = {"noun": "n", "verb": "v", "adj": "a", "adv": "r"}
STDLIB_MODULES = ("argparse", "base64", "bisect", "calendar", "colorsys", "configparser", "copy", "csv", "datetime",
                  "difflib", "fnmatch", "fractions", "functools", "glob", "gzip", "heapq", "html", "inspect",
                  "ipaddress", "json", "mimetypes", "ntpath", "operator", "os", "pathlib", "posixpath", "pprint",
                  "random", "shlex", "shutil", "statistics", "string", "tarfile", "textwrap", "tokenize", "uuid",
                  "zipfile", "email", "http", "urllib", "logging", "unittest", "xml", "sysconfig", "locale")


# ------------------------------------------------------------------------------------------------ sources
@functools.lru_cache(maxsize=1)
def wordnet_dir() -> Path:
    """The directory of WordNet 3.0's database files (data.*, *.exc), fetched into data.corpora's cache."""
    from configurable_fm.data import corpora

    cache = corpora.default_cache_dir()
    art = corpora.fetch_deb("wordnet-base", cache)
    root = corpora._extract_once(art, cache, corpora._dpkg_extract)
    return corpora._one(root, "usr/share/wordnet", art.path.name)


def _wordnet_records(pos_file: str):
    """(offset, ss_type, [(word, lex_id)], [(symbol, offset, pos, source/target hex)], gloss) per synset of
    data.<pos_file> (wndb(5))."""
    for line in (wordnet_dir() / f"data.{pos_file}").read_text("utf-8", errors="replace").splitlines():
        if not line.strip() or line.startswith(" "):
            continue
        head, _, gloss = line.partition(" | ")
        f = head.split()
        count = int(f[3], 16)
        words = [re.sub(r"\((?:a|p|ip)\)$", "", w).replace("_", " ") for w in f[4:4 + 2 * count:2]]
        i = 4 + 2 * count
        n_ptr = int(f[i])
        ptrs = [tuple(f[i + 1 + 4 * j:i + 5 + 4 * j]) for j in range(n_ptr)]
        yield f[0], f[2], words, ptrs, gloss.strip()


@functools.lru_cache(maxsize=1)
def wordnet() -> dict:
    """{'synsets': {(pos, offset): (ss_type, words, pointers, gloss)}} of WordNet 3.0 (all four files)."""
    synsets = {}
    for name, pos in WORDNET_FILES.items():
        for offset, ss_type, words, ptrs, gloss in _wordnet_records(name):
            synsets[(pos, offset)] = (ss_type, words, ptrs, gloss)
    return {"synsets": synsets}


def _exceptions(name: str) -> list[tuple[str, str]]:
    """(inflected form, base form) of WordNet's <name>.exc (first base form of each line)."""
    out = []
    for line in (wordnet_dir() / f"{name}.exc").read_text("utf-8").splitlines():
        parts = line.split()
        if len(parts) >= 2:
            out.append((parts[0], parts[1]))
    return out


@functools.lru_cache(maxsize=1)
def sotu_word_counts() -> dict[str, int]:
    """Lower-case word counts of the State of the Union corpus (data.corpora 'sotu')."""
    import collections

    counts = collections.Counter()
    for doc in sotu_documents():
        counts.update(WORD.findall(doc.lower()))
    return dict(counts)


@functools.lru_cache(maxsize=1)
def sotu_documents() -> tuple[str, ...]:
    from configurable_fm.data.corpora import make_sources

    (source,) = make_sources(["sotu"])
    return tuple(doc.text for doc in source)


def _single(word: str) -> bool:
    return bool(WORD.fullmatch(word)) and 2 <= len(word) <= 14


# ------------------------------------------------------------------------------------------------ item pools
def lexical_pairs(symbol: str, source_pos: str | None = None, target_pos: str | None = None):
    """(word, word) of every lexical pointer `symbol` of WordNet (source/target field != '0000': word to word), in
    synset order, from synsets of part of speech `source_pos` to `target_pos` (None: any; satellite adjectives 's'
    are read in the adjective file 'a')."""
    syn = wordnet()["synsets"]
    for (pos, _), (_, words, ptrs, _) in sorted(syn.items()):
        if source_pos is not None and pos != source_pos:
            continue
        for sym, off, tpos, st in ptrs:
            if sym != symbol or st == "0000" or (target_pos is not None and tpos != target_pos):
                continue
            src, dst = int(st[:2], 16), int(st[2:], 16)
            target = syn.get(("a" if tpos == "s" else tpos, off))
            if target is None or not 0 < src <= len(words) or not 0 < dst <= len(target[1]):
                continue
            yield words[src - 1], target[1][dst - 1]


def antonym_items(min_count: int = 3) -> list[tuple[str, str]]:
    """(word, antonym) from the lexical '!' pointers, each ordered pair once, single lower-case words each seen
    >= min_count times in the State of the Union corpus."""
    counts = sotu_word_counts()
    seen, out = set(), []
    for a, b in lexical_pairs("!"):
        if _single(a) and _single(b) and (a, b) not in seen and min(counts.get(a, 0), counts.get(b, 0)) >= min_count:
            seen.add((a, b))
            out.append((a, b))
    return out


def pos_items(min_count: int = 5) -> list[tuple[str, str]]:
    """(word, part of speech) for single words seen >= min_count times in the State of the Union corpus whose
    synsets all have one part of speech (satellite adjectives count as adjectives)."""
    counts = sotu_word_counts()
    kinds: dict[str, set] = {}
    for (pos, _), (ss_type, words, _, _) in wordnet()["synsets"].items():
        for w in words:
            if _single(w):
                kinds.setdefault(w, set()).add(POS_NAMES[ss_type])
    return sorted((w, next(iter(k))) for w, k in kinds.items() if len(k) == 1 and counts.get(w, 0) >= min_count)


def define_items(min_count: int = 20) -> list[tuple[str, str]]:
    """(definition, word): the gloss before its first ';' (examples dropped) of synsets whose first word is a
    single word seen >= min_count times in the State of the Union corpus, whose definition does not contain it;
    the first synset of each word only (WordNet lists a word's commonest sense first)."""
    counts = sotu_word_counts()
    seen, out = set(), []
    for (pos, off), (_, words, _, gloss) in sorted(wordnet()["synsets"].items(), key=lambda kv: (kv[0][0], kv[0][1])):
        w = words[0]
        if w in seen or not _single(w) or counts.get(w, 0) < min_count:
            continue
        definition = gloss.split(";")[0].split('"')[0].strip()
        if not 10 <= len(definition) <= 90 or re.search(rf"\b{w}", definition):
            continue
        seen.add(w)
        out.append((definition, w))
    return out


def pertainym_items(min_count: int = 3) -> list[tuple[str, str]]:
    """(adjective, the noun it pertains to) from WordNet's lexical pertainym pointers ('\\' in data.adj), single
    words both seen >= min_count times in the State of the Union corpus, the adjective once."""
    counts = sotu_word_counts()
    seen, out = set(), []
    for a, b in lexical_pairs("\\", "a", "n"):
        if _single(a) and _single(b) and a not in seen and min(counts.get(a, 0), counts.get(b, 0)) >= min_count:
            seen.add(a)
            out.append((a, b))
    return out


def nominal_items(min_count: int = 3) -> list[tuple[str, str]]:
    """(verb, its nominalisation) from WordNet's derivational pointers ('+', verb word to noun word): the noun
    shares the verb's first 3 letters and is not an agent ('-er', '-or') or a gerund ('-ing'), both single words
    seen >= min_count times in the State of the Union corpus; where a verb has several, the commonest noun there."""
    counts = sotu_word_counts()
    nouns: dict[str, set] = {}
    for v, n in lexical_pairs("+", "v", "n"):
        if (_single(v) and _single(n) and v != n and n.startswith(v[:3]) and not n.endswith(("er", "or", "ing"))
                and min(counts.get(v, 0), counts.get(n, 0)) >= min_count):
            nouns.setdefault(v, set()).add(n)
    return [(v, max(sorted(ns), key=lambda n: counts[n])) for v, ns in nouns.items()]


KEYWORDS = ("if", "for", "return", "while", "with", "raise", "import", "from", "def", "class", "elif", "try",
            "assert", "yield", "del")


def keyword_items(modules=STDLIB_MODULES, min_chars: int = 12, max_chars: int = 70) -> list[tuple[str, str]]:
    """(code line without its first token, that keyword) for standard-library lines that start with one of
    KEYWORDS followed by a space (stripped, min_chars..max_chars characters, no comment), each line once."""
    from configurable_fm.data.corpora import collect_documents, stdlib_source

    docs, _ = collect_documents([stdlib_source(packages=list(modules), exclude_tests=True)], min_chars=64)
    seen, out = set(), []
    for doc in docs:
        for line in doc.text.splitlines():
            line = line.strip()
            kw, _, rest = line.partition(" ")
            if kw not in KEYWORDS or not min_chars <= len(line) <= max_chars or "#" in line or "'" in rest:
                continue
            if rest in seen or not rest:
                continue
            seen.add(rest)
            out.append(("... " + rest, kw))
    return out


def lemma_items(min_count: int = 3) -> list[tuple[str, str]]:
    """(irregular verb form, base form) of verb.exc, single words, form != base, the form seen >= min_count times
    in the State of the Union corpus."""
    counts = sotu_word_counts()
    return [(f, b) for f, b in _exceptions("verb") if _single(f) and _single(b) and f != b
            and counts.get(f, 0) >= min_count]


def plural_items(min_count: int = 1) -> list[tuple[str, str]]:
    """(singular, irregular plural) of noun.exc, single words, plural != singular, the singular seen
    >= min_count times in the State of the Union corpus."""
    counts = sotu_word_counts()
    return [(b, f) for f, b in _exceptions("noun") if _single(f) and _single(b) and f != b
            and counts.get(b, 0) >= min_count]


def _first_sentence(text: str) -> str:
    text = " ".join(text.split())
    m = re.match(r"(.+?[.!?])(\s|$)", text)
    return (m.group(1) if m else text).strip()


def funcname_items(modules=STDLIB_MODULES) -> list[tuple[str, str]]:
    """(first docstring sentence, function name) of public top-level functions of the standard-library modules
    `modules` (tests excluded), sentences of 20-160 characters that do not contain the name."""
    from configurable_fm.data.corpora import collect_documents, stdlib_source

    docs, _ = collect_documents([stdlib_source(packages=list(modules), exclude_tests=True)], min_chars=64)
    seen, out = set(), []
    for doc in docs:
        try:
            tree = ast.parse(doc.text)
        except SyntaxError:
            continue
        for node in tree.body:
            if not isinstance(node, ast.FunctionDef) or node.name.startswith("_") or node.name in seen:
                continue
            d = ast.get_docstring(node)
            if not d:
                continue
            first = _first_sentence(d)
            if not 20 <= len(first) <= 160 or node.name.lower() in first.lower() or "\n" in first:
                continue
            seen.add(node.name)
            out.append((first, node.name))
    return out


def cloze_items(min_words: int = 8, max_words: int = 30) -> list[tuple[str, str]]:
    """(sentence without its last word, last word + final punctuation) of State of the Union sentences of
    min_words..max_words words whose last word is alphabetic, each sentence once."""
    seen, out = set(), []
    for text in sotu_documents():
        for s in re.split(r"(?<=[.!?])\s+", " ".join(text.split())):
            words = s.split()
            if not min_words <= len(words) <= max_words or not re.fullmatch(r"[a-z]+[.!?]", words[-1]):
                continue
            head = " ".join(words[:-1])
            if head in seen or '"' in s:
                continue
            seen.add(head)
            out.append((head, words[-1]))
    return out


# ------------------------------------------------------------------------------------------------ tasks
@dataclasses.dataclass(frozen=True, kw_only=True)
class TextTask(Task):
    """A task over a finite pool of (x, y) items read from real text (module docstring): prompt
    `template.format(x=x)`, answer ' ' + y; `source` names the pool builder in POOLS."""

    source: str
    template: str
    canonical_by: str = "prompt"  # 'prompt' | 'answer' | 'pair'

    def validate(self):
        if self.source not in POOLS:
            raise self._error("source", f"is not one of {sorted(POOLS)}")
        if self.canonical_by not in ("prompt", "answer", "pair"):
            raise self._error("canonical_by", "must be 'prompt', 'answer' or 'pair'")

    def pool(self) -> list[Example]:
        """Every item of the task as an Example (cached per process)."""
        return pooled(self.source, self.template)

    def canonical(self, prompt: str) -> str:
        if self.canonical_by == "prompt":
            return prompt
        self.pool()  # builds the prompt -> item table on first use
        item = _ITEM_OF[(self.source, self.template)].get(prompt)
        if item is None:
            raise KeyError(f"task {self.name!r}: {prompt!r} is not a prompt of its pool (source {self.source!r})")
        x, y = item
        return y if self.canonical_by == "answer" else "|".join(sorted((x, y)))

    def split_items(self, split: str) -> list[Example]:
        return [ex for ex in self.pool() if self.split_of(ex.prompt) == split]

    def sample(self, rng):
        pool = self.pool()
        return pool[int(rng.integers(len(pool)))]

    def examples(self, split: str, n: int, seed: int, *, unique: bool = True) -> list[Example]:
        """The first n of a permutation (seeded by (seed, task, split)) of the split's items (module docstring)."""
        if split not in SPLITS:
            raise ValueError(f"task {self.name!r}: split must be one of {SPLITS}, got {split!r}")
        if not is_int(n) or n < 0:
            raise ValueError(f"n must be an int >= 0, got {n!r}")
        items = self.split_items(split)
        if n > len(items):
            raise ValueError(f"task {self.name!r}: its {split} split has {len(items)} items, fewer than n={n}")
        order = self.rng(split, seed).permutation(len(items))[:n]
        return [items[int(i)] for i in order]


POOLS: dict[str, Callable[[], list[tuple[str, str]]]] = {
    "antonym": antonym_items, "pos": pos_items, "define": define_items, "lemma": lemma_items,
    "plural": plural_items, "funcname": funcname_items, "cloze": cloze_items, "pertainym": pertainym_items,
    "keyword": keyword_items, "nominal": nominal_items}
_ITEM_OF: dict[tuple[str, str], dict[str, tuple[str, str]]] = {}


def pooled(source: str, template: str) -> list[Example]:
    """The Examples of pool `source` rendered with `template` (cached; duplicate prompts keep their first item)."""
    key = (source, template)
    if key not in _ITEM_OF:
        table = {}
        for x, y in POOLS[source]():
            table.setdefault(template.format(x=x), (x, y))
        _ITEM_OF[key] = table
    return [Example(p, " " + y) for p, (_, y) in _ITEM_OF[key].items()]


TEXT_TASKS: dict[str, TextTask] = {
    "antonym": TextTask(name="antonym", source="antonym", template="antonym of '{x}':", canonical_by="pair"),
    "pos": TextTask(name="pos", source="pos", template="part of speech of '{x}':"),
    "define": TextTask(name="define", source="define", template="word for '{x}':", canonical_by="answer"),
    "lemma": TextTask(name="lemma", source="lemma", template="base form of '{x}':", canonical_by="answer"),
    "plural": TextTask(name="plural", source="plural", template="plural of '{x}':", canonical_by="answer"),
    "funcname": TextTask(name="funcname", source="funcname", template="python function that does: {x}\nname:",
                         canonical_by="answer"),
    "cloze": TextTask(name="cloze", source="cloze", template="complete the sentence: {x}"),
    "pertainym": TextTask(name="pertainym", source="pertainym", template="noun of the adjective '{x}':",
                          canonical_by="answer"),
    "keyword": TextTask(name="keyword", source="keyword", template="python keyword missing at the start of '{x}':"),
    "nominal": TextTask(name="nominal", source="nominal", template="noun of the verb '{x}':", canonical_by="answer"),
}
# Easier settings of synthetic tasks (the instruct base scores 0 on the default sort and reverse with few shots).
SYNTHETIC_VARIANTS: dict[str, Task] = {
    "sort_short": make_task("sort", name="sort_short", min_len=2, max_len=4, max_value=20),
    "reverse_short": make_task("reverse", name="reverse_short", min_len=2, max_len=4),
}
TEXT_SOURCES = {"antonym": "WordNet 3.0", "pos": "WordNet 3.0", "define": "WordNet 3.0 + State of the Union",
                "lemma": "WordNet 3.0 verb.exc", "plural": "WordNet 3.0 noun.exc",
                "funcname": "Python standard library", "cloze": "State of the Union",
                "pertainym": "WordNet 3.0 + State of the Union", "keyword": "Python standard library",
                "nominal": "WordNet 3.0 + State of the Union"}


# ------------------------------------------------------------------------------------------------ few-shot
@dataclasses.dataclass(frozen=True, kw_only=True)
class FewShotTask(Task):
    """`inner`'s problems with `shots` fixed train-split demonstrations before each prompt (module docstring)."""

    inner: Task
    shots: int = 2
    demo_seed: int = 12345
    description: ClassVar[str] = "few-shot prompting of a task"

    def validate(self):
        if not is_int(self.shots) or self.shots < 0:
            raise self._error("shots", "must be an int >= 0")

    @functools.cached_property
    def prefix(self) -> str:
        demos = self.inner.examples("train", self.shots, self.demo_seed) if self.shots else []
        return "".join(d.prompt + d.answer + "\n" for d in demos)

    def query(self, prompt: str) -> str:
        """The query part of a few-shot prompt (what a router should look at)."""
        return prompt[len(self.prefix):] if prompt.startswith(self.prefix) else prompt

    def canonical(self, prompt):
        return self.inner.canonical(self.query(prompt))

    def split_of(self, prompt):
        return self.inner.split_of(self.query(prompt))

    def sample(self, rng):
        ex = self.inner.sample(rng)
        return Example(self.prefix + ex.prompt, ex.answer)

    def examples(self, split, n, seed, *, unique: bool = False):
        exs = self.inner.examples(split, n, seed, unique=unique) if not isinstance(self.inner, TextTask) \
            else self.inner.examples(split, n, seed)
        demos = {d.prompt for d in self.inner.examples("train", self.shots, self.demo_seed)} if self.shots else set()
        if split == "train" and demos:  # a demonstration is never its own query
            if isinstance(self.inner, TextTask):  # distinct items: at most `shots` of them are demonstrations
                exs = [e for e in self.inner.examples(split, n + self.shots, seed) if e.prompt not in demos][:n]
            else:  # drawn with replacement: draw more (a prefix-stable stream) until n are not demonstrations
                m, limit = n + 4 * self.shots, n + 4 * self.shots + 1000 + 200 * n
                while True:
                    extra = self.inner.examples(split, m, seed, unique=unique)
                    exs = [e for e in extra if e.prompt not in demos][:n]
                    if len(exs) == n:
                        break
                    if m >= limit:
                        raise ValueError(f"task {self.name!r}: found only {len(exs)} of {n} train problems that "
                                         f"are not one of its {self.shots} demonstrations in {m} draws")
                    m = min(2 * m, limit)
        return [Example(self.prefix + e.prompt, e.answer) for e in exs]

    def score(self, prediction, answer):
        return self.inner.score(prediction, answer)


def get_library_task(name: str) -> Task:
    """A task by name: TEXT_TASKS first, then the synthetic TASKS; KeyError listing both."""
    if name in TEXT_TASKS:
        return TEXT_TASKS[name]
    if name in SYNTHETIC_VARIANTS:
        return SYNTHETIC_VARIANTS[name]
    if name in TASKS:
        return get_task(name)
    raise KeyError(f"unknown task {name!r}; text tasks: {sorted(TEXT_TASKS)}, synthetic tasks: {sorted(TASKS)} "
                   f"and {sorted(SYNTHETIC_VARIANTS)}")


def few_shot(task: Task | str, shots: int = 2, demo_seed: int = 12345) -> FewShotTask:
    """`task` (or its name) with `shots` fixed demonstrations (module docstring)."""
    inner = get_library_task(task) if isinstance(task, str) else task
    return FewShotTask(name=inner.name, inner=inner, shots=shots, demo_seed=demo_seed,
                       test_fraction=inner.test_fraction)


def source_of(name: str) -> str:
    """Where a task's items come from ('synthetic' for TASKS)."""
    return TEXT_SOURCES.get(name, "synthetic")


