"""Keys for randomised merges: stable, order independent, distinct per (seed, path, model)."""
import hashlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configurable_fm.ops.merge import dare_linear, model_keys, random_mask, tensor_key


def data(key):
    return tuple(int(v) for v in np.asarray(jax.random.key_data(key)))


def test_pinned_values():
    # Fixed numbers: a change of the derivation would silently change every DARE/DELLA merge.
    assert data(tensor_key(0, "layers.0.mlp.down_proj.kernel")) == (1924379446, 2950428083)
    assert data(tensor_key(0, "layers.0.mlp.down_proj.kernel", 1)) == (2285339441, 3480385049)
    assert data(tensor_key(42, "embed.embedding")) == (881905492, 4258232384)
    # ... and they are blake2b-64 of "seed\0path" read as two little-endian uint32 words.
    digest = hashlib.blake2b(b"42\x00embed.embedding", digest_size=8).digest()
    assert data(tensor_key(42, "embed.embedding")) == tuple(int(v) for v in np.frombuffer(digest, "<u4"))


def test_order_independent_and_distinct():
    paths = [f"layers.{i}.{p}" for i in range(4) for p in ("attn.q", "attn.k", "mlp.up")]
    forward = {(p, m): data(tensor_key(7, p, m)) for p in paths for m in range(3)}
    backward = {(p, m): data(tensor_key(7, p, m)) for p in reversed(paths) for m in reversed(range(3))}
    assert forward == backward
    assert len(set(forward.values())) == len(forward)  # every (path, model) its own key
    assert data(tensor_key(8, paths[0], 0)) != forward[(paths[0], 0)]  # the seed matters
    assert data(tensor_key(7, paths[0])) not in set(forward.values())  # the path key differs from model keys


def test_model_keys_match_tensor_key_and_jit():
    key = tensor_key(3, "lm_head.kernel")
    ks = jax.jit(model_keys, static_argnums=1)(key, 4)
    for i in range(4):
        assert data(ks[i]) == data(tensor_key(3, "lm_head.kernel", i))
    # a raw uint32[2] key works as well and gives the same words
    raw = jax.random.key_data(key)
    assert np.array_equal(np.asarray(model_keys(raw, 2)), np.asarray(jax.random.key_data(ks[:2])))


def test_kernel_masks_come_from_model_keys():
    """dare_linear without rescale keeps x_i - b where the mask of fold_in(key, i) is set."""
    base = jnp.zeros(200)
    xs = jnp.stack([jnp.full(200, 1.0), jnp.full(200, 2.0)])
    key = tensor_key(5, "layers.1.mlp.down_proj.kernel")
    y = dare_linear(base, xs, key=key, weight=[1.0, 1.0], density=0.5, rescale=None)
    m0 = random_mask(tensor_key(5, "layers.1.mlp.down_proj.kernel", 0), 0.5, (200,))
    m1 = random_mask(tensor_key(5, "layers.1.mlp.down_proj.kernel", 1), 0.5, (200,))
    np.testing.assert_array_equal(np.asarray(y), np.asarray(m0 * 1.0 + m1 * 2.0))
    assert 0 < int(m0.sum()) < 200 and not np.array_equal(np.asarray(m0), np.asarray(m1))


@pytest.mark.parametrize(
    "args, match",
    [((1.5, "a"), "seed must be an int"), ((0, 3), "path must be a str"), ((0, "a", -1), "model_index"),
     ((0, "w.kernel", "m"), "model_index")],
)
def test_bad_arguments(args, match):
    with pytest.raises((TypeError, ValueError), match=match):
        tensor_key(*args)
