"""BERT family: float32 parity with transformers' BertModel (padding masks, token types, pooler), mean pooling,
HF round trips, BertFor* checkpoints, bad input.

Reference: transformers (torch, CPU, float32) on tiny random models built here; sentence-transformers' mean
pooling written out in torch. Tolerance: max |diff| <= 1e-4 (non-padded positions only); round trips bit-exact.
"""
import json

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from safetensors.numpy import load_file  # noqa: E402

from tests.helpers import assert_params_equal, hf_dir_with_config_change
from configurable_fm.bricks.paths import flat_params, flat_state  # noqa: E402
from configurable_fm.interop.hf import from_hf, to_hf  # noqa: E402
from configurable_fm.models.bert import Bert, BertConfig, mean_pool, sentence_embedding  # noqa: E402

VOCAB = 99
BASE = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
            max_position_embeddings=40, type_vocab_size=2)


def randomize_(model):
    """Every weight random (LayerNorm gains near 1): zero biases or unit gains would hide mapping errors."""
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(1.0 if "LayerNorm.weight" in name else 0.0, 0.2)
    return model.eval()


def hf_bert(tmp_path, cls=None, name="hf", **overrides):
    torch.manual_seed(0)
    cls = cls or transformers.BertModel
    model = randomize_(cls(transformers.BertConfig(**{**BASE, **overrides})))
    path = tmp_path / name
    model.save_pretrained(path)
    return model, path


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return hf_bert(tmp_path_factory.mktemp("bert"))


def batch(seed=0):
    rng = np.random.RandomState(seed)
    ids = rng.randint(1, VOCAB, (3, 9))
    mask = np.ones((3, 9), np.int64)
    mask[1, 5:] = 0
    mask[2, 2:] = 0
    types = np.zeros((3, 9), np.int64)
    types[:, 4:] = 1
    return ids, mask, types


def hf_out(model, ids, mask=None, types=None):
    t = lambda a: None if a is None else torch.tensor(a)  # noqa: E731
    with torch.no_grad():
        return model(t(ids), attention_mask=t(mask), token_type_ids=t(types))


@pytest.mark.parametrize("overrides", [{}, dict(hidden_act="gelu_new", layer_norm_eps=1e-5, type_vocab_size=3)])
def test_hidden_states_and_pooler_match_transformers(tmp_path, overrides):
    hf, path = hf_bert(tmp_path, **overrides)
    model = from_hf(path)
    assert isinstance(model, Bert) and model.pooler is not None
    ids, mask, types = batch()
    ref = hf_out(hf, ids, mask, types)
    ours = np.asarray(model(jnp.asarray(ids), attention_mask=jnp.asarray(mask), token_type_ids=jnp.asarray(types)))
    assert ours.shape == (3, 9, 32) and np.isfinite(ours).all()
    keep = mask.astype(bool)
    assert np.abs(ours - ref.last_hidden_state.numpy())[keep].max() <= 1e-4
    pooled = np.asarray(model.pooled(jnp.asarray(ids), attention_mask=jnp.asarray(mask),
                                     token_type_ids=jnp.asarray(types)))
    assert np.abs(pooled - ref.pooler_output.numpy()).max() <= 1e-4
    # Defaults: no mask, token types 0.
    ref0 = hf_out(hf, ids).last_hidden_state.numpy()
    assert np.abs(np.asarray(model(jnp.asarray(ids))) - ref0).max() <= 1e-4
    # Masking padding equals cutting it off; without the mask the real tokens' states change.
    alone = np.asarray(model(jnp.asarray(ids[1:2, :5]), token_type_ids=jnp.asarray(types[1:2, :5])))[0]
    assert np.abs(ours[1, :5] - alone).max() <= 1e-4
    unmasked = np.asarray(model(jnp.asarray(ids), token_type_ids=jnp.asarray(types)))[1, :5]
    assert np.abs(ours[1, :5] - unmasked).max() > 1e-3


def test_mean_pooling_matches_sentence_transformers_formula(tiny):
    hf, path = tiny
    model = from_hf(path)
    ids, mask, _ = batch(seed=1)
    h = hf_out(hf, ids, mask).last_hidden_state
    m = torch.tensor(mask).unsqueeze(-1).float()
    ref = (h * m).sum(1) / torch.clamp(m.sum(1), min=1e-9)  # sentence_transformers.models.Pooling, mean
    ours = np.asarray(sentence_embedding(model, jnp.asarray(ids), jnp.asarray(mask)))
    assert np.abs(ours - ref.numpy()).max() <= 1e-4
    unit = np.asarray(sentence_embedding(model, jnp.asarray(ids), jnp.asarray(mask), normalize=True))
    ref_unit = torch.nn.functional.normalize(ref, p=2, dim=1).numpy()
    assert np.abs(unit - ref_unit).max() <= 1e-5
    np.testing.assert_allclose(np.linalg.norm(unit, axis=-1), 1.0, atol=1e-6)
    # mean_pool by hand on small numbers: padding is excluded, an all-padding row gives zeros (no NaN).
    hid = jnp.arange(2 * 3 * 2, dtype=jnp.float32).reshape(2, 3, 2)
    got = np.asarray(mean_pool(hid, jnp.array([[1, 1, 0], [0, 0, 0]])))
    np.testing.assert_array_equal(got, [[1.0, 2.0], [0.0, 0.0]])


