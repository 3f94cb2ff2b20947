"""Convert a model to a Hugging Face directory that transformers loads as is (AutoModelForCausalLM, AutoTokenizer,
pipeline("text-generation")).

    python scripts/convert.py --config experiments/convert.py --config.input=smollm2-135m-instruct \\
        --config.output=exports/smollm2-hf [--config.dtype=bfloat16|float16|float32] [--config.overwrite=True]
(`cfm-convert` is `.venv/bin/python scripts/convert.py`.)

input: anything `interop.loader.load_model` reads: a packaged model name, a .gguf file (dequantized), an HF
directory, an orbax model checkpoint, a training workdir (its best/ model).
output: a new directory (written under a temporary name and renamed when complete) with config.json,
generation_config.json (bos/eos/pad ids), safetensors in `dtype`, and the tokenizer files (tokenizer.json,
tokenizer_config.json with the special tokens and the chat template, special_tokens_map.json).
dtype: 'auto' keeps an HF input's stored dtype and writes float32 otherwise (GGUF files are dequantized).
tokenizer: '' takes the input's own (packaged model, GGUF metadata, an HF directory's tokenizer.json); give a
packaged model name, a .gguf file, an HF directory or a tokenizer.json for inputs without one (orbax checkpoints,
training workdirs), or 'none' to write no tokenizer files.
chat_template: '' keeps the tokenizer's; else a Jinja file (e.g. chat_template.jinja) or the template text.
overwrite: replace a previous output of this library (a directory holding other files is refused, never deleted).
"""
import ml_collections


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    if arg:
        raise ValueError(f"experiments/convert.py takes no variant (got {arg!r}); set keys with --config.KEY=VALUE")
    c = ml_collections.ConfigDict()
    c.input = ""  # packaged model name, .gguf, HF directory, orbax checkpoint or training workdir
    c.output = ""  # the HF directory to write
    c.dtype = "auto"  # auto | bfloat16 | float16 | float32
    c.tokenizer = ""  # '' : the input's own; a model name / .gguf / HF dir / tokenizer.json; 'none'
    c.chat_template = ""  # '' : the tokenizer's; a Jinja file or the template text
    c.overwrite = False
    c.max_shard_size = "5GB"  # safetensors shard size (e.g. 5GB, 500MB)
    return c
