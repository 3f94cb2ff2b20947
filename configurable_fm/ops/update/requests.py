"""Edit requests: what a knowledge edit asks for, and reading them from JSONL (flat or CounterFact form).

    req = Request(prompt="{} plays the sport of", subject="LeBron James", target_new=" football",
                  target_true=" basketball")
    req.text                      # 'LeBron James plays the sport of'
    reqs = load_requests("edits.jsonl")                               # flat or CounterFact records
    reqs = [Request.from_edit_request(r) for r in corpus_requests]    # data.synthetic.facts.EditRequest

A request's `prompt` holds exactly one `{}` where the subject goes (ROME/MEMIT find the subject's last token
there); targets are the continuation strings, kept exactly as given: a leading space is part of the target
(`" football"`), since most tokenizers encode a word after a space differently.

JSONL, one record per line (blank lines skipped); the flat form

    {"case_id": 0, "prompt": "{} plays the sport of", "subject": "LeBron James", "target_new": " football",
     "target_true": " basketball", "paraphrase_prompts": [...], "neighborhood_prompts": [...],
     "neighborhood_targets": [...]}

(prompt, subject, target_new required; the rest optional), or CounterFact's nested form

    {"case_id": 0, "requested_rewrite": {"prompt": "{} plays the sport of", "subject": "LeBron James",
     "target_new": {"str": "football", "id": "Q2736"}, "target_true": {"str": "basketball", "id": "Q5372"}},
     "paraphrase_prompts": [...], "neighborhood_prompts": [...], ...}

CounterFact stores targets without their leading space; as the authors' code does (`rome_main.py`), a space is
prepended to a nested-form target that lacks one. Neighbourhood prompts without `neighborhood_targets` expect
`target_true` (CounterFact's definition: other subjects that share the true object). Other keys (CounterFact's
attribute_prompts, generation_prompts, pararel_idx) are ignored. A file whose first character is `[` is read as
one JSON array of such records (CounterFact's own `counterfact.json`), errors naming the record index.

Paraphrase prompts are complete texts; one holding a `{}` gets the subject put in, otherwise it must contain the
subject verbatim. Every problem (malformed JSON, a missing key, a prompt without `{}`, a subject absent from a
paraphrase prompt, an empty target, ...) is a RequestError naming the file and line.
"""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from configurable_fm.errors import UserError

PLACEHOLDER = "{}"
FLAT_KEYS = ("case_id", "prompt", "subject", "target_new", "target_true", "paraphrase_prompts",
             "neighborhood_prompts", "neighborhood_targets")


class RequestError(UserError, ValueError):
    """An edit request that cannot be used; the message names where it came from (file and line)."""


def _strings(value, what: str) -> tuple[str, ...]:
    if isinstance(value, str) or not isinstance(value, (list, tuple)) or not all(isinstance(s, str) for s in value):
        raise RequestError(f"{what} must be a list of strings, got {value!r}")
    return tuple(value)


