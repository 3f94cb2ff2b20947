"""Instruction data split into the survey's seven functions, built from text available offline.

    data = build_functions(n_score=100, n_eval=24, seed=0, facts="experiments/edit/data/smollm2_facts.jsonl")
    data.split("score")            # [Instance(function, prompt, response, source, group), ...] for the AP scores
    data.split("eval")             # held-out instances (other groups) for the perplexity measurements
    data.manifest()                # {function: {'score': n, 'eval': n, 'sources': {source: n}}, ...}

The survey (Xiao et al. 2024, section 4.2) takes 1,000 single-label Infinity-Instruct chats per function. No such
data set is on this machine; each function is built here from what is (every builder is deterministic given `seed`):

  coding       top-level functions with a docstring from ~40 pure-Python standard-library modules (`ast`): the
               prompt asks for a function with that signature doing what the docstring's first line says; the
               response is the function's source. Group: the module file.
  math         synthetic word problems and exercises (arithmetic, percentages, linear equations, fractions, areas,
               averages, unit conversions, modular arithmetic) with short worked solutions. Group: the problem.
  linguistic   WordNet 3.0 (data.corpora 'wordnet'): the part of speech of a word inside a gloss's example
               sentence, synonyms of a word sense, and grammaticality judgements of example sentences (half of
               them with two adjacent words swapped). Group: the synset.
  knowledge    factual completions from a facts file (experiments/edit/data/smollm2_facts.jsonl: each case's fact
               and its neighbourhood facts, de-duplicated) when given, and WordNet's proper-noun and
               domain-labelled noun glosses ("What is Lisbon?" -> "Lisbon: the capital ..."). Group: the fact.
  translation  gettext message catalogs of the system's programs (/usr/share/locale/{fr,de,es}/LC_MESSAGES/*.mo:
               English interface messages and their human translations; plain sentences of 4-16 words only), and
               the hand-written sentence pairs of prompts.json (English <-> French, German, Spanish). Group: the
               English sentence.
  ethics       the hand-written moral questions and short answers of prompts.json, each in several phrasings.
               Group: the question.
  writing      the hand-written creative prompts and responses of prompts.json, each in several phrasings, and
               continuations of State of the Union paragraphs (data.corpora 'sotu'; the packaged Kennedy 1962
               passage when the corpus cannot be fetched): the prompt gives the first sentence(s), the response is
               the rest. Group: the paragraph or prompt.

Sources that are not on the machine (WordNet, SOTU, locale catalogs, the facts file) are skipped and recorded in the
manifest's 'missing'; a function left with fewer than n_score + n_eval instances is an error naming it.

Splitting: per function, the groups are shuffled with (seed, function) and dealt to the evaluation split until it
holds n_eval instances, then to the scoring split until it holds n_score; so no group (a module, a synset, a question)
is in both splits, and the perplexities are measured on instances the neurons were not selected on.
"""
from __future__ import annotations

import ast
import collections
import dataclasses
import json
import re
import struct
from fractions import Fraction
from importlib import resources
from pathlib import Path
from typing import Callable, Mapping, Optional, Sequence

import numpy as np

from configurable_fm.checks import is_int
from configurable_fm.data.synthetic.tasks import stable_int

FUNCTIONS = ("coding", "math", "linguistic", "knowledge", "translation", "ethics", "writing")
SPLITS = ("score", "eval")
LANGUAGES = {"fr": "French", "de": "German", "es": "Spanish"}
LOCALE_ROOT = "/usr/share/locale"
LOCALE_DOMAINS = ("coreutils", "tar", "wget", "grep", "sed", "findutils", "diffutils", "make", "apt", "dpkg", "bash",
                  "git", "glib20", "gtk20", "shadow", "systemd", "psmisc", "procps-ng", "gettext-tools", "libc",
                  "man-db", "gnupg2", "xz", "adduser", "PackageKit", "software-properties")
STDLIB_MODULES = ("argparse", "base64", "bisect", "calendar", "colorsys", "configparser", "copy", "csv", "datetime",
                  "difflib", "dis", "email", "fnmatch", "fractions", "ftplib", "functools", "glob", "gzip", "heapq",
                  "html", "http", "imaplib", "inspect", "ipaddress", "json", "locale", "mailbox", "mimetypes",
                  "ntpath", "numbers", "operator", "optparse", "os", "pathlib", "pickle", "pprint", "quopri",
                  "random", "shlex", "shutil", "smtplib", "statistics", "string", "tarfile", "textwrap", "tokenize",
                  "turtle", "urllib", "uuid", "wave", "xml", "zipfile")


