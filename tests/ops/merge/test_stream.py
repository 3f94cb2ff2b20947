"""Streaming merges of tiny HF llamas through scripts/merge.py: same tensors as the in-memory tree.merge,
sharded output that transformers loads, and the documented errors (mismatch, existing output, failure mid-way)."""
import json
import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers

from configurable_fm.interop.safetensors_io import INDEX_FILE, SINGLE_FILE, TensorStore
from configurable_fm.ops.merge import execute as X
from configurable_fm.ops.merge import stream, tree
from configurable_fm.ops.merge.mergekit_yaml import load_mergekit_yaml
from configurable_fm.ops.merge.params import ParameterError
from tests.helpers import load_script



def _script():
    return load_script("merge")


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


def test_models_of_different_sizes_give_a_short_error_naming_the_difference(hf, tmp_path, capsys):
    """A YAML merging models of different widths and depths through the script: one line naming the difference
    (from the config.json files), a capped tensor list, no vocabulary hint, exit status 1, nothing written."""
    small = _llama(tmp_path / "small", 4, hidden_size=8, intermediate_size=12, num_hidden_layers=2,
                   num_attention_heads=1)
    yml = _write_yaml(tmp_path / "m.yml", f"""
merge_method: task_arithmetic
base_model: {hf['base']}
models:
  - model: {small}
    parameters: {{weight: 1.0}}
""")
    with pytest.raises(SystemExit) as e:
        _script().main(["--mergekit_yaml", str(yml), "--output", str(tmp_path / "out"), "--no_progress"])
    assert e.value.code == 1
    err = capsys.readouterr().err
    err = err[err.index("error: cannot merge"):]  # after transformers' progress bars
    lines = err.strip().splitlines()
    assert len(lines) < 15, err
    b = hf["base"]
    assert lines[0].endswith(f"{small} has hidden size 8 but {b} has 16, 2 layers but {b} has 3, intermediate "
                             f"size 12 but {b} has 24, 1 attention head but {b} has 2"), err
    assert "Traceback" not in err
    assert re.search(r"\.\.\. and \d+ more", err) and "tokenizer_source" not in err
    assert not (tmp_path / "out").exists()


def test_timers_print_each_stage_and_apply_to_the_streamed_merge_only(hf, tmp_path, capsys):
    yml = _write_yaml(tmp_path / "m.yml", f"""
merge_method: linear
models:
  - model: {hf['ft_a']}
    parameters: {{weight: 0.5}}
  - model: {hf['ft_b']}
    parameters: {{weight: 0.5}}
""")
    assert _script().main(["--mergekit_yaml", str(yml), "--output", str(tmp_path / "out"), "--no_progress",
                           "--timers"]) == 0
    out = capsys.readouterr().out
    line = out[out.index("wall "):]
    assert "busy seconds per stage:" in line and all(f"'{k}'" in line for k in ("read", "compute", "write"))
    with pytest.raises(SystemExit) as e:
        _script().main(["--config", "experiments/merge/task_arithmetic_tiny.py", "--output", str(tmp_path / "c"),
                        "--timers"])
    assert e.value.code != 0 and "--timers applies to --mergekit_yaml only" in capsys.readouterr().err


def test_merge_command_turns_device_preallocation_off_unless_set(monkeypatch, tmp_path, capsys):
    """cfm-merge sets XLA_PYTHON_CLIENT_PREALLOCATE=false before any device use (cli/merge.py); a user's value
    is kept."""
    from configurable_fm.cli import merge as cli_merge

    monkeypatch.delenv(cli_merge.DEVICE_PREALLOCATION, raising=False)
    with pytest.raises(SystemExit):  # a usage error still comes after the setting
        _script().main(["--output", str(tmp_path / "o")])
    assert os.environ[cli_merge.DEVICE_PREALLOCATION] == "false"
    monkeypatch.setenv(cli_merge.DEVICE_PREALLOCATION, "true")
    cli_merge.no_device_preallocation()
    assert os.environ[cli_merge.DEVICE_PREALLOCATION] == "true"
    capsys.readouterr()


@pytest.mark.parametrize("with_base", [True, False])
def test_vocabulary_only_difference_names_the_yaml_key(hf, tmp_path, with_base):
    big_vocab = _llama(tmp_path / "big_vocab", 5, vocab_size=40)
    head = f"merge_method: task_arithmetic\nbase_model: {hf['base']}\n" if with_base else "merge_method: linear\n"
    plan = load_mergekit_yaml(_write_yaml(tmp_path / "m.yml", head + f"""models:
  - model: {hf['ft_a']}
    parameters: {{weight: 1.0}}
  - model: {big_vocab}
    parameters: {{weight: 1.0}}
"""))
    with pytest.raises(tree.MergeInputError) as e:
        stream.merge_checkpoints(plan, tmp_path / "out", progress=False)
    lines = str(e.value).splitlines()
    assert lines[0].endswith(f"{big_vocab} has vocabulary 40 but {hf['base'] if with_base else hf['ft_a']} has 32")
    key = "`tokenizer_source: base`" if with_base else "`tokenizer_source: union`"
    assert len(lines) == 4 and all("vocabulary mismatch" in x and key in x for x in lines[2:]), lines
    assert "embed_alignment" not in str(e.value)


