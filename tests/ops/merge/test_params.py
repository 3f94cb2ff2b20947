"""mergekit parameter resolution: gradients over depth, substring filters, precedence, errors."""
import numpy as np
import pytest

from configurable_fm.ops.merge import params as P
from configurable_fm.ops.merge.registry import get_method


def test_layer_index_from_our_paths_and_hf_names():
    assert P.layer_index("layers.3.mlp.down_proj.kernel") == 3
    assert P.layer_index("model.layers.12.self_attn.q_proj.weight") == 12
    assert P.layer_index("h.2.attn.c_attn.kernel") == 2
    assert P.layer_index("embed_tokens.embedding") is None
    assert P.layer_index("model.norm.weight") is None
    assert P.layer_index("lm_head.weight") is None
    assert P.num_layers_of(["embed_tokens.embedding", "layers.0.x", "layers.4.y"]) == 5


def test_gradient_over_three_layers_and_embeddings_at_t0():
    got = [P.evaluate([0.0, 1.0], f"layers.{i}.mlp.up_proj.kernel", P.depth_t(f"layers.{i}.mlp.up_proj.kernel", 3))
           for i in range(3)]
    assert got == [0.0, 0.5, 1.0]
    for path in ("embed_tokens.embedding", "norm.weight", "lm_head.kernel", "model.embed_tokens.weight"):
        assert P.depth_t(path, 3) == 0.0
        assert P.evaluate([0.25, 1.0], path, P.depth_t(path, 3)) == 0.25
    # three-point gradient at t = 0.75: s = 1.5 -> halfway between 0.5 and 0.2
    assert P.evaluate([1.0, 0.5, 0.2], "layers.3.x", P.depth_t("layers.3.x", 5)) == pytest.approx(0.35)
    assert P.depth_t("model.layers.0.x", 1) == 1.0  # mergekit: one layer -> t = 1


def test_discrete_lists_and_scalars():
    assert P.evaluate([True, False], "layers.0.x", 0.0) is True
    assert P.evaluate([True, False], "layers.2.x", 1.0) is False
    assert P.evaluate(["a", "b", "c"], "layers.1.x", 0.5) == "b"
    assert P.evaluate(0.7, "anything") == 0.7
    assert P.evaluate([], "anything") is None


def test_filters_first_match_wins_and_values_may_be_gradients():
    setting = [{"filter": "self_attn", "value": 0.3}, {"filter": "mlp", "value": [0.0, 1.0]}, {"value": 0.5}]
    assert P.evaluate(setting, "layers.1.self_attn.q_proj.kernel", 0.5) == 0.3
    assert P.evaluate(setting, "layers.1.mlp.up_proj.kernel", 0.5) == 0.5
    assert P.evaluate(setting, "layers.2.mlp.up_proj.kernel", 1.0) == 1.0
    assert P.evaluate(setting, "embed_tokens.embedding", 0.0) == 0.5
    assert P.evaluate([{"filter": "*", "value": 2.0}, {"value": 3.0}], "x") == 2.0
    assert P.evaluate([{"filter": "mlp", "value": 1.0}], "norm.weight") is None
    assert P.evaluate({"filter": "norm", "value": 4.0}, "norm.weight") == 4.0


def test_precedence_model_over_global_over_default_and_fallthrough():
    levels = [{"weight": [{"filter": "mlp", "value": 2.0}]}, {"weight": 1.0}]
    assert P.resolve("weight", levels, "layers.0.mlp.up_proj.kernel") == 2.0
    assert P.resolve("weight", levels, "layers.0.self_attn.q_proj.kernel") == 1.0  # no match -> global
    assert P.resolve("density", levels, "x", default=0.25) == 0.25


def test_resolve_for_tensor_per_model_and_shared():
    m = get_method("ties")
    kw = P.resolve_for_tensor(m, "layers.2.mlp.up_proj.kernel", parameters={"density": 0.5, "lambda": 2.0},
                              model_parameters=[{"weight": 1.0}, {"weight": [0.0, 1.0], "density": 0.2}],
                              model_names=["a", "b"], num_layers=3)
    np.testing.assert_array_equal(kw["weight"], [1.0, 1.0])
    np.testing.assert_array_equal(kw["density"], [0.5, 0.2])
    assert kw["density"].dtype == np.float64  # concrete doubles: mergekit's exact int(d·n)
    assert kw["lambda"] == 2.0 and kw["normalize"] is True and kw["election"] == "weighted_sum"
    kw = P.resolve_for_tensor(get_method("passthrough"), "layers.0.x", model_names=["a"], num_layers=1)
    assert "scale" not in kw


def test_non_finite_values_are_refused_naming_parameter_model_and_tensor():
    """A NaN or infinite weight / lambda was accepted and wrote NaN tensors (mergekit's YAML `.nan`, a config's
    --config.parameters.weight=nan)."""
    for bad in (float("nan"), float("inf")):
        with pytest.raises(P.ParameterError, match=r"ties: parameter 'weight' for tensor 'layers.0.w' must be "
                                                   r"finite, got (nan|inf) for model 'b'"):
            P.resolve_for_tensor(get_method("ties"), "layers.0.w", parameters={"density": 0.5},
                                 model_parameters=[{"weight": 1.0}, {"weight": bad}], model_names=["a", "b"],
                                 num_layers=1)
        with pytest.raises(P.ParameterError, match=r"ties: parameter 'lambda' for tensor 'layers.0.w' must be "
                                                   r"finite"):
            P.resolve_for_tensor(get_method("ties"), "layers.0.w", parameters={"density": 0.5, "lambda": bad},
                                 model_parameters=[{"weight": 1.0}], model_names=["a"], num_layers=1)


def test_missing_required_parameter_names_parameter_model_and_tensor():
    with pytest.raises(P.ParameterError, match=r"missing required parameter 'weight' of model 'ft_b' for tensor "
                                               r"'layers.1.mlp.up_proj.kernel'"):
        P.resolve_for_tensor(get_method("ties"), "layers.1.mlp.up_proj.kernel",
                             model_parameters=[{"weight": 1.0}, {"weight": [{"filter": "attn", "value": 1.0}]}],
                             model_names=["ft_a", "ft_b"], num_layers=3)
    with pytest.raises(P.ParameterError, match=r"missing required parameter 't' for tensor 'norm.weight'"):
        P.resolve_for_tensor(get_method("slerp"), "norm.weight", model_names=["a"], num_layers=3)


def test_malformed_settings_and_unknown_names():
    with pytest.raises(P.ParameterError, match=r"parameter 'weight' for tensor 'norm.weight'.*'filtr'"):
        P.evaluate([{"filtr": "mlp", "value": 1.0}], "norm.weight", name="weight")
    with pytest.raises(P.ParameterError, match=r"parameter 'density' for tensor 'x'.*a list must be"):
        P.evaluate([0.1, {"value": 1.0}], "x", name="density")
    with pytest.raises(P.ParameterError, match=r"must be a number.*'yes' for model 'b'"):
        P.resolve_for_tensor(get_method("linear"), "x", model_parameters=[{"weight": 1.0}, {"weight": "yes"}],
                             model_names=["a", "b"], num_layers=1)
    with pytest.raises(P.ParameterError, match=r"unknown parameter\(s\) 'densty' \(global\), 'normalize' \(model "
                                               r"'b': a shared parameter"):
        P.check_names(get_method("ties"), {"densty": 0.5}, [{}, {"normalize": True}], ["a", "b"])
    with pytest.raises(P.ParameterError, match=r"layer 5 but the model has num_layers=3"):
        P.depth_t("layers.5.x", 3)
