"""mergekit YAML -> MergePlan: supported keys, mergekit's model order, and errors naming the key and its line."""
import json

import pytest

from configurable_fm.ops.merge.mergekit_yaml import (MergekitYamlError, load_mergekit_yaml, parse_mergekit_yaml,
                                                     plan_from_dict)


@pytest.fixture()
def dirs(tmp_path):
    out = {}
    for name in ("base", "a", "b"):
        d = tmp_path / name
        d.mkdir()
        (d / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
        out[name] = d
    return out


def _parse(text, dirs):
    return parse_mergekit_yaml(text.format(**dirs), source="t.yml")


def test_ties_plan_removes_the_base_from_the_inputs_and_keeps_settings(dirs):
    plan = _parse("""
merge_method: ties
base_model: {base}
models:
  - model: {a}
    parameters: {{weight: [0.0, 1.0], density: 0.5}}
  - model: {base}
  - model: {b}
    parameters:
      weight: [{{filter: mlp, value: 0.3}}, {{value: 0.5}}]
parameters: {{normalize: true, lambda: 1.0, density: {{filter: self_attn, value: 0.7}}}}
dtype: bfloat16
out_dtype: torch.float16
""", dirs)
    assert plan.method == "ties" and plan.base.path == dirs["base"].resolve()
    assert plan.model_names == [str(dirs["a"]), str(dirs["b"])]
    assert plan.model_parameters == ({"weight": [0.0, 1.0], "density": 0.5},
                                     {"weight": [{"filter": "mlp", "value": 0.3}, {"value": 0.5}]})
    assert plan.parameters == {"normalize": True, "lambda": 1.0, "density": {"value": 0.7, "filter": "self_attn"}}
    assert (plan.dtype, plan.out_dtype) == ("bfloat16", "float16")


def test_linear_with_base_model_makes_the_base_an_ordinary_last_input(dirs):
    plan = _parse("""
merge_method: linear
base_model: {base}
models: [{{model: {a}}}, {{model: {b}}}]
parameters: {{weight: 1.0}}
""", dirs)
    assert plan.base is None and plan.model_names == [str(dirs[k]) for k in ("a", "b", "base")]


def test_relative_paths_are_found_next_to_the_yaml_file(dirs, tmp_path):
    yml = tmp_path / "m.yml"
    yml.write_text("merge_method: task_arithmetic\nbase_model: base\nmodels:\n  - model: a\n"
                   "    parameters: {weight: 0.5}\n")
    plan = load_mergekit_yaml(yml)
    assert plan.base.path == dirs["base"].resolve() and plan.models[0].path == dirs["a"].resolve()


@pytest.mark.parametrize("text, words", [
    ("merge_method: ties\nbase_model: {base}\nmodels: [{{model: {a}}}]\nfoo: 1\n", ["'foo'", "line 4"]),
    ("merge_method: ties\nbase_model: {base}\nmodels:\n  - model: {a}\n    lora: x\n", ["'lora'", "line 5"]),
    ("merge_method: ties\nbase_model: {base}\nmodels:\n  - model: {a}\n    parameters: {{wieght: 1}}\n",
     ["'wieght'", "line 5", "valid"]),
    ("merge_method: linear\nmodels: [{{model: {a}}}]\nparameters:\n  weight: 1\n  int8_mask: true\n",
     ["'int8_mask'", "line 5"]),
    ("merge_method: ties\nbase_model: {base}\nmodels: [{{model: {a}}}]\nparameters:\n  density:\n"
     "    - {{filter: mlp, value: 0.5, extra: 1}}\n", ["'extra'", "line 6"]),
    ("merge_method: ties\nbase_model: {base}\nmodels: [{{model: {a}}}]\ndtype: int8\n", ["dtype", "line 4"]),
    ("merge_method: ties\nbase_model: {base}\nmodels:\n  - model: nowhere/at_all\n", ["'nowhere/at_all'", "line 4"]),
    ("merge_method: ties\nbase_model: {base}\nmodels:\n  - model: {a}+lora\n", ["LoRA", "line 4"]),
    ("merge_method: ties\nbase_model: {base}\nmodels:\n  - model: {a}\n  - model: {a}\n", ["twice", "line 5"]),
    ("merge_method: tiez\nmodels: [{{model: {a}}}]\n", ["'tiez'", "line 1"]),
    ("base_model: {base}\nmodels: [{{model: {a}}}]\n", ["'merge_method' is required"]),
    ("merge_method: ties\nmodels: [{{model: {a}}}]\n---\nmerge_method: linear\n", ["single YAML document"]),
])
def test_unsupported_or_invalid_yaml_names_the_key_and_line(dirs, text, words):
    with pytest.raises(MergekitYamlError) as e:
        _parse(text, dirs)
    assert all(w in str(e.value) for w in words), str(e.value)
    assert str(e.value).startswith("t.yml")


@pytest.mark.parametrize("key, value, line", [
                                              ("tokenizer_source", "union", 3), ("tokenizer", "{{source: base}}", 3),
                                              ("chat_template", "chatml", 3), ("modules", "{{text: {{}}}}", 3)])
def test_not_implemented_keys_raise_not_implemented_naming_the_key(dirs, key, value, line):
    with pytest.raises(NotImplementedError) as e:
        _parse(f"merge_method: passthrough\nmodels: [{{{{model: {{a}}}}}}]\n{key}: {value}\n", dirs)
    assert f"'{key}'" in str(e.value) and f"line {line}" in str(e.value)


def test_method_contract_is_checked(dirs):
    with pytest.raises(ValueError, match="needs a base model"):
        _parse("merge_method: ties\nmodels: [{{model: {a}}}]\n", dirs)
    with pytest.raises(ValueError, match="exactly 1"):
        _parse("merge_method: slerp\nbase_model: {base}\nmodels: [{{model: {a}}}, {{model: {b}}}]\n"
               "parameters: {{t: 0.5}}\n", dirs)
    with pytest.raises(MergekitYamlError, match="'t' in models.*shared parameter"):
        _parse("merge_method: slerp\nbase_model: {base}\nmodels: [{{model: {a}, parameters: {{t: 1}}}}]\n"
               "parameters: {{t: 0.5}}\n", dirs)


def test_registry_names_and_plain_dicts(dirs):
    plan = plan_from_dict({"merge_method": "task_arithmetic", "base_model": "all-minilm-l6-v2",
                           "models": [{"model": str(dirs["a"]), "parameters": {"weight": 0.5}}]})
    assert plan.base.registry == "all-minilm-l6-v2" and plan.base.path is None
    assert plan.model_parameters == ({"weight": 0.5},)
    with pytest.raises(MergekitYamlError, match="unsupported key 'weights'"):
        plan_from_dict({"merge_method": "linear", "models": [{"model": str(dirs["a"])}], "parameters": {"weights": 1}})


def test_scientific_strings_become_numbers_for_numeric_parameters_only(dirs):
    plan = _parse("""
merge_method: ties
base_model: {base}
models:
  - model: {a}
    parameters: {{weight: 1e-1, density: [{{filter: x, value: 5e-1}}]}}
parameters: {{lambda: 2E0, election: sum}}
""", dirs)
    assert plan.model_parameters[0] == {"weight": 0.1, "density": [{"filter": "x", "value": 0.5}]}
    assert plan.parameters == {"lambda": 2.0, "election": "sum"}
