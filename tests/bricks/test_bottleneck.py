"""Bottleneck (Houlsby / Pfeiffer) adapters (bricks/adapters/bottleneck.py) on tiny random llama, gpt2 and bert models.

Invariants: a fresh adapter (up-projection 0) leaves the outputs bit-identical in all three families (and on a
bf16 base); a nonzero adapter computes y + s·(act(y D + c) U + e) after the sublayer output and before the residual
add (checked against numpy); training only the adapter's parameters lowers the loss and leaves every base
parameter bit-identical; detach gives the base back; bricks and orbax checkpoints round-trip bit for bit. Refusals:
merge / as_delta / mix / combine (nonlinear), to_hf / to_peft, and bad selectors, each naming the paths.
"""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from configurable_fm.bricks import adapters, flat_params, with_params
from configurable_fm.bricks.paths import flat_state
from configurable_fm.models import check_consistent, extension_specs
from configurable_fm.models.bert import Bert, BertConfig
from configurable_fm.models.gpt2 import GPT2, GPT2Config
from configurable_fm.models.layers import Linear
from configurable_fm.models.llama import LlamaConfig
from configurable_fm.train.state import ModelParts
from tests.helpers import assert_params_equal, random_llama

CFG = LlamaConfig(vocab_size=61, hidden_size=24, intermediate_size=40, num_layers=2, num_heads=4, num_kv_heads=2,
                  max_position_embeddings=32)
IDS = jnp.asarray(np.random.RandomState(0).randint(0, 61, (2, 7)))


def numpy_init(build, seed=0):
    """`build(rngs)` with N(0, 0.05) parameters (N(1, 0.1) for norm weights) drawn by numpy, biases nonzero."""
    abstract = nnx.eval_shape(lambda: build(nnx.Rngs(0)))
    rs = np.random.RandomState(seed)
    return with_params(abstract, {k: jnp.asarray(rs.normal(1.0, 0.1, v.shape) if k.endswith(("LayerNorm.weight",
                                                 "ln_1.weight", "ln_2.weight", "ln_f.weight")) else
                                                 rs.normal(0.0, 0.05, v.shape), jnp.float32)
                                  for k, v in flat_state(abstract).items()})


@pytest.fixture(scope="module")
def llama():
    return random_llama(CFG, 0)


@pytest.fixture(scope="module")
def gpt2():
    return numpy_init(lambda rngs: GPT2(GPT2Config(vocab_size=61, n_positions=16, n_embd=24, n_layer=2, n_head=4),
                                        rngs=rngs))


@pytest.fixture(scope="module")
def bert():
    return numpy_init(lambda rngs: Bert(BertConfig(vocab_size=61, hidden_size=24, num_layers=2, num_heads=4,
                                                   intermediate_size=40), rngs=rngs))


@pytest.fixture(scope="module")
def random_bn(llama):
    """Houlsby adapters with every tensor nonzero (init='random') on the llama."""
    return adapters.attach_bottleneck(llama, "houlsby", size=4, init="random", seed=3)


def out(model):
    return np.asarray(model(IDS))


# ------------------------------------------------------------------------------------------ placement, no-op
@pytest.mark.parametrize("family, preset, where", [
    ("llama", "houlsby", ["layers.{i}.mlp.down_proj", "layers.{i}.self_attn.o_proj"]),
    pytest.param("llama", "pfeiffer", ["layers.{i}.mlp.down_proj"], marks=pytest.mark.slow),
    ("gpt2", "houlsby", ["h.{i}.attn.c_proj", "h.{i}.mlp.c_proj"]),
    ("bert", "houlsby", ["encoder.layer.{i}.attention.output.dense", "encoder.layer.{i}.output.dense"]),
    pytest.param("bert", "pfeiffer", ["encoder.layer.{i}.output.dense"], marks=pytest.mark.slow),
])
def test_a_fresh_adapter_is_exactly_the_identity(request, family, preset, where):
    base = request.getfixturevalue(family)
    m = adapters.attach_bottleneck(base, preset, reduction_factor=4)
    assert sorted(adapters.adapters(m)) == sorted(w.format(i=i) for i in range(2) for w in where)
    info = next(iter(adapters.adapters(m).values()))
    assert info == {"kind": "bottleneck", "size": 24 // 4, "non_linearity": adapters.bottleneck.PRESETS[preset][
        "non_linearity"], "scaling": 1.0, "merged": False}
    check_consistent(m, "test")
    np.testing.assert_array_equal(out(m), out(base))  # bit for bit: U = 0, e = 0
    state = adapters.adapter_state(m)
    assert len(state) == 4 * len(where) * 2 and all(not np.any(v) for k, v in state.items() if "adapter_up" in k)
    assert all(np.any(v) for k, v in state.items() if k.endswith("adapter_down"))  # D is not zero: U gets gradients
    assert_params_equal(adapters.detach(m), base)


