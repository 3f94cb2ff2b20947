"""mergekit `slices:`: parity with mergekit 0.1.5's full merge (goldens from scripts/mergekit_goldens.py slices),
hand-computed renumbering / scale / per-slice depth / precedence on flat dicts, nnx models with a new layer count,
and the documented errors (naming the key and the line)."""
import json
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file

from configurable_fm.bricks.paths import flat_params
from configurable_fm.interop.safetensors_io import INDEX_FILE
from configurable_fm.models.factory import build_model
from configurable_fm.ops.merge import slices as S
from configurable_fm.ops.merge import stream, tree
from configurable_fm.ops.merge.mergekit_yaml import MergekitYamlError, load_mergekit_yaml, parse_mergekit_yaml
from configurable_fm.ops.merge.params import ParameterError
from tests.helpers import golden_hf_inputs, golden_yaml, load_script, marked_slow, read_tensors

GOLDEN = Path(__file__).resolve().parents[2] / "golden" / "mergekit_0.1.5"
META = json.loads((GOLDEN / "slices.json").read_text())
ATOL = 1e-5  # float32, mergekit (torch) vs ours (jax)


@pytest.fixture(scope="module")
def golden():
    return load_file(str(GOLDEN / "slices.safetensors"))


@pytest.fixture(scope="module")
def hf_inputs(golden, tmp_path_factory):
    """The golden inputs A and B as HF directories (config.json + model.safetensors)."""
    return golden_hf_inputs(golden, META["input_config"], "AB", tmp_path_factory.mktemp("slices_inputs"))


def _yaml(case, dirs, tmp_path):
    return golden_yaml(META["cases"][case]["yaml"], dirs, tmp_path / f"{case}.yml")


_read = read_tensors


def _assert_golden(got, golden, case):
    names = META["cases"][case]["tensors"]
    assert sorted(got) == names, case
    for k in names:
        diff = float(np.max(np.abs(np.asarray(got[k], np.float32) - golden[f"{case}/{k}"])))
        assert diff <= ATOL, f"{case}: {k} differs from mergekit by {diff}"


# Slow: each slerp case on its second route (they were ~2-4 s each in CI while every t compiled its own kernel;
# since a6caedd t is traced); one runs streamed, the other in memory (the slices' plan, S.plan_tensors, is the same
# on both routes).


@pytest.mark.parametrize("case", marked_slow(sorted(META["cases"]), {"slerp_two_slices"}))  # in memory below
def test_streamed_slices_equal_mergekit(case, golden, hf_inputs, tmp_path):
    plan = load_mergekit_yaml(_yaml(case, hf_inputs, tmp_path))
    assert plan.slices is not None
    out = stream.merge_checkpoints(plan, tmp_path / "out", progress=False, max_shard_size="4KB")
    _assert_golden(_read(out), golden, case)
    config = json.loads((out / "config.json").read_text())
    assert config["num_hidden_layers"] == META["cases"][case]["num_hidden_layers"]
    assert (out / INDEX_FILE).exists()  # several shards of <= 4 KB


@pytest.mark.parametrize("case", marked_slow(sorted(META["cases"]), {"slerp_classic"}))  # streamed above
def test_in_memory_merge_slices_on_hf_names_equals_mergekit(case, golden, hf_inputs, tmp_path):
    plan = load_mergekit_yaml(_yaml(case, hf_inputs, tmp_path))
    flats = {name: {k[len(f"inputs/{key}/"):]: v for k, v in golden.items() if k.startswith(f"inputs/{key}/")}
             for key, name in (("A", str(hf_inputs["A"])), ("B", str(hf_inputs["B"])))}
    got = tree.merge_slices(plan.method, plan.slices, flats, base=None if plan.base is None else plan.base.name,
                            parameters=plan.parameters)
    _assert_golden(got, golden, case)


def test_solar_output_loads_in_transformers_with_the_new_layer_count(golden, hf_inputs, tmp_path):
    import torch
    import transformers

    out = tmp_path / "out"
    assert _script().main(["--mergekit_yaml", str(_yaml("solar_scale", hf_inputs, tmp_path)), "--output", str(out),
                           "--no_progress"]) == 0
    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert len(model.model.layers) == 6
    w = model.model.layers[4].self_attn.o_proj.weight.detach().numpy()  # layer 2 of A duplicated, scale 0
    assert np.all(w == 0)
    np.testing.assert_array_equal(model.model.layers[4].self_attn.q_proj.weight.detach().numpy(),
                                  golden["inputs/A/model.layers.2.self_attn.q_proj.weight"])
    assert torch.isfinite(model(torch.tensor([[1, 5, 7]])).logits).all()