@dataclasses.dataclass(frozen=True)
class Request:
    """One knowledge edit: make `prompt` with the subject filled in continue with `target_new`.

    prompt: text with exactly one '{}' for the subject ('{} plays the sport of'). subject: non-empty.
    target_new / target_true: continuation strings, kept as given (a leading space is part of the target).
    paraphrase_prompts: other phrasings (complete texts, or with '{}'), for generalisation checks.
    neighborhood_prompts / neighborhood_targets: prompts about other subjects whose continuations must not
    change (targets default to target_true). case_id: an identifier, kept for reports.
    Raises RequestError on a prompt without exactly one '{}', an empty subject or target, or a paraphrase
    prompt that neither holds '{}' nor contains the subject.
    """

    prompt: str
    subject: str
    target_new: str
    target_true: str | None = None
    paraphrase_prompts: tuple[str, ...] = ()
    neighborhood_prompts: tuple[str, ...] = ()
    neighborhood_targets: tuple[str, ...] = ()
    case_id: Any = None

    def __post_init__(self):
        for field in ("prompt", "subject", "target_new"):
            if not isinstance(getattr(self, field), str):
                raise RequestError(f"{field} must be a string, got {getattr(self, field)!r}")
        if self.target_true is not None and not isinstance(self.target_true, str):
            raise RequestError(f"target_true must be a string or null, got {self.target_true!r}")
        for field in ("paraphrase_prompts", "neighborhood_prompts", "neighborhood_targets"):
            object.__setattr__(self, field, _strings(getattr(self, field), field))
        n = self.prompt.count(PLACEHOLDER)
        if n != 1:
            hint = (f" (it contains the subject {self.subject!r}: write '{{}}' in its place)"
                    if n == 0 and self.subject and self.subject in self.prompt else "")
            raise RequestError(f"prompt {self.prompt!r} must contain exactly one '{{}}' for the subject, found {n}"
                               + hint)
        if not self.subject.strip():
            raise RequestError(f"subject of prompt {self.prompt!r} is empty")
        if not self.target_new.strip():
            raise RequestError(f"target_new of prompt {self.prompt!r} is empty")
        if self.target_true is not None and not self.target_true.strip():
            raise RequestError(f"target_true of prompt {self.prompt!r} is empty (use null for none)")
        for i, p in enumerate(self.paraphrase_prompts):
            if PLACEHOLDER not in p and self.subject not in p:
                raise RequestError(f"subject {self.subject!r} is absent from paraphrase_prompts[{i}] {p!r} "
                                   "(and it has no '{}' for it)")
        if self.neighborhood_targets and len(self.neighborhood_targets) != len(self.neighborhood_prompts):
            raise RequestError(f"{len(self.neighborhood_targets)} neighborhood_targets for "
                               f"{len(self.neighborhood_prompts)} neighborhood_prompts")
        if self.neighborhood_prompts and not self.neighborhood_targets:
            if self.target_true is None:
                raise RequestError("neighborhood_prompts need neighborhood_targets or a target_true")
            object.__setattr__(self, "neighborhood_targets", (self.target_true,) * len(self.neighborhood_prompts))
        for field in ("neighborhood_targets",):
            if any(not t.strip() for t in getattr(self, field)):
                raise RequestError(f"{field} holds an empty target")

    @property
    def text(self) -> str:
        """The prompt with the subject filled in."""
        return fill(self.prompt, self.subject)

    @property
    def paraphrases(self) -> tuple[str, ...]:
        """The paraphrase prompts as texts (a '{}' filled with the subject)."""
        return tuple(fill(p, self.subject) if PLACEHOLDER in p else p for p in self.paraphrase_prompts)

    @classmethod
    def from_edit_request(cls, er, case_id=None) -> "Request":
        """From data.synthetic.facts.EditRequest (its prompt holds the subject; its template says where)."""
        head = er.template.split("{object}")[0].rstrip(" ")
        prompt = head.replace("{subject}", PLACEHOLDER)
        return cls(prompt=prompt, subject=er.subject, target_new=er.target_new, target_true=er.target_true,
                   paraphrase_prompts=tuple(er.paraphrase_prompts),
                   neighborhood_prompts=tuple(q.prompt for q in er.neighbourhood),
                   neighborhood_targets=tuple(q.target for q in er.neighbourhood), case_id=case_id)


def fill(prompt: str, subject: str) -> str:
    """`prompt` with its first '{}' replaced by `subject` (no str.format: braces in the subject stay as they are)."""
    i = prompt.index(PLACEHOLDER)
    return prompt[:i] + subject + prompt[i + len(PLACEHOLDER):]


def _spaced(target: str) -> str:
    return target if target.startswith(" ") else " " + target


