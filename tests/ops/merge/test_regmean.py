"""RegMean (ops/merge/regmean.py): the merge of one linear layer against np.linalg.lstsq on the stacked inputs
(alpha = 1) and a hand-computed 2x2 case (alpha < 1), the Gram capture of a tiny llama against X^T X of its
RMS-normed embeddings computed here, the errors, and the config route (merge_from_config)."""
import jax.numpy as jnp
import numpy as np
import pytest

from configurable_fm.bricks.paths import flat_params
from configurable_fm.models.layers import Linear
from configurable_fm.interop.loader import load_model
from configurable_fm.models.llama import LlamaConfig
from configurable_fm.ops.merge.regmean import gram_matrices, linear_kernel_paths, regmean_merge
from configurable_fm.stages.merge import merge_config, merge_from_config
from configurable_fm.ops.merge.tree import MergeInputError
from configurable_fm.train.data import make_data
from tests.helpers import random_llama
from tests.ops.merge.test_fisher import route  # noqa: F401  (the config-route fixture: data config, 2 models)

CFG = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=24, num_layers=2, num_heads=2, num_kv_heads=1,
                  max_position_embeddings=32)


def layer(seed, d_in=4, d_out=3, n=6):
    """A flat single-linear-layer model {proj.kernel, proj.bias} and its inputs X (n, d_in)."""
    rs = np.random.RandomState(seed)
    return ({"proj.kernel": jnp.asarray(rs.normal(size=(d_in, d_out)), jnp.float32),
             "proj.bias": jnp.asarray(rs.normal(size=(d_out,)), jnp.float32)},
            rs.normal(size=(n, d_in)).astype(np.float32))


def test_alpha_one_is_least_squares_on_the_stacked_inputs():
    (m1, x1), (m2, x2), (m3, x3) = layer(0), layer(1, n=3), layer(2, n=9)
    models, xs, w = [m1, m2, m3], [x1, x2, x3], [1.0, 2.0, 0.5]
    grams = [{"proj.kernel": jnp.asarray(x.T @ x)} for x in xs]
    got = regmean_merge(models, grams, alpha=1.0, weights=w)
    # min_W sum_i w_i ||X_i W - X_i W_i||^2: rows sqrt(w_i) X_i, targets sqrt(w_i) X_i W_i
    a = np.concatenate([np.sqrt(wi) * x for wi, x in zip(w, xs)]).astype(np.float64)
    b = np.concatenate([np.sqrt(wi) * x @ np.asarray(m["proj.kernel"]) for wi, x, m in zip(w, xs, models)])
    expected = np.linalg.lstsq(a, b, rcond=None)[0]
    np.testing.assert_allclose(got["proj.kernel"], expected, rtol=1e-5, atol=1e-5)
    bias = sum(wi * np.asarray(m["proj.bias"]) for wi, m in zip(w, models)) / sum(w)
    np.testing.assert_allclose(got["proj.bias"], bias, rtol=1e-6, atol=1e-6)  # not a Linear kernel: averaged
    assert list(got) == list(m1) and all(v.dtype == jnp.float32 for v in got.values())


def test_alpha_below_one_by_hand():
    g1, g2 = np.array([[2.0, 1.0], [1.0, 2.0]]), np.array([[1.0, 0.0], [0.0, 3.0]])
    w1, w2 = np.array([[1.0], [0.0]]), np.array([[0.0], [1.0]])
    # alpha 0.5: G1' = [[2, .5], [.5, 2]], G2' = G2; A = [[3, .5], [.5, 5]], B = G1' W1 + G2' W2 = [[2], [3.5]]
    # W* = A^{-1} B = [[5, -.5], [-.5, 3]] / 14.75 @ [[2], [3.5]] = [[8.25], [9.5]] / 14.75
    got = regmean_merge([{"k": jnp.asarray(w1)}, {"k": jnp.asarray(w2)}],
                        [{"k": jnp.asarray(g1)}, {"k": jnp.asarray(g2)}], alpha=0.5)
    np.testing.assert_allclose(got["k"], np.array([[8.25], [9.5]]) / 14.75, rtol=1e-6)
    # alpha 0: only the diagonals: W*_j = sum_i G_i[j, j] W_i[j] / sum_i G_i[j, j] = [2/3, 3/5]
    got0 = regmean_merge([{"k": jnp.asarray(w1)}, {"k": jnp.asarray(w2)}],
                         [{"k": jnp.asarray(g1)}, {"k": jnp.asarray(g2)}], alpha=0.0)
    np.testing.assert_allclose(got0["k"], [[2 / 3], [3 / 5]], rtol=1e-6)