def _script():
    return load_script("merge")


def test_layer_types_of_the_config_follow_the_layers(hf_inputs, tmp_path):
    dirs = {}
    for name, types in (("A", ["full", "sliding", "full", "sliding"]), ("B", ["b0", "b1", "b2", "b3"])):
        d = tmp_path / name
        d.mkdir()
        (d / "config.json").write_text(json.dumps({**META["input_config"], "layer_types": types}))
        (d / "model.safetensors").symlink_to(hf_inputs[name] / "model.safetensors")
        dirs[name] = d
    plan = load_mergekit_yaml(_yaml("frankenmerge", dirs, tmp_path))
    inputs = {n: stream._open(r) for n, r in plan.refs.items()}
    config = stream._slices_config(plan, inputs, str(dirs["A"]), 7)
    assert config["num_hidden_layers"] == 7  # slices A[0,2] B[1,3] A[2,4] B[3,4]
    assert config["layer_types"] == ["full", "sliding", "b1", "b2", "full", "sliding", "b3"]
    assert json.loads((dirs["A"] / "config.json").read_text())["layer_types"] == ["full", "sliding", "full", "sliding"]


# ------------------------------------------------------------------------------------ hand-computed, flat dicts
def _toy(value_of_layer, n=4, extra=0.0):
    """A flat dict in our paths: layer i's tensors are filled with value_of_layer(i)."""
    d = {"embed_tokens.embedding": np.full((3, 2), 10.0 + extra, np.float32)}
    for i in range(n):
        for t in ("self_attn.o_proj.kernel", "mlp.up_proj.kernel", "input_layernorm.weight"):
            d[f"layers.{i}.{t}"] = np.full((2, 2) if "kernel" in t else (2,), value_of_layer(i), np.float32)
    d["norm.weight"] = np.full((2,), 20.0 + extra, np.float32)
    d["lm_head.kernel"] = np.full((2, 3), 30.0 + extra, np.float32)
    return d


def _val(flat, name):
    v = np.asarray(flat[name])
    assert np.all(v == v.flat[0]), name
    return float(v.flat[0])


def test_passthrough_renumbers_layers_and_scales_by_filter():
    m = _toy(lambda i: i + 1.0)
    out = tree.merge_slices("passthrough", [
        {"sources": [{"model": "m", "layer_range": [0, 3]}]},
        {"sources": [{"model": "m", "layer_range": [1, 4],
                      "parameters": {"scale": [{"filter": "o_proj", "value": 0.0}]}}],
         "parameters": {"scale": [{"filter": "up_proj", "value": [1.0, 3.0]}]}},
    ], {"m": m})
    layers = [k for k in out if k.startswith("layers.")]
    assert list(out)[0] == "embed_tokens.embedding" and list(out)[-2:] == ["norm.weight", "lm_head.kernel"]
    assert layers == [f"layers.{j}.{t}" for j in range(6)
                      for t in ("self_attn.o_proj.kernel", "mlp.up_proj.kernel", "input_layernorm.weight")]
    assert [_val(out, f"layers.{j}.input_layernorm.weight") for j in range(6)] == [1, 2, 3, 2, 3, 4]
    assert [_val(out, f"layers.{j}.self_attn.o_proj.kernel") for j in range(6)] == [1, 2, 3, 0, 0, 0]
    # up_proj of the second slice: scale 1 -> 2 -> 3 over its 3 layers (t = 0, 0.5, 1) times layers 2, 3, 4
    assert [_val(out, f"layers.{j}.mlp.up_proj.kernel") for j in range(6)] == [1, 2, 3, 2, 6, 12]
    assert _val(out, "norm.weight") == 20 and _val(out, "lm_head.kernel") == 30
    assert m["layers.1.self_attn.o_proj.kernel"][0, 0] == 2  # input untouched


