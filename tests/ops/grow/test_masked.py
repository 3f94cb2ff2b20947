"""Masked structural growth (ops/grow/masked.py, models/masked.py): at ramp 0 the grown model computes the
source's logits although its new structure has fresh random weights; at ramp 1 `unmask` folds the masks into a
plain model with the same logits; masked models are consistent and round-trip through orbax; gradients reach the
new structure once the ramp is up; errors name the target or the ramps."""
import jax
import numpy as np
import pytest

from configurable_fm.bricks.paths import flat_params
from configurable_fm.errors import ConfigError
from configurable_fm.interop import orbax_io
from configurable_fm.models import GrowthRamp, MaskedLinear, MaskedRMSNorm, check_consistent, extension_specs
from configurable_fm.models.layers import Linear, RMSNorm
from configurable_fm.models.llama import LlamaConfig
from configurable_fm.models.structure import variables_of
from configurable_fm.ops.grow import GrowthError, grow_masked, mask_ramps, unmask, with_ramp
from tests.helpers import marked_slow
from tests.ops.grow.grow_helpers import assert_unchanged, grads, logits, max_diff, random_model, snapshot

IDS = np.random.RandomState(0).randint(0, 37, (2, 9))


def cfg(d, h, g, f, **kw):
    return LlamaConfig(vocab_size=37, hidden_size=d, num_heads=h, num_kv_heads=g, intermediate_size=f, num_layers=2,
                       max_position_embeddings=64, **kw)


SOURCES = {
    "mqa": cfg(24, 3, 1, 40),
    "gqa-tied-biases": cfg(32, 4, 2, 48, tie_word_embeddings=True, attention_bias=True, o_proj_bias=True,
                           mlp_bias=True),
}
# name: (source, targets)
CASES = {
    "ffn": ("mqa", dict(intermediate_size=56)),
    "heads-in-old-groups": ("gqa-tied-biases", dict(num_heads=8)),  # new heads at slots 2, 3, 6, 7: scattered
    "mqa-to-mha": ("mqa", dict(num_heads=5, num_kv_heads=5)),
    "hidden-tied": ("gqa-tied-biases", dict(hidden_size=44)),
    "depth-positions": ("mqa", dict(positions=[0, 2])),
    # hidden, new kv groups, FFN, and a new layer at the end (num_layers spreads 1 new layer: after layer 1)
    "everything": ("gqa-tied-biases", dict(hidden_size=48, num_heads=6, num_kv_heads=3, intermediate_size=64,
                                           num_layers=3)),
}


@pytest.fixture(scope="module")
def sources():
    return {name: random_model(c, seed=2) for name, c in SOURCES.items()}


@pytest.fixture(scope="module")
def reference(sources):
    return {name: logits(model, IDS) for name, model in sources.items()}


@pytest.fixture(scope="module")
def grown(sources):
    """name -> (source, grown at r = 0, snapshot of the source taken before growing)."""
    out = {}
    for name, (source_name, targets) in CASES.items():
        source = sources[source_name]
        before = snapshot(source)
        out[name] = (source, grow_masked(source, key=jax.random.key(5), **targets), before)
    return out


# 'hidden-tied' (a wider stream of the tied source) with --runslow: CI time (~1.4 s in the two tests); 'everything'
# grows the same source's stream too, with the same checks
COVERED = {"hidden-tied"}


@pytest.mark.parametrize("name", marked_slow(sorted(CASES), COVERED))
def test_ramp_zero_is_the_source_function_with_fresh_new_weights(name, grown, reference):
    source, model, before = grown[name]
    source_name, targets = CASES[name]
    assert_unchanged(source, before)
    check_consistent(model, "test")
    ref = reference[source_name]
    assert np.abs(ref).max() > 1.0
    assert max_diff(logits(model, IDS), ref) <= 1e-5
    # The masks and their ramps (all 0), and the target config (eps unchanged: the masked norm renormalises).
    ramps = mask_ramps(model)
    assert ramps and set(ramps.values()) == {0.0}
    assert model.cfg.rms_norm_eps == source.cfg.rms_norm_eps
    for key, value in targets.items():
        if key != "positions":
            assert getattr(model.cfg, key) == value
    # New structure is random (not zero, not a copy): the masks, not the weights, preserve the function.
    params = flat_params(model)
    if "intermediate_size" in targets and "num_layers" not in targets:
        rows = np.asarray(params["layers.0.mlp.down_proj.kernel"])[source.cfg.intermediate_size:]
        assert np.abs(rows).max() > 0.01
    if "hidden_size" in targets:
        cols = np.asarray(params["embed_tokens.embedding"])[:, source.cfg.hidden_size:]
        assert np.abs(cols).max() > 0.01
        assert isinstance(model.norm, MaskedRMSNorm) and isinstance(model.layers[0].input_layernorm, MaskedRMSNorm)
    if "num_heads" in targets:
        o = model.layers[0].self_attn.o_proj
        assert isinstance(o, MaskedLinear) and o.unit_size == model.cfg.dim_per_head
    # And it is a different function once the ramp is up.
    assert max_diff(logits(with_ramp(model, 1.0), IDS), ref) > 1e-3


