"""Width growth (ops/grow/width.py): exact in float64 for many shapes (the algebra, to 1e-10), in float32 on real
models (max |logit diff| <= 1e-5), consistent models that save and reload (HF, orbax, transformers), new units that
receive gradients, and errors that name the problem."""
import dataclasses
import functools

import jax
import numpy as np
import pytest
from flax import nnx

from configurable_fm.bricks.paths import flat_params
from configurable_fm.errors import ConfigError, UserError
from configurable_fm.interop import orbax_io
from configurable_fm.interop.hf import from_hf, to_hf
from configurable_fm.models import RopeScaling, check_consistent
from configurable_fm.models.factory import build_model
from configurable_fm.models.llama import LlamaConfig
from configurable_fm.models.moe import routing_noise
from configurable_fm.ops.grow import GrowthError, Units, grow_width, plan_width, widen
from configurable_fm.ops.grow.width import widen_params
from tests.ops.grow.grow_helpers import (FAST_COMPILE, assert_unchanged, grads, logits, max_diff, random_model,
                                         random_params, reference_logits, snapshot)

IDS = np.random.RandomState(0).randint(0, 37, (2, 9))
LLAMA3 = RopeScaling("llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                     original_max_position_embeddings=8)


def cfg(d, h, g, f, **kw):
    return LlamaConfig(vocab_size=37, hidden_size=d, num_heads=h, num_kv_heads=g, intermediate_size=f, num_layers=2,
                       max_position_embeddings=64, **kw)


def target(d=None, h=None, g=None, f=None):
    return dict(hidden_size=d, num_heads=h, num_kv_heads=g, intermediate_size=f)


BIASES = dict(attention_bias=True, o_proj_bias=True, mlp_bias=True)
MOE = dict(num_experts=4, num_experts_per_tok=2, architecture="MixtralForCausalLM")
# name: (source config, targets, method, noise)
CASES = {
    "brief-mqa-to-mha": (cfg(24, 3, 1, 40), target(40, 5, 5, 64), "exact", 0.0),
    "brief-mqa-kept": (cfg(24, 3, 1, 40), target(40, 5, 1, 64), "exact", 0.0),
    "brief-noise": (cfg(24, 3, 1, 40, **BIASES), target(40, 5, 5, 64), "exact", 0.5),
    "smollm2-135m-to-360m-analogue": (cfg(72, 9, 3, 192, tie_word_embeddings=True), target(120, 15, 5, 320),
                                      "exact", 0.3),
    "mha": (cfg(32, 4, 4, 48), target(48, 6, 6, 80), "exact", 0.0),
    "gqa-groups-split": (cfg(32, 4, 2, 48, tie_word_embeddings=True), target(40, 4, 4, 48), "exact", 0.2),
    "gqa-more-heads-per-group": (cfg(48, 6, 2, 40), target(48, 8, 2, 40), "exact", 0.2),
    "ffn-plus-one": (cfg(24, 3, 1, 40), target(f=41), "exact", 0.0),
    "hidden-plus-one": (cfg(24, 3, 1, 40, tie_word_embeddings=True), target(d=25), "exact", 0.0),
    "qwen2-biases-llama3-rope": (cfg(32, 4, 2, 48, attention_bias=True, rope_scaling=LLAMA3,
                                     architecture="Qwen2ForCausalLM"), target(56, 6, 3, 72), "exact", 0.3),
    "moe-exact": (cfg(32, 4, 2, 24, **MOE), target(40, 6, 3, 40), "exact", 0.3),
    "head-dim-explicit": (cfg(24, 2, 1, 40, head_dim=16), target(40, 4, 2, 64), "exact", 0.0),
    "hypercloning-x2-mha": (cfg(32, 4, 4, 48), target(64, 8, 8, 96), "hypercloning", 0.0),
    "hypercloning-x2-gqa-tied-noise": (cfg(32, 4, 2, 48, tie_word_embeddings=True, **BIASES), target(64, 8, 4, 96),
                                       "hypercloning", 0.5),
    "hypercloning-x3-mqa-kept": (cfg(24, 3, 1, 40, rope_scaling=LLAMA3), target(72, 9, 1, 120), "hypercloning", 0.3),
    "hypercloning-hidden-only-tied": (cfg(24, 3, 1, 40, tie_word_embeddings=True), target(d=96), "hypercloning", 0.3),
    "hypercloning-ffn-only": (cfg(24, 3, 1, 40), target(f=160), "hypercloning", 0.3),
    "hypercloning-moe": (cfg(32, 4, 2, 24, **MOE), target(64, 8, 4, 48), "hypercloning", 0.3),
}


def _random_cases(n, seed):
    """Random feasible (source, target) pairs: MHA/GQA/MQA, tied or not, biases or not, any larger sizes."""
    rs = np.random.RandomState(seed)
    out = {}
    while len(out) < n:
        hd = int(rs.choice([4, 8]))
        g = int(rs.choice([1, 2, 3]))
        h = g * int(rs.randint(1, 4))
        d = h * hd + int(rs.choice([0, 0, 4]))
        f = int(rs.randint(8, 40))
        kw = dict(tie_word_embeddings=bool(rs.rand() < 0.5), head_dim=hd if d != h * hd else None)
        if rs.rand() < 0.4:
            kw.update(BIASES)
        g2 = g * int(rs.randint(1, 3))
        h2 = g2 * max(-(-h // g2) if g2 > g else h // g, int(rs.randint(1, 4)))
        tgt = target(d + int(rs.randint(0, 20)), h2, g2, f + int(rs.randint(0, 30)))
        try:
            plan_width(cfg(d, h, g, f, **kw), **tgt)
        except GrowthError:
            continue
        out[f"random-{len(out)}"] = (cfg(d, h, g, f, **kw), tgt, "exact", float(rs.choice([0.0, 0.5])))
    return out


CASES.update(_random_cases(10, seed=7))


@pytest.mark.parametrize("name", sorted(CASES))
def test_growth_is_exact_in_float64(name):
    """The grown parameters compute the source's logits to float64 rounding: the construction is exact."""
    src_cfg, tgt, method, noise = CASES[name]
    params = random_params(src_cfg, seed=1)
    plan = plan_width(src_cfg, **tgt, method=method)
    grown = widen_params(params, src_cfg, plan, key=jax.random.key(3), noise=noise)
    new_cfg = dataclasses.replace(src_cfg, **plan.changes)
    assert new_cfg.dim_per_head == src_cfg.dim_per_head
    assert all(grown[k].dtype == np.float64 for k in grown)
    ref = reference_logits(params, src_cfg, IDS)
    assert np.abs(ref).max() > 1.0  # logits at a scale where errors would show
    assert max_diff(reference_logits(grown, new_cfg, IDS), ref) <= 1e-10
    if noise:  # noise changed weights, not the function
        plain = widen_params(params, src_cfg, plan)
        assert any(max_diff(plain[k], grown[k]) > 1e-3 for k in grown)


def test_wrong_head_grouping_breaks_exactness():
    """A deliberately wrong kv mapping (old query heads on new kv heads) is far off: the test can tell."""
    src_cfg = cfg(24, 3, 1, 40)
    params = random_params(src_cfg, seed=1)
    plan = plan_width(src_cfg, **target(40, 5, 5, 64))
    assert plan.kv_heads.src == (0, 0, 0, 0, 0) and plan.kv_heads.new == (False, False, False, True, True)
    assert plan.heads.src[:3] == (0, 1, 2) and plan.heads.new == (False, False, False, True, True)
    new_cfg = dataclasses.replace(src_cfg, **plan.changes)
    ref = reference_logits(params, src_cfg, IDS)
    good = widen_params(params, src_cfg, plan, key=jax.random.key(0), noise=1.0)
    assert max_diff(reference_logits(good, new_cfg, IDS), ref) <= 1e-10
    # Old heads 1 and 2 moved to groups whose kv heads are new, noisy ones:
    wrong = dataclasses.replace(plan, kv_heads=Units((0, 0, 0, 0, 0), (False, True, True, False, False), (1,) * 5))
    bad = widen_params(params, src_cfg, wrong, key=jax.random.key(0), noise=1.0)
    assert max_diff(reference_logits(bad, new_cfg, IDS), ref) > 0.1


# ---------------------------------------------------------------------------------------- real models, float32
GQA_BIASES = cfg(24, 3, 1, 40, rope_scaling=LLAMA3, **BIASES)
MODEL_CASES = {  # source -> several targets, so that each source compiles once
    "gqa-biases-llama3": (GQA_BIASES, [(target(40, 5, 5, 64), "exact", 0.5),
                                       (target(48, 6, 2, 80), "hypercloning", 0.3)]),
    "smollm2-analogue-tied": (cfg(72, 9, 3, 192, tie_word_embeddings=True), [(target(120, 15, 5, 320), "exact", 0.3)]),
    "moe": (cfg(32, 4, 2, 24, **MOE), [(target(40, 6, 3, 40), "exact", 0.3)]),
}


@pytest.mark.parametrize("name", ["gqa-biases-llama3", "moe"])
def test_reference_forward_matches_the_model(name):
    c = MODEL_CASES[name][0]
    model = random_model(c, seed=2)
    assert max_diff(logits(model, IDS), reference_logits(flat_params(model), c, IDS)) <= 1e-4


@pytest.mark.parametrize("name", sorted(MODEL_CASES))
def test_grown_models_keep_their_logits_and_are_consistent(name):
    src_cfg, targets = MODEL_CASES[name]
    model = random_model(src_cfg, seed=4)
    before = snapshot(model)
    ref = logits(model, IDS)
    for tgt, method, noise in targets:
        grown = grow_width(model, **tgt, method=method, key=jax.random.key(5), noise=noise)
        check_consistent(grown, "test")
        assert grown.cfg.hidden_size == tgt["hidden_size"] and grown.cfg.num_heads == tgt["num_heads"]
        assert grown.cfg.num_kv_heads == tgt["num_kv_heads"] and grown.cfg.dim_per_head == src_cfg.dim_per_head
        assert grown.layers[1].self_attn.cfg == grown.cfg
        diff = max_diff(logits(grown, IDS), ref)
        assert diff <= 1e-5, f"{name} -> {tgt} ({method}): max |logit diff| {diff}"
    assert_unchanged(model, before)


@functools.partial(jax.jit, static_argnums=0, compiler_options=FAST_COMPILE)
def _noisy_logits(graphdef, state, ids, key):
    with routing_noise(key):
        return nnx.merge(graphdef, state)(ids)


def test_a_noisy_topk_moe_grows_with_its_noise_weights():
    """router='noisy_topk' has noise weights layers.*.mlp.noise.kernel (D, E) that read the stream like the router;
    width growth once refused them ("no width rule"). Grown, the noisy routing (same draws) is the source's."""
    src_cfg = dataclasses.replace(cfg(32, 4, 2, 24, **dict(MOE, router="noisy_topk")), num_layers=1)
    model = random_model(src_cfg, seed=4)
    key = jax.random.key(1)
    ref = np.asarray(_noisy_logits(*nnx.split(model), IDS, key))
    other = np.asarray(_noisy_logits(*nnx.split(model), IDS, jax.random.key(2)))
    assert max_diff(ref, other) > 1e-3  # the noise changes the routing: the check can tell
    for tgt, method in ((target(40, 6, 3, 40), "exact"), (target(64, 8, 4, 48), "hypercloning")):
        grown = grow_width(model, **tgt, method=method, key=jax.random.key(5), noise=0.3)
        check_consistent(grown, "test")
        assert flat_params(grown)["layers.0.mlp.noise.kernel"].shape == (tgt["hidden_size"], 4)
        assert max_diff(np.asarray(_noisy_logits(*nnx.split(grown), IDS, key)), ref) <= 1e-4


def test_smollm2_shapes_grow_as_the_real_pair():
    """SmolLM2-135M (576, 9/3 heads, FFN 1536) -> SmolLM2-360M (960, 15/5, 2560): planned without building."""
    small = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=30, num_heads=9,
                        num_kv_heads=3, tie_word_embeddings=True, rms_norm_eps=1e-5)
    plan = plan_width(small, hidden_size=960, num_heads=15, num_kv_heads=5, intermediate_size=2560)
    assert plan.changes["head_dim"] is None  # 960 / 15 = 64 = 576 / 9: still implied
    assert plan.changes["rms_norm_eps"] == pytest.approx(1e-5 * 576 / 960)
    assert plan.heads.src[:9] == tuple(range(9)) and not any(plan.heads.new[:9]) and all(plan.heads.new[9:])
    assert plan.kv_heads.src == (0, 1, 2, 0, 1) and plan.kv_heads.new == (False,) * 3 + (True,) * 2


@pytest.fixture(scope="module")
def grown_pair():
    model = random_model(GQA_BIASES, seed=4)
    return model, grow_width(model, **target(40, 5, 5, 64), key=jax.random.key(5), noise=0.5)


def test_grown_model_saves_and_reloads(grown_pair, tmp_path):
    model, grown = grown_pair
    ref = logits(grown, IDS)
    reloaded = from_hf(to_hf(grown, tmp_path / "hf"))
    assert dataclasses.replace(reloaded.cfg, head_dim=None) == grown.cfg  # HF configs state head_dim
    assert max_diff(logits(reloaded, IDS), ref) == 0.0
    restored = orbax_io.load_model(orbax_io.save_model(grown, tmp_path / "orbax"))
    assert restored.cfg == grown.cfg
    assert max_diff(logits(restored, IDS), ref) == 0.0
    assert max_diff(ref, logits(model, IDS)) <= 1e-5


def test_transformers_loads_a_grown_model(grown_pair, tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    model, grown = grown_pair
    to_hf(grown, tmp_path / "hf")
    hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "hf").eval()
    with torch.no_grad():
        theirs = hf(torch.tensor(IDS)).logits.numpy()
    assert max_diff(theirs, logits(grown, IDS)) <= 1e-4
    assert max_diff(theirs, logits(model, IDS)) <= 1e-4


# ---------------------------------------------------------------------------------------- gradients
def test_new_units_receive_gradients_and_noise_breaks_the_copies_symmetry(grown_pair):
    model, noisy = grown_pair
    plain = grow_width(model, **target(40, 5, 5, 64))
    hd = model.cfg.dim_per_head
    new_heads = [t for t, new in enumerate(plan_width(model.cfg, **target(40, 5, 5, 64)).heads.new) if new]
    for grown in (plain, noisy):
        g = grads(grown, IDS)
        down = g["layers.0.mlp.down_proj.kernel"]
        assert (np.abs(down[40:]).sum(1) > 0).all()  # every new FFN unit's output row learns
        o_rows = g["layers.1.self_attn.o_proj.kernel"].reshape(5, hd, 40)
        assert all(np.abs(o_rows[t]).sum() > 0 for t in new_heads)  # new heads' outputs learn
        emb = g["embed_tokens.embedding"]
        assert (np.abs(emb[np.unique(IDS[:, :-1]), 24:]).sum(1) > 0).all()  # the new residual dimensions too
        q = g["layers.1.self_attn.q_proj.kernel"].reshape(40, 5, hd)
        assert all(np.abs(q[:, t]).max() == 0 for t in new_heads)  # their inputs wait one step (zero outputs)
    # New unit 40 copies unit 0: identical gradient on its output row unless noise made the copies differ.
    g_plain, g_noisy = grads(plain, IDS), grads(noisy, IDS)
    d_plain, d_noisy = g_plain["layers.0.mlp.down_proj.kernel"], g_noisy["layers.0.mlp.down_proj.kernel"]
    np.testing.assert_allclose(d_plain[40], d_plain[0], rtol=1e-5, atol=1e-9)
    assert max_diff(d_noisy[40], d_noisy[0]) > 1e-2 * np.abs(d_noisy[0]).max()


# ---------------------------------------------------------------------------------------- errors
ERRORS = {
    "smaller": (dict(hidden_size=16), "exact",
                r"hidden_size=16 is smaller than the model's 24; width growth only grows"),
    "not-grouped": (dict(num_heads=7, num_kv_heads=2), "exact", r"num_heads=7 is not a multiple of num_kv_heads=2"),
    "groups-cannot-stay": (dict(num_heads=6, num_kv_heads=3), "exact",
                           r"6 query heads in 2 kv group\(s\) of 3 cannot keep their key-value heads in 3 group\(s\) "
                           r"of 2: .* choose num_kv_heads >= 4"),
    "hypercloning-fraction": (dict(hidden_size=40), "hypercloning",
                              r"tiles whole copies; hidden_size=40 is not a multiple of the model's 24"),
    "hypercloning-kv": (dict(num_heads=12, num_kv_heads=2), "hypercloning",
                        r"tiles the kv heads with the query heads \(x2\): num_kv_heads must be 4, got 2"),
    "method": (dict(hidden_size=48), "net2net",
               r"method='net2net' is unknown; choose one of \['exact', 'hypercloning'\]"),
    "noise-without-key": (dict(hidden_size=48, noise=0.1), "exact", r"noise=0.1 needs a PRNG key"),
    "not-an-int": (dict(intermediate_size=64.0), "exact", r"intermediate_size must be an int, got 64.0"),
    # an infinite noise once passed the check and made every grown tensor inf/NaN (0 * inf on the kept entries)
    "noise-infinite": (dict(hidden_size=48, noise=float("inf"), key=0), "exact",
                       r"noise=inf must be a finite number >= 0"),
    "noise-not-a-number": (dict(hidden_size=48, noise="0.1", key=0), "exact",
                           r"noise='0.1' must be a finite number >= 0"),
}


def test_noise_is_relative_to_the_source_tensor():
    """Every noise a tensor gets has std noise * std(the source tensor), also where it grows on two axes (q_proj:
    new heads' columns first, then the new stream rows; the rows' noise once used the std of the partly grown
    tensor, 2x too large here)."""
    cfg = LlamaConfig(vocab_size=37, hidden_size=24, num_heads=3, num_kv_heads=1, intermediate_size=40, num_layers=1)
    params = random_params(cfg, 1)
    plan = plan_width(cfg, hidden_size=400, num_heads=12, num_kv_heads=1, method="exact")
    noisy, plain = widen_params(params, cfg, plan, key=jax.random.key(0), noise=2.0), widen_params(params, cfg, plan)
    for path in ("layers.0.self_attn.q_proj.kernel", "layers.0.mlp.up_proj.kernel"):
        width = params[path].shape[1]
        added = (noisy[path] - plain[path])
        want = 2.0 * params[path].std()
        assert abs(added[24:, :width].std() / want - 1) < 0.05, path  # new stream rows, old units' columns
        if path.endswith("q_proj.kernel"):  # 9 new heads (the FFN keeps its 40 units)
            assert abs(added[:24, width:].std() / want - 1) < 0.1, path  # old rows, new heads' columns


@pytest.mark.parametrize("name", sorted(ERRORS))
def test_errors_name_the_problem(name):
    model = random_model(cfg(24, 6, 2, 40, head_dim=4), seed=0)
    kwargs, method, message = ERRORS[name]
    with pytest.raises(GrowthError, match=message) as e:
        grow_width(model, method=method, **kwargs)
    assert isinstance(e.value, ConfigError) and isinstance(e.value, UserError) and isinstance(e.value, ValueError)


def test_other_families_are_refused():
    gpt2 = nnx.eval_shape(lambda: build_model(dict(family="gpt2", vocab_size=40, n_positions=32, n_embd=16,
                                                   n_layer=1, n_head=4)))
    with pytest.raises(GrowthError, match=r"grow_width: needs a llama-family model \(model.cfg a LlamaConfig\); "
                                          r"got GPT2 with cfg GPT2Config"):
        grow_width(gpt2, hidden_size=32)


def test_a_plan_for_another_model_is_refused():
    plan = plan_width(cfg(32, 4, 2, 48), hidden_size=48)
    with pytest.raises(GrowthError, match="widen: the plan was made for another model"):
        widen(random_model(cfg(24, 3, 1, 40), seed=0), plan)
