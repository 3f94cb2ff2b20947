"""Bad HF checkpoints are refused with errors that name the problem; nothing partial is ever written."""
import json
import shutil

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import save_file

from configurable_fm.interop.hf import hf_tensors
from configurable_fm.interop.safetensors_io import CheckpointError, TensorStore, write_sharded
from configurable_fm.models import Llama, LlamaConfig, from_hf, to_hf

CFG = LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=24, num_layers=2, num_heads=4, num_kv_heads=2)


@pytest.fixture
def ckpt(tmp_path):
    model = Llama(CFG, rngs=nnx.Rngs(0))
    return to_hf(model, tmp_path / "ckpt"), model


def edit_config(path, **changes):
    cfg = json.loads((path / "config.json").read_text())
    for k, v in changes.items():
        if v is None:
            cfg.pop(k, None)
        else:
            cfg[k] = v
    (path / "config.json").write_text(json.dumps(cfg))


def test_loads_what_it_wrote(ckpt):
    path, model = ckpt
    ids = jnp.array([[1, 2, 3, 4]])
    np.testing.assert_array_equal(np.asarray(from_hf(path)(ids)), np.asarray(model(ids)))


def test_unknown_architecture_names_supported(ckpt):
    path, _ = ckpt
    edit_config(path, architectures=["FalconForCausalLM"])
    with pytest.raises(NotImplementedError, match=r"FalconForCausalLM.*supported:.*LlamaForCausalLM"):
        from_hf(path)


def test_unknown_rope_scaling_type(ckpt):
    path, _ = ckpt
    edit_config(path, rope_scaling={"rope_type": "yarn", "factor": 4.0})
    with pytest.raises(NotImplementedError, match=r"rope_scaling type 'yarn'.*supported"):
        from_hf(path)


def test_unimplemented_config_attribute(ckpt):
    path, _ = ckpt
    edit_config(path, quantization_config={"bits": 4})
    with pytest.raises(NotImplementedError, match=r"quantization_config.*llama"):
        from_hf(path)


def test_missing_extra_and_misshaped_tensors_reported_together(ckpt, tmp_path):
    path, model = ckpt
    tensors = hf_tensors(model)
    del tensors["model.layers.1.mlp.up_proj.weight"]
    tensors["model.layers.0.self_attn.extra.weight"] = np.zeros((2, 2), np.float32)
    tensors["model.layers.0.self_attn.q_proj.weight"] = np.zeros((15, 16), np.float32)
    (path / "model.safetensors").unlink()
    save_file(tensors, str(path / "model.safetensors"))
    with pytest.raises(CheckpointError) as err:
        from_hf(path)
    msg = str(err.value)
    assert "missing tensors (1): ['model.layers.1.mlp.up_proj.weight']" in msg
    assert "unexpected tensors (1): ['model.layers.0.self_attn.extra.weight']" in msg
    assert "model.layers.0.self_attn.q_proj.weight has shape (15, 16) but layers.0.self_attn.q_proj.kernel needs (16, 16)" in msg


def test_truncated_safetensors(ckpt):
    path, _ = ckpt
    f = path / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="model.safetensors"):
        from_hf(path)


def test_garbage_safetensors(ckpt):
    path, _ = ckpt
    (path / "model.safetensors").write_bytes(b"\xff" * 64)
    with pytest.raises(CheckpointError, match="cannot read safetensors"):
        from_hf(path)


def test_index_naming_missing_shard(tmp_path):
    write_sharded({"a": np.zeros(4, np.float32), "b": np.ones(4, np.float32)}, tmp_path, max_shard_bytes=16)
    (tmp_path / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match="missing shard.*model-00002-of-00002"):
        TensorStore(tmp_path)


def test_corrupt_index_and_missing_config(ckpt, tmp_path):
    (tmp_path / "idx").mkdir()
    (tmp_path / "idx" / "model.safetensors.index.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not a valid safetensors index"):
        TensorStore(tmp_path / "idx")
    path, _ = ckpt
    (path / "config.json").unlink()
    with pytest.raises(CheckpointError, match="no config.json"):
        from_hf(path)
    with pytest.raises(CheckpointError, match="nowhere: the path does not exist"):
        from_hf(tmp_path / "nowhere")


def test_to_hf_refuses_existing_output_and_overwrites_only_when_asked(ckpt):
    path, model = ckpt
    with pytest.raises(FileExistsError, match="already exists"):
        to_hf(model, path)
    to_hf(model, path, overwrite=True)
    assert sorted(p.name for p in path.parent.iterdir()) == ["ckpt"]  # no temporary leftovers


def test_failed_write_leaves_nothing(tmp_path, monkeypatch):
    import configurable_fm.interop.hf as hf

    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(hf, "write_sharded", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        to_hf(Llama(CFG, rngs=nnx.Rngs(0)), tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_inputs_are_not_modified(ckpt):
    path, _ = ckpt
    before = {p.name: p.read_bytes() for p in path.iterdir()}
    from_hf(path)
    assert {p.name: p.read_bytes() for p in path.iterdir()} == before
    shutil.rmtree(path)