@pytest.mark.slow
def test_bf16_base_keeps_float32_adapters_and_is_unchanged(llama):
    base = with_params(llama, {k: v.astype(jnp.bfloat16) for k, v in flat_params(llama).items()})
    m = adapters.attach_bottleneck(base, "houlsby", size=3)
    assert {v.dtype for v in adapters.adapter_state(m).values()} == {jnp.dtype(jnp.float32)}
    assert m.layers[0].mlp.down_proj.kernel[...].dtype == jnp.bfloat16
    np.testing.assert_array_equal(out(m), out(base))


def test_module_forward_by_hand_with_numpy(gpt2):
    """One adapted Linear (gpt2's h.1.mlp.c_proj, with a bias): y = x W + b, y' = y + s (act(y D + c) U + e)."""
    m = adapters.attach_bottleneck(gpt2, "h.1.mlp", size=5, non_linearity="gelu", scaling=0.5, init="random")
    assert list(adapters.adapters(m)) == ["h.1.mlp.c_proj"]
    mod = m.h[1].mlp.c_proj
    x = np.random.RandomState(1).normal(size=(2, 3, 96)).astype(np.float32)
    p = {k: np.asarray(v, np.float64) for k, v in flat_params(mod).items()}
    y = x.astype(np.float64) @ p["kernel"] + p["bias"]
    pre = y @ p["adapter_down"] + p["adapter_down_bias"]
    from scipy.special import erf
    z = 0.5 * pre * (1 + erf(pre / np.sqrt(2)))  # exact GELU
    want = y + 0.5 * (z @ p["adapter_up"] + p["adapter_up_bias"])
    assert p["adapter_down"].shape == (24, 5) and p["adapter_up"].shape == (5, 24)
    np.testing.assert_allclose(np.asarray(mod(jnp.asarray(x))), want, atol=2e-6, rtol=1e-5)


@pytest.mark.slow
def test_adapter_sits_before_the_residual_add(llama, random_bn):
    """Layer 0 of the adapted llama (Houlsby, swish): x1 = x + bn(o), out = x1 + bn(h), bn(y) = y + swish(y D + c)
    U + e, with o / h the base layer's attention / FFN outputs and bn computed in numpy."""
    base_layer, layer = llama.layers[0], random_bn.layers[0]
    x = jnp.asarray(np.random.RandomState(2).normal(size=(2, 5, 24)), jnp.float32)
    pos = jnp.broadcast_to(jnp.arange(5), (2, 5))
    p = {k: np.asarray(v, np.float64) for k, v in flat_params(layer).items()}
    swish = lambda v: v / (1 + np.exp(-v))

    def bn(h, where):
        return h + swish(h @ p[f"{where}.adapter_down"] + p[f"{where}.adapter_down_bias"]) @ p[
            f"{where}.adapter_up"] + p[f"{where}.adapter_up_bias"]

    o = np.asarray(base_layer.self_attn(base_layer.input_layernorm(x), pos, is_causal=True)[0], np.float64)
    x1 = np.asarray(x, np.float64) + bn(o, "self_attn.o_proj")
    h = np.asarray(base_layer.mlp(base_layer.post_attention_layernorm(jnp.asarray(x1, jnp.float32))), np.float64)
    want = x1 + bn(h, "mlp.down_proj")
    got = np.asarray(layer(x, pos, is_causal=True)[0])
    assert np.abs(want - np.asarray(x1 + h)).max() > 1e-2  # the adapter matters
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_bert_adapter_is_inside_the_post_layernorm(bert):
    """bert: LN(residual + y + bn(y)) (AdapterHub's original_ln_after=True)."""
    m = adapters.attach_bottleneck(bert, "encoder.layer.0.output", size=4, non_linearity="relu", init="random")
    mod, base_out = m.encoder.layer[0].output, bert.encoder.layer[0].output
    rs = np.random.RandomState(4)
    x, res = (jnp.asarray(rs.normal(size=s), jnp.float32) for s in ((2, 3, 40), (2, 3, 24)))
    p = {k: np.asarray(v, np.float64) for k, v in flat_params(mod.dense).items()}
    y = np.asarray(base_out.dense(x), np.float64)
    y2 = y + np.maximum(y @ p["adapter_down"] + p["adapter_down_bias"], 0) @ p["adapter_up"] + p["adapter_up_bias"]
    want = np.asarray(base_out.LayerNorm(res + jnp.asarray(y2, jnp.float32)))
    np.testing.assert_allclose(np.asarray(mod(x, res)), want, atol=1e-5)


