"""mergekit YAML -> MergePlan: supported keys, mergekit's model order, and errors naming the key and its line."""
import json

import pytest

from configurable_fm.ops.merge.mergekit_yaml import (CHAT_TEMPLATES, MergekitYamlError, TokenizerPlan,
                                                     chat_template_text, load_mergekit_yaml, parse_mergekit_yaml,
                                                     plan_from_dict)
from configurable_fm.ops.merge.vocab import TokenOverride


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


def test_modules_raise_not_implemented_naming_the_key_and_line(dirs):
    with pytest.raises(NotImplementedError) as e:
        _parse("merge_method: passthrough\nmodels: [{{model: {a}}}]\nmodules: {{text: {{}}}}\n", dirs)
    assert "'modules'" in str(e.value) and "line 3" in str(e.value)


def test_tokenizer_source_and_tokenizer_become_a_tokenizer_plan(dirs):
    plan = _parse("merge_method: ties\nbase_model: {base}\nmodels: [{{model: {a}}}, {{model: {b}}}]\n"
                  "tokenizer_source: union\nchat_template: chatml\n", dirs)
    assert plan.tokenizer == TokenizerPlan("union", None, None, str(dirs["base"]))
    assert plan.chat_template == "chatml" and chat_template_text("chatml") == CHAT_TEMPLATES["chatml"]
    # a model of the plan by name or by the same directory (relative to the YAML), tokens parsed and normalised
    yml = dirs["a"].parent / "m.yml"
    yml.write_text(f"""merge_method: linear
base_model: base
models:
  - model: a
    parameters: {{weight: 1.0}}
  - model: {dirs['b']}
    parameters: {{weight: 1.0}}
tokenizer:
  source: ./a
  pad_to_multiple_of: 8
  tokens:
    <x>: {{source: {dirs['b']}/, force: true}}
    y: {{source: {{kind: model_token, model: base, token_id: 3}}}}
    z: {{source: {{kind: zero}}}}
""")
    plan = load_mergekit_yaml(yml)
    tk = plan.tokenizer
    assert (tk.source, tk.pad_to_multiple_of, tk.base) == ("a", 8, "base")  # linear: the base is an input
    assert plan.model_names == ["a", str(dirs["b"]), "base"]
    assert tk.tokens == {"<x>": TokenOverride("model", model=str(dirs["b"]), force=True),
                         "y": TokenOverride("model_token", model="base", token_id=3),
                         "z": TokenOverride("zero")}
    # slices plans take them too; tokenizer without source: union (mergekit's default)
    plan = _parse("merge_method: passthrough\nslices:\n  - sources: [{{model: {a}, layer_range: [0, 1]}}]\n"
                  "tokenizer: {{pad_to_multiple_of: 4}}\nchat_template: auto\n", dirs)
    assert plan.tokenizer == TokenizerPlan("union", None, 4, None) and plan.chat_template == "auto"
    assert plan.slices is not None
    # explicit nulls: nothing
    plan = _parse("merge_method: linear\nmodels: [{{model: {a}}}]\nparameters: {{weight: 1}}\n"
                  "tokenizer_source: null\nchat_template: null\n", dirs)
    assert plan.tokenizer is None and plan.chat_template is None


HEAD = "merge_method: ties\nbase_model: {base}\nmodels: [{{model: {a}}}, {{model: {b}}}]\n"


@pytest.mark.parametrize("tail, words", [
    ("tokenizer_source: union\ntokenizer: {{source: base}}\n", ["at most one", "line 5", "line 4"]),
    ("tokenizer_source: nowhere\n", ["tokenizer_source", "'nowhere' is not a model of the merge", "line 4"]),
    ("tokenizer_source: [union]\n", ["tokenizer_source must be", "line 4"]),
    ("tokenizer:\n  source: union\n  pad: 8\n", ["unsupported key 'pad'", "line 6"]),
    ("tokenizer:\n  pad_to_multiple_of: 0\n", ["pad_to_multiple_of must be a positive integer", "line 5"]),
    ("tokenizer:\n  tokens:\n    t: {{source: {{kind: model_token, model: {a}}}}}\n",
     ["tokenizer.tokens['t']", "exactly one of token, token_id", "line 6"]),
    ("tokenizer:\n  tokens:\n    t: {{source: {{kind: one}}}}\n", ["kind must be 'zero' or 'model_token'", "line 6"]),
    ("tokenizer:\n  tokens:\n    t: {{source: x, forse: true}}\n", ["unknown key(s) ['forse']", "line 6"]),
    ("tokenizer:\n  tokens:\n    t: {{source: other}}\n", ["tokens['t'].source", "'other' is not a model", "line 6"]),
    ("chat_template: chatmlx\n", ["'chatmlx' is not 'auto', a known template name", "chatml", "line 4"]),
    ("chat_template: '{{{{ x }}}}'\n", ["neither a template name nor a Jinja template", "line 4"]),
    ("chat_template: 3\n", ["chat_template must be a string", "line 4"]),
])
def test_invalid_tokenizer_settings_name_the_key_and_line(dirs, tail, words):
    with pytest.raises(MergekitYamlError) as e:
        _parse(HEAD + tail, dirs)
    assert all(w in str(e.value) for w in words), str(e.value)
    assert str(e.value).startswith("t.yml")


def test_chat_template_rules_follow_mergekit():
    assert chat_template_text("auto") is None
    literal = "{% for m in messages %}{{ m.content }}{% endfor %}"
    assert chat_template_text(literal) == literal
    assert set(CHAT_TEMPLATES) == {"alpaca", "chatml", "exaone", "llama3", "mistral"}  # mergekit 0.1.5's names
    with pytest.raises(ValueError, match="neither a template name"):
        chat_template_text("line one\nline two without braces")


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


@pytest.mark.parametrize("text", ["", "# a comment only\n", "\n\n"])
def test_an_empty_yaml_is_a_clear_error(text):
    with pytest.raises(MergekitYamlError, match="empty"):
        parse_mergekit_yaml(text, source="t.yml")


def test_boolean_flags_are_read_as_mergekit_reads_them(dirs):
    """A quoted 'false' was kept as a (truthy) string, so `normalize: "false"` normalised; pydantic reads it as
    False, and refuses a value that is no boolean."""
    plan = _parse("merge_method: linear\nmodels: [{{model: {a}}}]\nparameters:\n  weight: 1.0\n"
                  "  normalize: 'false'\n", dirs)
    assert plan.parameters["normalize"] is False
    plan = _parse("merge_method: ties\nbase_model: {base}\nmodels: [{{model: {a}}}]\nparameters:\n  weight: 1.0\n"
                  "  normalize: [{{filter: mlp, value: 'No'}}, {{value: 1}}]\n", dirs)
    assert plan.parameters["normalize"] == [{"filter": "mlp", "value": False}, {"value": True}]
    with pytest.raises(MergekitYamlError) as e:
        _parse("merge_method: ties\nbase_model: {base}\nmodels: [{{model: {a}}}]\nparameters:\n  weight: 1.0\n"
               "  normalize: maybe\n", dirs)
    assert "line 6" in str(e.value) and "parameters.normalize" in str(e.value) and "boolean" in str(e.value)
