"""Combining adapters (bricks/adapters/combine.py), checked against PEFT 0.21.2's add_weighted_adapter on tiny random
LlamaForCausalLM and GPT2LMHeadModel models (GPT-2's Conv1D: fan_in_fan_out) built in the test (tests/interop/
test_peft.py's helpers), and by hand.

Parity (float32): every deterministic combination (cat, linear, svd, ties, ties_svd, magnitude_prune,
magnitude_prune_svd, and the dare ones at density 1) gives PEFT's combined lora_A / lora_B at every module (factor
by factor: <= 1e-6, measured bit-identical but for linear's last bit, 6e-8; svd: up to the sign of each singular
pair, measured <= 6.4e-6 relative, products <= 2.3e-6 relative) and PEFT's logits (max |diff| <= 1e-5, 3e-5 for
the SVD combinations; measured <= 2e-6, and up to 1.01e-5 for GPT-2's svd combinations). rsLoRA inputs: PEFT's
factors, and PEFT's logits once its combined adapter has scale 1 (upstream's fix, huggingface/peft#3449). IA3:
PEFT's IA3 add_weighted_adapter (measured 6e-7). DARE at density 0.5 cannot draw torch's masks: the entries of the
result are checked to be the 4 possible subset sums, with frequencies close to 1/4, as PEFT's are. The exact path:
at full rank the merged weights are W + Σ w_i ΔW_i (<= 1e-6) with a truncation error ~2e-7; at rank 2 the reported
error is the SVD tail's; any mix of LoRA, DoRA and IA3; an ops.merge method through merge_deltas. Every error
message is checked.
"""
import contextlib
import copy
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")

from configurable_fm.bricks import adapters, deltas  # noqa: E402
from configurable_fm.bricks.adapters.combine import (COMBINATIONS, CombineReport, combine, combine_exact,  # noqa: E402
                                                     peft_merge)
from configurable_fm.bricks.adapters.modules import AdapterError  # noqa: E402
from configurable_fm.bricks.paths import flat_params  # noqa: E402
from configurable_fm.interop.peft import from_peft, linear_modules, to_peft  # noqa: E402
from configurable_fm.ops.merge import merge_deltas  # noqa: E402
from tests.helpers import marked_slow  # noqa: E402
from tests.interop import test_peft  # noqa: E402
from tests.interop.test_peft import hf_logits, ours  # noqa: E402