def test_a_feature_no_model_activates_keeps_the_average_row():
    (m1, x1), (m2, x2) = layer(0), layer(1)
    x1[:, 2] = x2[:, 2] = 0.0  # feature 2 never active: no constraint on row 2
    grams = [{"proj.kernel": jnp.asarray(x.T @ x)} for x in (x1, x2)]
    got = np.asarray(regmean_merge([m1, m2], grams, alpha=1.0)["proj.kernel"])
    np.testing.assert_allclose(got[2], (np.asarray(m1["proj.kernel"][2]) + np.asarray(m2["proj.kernel"][2])) / 2,
                               rtol=1e-6)
    keep = [0, 1, 3]
    a = np.concatenate([x1[:, keep], x2[:, keep]]).astype(np.float64)
    b = np.concatenate([x1 @ np.asarray(m1["proj.kernel"]), x2 @ np.asarray(m2["proj.kernel"])])
    np.testing.assert_allclose(got[keep], np.linalg.lstsq(a, b, rcond=None)[0], rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------ Gram capture
def rms_norm(x, weight, eps):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * weight


@pytest.fixture(scope="module")
def llama():
    return random_llama(CFG, 0)


def task_batch():
    """Task-like rows (B=3, L=6): scored answers end at positions 3, 5 and 2; the third row is padding."""
    rs = np.random.RandomState(1)
    loss_mask = np.zeros((3, 6), np.float32)
    loss_mask[0, 2:4] = loss_mask[1, 4:6] = loss_mask[2, 1:3] = 1.0
    return {"inputs": rs.randint(0, 32, (3, 6)).astype(np.int32), "targets": rs.randint(0, 32, (3, 6)),
            "loss_mask": loss_mask, "mask": np.array([1.0, 1.0, 0.0], np.float32)}


def test_gram_of_the_first_q_proj_is_xtx_of_the_normed_embeddings(llama):
    before = {k: np.asarray(v) for k, v in flat_params(llama).items()}
    batch = task_batch()
    packed = {"inputs": np.random.RandomState(2).randint(0, 32, (2, 6)).astype(np.int32),
              "targets": np.zeros((2, 6), np.int32)}  # no loss_mask: every position counts
    grams, n_tokens = gram_matrices(llama, [batch, packed], progress=False)

    p = flat_params(llama)
    emb = np.asarray(p["embed_tokens.embedding"], np.float64)
    normed = lambda ids: rms_norm(emb[ids], np.asarray(p["layers.0.input_layernorm.weight"]), CFG.rms_norm_eps)  # noqa
    mask = np.zeros((3, 6))
    mask[0, :4] = mask[1, :6] = 1.0  # positions up to the last scored one; the padding row excluded
    x = normed(batch["inputs"])[mask > 0]
    x = np.concatenate([x, normed(packed["inputs"]).reshape(-1, CFG.hidden_size)])
    expected = x.T @ x
    assert n_tokens == len(x) == 4 + 6 + 12
    np.testing.assert_allclose(grams["layers.0.self_attn.q_proj.kernel"], expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(grams["layers.0.self_attn.v_proj.kernel"], expected, rtol=1e-5, atol=1e-5)
    assert list(grams) == linear_kernel_paths(llama)
    assert sorted(grams) == sorted([f"layers.{i}.{m}.kernel" for i in range(2) for m in
                                    ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                                     "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")] + ["lm_head.kernel"])
    assert grams["layers.1.mlp.down_proj.kernel"].shape == (24, 24)
    # nothing left behind: the model's parameters and module classes are unchanged
    assert type(llama.layers[0].self_attn.q_proj) is Linear
    for k, v in flat_params(llama).items():
        np.testing.assert_array_equal(np.asarray(v), before[k])


def test_gram_of_every_down_proj_is_the_hand_computed_hidden_gram(llama):
    """G = sum_t m_t h_t h_t^T with h = silu(x W_gate) * (x W_up) computed here from each layer's captured MLP
    input x (analysis.capture), over a task batch (prompt + answer, padding row out) and an attention-masked one."""
    from configurable_fm.analysis import capture, token_mask

    attention = np.ones((3, 6), np.int32)
    attention[1, 3:] = 0
    masked = {"inputs": np.random.RandomState(3).randint(0, 32, (3, 6)).astype(np.int32),
              "targets": np.zeros((3, 6), np.int32), "attention_mask": attention}
    data = [task_batch(), masked]
    grams, n_tokens = gram_matrices(llama, data, progress=False)
    p = {k: np.asarray(v, np.float64) for k, v in flat_params(llama).items()}
    silu = lambda z: z / (1 + np.exp(-z))  # noqa: E731
    assert n_tokens == 4 + 6 + 6 + 3 + 6
    for i in range(CFG.num_layers):
        h = []
        for batch in data:
            _, v = capture(llama, f"layers.{i}.mlp.input", jnp.asarray(batch["inputs"]))
            x = np.asarray(v[f"layers.{i}.mlp.input"], np.float64)[token_mask(batch) > 0]
            h.append(silu(x @ p[f"layers.{i}.mlp.gate_proj.kernel"]) * (x @ p[f"layers.{i}.mlp.up_proj.kernel"]))
        h = np.concatenate(h)
        np.testing.assert_allclose(grams[f"layers.{i}.mlp.down_proj.kernel"], h.T @ h, rtol=1e-5, atol=1e-7)


def test_regmean_of_a_model_with_itself_and_tied_heads():
    tied = random_llama(LlamaConfig(**{**CFG.__dict__, "tie_word_embeddings": True, "num_layers": 1}), 3)
    other = random_llama(LlamaConfig(**{**CFG.__dict__, "tie_word_embeddings": True, "num_layers": 1}), 4)
    grams, _ = gram_matrices(tied, [task_batch()], progress=False)
    assert "lm_head.kernel" not in grams and len(grams) == 7  # a tied head is Embed.attend, not a Linear
    same = regmean_merge([tied, tied], [grams, grams])
    for k, v in flat_params(tied).items():
        np.testing.assert_allclose(same[k], v, rtol=1e-4, atol=1e-6, err_msg=k)
    g_other, _ = gram_matrices(other, [task_batch()], progress=False)
    merged = regmean_merge({"a": tied, "b": other}, [grams, g_other])
    avg = (np.asarray(flat_params(tied)["embed_tokens.embedding"]) +
           np.asarray(flat_params(other)["embed_tokens.embedding"])) / 2
    np.testing.assert_allclose(merged["embed_tokens.embedding"], avg, rtol=1e-6, atol=1e-7)


def test_regmean_errors_name_tensor_and_model(llama):
    (m1, x1), (m2, _) = layer(0), layer(1)
    g = {"proj.kernel": jnp.asarray(x1.T @ x1)}
    with pytest.raises(MergeInputError, match="the Grams of model_1 lack proj.kernel"):
        regmean_merge([m1, m2], [g, {}])
    with pytest.raises(MergeInputError, match=r"Gram proj.kernel of model_0 is \(3, 3\), expected \(4, 4\)"):
        regmean_merge([m1, m2], [{"proj.kernel": jnp.eye(3)}, g])
    with pytest.raises(MergeInputError, match=r"proj.bias has a Gram but is \(3,\)"):
        regmean_merge([m1, m2], [{**g, "proj.bias": jnp.eye(3)}, {**g, "proj.bias": jnp.eye(3)}])
    with pytest.raises(MergeInputError, match="Gram for nope.kernel, which is not a tensor"):
        regmean_merge([m1, m2], [{**g, "nope.kernel": jnp.eye(2)}, g])
    with pytest.raises(ValueError, match=r"alpha must be a number in \[0, 1\]"):
        regmean_merge([m1, m2], [g, g], alpha=1.5)
    with pytest.raises(np.linalg.LinAlgError, match="proj.kernel: the summed Gram matrix is singular"):
        x = np.ones((5, 4), np.float32)  # rank 1 with a positive diagonal
        regmean_merge([m1, m2], [{"proj.kernel": jnp.asarray(x.T @ x)}] * 2, alpha=1.0)
    # an nnx model's Linear kernels all need Grams
    grams, _ = gram_matrices(llama, [task_batch()], progress=False)
    partial = {k: v for k, v in grams.items() if k != "lm_head.kernel"}
    with pytest.raises(MergeInputError, match="the Grams of model_0 lack lm_head.kernel"):
        regmean_merge([llama, llama], [partial, grams])


# ------------------------------------------------------------------------------------------ config route
def test_config_route_equals_direct_regmean(route):  # noqa: F811
    data, paths = route
    cfg = merge_config("regmean", paths, parameters={"alpha": 0.5, "max_batches": 1},
                       model_parameters=[{"weight": 1.0}, {"weight": 3.0}], data=data)
    got = flat_params(merge_from_config(cfg))
    models = [load_model(p) for p in paths]
    d = make_data(data)
    grams = [gram_matrices(m, d.train_batches(), max_batches=1, progress=False)[0] for m in models]
    expected = regmean_merge(models, grams, alpha=0.5, weights=[1.0, 3.0])
    for k in expected:
        np.testing.assert_allclose(got[k], expected[k], rtol=1e-6, atol=1e-7, err_msg=k)
    a = flat_params(models[0])
    assert not all(np.allclose(v, a[k]) for k, v in got.items())