def test_depth_t_restarts_in_every_slice_and_is_1_for_a_one_layer_slice():
    x, y = _toy(lambda i: 1.0, extra=-9.0), _toy(lambda i: 0.0, extra=-10.0)  # outer tensors: x = 1, y = 0 too
    x = {k: np.ones_like(v) for k, v in x.items()}
    y = {k: np.zeros_like(v) for k, v in y.items()}
    # weight of x = gradient [0, 1], of y = 1: y_out = w / (w + 1), i.e. 0 at t = 0, 1/3 at t = 0.5, 1/2 at t = 1
    out = tree.merge_slices("linear", [
        {"sources": [{"model": "x", "layer_range": [0, 3], "parameters": {"weight": [0.0, 1.0]}},
                     {"model": "y", "layer_range": [0, 3]}]},
        {"sources": [{"model": "x", "layer_range": [3, 4], "parameters": {"weight": [0.0, 1.0]}},
                     {"model": "y", "layer_range": [3, 4]}]},
    ], {"x": x, "y": y}, parameters={"weight": 1.0})
    got = [_val(out, f"layers.{j}.mlp.up_proj.kernel") for j in range(4)]
    np.testing.assert_allclose(got, [0.0, 1 / 3, 0.5, 0.5], atol=1e-7)
    for k in ("embed_tokens.embedding", "norm.weight", "lm_head.kernel"):  # t = 0 outside the layers
        assert _val(out, k) == 0.0


def test_precedence_source_over_slice_over_global_and_first_last_slice_for_outer_tensors():
    a, b = _toy(lambda i: 1.0, extra=0.0), _toy(lambda i: 0.0, extra=-10.0)
    a = {k: np.ones_like(v) for k, v in a.items()}
    b = {k: np.zeros_like(v) for k, v in b.items()}
    slices = [
        {"sources": [{"model": "a", "layer_range": [0, 2], "parameters": {"weight": [{"filter": "mlp", "value": 3.0}]}},
                     {"model": "b", "layer_range": [0, 2]}],
         "parameters": {"weight": [{"filter": "self_attn", "value": 2.0}]}},
        {"sources": [{"model": "b", "layer_range": [2, 4]}, {"model": "a", "layer_range": [2, 4]}]},
    ]
    out = tree.merge_slices("linear", slices, {"a": a, "b": b}, parameters={"weight": 1.0})
    # slice 0: a's weight 3 (mlp, source), 2 (self_attn, slice), 1 (rest, global); b: 2 on self_attn, else 1
    assert _val(out, "layers.0.mlp.up_proj.kernel") == pytest.approx(3 / 4)
    assert _val(out, "layers.1.self_attn.o_proj.kernel") == pytest.approx(2 / 4)
    assert _val(out, "layers.0.input_layernorm.weight") == pytest.approx(1 / 2)
    assert _val(out, "embed_tokens.embedding") == pytest.approx(1 / 2)  # first slice's levels (filters miss it)
    assert _val(out, "layers.3.mlp.up_proj.kernel") == pytest.approx(1 / 2)  # slice 1: global only
    # a passthrough frankenmerge: embeddings from the first slice's model, final norm and lm_head from the last
    fr = tree.merge_slices("passthrough", [{"sources": [{"model": "b", "layer_range": [0, 1]}]},
                                           {"sources": [{"model": "a", "layer_range": [1, 2]}]}], {"a": a, "b": b})
    assert _val(fr, "embed_tokens.embedding") == 0 and _val(fr, "norm.weight") == 1 and _val(fr, "lm_head.kernel") == 1
    assert [_val(fr, f"layers.{j}.mlp.up_proj.kernel") for j in range(2)] == [0, 1]


def test_tensor_plan_records_inputs_offsets_and_levels():
    names = {"a": list(_toy(lambda i: 0.0)), "b": list(_toy(lambda i: 0.0))}
    sl = S.as_slices([{"sources": [{"model": "a", "layer_range": [1, 3]}, {"model": "b", "layer_range": [2, 4],
                                                                           "parameters": {"t": 0.1}}],
                       "parameters": {"t": 0.4}}])
    with pytest.raises(S.SliceError, match="'t' .*shared parameter"):
        S.plan_tensors(tree.get_method("slerp"), sl, names, base="a")
    sl = S.as_slices([{"sources": [{"model": "a", "layer_range": [1, 3]}, {"model": "b", "layer_range": [2, 4]}],
                       "parameters": {"t": [0.0, 1.0]}}])
    tasks, n = S.plan_tensors(tree.get_method("slerp"), sl, names, base="a", parameters={"t": 0.9})
    assert n == 2
    by = {t.name: t for t in tasks}
    t1 = by["layers.1.mlp.up_proj.kernel"]
    assert t1.base == ("a", "layers.2.mlp.up_proj.kernel") and t1.inputs == (("b", "layers.3.mlp.up_proj.kernel"),)
    assert (t1.layer_offset, t1.slice_layers, t1.t) == (1, 2, 1.0)
    assert t1.resolve(tree.get_method("slerp")) == {"t": 1.0}
    assert by["norm.weight"].t == 0.0 and by["norm.weight"].resolve(tree.get_method("slerp")) == {"t": 0.0}


