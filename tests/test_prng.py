"""configurable_fm.prng: the key checks and per-path keys shared by growth and MoEfication."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configurable_fm.prng import as_key, numpy_generator, path_key


class Bad(ValueError):
    pass


def test_as_key_accepts_typed_keys_raw_data_and_int_seeds():
    typed = jax.random.key(7)
    assert as_key(typed, Bad, "op", "needs one") is typed
    raw = jax.random.key_data(typed)
    np.testing.assert_array_equal(jax.random.key_data(as_key(raw, Bad, "op", "x")), raw)
    for seed in (7, np.int64(7)):
        np.testing.assert_array_equal(jax.random.key_data(as_key(seed, Bad, "op", "x")), raw)


@pytest.mark.parametrize("key, message", [
    (None, r"^grow: noise needs a key$"),
    ("seven", r"^grow: key must be a PRNG key \(jax.random.key\(seed\)\), raw key data uint32\[2\] or an int seed; "
              r"got str$"),
    (True, r"got bool$"),
    (jnp.zeros(3, jnp.uint32), r"got \w+ \(3,\)$"),
    (jax.random.split(jax.random.key(0), 2), r"got \w+ \(2,\)$"),
])
def test_as_key_raises_the_callers_error_naming_what_was_given(key, message):
    with pytest.raises(Bad, match=message):
        as_key(key, Bad, "grow", "noise needs a key")


def test_path_key_depends_on_path_and_purpose_only():
    key = jax.random.key(0)
    k = path_key(key, "layers.0.mlp.up_proj.kernel", "noise")
    data = lambda x: np.asarray(jax.random.key_data(x))  # noqa: E731
    np.testing.assert_array_equal(data(k), data(path_key(jax.random.key(0), "layers.0.mlp.up_proj.kernel", "noise")))
    others = [path_key(key, "layers.1.mlp.up_proj.kernel", "noise"), path_key(key, "layers.0.mlp.up_proj.kernel"),
              path_key(jax.random.key(1), "layers.0.mlp.up_proj.kernel", "noise")]
    assert all(not np.array_equal(data(k), data(o)) for o in others)
    # the documented formula: fold_in(key, crc32(path + '/' + purpose))
    import zlib
    want = jax.random.fold_in(key, zlib.crc32(b"layers.0.mlp.up_proj.kernel/noise"))
    np.testing.assert_array_equal(data(k), data(want))


def test_numpy_generator_is_deterministic_in_the_key():
    a = numpy_generator(jax.random.key(3)).standard_normal(5)
    np.testing.assert_array_equal(a, numpy_generator(jax.random.key(3)).standard_normal(5))
    assert not np.array_equal(a, numpy_generator(jax.random.key(4)).standard_normal(5))