def parse_request(record: Mapping[str, Any]) -> Request:
    """A Request from one JSON record, flat or CounterFact-nested (module docstring); RequestError otherwise."""
    if not isinstance(record, Mapping):
        raise RequestError(f"a request is a JSON object, got {type(record).__name__}")
    if "requested_rewrite" in record:
        rw = record["requested_rewrite"]
        if not isinstance(rw, Mapping):
            raise RequestError("requested_rewrite must be an object")
        missing = [k for k in ("prompt", "subject", "target_new") if k not in rw]
        if missing:
            raise RequestError(f"requested_rewrite lacks key(s) {missing}")

        def target(name):
            t = rw.get(name)
            if t is None:
                return None
            s = t.get("str") if isinstance(t, Mapping) else t
            if not isinstance(s, str):
                raise RequestError(f"requested_rewrite.{name} must be {{'str': ...}} or a string, got {t!r}")
            return _spaced(s) if s.strip() else s

        return Request(prompt=rw["prompt"], subject=rw["subject"], target_new=target("target_new"),
                       target_true=target("target_true"),
                       paraphrase_prompts=record.get("paraphrase_prompts", ()),
                       neighborhood_prompts=record.get("neighborhood_prompts", ()),
                       neighborhood_targets=record.get("neighborhood_targets", ()),
                       case_id=record.get("case_id"))
    missing = [k for k in ("prompt", "subject", "target_new") if k not in record]
    if missing:
        raise RequestError(f"lacks key(s) {missing} (a flat request has {list(FLAT_KEYS)}; CounterFact records "
                           "have 'requested_rewrite')")
    return Request(prompt=record["prompt"], subject=record["subject"], target_new=record["target_new"],
                   target_true=record.get("target_true"),
                   paraphrase_prompts=record.get("paraphrase_prompts", ()),
                   neighborhood_prompts=record.get("neighborhood_prompts", ()),
                   neighborhood_targets=record.get("neighborhood_targets", ()), case_id=record.get("case_id"))


def parse_lines(lines: Iterable[str], source: str = "<requests>") -> list[Request]:
    """Requests from JSONL lines (blank lines skipped); RequestError naming `source:line` on any problem."""
    out = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise RequestError(f"{source}:{n}: not valid JSON ({e.msg} at column {e.colno})") from None
        try:
            out.append(parse_request(record))
        except RequestError as e:
            raise RequestError(f"{source}:{n}: {e}") from None
    return out


def load_requests(path: str | os.PathLike) -> list[Request]:
    """Requests from a JSONL file (one flat or CounterFact record per line), or from a JSON array of records
    (a file starting with '['). Errors name the file and the line (or the record index of an array)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise RequestError(f"{path}: no such requests file") from None
    except UnicodeDecodeError as e:
        raise RequestError(f"{path}: not UTF-8 text ({e})") from None
    except OSError as e:  # a directory, no permission, ...
        raise RequestError(f"{path}: cannot read the requests file ({e.strerror or e})") from None
    if text.lstrip().startswith("["):
        try:
            records = json.loads(text)
        except json.JSONDecodeError as e:
            raise RequestError(f"{path}:{e.lineno}: not valid JSON ({e.msg} at column {e.colno})") from None
        out = []
        for i, record in enumerate(records):
            try:
                out.append(parse_request(record))
            except RequestError as e:
                raise RequestError(f"{path}: record {i}: {e}") from None
        return out
    # records end at '\n' only: str.splitlines also splits at U+2028, U+0085, ..., which JSON strings may hold raw
    return parse_lines(text.split("\n"), str(path))


def dump_requests(requests: Sequence[Request], path: str | os.PathLike) -> Path:
    """Writes requests as flat JSONL (the inverse of load_requests for the flat form)."""
    path = Path(path)
    lines = [json.dumps({"case_id": r.case_id, "prompt": r.prompt, "subject": r.subject, "target_new": r.target_new,
                         "target_true": r.target_true, "paraphrase_prompts": list(r.paraphrase_prompts),
                         "neighborhood_prompts": list(r.neighborhood_prompts),
                         "neighborhood_targets": list(r.neighborhood_targets)}, ensure_ascii=False)
             for r in requests]
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path