# ------------------------------------------------------------------------------------------ training
def test_training_only_the_adapter_lowers_the_loss_and_keeps_the_base(llama):
    # N(0, 0.2) weights: sublayer outputs that carry the tokens (at N(0, 0.02) they are ~0, and an adapter after
    # them can only learn a constant shift)
    llama = with_params(llama, {k: v if "norm" in k else 10 * v for k, v in flat_params(llama).items()})
    m = adapters.attach_bottleneck(llama, "houlsby", size=4, seed=1)
    parts = ModelParts.of(m, ("BottleneckParam:**",))
    assert list(parts.trainable) == list(adapters.adapter_state(m))  # the trainer's selector: the adapter only
    assert ModelParts.of(m, ("AdapterParam:**",)).trainable == parts.trainable
    trainable, frozen, other = parts.split(m)
    tx = optax.adam(3e-2)
    opt = tx.init(trainable)
    assert sum(x.size for x in jax.tree.leaves(opt)) == 2 * sum(v.size for v in trainable.values()) + 1  # mu, nu

    def loss_fn(tr):
        logits = parts.merge(tr, frozen, other)(IDS[:, :-1])
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), IDS[:, 1:, None], -1))

    @jax.jit
    def step(tr, opt):
        loss, g = jax.value_and_grad(loss_fn)(tr)
        updates, opt = tx.update(g, opt, tr)
        return optax.apply_updates(tr, updates), opt, loss

    losses = []
    for _ in range(15):
        trainable, opt, loss = step(trainable, opt)
        losses.append(float(loss))
    assert losses[-1] < 0.5 * losses[0], losses
    trained = parts.merge(trainable, frozen, other)
    assert np.any(np.asarray(adapters.adapter_state(trained)["layers.0.mlp.down_proj.adapter_up"]))
    assert_params_equal(adapters.detach(trained), llama)  # every base parameter bit-identical


# ------------------------------------------------------------------------------------------ bricks, checkpoints
def test_save_and_load_as_bricks(llama, random_bn, tmp_path):
    path = adapters.save_adapter(random_bn, tmp_path / "bn")
    bricks = adapters.adapter_bricks(random_bn)
    assert bricks["layers.0.mlp.down_proj"].kind == "bottleneck"
    assert bricks["layers.0.mlp.down_proj"].metadata == {"options": {"size": 4, "non_linearity": "swish",
                                                                     "scaling": 1.0}}
    loaded = adapters.load_adapter(llama, path)
    assert adapters.adapters(loaded) == adapters.adapters(random_bn)
    assert_params_equal(loaded, random_bn)
    with pytest.raises(adapters.AdapterError, match=r"the model has a BottleneckLinear, not a plain Linear at "
                                                    r"layers.0.mlp.down_proj"):
        adapters.load_adapter(random_bn, path)
    small = random_llama(LlamaConfig(vocab_size=61, hidden_size=16, intermediate_size=40, num_layers=1, num_heads=4,
                                     num_kv_heads=2, max_position_embeddings=32), 1)
    with pytest.raises(adapters.AdapterError, match=r"brick 'layers.0.mlp.down_proj': .*layers.0.mlp.down_proj/"
                                                    r"adapter_down is \(24, 4\) but the module needs \(16, 4\)"):
        adapters.load_adapter(small, path)


@pytest.mark.slow
def test_orbax_round_trip(random_bn, tmp_path):
    from configurable_fm.interop.orbax_io import load_model, save_model

    assert [s["kind"] for s in extension_specs(random_bn)] == ["bottleneck"] * 4
    restored = load_model(save_model(random_bn, tmp_path / "ckpt"))
    assert adapters.adapters(restored) == adapters.adapters(random_bn)
    assert_params_equal(restored, random_bn)
    np.testing.assert_array_equal(out(restored), out(random_bn))


def test_lora_and_bottleneck_together(llama, random_bn):
    both = adapters.attach(random_bn, "lora", "layers.*.self_attn.q_proj", rank=2, init="random")
    kinds = {p: a["kind"] for p, a in adapters.adapters(both).items()}
    assert kinds["layers.0.self_attn.q_proj"] == "lora" and kinds["layers.0.self_attn.o_proj"] == "bottleneck"
    assert_params_equal(adapters.detach(both), llama)  # both removed: the base, bit for bit
    with pytest.raises(adapters.AdapterError, match=r"merge: the adapter\(s\) at \['layers.0.mlp.down_proj "
                                                    r"\(bottleneck\)', 'layers.0.self_attn.o_proj \(bottleneck\)'.* "
                                                    r"are nonlinear"):
        adapters.merge(both)
    with pytest.raises(adapters.AdapterError, match=r"merge: .*layers.1.self_attn.o_proj \(bottleneck\)"):
        adapters.merge(both, keep=True)
    with pytest.raises(adapters.AdapterError, match=r"as_delta: the adapter\(s\) at .*layers.1.mlp.down_proj "
                                                    r"\(bottleneck\).* nonlinear"):
        adapters.as_delta(random_bn)
    with pytest.raises(adapters.AdapterError, match=r"adapter 0: .*layers.0.mlp.down_proj \(bottleneck\)"):
        adapters.mix(llama, [random_bn])
    with pytest.raises(adapters.AdapterError, match=r"input 0: .*layers.0.mlp.down_proj \(bottleneck\)"):
        adapters.combine([random_bn, random_bn], [0.5, 0.5], "cat")
    with pytest.raises(adapters.AdapterError, match=r"attach: bottleneck adapters .* use bricks.adapters."
                                                    r"attach_bottleneck"):
        adapters.attach(llama, "bottleneck", "layers.*.mlp")


