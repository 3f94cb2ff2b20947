"""Bricks: extract / insert / save / load, bit-exact round trips, and the errors on bad input."""
import dataclasses
import json
import re

import jax.numpy as jnp
import numpy as np
import pytest
import treescope
from flax import nnx
from safetensors.numpy import save_file

from configurable_fm.bricks import (Brick, BrickSet, extract, flat_params, insert, load_bricks, save_bricks,
                                    select)
from configurable_fm.interop.safetensors_io import CheckpointError
from configurable_fm.models.llama import Llama, LlamaConfig

CFG = LlamaConfig(vocab_size=32, hidden_size=8, intermediate_size=16, num_layers=3, num_heads=2, num_kv_heads=1)
IDS = jnp.array([[1, 5, 9, 2, 30, 7]])
EVERYTHING = ["embed_tokens", "layers.*", "norm", "lm_head"]


@pytest.fixture(scope="module")
def model():
    return Llama(CFG, rngs=nnx.Rngs(0))


def bits(x):
    x = np.asarray(x)
    return x.view(np.uint16 if x.dtype.itemsize == 2 else np.uint32)


def test_extract(model):
    bricks = extract(model, "layers.*.mlp", source="tiny-llama")
    assert list(bricks) == ["layers.0.mlp", "layers.1.mlp", "layers.2.mlp"]
    b = bricks["layers.1.mlp"]
    assert (b.name, b.kind, b.source) == ("layers.1.mlp", "LlamaMLP", "tiny-llama")
    assert list(b.params) == ["down_proj.kernel", "gate_proj.kernel", "up_proj.kernel"]
    assert b.params["up_proj.kernel"] is model.layers[1].mlp.up_proj.kernel[...]
    assert b.metadata == {"module": "LlamaMLP", "axes": {"down_proj.kernel": ["mlp", "embed"],
                                                         "gate_proj.kernel": ["embed", "mlp"],
                                                         "up_proj.kernel": ["embed", "mlp"]}}
    assert b.num_params == 3 * 8 * 16 and bricks.num_params == 3 * b.num_params
    # a Selection, or a list of globs/exact paths, give bricks in model order
    by_sel = extract(model, select(model).at("layers.0").at_instances_of(nnx.Module).at("**.*_proj"),
                     kind="linear", source="s")
    assert list(by_sel)[:3] == ["layers.0.mlp.down_proj", "layers.0.mlp.gate_proj", "layers.0.mlp.up_proj"]
    assert {b.kind for b in by_sel.values()} == {"linear"} and list(by_sel["layers.0.mlp.up_proj"].params) == ["kernel"]
    whole = extract(model, EVERYTHING[::-1], source="s")
    assert list(whole) == ["embed_tokens", "layers.0", "layers.1", "layers.2", "lm_head", "norm"]
    assert sum(len(b.params) for b in whole.values()) == len(flat_params(model))
    assert re.search(r"\n  layers\.2 +kind=LlamaDecoderLayer source=s \(9 tensors, ", repr(whole))


def test_round_trip_reproduces_logits_exactly(model, tmp_path):
    bricks = extract(model, EVERYTHING, source="tiny-llama")
    save_bricks(bricks, tmp_path / "all")
    assert sorted(p.name for p in (tmp_path / "all").iterdir()) == [".configurable_fm_output.json", "bricks.json", "bricks.safetensors"]
    loaded = load_bricks(tmp_path / "all")
    assert list(loaded) == list(bricks)
    for name, b in bricks.items():
        lb = loaded[name]
        assert (lb.kind, lb.source, dict(lb.metadata)) == (b.kind, b.source, dict(b.metadata))
        assert list(lb.params) == list(b.params)
        for k in b.params:
            assert np.array_equal(bits(lb.params[k]), bits(b.params[k])), (name, k)
    fresh = Llama(CFG, rngs=nnx.Rngs(7))
    fresh_before = {k: np.array(v) for k, v in flat_params(fresh).items()}
    assert np.abs(np.asarray(fresh(IDS)) - np.asarray(model(IDS))).max() > 1e-3
    rebuilt = insert(fresh, loaded)
    assert np.array_equal(np.asarray(rebuilt(IDS)), np.asarray(model(IDS)))
    assert all(np.array_equal(np.asarray(v), fresh_before[k]) for k, v in flat_params(fresh).items())  # untouched