def test_masks_sit_where_the_structure_is_new(grown):
    _, model, _ = grown["heads-in-old-groups"]  # 4 heads / 2 groups -> 8 / 2: slots 2, 3 and 6, 7 are new
    assert model.layers[1].self_attn.o_proj.new == ((2, 4), (6, 8))
    _, model, _ = grown["depth-positions"]  # new layers at 0 and 3 (before source layer 0 and after layer 1)
    specs = {s["path"]: s["options"] for s in extension_specs(model)}
    assert specs == {"layers.0.self_attn.o_proj": {"new": [[0, 3]], "unit_size": 8},
                     "layers.0.mlp.down_proj": {"new": [[0, 40]], "unit_size": 1},
                     "layers.3.self_attn.o_proj": {"new": [[0, 3]], "unit_size": 8},
                     "layers.3.mlp.down_proj": {"new": [[0, 40]], "unit_size": 1}}
    assert isinstance(model.layers[0].self_attn.o_proj.ramp, GrowthRamp)
    _, model, _ = grown["everything"]
    kinds = {s["kind"] for s in extension_specs(model)}
    assert kinds == {"masked_linear", "masked_rms_norm"} and len(extension_specs(model)) == 3 * 4 + 1


@pytest.mark.parametrize("name", marked_slow(["ffn", "heads-in-old-groups", "hidden-tied", "depth-positions",
                                                 "everything"], COVERED))
def test_unmask_at_ramp_one_is_a_plain_model_with_the_same_logits(name, grown):
    _, model, _ = grown[name]
    on = with_ramp(model, 1.0)
    assert set(mask_ramps(model).values()) == {0.0}  # with_ramp copies
    plain = unmask(on)
    assert extension_specs(plain) == []
    check_consistent(plain, "test")
    assert plain.cfg == on.cfg
    assert type(plain.layers[0].mlp.down_proj) is Linear and type(plain.norm) is RMSNorm
    assert not any(isinstance(v, GrowthRamp) for v in variables_of(plain).values())
    assert flat_params(plain).keys() == flat_params(on).keys()
    assert max_diff(logits(plain, IDS), logits(on, IDS)) <= 1e-5


def test_masked_model_round_trips_through_orbax(grown, tmp_path):
    _, model, _ = grown["everything"]
    half = with_ramp(model, 0.25)
    restored = orbax_io.load_model(orbax_io.save_model(half, tmp_path / "masked"))
    assert extension_specs(restored) == extension_specs(half)
    assert set(mask_ramps(restored).values()) == {0.25}
    assert isinstance(restored.layers[2].mlp.down_proj, MaskedLinear)
    np.testing.assert_array_equal(logits(restored, IDS), logits(half, IDS))


def test_gradients_reach_the_new_structure_once_the_ramp_is_up(grown):
    _, model, _ = grown["everything"]  # new layer 2
    f, d = 48, 32
    at_zero, half = grads(model, IDS), grads(with_ramp(model, 0.5), IDS)
    new_layer = "layers.2.mlp.down_proj.kernel"
    assert np.abs(at_zero[new_layer]).max() == 0.0 and np.abs(half[new_layer]).max() > 0
    old_layer = "layers.0.mlp.down_proj.kernel"  # new FFN units f.. of an old layer
    assert np.abs(at_zero[old_layer][f:]).max() == 0.0 and np.abs(half[old_layer][f:]).max() > 0
    assert np.abs(half["embed_tokens.embedding"][:, d:]).max() > 0  # new stream dims


def test_errors_name_the_problem(sources, grown):
    source = sources["gqa-tied-biases"]
    _, model, _ = grown["ffn"]
    half = with_ramp(model, 0.5)
    with pytest.raises(GrowthError, match=r"unmask: 2 of 2 growth ramp\(s\) are not 1, .*"
                                          r"layers\.0\.mlp\.down_proj\.ramp=0\.5, layers\.1\.mlp\.down_proj\.ramp=0\.5"):
        unmask(half)
    with pytest.raises(GrowthError, match="unmask: the model has no growth masks"):
        unmask(source)
    cases = [
        (dict(intermediate_size=32), r"grow_masked: intermediate_size=32 is smaller than the model's 48"),
        (dict(num_heads=6, num_kv_heads=4), r"grow_masked: num_heads=6 is not a multiple of num_kv_heads=4"),
        (dict(positions=[5]), r"grow_masked: positions \[5\] are not insertion points 0..2"),
        (dict(num_layers=2), r"grow_masked: num_layers=2 is not larger than the model's 2 layers"),
        (dict(), r"grow_masked: nothing to grow"),
        (dict(hidden_size=32), r"grow_masked: the targets equal the model's sizes"),
        (dict(intermediate_size=64, ramp=1.5), r"grow_masked: ramp=1.5 must lie in \[0, 1\]"),
        # once float(True) = 1.0 (every new structure fully on, not the source's function) / a bare ValueError
        (dict(intermediate_size=64, ramp=True), r"grow_masked: ramp=True must be a number in \[0, 1\]"),
        (dict(intermediate_size=64, ramp="0"), r"grow_masked: ramp='0' must be a number in \[0, 1\]"),
    ]
    for targets, message in cases:
        with pytest.raises(GrowthError, match=message):
            grow_masked(source, key=0, **targets)
    with pytest.raises(GrowthError, match=r"grow_masked: masked growth .* needs a PRNG key"):
        grow_masked(source, intermediate_size=64)
    with pytest.raises(GrowthError, match=r"grow_masked: the model has extension modules .*mlp\.down_proj"):
        grow_masked(model, intermediate_size=64, key=0)  # grow again: unmask first
    moe = random_model(cfg(32, 4, 2, 24, num_experts=4, architecture="MixtralForCausalLM"), seed=0)
    with pytest.raises(GrowthError, match=r"grow_masked: the model is a sparse MoE \(4 experts\)"):
        grow_masked(moe, intermediate_size=32, key=0)
    assert issubclass(GrowthError, ConfigError)
    with pytest.raises(ValueError, match=r"MaskedLinear: new range \[3, 9\) is not a non-empty range within 0..4"):
        MaskedLinear(model.layers[0].self_attn.o_proj, new=[(3, 9)], unit_size=6)
