"""Model configs as data, building, orbax model checkpoints and load_model dispatch."""
import json

import jax.numpy as jnp
import numpy as np
import pytest

from configurable_fm.bricks import flat_params
from configurable_fm.interop import orbax_io
from configurable_fm.interop.safetensors_io import CheckpointError
from configurable_fm.models import to_hf
from configurable_fm.models.attention import RopeScaling
from configurable_fm.models.factory import build_model, config_from_dict, config_to_dict
from configurable_fm.interop.loader import load_model
from configurable_fm.models.llama import LlamaConfig

SPEC = dict(family="llama", vocab_size=64, hidden_size=16, intermediate_size=32, num_layers=2, num_heads=4,
            num_kv_heads=2, tie_word_embeddings=True)


def test_config_round_trip_through_json():
    cfg = LlamaConfig(**{k: v for k, v in SPEC.items() if k != "family"},
                      rope_scaling=RopeScaling("llama3", factor=8.0))
    d = json.loads(json.dumps(config_to_dict(cfg)))
    assert d["family"] == "llama" and d["rope_scaling"]["rope_type"] == "llama3"
    assert config_from_dict(d) == cfg


def test_rope_scaling_dicts_in_a_config():
    linear = config_from_dict({**SPEC, "rope_scaling": {"type": "linear", "factor": 2.0}})  # transformers' old key
    assert linear.rope_scaling == RopeScaling("linear", factor=2.0)
    with pytest.raises(ValueError, match=r"unknown rope_scaling key\(s\) \['beta_fast'\]"):
        config_from_dict({**SPEC, "rope_scaling": {"rope_type": "linear", "beta_fast": 32}})
    with pytest.raises(ValueError, match="has no rope_type"):
        config_from_dict({**SPEC, "rope_scaling": {"factor": 2.0}})


def test_unknown_key_and_family_are_named():
    with pytest.raises(ValueError, match=r"unknown llama config key\(s\) \['hidden'\]; valid keys:.*hidden_size"):
        config_from_dict({**SPEC, "hidden": 3})
    with pytest.raises(ValueError, match=r"model family 'mamba' is unknown; known: \['bert', 'gpt2', 'llama'\]"):
        config_from_dict({**SPEC, "family": "mamba"})


def test_orbax_and_hf_sources_load_the_same_model(tmp_path):
    model = build_model(SPEC, seed=3)
    orbax_io.save_model(model, tmp_path / "orbax")
    to_hf(model, tmp_path / "hf")
    ids = jnp.array([[1, 2, 3, 4, 5]])
    for source in (tmp_path / "orbax", tmp_path / "hf"):
        loaded = load_model(source)
        a, b = flat_params(model), flat_params(loaded)
        assert all(np.array_equal(np.asarray(a[k]), np.asarray(b[k])) for k in a), source
        np.testing.assert_array_equal(np.asarray(loaded(ids)), np.asarray(model(ids)))


def test_bad_sources(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing': the path does not exist"):
        load_model(tmp_path / "nothing")
    with pytest.raises(FileNotFoundError, match="looks like a Hugging Face Hub id .* not supported here"):
        load_model("HuggingFaceTB/SmolLM2-135M-Instruct")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="empty': it is not a packaged model name"):
        load_model(tmp_path / "empty")
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    (tmp_path / "run" / "config.json").write_text("{}")  # a training workdir's config, not an HF config
    with pytest.raises(FileNotFoundError, match="training workdir without best/"):
        load_model(tmp_path / "run")
    model = build_model(SPEC)
    orbax_io.save_model(model, tmp_path / "m")
    spec = json.loads((tmp_path / "m" / orbax_io.MODEL_CONFIG).read_text())
    spec["hidden_size"] = 32
    (tmp_path / "m" / orbax_io.MODEL_CONFIG).write_text(json.dumps(spec))
    with pytest.raises(CheckpointError, match="cannot restore the parameters"):
        load_model(tmp_path / "m")
    with pytest.raises(FileExistsError):
        orbax_io.save_model(model, tmp_path / "m")


def test_a_training_workdir_loads_its_best_model(tmp_path):
    model = build_model(SPEC)
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    (tmp_path / "run" / "config.json").write_text("{}")
    orbax_io.save_model(model, tmp_path / "run" / "best")
    loaded = load_model(tmp_path / "run")
    for k, v in flat_params(model).items():
        np.testing.assert_array_equal(np.asarray(flat_params(loaded)[k]), np.asarray(v), err_msg=k)


def test_registry_names_are_case_insensitive():
    from configurable_fm.models import registry

    assert registry.canonical_name("SmolLM2-135M-Instruct") == "smollm2-135m-instruct"
    assert registry.canonical_name("nope", missing_ok=True) is None
    with pytest.raises(KeyError, match="known models"):
        registry.canonical_name("nope")

