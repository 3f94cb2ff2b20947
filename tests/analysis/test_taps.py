"""Tap points, capture and interventions (configurable_fm.analysis): captured values against values computed by
hand from the parameters (llama, MoE, gpt2, bert), jit = eager, remat = no remat, interventions against the
equivalent weight edits or hand-run layers, patching between runs, a gradient through an added vector against
finite differences, and the errors."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configurable_fm.analysis import (
    TapError, add, capture, intervene, mask, patch_from, replace, tap_points)
from configurable_fm.bricks.paths import flat_params, with_params
from configurable_fm.models.layers import activation
from tests.analysis.tiny import BERT, GPT2, LLAMA, random_model

B, T = 2, 6


def np64(x):
    return np.asarray(x, np.float64)


@pytest.fixture(scope="module")
def llama():
    return random_model(LLAMA, 0)


@pytest.fixture(scope="module")
def ids():
    return jnp.asarray(np.random.RandomState(0).randint(0, 32, (B, T)), jnp.int32)


def silu(x):
    return x / (1 + np.exp(-x))


# ------------------------------------------------------------------------------------------ points and capture
def test_tap_points_lists_every_point_with_shapes_in_forward_order(llama, ids):
    points = tap_points(llama, ids)
    names = list(points)
    assert names[0] == "input" and names[-1] == "output" and points["output"].shape == (B, T, 32)
    assert points["layers.1.mlp.hidden"].shape == (B, T, 24)
    assert points["layers.0.self_attn.heads"].shape == (B, T, 2, 8)
    assert points["layers.2.self_attn.k_proj.output"].shape == (B, T, 8)
    assert points["embed_tokens.input"].dtype == jnp.int32
    assert names.index("layers.0.output") < names.index("layers.1.input") < names.index("layers.1.mlp.hidden")
    assert names.index("layers.1.mlp.hidden") == names.index("layers.1.mlp.down_proj.input") - 1
    # abstract inputs work too (nothing is computed)
    assert tap_points(llama, jax.ShapeDtypeStruct((1, 3), jnp.int32))["layers.2.output"].shape == (1, 3, 16)


def test_llama_captures_equal_the_hand_computation(llama, ids):
    logits, v = capture(llama, ["layers.*.mlp.*", "layers.*.input", "layers.*.output", "layers.0.self_attn.heads",
                                "layers.0.self_attn.output"], ids)
    np.testing.assert_array_equal(logits, llama(ids))  # capture does not change the forward
    p = {k: np64(a) for k, a in flat_params(llama).items()}
    for i in range(3):
        x = np64(v[f"layers.{i}.mlp.input"])
        hidden = silu(x @ p[f"layers.{i}.mlp.gate_proj.kernel"]) * (x @ p[f"layers.{i}.mlp.up_proj.kernel"])
        np.testing.assert_allclose(v[f"layers.{i}.mlp.hidden"], hidden, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(v[f"layers.{i}.mlp.output"], hidden @ p[f"layers.{i}.mlp.down_proj.kernel"],
                                   rtol=1e-5, atol=1e-6)
    for i in range(2):  # the residual stream after layer i is the input of layer i + 1
        np.testing.assert_array_equal(v[f"layers.{i}.output"], v[f"layers.{i + 1}.input"])
    heads = np64(v["layers.0.self_attn.heads"]).reshape(B, T, -1)
    np.testing.assert_allclose(v["layers.0.self_attn.output"], heads @ p["layers.0.self_attn.o_proj.kernel"],
                               rtol=1e-5, atol=1e-6)
    assert list(v)[:3] == ["layers.0.input", "layers.0.self_attn.heads", "layers.0.self_attn.output"]


def test_gpt2_and_bert_hidden_points():
    gpt2 = random_model(GPT2, 1)
    ids = jnp.asarray(np.random.RandomState(1).randint(0, 32, (B, T)), jnp.int32)
    _, v = capture(gpt2, ["h.*.mlp.input", "h.*.mlp.hidden", "h.*.input", "h.*.output", "h.0.attn.heads"], ids)
    p = {k: np64(a) for k, a in flat_params(gpt2).items()}
    gelu_tanh = activation("gelu_new")
    for i in range(2):
        pre = np64(v[f"h.{i}.mlp.input"]) @ p[f"h.{i}.mlp.c_fc.kernel"] + p[f"h.{i}.mlp.c_fc.bias"]
        np.testing.assert_allclose(v[f"h.{i}.mlp.hidden"], np64(gelu_tanh(jnp.asarray(pre))), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(v["h.0.output"], v["h.1.input"])
    assert v["h.0.attn.heads"].shape == (B, T, 2, 8)

    bert = random_model(BERT, 2)
    out, v = capture(bert, ["encoder.layer.*.intermediate.input", "encoder.layer.*.intermediate.hidden",
                            "encoder.layer.*.input", "encoder.layer.*.output", "output"], ids)
    p = {k: np64(a) for k, a in flat_params(bert).items()}
    for i in range(2):
        pre = (np64(v[f"encoder.layer.{i}.intermediate.input"]) @ p[f"encoder.layer.{i}.intermediate.dense.kernel"]
               + p[f"encoder.layer.{i}.intermediate.dense.bias"])
        np.testing.assert_allclose(v[f"encoder.layer.{i}.intermediate.hidden"],
                                   np64(activation("gelu")(jnp.asarray(pre))), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(v["encoder.layer.0.output"], v["encoder.layer.1.input"])
    np.testing.assert_array_equal(v["encoder.layer.1.output"], v["output"])
    np.testing.assert_array_equal(v["output"], out)


def test_moe_router_logits_and_expert_hidden(ids):
    moe = random_model({**LLAMA, "num_layers": 1, "num_experts": 4}, 3)
    _, v = capture(moe, ["layers.0.mlp.input", "layers.0.mlp.router_logits", "layers.0.mlp.hidden"], ids)
    p = {k: np64(a) for k, a in flat_params(moe).items()}
    x = np64(v["layers.0.mlp.input"])
    np.testing.assert_allclose(v["layers.0.mlp.router_logits"], x @ p["layers.0.mlp.router.kernel"], rtol=1e-5,
                               atol=1e-6)
    hidden = silu(np.einsum("btd,edf->btef", x, p["layers.0.mlp.experts.gate_proj"])) * np.einsum(
        "btd,edf->btef", x, p["layers.0.mlp.experts.up_proj"])
    np.testing.assert_allclose(v["layers.0.mlp.hidden"], hidden, rtol=1e-5, atol=1e-6)
    # router logits forced to (-1e9, -1e9, -1e9, 0): top-2 softmax gives expert 3 weight 1 (the other chosen
    # expert exp(-1e9) = 0), so the layer is expert 3's MLP
    forced = jnp.where(jnp.arange(4) == 3, 0.0, -1e9)
    _, w = capture(moe, "layers.0.mlp.output", ids,
                   interventions={"layers.0.mlp.router_logits": replace(jnp.broadcast_to(forced, (B, T, 4)))})
    np.testing.assert_allclose(w["layers.0.mlp.output"], hidden[:, :, 3] @ p["layers.0.mlp.experts.down_proj"][3],
                               rtol=1e-5, atol=1e-6)


def test_capture_under_jit_equals_eager_and_remat_equals_no_remat(llama, ids):
    points = ["layers.*.mlp.hidden", "layers.*.output"]
    logits, eager = capture(llama, points, ids)
    graphdef, state = nnx.split(llama)

    @jax.jit
    def jitted(state, ids):
        return capture(nnx.merge(graphdef, state), points, ids)

    jl, jv = jitted(state, ids)
    np.testing.assert_allclose(jl, logits, rtol=1e-6, atol=1e-6)
    assert list(jv) == list(eager)
    for k in eager:
        np.testing.assert_allclose(jv[k], eager[k], rtol=1e-6, atol=1e-6, err_msg=k)
    nl, nv = nnx.jit(lambda m, ids: capture(m, points, ids))(llama, ids)
    np.testing.assert_allclose(nv["layers.2.output"], eager["layers.2.output"], rtol=1e-6, atol=1e-6)

    remat = random_model(LLAMA, 0, remat="full")  # the same parameters, a per-layer jax.checkpoint
    rg, rs = nnx.split(remat)
    rl, rv = jax.jit(lambda s, ids: capture(nnx.merge(rg, s), points, ids))(rs, ids)
    for k in eager:
        np.testing.assert_allclose(rv[k], eager[k], rtol=1e-6, atol=1e-6, err_msg=k)
    # a gradient through an intervention on the remat model equals the one on the plain model
    v0 = jnp.full((16,), 0.1)

    def loss(v, graphdef, state):
        return jnp.sum(intervene(nnx.merge(graphdef, state), {"layers.1.output": add(v)}, ids) ** 2)

    g_remat, g_plain = jax.jit(lambda v: (jax.grad(loss)(v, rg, rs), jax.grad(loss)(v, graphdef, state)))(v0)
    np.testing.assert_allclose(g_remat, g_plain, rtol=1e-5, atol=1e-7)


# ------------------------------------------------------------------------------------------ interventions
def test_zeroing_hidden_neurons_equals_zeroing_down_proj_rows(llama, ids):
    neurons = [1, 5, 17]
    got = intervene(llama, {"layers.0.mlp.hidden": mask(neurons)}, ids)
    kernel = np.array(flat_params(llama)["layers.0.mlp.down_proj.kernel"])
    kernel[neurons] = 0.0
    edited = with_params(llama, {"layers.0.mlp.down_proj.kernel": jnp.asarray(kernel)})
    np.testing.assert_allclose(got, edited(ids), rtol=1e-5, atol=1e-6)
    assert not np.allclose(got, llama(ids))
    # a boolean mask and a traced index array do the same
    chosen = np.zeros(24, bool)
    chosen[neurons] = True
    np.testing.assert_allclose(intervene(llama, {"layers.0.mlp.hidden": mask(chosen)}, ids), got, rtol=1e-6)
    traced = jax.jit(lambda idx: intervene(llama, {"layers.0.mlp.hidden": mask(idx)}, ids))(jnp.asarray(neurons))
    np.testing.assert_allclose(traced, got, rtol=1e-5, atol=1e-6)


def test_adding_to_the_residual_stream_equals_running_the_rest_by_hand(llama, ids):
    v = jnp.asarray(np.random.RandomState(4).normal(size=16), jnp.float32)
    got = intervene(llama, {"layers.0.output": add(v)}, ids)
    _, c = capture(llama, "layers.0.output", ids)
    x = c["layers.0.output"] + v
    positions = jnp.broadcast_to(jnp.arange(T), (B, T))
    for layer in list(llama.layers)[1:]:
        x, _ = layer(x, positions, is_causal=True)
    np.testing.assert_allclose(got, llama.logits(llama.norm(x)), rtol=1e-5, atol=1e-6)
    # only at position 3: earlier positions of a causal model are unchanged, later ones change
    at3 = intervene(llama, {"layers.0.output": add(v, positions=3)}, ids)
    base = llama(ids)
    np.testing.assert_allclose(at3[:, :3], base[:, :3], rtol=1e-6, atol=1e-6)
    assert not np.allclose(at3[:, 3:], base[:, 3:])
    up_to_3 = intervene(llama, {"layers.0.output": add(v, positions=[0, 1, 2, 3])}, ids)
    np.testing.assert_allclose(up_to_3[:, :4], got[:, :4], rtol=1e-5, atol=1e-6)
    # an intervention on a module's input changes what it computes on
    doubled = intervene(llama, {"layers.2.mlp.down_proj.input": lambda h: 2 * h}, ids)
    doubled_by_hidden = intervene(llama, {"layers.2.mlp.hidden": lambda h: 2 * h}, ids)
    np.testing.assert_allclose(doubled, doubled_by_hidden, rtol=1e-6, atol=1e-6)


def test_patching_from_another_run(llama, ids):
    other = jnp.asarray(np.random.RandomState(5).randint(0, 32, (B, T)), jnp.int32)
    clean_logits, clean = capture(llama, "layers.*.output", other)
    # the whole residual stream after layer 0 from the other run: the rest of the forward is the other run's
    patched = intervene(llama, {"layers.0.output": patch_from(clean)}, ids)
    np.testing.assert_allclose(patched, clean_logits, rtol=1e-5, atol=1e-6)
    # one position, chosen per row by a boolean mask (causal tracing): positions before it are untouched
    where = jnp.arange(T)[None, :] == jnp.asarray([2, 4])[:, None]
    base_logits, base = capture(llama, "layers.1.output", ids)
    # capture and intervene in one forward: the captured point holds the patched value
    one, v = capture(llama, "layers.1.output", ids,
                     interventions={"layers.1.output": patch_from(clean, positions=where)})
    got, want = np.asarray(v["layers.1.output"]), np.where(where[..., None], clean["layers.1.output"],
                                                           base["layers.1.output"])
    np.testing.assert_array_equal(got, want)
    np.testing.assert_allclose(one[0, :2], base_logits[0, :2], rtol=1e-6, atol=1e-6)  # causal: before the patch
    np.testing.assert_allclose(one[1, :4], base_logits[1, :4], rtol=1e-6, atol=1e-6)
    assert not np.allclose(one[0, 2:], base_logits[0, 2:])


def test_gradient_through_an_added_vector_matches_finite_differences(llama, ids):
    targets = jnp.roll(ids, -1, axis=1)

    def loss(v):
        logits = intervene(llama, {"layers.1.mlp.output": add(v, positions=-1)}, ids)
        logp = jax.nn.log_softmax(logits[:, -1].astype(jnp.float32))
        return -jnp.mean(jnp.take_along_axis(logp, targets[:, -1:], axis=-1))

    v0 = jnp.asarray(np.random.RandomState(6).normal(size=16), jnp.float32)
    g = jax.jit(jax.grad(loss))(v0)
    direction = jnp.asarray(np.random.RandomState(7).normal(size=16), jnp.float32)
    eps = 1e-2
    fd = (loss(v0 + eps * direction) - loss(v0 - eps * direction)) / (2 * eps)
    np.testing.assert_allclose(float(jnp.dot(g, direction)), float(fd), rtol=2e-3, atol=1e-5)
    assert float(jnp.linalg.norm(g)) > 0


# ------------------------------------------------------------------------------------------ errors
def test_errors_name_the_point(llama, ids):
    with pytest.raises(TapError, match=r"pattern 'layers.\*.mlp.hiden' matches no tap point.*'layers.\*.mlp.hidden'"):
        capture(llama, "layers.*.mlp.hiden", ids)
    with pytest.raises(TapError, match=r"intervene \(intervention\): pattern 'layers.9.output' matches no tap point"):
        intervene(llama, {"layers.9.output": add(jnp.ones(16))}, ids)
    with pytest.raises(TapError, match=r"mask: neurons \[30\] are outside the last axis \(24\) of layers.0.mlp.hidden"):
        intervene(llama, {"layers.0.mlp.hidden": mask([30])}, ids)
    with pytest.raises(TapError, match=r"add: a vector of shape \(24,\) does not broadcast into layers.0.output "
                                       r"\(2, 6, 16\)"):
        intervene(llama, {"layers.0.output": add(jnp.ones(24))}, ids)
    with pytest.raises(TapError, match="patch_from: layers.1.output was not captured"):
        intervene(llama, {"layers.1.output": patch_from({"layers.0.output": jnp.zeros((B, T, 16))})}, ids)
    with pytest.raises(TapError, match=r"positions \[7\] are outside the 6 tokens of layers.0.output"):
        intervene(llama, {"layers.0.output": add(jnp.ones(16), positions=7)}, ids)
    with pytest.raises(TapError, match=r"intervention at layers.0.output returned \(2, 6, 8\)"):
        intervene(llama, {"layers.0.output": lambda x: x[..., :8]}, ids)
    with pytest.raises(TapError, match="layers.0.output is computed twice in one forward"):
        capture(llama, "layers.0.output", lambda m: (m(ids), m(ids)))
    with pytest.raises(RuntimeError, match="cannot be nested"):
        intervene(llama, {"layers.0.output": add(jnp.ones(16))}, lambda m: capture(m, "layers.0.output", ids))
    with pytest.raises(TypeError, match="token ids"):
        capture(llama, "output", "not ids")


def test_two_dimensional_integer_positions_are_refused():
    # an (B, 1) integer array (one position per row) was flattened into positions {1, 2} of every row
    x = jnp.zeros((2, 4, 3))
    per_row = np.array([[1], [2]])
    for positions in (per_row, [[1], [2]]):
        with pytest.raises(TapError, match=r"1-D list of token indices .* got shape \(2, 1\)"):
            replace(1.0, positions=positions).apply(x, "p")
    with pytest.raises(TapError, match="1-D list of token indices"):
        jax.jit(lambda p: replace(1.0, positions=p).apply(x, "p"))(jnp.asarray(per_row))
    rows = np.arange(4)[None, :] == per_row  # the per-row choice, as a boolean mask
    np.testing.assert_array_equal(replace(1.0, positions=rows).apply(x, "p")[..., 0], rows.astype(np.float32))
    np.testing.assert_array_equal(replace(1.0, positions=np.array([1, 2])).apply(x, "p")[0, :, 0], [0, 1, 1, 0])