class FunctionDataError(ValueError):
    """A function cannot be given the instances asked for, or an option is invalid."""


@dataclasses.dataclass(frozen=True)
class Instance:
    """One single-label chat: `prompt` (the user turn), `response` (the assistant turn), the `function` it needs,
    where it came from (`source`) and its `group` (instances of one group share a split)."""

    function: str
    prompt: str
    response: str
    source: str
    group: str


@dataclasses.dataclass
class FunctionData:
    """The instances of each split ({'score': [...], 'eval': [...]}, function by function in FUNCTIONS order), the
    sources' counts and what was missing."""

    splits: dict
    functions: tuple
    missing: dict
    seed: int

    def split(self, name: str) -> list[Instance]:
        if name not in self.splits:
            raise KeyError(f"no split {name!r}; the splits are {list(self.splits)}")
        return self.splits[name]

    def labels(self, name: str) -> np.ndarray:
        """(N, K) bool: instance n of the split needs function k (single-label: one True per row)."""
        insts = self.split(name)
        return np.asarray([[i.function == f for f in self.functions] for i in insts], bool)

    def manifest(self) -> dict:
        """{'seed', 'functions': {f: {'score': n, 'eval': n, 'sources': {source: n}}}, 'missing': {...}}."""
        out = {}
        for f in self.functions:
            entry = {s: sum(i.function == f for i in self.splits[s]) for s in SPLITS}
            entry["sources"] = dict(sorted(collections.Counter(
                i.source for s in SPLITS for i in self.splits[s] if i.function == f).items()))
            entry["groups"] = {s: len({i.group for i in self.splits[s] if i.function == f}) for s in SPLITS}
            out[f] = entry
        return {"seed": self.seed, "functions": out, "missing": dict(self.missing)}


# ------------------------------------------------------------------------------------------------ helpers
def handwritten() -> dict:
    """The hand-written prompts shipped with the package (prompts.json): ethics, writing, translation."""
    text = resources.files("configurable_fm.analysis.specialisation").joinpath("prompts.json").read_text("utf-8")
    return json.loads(text)


def _rng(seed: int, *parts) -> np.random.Generator:
    return np.random.default_rng(stable_int(seed, *parts))


def _first_sentence(text: str) -> str:
    text = " ".join(text.split())
    m = re.match(r"(.+?[.!?])(\s|$)", text)
    return (m.group(1) if m else text).strip()


# ------------------------------------------------------------------------------------------------ coding
CODING_TEMPLATES = ("Write a Python function `{sig}` that does the following: {doc}",
                    "Implement `{sig}` in Python. {doc}",
                    "How would I write a Python function named `{name}`? It should work like this: {doc} Show the "
                    "code.",
                    "Write Python code for the function `{sig}`. Docstring: \"{doc}\"")


def coding_instances(seed: int, *, modules: Sequence[str] = STDLIB_MODULES, max_chars: int = 1500,
                     per_file: int = 4) -> list[Instance]:
    """Standard-library functions with a docstring (module docstring); at most `per_file` per file."""
    from configurable_fm.data.corpora import collect_documents, stdlib_source

    docs, _ = collect_documents([stdlib_source(packages=list(modules), exclude_tests=True)], min_chars=64)
    out = []
    for doc in docs:
        try:
            tree = ast.parse(doc.text)
        except SyntaxError:
            continue
        found = 0
        for node in tree.body:
            if not isinstance(node, ast.FunctionDef) or node.name.startswith("__"):
                continue
            docstring = ast.get_docstring(node)
            src = ast.get_source_segment(doc.text, node)
            if not docstring or not src or not 80 <= len(src) <= max_chars or src.count("\n") < 3:
                continue
            first = _first_sentence(docstring)
            if not 15 <= len(first) <= 200:
                continue
            sig = f"{node.name}({ast.unparse(node.args)})"
            rng = _rng(seed, "coding", doc.id, node.name)
            template = CODING_TEMPLATES[int(rng.integers(len(CODING_TEMPLATES)))]
            out.append(Instance("coding", template.format(sig=sig, name=node.name, doc=first), src,
                                f"stdlib:{doc.id}", doc.id))
            found += 1
            if found == per_file:
                break
    return out