def test_bfloat16_round_trip_is_bit_exact(tmp_path):
    m = Llama(CFG, rngs=nnx.Rngs(3), param_dtype=jnp.bfloat16)
    bricks = extract(m, EVERYTHING, source="bf16")
    save_bricks(bricks, tmp_path / "bf16")
    index = json.loads((tmp_path / "bf16" / "bricks.json").read_text())
    assert index["bricks"]["layers.0"]["params"]["mlp.up_proj.kernel"] == {"shape": [8, 16], "dtype": "bfloat16"}
    loaded = load_bricks(tmp_path / "bf16")
    for name, b in bricks.items():
        for k, v in b.params.items():
            assert loaded[name].params[k].dtype == jnp.bfloat16
            assert np.array_equal(bits(loaded[name].params[k]), bits(v)), (name, k)
    rebuilt = insert(Llama(CFG, rngs=nnx.Rngs(4), param_dtype=jnp.bfloat16), loaded)
    assert np.array_equal(bits(rebuilt(IDS)), bits(m(IDS)))


def test_moe_bricks_restore_perturbed_experts(tmp_path):
    m = Llama(dataclasses.replace(CFG, num_experts=4), rngs=nnx.Rngs(5))
    bricks = extract(m, "layers.*.mlp", source="moe")
    assert list(bricks["layers.0.mlp"].params) == ["experts.down_proj", "experts.gate_proj", "experts.up_proj",
                                                   "router.kernel"]
    save_bricks(bricks, tmp_path / "moe")
    damaged = select(m).at("layers.*.mlp.**").at_instances_of(nnx.Param).apply(lambda w: 0.5 * w + 0.01)
    assert np.abs(np.asarray(damaged(IDS)) - np.asarray(m(IDS))).max() > 1e-4
    repaired = insert(damaged, load_bricks(tmp_path / "moe"))
    assert np.array_equal(np.asarray(repaired(IDS)), np.asarray(m(IDS)))


def test_insert_at_and_dtype(model):
    b = extract(model, "layers.0.mlp", source="s")
    moved = insert(model, b, at={"layers.0.mlp": "layers.2.mlp"})
    p, q = flat_params(moved), flat_params(model)
    for k in ("down", "gate", "up"):
        name = f"mlp.{k}_proj.kernel"
        assert np.array_equal(np.asarray(p[f"layers.2.{name}"]), np.asarray(q[f"layers.0.{name}"]))
        assert np.array_equal(np.asarray(p[f"layers.1.{name}"]), np.asarray(q[f"layers.1.{name}"]))
    # values take the model's dtype (here float32 bricks into a bfloat16 model)
    bf = insert(Llama(CFG, rngs=nnx.Rngs(1), param_dtype=jnp.bfloat16), b)
    assert bf.layers[0].mlp.up_proj.kernel[...].dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(bf.layers[0].mlp.up_proj.kernel[...], np.float32),
                                  np.asarray(model.layers[0].mlp.up_proj.kernel[...].astype(jnp.bfloat16), np.float32))


def test_insert_returns_a_model_that_shares_no_variable_with_the_input():
    """An in-place write into the inserted model (e.g. a training step) leaves the input model as it was."""
    m = Llama(CFG, rngs=nnx.Rngs(0))
    before = {k: np.array(v) for k, v in flat_params(m).items()}
    out = insert(m, extract(m, "layers.0.mlp", source="s"), at={"layers.0.mlp": "layers.1.mlp"})
    out.norm.weight[...] = jnp.zeros(CFG.hidden_size)
    out.layers[0].mlp.up_proj.kernel[...] = jnp.zeros_like(out.layers[0].mlp.up_proj.kernel[...])
    for k, v in before.items():
        np.testing.assert_array_equal(flat_params(m)[k], v, err_msg=k)


