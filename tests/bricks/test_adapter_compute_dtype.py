"""The adapter path's dtype (bricks/adapters/modules.adapter_compute_dtype): a Linear with an explicit compute dtype
(flax's `dtype`; what training in bfloat16 over float32 weights sets) runs s · (x A) B and DoRA's combination in it,
as PEFT does under torch.autocast; without one, float32 factors promote the path to float32 (PEFT without
autocast). DoRA's f = m / ||W + sAB|| stays float32 until f - 1 is formed, so a small learned change of m survives
a bfloat16 combination (bfloat16 cannot hold 1 + 1e-3)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configurable_fm.bricks.adapters.modules import DoRALinear, LoRALinear, adapter_compute_dtype
from configurable_fm.models.layers import Linear

IN, OUT, R = 32, 24, 4


def linear(dtype):
    return Linear(IN, OUT, axes=("embed", "mlp"), rngs=nnx.Rngs(0), param_dtype=jnp.float32, dtype=dtype)


def randomized(module, seed=1):
    ka, kb = jax.random.split(jax.random.key(seed))
    module.lora_a.set_value(0.3 * jax.random.normal(ka, (IN, R)))
    module.lora_b.set_value(0.3 * jax.random.normal(kb, (R, OUT)))
    return module


X = jax.random.normal(jax.random.key(2), (3, IN))


def test_the_rule():
    assert adapter_compute_dtype(jnp.bfloat16, jnp.bfloat16, jnp.float32) == jnp.bfloat16
    assert adapter_compute_dtype(None, jnp.bfloat16, jnp.float32) == jnp.float32
    assert adapter_compute_dtype(None, jnp.float32, jnp.float32) == jnp.float32


@pytest.mark.parametrize("dtype,expect", [(jnp.bfloat16, jnp.bfloat16), (None, jnp.float32)])
def test_lora_path_dtype(dtype, expect):
    m = randomized(LoRALinear(linear(dtype), rank=R, alpha=2 * R))
    lora_dots = [e for e in jax.make_jaxpr(m)(X.astype(jnp.bfloat16)).eqns if e.primitive.name == "dot_general"
                 and R in (e.invars[0].aval.shape[-1], e.invars[1].aval.shape[-1])]
    assert lora_dots and all(e.outvars[0].aval.dtype == expect for e in lora_dots)
    # the values: the same operations in that dtype
    x = X.astype(jnp.bfloat16)
    xd = x.astype(dtype or jnp.float32)  # no compute dtype: bf16 x and float32 kernel promote
    a, b = m.lora_a[...].astype(expect), m.lora_b[...].astype(expect)
    y = jnp.dot(xd, m.kernel[...].astype(xd.dtype))
    want = (y.astype(expect) + jnp.dot(jnp.dot(xd.astype(expect), a), b) * m.scale).astype(y.dtype)
    np.testing.assert_array_equal(np.asarray(m(x), np.float32), np.asarray(want, np.float32))


def test_dora_magnitude_change_is_not_rounded_in_bfloat16():
    """f = m / n = 1.02 with B = 0 (so n = ||W||): y = f ⊙ x W. In bfloat16, 1.02 rounds to 1.0234 (spacing 2^-7
    near 1), which would make f - 1 17 % too large; formed in float32, f - 1 = 0.02 to bfloat16's 0.4 %. Each output
    is still rounded to bfloat16, so the check is on the mean relative change over many outputs."""
    m = DoRALinear(linear(jnp.bfloat16), rank=R, alpha=2 * R)
    m.lora_magnitude.set_value(m.weight_norm() * 1.02)
    x = jax.random.normal(jax.random.key(3), (256, IN)).astype(jnp.bfloat16)
    y = np.asarray(jnp.dot(x, m.kernel[...].astype(jnp.bfloat16)), np.float32)
    out = np.asarray(m(x), np.float32)
    big = np.abs(y) > 0.1
    rel = (out[big] - y[big]) / y[big]
    assert abs(rel.mean() - 0.02) < 1.5e-3, rel.mean()  # bfloat16's f - 1 would give ~0.0234