bases = test_peft.bases  # its module-scoped fixture
TOL = 1e-5
# An SVD combination's factors come from two float32 SVDs (torch's LAPACK, jax's), which agree to ~6e-6 relative
# (assert_same_factors); on GPT-2's logits that gives up to 1.01e-5 with XLA's default flags and 8.9e-6 with the
# suite's (magnitude_prune_svd; gpt2-svd 5.8-6.6e-6, every llama case <= 1.8e-6), so the SVD combinations' logits
# are held to 3e-5 and every other combination to TOL (measured <= 1.8e-6).
TOL_SVD = 3e-5
LLAMA = dict(target_modules=["q_proj", "v_proj", "down_proj"])
GPT2 = dict(target_modules=["c_attn", "attn.c_proj", "c_fc"], fan_in_fan_out=True)
# family -> {adapter name: LoraConfig keywords}; 'c' has another rank and rsLoRA, 'd' other targets.
ADAPTERS = {
    "llama": {"a": dict(r=4, lora_alpha=8, **LLAMA), "b": dict(r=4, lora_alpha=4, **LLAMA),
              "c": dict(r=2, lora_alpha=6, use_rslora=True, **LLAMA),
              "d": dict(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj"])},
    "gpt2": {"a": dict(r=4, lora_alpha=16, **GPT2), "b": dict(r=4, lora_alpha=8, **GPT2)},
}


@contextlib.contextmanager
def quiet():
    """PEFT's warnings (e.g. density >= 1: no pruning) silenced."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


@pytest.fixture(scope="module")
def pairs(bases, tmp_path_factory):
    """{family: (PEFT model holding every adapter of ADAPTERS[family], {name: our model with that adapter})}."""
    out = {}
    for family, configs in ADAPTERS.items():
        hf, base = bases[family]
        torch.manual_seed(3)
        names = list(configs)
        with quiet():
            pm = peft.get_peft_model(copy.deepcopy(hf), peft.LoraConfig(init_lora_weights=False,
                                                                         **configs[names[0]]), adapter_name=names[0])
            for name in names[1:]:
                pm.add_adapter(name, peft.LoraConfig(init_lora_weights=False, **configs[name]))
        pm.eval()
        root = tmp_path_factory.mktemp(f"combine_{family}")
        pm.save_pretrained(root)  # adapters other than 'default' go to root/<name>
        out[family] = (pm, {name: from_peft(base, root / name) for name in names})
    return out


def peft_combined(pm, inputs, weights, name, combination, **kw):
    """PEFT's add_weighted_adapter(inputs, weights, name), made the active adapter."""
    with quiet():
        pm.add_weighted_adapter(list(inputs), list(weights), name, combination_type=combination, **kw)
    pm.set_adapter(name)
    return pm


def peft_factors(pm, name) -> dict:
    """{PEFT module name: (lora_A (k, in), lora_B (out, k))} of adapter `name`."""
    return {n: (m.lora_A[name].weight.detach().numpy(), m.lora_B[name].weight.detach().numpy())
            for n, m in pm.base_model.model.named_modules() if hasattr(m, "lora_A") and name in m.lora_A}


def our_factors(model) -> dict:
    """{PEFT module name: (aᵀ, bᵀ)} of our combined adapter (PEFT's orientation); every scale must be 1."""
    names = {path: name for path, (name, _) in linear_modules(model).items()}
    out = {}
    for path, m in adapters.adapted_modules(model).items():
        assert m.scale == 1.0
        out[names[path]] = (np.asarray(m.lora_a[...]).T, np.asarray(m.lora_b[...]).T)
    return out


def assert_same_factors(theirs, mine, svd, tol=1e-6):
    assert sorted(theirs) == sorted(mine)
    for n, (a_t, b_t) in theirs.items():
        a, b = mine[n]
        assert a.shape == a_t.shape and b.shape == b_t.shape, n
        if svd:  # the sign of each singular pair is arbitrary in torch's LAPACK; singular vectors of close
            # singular values move by ~eps·||M|| / gap between two float32 SVDs: compare the product tightly
            s = np.sign(np.sum(a * a_t, axis=1))
            a, b = a * s[:, None], b * s[None, :]
            np.testing.assert_allclose(b @ a, b_t @ a_t, atol=1e-5 * np.abs(b_t @ a_t).max(), rtol=0, err_msg=n)
            tol = 5e-5 * max(1.0, np.abs(b_t).max())
        np.testing.assert_allclose(a, a_t, atol=tol, rtol=0, err_msg=n)
        np.testing.assert_allclose(b, b_t, atol=tol, rtol=0, err_msg=n)


W = (0.7, -0.4)
CASES = {  # id -> (family, adapter names, combination, options)
    "llama-cat": ("llama", "ab", "cat", {}),
    "llama-linear": ("llama", "ab", "linear", {}),
    "llama-svd": ("llama", "ab", "svd", {}),
    "llama-ties": ("llama", "ab", "ties", {"density": 0.5}),
    "llama-ties-frequency": ("llama", "ab", "ties", {"density": 0.3, "majority_sign_method": "frequency"}),
    "llama-magnitude_prune": ("llama", "ab", "magnitude_prune", {"density": 0.5}),
    "llama-ties_svd": ("llama", "ab", "ties_svd", {"density": 0.5}),
    "llama-magnitude_prune_svd": ("llama", "ab", "magnitude_prune_svd", {"density": 0.3}),
    "llama-dare_linear-d1": ("llama", "ab", "dare_linear", {"density": 1.0}),
    "llama-dare_ties-d1": ("llama", "ab", "dare_ties", {"density": 1.0, "majority_sign_method": "frequency"}),
    "llama-dare_linear_svd-d1": ("llama", "ab", "dare_linear_svd", {"density": 1.0}),
    "llama-dare_ties_svd-d1": ("llama", "ab", "dare_ties_svd", {"density": 1.0}),
    "llama-cat-ranks-4-2": ("llama", "ac", "cat", {}),
    "llama-svd-ranks-4-2": ("llama", "ac", "svd", {}),
    "llama-three-ties": ("llama", "abb", "ties", {"density": 0.6}),
    "gpt2-cat": ("gpt2", "ab", "cat", {}),
    "gpt2-svd": ("gpt2", "ab", "svd", {"svd_rank": 3}),
    "gpt2-ties": ("gpt2", "ab", "ties", {"density": 0.5}),
    "gpt2-magnitude_prune_svd": ("gpt2", "ab", "magnitude_prune_svd", {"density": 0.5}),
}


# CI time: repeats of a combination already checked against PEFT in CI are slow: ties by 'frequency' (its rule:
# test_peft_merge_by_hand), unequal input ranks (cat and svd: test_rslora_inputs_give_scale_one's inputs have ranks
# 2 and 4, factors and logits against PEFT's), magnitude_prune_svd on llama (gpt2-magnitude_prune_svd in CI)
SLOW_CASES = ("llama-ties-frequency", "llama-cat-ranks-4-2", "llama-svd-ranks-4-2", "llama-magnitude_prune_svd")


@pytest.mark.parametrize("case", marked_slow(CASES, SLOW_CASES))
def test_combine_matches_peft(case, bases, pairs):
    family, names, combination, options = CASES[case]
    hf, base = bases[family]
    pm, models = pairs[family]
    weights = W if len(names) == 2 else (0.5, 0.9, -0.3)
    mine = combine([models[n] for n in names], weights, combination, **options)
    peft_combined(pm, names, weights, case, combination, **options)
    assert_same_factors(peft_factors(pm, case), our_factors(mine), combination.endswith("svd"))
    want = hf_logits(pm)
    assert np.abs(want - hf_logits(hf)).max() > 100 * TOL  # the combined adapter matters
    assert np.abs(ours(mine) - want).max() <= (TOL_SVD if combination.endswith("svd") else TOL)
    if combination == "cat":  # merged into the base: PEFT's model too
        assert np.abs(ours(adapters.merge(mine)) - want).max() <= TOL


@pytest.mark.parametrize("combination", ["cat", "svd"])
def test_rslora_inputs_give_scale_one(combination, bases, pairs):
    """PEFT up to 0.21 copied use_rslora into the combined config (scale sqrt(R) instead of 1: huggingface/peft#3449;
    0.22.0 gives 1); ours has PEFT's factors and scale 1, i.e. PEFT's model once that scale is fixed."""
    pm, models = pairs["llama"]
    name = f"rs-{combination}"
    mine = combine([models["c"], models["a"]], W, combination)
    peft_combined(pm, "ca", W, name, combination)
    assert_same_factors(peft_factors(pm, name), our_factors(mine), combination == "svd")
    layers = [m for m in pm.modules() if hasattr(m, "lora_A") and name in m.lora_A]
    rank = 6 if combination == "cat" else 4
    inherited = tuple(int(x) for x in peft.__version__.split(".")[:2]) < (0, 22)  # PEFT's inherited rsLoRA scale
    assert all(m.scaling[name] == pytest.approx(np.sqrt(rank) if inherited else 1.0) for m in layers)
    for m in layers:
        m.scaling[name] = 1.0
    assert np.abs(ours(mine) - hf_logits(pm)).max() <= TOL


def test_cat_is_the_weighted_sum_and_linear_has_cross_terms(pairs):
    """By hand: cat's update is Σ w_i ΔW_i exactly; linear's is (Σ α_i a_i)(Σ β_j b_j) with the cross terms."""
    _, models = pairs["llama"]
    ma, mb = models["a"], models["b"]
    p = "layers.1.self_attn.v_proj"
    ia, ib = adapters.adapted_modules(ma)[p], adapters.adapted_modules(mb)[p]
    a1, b1, a2, b2 = (np.asarray(x[...], np.float64) for x in (ia.lora_a, ia.lora_b, ib.lora_a, ib.lora_b))
    s1, s2 = ia.scale, ib.scale
    want_sum = W[0] * s1 * a1 @ b1 + W[1] * s2 * a2 @ b2

    def change(model):
        m = adapters.adapted_modules(model)[p]
        assert m.scale == 1.0
        return np.asarray(m.lora_a[...], np.float64) @ np.asarray(m.lora_b[...], np.float64)

    cat = combine([ma, mb], W, "cat")
    assert adapters.adapters(cat)[p]["rank"] == 8
    np.testing.assert_allclose(change(cat), want_sum, atol=1e-6)
    c1, c2 = W[0] * s1, W[1] * s2
    al = [np.sign(c) * np.sqrt(abs(c)) for c in (c1, c2)]
    be = [np.sqrt(abs(c)) for c in (c1, c2)]
    want_linear = (al[0] * a1 + al[1] * a2) @ (be[0] * b1 + be[1] * b2)
    lin = change(combine([ma, mb], W, "linear"))
    np.testing.assert_allclose(lin, want_linear, atol=1e-6)
    assert np.abs(lin - want_sum).max() > 1e-2  # the cross terms a_i b_j: not the weighted sum


def test_one_adapter_is_combined_linearly(pairs):
    """PEFT's rule: one adapter is 'linear' whatever the combination; weight 1 gives the same function."""
    _, models = pairs["llama"]
    ma = models["a"]
    one = combine([ma], None, "ties", density=0.1)
    np.testing.assert_allclose(ours(one), ours(ma), atol=TOL)
    half = combine([ma], [0.5], "svd")
    want = deltas.scale(adapters.as_delta(ma), 0.5)
    got = adapters.as_delta(half)
    for k, term in want.items():
        np.testing.assert_allclose(got[k].materialize(), term.materialize(), atol=1e-6)


def test_ia3_is_peft_s_weighted_sum(bases, tmp_path):
    hf, base = bases["llama"]
    kw = dict(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"])
    torch.manual_seed(4)
    with quiet():
        pm = peft.get_peft_model(copy.deepcopy(hf), peft.IA3Config(init_ia3_weights=False, **kw), adapter_name="a")
        pm.add_adapter("b", peft.IA3Config(init_ia3_weights=False, **kw))
        with torch.no_grad():
            for n, p in pm.named_parameters():
                if "ia3_l" in n:
                    p.copy_(1.0 + 0.5 * torch.randn_like(p))
        pm.add_weighted_adapter(["a", "b"], list(W), "ab")
    pm.eval().set_adapter("ab")
    root = tmp_path / "ia3"
    pm.save_pretrained(root, selected_adapters=["a", "b"])
    models = [from_peft(base, root / n) for n in "ab"]
    mine = combine(models, W, "linear")
    state = adapters.adapter_state(mine)
    np.testing.assert_allclose(np.asarray(state["layers.0.mlp.down_proj.ia3_scale"]),
                               pm.base_model.model.model.layers[0].mlp.down_proj.ia3_l["ab"].detach().numpy()[0],
                               atol=1e-7)
    assert adapters.adapters(mine)["layers.1.mlp.down_proj"]["feedforward"]
    assert np.abs(ours(mine) - hf_logits(pm)).max() <= TOL
    with pytest.raises(AdapterError, match=r"IA3 adapters, which combine with 'linear' only"):
        combine(models, W, "cat")


# ------------------------------------------------------------------------------------------ DARE
def test_dare_draws_from_the_key_with_peft_s_statistics(pairs):
    """Every entry of a dare_linear factor is (m_1 α_1 x_1 + m_2 α_2 x_2) / d for masks m_i in {0, 1}: the four
    subsets, each with probability 1/4 at d = 0.5, in ours and in PEFT's (torch's draws)."""
    pm, models = pairs["llama"]
    ma, mb = models["a"], models["b"]
    key = jax.random.key(7)
    mine = combine([ma, mb], W, "dare_linear", density=0.5, key=key)
    again = combine([ma, mb], W, "dare_linear", density=0.5, key=key)
    other = combine([ma, mb], W, "dare_linear", density=0.5, key=jax.random.key(8))
    s_mine, s_again, s_other = (adapters.adapter_state(m) for m in (mine, again, other))
    for k in s_mine:
        np.testing.assert_array_equal(np.asarray(s_mine[k]), np.asarray(s_again[k]))
    assert any(not np.array_equal(np.asarray(s_mine[k]), np.asarray(s_other[k])) for k in s_mine)
    torch.manual_seed(0)
    peft_combined(pm, "ab", W, "dare-stats", "dare_linear", density=0.5)
    theirs = peft_factors(pm, "dare-stats")
    names = {path: name for path, (name, _) in linear_modules(ma).items()}

    def subset_frequencies(factors):
        counts = np.zeros(4)
        for path, m1 in adapters.adapted_modules(ma).items():
            m2 = adapters.adapted_modules(mb)[path]
            c = [w * m.scale for w, m in zip(W, (m1, m2))]
            al = [np.sign(ci) * np.sqrt(abs(ci)) for ci in c]
            x1, x2 = al[0] * np.asarray(m1.lora_a[...]).T, al[1] * np.asarray(m2.lora_a[...]).T
            got = factors[names[path]][0]
            options = np.stack([0 * x1, x1 / 0.5, x2 / 0.5, (x1 + x2) / 0.5])  # subsets {}, {1}, {2}, {1, 2}
            dist = np.abs(options - got[None])
            assert np.all(dist.min(axis=0) <= 1e-5 * (1 + np.abs(got))), path
            counts += np.bincount(dist.argmin(axis=0).ravel(), minlength=4)
        return counts / counts.sum()

    mine_f = subset_frequencies(our_factors(mine))
    theirs_f = subset_frequencies(theirs)
    np.testing.assert_allclose(mine_f, 0.25, atol=0.05)
    np.testing.assert_allclose(theirs_f, 0.25, atol=0.05)


# ------------------------------------------------------------------------------------------ peft_merge by hand
X1 = jnp.asarray([1.0, -2.0, 3.0, 0.5])
X2 = jnp.asarray([-3.0, 1.0, 1.0, 0.25])


@pytest.mark.parametrize("rule, options, want", [
    ("task_arithmetic", {}, [-5.0, 0.0, 5.0, 1.0]),
    # keeps 2 of 4 per tensor: x1 -> [0, -2, 3, 0], x2 -> [-3, 1, 0, 0] (the tie |1| = |1|: lower index)
    ("magnitude_prune", {"density": 0.5}, [-6.0, 0.0, 3.0, 0.0]),
    ("magnitude_prune", {"density": 0.2}, [0.0, 0.0, 0.0, 0.0]),  # int(0.2·4) = 0: PEFT keeps none
    ("ties", {"density": 1.0}, [-6.0, -2.0, 2.5, 0.5]),  # 'total': σ = sign of x1 + x2; mean over agreeing
    ("ties", {"density": 1.0, "majority_sign_method": "frequency"}, [1.0, 2.0, 2.5, 0.5]),  # sign counts tie: +
    ("dare_linear", {"density": 1.0}, [-5.0, 0.0, 5.0, 1.0]),
])
def test_peft_merge_by_hand(rule, options, want):
    np.testing.assert_allclose(np.asarray(peft_merge([X1, X2], [1.0, 2.0], rule, **options)), want, atol=1e-6)


def test_peft_merge_ties_edge_cases():
    # zero entries have no sign: they agree with nobody; a position where nobody agrees gives 0 (divisor >= 1)
    got = peft_merge([jnp.asarray([0.0, 2.0]), jnp.asarray([0.0, -2.0])], [1.0, 1.0], "ties", density=1.0)
    np.testing.assert_allclose(np.asarray(got), [0.0, 2.0])  # Σ = 0 elects +: only the first agrees
    # magnitude ties: the lower flat index is kept
    got = peft_merge([jnp.asarray([1.0, -1.0, 1.0, 0.5])], [1.0], "magnitude_prune", density=0.5)
    np.testing.assert_allclose(np.asarray(got), [1.0, -1.0, 0.0, 0.0])


def test_svd_clamp_is_torch_s_quantile(pairs):
    """svd_clamp q: h = torch.quantile(entries of both factors, q); both clamped to [−h, h]."""
    _, models = pairs["llama"]
    ab = [models["a"], models["b"]]
    free, clamped = combine(ab, W, "svd"), combine(ab, W, "svd", svd_clamp=0.9)
    for n, (a, b) in our_factors(free).items():
        h = torch.quantile(torch.cat([torch.tensor(b).flatten(), torch.tensor(a).flatten()]), 0.9).item()
        ca, cb = our_factors(clamped)[n]
        np.testing.assert_allclose(ca, np.clip(a, -h, h), atol=1e-6, err_msg=n)
        np.testing.assert_allclose(cb, np.clip(b, -h, h), atol=1e-6, err_msg=n)
        assert (np.abs(cb) < np.abs(b)).any()


# ------------------------------------------------------------------------------------------ the exact path
def test_exact_at_full_rank_is_the_weighted_sum(pairs):
    _, models = pairs["llama"]
    ma, mc = models["a"], models["c"]  # ranks 4 and 2, LoRA and rsLoRA
    base = adapters.detach(ma)
    mine, report = combine_exact([ma, mc], W)
    assert isinstance(report, CombineReport) and report.method == "task_arithmetic"
    assert set(report.rank.values()) == {6} and report.max_error < 1e-5
    want = deltas.apply(base, deltas.scale(adapters.as_delta(ma), W[0]) + deltas.scale(adapters.as_delta(mc), W[1]))
    got, exp = flat_params(adapters.merge(mine)), flat_params(want)
    for k in exp:
        np.testing.assert_allclose(np.asarray(got[k]), np.asarray(exp[k]), atol=1e-6, err_msg=k)
    np.testing.assert_allclose(ours(mine), ours(want), atol=TOL)
    lin, rep = combine_exact([ma, mc], W, method="linear")
    scaled = deltas.apply(base, deltas.scale(deltas.diff(base, want), 1 / sum(W)))
    np.testing.assert_allclose(ours(lin), ours(scaled), atol=TOL)
    assert rep.to_dict()["method"] == "linear" and rep.to_dict()["weights"] == list(W)


def test_exact_at_lower_rank_reports_the_svd_tail(pairs):
    _, models = pairs["llama"]
    ma, mb = models["a"], models["b"]
    mine, report = combine_exact([ma, mb], W, rank=2)
    p = "layers.0.self_attn.q_proj"
    ia, ib = adapters.adapted_modules(ma)[p], adapters.adapted_modules(mb)[p]
    dw = W[0] * np.asarray(ia.low_rank().materialize(), np.float64) + \
        W[1] * np.asarray(ib.low_rank().materialize(), np.float64)
    s = np.linalg.svd(dw, compute_uv=False)
    want = np.sqrt(np.sum(s[2:] ** 2) / np.sum(s ** 2))
    assert want > 0.1 and report.relative_error[p] == pytest.approx(want, rel=1e-4)
    assert report.rank[p] == 2 and report.norm[p] == pytest.approx(np.linalg.norm(dw), rel=1e-5)
    m = adapters.adapted_modules(mine)[p]
    residual = dw - np.asarray(m.lora_a[...], np.float64) @ np.asarray(m.lora_b[...], np.float64)
    assert np.linalg.norm(residual) / np.linalg.norm(dw) == pytest.approx(want, rel=1e-4)  # the best rank 2
    assert report.max_error == max(report.relative_error.values())


def test_exact_with_an_ops_merge_method(pairs):
    """merge=ops.merge.merge_deltas: the adapters' updates merged by mergekit's dare_linear (keys from the seed and
    the path), then re-factorised; 'linear' through the engine is the built-in one."""
    _, models = pairs["llama"]
    ab = [models["a"], models["b"]]
    options = dict(parameters={"density": 0.5}, seed=3)
    mine, report = combine_exact(ab, W, method="dare_linear", merge=merge_deltas, rank=32, **options)
    assert report.max_error < 1e-5
    want = merge_deltas("dare_linear", [adapters.as_delta(m) for m in ab], model_parameters=[{"weight": w} for w in W],
                        **options)
    got = adapters.as_delta(mine)
    for k, term in want.items():
        np.testing.assert_allclose(got[k].materialize(), term.materialize(), atol=1e-6, err_msg=k)
    native, _ = combine_exact(ab, W, method="linear")
    engine, _ = combine_exact(ab, W, method="linear", merge=merge_deltas)
    np.testing.assert_allclose(ours(engine), ours(native), atol=TOL)


def test_exact_combines_any_kinds_by_their_changes(bases, pairs):
    """DoRA, IA3 (feedforward, or output side without a bias) and LoRA: ΔW_i = merged_i − base, combined."""
    base = bases["llama"][1]
    dora = adapters.attach(base, "dora", "layers.*.mlp.down_proj", rank=2, init="random", seed=1)
    ia3 = adapters.attach(base, "ia3", "layers.*.mlp.down_proj", init="random", seed=2)
    lora = adapters.attach(base, "lora", "layers.*.mlp.down_proj", rank=3, init="random", seed=3)
    with pytest.raises(AdapterError, match=r"adapters of different kinds cannot be combined: input 0 is dora, "
                                           r"input 1 is ia3"):
        combine([dora, ia3], W, "linear")
    mine, report = combine_exact([dora, ia3, lora], (*W, 0.5))
    assert report.max_error < 1e-5 and set(report.rank.values()) == {32}  # min(in, out): a DoRA input is dense
    change = sum(w * deltas.diff(base, adapters.merge(m)) for w, m in zip((*W, 0.5), (dora, ia3, lora)))
    np.testing.assert_allclose(ours(mine), ours(deltas.apply(base, change)), atol=TOL)
    one, report = combine_exact([ia3], rank=3)  # an IA3 change as a rank-3 LoRA
    assert set(report.rank.values()) == {3} and 0 < report.max_error < 1
    gpt2 = bases["gpt2"][1]
    out_side = adapters.attach(gpt2, "ia3", "h.*.attn.c_attn", init="random")
    with pytest.raises(AdapterError, match=r"h.0.attn.c_attn \(input 0, ia3\).* also change the bias"):
        combine_exact([out_side])


# ------------------------------------------------------------------------------------------ using the result
def test_the_result_is_an_adapter_like_any_other(bases, pairs, tmp_path):
    hf, base = bases["gpt2"]
    _, models = pairs["gpt2"]
    mine = combine([models["a"], models["b"]], W, "cat")
    saved = adapters.load_adapter(base, adapters.save_adapter(mine, tmp_path / "brick"))
    np.testing.assert_array_equal(ours(saved), ours(mine))
    out = to_peft(mine, tmp_path / "peft")
    with quiet():
        loaded = peft.PeftModel.from_pretrained(copy.deepcopy(hf), out).eval()
    assert np.abs(hf_logits(loaded) - ours(mine)).max() <= TOL
    bricks = [adapters.adapter_bricks(models[n]) for n in "ab"]
    from_bricks = combine(bricks, W, "cat", base=base)
    np.testing.assert_array_equal(ours(from_bricks), ours(mine))


# ------------------------------------------------------------------------------------------ errors
def test_option_errors(pairs):
    _, models = pairs["llama"]
    ab = [models["a"], models["b"]]
    key = jax.random.key(0)
    cases = [
        (dict(combination="concat"), r"unknown combination 'concat'; the combinations are \['svd', 'linear'"),
        (dict(combination="cat", density=0.5), r"density applies to \['ties', .*\], not to 'cat'"),
        (dict(combination="ties"), r"'ties'\): needs density="),
        (dict(combination="ties", density=1.5), r"density must be a number in \[0.0, 1.0\], got 1.5"),
        (dict(combination="magnitude_prune", density=-0.1), r"density must be a number in \[0.0, 1.0\], got -0.1"),
        (dict(combination="dare_linear", density=0.0, key=key), r"density must be a number in \(0.0, 1.0\], got 0.0"),
        (dict(combination="ties", density="half"), r"density must be a number in \[0.0, 1.0\], got 'half'"),
        (dict(combination="dare_ties", density=0.5), r"DARE drops entries at random; pass key="),
        (dict(combination="ties", density=0.5, majority_sign_method="mean"),
         r"majority_sign_method must be one of \['total', 'frequency'\], got 'mean'"),
        (dict(combination="magnitude_prune", density=0.5, majority_sign_method="frequency"),
         r"majority_sign_method applies to \['ties', 'ties_svd', 'dare_ties', 'dare_ties_svd'\], not to "
         r"'magnitude_prune'"),
        (dict(combination="cat", svd_rank=4), r"svd_rank applies to \['svd', .*\], not to 'cat'"),
        (dict(combination="linear", svd_clamp=0.9), r"svd_clamp applies to .* not to 'linear'"),
        (dict(combination="svd", svd_rank=0), r"svd_rank must be an int >= 1, got 0"),
        (dict(combination="svd", svd_clamp=2.0), r"svd_clamp must be a number in \[0.0, 1.0\], got 2.0"),
        (dict(combination="svd", svd_rank=20),
         r"svd_rank=20 exceeds min\(in, out\) of layers.0.self_attn.v_proj \(32 -> 16\), layers.1.self_attn.v_proj "
         r"\(32 -> 16\); choose svd_rank <= 16"),
    ]
    for kw, match in cases:
        combination = kw.pop("combination")
        with pytest.raises(AdapterError, match=match):
            combine(ab, W, combination, **kw)


def test_input_errors(bases, pairs):
    hf, base = bases["llama"]
    _, models = pairs["llama"]
    ma, mb, mc, md = (models[n] for n in "abcd")
    with pytest.raises(AdapterError, match=r"3 weight\(s\) for 2 adapter\(s\); give one weight per adapter"):
        combine([ma, mb], [1.0, 1.0, 1.0], "cat")
    with pytest.raises(AdapterError, match=r"give one weight per adapter \(2 adapters, no weights\)"):
        combine([ma, mb], None, "cat")
    with pytest.raises(AdapterError, match=r"weights must be numbers, got \['x'\]"):
        combine([ma, mb], [1.0, "x"], "cat")
    with pytest.raises(AdapterError, match=r"give a non-empty list of adapted models"):
        combine([], None, "cat")
    with pytest.raises(AdapterError, match=r"give a non-empty list of adapted models"):
        combine(ma, None, "cat")
    with pytest.raises(AdapterError, match=r"input 1 is a dict; give models with adapters attached"):
        combine([ma, {"a": 1}], W, "cat")
    with pytest.raises(AdapterError, match=r"input 1 has no adapters"):
        combine([ma, base], W, "cat")
    with pytest.raises(AdapterError, match=r"input 0 is a brick set .*pass base="):
        combine([adapters.adapter_bricks(ma)], None, "cat")
    with pytest.raises(AdapterError, match=r"the adapters target different modules: input 1 adapts "
                                           r"layers.0.self_attn.k_proj, layers.1.self_attn.k_proj, which input 0 "
                                           r"does not; input 0 adapts layers.0.mlp.down_proj, "
                                           r"layers.0.self_attn.v_proj"):
        combine([ma, md], W, "cat")
    with pytest.raises(AdapterError, match=r"'linear'\): combines the factors entry by entry and needs equal ranks "
                                           r"at every module, but layers.0.mlp.down_proj has ranks \[4, 2\]"):
        combine([ma, mc], W, "linear")
    with pytest.raises(AdapterError, match=r"input 1 has merged adapters at layers.0.mlp.down_proj, "
                                           r"layers.0.self_attn.q_proj"):
        combine([ma, adapters.merge(mb, keep=True)], W, "cat")
    other_base = deltas.apply(ma, deltas.Delta({"layers.0.mlp.up_proj.kernel": jnp.ones((32, 48))}))
    with pytest.raises(AdapterError, match=r"input 1's base weights differ from input 0's at "
                                           r"layers.0.mlp.up_proj.kernel; combine adapters of one base model"):
        combine([mb, other_base], W, "cat")
    ia3 = adapters.attach(base, "ia3", ["layers.*.self_attn.[qv]_proj", "layers.*.mlp.down_proj"])
    with pytest.raises(AdapterError, match=r"adapters of different kinds cannot be combined: input 0 is lora, "
                                           r"input 1 is ia3"):
        combine([ma, ia3], W, "cat")
    mixed = adapters.attach(adapters.detach(ia3), "ia3", "layers.*.self_attn.[qv]_proj")
    mixed = adapters.attach(mixed, "lora", "layers.*.mlp.down_proj")
    with pytest.raises(AdapterError, match=r"input 1 mixes adapter kinds \['ia3', 'lora'\]"):
        combine([ia3, mixed], W, "linear")
    ff = adapters.attach(base, "ia3", ["layers.*.self_attn.[qv]_proj", "layers.*.mlp.down_proj"],
                         feedforward="layers.*.self_attn.q_proj")
    with pytest.raises(AdapterError, match=r"scale different sides .* at layers.0.mlp.down_proj \(input 1\), "
                                           r"layers.0.self_attn.q_proj \(input 1\)"):
        combine([ia3, ff], W, "linear")
    dora = [adapters.attach(base, "dora", "layers.*.self_attn.q_proj", init="random", seed=s) for s in (0, 1)]
    with pytest.raises(AdapterError, match=r"the inputs are DoRA adapters; .*combine_exact combines their weight"):
        combine(dora, W, "cat")


def test_exact_errors(pairs):
    _, models = pairs["llama"]
    ab = [models["a"], models["b"]]
    with pytest.raises(AdapterError, match=r"only \['task_arithmetic', 'linear'\] are built in; for 'ties' pass "
                                           r"merge=configurable_fm.ops.merge.merge_deltas"):
        combine_exact(ab, W, method="ties")
    with pytest.raises(AdapterError, match=r"parameters \['lambda'\] need merge="):
        combine_exact(ab, W, parameters={"lambda": 2.0})
    with pytest.raises(AdapterError, match=r"rank must be an int >= 1 \(or None: the sum of the input ranks\), "
                                           r"got 0"):
        combine_exact(ab, W, rank=0)
    with pytest.raises(AdapterError, match=r"the weights sum to 0; 'linear' divides by their sum"):
        combine_exact(ab, [1.0, -1.0], method="linear")
    with pytest.raises(AdapterError, match=r"1 weight\(s\) for 2 adapter\(s\)"):
        combine_exact(ab, [1.0])
    with pytest.raises(AdapterError, match=r"merge returned a dict, not a bricks.deltas.Delta"):
        combine_exact(ab, W, method="ties", merge=lambda *a, **k: {})
    with pytest.raises(AdapterError, match=r"the merged delta does not fit the modules: no term at "
                                           r"layers.0.mlp.down_proj.kernel, layers.0.self_attn.q_proj.kernel"):
        combine_exact(ab, W, method="ties", merge=lambda *a, **k: deltas.Delta({}))


def test_every_combination_is_tested():
    assert {c for _, _, c, _ in CASES.values()} == set(COMBINATIONS)
