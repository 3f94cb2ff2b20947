"""Streaming merges of tiny HF llamas through scripts/merge.py: same tensors as the in-memory tree.merge,
sharded output that transformers loads, and the documented errors (mismatch, existing output, failure mid-way)."""
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers

from configurable_fm.interop.safetensors_io import INDEX_FILE, SINGLE_FILE, TensorStore
from configurable_fm.ops.merge import stream, tree
from configurable_fm.ops.merge.mergekit_yaml import load_mergekit_yaml
from configurable_fm.ops.merge.params import ParameterError

ROOT = Path(__file__).resolve().parents[3]


def _script():
    spec = importlib.util.spec_from_file_location("merge_script", ROOT / "scripts" / "merge.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _llama(path, seed, **overrides):
    cfg = dict(vocab_size=32, hidden_size=16, intermediate_size=24, num_hidden_layers=3, num_attention_heads=2,
               num_key_value_heads=1, max_position_embeddings=32, tie_word_embeddings=False)
    cfg.update(overrides)
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**cfg))
    model.save_pretrained(path, safe_serialization=True)
    return path


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    return {n: _llama(root / n, s) for n, s in (("base", 0), ("ft_a", 1), ("ft_b", 2))}


def _dict(path):
    store = TensorStore(path)
    return {k: np.array(store[k]) for k in store}


def _write_yaml(path, text):
    path.write_text(text)
    return path


def _same(out_dir, expected, atol=1e-6):
    got = _dict(out_dir)
    assert list(got) == list(expected) or set(got) == set(expected)
    for k in expected:
        assert got[k].dtype == np.asarray(expected[k]).dtype, k
        np.testing.assert_allclose(got[k], np.asarray(expected[k]), atol=atol, rtol=0, err_msg=k)


def _snapshot(dirs):
    return {p: (p.stat().st_mtime_ns, p.read_bytes()) for d in dirs for p in sorted(Path(d).iterdir())}


def test_ties_yaml_through_the_script_equals_tree_merge_and_loads_in_transformers(hf, tmp_path):
    before = _snapshot(hf.values())
    yml = _write_yaml(tmp_path / "ties.yml", f"""
merge_method: ties
base_model: {hf['base']}
models:
  - model: {hf['base']}
  - model: {hf['ft_a']}
    parameters: {{weight: 1.0, density: 0.5}}
  - model: {hf['ft_b']}
    parameters: {{weight: 0.6, density: [1.0, 0.3]}}
parameters: {{normalize: true}}
dtype: float32
""")
    out = tmp_path / "out"
    assert _script().main(["--mergekit_yaml", str(yml), "--output", str(out)]) == 0  # with the progress bar
    expected = tree.merge("ties", _dict(hf["base"]), {"a": _dict(hf["ft_a"]), "b": _dict(hf["ft_b"])},
                          parameters={"normalize": True},
                          model_parameters=[{"weight": 1.0, "density": 0.5}, {"weight": 0.6, "density": [1.0, 0.3]}])
    _same(out, expected)
    assert _snapshot(hf.values()) == before  # inputs untouched
    config = json.loads((out / "config.json").read_text())
    assert config["torch_dtype"] == "float32" and config["num_hidden_layers"] == 3
    assert (out / "generation_config.json").read_text() == (hf["base"] / "generation_config.json").read_text()
    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    w = model.model.layers[1].mlp.up_proj.weight.detach().numpy()
    np.testing.assert_allclose(w, np.asarray(expected["model.layers.1.mlp.up_proj.weight"]), atol=1e-6)
    logits = model(torch.tensor([[1, 5, 7]])).logits
    assert torch.isfinite(logits).all()


