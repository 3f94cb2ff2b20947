"""Tokenizers (HF `tokenizers`) from tokenizer.json files and from GGUF metadata, with their special tokens and
chat templates, and the tokenizer files of HF directories.

    tok = load_tokenizer("path/to/hf_dir")          # or a tokenizer.json file, or a .gguf file
    tok = tokenizer_from_gguf("model.gguf")         # byte-level BPE rebuilt from tokenizer.ggml.*
    ids = tok.encode("The capital of France is").ids
    chat = load_chat_tokenizer("smollm2-135m-instruct")   # + special tokens, chat template, stop ids
    text = chat.apply_chat_template([{"role": "user", "content": "Hi"}])   # as transformers renders it
    special_tokens_of("model.gguf"), chat_template_of("hf_dir")            # {'bos': '<|im_start|>', ...}, '{% ...'
    write_tokenizer_files(out_dir, chat)            # tokenizer.json, tokenizer_config.json, special_tokens_map.json

A GGUF file stores the vocabulary (`tokenizer.ggml.tokens`, index = id), token types (1 normal, 2 unknown,
3 control, 4 user-defined, 5 unused, 6 byte), BPE merges ("a b" in priority order), the pre-tokenizer family
(`tokenizer.ggml.pre`), special ids (`tokenizer.ggml.{bos,eos,unknown,padding,...}_token_id`) and the chat
template. Byte-level BPE ('gpt2' models) is rebuilt exactly; other tokenizer models are an error.

An HF directory keeps the same facts in tokenizer_config.json (named special tokens, chat template, context
length), special_tokens_map.json (which overrides the former's tokens), chat_template.jinja / chat_template.json
(which transformers prefers to tokenizer_config.json's template) and generation_config.json (the ids that end
generation). `ChatTokenizer` holds them next to the `tokenizers.Tokenizer`; `apply_chat_template` renders a chat
template in transformers' sandboxed Jinja environment, so the prompts match what transformers feeds the model.
"""
from __future__ import annotations

import dataclasses
import datetime
import functools
import json
import os
import warnings
from pathlib import Path
from typing import Mapping, Sequence

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors

from configurable_fm.checks import is_int
from configurable_fm.errors import SourceNotFound, UserError
from configurable_fm.interop.gguf import metadata, read_gguf, source_name
from configurable_fm.interop.safetensors_io import CheckpointError

SUPPORTED_GGUF_MODELS = ("gpt2",)

# tokenizer.ggml.token_type values.
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

_SPECIAL_KEYS = {"bos": "bos_token_id", "eos": "eos_token_id", "unk": "unknown_token_id",
                 "pad": "padding_token_id", "sep": "seperator_token_id", "cls": "cls_token_id",
                 "mask": "mask_token_id", "eot": "eot_token_id", "eom": "eom_token_id"}


class TokenizerError(UserError, ValueError):
    """A tokenizer, its special tokens or its chat template cannot be used as given (the message says which)."""


class UnsupportedTokenizer(UserError, NotImplementedError):
    """A tokenizer format or model this module does not read."""


class ChatTemplateError(UserError, ValueError):
    """A chat template that does not compile, or that refuses the messages (its `raise_exception`)."""


# llama.cpp's regexes for tokenizer.ggml.pre == "default" (also used when the key is absent), applied in turn:
# each splits every piece of the previous one, keeping the matches and the text between them.
_GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_DEFAULT_SPLITS = (r"[\p{P}\$\+<=>\^~\|]+", _GPT2_SPLIT, r"\p{N}+", r"[0-9][0-9][0-9]")


# The BPE pre-tokenizers for which llama.cpp adds BOS when the GGUF has no tokenizer.ggml.add_bos_token
# (llama-vocab.cpp, load: add_bos = true in their branches; the key, when present, wins).
BOS_BY_DEFAULT = ("llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2", "tekken",
                  "chameleon")


def _pre_tokenizer(pre: str):
    """Pre-tokenizer for a `tokenizer.ggml.pre` value (llama.cpp's names; 'gpt2' is taken as 'gpt-2')."""
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre == "smollm":  # digits one by one, then GPT-2's regex split and byte-level mapping
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    if pre == "default":
        return pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(r), "isolated") for r in _DEFAULT_SPLITS]
                                       + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    if pre not in ("gpt-2", "gpt2"):
        warnings.warn(f"GGUF tokenizer.ggml.pre={pre!r} has no dedicated pre-tokenizer here; using GPT-2's "
                      f"regex split, which may split some text differently", stacklevel=3)
    return byte_level