# ------------------------------------------------------------------------------------------------ math
def _math_problem(rng: np.random.Generator, kind: int) -> tuple[str, str]:
    r = lambda lo, hi: int(rng.integers(lo, hi + 1))  # noqa: E731
    names = ["Ana", "Ben", "Chen", "Dara", "Eli", "Farah", "Gus", "Hana", "Ivan", "Jia"]
    who = names[r(0, len(names) - 1)]
    if kind == 0:
        a, b = r(3, 48), r(3, 30)
        return (f"{who} buys {a} boxes of pencils with {b} pencils in each box. How many pencils does {who} have?",
                f"Multiply the boxes by the pencils per box: {a} × {b} = {a * b}. {who} has {a * b} pencils.")
    if kind == 1:
        p, x = r(1, 19) * 5, r(2, 80) * 10
        return (f"What is {p}% of {x}?", f"{p}% of {x} is {p}/100 × {x} = {Fraction(p * x, 100)}.")
    if kind == 2:
        a, x, b = r(2, 12), r(-15, 25), r(-40, 40)
        c = a * x + b
        sign = "+" if b >= 0 else "-"
        return (f"Solve for x: {a}x {sign} {abs(b)} = {c}.",
                f"Subtract {b} from both sides: {a}x = {c - b}. Divide by {a}: x = {x}.")
    if kind == 3:
        n1, d1, n2, d2 = r(1, 9), r(2, 12), r(1, 9), r(2, 12)
        s = Fraction(n1, d1) + Fraction(n2, d2)
        return (f"Add the fractions {n1}/{d1} and {n2}/{d2}. Give the answer in lowest terms.",
                f"Use the common denominator {d1 * d2}: {n1 * d2}/{d1 * d2} + {n2 * d1}/{d1 * d2} = "
                f"{n1 * d2 + n2 * d1}/{d1 * d2} = {s.numerator}/{s.denominator}.")
    if kind == 4:
        w, h = r(2, 40), r(2, 40)
        return (f"A rectangle is {w} cm wide and {h} cm long. What are its area and perimeter?",
                f"Area = {w} × {h} = {w * h} square centimeters. Perimeter = 2 × ({w} + {h}) = {2 * (w + h)} cm.")
    if kind == 5:
        xs = [r(10, 99) for _ in range(r(3, 6))]
        mean = Fraction(sum(xs), len(xs))
        mean_text = str(mean) if mean.denominator == 1 else f"{float(mean):.2f}"
        return (f"Find the average of these numbers: {', '.join(map(str, xs))}.",
                f"The sum is {sum(xs)} and there are {len(xs)} numbers, so the average is {sum(xs)} / {len(xs)} = "
                f"{mean_text}.")
    if kind == 6:
        km = r(2, 90)
        return (f"A train travels {km * 60} kilometers in {km} hours at constant speed. What is its speed?",
                f"Speed = distance / time = {km * 60} / {km} = 60 kilometers per hour.")
    if kind == 7:
        p = [7, 11, 13, 17, 19, 23, 29, 31][r(0, 7)]
        a, b = r(10, 200), r(10, 200)
        return (f"Compute ({a} × {b}) mod {p}.",
                f"{a} × {b} = {a * b}, and {a * b} = {p} × {a * b // p} + {a * b % p}, so the result is "
                f"{a * b % p}.")
    if kind == 8:
        a, b = r(100, 9999), r(100, 9999)
        return (f"What is {a} + {b}? Show the calculation.", f"{a} + {b} = {a + b}.")
    if kind == 9:
        price, n, paid = r(2, 25), r(2, 9), 0
        paid = (price * n // 50 + 1) * 50
        return (f"{who} buys {n} tickets at ${price} each and pays with ${paid}. How much change does {who} get?",
                f"The tickets cost {n} × ${price} = ${n * price}. The change is ${paid} - ${n * price} = "
                f"${paid - n * price}.")
    a, b = r(2, 30), r(2, 30)
    return (f"What is the greatest common divisor of {a * 6} and {b * 6}?",
            f"Using the Euclidean algorithm, gcd({a * 6}, {b * 6}) = {int(np.gcd(a * 6, b * 6))}.")


def math_instances(seed: int, n: int) -> list[Instance]:
    """n synthetic problems (11 kinds, in turn) with worked solutions; duplicates dropped."""
    out, seen = [], set()
    rng = _rng(seed, "math")
    for i in range(4 * n):
        prompt, response = _math_problem(rng, i % 11)
        if prompt in seen:
            continue
        seen.add(prompt)
        out.append(Instance("math", prompt, response, f"synthetic:math{i % 11}", f"math:{prompt}"))
        if len(out) == n:
            break
    return out


# ------------------------------------------------------------------------------------------------ WordNet
POS_NAMES = {"noun": "noun", "verb": "verb", "adj": "adjective", "adv": "adverb"}
KNOWLEDGE_DOMAINS = ("biology", "chemistry", "physics", "medicine", "astronomy", "geology", "law", "economics",
                     "anatomy", "botany", "zoology", "mathematics", "computer science", "pathology", "genetics",
                     "meteorology", "psychology", "geography", "music", "architecture")


def wordnet_synsets() -> list[tuple[str, str, list[str], str]]:
    """[(pos, offset, words, gloss)] of WordNet 3.0 (data.corpora's 'wordnet' source, fetched into its cache)."""
    from configurable_fm.data.corpora import make_sources

    (source,) = make_sources(["wordnet"])
    out = []
    for doc in source:
        pos = doc.id.split(":")[0].removeprefix("data.")
        for k, line in enumerate(doc.text.splitlines()):
            words, sep, gloss = line.partition(": ")
            if sep:
                out.append((pos, f"{doc.id}+{k}", [w.strip() for w in words.split(",")], gloss.strip()))
    return out


def _gloss_parts(gloss: str) -> tuple[str, list[str]]:
    """(definition, example sentences) of a WordNet gloss 'def; "example"; "example"'."""
    examples = re.findall(r'"([^"]+)"', gloss)
    definition = gloss.split(';')[0].split('"')[0].strip().rstrip(";").strip()
    return definition, examples


def linguistic_instances(seed: int, synsets) -> list[Instance]:
    """Part of speech in context, synonyms of a sense, grammaticality (module docstring)."""
    out = []
    rng = _rng(seed, "linguistic")
    kinds = rng.integers(3, size=len(synsets))
    for (pos, offset, words, gloss), kind in zip(synsets, kinds):
        if kind == 1 and len(words) < 3 or kind != 1 and '"' not in gloss:
            continue
        definition, examples = _gloss_parts(gloss)
        name = POS_NAMES.get(pos, pos)
        if kind == 0 and examples:
            ex = examples[0]
            hit = next((w for w in words if " " not in w and re.search(rf"\b{re.escape(w)}\b", ex)), None)
            if hit and len(ex.split()) >= 4:
                article = "an" if name[0] in "aeiou" else "a"
                out.append(Instance("linguistic",
                                    f"In the sentence \"{ex}\", what part of speech is the word '{hit}'?",
                                    f"In this sentence, '{hit}' is used as {article} {name}.", "wordnet:pos",
                                    f"wn:{offset}"))
        elif kind == 1 and len(words) >= 3 and definition:
            out.append(Instance("linguistic",
                                f"List synonyms of the {name} '{words[0]}' in the sense \"{definition}\".",
                                f"Synonyms of '{words[0]}' in this sense: {', '.join(words[1:6])}.",
                                "wordnet:synonyms", f"wn:{offset}"))
        elif kind == 2 and examples and len(examples[0].split()) >= 6:
            tokens = examples[0].split()
            if rng.random() < 0.5:
                i = int(rng.integers(1, len(tokens) - 2))
                if tokens[i].lower() != tokens[i + 1].lower():
                    swapped = tokens[:i] + [tokens[i + 1], tokens[i]] + tokens[i + 2:]
                    out.append(Instance(
                        "linguistic", f"Is this sentence grammatically correct? \"{' '.join(swapped)}\"",
                        f"No. Two words are in the wrong order; the correct sentence is \"{examples[0]}\".",
                        "wordnet:grammaticality", f"wn:{offset}"))
            else:
                out.append(Instance("linguistic", f"Is this sentence grammatically correct? \"{examples[0]}\"",
                                    "Yes, the sentence is grammatically correct.", "wordnet:grammaticality",
                                    f"wn:{offset}"))
    return out


def knowledge_instances(seed: int, synsets, facts: Optional[str | Path], *, max_wordnet: int = 400) -> list[Instance]:
    """Facts-file completions and WordNet encyclopedic glosses (module docstring; at most `max_wordnet` of these,
    a seeded sample)."""
    out = []
    if facts:
        seen = set()
        for line in Path(facts).read_text("utf-8").splitlines():
            if not line.strip():
                continue
            case = json.loads(line)
            pairs = [(case["prompt"].format(case["subject"]), case["target_true"])]
            pairs += list(zip(case.get("neighborhood_prompts", []), case.get("neighborhood_targets", [])))
            for p, t in pairs:
                if p in seen:
                    continue
                seen.add(p)
                rng = _rng(seed, "knowledge", p)
                template = ["Complete this statement with the correct fact: {p} ...",
                            "Fill in the blank with a fact: {p} ___.",
                            "Finish the sentence correctly: \"{p}\""][int(rng.integers(3))]
                out.append(Instance("knowledge", template.format(p=p), f"{p}{t}.", f"facts:{case['relation']}",
                                    f"fact:{p}"))
    domain = re.compile(r"^\((" + "|".join(KNOWLEDGE_DOMAINS) + r")\)\s*")
    wordnet = []
    for pos, offset, words, gloss in synsets:
        if pos != "noun":
            continue
        definition, _ = _gloss_parts(gloss)
        proper = words[0][:1].isupper() and len(definition) > 25
        labelled = domain.match(definition)
        if not (proper or labelled) or len(definition) > 300:
            continue
        definition = domain.sub("", definition)
        rng = _rng(seed, "knowledge", offset)
        template = ["What is {w}?", "Tell me about {w}.", "Explain briefly what {w} is.",
                    "Give a short encyclopedic description of {w}."][int(rng.integers(4))]
        wordnet.append(Instance("knowledge", template.format(w=words[0]), f"{words[0]}: {definition}.",
                                "wordnet:proper_noun" if proper else "wordnet:domain", f"wn:{offset}"))
    if len(wordnet) > max_wordnet:  # the facts keep a fair share
        keep = np.sort(_rng(seed, "knowledge-wordnet").choice(len(wordnet), max_wordnet, replace=False))
        wordnet = [wordnet[i] for i in keep]
    return out + wordnet


# ------------------------------------------------------------------------------------------------ translation
def read_mo(path: str | Path) -> dict[str, str]:
    """{msgid: msgstr} of a GNU gettext .mo file (singular messages with a non-empty translation; the header and
    plural forms skipped). ValueError for a file that is not a .mo catalog."""
    data = Path(path).read_bytes()
    if len(data) < 28:
        raise ValueError(f"{path}: too short for a .mo file")
    magic = struct.unpack("<I", data[:4])[0]
    order = "<" if magic == 0x950412DE else ">" if magic == 0xDE120495 else None
    if order is None:
        raise ValueError(f"{path}: not a .mo file (magic {magic:#x})")
    _, n, orig, trans = struct.unpack(order + "4I", data[4:20])
    out = {}
    for i in range(n):
        ol, oo = struct.unpack(order + "2I", data[orig + 8 * i: orig + 8 * i + 8])
        tl, to = struct.unpack(order + "2I", data[trans + 8 * i: trans + 8 * i + 8])
        msgid, msgstr = data[oo: oo + ol], data[to: to + tl]
        if not msgid or b"\x00" in msgid or b"\x00" in msgstr or b"\x04" in msgid or not msgstr:
            continue
        try:
            out[msgid.decode("utf-8")] = msgstr.decode("utf-8")
        except UnicodeDecodeError:
            continue
    return out


_PLAIN = re.compile(r"^[A-Z][A-Za-z ,'\-]+[.!?]?$")


def plain_message(text: str) -> bool:
    """A sentence-like interface message: 4-16 words, letters and light punctuation only, no format codes."""
    return bool(_PLAIN.match(text)) and 4 <= len(text.split()) <= 16


def locale_pairs(root: str | Path = LOCALE_ROOT, domains: Sequence[str] = LOCALE_DOMAINS,
                 languages: Sequence[str] = tuple(LANGUAGES)) -> list[tuple[str, str, str, str]]:
    """[(english, language, translation, domain)] of the plain messages in the locale catalogs found."""
    out = []
    for lang in languages:
        for domain in domains:
            path = Path(root) / lang / "LC_MESSAGES" / f"{domain}.mo"
            if not path.is_file():
                continue
            try:
                catalog = read_mo(path)
            except ValueError:
                continue
            for en, tr in sorted(catalog.items()):
                tr = tr.strip()
                if plain_message(en) and tr and tr != en and "%" not in tr and "\n" not in tr and "_" not in tr:
                    out.append((en, lang, tr, domain))
    return out


def translation_instances(seed: int, pairs, hand: Mapping) -> list[Instance]:
    """Translation prompts (module docstring): locale catalog pairs and the hand-written ones, both directions."""
    templates = hand["translation_templates"]
    rows = [(en, lang, tr, f"locale:{domain}") for en, lang, tr, domain in pairs]
    for item in hand["translation"]:
        rows += [(item["en"], lang, item[lang], "handwritten:translation") for lang in LANGUAGES]
    out = []
    for en, lang, tr, source in rows:
        rng = _rng(seed, "translation", en, lang)
        template = templates[int(rng.integers(len(templates)))]
        if rng.random() < 0.25:  # the other direction
            prompt = template.format(lang="English", src=LANGUAGES[lang], text=tr)
            response = en
        else:
            prompt = template.format(lang=LANGUAGES[lang], src="English", text=en)
            response = tr
        out.append(Instance("translation", prompt, response, source, f"tr:{en}"))
    return out


# ------------------------------------------------------------------------------------------------ ethics, writing
def ethics_instances(seed: int, hand: Mapping) -> list[Instance]:
    out = []
    for k, item in enumerate(hand["ethics"]):
        for w in hand["ethics_wrappers"]:
            out.append(Instance("ethics", w.format(q=item["prompt"]), item["response"], "handwritten:ethics",
                                f"ethics:{k}"))
    return out


def speech_paragraphs(min_words: int = 40, max_words: int = 110,
                      per_document: int = 3) -> tuple[list[tuple[str, str]], str]:
    """([(piece id, text)] of pieces of four consecutive sentences (40-110 words, at most `per_document` per speech)
    of State of the Union addresses, or of the packaged Kennedy 1962 passage when the
    corpus cannot be fetched), and the source name."""
    from configurable_fm.data.corpora import FetchError, make_sources

    try:
        (source,) = make_sources(["sotu"])
        docs = [(d.id, d.text) for d in source]
        name = "sotu"
    except (FetchError, OSError):
        from configurable_fm.data.texts import english_passage

        docs = [("kennedy_1962", english_passage("kennedy_1962")[1])]
        name = "kennedy_1962"
    out = []
    for doc_id, text in docs:
        kept = 0
        for k, line in enumerate(text.splitlines()):
            sentences = re.split(r"(?<=[.!?])\s+", " ".join(line.split()))
            for j in range(0, len(sentences) - 3, 4):
                piece = " ".join(sentences[j:j + 4])
                if min_words <= len(piece.split()) <= max_words and kept < per_document:
                    out.append((f"{doc_id}#{k}.{j}", piece))
                    kept += 1
    return out, name


def writing_instances(seed: int, hand: Mapping, paragraphs, source: str) -> list[Instance]:
    out = []
    for k, item in enumerate(hand["writing"]):
        for w in hand["writing_wrappers"]:
            out.append(Instance("writing", w.format(q=item["prompt"]), item["response"], "handwritten:writing",
                                f"writing:{k}"))
    templates = hand["continuation_templates"]
    for pid, para in paragraphs:
        sentences = re.split(r"(?<=[.!?])\s+", para)
        cut = 2 if len(sentences) > 3 else 1
        rng = _rng(seed, "writing", pid)
        prompt = templates[int(rng.integers(len(templates)))].format(head=" ".join(sentences[:cut]))
        out.append(Instance("writing", prompt, " ".join(sentences[cut:]), f"{source}:continuation", f"para:{pid}"))
    return out


# ------------------------------------------------------------------------------------------------ assembly
def _deal(instances: list[Instance], n_score: int, n_eval: int, seed: int, function: str) -> dict:
    """{'score': [...], 'eval': [...]}: groups shuffled with (seed, function), dealt to eval then score."""
    groups: dict[str, list[Instance]] = {}
    for inst in instances:
        groups.setdefault(inst.group, []).append(inst)
    order = sorted(groups)
    _rng(seed, "deal", function).shuffle(order)
    got = {"score": [], "eval": []}
    for g in order:
        split = "eval" if len(got["eval"]) < n_eval else "score" if len(got["score"]) < n_score else None
        if split is None:
            break
        room = (n_eval if split == "eval" else n_score) - len(got[split])
        got[split] += groups[g][:room]
    return got


def build_functions(n_score: int, n_eval: int, *, seed: int = 0, functions: Sequence[str] = FUNCTIONS,
                    facts: Optional[str | Path] = None, locale_root: str | Path = LOCALE_ROOT,
                    coding_modules: Sequence[str] = STDLIB_MODULES,
                    log: Optional[Callable[[str], None]] = None) -> FunctionData:
    """The instances of each function (module docstring), split into n_score scoring and n_eval evaluation
    instances per function with no group in both. coding_modules: the standard-library modules the coding
    instances come from (fewer: faster). FunctionDataError naming a function that has too few."""
    for name, v in (("n_score", n_score), ("n_eval", n_eval)):
        if not is_int(v) or v < 1:
            raise FunctionDataError(f"build_functions: {name} must be an int >= 1, got {v!r}")
    unknown = [f for f in functions if f not in FUNCTIONS]
    if unknown or len(set(functions)) < 2 or len(set(functions)) != len(functions):
        raise FunctionDataError(f"build_functions: functions must be at least two distinct names of {list(FUNCTIONS)}, "
                                f"got {list(functions)}")
    if facts and not Path(facts).is_file():
        raise FunctionDataError(f"build_functions: the facts file {str(facts)!r} does not exist")
    say = log or (lambda line: None)
    hand = handwritten()
    missing: dict[str, str] = {}
    need = n_score + n_eval
    synsets: list = []
    if "linguistic" in functions or "knowledge" in functions:
        try:
            synsets = wordnet_synsets()
        except Exception as e:  # noqa: BLE001 (a fetch or unpack failure of any kind: recorded, not fatal here)
            missing["wordnet"] = f"{type(e).__name__}: {e}"
    pools: dict[str, list[Instance]] = {}
    for f in functions:
        if f == "coding":
            pools[f] = coding_instances(seed, modules=coding_modules)
        elif f == "math":
            pools[f] = math_instances(seed, max(need * 2, 64))
        elif f == "linguistic":
            pools[f] = linguistic_instances(seed, synsets)
        elif f == "knowledge":
            pools[f] = knowledge_instances(seed, synsets, facts)
            if not facts:
                missing["facts"] = "no facts file given"
        elif f == "translation":
            pairs = locale_pairs(locale_root)
            if not pairs:
                missing["locale"] = f"no gettext catalogs of {list(LANGUAGES)} under {locale_root}"
            pools[f] = translation_instances(seed, pairs, hand)
        elif f == "ethics":
            pools[f] = ethics_instances(seed, hand)
        elif f == "writing":
            paragraphs, source = speech_paragraphs()
            if source != "sotu":
                missing["sotu"] = "the State of the Union corpus could not be fetched; used the Kennedy 1962 passage"
            pools[f] = writing_instances(seed, hand, paragraphs, source)
        say(f"{f}: {len(pools[f])} candidate instances")
    splits = {"score": [], "eval": []}
    for f in functions:
        got = _deal(pools[f], n_score, n_eval, seed, f)
        if len(got["score"]) < n_score or len(got["eval"]) < n_eval:
            raise FunctionDataError(
                f"build_functions: function {f!r} has {len(pools[f])} instances in "
                f"{len({i.group for i in pools[f]})} groups, too few for {n_score} scoring + {n_eval} evaluation "
                f"instances{' (missing: ' + ', '.join(missing) + ')' if missing else ''}")
        for s in SPLITS:
            splits[s] += got[s]
    return FunctionData(splits, tuple(functions), missing, seed)
