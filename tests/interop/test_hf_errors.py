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
    with pytest.raises(CheckpointError, match="index.json: not valid JSON"):
        TensorStore(tmp_path / "idx")
    path, _ = ckpt
    (path / "config.json").unlink()
    with pytest.raises(CheckpointError, match="no config.json"):
        from_hf(path)
    with pytest.raises(CheckpointError, match="nowhere: the path does not exist"):
        from_hf(tmp_path / "nowhere")


@pytest.mark.parametrize("index, message", [
    ('{"metadata": {}}', 'no "weight_map" object'),
    ('{"weight_map": ["a"]}', 'no "weight_map" object'),
    ('{"weight_map": {"a": 3}}', "weight_map\\['a'\\] = 3 is not a shard file name"),
    ('{"weight_map": {"a": "../x.safetensors"}}', "is not a shard file name")])
@pytest.mark.parametrize("store", ["TensorStore", "PreadStore"])
def test_malformed_index_names_the_file(tmp_path, index, message, store):
    from configurable_fm.ops.merge.execute import PreadStore
    (tmp_path / "model.safetensors.index.json").write_text(index)
    with pytest.raises(CheckpointError, match=f"index.json: .*{message}"):
        {"TensorStore": TensorStore, "PreadStore": PreadStore}[store](tmp_path)


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


# ------------------------------------------------------------------ config.json read as transformers reads it
def _hf_dir(tmp_path, kind, edit, **kw):
    """A tiny random transformers `kind` model saved to tmp_path / kind, config.json edited by `edit` (a function
    of the dict), reloaded by transformers: (directory, transformers model)."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = getattr(transformers, f"{kind}Config")(
        vocab_size=61, hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, initializer_range=0.3, **kw)
    path = tmp_path / kind
    getattr(transformers, f"{kind}ForCausalLM")(cfg).save_pretrained(path)
    c = json.loads((path / "config.json").read_text())
    edit(c)
    (path / "config.json").write_text(json.dumps(c))
    return path, getattr(transformers, f"{kind}ForCausalLM").from_pretrained(path).eval()


def _max_logit_diff(path, hf):
    import torch

    ids = np.random.RandomState(1).randint(0, 61, (1, 48))
    with torch.no_grad():
        theirs = hf(torch.tensor(ids)).logits.numpy()
    return float(np.abs(np.asarray(from_hf(path)(jnp.asarray(ids))) - theirs).max())


def _rope(**rope_scaling):
    def edit(c):
        c.pop("rope_parameters", None)
        c.update(rope_theta=500000.0, rope_scaling=rope_scaling)
    return edit


@pytest.mark.parametrize("edit", [
    # llama3 without original_max_position_embeddings: transformers takes max_position_embeddings (64), not 8192
    _rope(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0),
    # a rope_theta inside rope_scaling / rope_parameters wins over the top-level one
    _rope(rope_type="linear", factor=2.0, rope_theta=100.0),
    lambda c: c.update(rope_theta=500000.0, rope_parameters={"rope_type": "default", "rope_theta": 100.0}),
    # rope_scaling replaces rope_parameters (and its rope_theta) altogether
    lambda c: c.update(rope_parameters={"rope_type": "default", "rope_theta": 100.0},
                       rope_scaling={"rope_type": "linear", "factor": 2.0}),
], ids=["llama3-default-original-max", "theta-in-rope-scaling", "theta-in-rope-parameters", "scaling-over-parameters"])
def test_rope_config_read_as_transformers_reads_it(tmp_path, edit):
    path, hf = _hf_dir(tmp_path, "Llama", edit)
    assert _max_logit_diff(path, hf) <= 1e-4


@pytest.mark.parametrize("kind, edit", [
    ("Qwen2", lambda c: c.update(attention_bias=False)),  # Qwen2 always biases q, k, v (transformers ignores the key)
    ("Mistral", lambda c: c.update(attention_bias=True, mlp_bias=True)),  # Mistral never has biases
    ("Mixtral", lambda c: c.pop("num_local_experts")),  # transformers' default: 8 experts
], ids=["qwen2-attention-bias-false", "mistral-bias-keys", "mixtral-default-experts"])
def test_keys_transformers_ignores_or_defaults_per_architecture(tmp_path, kind, edit):
    kw = dict(num_local_experts=8) if kind == "Mixtral" else {}
    path, hf = _hf_dir(tmp_path, kind, edit, **kw)
    assert _max_logit_diff(path, hf) <= 1e-4


def test_single_file_is_read_before_an_index_as_transformers_does(tmp_path):
    """A directory holding both model.safetensors and an index (e.g. stale shards left next to a newer single file):
    transformers' from_pretrained loads model.safetensors, so must we."""
    write_sharded({"a": np.zeros(4, np.float32), "b": np.zeros(4, np.float32)}, tmp_path, max_shard_bytes=16)
    write_sharded({"a": np.ones(4, np.float32), "b": np.ones(4, np.float32)}, tmp_path)
    store = TensorStore(tmp_path)
    np.testing.assert_array_equal(store["a"], np.ones(4, np.float32))
    assert sorted(store) == ["a", "b"]