def test_to_hf_and_to_peft_refuse_with_the_paths(random_bn, tmp_path):
    from configurable_fm.interop.hf import UnsupportedModel, to_hf

    with pytest.raises(UnsupportedModel, match=r"to_hf: .*extension module\(s\) at layers.0.mlp.down_proj "
                                               r"\(bottleneck\), layers.0.self_attn.o_proj \(bottleneck\)"):
        to_hf(random_bn, tmp_path / "hf")
    with pytest.raises(UnsupportedModel, match=r"to_peft: .*layers.0.mlp.down_proj \(bottleneck\)"):
        adapters.to_peft(random_bn, tmp_path / "peft")
    assert not (tmp_path / "hf").exists() and not (tmp_path / "peft").exists()


# ------------------------------------------------------------------------------------------ errors
@pytest.mark.parametrize("targets, kw, match", [
    ("layers.*.mpl", {}, r"\['layers.\*.mpl'\] match no module"),
    (["layers.0"], {}, r"layers.0 is a LlamaDecoderLayer: neither a plain Linear nor a sublayer with a known output "
                       r"projection \(LlamaAttention \(.o_proj\)"),
    ("layers.0.mlp.down_proj.kernel", {}, r"layers.0.mlp.down_proj.kernel is a Param: neither"),
    ([], {}, r"give a module path glob"),
    ("houlsby", {"size": 4, "reduction_factor": 4}, r"give size .* or reduction_factor .*, not both"),
    ("houlsby", {"size": 0}, r"size must be an int >= 1, got 0"),
    ("houlsby", {"reduction_factor": 0.5}, r"reduction_factor must be a number >= 1, got 0.5"),
    ("houlsby", {"non_linearity": "softplus"}, r"non_linearity='softplus' is not one of"),
    ("houlsby", {"init": "bert"}, r"init='bert' is not a bottleneck initialisation"),
])
def test_selector_and_option_errors(llama, targets, kw, match):
    with pytest.raises(adapters.AdapterError, match=match):
        adapters.attach_bottleneck(llama, targets, **kw)


def test_adapted_and_moe_targets_are_refused(llama, random_bn):
    lora = adapters.attach(llama, "lora", "layers.1.self_attn.o_proj", rank=2)
    with pytest.raises(adapters.AdapterError, match=r"1 target\(s\) cannot take a bottleneck adapter: "
                                                    r"layers.1.self_attn's output projection layers.1.self_attn."
                                                    r"o_proj already has a lora adapter"):
        adapters.attach_bottleneck(lora, "houlsby")
    with pytest.raises(adapters.AdapterError, match=r"layers.0.mlp.down_proj already has a bottleneck adapter"):
        adapters.attach_bottleneck(random_bn, "layers.0.mlp.down_proj")
    moe = random_llama(LlamaConfig(vocab_size=61, hidden_size=16, intermediate_size=16, num_layers=1, num_heads=2,
                                   num_kv_heads=1, num_experts=2, num_experts_per_tok=1), 0)
    with pytest.raises(adapters.AdapterError, match=r"layers.0.mlp is a SparseMoE: neither a plain Linear"):
        adapters.attach_bottleneck(moe, "pfeiffer")
    assert isinstance(moe.layers[0].self_attn.o_proj, Linear)
    assert list(adapters.adapters(adapters.attach_bottleneck(moe, "layers.*.self_attn", size=2))) == [
        "layers.0.self_attn.o_proj"]


def test_values_come_from_seed_and_path(llama):
    a = adapters.adapter_state(adapters.attach_bottleneck(llama, "houlsby", size=2, seed=5))
    b = adapters.adapter_state(adapters.attach_bottleneck(llama, "pfeiffer", size=2, seed=5))
    c = adapters.adapter_state(adapters.attach_bottleneck(llama, "pfeiffer", size=2, seed=6))
    key = "layers.1.mlp.down_proj.adapter_down"
    np.testing.assert_array_equal(a[key], b[key])  # independent of which other modules were adapted
    assert not np.array_equal(b[key], c[key])
    bound = 1 / np.sqrt(24)
    assert np.abs(a[key]).max() <= bound