def test_insert_reports_every_mismatch(model):
    wide = Llama(dataclasses.replace(CFG, intermediate_size=32), rngs=nnx.Rngs(2))
    with pytest.raises(ValueError) as e:
        insert(model, extract(wide, "layers.*.mlp", source="wide"))
    lines = str(e.value).splitlines()
    assert lines[0] == "insert: 9 problem(s):" and len(lines) == 10
    assert ("  brick 'layers.1.mlp': layers.1.mlp.up_proj.kernel is (8, 16) in the model but (8, 32) in the brick"
            in lines)
    b = extract(model, "layers.0.mlp", source="s")["layers.0.mlp"]
    partial = Brick("layers.0.mlp", "LlamaMLP", "s", {k: v for k, v in b.params.items() if k != "gate_proj.kernel"}
                    | {"bias": jnp.zeros(8)})
    ghost = Brick("layers.9.mlp", "LlamaMLP", "s", dict(b.params))
    with pytest.raises(ValueError) as e:
        insert(model, BrickSet([partial, ghost]))
    msg = str(e.value)
    assert "insert: 3 problem(s)" in msg
    assert "brick 'layers.0.mlp': layers.0.mlp.bias is not a parameter of the model" in msg
    assert "brick 'layers.0.mlp': lacks layers.0.mlp.gate_proj.kernel, which the model has" in msg
    assert "brick 'layers.9.mlp': the model has no parameters under 'layers.9.mlp'" in msg
    twice = BrickSet([b, dataclasses.replace(b, name="copy")])
    with pytest.raises(ValueError, match=r"brick 'copy' \(at layers.0.mlp\): layers.0.mlp.down_proj.kernel is also "
                                         r"written by brick 'layers.0.mlp'"):
        insert(model, twice, at={"copy": "layers.0.mlp"})
    with pytest.raises(KeyError, match="`at` names bricks that are not in the set: \\['nope'\\]"):
        insert(model, twice, at={"nope": "layers.1.mlp"})


def test_bad_bricks_and_extract_inputs(model):
    with pytest.raises(ValueError, match="brick name must be a non-empty string without '/', got 'a/b'"):
        Brick("a/b", "k", "s", {})
    with pytest.raises(TypeError, match="brick 'x': parameter 'w' is a list, not an array"):
        Brick("x", "k", "s", {"w": [1.0]})
    b = Brick("x", "k", "s", {"w": jnp.ones(2)})
    with pytest.raises(dataclasses.FrozenInstanceError):
        b.name = "y"
    with pytest.raises(TypeError):
        b.params["w"] = jnp.zeros(2)
    with pytest.raises(ValueError, match="two bricks are named 'x'"):
        BrickSet([b, b])
    with pytest.raises(KeyError, match="no brick named 'y'; the set has \\['x'\\]"):
        BrickSet([b])["y"]
    with pytest.raises(ValueError, match=r"extract: layers.0.mlp.up_proj.kernel is a Param, not a module; "
                                         r"bricks are modules \(select 'layers.0.mlp.up_proj' instead\)"):
        extract(model, "layers.0.mlp.up_proj.kernel", source="s")
    with pytest.raises(ValueError, match="at\\('layers.0.mpl'\\) selects nothing"):
        extract(model, ["layers.0.mlp", "layers.0.mpl"], source="s")


def test_save_refuses_and_overwrites(model, tmp_path):
    bricks = extract(model, "layers.0.mlp", source="s")
    out = save_bricks(bricks, tmp_path / "b")
    with pytest.raises(FileExistsError, match="already exists"):
        save_bricks(bricks, out)
    save_bricks(extract(model, "norm", source="s2"), out, overwrite=True)
    assert list(load_bricks(out)) == ["norm"]
    bad = BrickSet([Brick("n", "k", "s", {"w": jnp.ones(2)}, {"when": object()})])
    with pytest.raises(ValueError, match="brick 'n': metadata is not JSON data"):
        save_bricks(bad, tmp_path / "bad")
    assert not (tmp_path / "bad").exists()


