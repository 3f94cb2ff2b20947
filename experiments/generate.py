"""Generate text with a model, streamed to the terminal as it is made: one prompt, prompts read from stdin (one
per line), or an interactive chat when stdin is a terminal.

    python scripts/generate.py --config experiments/generate.py --config.input=smollm2-135m-instruct \\
        --config.prompt="What is the capital of France?"
    echo "Name a colour." | cfm-generate --config experiments/generate.py --config.input=exports/smollm2-hf
    cfm-generate --config experiments/generate.py --config.input=runs/w --config.tokenizer=smollm2-135m-instruct
(`cfm-generate` is `.venv/bin/python scripts/generate.py`.)

input: anything `interop.loader.load_model` reads (a packaged model name, a .gguf file, an HF directory, an orbax
model checkpoint, a training workdir).
tokenizer: '' takes the input's own (a packaged model, GGUF metadata, an HF directory's tokenizer.json); else a
packaged model name, a .gguf file, an HF directory or a tokenizer.json (for orbax checkpoints and workdirs).
prompt: the text to continue or answer; '' reads stdin: every non-empty line is a prompt of its own, or, when
stdin is a terminal, the turns of one conversation (kept across turns when the tokenizer has a chat template;
an empty line or end of input ends it).
system: a system message put before each conversation ('' none; chat only).
chat: 'auto' renders prompts through the tokenizer's chat template when it has one; 'true' / 'false' force it.
max_new_tokens, temperature (0: greedy), top_k (0: no filter), top_p (1.0: no filter), seed (the sampling key).
Generation stops at the tokenizer's end of sequence / end of turn token, as `models.generate_text`.
stop: stop strings (the answer ends before the first of them, which is not printed), a tuple of strings:
`--config.stop="('\\n\\n', '###')"` (Python literal: escapes allowed), or one string: `--config.stop=###`.
chunk: new tokens between two hand-overs to the terminal (`models.stream_text`).
dtype: the parameters' dtype (float32 | bfloat16).
"""
import ml_collections


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    if arg:
        raise ValueError(f"experiments/generate.py takes no variant (got {arg!r}); set keys with --config.KEY=VALUE")
    c = ml_collections.ConfigDict()
    c.input = ""
    c.tokenizer = ""
    c.prompt = ""
    c.system = ""
    c.chat = "auto"  # auto | true | false
    c.max_new_tokens = 256
    c.temperature = 0.0
    c.top_k = 0
    c.top_p = 1.0
    c.seed = 0
    c.stop = ()  # stop strings
    c.chunk = 8
    c.dtype = "float32"
    return c
