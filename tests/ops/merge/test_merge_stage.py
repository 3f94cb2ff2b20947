"""Merging from ml-collections configs (ops/merge/stage.py), scripts/merge.py --config, and the 'merge' stage of
a study: pretrain -> fine-tune A, fine-tune B -> merge -> evaluate."""
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

from configurable_fm.bricks.paths import flat_params
from configurable_fm.interop.orbax_io import save_model
from configurable_fm.models.factory import load_model
from configurable_fm.models.llama import LlamaConfig
from configurable_fm.ops.merge import tree
from configurable_fm.ops.merge.stage import merge_config, merge_from_config
from configurable_fm.pipeline import evaluate_config, run, stage
from experiments import study_tiny
from tests.helpers import random_llama
from tests.train.test_finetune import use_char_tokenizer, write_char_tokenizer

ROOT = Path(__file__).resolve().parents[3]
CFG = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=24, num_layers=2, num_heads=2, num_kv_heads=1,
                  max_position_embeddings=32)


def _script():
    spec = importlib.util.spec_from_file_location("merge_script_cfg", ROOT / "scripts" / "merge.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def arrays(model):
    return {k: np.asarray(v) for k, v in flat_params(model).items()}


def assert_same(got, expected, atol=0.0):
    assert set(got) == set(expected)
    for k in expected:
        assert got[k].dtype == expected[k].dtype, k
        np.testing.assert_allclose(got[k], expected[k], atol=atol, rtol=0, err_msg=k)


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpts")
    return {n: str(save_model(random_llama(CFG, s), root / n)) for n, s in (("base", 0), ("a", 1), ("b", 2))}


@pytest.mark.parametrize("method,parameters,per_model", [
    ("task_arithmetic", {"weight": 0.5}, [{"weight": 1.0}, {"weight": [0.0, 1.0]}]),
    ("ties", {"density": 0.5, "weight": 1.0}, None),
])
def test_config_route_equals_tree_merge(ckpts, method, parameters, per_model):
    cfg = merge_config(method, [ckpts["a"], ckpts["b"]], ckpts["base"], parameters=parameters,
                       model_parameters=per_model, seed=3)
    got = merge_from_config(cfg)
    expected = tree.merge(method, load_model(ckpts["base"]), [load_model(ckpts["a"]), load_model(ckpts["b"])],
                          parameters=parameters, model_parameters=per_model, seed=3)
    assert_same(arrays(got), arrays(expected))
    a = arrays(load_model(ckpts["a"]))
    assert not all(np.allclose(v, a[k]) for k, v in arrays(got).items())  # a real merge, not a copy


def test_script_config_route_writes_orbax_and_hf(ckpts, tmp_path, capsys):
    script = _script()
    over = [f"--config.base={ckpts['base']}", f"--config.models=('{ckpts['a']}', '{ckpts['b']}')"]
    cfg_file = str(ROOT / "experiments" / "merge" / "task_arithmetic_tiny.py")
    assert script.main(["--config", cfg_file, "--output", str(tmp_path / "o"), "--format", "orbax",
                        "--config.parameters.weight=0.3", *over]) == 0
    expected = tree.merge("task_arithmetic", load_model(ckpts["base"]), [load_model(ckpts["a"]), load_model(ckpts["b"])],
                          parameters={"weight": 0.3})
    assert_same(arrays(load_model(tmp_path / "o")), arrays(expected))
    assert script.main(["--config", f"{cfg_file}:ties", "--output", str(tmp_path / "h"), *over]) == 0
    assert json.loads((tmp_path / "h" / "config.json").read_text())["num_hidden_layers"] == 2
    ties = tree.merge("ties", load_model(ckpts["base"]), [load_model(ckpts["a"]), load_model(ckpts["b"])],
                      parameters={"density": 0.5, "weight": 1.0})
    assert_same(arrays(load_model(tmp_path / "h")), arrays(ties), atol=1e-7)
    # existing output without --overwrite is refused; with it, replaced
    with pytest.raises(Exception, match="exist"):
        script.main(["--config", cfg_file, "--output", str(tmp_path / "o"), "--format", "orbax", *over])
    assert script.main(["--config", cfg_file, "--output", str(tmp_path / "o"), "--format", "orbax", "--overwrite",
                        *over]) == 0


@pytest.mark.parametrize("argv,message", [
    (["--output", "x"], "exactly one of --mergekit_yaml .* neither"),
    (["--config", "experiments/merge/task_arithmetic_tiny.py", "--mergekit_yaml", "m.yml", "--output", "x"],
     "exactly one of .* both"),
    (["--config", "experiments/merge/nope.py", "--output", "x"], "no such config file"),
    (["--config", "experiments/merge/task_arithmetic_tiny.py:dare", "--output", "x"], "unknown .* variant 'dare'"),
    (["--config", "experiments/merge/task_arithmetic_tiny.py", "--output", "x", "--config.methd=ties"],
     "no key 'methd' .*did you mean 'method'"),
    (["--config", "experiments/merge/task_arithmetic_tiny.py", "--output", "x", "--seed", "1"], "--config.seed"),
    (["--mergekit_yaml", "m.yml", "--output", "x", "--format", "orbax"], "--format applies to --config only"),
    (["--config", "experiments/merge/task_arithmetic_tiny.py", "--output", "x", "--config.base=/nonexistent/m"],
     "cannot load a model from '/nonexistent/m'"),
])
def test_script_argument_errors(argv, message, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    with pytest.raises(SystemExit):
        _script().main(argv)
    import re
    assert re.search(message, capsys.readouterr().err), message


@pytest.mark.parametrize("change,message", [
    (dict(models=()), "`models` must be a non-empty list"),
    (dict(method="tise"), "unknown merge method 'tise'"),
    (dict(model_parameters=({"weight": 1.0},)), "`model_parameters` has 1 entries but `models` has 2"),
    (dict(out_dtype="float17"), "unknown `out_dtype` 'float17'"),
    (dict(embed_alignment="first"), "`embed_alignment` must be '' or 'base'"),
    (dict(wieght=1.0), r"unknown key\(s\) \['wieght'\]"),
])
def test_bad_configs_are_errors_naming_the_key(change, message):
    cfg = merge_config("task_arithmetic", ["/nonexistent/a", "/nonexistent/b"], "/nonexistent/base").to_dict()
    cfg.update(change)
    with pytest.raises(ValueError, match=message):
        merge_from_config(cfg)


def test_study_merges_two_finetunes(tmp_path):
    """pretrain -> finetune_a, finetune_b (study_tiny:test settings, character tokenizer) -> merge -> evaluate:
    the merge stage's model is the hand merge of the two fine-tunes onto the pre-trained model."""
    tok = write_char_tokenizer(tmp_path / "tokenizer.json")
    c = study_tiny.get_config("test")
    pre, ft, ev = c.stages
    for s in (pre, ft, ev):
        use_char_tokenizer(s, tok)
    pre.eval_every = 0
    ft.eval_every = 0
    ft.trainable = ("layers.*.mlp.**",)
    ft_b = stage("finetune_b", "train", ft)
    ft_b.optimizer.lr = 1e-2
    ft_a = stage("finetune_a", "train", ft)
    params = {"weight": 0.5}
    mg = merge_config("task_arithmetic", ["@finetune_a", "@finetune_b"], "@pretrain", parameters=params,
                      name="merge")
    ev.models = ("@pretrain", "@merge")
    ev.task_metrics = ()  # validation loss only: no generation to compile
    c.stages = [pre, ft_a, ft_b, mg, ev]
    c.stage_modules = ("configurable_fm.ops.merge.stage",)
    result = run(c, tmp_path / "study", log=lambda s: None)
    paths = {r.name: r.model_source(tmp_path / "study") for r in result.stages}
    assert paths["merge"] == str(tmp_path / "study" / "stages" / "03_merge" / "model")
    merged = arrays(load_model(paths["merge"]))
    expected = arrays(tree.merge("task_arithmetic", load_model(paths["pretrain"]),
                                 [load_model(paths["finetune_a"]), load_model(paths["finetune_b"])], parameters=params))
    assert_same(merged, expected)
    a, b = arrays(load_model(paths["finetune_a"])), arrays(load_model(paths["finetune_b"]))
    mlp = next(k for k in a if ".mlp." in k)
    assert not np.array_equal(a[mlp], b[mlp]) and not np.array_equal(merged[mlp], a[mlp])
    assert result["merge"].metrics["inputs"] == 3
    assert result["merge"].inputs and "@finetune_a" in json.dumps(result["merge"].config)
    assert "val_loss" in json.dumps(result["evaluate"].metrics)
    assert "@merge" in json.loads((tmp_path / "study" / "stages" / "04_evaluate" / "eval.json").read_text()
                                  )["models"][1]["label"]