def test_float64_says_it_is_computed_in_float32(hf, tmp_path, caplog):
    plan = load_mergekit_yaml(_write_yaml(tmp_path / "m.yml", f"""
merge_method: linear
models: [{{model: {hf['ft_a']}, parameters: {{weight: 1.0}}}}, {{model: {hf['ft_b']}, parameters: {{weight: 1.0}}}}]
dtype: float64
"""))
    with caplog.at_level("WARNING", logger=stream.LOG.name):
        stream.merge_checkpoints(plan, tmp_path / "out", progress=False)
    assert "float64 is computed and written as float32 here" in caplog.text
    got, a, b = _dict(tmp_path / "out"), _dict(hf["ft_a"]), _dict(hf["ft_b"])
    for k in a:  # as the warning says (execute.output_dtype: jax's canonical dtype)
        assert got[k].dtype == np.float32, k
        np.testing.assert_allclose(got[k], (a[k] + b[k]) / 2, rtol=1e-6, atol=1e-7, err_msg=k)


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
    with pytest.raises(FileExistsError, match=r"did not write \(keep.txt\)"):  # overwrite never deletes it
        stream.merge_checkpoints(plan, out, overwrite=True, progress=False)
    assert (out / "keep.txt").read_text() == "x"
    (out / "keep.txt").unlink()
    stream.merge_checkpoints(plan, out, overwrite=True, progress=False)  # an empty directory
    stream.merge_checkpoints(plan, out, overwrite=True, progress=False)  # a previous output of the library
    assert (out / SINGLE_FILE).exists()
    a, b = _dict(hf["ft_a"]), _dict(hf["ft_b"])
    got = _dict(out)
    for k in a:  # dtype: float16 rounds the inputs on load; the output keeps that dtype
        hand = (a[k].astype(np.float16).astype(np.float32) + b[k].astype(np.float16).astype(np.float32)) / 2
        assert got[k].dtype == np.float16, k
        np.testing.assert_allclose(got[k].astype(np.float32), hand.astype(np.float16).astype(np.float32),
                                   rtol=1e-3, atol=1e-6, err_msg=k)
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "float16"
    # an input is never the output, even a previous output of the library with overwrite
    again = load_mergekit_yaml(_write_yaml(tmp_path / "m2.yml", f"""
merge_method: linear
models: [{{model: {out}, parameters: {{weight: 1.0}}}}, {{model: {hf['ft_b']}, parameters: {{weight: 1.0}}}}]
"""))
    before = (out / SINGLE_FILE).read_bytes()
    with pytest.raises(FileExistsError, match="would replace an input"):
        stream.merge_checkpoints(again, out, overwrite=True, progress=False)
    assert (out / SINGLE_FILE).read_bytes() == before


@pytest.mark.parametrize("where", ["kernel", "read"])
def test_failure_mid_way_leaves_no_output(hf, tmp_path, monkeypatch, where):
    """A failure in the 5th tensor's kernel (caller's thread) or read (read-ahead thread) propagates, the
    read-ahead stops, and the partly written planned shards are removed with the temporary directory."""
    plan = load_mergekit_yaml(_write_yaml(tmp_path / "m.yml", f"""
merge_method: task_arithmetic
base_model: {hf['base']}
models: [{{model: {hf['ft_a']}, parameters: {{weight: 1.0}}}}]
"""))
    calls = []
    real = X.merge_tensor if where == "kernel" else X.PreadStore.__getitem__

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 5:
            raise RuntimeError("disk on fire")
        return real(*args, **kwargs)

    monkeypatch.setattr(*((X, "merge_tensor") if where == "kernel" else (X.PreadStore, "__getitem__")), failing)
    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match="disk on fire"):
        stream.merge_checkpoints(plan, out, max_shard_size="1KB", progress=False)
    assert len(calls) == 5  # nothing read or merged after the failure
    assert not out.exists() and [p.name for p in tmp_path.iterdir()] == ["m.yml"]


