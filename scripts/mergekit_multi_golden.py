"""Write the golden of a multi-stage merge from mergekit 0.1.5's own `mergekit-multi`, for
tests/ops/merge/test_multistage.py.

Run ONLY by hand, in the throwaway virtualenv of scripts/mergekit_goldens.py (never a project dependency):

    /tmp/mk/bin/python scripts/mergekit_multi_golden.py

It writes three tiny random llama checkpoints A, B, C (scripts/mergekit_goldens.py's `_tiny_llama`: every
parameter ~ N(0, 1) from torch seeds 0, 1, 2), runs mergekit-multi (CPU, offline, no tokenizer, no model card) on
MULTI_YAML (the chain of mergekit's docs/multimerge.md: a linear merge, a slerp of it with another model, and a
final merge using the slerp; the final, unnamed document is in the middle of the file, so the order comes from
the references, not from the file) and writes

    tests/golden/mergekit_0.1.5/multimerge.safetensors   "inputs/{A,B,C}/<hf name>" (the inputs) and
                                                         "<stage>/<hf name>" for the stages 'first-merge',
                                                         'second-merge' and 'final' (mergekit's outputs)
    tests/golden/mergekit_0.1.5/multimerge.json          {"mergekit", "torch", "transformers", "input_config",
                                                          "yaml": MULTI_YAML with {A} {B} {C} for the paths,
                                                          "command": the mergekit-multi options,
                                                          "stages": {stage: [output tensor names]}}
"""
from __future__ import annotations

import json
import os
import sys

OUT_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "golden", "mergekit_0.1.5")

MULTI_YAML = """\
name: first-merge
merge_method: linear
models:
  - model: {A}
    parameters: {weight: 0.7}
  - model: {B}
    parameters: {weight: 0.3}
dtype: float32
---
# the final merge (no name), written to --out-path
merge_method: ties
base_model: {A}
models:
  - model: second-merge
    parameters: {weight: 0.5, density: 0.6}
  - model: {B}
    parameters: {weight: 0.5, density: 0.8}
dtype: float32
---
name: second-merge
merge_method: slerp
base_model: first-merge
models:
  - model: {C}
parameters:
  t: [0.2, 0.8]
dtype: float32
"""
OPTIONS = ["--no-copy-tokenizer", "--no-write-model-card", "--quiet"]


def main() -> None:
    import tempfile
    from importlib.metadata import version

    os.environ["HF_HUB_OFFLINE"] = "1"
    import numpy as np
    import torch
    from mergekit.scripts.multimerge import main as multimerge
    from safetensors.numpy import load_file, save_file

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from mergekit_goldens import _tiny_llama

    tensors, stages = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        paths = {name: os.path.join(tmp, name) for name in "ABC"}
        for seed, (name, path) in enumerate(paths.items()):
            _tiny_llama(path, seed)
            for k, v in load_file(os.path.join(path, "model.safetensors")).items():
                tensors[f"inputs/{name}/{k}"] = v
        with open(os.path.join(paths["A"], "config.json")) as f:
            input_config = json.load(f)
        text = MULTI_YAML
        for name, path in paths.items():
            text = text.replace("{" + name + "}", path)
        config = os.path.join(tmp, "multi.yml")
        with open(config, "w") as f:
            f.write(text)
        inter, final = os.path.join(tmp, "inter"), os.path.join(tmp, "final")
        multimerge.main([config, "--intermediate-dir", inter, "--out-path", final, *OPTIONS], standalone_mode=False)
        for stage, out in (("first-merge", os.path.join(inter, "first-merge")),
                           ("second-merge", os.path.join(inter, "second-merge")), ("final", final)):
            result = load_file(os.path.join(out, "model.safetensors"))
            for k, v in result.items():
                tensors[f"{stage}/{k}"] = np.ascontiguousarray(v)
            stages[stage] = sorted(result)
    os.makedirs(OUT_DIR, exist_ok=True)
    path = os.path.join(OUT_DIR, "multimerge.safetensors")
    save_file(tensors, path)
    with open(os.path.join(OUT_DIR, "multimerge.json"), "w") as f:
        json.dump({"mergekit": version("mergekit"), "torch": torch.__version__, "transformers": version("transformers"),
                   "input_config": input_config, "yaml": MULTI_YAML,
                   "command": "mergekit-multi multi.yml --intermediate-dir inter --out-path final " + " ".join(OPTIONS),
                   "stages": stages}, f, indent=1, sort_keys=True)
        f.write("\n")
    print(f"multimerge: {os.path.getsize(path)} bytes -> {os.path.relpath(path)}")


if __name__ == "__main__":
    main()
