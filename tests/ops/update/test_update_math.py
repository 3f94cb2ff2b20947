"""The closed forms (ROME's rank-one insertion, MEMIT's least squares) on random matrices, edit sites and tap points,
the key second-moment statistics and their cache, subject location, and the batched value optimisation."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

from configurable_fm import analysis
from configurable_fm.bricks import deltas
from configurable_fm.bricks.deltas import Delta, Dense, LowRank
from configurable_fm.bricks.paths import flat_params, with_params
from configurable_fm.interop.safetensors_io import CheckpointError
from configurable_fm.ops.update import (Encoder, MEMITHparams, Request, SiteError, StatsError, ValueHparams,
                                        cached_second_moments, edit_site, load_stats, memit_spread, memit_update,
                                        optimize_values, rome_update, second_moments, upstream_fingerprint)
from configurable_fm.ops.update.stats import second_moment_of
from tests.analysis.tiny import GPT2, LLAMA, random_model

rs = np.random.RandomState(0)


def spd(f, n=400):
    """A random anisotropic second moment E[k k^T] of n keys."""
    k = rs.normal(size=(n, f)) * np.linspace(0.2, 3.0, f)
    return k.T @ k / n


# ------------------------------------------------------------------------------------------------ ROME
def test_rome_rank_one_constraint_and_c_orthogonal_keys():
    f, d = 24, 10
    w = rs.normal(size=(f, d)).astype(np.float32)
    b = rs.normal(size=(d,)).astype(np.float32)
    k, v, c = rs.normal(size=f), rs.normal(size=d) * 3, spd(f)
    term = rome_update(w, k, v, c, bias=b)
    assert isinstance(term, LowRank) and term.a.shape == (f, 1) and term.b.shape == (1, d)
    dw = np.asarray(term.materialize(), np.float64)
    assert np.linalg.norm(k @ (w + dw) + b - v) / np.linalg.norm(v) < 1e-5
    # the paper's form W_p + Lambda (C^-1 k)^T, Lambda = (v - W_p k - b) / ((C^-1 k)^T k), transposed
    ck = np.linalg.solve(c, k)
    paper = np.outer(v - (w.T.astype(np.float64) @ k + b), ck) / (ck @ k)
    np.testing.assert_allclose(dw, paper.T, rtol=1e-5, atol=1e-6)
    # keys orthogonal to k* in the C^-1 metric keep their values
    others = rs.normal(size=(5, f))
    others -= np.outer(others @ ck, ck) / (ck @ ck)  # now (C^-1 k*)^T k_i = 0
    np.testing.assert_allclose(others @ dw, 0, atol=1e-5)
    # applied to a float32 kernel through bricks.deltas: (W + dW)^T k* + b = v* to 1e-4 relative
    new = deltas.apply({"w": jnp.asarray(w)}, Delta({"w": term}))["w"]
    assert np.linalg.norm(k @ np.asarray(new, np.float64) + b - v) / np.linalg.norm(v) < 1e-4
    # without statistics C = I (u = k*): the constraint still holds
    dw_i = np.asarray(rome_update(w, k, v).materialize(), np.float64)
    np.testing.assert_allclose(k @ (w + dw_i), v, rtol=1e-4, atol=1e-4)


def test_rome_update_errors():
    with pytest.raises(ValueError, match="kernel is"):
        rome_update(np.zeros((4, 3)), np.ones(5), np.ones(3))
    with pytest.raises(StatsError, match="singular"):
        rome_update(np.zeros((4, 3)), np.ones(4), np.ones(3), np.zeros((4, 4)))


# ------------------------------------------------------------------------------------------------ MEMIT
def test_memit_normal_equations_and_exact_targets():
    f, d, e, lam = 32, 12, 5, 3.0
    keys, resid, c = rs.normal(size=(e, f)), rs.normal(size=(e, d)), spd(f)
    term = memit_update(keys, resid, c, lam)
    assert isinstance(term, LowRank) and term.rank == e
    dw = np.asarray(term.materialize(), np.float64)
    # normal equations of  min lam tr(dW^T C dW) + ||K dW - R||^2:  (lam C + K^T K) dW = K^T R
    lhs = (lam * c + keys.T @ keys) @ dw
    np.testing.assert_allclose(lhs, keys.T @ resid, rtol=1e-4, atol=1e-5)
    # the paper's orientation: dW_p = R_p K_p^T (lam C + K_p K_p^T)^-1 with R_p = R^T, K_p = K^T
    paper = resid.T @ keys @ np.linalg.inv(lam * c + keys.T @ keys)
    np.testing.assert_allclose(dw, paper.T, rtol=1e-4, atol=1e-6)
    # with a vanishing weight on the old keys the new targets are met exactly (E <= F)
    exact = np.asarray(memit_update(keys, resid, c, 1e-9).materialize(), np.float64)
    np.testing.assert_allclose(keys @ exact, resid, rtol=1e-3, atol=1e-4)
    # as many edits as make a dense matrix cheaper: Dense
    many = memit_update(rs.normal(size=(9, 8)), rs.normal(size=(9, 6)), np.eye(8), 1.0)
    assert isinstance(many, Dense) and many.shape == (8, 6)


# ------------------------------------------------------------------------------------------------ sites
@pytest.mark.parametrize("spec, kernel, key_point", [
    (LLAMA, "layers.1.mlp.down_proj.kernel", "layers.1.mlp.down_proj.input"),
    (GPT2, "h.1.mlp.c_proj.kernel", "h.1.mlp.c_proj.input"),
])
def test_sites_name_real_tap_points(spec, kernel, key_point):
    model = random_model(spec, 0)
    site = edit_site(model, 1)
    assert (site.kernel, site.key_point) == (kernel, key_point)
    points = analysis.tap_points(model, jnp.zeros((1, 4), jnp.int32))
    for p in (site.key_point, site.value_point, site.layer_output):
        assert p in points, p
    # the key is the MLP hidden activation (act(gate) * up for SwiGLU, gelu(c_fc) for gpt2)
    ids = jnp.asarray(rs.randint(0, 32, (2, 5)))
    hidden = f"{site.prefix}.mlp.hidden"
    a, b = jax.jit(lambda x: tuple(analysis.capture(model, [site.key_point, hidden], x)[1].values()))(ids)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    with pytest.raises(SiteError, match="not a layer"):
        edit_site(model, 7)


def test_moe_and_unknown_models_are_refused():
    moe = random_model(dict(LLAMA, num_experts=4, num_experts_per_tok=2), 0)
    with pytest.raises(SiteError, match="mixtures of experts"):
        edit_site(moe, 0)
    with pytest.raises(SiteError, match="supported layouts"):
        edit_site({"encoder.layer.0.output.dense.kernel": np.zeros((2, 2))}, 0)


def test_upstream_fingerprint_sees_upstream_changes_only():
    model = random_model(LLAMA, 0)
    site = edit_site(model, 1)
    fp = upstream_fingerprint(model, site)
    flat = flat_params(model)
    bump = lambda p: with_params(model, {p: flat[p] + 1.0})  # noqa: E731
    assert upstream_fingerprint(bump("layers.1.mlp.down_proj.kernel"), site) == fp  # the edited projection
    assert upstream_fingerprint(bump("layers.2.mlp.up_proj.kernel"), site) == fp  # downstream
    assert upstream_fingerprint(bump("norm.weight"), site) == fp
    assert upstream_fingerprint(bump("layers.1.mlp.up_proj.kernel"), site) != fp
    assert upstream_fingerprint(bump("layers.0.self_attn.q_proj.kernel"), site) != fp
    assert upstream_fingerprint(bump("embed_tokens.embedding"), site) != fp


# ------------------------------------------------------------------------------------------------ stats
def batches(n=3, b=2, t=6, seed=0):
    r = np.random.RandomState(seed)
    out = []
    for _ in range(n):
        am = np.ones((b, t), np.float32)
        am[0, t - 2:] = 0  # padding
        out.append({"inputs": r.randint(0, 32, (b, t)).astype(np.int32), "attention_mask": am})
    return out


def test_second_moments_match_a_direct_computation_and_the_token_budget():
    model = random_model(LLAMA, 0)
    bs = batches()
    keys = []
    point = "layers.1.mlp.down_proj.input"
    read = jax.jit(lambda ids: analysis.capture(model, point, ids)[1][point])
    for batch in bs:
        k = np.asarray(read(jnp.asarray(batch["inputs"])), np.float64)
        keys.append(k[batch["attention_mask"] > 0])
    keys = np.concatenate(keys)
    stats = second_moments(model, bs, [1, 2], corpus="random")
    assert sorted(stats) == [1, 2] and stats[1].tokens == len(keys) == 30
    np.testing.assert_allclose(stats[1].second_moment, keys.T @ keys / len(keys), rtol=1e-5, atol=1e-7)
    assert stats[1].second_moment.dtype == np.float32 and stats[1].point == "layers.1.mlp.down_proj.input"
    # a budget of 15 tokens takes the first 15 masked-in tokens, in order
    cut = second_moments(model, bs, [1], n_tokens=15)[1]
    assert cut.tokens == 15
    np.testing.assert_allclose(cut.second_moment, keys[:15].T @ keys[:15] / 15, rtol=1e-5, atol=1e-7)


def test_stats_cache_is_reused_and_invalidated_by_upstream_changes(tmp_path):
    model = random_model(GPT2, 0)
    calls = []

    def source():
        calls.append(1)
        return batches(n=2)

    first = cached_second_moments(model, source, [0, 1], corpus="rand/1", n_tokens=20, cache_dir=tmp_path)
    files = sorted(p.name for p in tmp_path.iterdir())
    assert len(files) == 2 and all(f.endswith(".safetensors") and "rand_1-20-" in f for f in files)
    again = cached_second_moments(model, source, [0, 1], corpus="rand/1", n_tokens=20, cache_dir=tmp_path)
    assert len(calls) == 1  # read back, nothing recomputed
    for l in (0, 1):
        np.testing.assert_array_equal(first[l].second_moment, again[l].second_moment)
        assert again[l].metadata() == first[l].metadata()
    # editing layer 1's projection leaves both layers' keys valid; editing layer 0's invalidates layer 1's only
    flat = flat_params(model)
    edited = with_params(model, {"h.1.mlp.c_proj.kernel": flat["h.1.mlp.c_proj.kernel"] * 2})
    cached_second_moments(edited, source, [0, 1], corpus="rand/1", n_tokens=20, cache_dir=tmp_path)
    assert len(calls) == 1
    changed = with_params(model, {"h.0.mlp.c_proj.kernel": flat["h.0.mlp.c_proj.kernel"] * 2})
    cached_second_moments(changed, source, [0, 1], corpus="rand/1", n_tokens=20, cache_dir=tmp_path)
    assert len(calls) == 2 and len(list(tmp_path.iterdir())) == 3
    # a run cut by max_batches (fewer tokens than asked) has its own file: neither reuses the other's
    cut = cached_second_moments(model, source, [0], corpus="rand/1", n_tokens=20, cache_dir=tmp_path, max_batches=1)
    assert len(calls) == 3 and cut[0].tokens < first[0].tokens
    assert cached_second_moments(model, source, [0], corpus="rand/1", n_tokens=20, cache_dir=tmp_path)[0].tokens == \
        first[0].tokens and len(calls) == 3
    # a corrupt file is named
    bad = tmp_path / files[0]
    bad.write_bytes(b"not safetensors")
    with pytest.raises(CheckpointError, match=files[0]):
        load_stats(bad)


def test_second_moment_of_checks_layer_and_size():
    model = random_model(LLAMA, 0)
    stats = second_moments(model, batches(), [1])
    assert second_moment_of(stats, 1, 24).dtype == np.float64
    assert second_moment_of(None, 1, 24) is None
    with pytest.raises(StatsError, match="no key statistics for layer 2"):
        second_moment_of(stats, 2, 24)
    with pytest.raises(StatsError, match="of layer 1 given for layer 0"):
        second_moment_of(stats[1], 0, 24)
    with pytest.raises(StatsError, match="are \\(24, 24\\); the keys have 10"):
        second_moment_of(stats, 1, 10)
    with pytest.raises(StatsError, match="another model"):
        second_moment_of(stats, 1, 24, fingerprint="0" * 64)


# ------------------------------------------------------------------------------------------------ keys and values
def char_tokenizer():
    chars = [chr(i) for i in range(32, 127)]
    t = Tokenizer(models.WordLevel({"<pad>": 0, "<unk>": 1} | {c: i + 2 for i, c in enumerate(chars)},
                                   unk_token="<unk>"))
    t.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    t.decoder = decoders.Fuse()
    return t


def test_subject_last_token():
    enc = Encoder(char_tokenizer(), bos_id=0)
    ids, last = enc.prompt("The home of {} is", "Ann")
    assert len(ids) == 1 + len("The home of Ann is") and last == len("The home of Ann")  # bos shifts by one
    assert enc.decode(ids[last:last + 1]) == "n"
    assert Encoder(char_tokenizer()).prompt("{} is", "Bo")[1] == 1


def test_batched_value_optimisation_does_not_mix_requests():
    """A request's values do not depend on the requests optimised with it (rows add their own request's delta,
    Adam acts element-wise), nor on its place in the batch or in a padded last chunk."""
    model = random_model(dict(LLAMA, vocab_size=100), 1)
    tok = char_tokenizer()
    reqs = [Request("{} lives in", "Ann", " X"), Request("The pet of {} is", "Bob", " cat"),
            Request("{} likes", "Cy", " tea"), Request("{} drinks", "Di", " milk")]
    hp = ValueHparams(v_num_grad_steps=6, batch_size=2, kl_prompts=("{} is a", "{} has"))
    point, templates = "layers.1.mlp.down_proj.output", ["{}", "Hi. {}"]
    a = optimize_values(model, tok, reqs[:3], point=point, templates=templates, hparams=hp)  # chunks [0 1] [2 pad]
    b = optimize_values(model, tok, [reqs[2], reqs[0]], point=point, templates=templates, hparams=hp)
    assert a.values.shape == (3, 16) and a.losses.shape == (6, 3)
    np.testing.assert_allclose(b.delta, a.delta[[2, 0]], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(b.init, a.init[[2, 0]], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(a.values, a.init + a.delta, rtol=1e-6)
    # the clamp: ||delta|| <= clamp_norm_factor ||v_init|| (hparams values are traced: no recompilation)
    tight = optimize_values(model, tok, reqs[1:3], point=point, templates=templates,
                            hparams=dataclasses.replace(hp, clamp_norm_factor=0.1))
    ratio = np.linalg.norm(tight.delta, axis=1) / np.linalg.norm(tight.init, axis=1)
    assert np.all(ratio <= 0.1 + 1e-5) and np.all(ratio > 0.09)


def test_value_init_is_read_at_the_bare_prompt_wherever_it_is_listed():
    """v_init (ROME's v, MEMIT's z before the delta) is the value at the bare prompt '{}' (the authors' first
    template), also when a context lists the bare prompt after a prefixed one: with no optimisation step (delta = 0)
    z = h_L and MEMIT's residuals, hence its update, are zero whatever the order of the context."""
    model = random_model(dict(LLAMA, vocab_size=100), 1)
    tok = char_tokenizer()
    reqs = [Request("The pet of {} is", "Bob", " cat"), Request("{} likes", "Cy", " tea")]
    point = "layers.1.output"
    first = optimize_values(model, tok, reqs, point=point, templates=["{}", "Hi. {}"],
                            hparams=ValueHparams(v_num_grad_steps=1))
    later = optimize_values(model, tok, reqs, point=point, templates=["Hi. {}", "{}"],
                            hparams=ValueHparams(v_num_grad_steps=1))
    np.testing.assert_allclose(later.init, first.init, rtol=1e-5, atol=1e-6)
    hp = MEMITHparams(context=(("Hi. {}",), ("{}",)), v_num_grad_steps=1)
    spread = memit_spread(model, tok, reqs, layers=[0, 1], hparams=hp, solve=lambda s, k, r: memit_update(k, r))
    for layer, resid in spread.residuals.items():
        np.testing.assert_allclose(resid, 0.0, atol=1e-5, err_msg=f"layer {layer}")
