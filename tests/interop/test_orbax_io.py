"""Orbax model checkpoints round-trip every model the library builds (all variable types, MoE, extensions in
tests/models/test_structure.py), refuse inconsistent models before writing, and still read the older layout."""
import json

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configurable_fm.bricks import flat_params
from configurable_fm.interop import orbax_io
from configurable_fm.models.factory import build_model, config_to_dict
from configurable_fm.models.structure import variables_of

SPECS = {
    "llama": dict(family="llama", vocab_size=40, hidden_size=16, intermediate_size=24, num_layers=2, num_heads=4,
                  num_kv_heads=2),
    "llama_tied_biases": dict(family="llama", vocab_size=40, hidden_size=16, intermediate_size=24, num_layers=2,
                              num_heads=4, num_kv_heads=1, attention_bias=True, mlp_bias=True,
                              tie_word_embeddings=True),
    "llama_moe": dict(family="llama", vocab_size=40, hidden_size=16, intermediate_size=24, num_layers=2,
                      num_heads=4, num_kv_heads=2, num_experts=4, num_experts_per_tok=2),
    "gpt2": dict(family="gpt2", vocab_size=40, n_positions=32, n_embd=16, n_layer=2, n_head=4),
    "bert": dict(family="bert", vocab_size=40, hidden_size=16, num_layers=2, num_heads=4, intermediate_size=24,
                 max_position_embeddings=32),
}
IDS = jnp.array([[1, 5, 9, 2, 7, 3]], jnp.int32)
forward = nnx.jit(lambda model: model(IDS))  # one program per model structure, not one compilation per eager op


@pytest.mark.parametrize("name", sorted(SPECS))
def test_every_family_round_trips(name, tmp_path):
    model = build_model(SPECS[name], seed=4)
    path = orbax_io.save_model(model, tmp_path / "ckpt")
    assert json.loads((path / orbax_io.MODEL_CONFIG).read_text()) == config_to_dict(model.cfg)  # no extensions key
    assert not (path / orbax_io.VARIABLES_DIR).exists()  # parameters only: the layout the merge sources read
    loaded = orbax_io.load_model(path)
    assert loaded.cfg == model.cfg and type(loaded) is type(model)
    a, b = variables_of(model), variables_of(loaded)
    assert list(a) == list(b)
    for k in a:
        assert type(a[k]) is type(b[k])
        np.testing.assert_array_equal(np.asarray(a[k].get_value()), np.asarray(b[k].get_value()), err_msg=k)
    np.testing.assert_array_equal(np.asarray(forward(loaded)), np.asarray(forward(model)))


def test_checkpoints_in_the_older_layout_still_load(tmp_path):
    """model_config.json of plain config fields + params/ written directly, as before extensions existed."""
    model = build_model(SPECS["llama_moe"], seed=5)
    path = tmp_path / "old"
    path.mkdir()
    (path / orbax_io.MODEL_CONFIG).write_text(json.dumps(config_to_dict(model.cfg)))
    orbax_io.save_params(flat_params(model), path / orbax_io.PARAMS_DIR)
    np.testing.assert_array_equal(np.asarray(forward(orbax_io.load_model(path))), np.asarray(forward(model)))


def test_bad_extension_list_is_a_checkpoint_error(tmp_path):
    from configurable_fm.interop.safetensors_io import CheckpointError

    path = orbax_io.save_model(build_model(SPECS["llama"]), tmp_path / "ckpt")
    spec = json.loads((path / orbax_io.MODEL_CONFIG).read_text())
    (path / orbax_io.MODEL_CONFIG).write_text(json.dumps({**spec, "extensions": {"path": "x"}}))
    with pytest.raises(CheckpointError, match="'extensions' must be a list"):
        orbax_io.load_model(path)
    (path / orbax_io.MODEL_CONFIG).write_text(json.dumps(
        {**spec, "extensions": [{"path": "layers.0.mlp", "kind": "test_missing_kind", "options": {}}]}))
    with pytest.raises(CheckpointError, match="kind 'test_missing_kind', which is not registered"):
        orbax_io.load_model(path)