def gguf_special_tokens(path) -> dict[str, int]:
    """{'bos': id, 'eos': id, 'unk': id, 'pad': id, ...} for the special ids the GGUF metadata names.

    `path`: a GGUF file or an open reader (`interop.gguf.read_gguf`)."""
    reader = read_gguf(path)
    out = {}
    for name, key in _SPECIAL_KEYS.items():
        value = metadata(reader, f"tokenizer.ggml.{key}", None, source=source_name(path))
        if value is not None:
            out[name] = int(value)
    return out


def gguf_chat_template(path) -> str | None:
    """The Jinja chat template stored in the GGUF metadata (`tokenizer.chat_template`), or None."""
    return metadata(read_gguf(path), "tokenizer.chat_template", None, source=source_name(path))


def tokenizer_from_gguf(path) -> Tokenizer:
    """Rebuilds the tokenizer of a GGUF file (byte-level BPE, tokenizer.ggml.model == 'gpt2').

    Control tokens (type 3) become special added tokens (never split, skipped by decode(skip_special_tokens));
    user-defined tokens (type 4) become plain added tokens. When `tokenizer.ggml.add_bos_token` (or
    add_eos_token) is true, a post-processor adds the BOS (EOS) id to every encoding; without the key, BOS is
    added where llama.cpp adds it by default (the pre-tokenizers BOS_BY_DEFAULT, when bos_token_id is set). The special ids are
    available from `gguf_special_tokens(path)`. `path`: a GGUF file or an open reader.
    """
    reader = read_gguf(path)
    source = source_name(path)

    def get(key, default=...):
        return metadata(reader, f"tokenizer.ggml.{key}", default, source=source)

    kind = get("model", None)
    if kind is None:
        raise CheckpointError(f"{source}: no tokenizer in the GGUF metadata (tokenizer.ggml.model is absent)")
    if kind not in SUPPORTED_GGUF_MODELS:
        raise UnsupportedTokenizer(f"{source}: GGUF tokenizer model {kind!r} is not supported "
                                  f"(supported: {list(SUPPORTED_GGUF_MODELS)})")
    tokens = get("tokens")
    types = get("token_type", [NORMAL] * len(tokens))
    merges = get("merges")
    if len(types) != len(tokens):
        raise CheckpointError(f"{source}: {len(tokens)} tokens but {len(types)} token types")
    vocab = {}
    for i, t in enumerate(tokens):
        vocab.setdefault(t, i)
    if len(vocab) != len(tokens):
        raise CheckpointError(f"{source}: the vocabulary has {len(tokens) - len(vocab)} duplicated token(s)")
    pairs = []
    for m in merges:
        parts = m.split(" ")
        if len(parts) != 2:
            raise CheckpointError(f"{source}: malformed BPE merge {m!r} (expected 'left right')")
        pairs.append((parts[0], parts[1]))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=pairs, fuse_unk=False, byte_fallback=False))
    pre = get("pre", "default")
    tok.pre_tokenizer = _pre_tokenizer(pre)
    tok.decoder = decoders.ByteLevel()
    special = [AddedToken(t, special=True, normalized=False) for t, k in zip(tokens, types) if k == CONTROL]
    user = [AddedToken(t, special=False, normalized=False) for t, k in zip(tokens, types) if k == USER_DEFINED]
    if special:
        tok.add_special_tokens(special)
    if user:
        tok.add_tokens(user)
    add_bos, add_eos = get("add_bos_token", None), bool(get("add_eos_token", False))
    if add_bos is None:  # llama.cpp's default for the pre-tokenizer (llama-vocab.cpp), when a BOS id is named
        add_bos = pre in BOS_BY_DEFAULT and get("bos_token_id", None) is not None
    add_bos = bool(add_bos)
    if add_bos or add_eos:
        ids = {name: get(key, None) for name, key in (("bos", "bos_token_id"), ("eos", "eos_token_id"))}
        for name, wanted in (("bos", add_bos), ("eos", add_eos)):
            if wanted and not (ids[name] is not None and 0 <= ids[name] < len(tokens)):
                raise CheckpointError(f"{source}: add_{name}_token is set but {name}_token_id is "
                                      f"{ids[name]} (vocabulary of {len(tokens)})")
        pre = [tokens[ids["bos"]]] if add_bos else []
        post = [tokens[ids["eos"]]] if add_eos else []
        tok.post_processor = processors.TemplateProcessing(
            single=" ".join(pre + ["$A"] + post), pair=" ".join(pre + ["$A"] + post + pre + ["$B:1"] + post),
            special_tokens=[(tokens[ids[n]], ids[n]) for n, want in (("bos", add_bos), ("eos", add_eos)) if want])
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    return tok


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """A tokenizer from a tokenizer.json file, a directory holding one, or a GGUF file."""
    path = Path(path)
    if path.is_dir():
        path = path / "tokenizer.json"
    elif path.suffix == ".gguf":
        return tokenizer_from_gguf(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such tokenizer file")
    try:
        return Tokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises its own Exception type on bad JSON
        raise CheckpointError(f"{path}: cannot read tokenizer ({e})") from None


# ------------------------------------------------------------------------------------ special tokens and chat templates
# transformers' named special tokens (PreTrainedTokenizerBase.SPECIAL_TOKENS_ATTRIBUTES without `_token`).
SPECIAL_TOKEN_NAMES = ("bos", "eos", "unk", "sep", "pad", "cls", "mask")
TOKENIZER_JSON, TOKENIZER_CONFIG = "tokenizer.json", "tokenizer_config.json"
SPECIAL_TOKENS_MAP, GENERATION_CONFIG = "special_tokens_map.json", "generation_config.json"
CHAT_TEMPLATE_JINJA, CHAT_TEMPLATE_JSON = "chat_template.jinja", "chat_template.json"
# tokenizer_config.json keys that `tokenizer_config` writes itself, or leaves out on purpose (ChatTokenizer).
_MANAGED_CONFIG_KEYS = frozenset({
    "tokenizer_class", "added_tokens_decoder", "chat_template", "model_max_length", "auto_map", "add_bos_token",
    "add_eos_token", "name_or_path", "_commit_hash", "tokenizer_file"})


@dataclasses.dataclass(frozen=True, eq=False)
class ChatTokenizer:
    """A `tokenizers.Tokenizer` with what transformers keeps next to it: the named special tokens, the chat
    template, the ids that end generation and the context length.

        chat = load_chat_tokenizer("smollm2-135m-instruct")     # or a .gguf file, an HF directory, a tokenizer.json
        text = chat.apply_chat_template([{"role": "user", "content": "Hi"}])   # '<|im_start|>system\\n...'
        ids = chat.encode(text, add_special_tokens=False).ids  # the Tokenizer's own methods are delegated
        chat.eos_token_id, chat.stop_token_ids                  # 2, (2,)

    special_tokens: {'bos': '<|im_start|>', 'eos': '<|im_end|>', 'unk': ..., 'pad': ...} (names of
    SPECIAL_TOKEN_NAMES; every token must be in the vocabulary). eos_token_ids: the ids that end generation when
    the source names them (generation_config.json's eos_token_id; GGUF's eos, eot and eom when they differ); empty:
    the eos token's id.
    extra_config: the other keys of an HF source's tokenizer_config.json (clean_up_tokenization_spaces,
    padding_side, do_lower_case, ...), written back by `tokenizer_config` (not those that would make transformers
    encode differently from `tokenizer`: tokenizer_class, add_bos_token, add_eos_token, auto_map).
    """

    tokenizer: Tokenizer
    special_tokens: Mapping[str, str] = dataclasses.field(default_factory=dict)
    chat_template: str | None = None
    eos_token_ids: tuple[int, ...] = ()
    model_max_length: int | None = None
    extra_config: Mapping[str, object] = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        if isinstance(self.tokenizer, ChatTokenizer):
            raise TypeError("ChatTokenizer wraps a tokenizers.Tokenizer, not another ChatTokenizer")
        unknown = sorted(set(self.special_tokens) - set(SPECIAL_TOKEN_NAMES))
        if unknown:
            raise TokenizerError(f"unknown special token name(s) {unknown}; known: {list(SPECIAL_TOKEN_NAMES)}")
        missing = {k: v for k, v in self.special_tokens.items() if self.tokenizer.token_to_id(v) is None}
        if missing:
            raise TokenizerError(f"special token(s) {missing} are not in the tokenizer's vocabulary")
        size = self.tokenizer.get_vocab_size(with_added_tokens=True)
        bad = [i for i in self.eos_token_ids if not 0 <= int(i) < size]
        if bad:
            raise TokenizerError(f"eos_token_ids {bad} are outside the vocabulary of {size} tokens")
        object.__setattr__(self, "special_tokens", {n: self.special_tokens[n] for n in SPECIAL_TOKEN_NAMES
                                                    if self.special_tokens.get(n) is not None})
        object.__setattr__(self, "eos_token_ids", tuple(int(i) for i in self.eos_token_ids))
        object.__setattr__(self, "extra_config", {k: v for k, v in self.extra_config.items()
                                                  if k not in _MANAGED_CONFIG_KEYS and not k.endswith("_token")})

    def __getattr__(self, name):  # encode, decode, encode_batch, token_to_id, get_vocab_size, ...
        if name.startswith("__") or name == "tokenizer":
            raise AttributeError(name)
        return getattr(self.tokenizer, name)

    def token_id(self, name: str) -> int | None:
        """Id of the special token `name` ('bos', 'eos', 'pad', ...), None when the tokenizer names none."""
        token = self.special_tokens.get(name)
        return None if token is None else self.tokenizer.token_to_id(token)

    @property
    def bos_token_id(self) -> int | None:
        return self.token_id("bos")

    @property
    def eos_token_id(self) -> int | None:
        return self.token_id("eos")

    @property
    def pad_token_id(self) -> int | None:
        return self.token_id("pad")

    @property
    def stop_token_ids(self) -> tuple[int, ...]:
        """The ids that end generation: `eos_token_ids`, else the eos token's id, else ()."""
        if self.eos_token_ids:
            return self.eos_token_ids
        return () if self.eos_token_id is None else (self.eos_token_id,)

    def template_tokens(self) -> dict[str, str]:
        """{'bos_token': ..., 'eos_token': ...}: the special tokens a chat template sees (transformers'
        `special_tokens_map`)."""
        return {f"{n}_token": t for n, t in self.special_tokens.items()}

    def apply_chat_template(self, messages, add_generation_prompt: bool = True, **kwargs) -> str:
        """The conversation rendered by this tokenizer's chat template (`apply_chat_template` below)."""
        if not self.chat_template:
            raise ChatTemplateError("this tokenizer has no chat template (give one with "
                                    "dataclasses.replace(tokenizer, chat_template=...))")
        return apply_chat_template(self.chat_template, messages, add_generation_prompt,
                                   **{**self.template_tokens(), **kwargs})

    def generation_config(self) -> dict:
        """{'bos_token_id', 'eos_token_id', 'pad_token_id'} for generation_config.json (None where unknown; the
        eos id is a list when several ids end generation)."""
        stop = self.stop_token_ids
        return {"bos_token_id": self.bos_token_id, "eos_token_id": (list(stop) if len(stop) > 1 else
                                                                    stop[0] if stop else None),
                "pad_token_id": self.pad_token_id}

    def save_pretrained(self, out_dir: str | os.PathLike, *, chat_template: str | None = None) -> list[str]:
        """Writes tokenizer.json, tokenizer_config.json and special_tokens_map.json into the existing directory
        `out_dir` (`write_tokenizer_files`); returns their names."""
        return write_tokenizer_files(out_dir, self, chat_template=chat_template)


def _plain(value):
    """What a chat template sees of a message: plain JSON-like data (transformers' `_plain_template_data`)."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, bool):
        return bool(value)
    if isinstance(value, str):  # subclasses (enums, numpy strings) carry methods the sandbox does not know
        return str.__str__(value)
    if isinstance(value, (int, float)):
        return int(value) if isinstance(value, int) else float(value)
    if isinstance(value, Mapping):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_plain(v) for v in value)
    if hasattr(value, "item") and callable(value.item):  # numpy scalars
        return _plain(value.item())
    return f"<{type(value).__name__}>"


@functools.lru_cache(maxsize=16)
def _compile_template(template: str):
    """The template compiled as transformers compiles chat templates (`_compile_jinja_template`): an immutable
    sandbox with trim_blocks and lstrip_blocks, the loopcontrols extension, a `{% generation %}` block (rendered
    as its body), `raise_exception`, `strftime_now`, and a `tojson` that does not escape HTML."""
    try:
        import jinja2
        import jinja2.ext
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError:
        raise TokenizerError("chat templates need jinja2: pip install 'jinja2>=3.1'") from None

    class Generation(jinja2.ext.Extension):
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(fmt):
        return datetime.datetime.now().strftime(fmt)

    class Namespace(jinja2.utils.Namespace):  # no underscore attributes: no way to CPython internals
        def __setitem__(self, name, value):
            if isinstance(name, str) and name.startswith("_"):
                raise jinja2.exceptions.SecurityError(f"a chat template cannot set {name!r} on a namespace")
            super().__setitem__(name, value)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[Generation, jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals.update(raise_exception=raise_exception, strftime_now=strftime_now, namespace=Namespace, dict=dict)
    try:
        return env.from_string(template)
    except jinja2.exceptions.TemplateSyntaxError as e:
        raise ChatTemplateError(f"the chat template does not compile: {e.message} (line {e.lineno})") from None


def apply_chat_template(template: str, messages, add_generation_prompt: bool = True, **kwargs) -> str:
    """Renders `messages` ([{'role': 'user', 'content': 'Hi'}, ...]) with the Jinja chat `template` as
    transformers' `tokenizer.apply_chat_template(messages, tokenize=False)` does: same environment
    (`_compile_template`), keys whose value is None dropped from each message, and the variables `messages`,
    `tools` (None), `documents` (None), `add_generation_prompt` plus `kwargs` — pass the tokenizer's special
    tokens as `bos_token=`, `eos_token=`, ... (ChatTokenizer.apply_chat_template does).

    A template that does not compile, or that refuses the messages through `raise_exception`, raises
    ChatTemplateError with its message.
    """
    import jinja2

    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise ChatTemplateError(f"messages must be a list of {{'role': ..., 'content': ...}} dicts, "
                                f"got {type(messages).__name__}")
    chat = []
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping):
            raise ChatTemplateError(f"message {i} is a {type(m).__name__}, not a dict with 'role' and 'content'")
        chat.append({k: _plain(v) for k, v in m.items() if v is not None})
    variables = {"tools": None, "documents": None, **{k: _plain(v) for k, v in kwargs.items()}}
    try:
        return _compile_template(template).render(messages=chat, add_generation_prompt=add_generation_prompt,
                                                  **variables)
    except jinja2.exceptions.TemplateError as e:
        raise ChatTemplateError(f"the chat template refused the messages: {e}") from None


# ------------------------------------------------------------------------------------ reading sources
def _read_json(path: Path) -> dict:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: cannot read JSON ({e})") from None
    if not isinstance(value, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return value


def _token_content(value) -> str | None:
    """A special token as tokenizer_config.json stores it: a string or an AddedToken dict {'content': ...}."""
    if isinstance(value, str):
        return value
    if isinstance(value, Mapping) and isinstance(value.get("content"), str):
        return value["content"]
    return None


def _resolve(source):
    """('gguf', reader-or-path) | ('hf', directory) | ('json', tokenizer.json file) for a tokenizer source: a
    registry name, a .gguf file or open reader, an HF directory, a tokenizer.json file."""
    import gguf as gguf_lib

    from configurable_fm.models import registry

    if isinstance(source, gguf_lib.GGUFReader):
        return "gguf", source
    text = str(source)
    # A registered name first, as interop.loader.load_model resolves it.
    path = registry.model_path(text) if registry.canonical_name(text, missing_ok=True) else Path(source)
    if not path.exists():
        known = ", ".join(sorted(registry.MODELS))
        raise SourceNotFound(f"no tokenizer at {text!r}: the path does not exist and it is not a packaged model "
                             f"({known})")
    if path.is_file() and path.suffix == ".gguf":
        return "gguf", path
    if path.is_dir():
        return "hf", path
    return "json", path


def _hf_files(directory: Path) -> tuple[dict, dict, dict]:
    """(tokenizer_config.json, special_tokens_map.json, generation_config.json) of a directory ({} when absent)."""
    return tuple(_read_json(directory / f) if (directory / f).is_file() else {}
                 for f in (TOKENIZER_CONFIG, SPECIAL_TOKENS_MAP, GENERATION_CONFIG))


def _hf_special_tokens(tok_cfg: dict, special_map: dict) -> dict[str, str]:
    """Named special tokens as transformers reads them: tokenizer_config.json's, overridden by
    special_tokens_map.json's."""
    out = {}
    for cfg in (tok_cfg, special_map):
        for name in SPECIAL_TOKEN_NAMES:
            token = _token_content(cfg.get(f"{name}_token"))
            if token is not None:
                out[name] = token
    return out


def _hf_chat_template(directory: Path, tok_cfg: dict) -> str | None:
    """The chat template as transformers loads it: chat_template.jinja, else chat_template.json, else
    tokenizer_config.json's `chat_template` (a string, or a list of {name, template}: the 'default' one)."""
    if (directory / CHAT_TEMPLATE_JINJA).is_file():
        return (directory / CHAT_TEMPLATE_JINJA).read_text() or None
    template = tok_cfg.get("chat_template")
    if (directory / CHAT_TEMPLATE_JSON).is_file():
        template = _read_json(directory / CHAT_TEMPLATE_JSON).get("chat_template")
    if isinstance(template, list):
        template = next((t.get("template") for t in template if isinstance(t, Mapping) and t.get("name") == "default"),
                        None)
    return template if isinstance(template, str) and template else None


def _gguf_info(reader) -> dict:
    """special_tokens / chat_template / eos_token_ids / model_max_length of a GGUF file's metadata."""
    source = source_name(reader)
    ids = gguf_special_tokens(reader)
    tokens = metadata(reader, "tokenizer.ggml.tokens", [], source=source)
    names = {n: tokens[i] for n, i in ids.items() if n in SPECIAL_TOKEN_NAMES and 0 <= i < len(tokens)}
    stop = [ids[n] for n in ("eos", "eot", "eom") if n in ids]  # llama.cpp's end-of-generation ids (Llama 3.1's eom)
    arch = metadata(reader, "general.architecture", None, source=source)
    context = metadata(reader, f"{arch}.context_length", None, source=source) if arch else None
    return dict(special_tokens=names, chat_template=gguf_chat_template(reader) or None,
                eos_token_ids=tuple(dict.fromkeys(stop)) if len(set(stop)) > 1 else (),
                model_max_length=None if context is None else int(context))


def _hf_info(directory: Path) -> dict:
    tok_cfg, special_map, gen_cfg = _hf_files(directory)
    eos = gen_cfg.get("eos_token_id")
    if is_int(eos):  # one id: what generate stops at, whatever eos_token is
        eos = [eos]
    max_len = tok_cfg.get("model_max_length")
    return dict(special_tokens=_hf_special_tokens(tok_cfg, special_map),
                chat_template=_hf_chat_template(directory, tok_cfg),
                eos_token_ids=tuple(eos) if isinstance(eos, list) else (),
                model_max_length=max_len if isinstance(max_len, int) and max_len < 10 ** 12 else None,
                extra_config=tok_cfg)


def _info(kind: str, where) -> dict:
    if kind == "gguf":
        return _gguf_info(read_gguf(where))
    return _hf_info(where if kind == "hf" else where.parent)


def special_tokens_of(source) -> dict[str, str]:
    """{'bos': token, 'eos': token, ...} of a tokenizer source (a registry name, a .gguf file, an HF directory
    or a tokenizer.json file, whose directory's tokenizer_config.json / special_tokens_map.json are read);
    {} when the source names none."""
    return dict(_info(*_resolve(source))["special_tokens"])


def chat_template_of(source) -> str | None:
    """The Jinja chat template of a tokenizer source (as `special_tokens_of`), or None."""
    return _info(*_resolve(source))["chat_template"]


def load_chat_tokenizer(source, *, tokenizer: Tokenizer | None = None) -> ChatTokenizer:
    """The ChatTokenizer of `source`: a registry name, a .gguf file (or open reader), an HF directory, a
    tokenizer.json file (its directory's tokenizer_config.json, special_tokens_map.json, generation_config.json
    and chat template files are read), a tokenizers.Tokenizer (no special tokens, no template) or a ChatTokenizer.

    `tokenizer`: the already loaded tokenizer of `source` (e.g. from `load_pretrained`), to read only the rest.
    """
    if isinstance(source, ChatTokenizer):
        return source
    if isinstance(source, Tokenizer):
        return ChatTokenizer(source)
    kind, where = _resolve(source)
    if kind == "gguf":
        reader = read_gguf(where)
        return ChatTokenizer(tokenizer if tokenizer is not None else tokenizer_from_gguf(reader), **_gguf_info(reader))
    if tokenizer is None:
        tokenizer = load_tokenizer(where)
    return ChatTokenizer(tokenizer, **_info(kind, where))


def find_tokenizer(source) -> ChatTokenizer | None:
    """The ChatTokenizer that comes with a model source, or None when it has none: a registry name, a .gguf file
    with tokenizer metadata, an HF directory with tokenizer.json. Other sources (orbax checkpoints, training
    workdirs, directories without tokenizer.json, GGUF files without tokenizer metadata) give None."""
    try:
        kind, where = _resolve(source)
    except SourceNotFound:
        return None
    if kind == "gguf":
        reader = read_gguf(where)
        if metadata(reader, "tokenizer.ggml.model", None, source=source_name(reader)) is None:
            return None
        return load_chat_tokenizer(reader)
    if kind == "hf" and (where / TOKENIZER_JSON).is_file():
        return load_chat_tokenizer(where)
    return None


# ------------------------------------------------------------------------------------ writing HF tokenizer files
def added_tokens_decoder(tokenizer: Tokenizer) -> dict[str, dict]:
    """tokenizer_config.json's `added_tokens_decoder`: {str(id): {content, lstrip, normalized, rstrip, single_word,
    special}} of the tokenizer's added tokens, by id."""
    return {str(i): {"content": t.content, "lstrip": t.lstrip, "normalized": t.normalized, "rstrip": t.rstrip,
                     "single_word": t.single_word, "special": t.special}
            for i, t in sorted(tokenizer.get_added_tokens_decoder().items())}


def tokenizer_config(tokenizer: ChatTokenizer, *, chat_template: str | None = None) -> dict:
    """tokenizer_config.json for `tokenizer` as transformers' AutoTokenizer reads it: PreTrainedTokenizerFast
    over tokenizer.json, the named special tokens, the added tokens, the context length, the chat template
    (`chat_template` overrides the tokenizer's), and the source's other keys (`ChatTokenizer.extra_config`)."""
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False,
              **tokenizer.extra_config}
    config.update({f"{n}_token": t for n, t in tokenizer.special_tokens.items()})
    if tokenizer.model_max_length is not None:
        config["model_max_length"] = int(tokenizer.model_max_length)
    added = added_tokens_decoder(tokenizer.tokenizer)
    if added:
        config["added_tokens_decoder"] = added
    template = chat_template if chat_template is not None else tokenizer.chat_template
    if template:
        config["chat_template"] = template
    return config