def test_identity_initialised_duplicates_preserve_the_nnx_model_logits():
    spec = {"family": "llama", "vocab_size": 16, "hidden_size": 16, "intermediate_size": 16, "num_layers": 3,
            "num_heads": 2, "num_kv_heads": 1}
    model = build_model(spec, seed=0)
    zero = {"scale": [{"filter": "o_proj", "value": 0.0}, {"filter": "down_proj", "value": 0.0}]}
    grown = tree.merge_slices("passthrough", [
        {"sources": [{"model": "m", "layer_range": [0, 2]}]},
        {"sources": [{"model": "m", "layer_range": [0, 2], "parameters": zero}]},  # identity layers
        {"sources": [{"model": "m", "layer_range": [2, 3]}]},
    ], {"m": model})
    assert type(grown) is type(model) and grown.cfg.num_layers == 5 and len(grown.layers) == 5
    assert model.cfg.num_layers == 3
    tokens = jnp.array([[1, 5, 7, 2]], jnp.int32)
    np.testing.assert_allclose(np.asarray(grown(tokens)), np.asarray(model(tokens)), atol=1e-5)
    f = flat_params(grown)
    np.testing.assert_array_equal(f["layers.3.mlp.up_proj.kernel"], flat_params(model)["layers.1.mlp.up_proj.kernel"])
    assert not np.any(np.asarray(f["layers.2.self_attn.o_proj.kernel"]))


def test_missing_tensors_and_shape_mismatches_are_listed():
    a, b = _toy(lambda i: 1.0), _toy(lambda i: 0.0)
    del b["layers.2.mlp.up_proj.kernel"]
    sl = [{"sources": [{"model": "a", "layer_range": [0, 3]}, {"model": "b", "layer_range": [0, 3]}]}]
    with pytest.raises(tree.MergeInputError, match=r"layers.2.mlp.up_proj.kernel is missing in b"):
        tree.merge_slices("linear", sl, {"a": a, "b": b}, parameters={"weight": 1.0})
    b = _toy(lambda i: 0.0)
    b["layers.1.mlp.up_proj.kernel"] = np.zeros((2, 5), np.float32)
    with pytest.raises(tree.MergeInputError) as e:
        tree.merge_slices("linear", sl, {"a": a, "b": b}, parameters={"weight": 1.0})
    assert "layers.1.mlp.up_proj.kernel" in str(e.value) and "(2, 5) in b" in str(e.value)
    with pytest.raises(S.SliceError, match=r"out of the model's range: it has 4 layers"):
        tree.merge_slices("passthrough", [{"sources": [{"model": "a", "layer_range": [2, 6]}]}], {"a": a})
    with pytest.raises(ParameterError, match="missing required parameter 'weight'"):
        tree.merge_slices("linear", sl, {"a": a, "b": _toy(lambda i: 0.0)})


# ------------------------------------------------------------------------------------------------ YAML errors
@pytest.fixture()
def dirs(tmp_path):
    out = {}
    for name in ("a", "b"):
        d = tmp_path / name
        d.mkdir()
        (d / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "num_hidden_layers": 4}))
        out[name] = d
    return out


def _parse(text, dirs):
    return parse_mergekit_yaml(text.format(**dirs), source="t.yml")


def test_yaml_slices_plan(dirs):
    plan = _parse("""
merge_method: slerp
base_model: {a}
slices:
  - sources:
      - model: {a}
        layer_range: [0, 4]
      - model: {b}
        layer_range: [0, 4]
    parameters: {{t: [0.0, 1.0]}}
parameters:
  t: [{{filter: mlp, value: 0.3}}, {{value: 0.5}}]
""", dirs)
    assert plan.base.name == str(dirs["a"]) and plan.model_names == [str(dirs["b"])]
    (sl,) = plan.slices
    assert [(s.model, s.layer_range, s.line) for s in sl.sources] == [(str(dirs["a"]), (0, 4), 6),
                                                                        (str(dirs["b"]), (0, 4), 8)]
    assert sl.parameters == {"t": [0.0, 1.0]} and plan.parameters["t"][0] == {"filter": "mlp", "value": 0.3}