def test_parameter_paths_and_logical_axes(tiny):
    state = flat_state(from_hf(tiny[1]))
    axes = {k: v.get_metadata()["out_sharding"] for k, v in state.items()}
    p = "encoder.layer.1"
    assert axes["embeddings.word_embeddings.embedding"] == ("vocab", "embed")
    assert axes["embeddings.position_embeddings.embedding"] == (None, "embed")
    assert axes[f"{p}.attention.self.query.kernel"] == ("embed", "heads")
    assert axes[f"{p}.attention.output.dense.kernel"] == ("heads", "embed")
    assert axes[f"{p}.intermediate.dense.kernel"] == ("embed", "mlp")
    assert state[f"{p}.intermediate.dense.kernel"].shape == (32, 64)
    assert axes[f"{p}.output.dense.kernel"] == ("mlp", "embed")
    for name in ("embeddings.LayerNorm", f"{p}.attention.output.LayerNorm", f"{p}.output.LayerNorm"):
        assert f"{name}.weight" in state and f"{name}.bias" in state
    assert state["pooler.dense.kernel"].shape == (32, 32)
    assert all(len(a) == v.ndim for a, v in zip(axes.values(), state.values()))


def test_round_trip_is_exact_and_transformers_loads_it(tmp_path, tiny):
    hf, path = tiny
    model = from_hf(path)
    out = to_hf(model, tmp_path / "ours")
    again = from_hf(out)
    assert again.cfg == model.cfg
    assert_params_equal(model, again)
    reloaded, info = transformers.BertModel.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    ids, mask, types = batch(seed=2)
    r, o = hf_out(reloaded.eval(), ids, mask, types), hf_out(hf, ids, mask, types)
    assert torch.equal(r.last_hidden_state, o.last_hidden_state) and torch.equal(r.pooler_output, o.pooler_output)


def test_masked_lm_checkpoint_loads_its_encoder(tmp_path):
    """BertForMaskedLM: `bert.` prefix, a `cls.` head (skipped), no pooler; the encoder round-trips."""
    hf, path = hf_bert(tmp_path, cls=transformers.BertForMaskedLM)
    assert any(k.startswith("bert.") for k in load_file(path / "model.safetensors"))
    model = from_hf(path)
    assert model.pooler is None and not model.cfg.add_pooling_layer
    ids, mask, types = batch(seed=3)
    with torch.no_grad():
        ref = hf.bert(torch.tensor(ids), attention_mask=torch.tensor(mask),
                      token_type_ids=torch.tensor(types)).last_hidden_state.numpy()
    ours = np.asarray(model(jnp.asarray(ids), attention_mask=jnp.asarray(mask), token_type_ids=jnp.asarray(types)))
    assert np.abs(ours - ref)[mask.astype(bool)].max() <= 1e-4
    with pytest.raises(ValueError, match="no pooler"):
        model.pooled(jnp.asarray(ids))
    out = to_hf(model, tmp_path / "ours")
    assert json.loads((out / "config.json").read_text())["cfm_add_pooling_layer"] is False
    again = from_hf(out)
    assert again.pooler is None
    for k, v in flat_params(model).items():
        np.testing.assert_array_equal(np.asarray(v), np.asarray(flat_params(again)[k]), err_msg=k)
    reloaded, info = transformers.BertModel.from_pretrained(out, add_pooling_layer=False, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]


@pytest.mark.parametrize("key, value, needle", [
    ("position_embedding_type", "relative_key", "position_embedding_type='relative_key'"),
    ("is_decoder", True, "is_decoder"),
    ("add_cross_attention", True, "add_cross_attention"),
    ("hidden_act", "mish", "hidden_act='mish'"),
    ("embedding_size", 16, "embedding_size"),
])
def test_unsupported_config_is_refused(tmp_path, tiny, key, value, needle):
    bad = hf_dir_with_config_change(tiny[1], tmp_path / "bad", key, value)
    with pytest.raises(NotImplementedError, match=needle):
        from_hf(bad)


def test_bad_shapes_and_lengths_are_refused():
    with pytest.raises(ValueError, match="num_heads=5"):
        BertConfig(hidden_size=32, num_heads=5)
    cfg = BertConfig(vocab_size=10, hidden_size=8, num_layers=1, num_heads=2, intermediate_size=16,
                     max_position_embeddings=6)
    model = nnx.eval_shape(lambda: Bert(cfg, rngs=nnx.Rngs(0)))  # the check comes before any parameter is read
    with pytest.raises(ValueError, match="max_position_embeddings=6"):
        model(jnp.zeros((1, 7), jnp.int32))


def test_zero_heads_and_mismatched_input_shapes_are_refused():
    """num_heads=0 was a ZeroDivisionError; 1-D ids, or a mask / token types of another shape than the ids, ended
    in jax unpacking or broadcasting errors."""
    with pytest.raises(ValueError, match="num_heads must be >= 1, got 0"):
        BertConfig(hidden_size=32, num_heads=0)
    cfg = BertConfig(vocab_size=10, hidden_size=8, num_layers=1, num_heads=2, intermediate_size=16,
                     max_position_embeddings=6)
    model = nnx.eval_shape(lambda: Bert(cfg, rngs=nnx.Rngs(0)))  # the checks come before any parameter is read
    ids = jnp.zeros((2, 5), jnp.int32)
    with pytest.raises(ValueError, match=r"ids must have shape \(batch, length\), got \(5,\)"):
        model(ids[0])
    for name in ("attention_mask", "token_type_ids"):
        with pytest.raises(ValueError, match=rf"{name} must have the shape of the ids \(2, 5\), got \(2, 4\)"):
            model(ids, **{name: jnp.ones((2, 4), jnp.int32)})