def write_tokenizer_files(out_dir: str | os.PathLike, tokenizer, *, chat_template: str | None = None) -> list[str]:
    """Writes tokenizer.json, tokenizer_config.json (`tokenizer_config`) and special_tokens_map.json into the
    existing directory `out_dir`, which transformers' AutoTokenizer then loads; returns the file names.
    `tokenizer`: a ChatTokenizer or a tokenizers.Tokenizer (no special tokens, no template)."""
    tokenizer = load_chat_tokenizer(tokenizer) if isinstance(tokenizer, Tokenizer) else tokenizer
    if not isinstance(tokenizer, ChatTokenizer):
        raise TypeError(f"write_tokenizer_files needs a ChatTokenizer or a tokenizers.Tokenizer, "
                        f"got {type(tokenizer).__name__}")
    out_dir = Path(out_dir)
    tokenizer.tokenizer.save(str(out_dir / TOKENIZER_JSON))
    (out_dir / TOKENIZER_CONFIG).write_text(
        json.dumps(tokenizer_config(tokenizer, chat_template=chat_template), indent=2, ensure_ascii=False) + "\n")
    (out_dir / SPECIAL_TOKENS_MAP).write_text(
        json.dumps({f"{n}_token": t for n, t in tokenizer.special_tokens.items()}, indent=2, ensure_ascii=False)
        + "\n")
    return [TOKENIZER_JSON, TOKENIZER_CONFIG, SPECIAL_TOKENS_MAP]