@pytest.mark.parametrize("text, words", [
    ("merge_method: passthrough\nmodels: [{{model: {a}}}]\nslices:\n  - sources: [{{model: {a}, layer_range: [0, 2]}}]\n",
     ["exactly one of 'models' and 'slices'", "line 4", "line 2 has 'models'"]),
    ("merge_method: passthrough\nslices:\n  - sources:\n      - model: {a}\n        layer_range: [2, 6]\n",
     ["layer_range [2, 6]", "out of the model's range", "4 layers", "line 5"]),
    ("merge_method: passthrough\nslices:\n  - sources:\n      - model: {a}\n        layer_range: [3, 3]\n",
     ["0 <= start < end", "line 5"]),
    ("merge_method: passthrough\nslices:\n  - sources:\n      - model: {a}\n        layer_range: [0]\n",
     ["two integers", "line 5"]),
    ("merge_method: linear\nslices:\n  - sources:\n      - {{model: {a}, layer_range: [0, 2]}}\n"
     "      - {{model: {b}, layer_range: [0, 3]}}\nparameters: {{weight: 1}}\n",
     ["same number of layers", "line 3"]),
    ("merge_method: passthrough\nslices:\n  - sources: [{{model: {a}, layer_range: [0, 2]}}]\n"
     "  - sources:\n      - {{model: {a}, layer_range: [0, 2]}}\n      - {{model: {b}, layer_range: [0, 2]}}\n",
     ["slices[1]", "passthrough needs exactly 1 source", "line 4"]),
    ("merge_method: slerp\nbase_model: {a}\nslices:\n  - sources:\n      - {{model: {b}, layer_range: [0, 2]}}\n"
     "      - {{model: {b}, layer_range: [2, 4]}}\nparameters: {{t: 0.5}}\n",
     ["base model", "is not one of the slice's sources", "more than once", "line 4"]),
    ("merge_method: passthrough\nslices:\n  - sources:\n      - {{model: {a}, layer_range: [0, 2], weight: 1}}\n",
     ["unsupported key 'weight'", "line 4"]),
    ("merge_method: passthrough\nslices:\n  - sources: [{{model: {a}, layer_range: [0, 2]}}]\n"
     "    residual_weight: 0.5\n", ["'residual_weight'", "line 4"]),
    ("merge_method: slerp\nbase_model: {a}\nslices:\n  - sources:\n      - {{model: {a}, layer_range: [0, 2]}}\n"
     "      - {{model: {b}, layer_range: [0, 2], parameters: {{t: 0.3}}}}\n",
     ["'t' in slices[0].sources[1].parameters", "shared parameter", "line 6"]),
    ("merge_method: passthrough\nslices: []\n", ["non-empty list", "line 2"]),
    ("merge_method: passthrough\nbase_model: {a}\n", ["'models'", "'slices'", "is required"]),
])
def test_invalid_slices_name_the_key_and_line(dirs, text, words):
    with pytest.raises(MergekitYamlError) as e:
        _parse(text, dirs)
    assert all(w in str(e.value) for w in words), str(e.value)
    assert str(e.value).startswith("t.yml")


def test_layer_range_checked_against_the_tensors_when_streaming(tmp_path, golden, hf_inputs):
    # a config.json without a layer count passes parsing; the tensors then show the model has 4 layers
    d = tmp_path / "noconf"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({k: v for k, v in META["input_config"].items()
                                               if k != "num_hidden_layers"}))
    (d / "model.safetensors").write_bytes((hf_inputs["A"] / "model.safetensors").read_bytes())
    yml = tmp_path / "m.yml"
    yml.write_text(f"merge_method: passthrough\nslices:\n  - sources:\n      - model: {d}\n"
                   "        layer_range: [1, 5]\n")
    plan = load_mergekit_yaml(yml)
    with pytest.raises(S.SliceError) as e:
        stream.merge_checkpoints(plan, tmp_path / "out", progress=False)
    assert "line 4" in str(e.value) and "it has 4 layers" in str(e.value) and str(yml) in str(e.value)
    assert not (tmp_path / "out").exists()