def test_linear_yaml_with_gradient_and_filter_is_sharded_and_equals_tree_merge(hf, tmp_path):
    yml = _write_yaml(tmp_path / "linear.yml", f"""
merge_method: linear
models:
  - model: {hf['ft_a']}
    parameters:
      weight: [0.0, 0.5, 1.0]
  - model: {hf['ft_b']}
    parameters:
      weight:
        - filter: self_attn
          value: 0.25
        - value: 1.0
out_dtype: bfloat16
""")
    out = tmp_path / "out"
    _script().main(["--mergekit_yaml", str(yml), "--output", str(out), "--max_shard_size", "3KB", "--no_progress"])
    assert (out / INDEX_FILE).exists() and not (out / SINGLE_FILE).exists()
    index = json.loads((out / INDEX_FILE).read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 3 and all((out / s).exists() for s in shards)
    assert all((out / s).stat().st_size < 3000 + 2000 for s in shards)  # limit + header (no tensor > 3 KB here)
    import ml_dtypes
    expected = tree.merge("linear", None, {"a": _dict(hf["ft_a"]), "b": _dict(hf["ft_b"])},
                          model_parameters=[{"weight": [0.0, 0.5, 1.0]},
                                            {"weight": [{"filter": "self_attn", "value": 0.25}, {"value": 1.0}]}],
                          out_dtype=ml_dtypes.bfloat16)
    _same(out, {k: np.asarray(v) for k, v in expected.items()}, atol=0)
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    model = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    # a hand check of one tensor: layer 2 (t = 1) of q_proj: weights 1.0 (gradient) and 0.25 (filter)
    a, b = _dict(hf["ft_a"]), _dict(hf["ft_b"])
    k = "model.layers.2.self_attn.q_proj.weight"
    hand = ((1.0 * a[k] + 0.25 * b[k]) / 1.25).astype(ml_dtypes.bfloat16).astype(np.float32)
    np.testing.assert_array_equal(model.model.layers[2].self_attn.q_proj.weight.detach().numpy(), hand)


def test_shape_mismatch_names_tensor_and_model_before_writing(hf, tmp_path):
    wide = _llama(tmp_path / "wide", 3, intermediate_size=32)
    plan = load_mergekit_yaml(_write_yaml(tmp_path / "m.yml", f"""
merge_method: task_arithmetic
base_model: {hf['base']}
models:
  - model: {wide}
    parameters: {{weight: 1.0}}
"""))
    with pytest.raises(tree.MergeInputError) as e:
        stream.merge_checkpoints(plan, tmp_path / "out", progress=False)
    msg = str(e.value)
    assert "model.layers.0.mlp.up_proj.weight" in msg and str(wide) in msg and "(32, 16)" in msg
    assert "model.layers.2.mlp.down_proj.weight" in msg  # every mismatch in one error
    assert not (tmp_path / "out").exists()


def test_existing_output_is_refused_unless_overwrite(hf, tmp_path):
    plan = load_mergekit_yaml(_write_yaml(tmp_path / "m.yml", f"""
merge_method: linear
models: [{{model: {hf['ft_a']}, parameters: {{weight: 1.0}}}}, {{model: {hf['ft_b']}, parameters: {{weight: 1.0}}}}]
dtype: float16
"""))
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(FileExistsError, match="already exists"):
        stream.merge_checkpoints(plan, out, progress=False)
    assert (out / "keep.txt").read_text() == "x"
    stream.merge_checkpoints(plan, out, overwrite=True, progress=False)
    assert not (out / "keep.txt").exists() and (out / SINGLE_FILE).exists()
    a, b = _dict(hf["ft_a"]), _dict(hf["ft_b"])
    got = _dict(out)
    for k in a:  # dtype: float16 rounds the inputs on load; the output keeps that dtype
        hand = (a[k].astype(np.float16).astype(np.float32) + b[k].astype(np.float16).astype(np.float32)) / 2
        assert got[k].dtype == np.float16, k
        np.testing.assert_allclose(got[k].astype(np.float32), hand.astype(np.float16).astype(np.float32),
                                   rtol=1e-3, atol=1e-6, err_msg=k)
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "float16"


def test_failure_mid_way_leaves_no_output(hf, tmp_path, monkeypatch):
    plan = load_mergekit_yaml(_write_yaml(tmp_path / "m.yml", f"""
merge_method: task_arithmetic
base_model: {hf['base']}
models: [{{model: {hf['ft_a']}, parameters: {{weight: 1.0}}}}]
"""))
    calls = []
    real = tree.merge

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 5:
            raise RuntimeError("disk on fire")
        return real(*args, **kwargs)

    monkeypatch.setattr(stream.tree, "merge", failing)
    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match="disk on fire"):
        stream.merge_checkpoints(plan, out, max_shard_size="1KB", progress=False)
    assert len(calls) == 5
    assert not out.exists() and [p.name for p in tmp_path.iterdir()] == ["m.yml"]


def test_a_parameter_missing_for_some_tensors_fails_before_reading(hf, tmp_path):
    plan = load_mergekit_yaml(_write_yaml(tmp_path / "m.yml", f"""
merge_method: linear
models:
  - model: {hf['ft_a']}
    parameters: {{weight: 1.0}}
  - model: {hf['ft_b']}
    parameters:
      weight: [{{filter: mlp, value: 0.5}}]
"""))
    with pytest.raises(ParameterError) as e:
        stream.merge_checkpoints(plan, tmp_path / "out", progress=False)
    msg = str(e.value)
    assert "missing required parameter 'weight'" in msg and str(hf["ft_b"]) in msg
    assert "model.layers.0.self_attn.q_proj.weight" in msg and "mlp.up_proj" not in msg
    assert not (tmp_path / "out").exists()
