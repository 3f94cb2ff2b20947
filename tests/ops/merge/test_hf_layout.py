"""In-memory merges of nnx models equal streamed merges of their HF checkpoints bit for bit, ties in magnitude
included: tree.merge gives the kernels each parameter in the HF layout (torch (out, in), one tensor per expert),
the layout in which the stream reads them, so top-k ties are broken by the same flat index on both routes."""
import numpy as np
import pytest

from configurable_fm.bricks.paths import flat_params, with_params
from configurable_fm.interop.hf import hf_tensors, to_hf
from configurable_fm.interop.safetensors_io import TensorStore
from configurable_fm.models.factory import build_model
from configurable_fm.ops.merge import stream, tree
from configurable_fm.ops.merge.mergekit_yaml import parse_mergekit_yaml

LLAMA = {"family": "llama", "vocab_size": 16, "hidden_size": 16, "intermediate_size": 24, "num_layers": 2,
         "num_heads": 2, "num_kv_heads": 1}
MOE = {**LLAMA, "num_experts": 3, "num_experts_per_tok": 2, "architecture": "MixtralForCausalLM"}


def _quantised(model, rng, base=None):
    """Every parameter on the grid k/64 (|k| <= 8; fine-tunes: base + j/64, |j| <= 2), so that x − b is exact
    in float32 and the task vectors hold only 5 magnitudes: ties everywhere."""
    new = {}
    for p, v in flat_params(model).items():
        if base is None:
            q = rng.integers(-8, 9, size=v.shape) / 64
        else:
            q = np.asarray(flat_params(base)[p]) + rng.integers(-2, 3, size=v.shape) / 64
        new[p] = np.asarray(q, np.float32)
    return with_params(model, new)


@pytest.fixture(scope="module", params=["llama", "mixtral"])
def checkpoints(request, tmp_path_factory):
    spec = LLAMA if request.param == "llama" else MOE
    rng = np.random.default_rng(0)
    base = _quantised(build_model(spec, seed=0), rng)
    fts = [_quantised(build_model(spec, seed=s), rng, base=base) for s in (1, 2)]
    root = tmp_path_factory.mktemp(request.param)
    dirs = {n: to_hf(m, root / n) for n, m in zip(("base", "ft_a", "ft_b"), [base] + fts)}
    return base, fts, dirs


YAML = """
merge_method: {method}
base_model: {base}
models:
  - model: {ft_a}
    parameters: {{weight: 1.0, density: 0.3}}
  - model: {ft_b}
    parameters: {{weight: 0.6, density: [0.6, 0.25]}}
parameters: {{normalize: true{extra}}}
dtype: float32
"""
EXTRA = {"ties": "", "breadcrumbs_ties": ", gamma: 0.05", "della": ", epsilon: 0.1"}


@pytest.mark.parametrize("method", ["ties", pytest.param("breadcrumbs_ties", marks=pytest.mark.slow),
                                    pytest.param("della", marks=pytest.mark.slow)])  # ties: the case, in CI
def test_in_memory_merge_equals_the_streamed_merge_bit_for_bit(checkpoints, method, tmp_path):
    base, fts, dirs = checkpoints
    plan = parse_mergekit_yaml(YAML.format(method=method, extra=EXTRA[method], **dirs))
    out = stream.merge_checkpoints(plan, tmp_path / "out", progress=False, seed=3)
    streamed = TensorStore(out)
    params = {"normalize": True, **({"gamma": 0.05} if method == "breadcrumbs_ties" else {}),
              **({"epsilon": 0.1} if method == "della" else {})}
    mp = [{"weight": 1.0, "density": 0.3}, {"weight": 0.6, "density": [0.6, 0.25]}]
    merged = hf_tensors(tree.merge(method, base, fts, parameters=params, model_parameters=mp, seed=3))
    assert set(merged) == set(streamed)
    for k, v in merged.items():
        np.testing.assert_array_equal(np.asarray(streamed[k]), v, err_msg=k)


def test_ties_are_real_the_flat_layout_keeps_other_entries(checkpoints):
    """The same TIES merge on flat dicts in our layout ((in, out) kernels, stacked experts) keeps other entries
    of the tied magnitudes: the HF layout is what makes the two routes agree."""
    base, fts, _ = checkpoints
    kw = dict(parameters={"normalize": True}, model_parameters=[{"weight": 1.0, "density": 0.3},
                                                                {"weight": 0.6, "density": 0.3}])
    as_modules = flat_params(tree.merge("ties", base, fts, **kw))
    as_flats = tree.merge("ties", flat_params(base), [flat_params(m) for m in fts], **kw)
    differ = [p for p in as_flats if not np.array_equal(np.asarray(as_flats[p]), np.asarray(as_modules[p]))]
    assert differ and all(p.endswith("kernel") or ".experts." in p for p in differ)
