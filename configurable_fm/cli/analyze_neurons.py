"""`cfm-analyze-neurons` (scripts/analyze_neurons.py): the survey's neuron-specialisation analysis (Xiao et al. 2024,
section 4; configurable_fm/analysis/specialisation) of any decoder, written to a work directory.

    python scripts/analyze_neurons.py --config experiments/analysis/specialisation.py \\
        --config.input=smollm2-135m-instruct --workdir runs/neurons
    python scripts/analyze_neurons.py --config experiments/analysis/specialisation.py:test --config.input=HF_DIR \\
        --workdir runs/neurons_test

The keys are documented in experiments/analysis/specialisation.py (`specialisation_config` below holds their
defaults). The work directory receives results.json (config, git revision, data manifest with counts and sources,
every number of the study), results.md (its tables, next to the survey's), figures/*.png and, with save_scores,
scores.npz (the (K, L, F) functionality scores and their permuted-label null).

Bad input (an unknown key or value, a source that does not load or carries no tokenizer, a model without dense FFN
hidden points, a function with too few instances, an existing work directory without overwrite) prints one line and
exits with status 1, or 2 for a bad command line. Everything that does not need the model is checked before it is
loaded; the work directory appears atomically, so nothing is written on error.
"""
from __future__ import annotations

import json
import platform
from pathlib import Path
from typing import Sequence

import ml_collections
from absl import flags

from configurable_fm import cli
from configurable_fm.checks import is_int
from configurable_fm.errors import ConfigError

DATA_KEYS = {"n_score": 100, "n_eval": 24, "seed": 0, "facts": "", "functions": (
    "coding", "math", "linguistic", "knowledge", "translation", "ethics", "writing")}
STUDY_KEYS = {"max_len": 128, "min_response": 16, "batch_size": 8, "pad_to": 32, "fraction": 0.05,
              "mask_levels": (0.3, 0.5, 0.7, 0.9), "n_mask": 8, "magnitude": False, "random_rows": 2,
              "bootstrap": 1000, "bins": 50, "seed": 0}
KEYS = {"input": "", "tokenizer": "", "overwrite": False, "save_scores": True, "figures": True}
SEE = "experiments/analysis/specialisation.py"


def specialisation_config(**overrides) -> ml_collections.ConfigDict:
    """A config: KEYS, `data` (DATA_KEYS) and `study` (STUDY_KEYS) with `overrides` ({key: value}; the two sections
    as dicts of their keys); unknown keys are a ConfigError."""
    return cli.sectioned_config("specialisation config", KEYS, {"data": DATA_KEYS, "study": STUDY_KEYS}, overrides)


def check_config(c, workdir: str) -> dict:
    """The resolved settings, checked without the model: {input, tokenizer, workdir, overwrite, save_scores,
    figures, data {...}, options (StudyOptions)}. ConfigError naming the key."""
    from configurable_fm.analysis.specialisation import FUNCTIONS, StudyError, StudyOptions
    from configurable_fm.interop.atomic import check_overwritable

    cli.require_config_keys(c, ["input"], see=SEE)
    if not workdir:
        raise ConfigError("--workdir is required (the directory the results are written to)")
    for key in ("input", "tokenizer"):
        if not isinstance(c[key], str):
            raise ConfigError(f"specialisation config: `{key}` must be a string, got {c[key]!r}")
    data = c.data.to_dict()
    for key in ("n_score", "n_eval"):
        v = data[key]
        if not is_int(v) or v < 1:
            raise ConfigError(f"specialisation config: `data.{key}` must be an int >= 1, got {v!r}")
    functions = tuple(data["functions"])
    unknown = [f for f in functions if f not in FUNCTIONS]
    if unknown or len(set(functions)) < 2 or len(set(functions)) != len(functions):
        raise ConfigError(f"specialisation config: `data.functions` must be two or more distinct names of "
                          f"{list(FUNCTIONS)}, got {list(functions)}")
    if data["facts"] and not Path(data["facts"]).is_file():
        raise ConfigError(f"specialisation config: `data.facts` {data['facts']!r} is not a file")
    study = c.study.to_dict()
    study["mask_levels"] = tuple(study["mask_levels"])
    try:
        options = StudyOptions(**study).check("specialisation config: study")
    except StudyError as e:
        raise ConfigError(str(e)) from None
    check_overwritable(workdir, bool(c.overwrite), inputs=[c.input, c.tokenizer])
    return dict(input=c.input, tokenizer=c.tokenizer, workdir=workdir, overwrite=bool(c.overwrite),
                save_scores=bool(c.save_scores), figures=bool(c.figures), data={**data, "functions": functions},
                options=options)


