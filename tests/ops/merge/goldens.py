"""mergekit 0.1.5's float32 goldens of single-kernel methods (tests/golden/mergekit_0.1.5, written by
scripts/mergekit_goldens.py): the cases as pytest parameters and one case's kernel output against mergekit's."""
import functools
import json
import pathlib

import numpy as np
from safetensors.numpy import load_file

from configurable_fm.ops.merge.registry import METHODS
from tests.helpers import marked_slow

GOLDEN = pathlib.Path(__file__).resolve().parents[2] / "golden" / "mergekit_0.1.5"


@functools.lru_cache(maxsize=None)
def golden(method):
    """(metadata, arrays) of the method's golden file."""
    return json.loads((GOLDEN / f"{method}.json").read_text()), load_file(str(GOLDEN / f"{method}.safetensors"))


def golden_cases(methods, slow_cases, min_cases):
    """pytest params (method, case) for every case of each method, those in slow_cases[method] marked slow (each
    name checked to be a case, and each method to have at least min_cases)."""
    out = []
    for method in methods:
        cases = golden(method)[0]["cases"]
        slow = slow_cases.get(method, set())
        assert len(cases) >= min_cases and slow <= set(cases), (method, sorted(slow - set(cases)))
        out += marked_slow([(method, case) for case in cases], {(method, case) for case in slow})
    return out


def kernel_and_golden(method, case):
    """(our kernel's output, mergekit's) on the case's inputs (per-model parameters as float32 arrays)."""
    meta, arrays = golden(method)
    m, info = METHODS[method], meta["cases"][case]
    params = {k: (np.asarray(v, np.float32) if k in m.per_model and v is not None else v)
              for k, v in info["params"].items()}
    base = arrays[f"{case}/base"] if info["base"] else None
    assert base is None or m.base != "ignored", case
    return np.asarray(m.kernel(base, arrays[f"{case}/xs"], key=None, **params)), arrays[f"{case}/y"]
