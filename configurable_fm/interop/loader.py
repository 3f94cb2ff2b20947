"""The one loader of any model source the library can read.

    model = load_model("smollm2-135m-instruct")        # a packaged model (registry name, any case)
    model = load_model("model.gguf")                    # a llama GGUF file, dequantized
    model = load_model("hf_dir")                        # an HF directory (config.json + safetensors)
    model = load_model("ckpt")                          # an orbax model checkpoint (model_config.json + params/)
    model = load_model("runs/ft")                       # a training workdir: its best/ model
    model, tokenizer = load_pretrained("smollm2-135m-instruct")

What is not a source gets a `SourceNotFound` that says why: a path that does not exist, a Hugging Face Hub id
(downloads from a model hub are not supported: give a local directory, a .gguf file or a packaged model), a
training workdir without `best/` (no evaluation ran), a directory that is none of the formats.
"""
from __future__ import annotations

import re
from pathlib import Path

import jax.numpy as jnp
from flax import nnx

from configurable_fm.errors import SourceNotFound
from configurable_fm.models import registry


def load_pretrained(name: str, dtype=jnp.float32, *, with_source: bool = False):
    """(model, tokenizers.Tokenizer) for a packaged model (`registry.MODELS`, any case), parameters in `dtype`.

    with_source: (model, tokenizer, source), source the parsed file (a GGUF's open reader, whose metadata takes
    ~1 s to parse for SmolLM2's vocabulary) or the HF directory, for `load_chat_tokenizer(source, tokenizer=...)`
    and the file's metadata without parsing it again."""
    name = registry.canonical_name(name)
    entry, path = registry.MODELS[name], registry.model_path(name)
    if entry.format == "gguf":
        from configurable_fm.interop.gguf import from_gguf, read_gguf
        from configurable_fm.interop.tokenizers import tokenizer_from_gguf

        reader = read_gguf(path)  # parse the (large) metadata once for both
        loaded = from_gguf(reader, dtype=dtype), tokenizer_from_gguf(reader), reader
    elif entry.format == "hf":
        from configurable_fm.interop.hf import from_hf
        from configurable_fm.interop.tokenizers import load_tokenizer

        loaded = from_hf(path, dtype=dtype), load_tokenizer(path), path
    else:
        raise ValueError(f"model {name!r}: unknown format {entry.format!r}")
    return loaded if with_source else loaded[:2]


def _looks_like_hub_id(text: str) -> bool:
    return bool(re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", text)) and not text.startswith((".", "/"))


def load_model(source: str | Path, *, dtype=jnp.float32) -> nnx.Module:
    """The model at `source` (module docstring), parameters in `dtype`."""
    from configurable_fm.interop import orbax_io

    text = str(source)
    if registry.canonical_name(text, missing_ok=True):
        return load_pretrained(text, dtype=dtype)[0]
    path = Path(source)
    known = (f"a packaged model name ({', '.join(sorted(registry.MODELS))}), a .gguf file, an HF directory "
             f"(config.json), an orbax model checkpoint ({orbax_io.MODEL_CONFIG} + {orbax_io.PARAMS_DIR}/) or a "
             "training workdir (best/)")
    if not path.exists():
        if _looks_like_hub_id(text):
            raise SourceNotFound(f"{text!r} looks like a Hugging Face Hub id and no such local path exists; "
                                 f"downloading from a model hub is not supported here. Give {known}")
        raise SourceNotFound(f"cannot load a model from {text!r}: the path does not exist (and it is not {known})")
    if path.suffix == ".gguf" and path.is_file():
        from configurable_fm.interop.gguf import from_gguf

        return from_gguf(path, dtype=dtype)
    if (path / "config.json").is_file() and not (path / "checkpoints").is_dir():
        from configurable_fm.interop.hf import from_hf

        return from_hf(path, dtype=dtype)
    if orbax_io.is_model_checkpoint(path):
        return orbax_io.load_model(path, dtype=dtype)
    for inner in ("best", "model"):  # a training workdir's best model; a study stage's output model
        if orbax_io.is_model_checkpoint(path / inner):
            return orbax_io.load_model(path / inner, dtype=dtype)
    if (path / "checkpoints").is_dir():
        raise SourceNotFound(f"{text!r} is a training workdir without best/ (no evaluation ran, so no model was "
                             "saved as best); set eval_every and train again, or load the model the run started from")
    raise SourceNotFound(f"cannot load a model from {text!r}: it is not {known}")