def define(fv) -> None:
    cli.config_flag(fv, "config", "specialisation config file: experiments/analysis/specialisation.py[:variant] (set "
                                  "--config.input)")
    flags.DEFINE_string("workdir", None, "directory the results are written to (created atomically)", flag_values=fv)


def run(fv) -> None:
    import numpy as np

    from configurable_fm.analysis.specialisation import (FunctionDataError, StudyError, build_functions, figures,
                                                         markdown, specialisation_study)
    from configurable_fm.interop.atomic import atomic_directory
    from configurable_fm.interop.loader import load_model
    from configurable_fm.interop.tokenizers import find_tokenizer, load_chat_tokenizer
    from configurable_fm.train.trainer import git_revision

    c = fv.config
    d = check_config(c, fv.workdir)
    tokenizer = load_chat_tokenizer(d["tokenizer"]) if d["tokenizer"] else find_tokenizer(d["input"])
    if tokenizer is None:
        load_model(d["input"])  # a SourceNotFound naming what is wrong with the source, when something is
        raise ConfigError(f"specialisation config: the source {d['input']!r} carries no tokenizer: set "
                          "`tokenizer` (a registry name, tokenizer.json, directory or .gguf)")
    data_cfg = d["data"]
    try:
        data = build_functions(data_cfg["n_score"], data_cfg["n_eval"], seed=data_cfg["seed"],
                               functions=data_cfg["functions"], facts=data_cfg["facts"] or None, log=print)
    except FunctionDataError as e:
        raise ConfigError(str(e)) from None
    model = load_model(d["input"])
    try:
        result = specialisation_study(model, tokenizer, data, options=d["options"], log=print)
    except StudyError as e:
        raise ConfigError(str(e)) from None
    scores, null = result.pop("scores"), result.pop("null_scores")
    record = {"config": c.to_dict(), "git": git_revision(), "python": platform.python_version(),
              "data": data.manifest(), **result}
    table = markdown(result)
    with atomic_directory(d["workdir"], overwrite=d["overwrite"]) as tmp:
        (tmp / "results.json").write_text(json.dumps(record, indent=1, default=_jsonable) + "\n")
        (tmp / "results.md").write_text(table + "\n")
        if d["figures"]:
            figures({**result, "scores": scores}, tmp / "figures")
        if d["save_scores"]:
            np.savez_compressed(tmp / "scores.npz", scores=scores, null_scores=null,
                                functions=np.asarray(result["functions"]), points=np.asarray(result["points"]))
    print(table)
    print(f"wrote {d['workdir']} (results.json, results.md{', figures/' if d['figures'] else ''}"
          f"{', scores.npz' if d['save_scores'] else ''})")


def _jsonable(x):
    import numpy as np

    if isinstance(x, (np.floating, np.integer)):
        return x.item()
    if isinstance(x, np.ndarray):
        return x.tolist()
    if isinstance(x, tuple):
        return list(x)
    return str(x)


def main(argv: Sequence[str] | None = None) -> int:
    return cli.run(run, define, argv, prog="cfm-analyze-neurons", required=("config", "workdir"))