def test_load_reports_all_disagreements(model, tmp_path):
    out = save_bricks(extract(model, "layers.*.mlp", source="s"), tmp_path / "b")
    index = json.loads((out / "bricks.json").read_text())
    b0, b1 = index["bricks"]["layers.0.mlp"]["params"], index["bricks"]["layers.1.mlp"]["params"]
    del b0["up_proj.kernel"]  # -> an extra tensor in the safetensors file
    b0["bias"] = {"shape": [8], "dtype": "float32"}  # -> a missing tensor
    b1["down_proj.kernel"]["shape"] = [8, 16]  # -> shape mismatch
    b1["gate_proj.kernel"]["dtype"] = "bfloat16"  # -> dtype mismatch
    (out / "bricks.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError) as e:
        load_bricks(out)
    msg = str(e.value)
    assert "bricks.json and bricks.safetensors disagree" in msg
    assert ("brick 'layers.0.mlp': tensor 'layers.0.mlp/bias' is listed in bricks.json but missing from "
            "bricks.safetensors") in msg
    assert ("brick 'layers.1.mlp': tensor 'layers.1.mlp/down_proj.kernel' is (16, 8) in bricks.safetensors but "
            "(8, 16) in bricks.json") in msg
    assert ("brick 'layers.1.mlp': tensor 'layers.1.mlp/gate_proj.kernel' is float32 in bricks.safetensors but "
            "bfloat16 in bricks.json") in msg
    assert "tensor 'layers.0.mlp/up_proj.kernel' in bricks.safetensors belongs to no brick listed in bricks.json" in msg


def test_load_bad_files(tmp_path):
    with pytest.raises(CheckpointError, match="bricks.json: no such file"):
        load_bricks(tmp_path)
    save_file({"x/w": np.ones(2, np.float32)}, str(tmp_path / "bricks.safetensors"))
    (tmp_path / "bricks.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="bricks.json: not valid JSON"):
        load_bricks(tmp_path)
    (tmp_path / "bricks.json").write_text(json.dumps({"format": "other"}))
    with pytest.raises(CheckpointError, match="not a brick set index"):
        load_bricks(tmp_path)
    (tmp_path / "bricks.json").write_text(json.dumps({"format": "configurable_fm.bricks", "version": 99, "bricks": {}}))
    with pytest.raises(CheckpointError, match="version 99 is not supported"):
        load_bricks(tmp_path)
    no_metadata = {"x": {"kind": "k", "source": "s", "params": {}}}
    (tmp_path / "bricks.json").write_text(json.dumps({"format": "configurable_fm.bricks", "version": 1,
                                                      "bricks": no_metadata}))
    with pytest.raises(CheckpointError, match="brick 'x': field 'metadata' is missing or not a dict"):
        load_bricks(tmp_path)
    (tmp_path / "bricks.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{garbage")
    (tmp_path / "bricks.json").write_text(json.dumps({"format": "configurable_fm.bricks", "version": 1, "bricks": {}}))
    with pytest.raises(CheckpointError, match="bricks.safetensors: cannot read safetensors file"):
        load_bricks(tmp_path)


def test_treescope_renders_bricks(model):
    bricks = extract(model, "layers.*.mlp", source="tiny")
    text = treescope.render_to_text(bricks)
    assert text.startswith("BrickSet({") and all(f"'layers.{i}.mlp': Brick(" in text for i in range(3))
    assert "kind='LlamaMLP'" in text and "'down_proj.kernel'" in text and "float32(16, 8)" in text
    assert "source='tiny'" in treescope.render_to_text(bricks["layers.0.mlp"])