def test_progress_bar_counts_tensors_and_bytes(hf, tmp_path, monkeypatch):
    """progress=True: one bar update per output tensor, with the bytes read (base + models, stored dtype) and
    written; progress=False: no bar."""
    seen = []

    class Recording(X.Progress):
        def __init__(self, total, desc, total_bytes=None):
            super().__init__(total, desc, total_bytes)
            seen.append(self)

    monkeypatch.setattr(X, "Progress", Recording)
    plan = load_mergekit_yaml(_write_yaml(tmp_path / "m.yml", f"""
merge_method: task_arithmetic
base_model: {hf['base']}
models: [{{model: {hf['ft_a']}, parameters: {{weight: 1.0}}}}, {{model: {hf['ft_b']}, parameters: {{weight: 0.5}}}}]
out_dtype: bfloat16
"""))
    stream.merge_checkpoints(plan, tmp_path / "quiet", progress=False)
    assert seen == []
    stream.merge_checkpoints(plan, tmp_path / "out", progress=True)
    (bar,) = seen
    base = _dict(hf["base"])
    assert bar.bar.n == bar.bar.total == len(base)
    assert bar.read == 3 * sum(v.nbytes for v in base.values())  # float32 inputs
    assert bar.written == bar.total_bytes == sum(v.nbytes // 2 for v in base.values())  # bfloat16 output
    assert bar.written == sum(f.stat().st_size for f in (tmp_path / "out").glob("*.safetensors")) - sum(
        8 + int.from_bytes(f.read_bytes()[:8], "little") for f in (tmp_path / "out").glob("*.safetensors"))


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


def _handmade(path, tensors):
    """An HF-style directory with arbitrary tensors (no tokenizer)."""
    from safetensors.numpy import save_file

    path.mkdir()
    (path / "config.json").write_text(json.dumps({"model_type": "llama", "num_hidden_layers": 2}))
    save_file(tensors, str(path / SINGLE_FILE))
    return path


def test_mixed_dtypes_and_integer_tensors(tmp_path):
    """bf16 / f16 / f32 / int64 tensors: floating ones as tree.merge on the same inputs (load dtype float32,
    stored dtypes kept without out_dtype), int64 copied unchanged when identical, refused naming the model
    otherwise -- before the output exists."""
    import ml_dtypes

    rng = np.random.default_rng(0)

    def make(i, ids):
        return {"model.layers.0.w": rng.normal(size=(4, 3)).astype(ml_dtypes.bfloat16),
                "model.layers.1.w": rng.normal(size=(5,)).astype(np.float16),
                "model.norm.weight": rng.normal(size=(3,)).astype(np.float32), "model.pos_ids": ids}

    ids = np.arange(2**40, 2**40 + 6, dtype=np.int64)  # not representable in int32
    dirs = {n: _handmade(tmp_path / n, make(i, ids)) for i, n in enumerate(("a", "b"))}
    text = ("merge_method: linear\nmodels:\n" + "".join(f"  - model: {d}\n    parameters: {{weight: {w}}}\n"
                                                        for d, w in zip(dirs.values(), (0.7, 0.3))))
    plan = load_mergekit_yaml(_write_yaml(tmp_path / "m.yml", text))
    stream.merge_checkpoints(plan, tmp_path / "out", progress=False)
    want = tree.merge("linear", None, {n: _dict(d) for n, d in dirs.items()},
                      model_parameters=[{"weight": 0.7}, {"weight": 0.3}])
    _same(tmp_path / "out", {k: np.asarray(v) for k, v in want.items()}, atol=0)
    np.testing.assert_array_equal(_dict(tmp_path / "out")["model.pos_ids"], ids)
    bad = _handmade(tmp_path / "c", {**make(2, ids), "model.pos_ids": ids + 1})
    plan = load_mergekit_yaml(_write_yaml(tmp_path / "bad.yml", text + f"  - model: {bad}\n"
                                                                      "    parameters: {weight: 1.0}\n"))
    with pytest.raises(tree.MergeInputError, match=rf"model.pos_ids is a int64 tensor .* differs between "
                                                   rf"{dirs['a']} and {bad}"):
        stream.merge_checkpoints(plan, tmp_path / "out2", progress=False)
    assert not (tmp_path / "out2").exists()


def test_hf_inputs_are_read_without_memory_maps(hf):
    """HF sources read through execute.PreadStore: every tensor a fresh, writable array over memory of its own
    (a 64-byte-aligned view of a fresh numpy buffer, no view of a memory-mapped file), equal to transformers'
    safetensors reading."""
    from configurable_fm.ops.merge.sources import open_source

    src = open_source(hf["ft_a"])
    assert isinstance(src._store, X.PreadStore)
    want = _dict(hf["ft_a"])
    for k in src:
        x = src[k]
        root = x
        while isinstance(root.base, np.ndarray):
            root = root.base
        assert root.flags.owndata and x.flags.writeable and not isinstance(root, np.memmap), k
        np.testing.assert_array_equal(x, want[k])
