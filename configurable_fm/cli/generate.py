"""`cfm-generate` (scripts/generate.py): text from any model source, streamed as it is made (`models.stream_text`).
The config is experiments/generate.py (its docstring explains every key):

    cfm-generate --config experiments/generate.py --config.input=smollm2-135m-instruct \\
        --config.prompt="What is the capital of France?" [--config.temperature=0.7 --config.top_p=0.9]

A prompt given on the command line is answered once; without one, stdin supplies the prompts (one per line), or
the turns of a chat when it is a terminal. Input errors (a missing source, no tokenizer, a bad sampling value)
print one line and exit with status 1.
"""
from __future__ import annotations

import sys
import time

from configurable_fm import cli
from configurable_fm.errors import ConfigError

CHAT = {"auto": None, "true": True, "false": False}
DTYPES = ("float32", "bfloat16")


def define(fv) -> None:
    cli.config_flag(fv, "config", "generation config file: experiments/generate.py (set --config.input)")


def _checked(c) -> dict:
    """The sampling keyword arguments of stream_text from the config, checked."""
    if str(c.chat).lower() not in CHAT:
        raise ConfigError(f"config.chat={c.chat!r}: expected one of {sorted(CHAT)}")
    if c.dtype not in DTYPES:
        raise ConfigError(f"config.dtype={c.dtype!r}: expected one of {list(DTYPES)}")
    if c.max_new_tokens < 1 or c.chunk < 1:
        raise ConfigError(f"config.max_new_tokens={c.max_new_tokens} and config.chunk={c.chunk} must be >= 1")
    if not c.temperature >= 0 or c.top_k < 0 or not 0 < c.top_p <= 1:  # `not >=`: NaN too
        raise ConfigError(f"config.temperature={c.temperature} must be >= 0, config.top_k={c.top_k} >= 0 (0: no "
                          f"filter) and config.top_p={c.top_p} in (0, 1]")
    if c.temperature == 0 and (c.top_k or c.top_p < 1):
        raise ConfigError("config.top_k / config.top_p filter sampling: set config.temperature > 0 as well")
    import jax

    from configurable_fm.models.generation import as_stop_strings
    try:
        stop = as_stop_strings(c.stop)
    except ValueError:
        raise ConfigError(f"config.stop={c.stop!r}: expected non-empty strings, e.g. "
                          f"--config.stop=\"('\\n\\n',)\"") from None

    return dict(max_new_tokens=c.max_new_tokens, chunk=c.chunk, temperature=c.temperature,
                top_k=c.top_k or None, top_p=None if c.top_p == 1 else c.top_p,
                rng=jax.random.key(c.seed) if c.temperature > 0 else None, stop=stop)


def _tokenizer(c):
    from configurable_fm.interop.tokenizers import find_tokenizer, load_chat_tokenizer

    if c.tokenizer:
        return load_chat_tokenizer(c.tokenizer)
    tok = find_tokenizer(c.input)
    if tok is None:
        raise ConfigError(f"{c.input} comes without a tokenizer; give one with --config.tokenizer=... (a packaged "
                          "model name, a .gguf file, an HF directory or a tokenizer.json)")
    return tok


def answer(model, tokenizer, prompt, chat, kwargs, out=None) -> str:
    """Streams the model's answer to `prompt` onto `out` (default: stdout); returns it."""
    from configurable_fm.models.generation import stream_text

    out = out or sys.stdout
    pieces = []
    for piece in stream_text(model, tokenizer, prompt, chat=chat, **kwargs):
        out.write(piece)
        out.flush()
        pieces.append(piece)
    out.write("\n")
    out.flush()
    return "".join(pieces)


def run(fv) -> None:
    import jax.numpy as jnp

    from configurable_fm.interop.loader import load_model

    c = fv.config
    cli.require_config_keys(c, ("input",), see="experiments/generate.py")
    kwargs = _checked(c)
    chat = CHAT[str(c.chat).lower()]
    t = time.perf_counter()
    model = load_model(c.input, dtype=jnp.dtype(c.dtype))
    tokenizer = _tokenizer(c)
    print(f"loaded {c.input} in {time.perf_counter() - t:.1f} s", file=sys.stderr, flush=True)
    templated = chat is not False and bool(getattr(tokenizer, "chat_template", None))
    if chat and not templated:
        raise ConfigError(f"config.chat=true but the tokenizer of {c.tokenizer or c.input} has no chat template; "
                          "use --config.chat=auto or false for plain continuation")
    system = [{"role": "system", "content": c.system}] if c.system and templated else []

    def turn(text, history):
        """One prompt answered: plain text, or a user turn appended to `history` with the answer after it."""
        if not templated:
            answer(model, tokenizer, text, chat, kwargs)
            return
        history.append({"role": "user", "content": text})
        history.append({"role": "assistant", "content": answer(model, tokenizer, list(history), True, kwargs)})

    if c.prompt:
        turn(c.prompt, list(system))
        return
    interactive = sys.stdin.isatty()
    history = list(system)
    while True:
        if interactive:
            print("> ", end="", file=sys.stderr, flush=True)
        line = sys.stdin.readline()
        if not line or (interactive and not line.strip()):
            return
        if line.strip():
            turn(line.rstrip("\n"), history if interactive else list(system))


def main(argv=None) -> int:
    return cli.run(run, define, argv, prog="cfm-generate", required=("config",))
