"""Merging from ml-collections configs (stages/merge.py), scripts/merge.py --config, and the 'merge' stage of
a study: pretrain -> fine-tune A, fine-tune B -> merge -> evaluate."""
import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest

from configurable_fm.bricks.paths import flat_params
from configurable_fm.interop.orbax_io import save_model
from configurable_fm.interop.loader import load_model
from configurable_fm.models.llama import LlamaConfig
from configurable_fm.ops.merge import tree
from configurable_fm.stages.merge import merge_config, merge_from_config
from configurable_fm.stages import run, stage
from experiments import study_tiny
from tests.helpers import load_script, marked_slow, random_llama
from tests.train.test_finetune import use_char_tokenizer, write_char_tokenizer

ROOT = Path(__file__).resolve().parents[2]
CFG = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=24, num_layers=2, num_heads=2, num_kv_heads=1,
                  max_position_embeddings=32)


def _script():
    return load_script("merge")


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
    # existing output without --overwrite is refused (before merging); with it, replaced
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        script.main(["--config", cfg_file, "--output", str(tmp_path / "o"), "--format", "orbax", *over])
    assert exit_info.value.code == 1
    captured = capsys.readouterr()
    assert "already exists" in captured.err and "Traceback" not in captured.err, captured.err
    assert "merging" not in captured.out  # refused before the merge ran
    assert script.main(["--config", cfg_file, "--output", str(tmp_path / "o"), "--format", "orbax", "--overwrite",
                        *over]) == 0
    # ... but never when the output is one of the inputs (here the previous output, merged again)
    with pytest.raises(SystemExit) as exit_info:
        script.main(["--config", cfg_file, "--output", str(tmp_path / "o"), "--format", "orbax", "--overwrite",
                     f"--config.base={ckpts['base']}", f"--config.models=('{tmp_path / 'o'}', '{ckpts['b']}')"])
    assert exit_info.value.code == 1 and "would replace an input" in capsys.readouterr().err


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
    (dict(embed_alignment="first"), "`embed_alignment` must be '', 'base', 'union' or one of the input sources"),
    (dict(wieght=1.0), r"unknown key\(s\) \['wieght'\]"),
])
def test_bad_configs_are_errors_naming_the_key(change, message):
    cfg = merge_config("task_arithmetic", ["/nonexistent/a", "/nonexistent/b"], "/nonexistent/base").to_dict()
    cfg.update(change)
    with pytest.raises(ValueError, match=message):
        merge_from_config(cfg)


@pytest.mark.slow  # CI time (~10 s); merge_stage: 2 tests below (slices, models entry); '@' chaining: test_study
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
    c.stage_modules = ("configurable_fm.stages.merge",)
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


# Every registered mergekit method through the config route: (base?, models, parameters, model_parameters).
W2 = [{"weight": 0.7}, {"weight": 0.4}]
METHOD_CASES = {
    "arcee_fusion": (True, ["a"], {}, None),
    "breadcrumbs": (True, ["a", "b"], {"density": 0.8, "gamma": 0.1}, W2),
    "breadcrumbs_ties": (True, ["a", "b"], {"density": 0.8, "gamma": 0.1}, W2),
    "dare_linear": (True, ["a", "b"], {"density": 0.6}, W2),
    "dare_ties": (True, ["a", "b"], {"density": 0.6}, W2),
    "della": (True, ["a", "b"], {"density": 0.6, "epsilon": 0.1}, W2),
    "della_linear": (True, ["a", "b"], {"density": 0.6, "epsilon": 0.1}, W2),
    "karcher": (False, ["a", "b"], {"max_iter": 5}, None),
    "linear": (False, ["a", "b"], {}, W2),
    "model_stock": (True, ["a", "b"], {}, None),
    "multislerp": (True, ["a", "b"], {}, W2),
    "nearswap": (True, ["a"], {"t": 0.01}, None),
    "nuslerp": (True, ["a", "b"], {}, W2),
    "passthrough": (False, ["a"], {}, [{"scale": 0.5}]),
    "ram": (True, ["a", "b"], {}, None),
    "ramplus_tl": (True, ["a", "b"], {}, None),
    "sce": (True, ["a", "b"], {"select_topk": 0.5}, None),
    "slerp": (True, ["a"], {"t": [0.0, 0.3, 1.0]}, None),
    "task_arithmetic": (True, ["a", "b"], {"lambda": 0.9}, W2),
    "ties": (True, ["a", "b"], {"density": 0.5}, W2),
}


TINY = LlamaConfig(vocab_size=8, hidden_size=4, intermediate_size=4, num_layers=2, num_heads=1, num_kv_heads=1,
                   head_dim=4, max_position_embeddings=8)  # few distinct shapes: few kernel compilations


@pytest.fixture(scope="module")
def tiny_ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    return {n: str(save_model(random_llama(TINY, s), root / n)) for n, s in (("base", 0), ("a", 1), ("b", 2))}


def test_method_cases_cover_the_registry():
    from configurable_fm.ops.merge.registry import METHODS, get_method

    get_method("linear")  # registers every method
    assert set(METHOD_CASES) == set(METHODS)


# The config route is the same for every method (merge_from_config checks the keys and calls tree.merge with
# them); each method's own tree.merge is tested in tests/ops/merge. CI runs one method per shape of config: a
# base, two models and per-model weights (task_arithmetic), no base (linear), one model with a per-model
# parameter (passthrough), one model with a list parameter (slerp). The others with --runslow: CI time (~14 s;
# kernels with top-k / sorting compile in 4-8 s each on CPU; 'ties' also runs in test_config_route_equals_tree_merge).
CI_METHODS = {"linear", "passthrough", "slerp", "task_arithmetic"}


@pytest.mark.parametrize("method", marked_slow(sorted(METHOD_CASES), set(METHOD_CASES) - CI_METHODS))
def test_every_method_config_route_equals_tree_merge(tiny_ckpts, method):
    ckpts = tiny_ckpts
    with_base, names, parameters, per_model = METHOD_CASES[method]
    base = ckpts["base"] if with_base else ""
    cfg = merge_config(method, [ckpts[n] for n in names], base, parameters=parameters, model_parameters=per_model,
                       seed=5)
    got = arrays(merge_from_config(cfg))
    expected = arrays(tree.merge(method, load_model(base) if base else None, [load_model(ckpts[n]) for n in names],
                                 parameters=parameters, model_parameters=per_model, seed=5))
    assert_same(got, expected, atol=1e-6)
    first = arrays(load_model(ckpts[names[0]]))
    assert not all(np.array_equal(v, first[k]) for k, v in got.items())  # not a copy of the first input


def test_a_models_entry_equal_to_the_base_is_the_base_as_in_mergekit(tiny_ckpts):
    """(the YAML path's rule, mergekit's normalize_config: for a method that uses the base the entry is dropped;
    kept, it was one more input with a zero task vector: model_stock's angle and dare's per-model draws change)"""
    ckpts = tiny_ckpts
    for method, parameters in (("model_stock", {}), ("dare_linear", {"density": 0.6, "weight": 0.5})):
        plain = merge_config(method, [ckpts["a"], ckpts["b"]], ckpts["base"], parameters=parameters, seed=3)
        listed = merge_config(method, [ckpts["base"], ckpts["a"], ckpts["b"]], ckpts["base"], parameters=parameters,
                              seed=3)
        assert_same(arrays(merge_from_config(listed)), arrays(merge_from_config(plain)), atol=0)
    from configurable_fm.stages import StageContext
    from configurable_fm.stages.merge import merge_stage

    workdir = Path(ckpts["a"]).parent / "stage_base_listed"
    out = merge_stage(listed, StageContext(workdir, workdir / "stage", 0, "m", {}, lambda s: None))
    assert out.metrics["inputs"] == 3 and out.summary.count(ckpts["base"]) == 1  # the base once, then a and b


def test_out_dtype_float64_says_it_is_float32_here(tiny_ckpts):
    logs = []
    cfg = merge_config("linear", [tiny_ckpts["a"], tiny_ckpts["b"]], "", parameters={"weight": 1.0},
                       out_dtype="float64")
    got = arrays(merge_from_config(cfg, log=logs.append))
    assert any("out_dtype float64 is computed and stored as float32 here" in line for line in logs)
    assert {v.dtype for v in got.values()} == {np.dtype(np.float32)}


# ------------------------------------------------------------------------------------------------ slices
def test_slices_config_equals_merge_slices_and_stage_writes_new_depth(tmp_path_factory):
    """SOLAR-style passthrough: layers [0, 2) + [1, 3) of a 3-layer model -> 4 layers, as tree.merge_slices."""
    from configurable_fm.stages import StageContext
    from configurable_fm.stages.merge import merge_stage

    root = tmp_path_factory.mktemp("slices")
    src = str(save_model(random_llama(dataclasses.replace(TINY, num_layers=3), 7), root / "m"))
    slices = [{"sources": [{"model": src, "layer_range": [0, 2]}]},
              {"sources": [{"model": src, "layer_range": [1, 3]}]}]
    cfg = merge_config("passthrough", (), slices=slices)
    got = merge_from_config(cfg)
    assert got.cfg.num_layers == 4
    m = load_model(src)
    expected = tree.merge_slices("passthrough", [{"sources": [{"model": "m", "layer_range": [0, 2]}]},
                                                 {"sources": [{"model": "m", "layer_range": [1, 3]}]}], {"m": m})
    assert_same(arrays(got), arrays(expected))
    a = arrays(m)
    for k, v in arrays(got).items():  # output layer j is input layer (0, 1, 1, 2)[j]; the rest copied
        np.testing.assert_array_equal(v, a[k.replace("layers.2.", "layers.1.").replace("layers.3.", "layers.2.")],
                                      err_msg=k)
    # the stage writes a model with the new depth
    stage_cfg = merge_config("passthrough", (), slices=slices, name="up")
    (root / "stage").mkdir()
    ctx = StageContext(workdir=root, stage_dir=root / "stage", index=0, name="up", sources={}, log=lambda s: None)
    out = merge_stage(stage_cfg, ctx)
    written = load_model(out.model)
    assert written.cfg.num_layers == 4
    assert_same(arrays(written), arrays(expected))
    assert out.metrics["inputs"] == 1 and "2 slice(s)" in out.summary


@pytest.mark.parametrize("change,message", [
    (dict(slices=({"sources": ()},)), r"slices\[0\].sources must be a non-empty list"),
    (dict(slices=({"sources": ({"model": "m", "layer_range": (2, 1)},)},)),
     r"slices\[0\].sources\[0\].*layer_range"),
    (dict(slices=({"sources": ({"modle": "m", "layer_range": (0, 1)},)},)),
     r"slices\[0\].sources\[0\] needs 'model' and 'layer_range'"),
    (dict(slices=({"sources": ({"model": "m", "layer_range": (0, 1)},), "base": "m"},)),
     r"slices\[0\]: unknown key\(s\) \['base'\]"),
    (dict(slices=({"sources": ({"model": "m", "layer_range": (0, 1)},)},), models=("x",)),
     "`models` must be empty with `slices`"),
    (dict(slices=({"sources": ({"model": "m", "layer_range": (0, 1)},)},), base="other"),
     "`base` must be '' or one of the slices' sources"),
    (dict(slices=({"sources": ({"model": "m", "layer_range": (0, 1)},)},), embed_alignment="base"),
     "`embed_alignment` must be empty with `slices`"),
])
def test_bad_slices_configs_are_errors_naming_the_key(change, message):
    cfg = merge_config("passthrough", ()).to_dict()
    cfg.update(change)
    with pytest.raises(ValueError, match=message):
        merge_from_config(cfg)


# ------------------------------------------------------------------------------------- tokenizer alignment
def _word_tokenizer(words, path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token=words[0]))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(path / "tokenizer.json"))
    return tok


@pytest.fixture(scope="module")
def vocab_ckpts(tmp_path_factory):
    """Tiny models (vocab 8) with word tokenizers: base and a share 4 words at other ids, b has base's vocab."""
    root = tmp_path_factory.mktemp("vocab")
    words = {"base": list("abcdefgh"), "a": ["a", "x", "c", "y", "b", "z", "w", "h"], "b": list("abcdefgh")}
    out = {}
    for n, s in (("base", 0), ("a", 1), ("b", 2)):
        out[n] = str(save_model(random_llama(TINY, s), root / n))
        _word_tokenizer(words[n], root / n)
    out["no_tok"] = str(save_model(random_llama(TINY, 3), root / "no_tok"))
    return out


@pytest.mark.parametrize("alignment", ["union", "a"])
def test_tokenizer_alignment_config_equals_tree_merge(vocab_ckpts, alignment):
    from configurable_fm.interop.tokenizers import load_tokenizer

    c = vocab_ckpts
    align = c["a"] if alignment == "a" else "union"
    cfg = merge_config("task_arithmetic", [c["a"], c["b"]], c["base"], parameters={"weight": 0.5},
                       embed_alignment=align)
    got, tok = merge_from_config(cfg, with_tokenizer=True)
    expected, expected_tok = tree.merge(
        "task_arithmetic", arrays(load_model(c["base"])), {"model_0": arrays(load_model(c["a"])),
                                                            "model_1": arrays(load_model(c["b"]))},
        parameters={"weight": 0.5}, embed_alignment="union" if alignment == "union" else "model_0",
        tokenizers={n: load_tokenizer(c[k]) for n, k in (("base", "base"), ("model_0", "a"), ("model_1", "b"))})
    v = 12 if alignment == "union" else 8  # union: a..h + x, y, z, w
    assert got.cfg.vocab_size == v and tok.get_vocab() == expected_tok.get_vocab()
    assert tok.get_vocab_size() == v
    assert_same(arrays(got), {k: np.asarray(x) for k, x in expected.items()}, atol=1e-6)
    assert merge_from_config(cfg).cfg.vocab_size == v


def test_tokenizer_alignment_needs_every_tokenizer(vocab_ckpts):
    c = vocab_ckpts
    cfg = merge_config("task_arithmetic", [c["a"], c["no_tok"]], c["base"], parameters={"weight": 0.5},
                       embed_alignment="union")
    with pytest.raises(ValueError, match=r"needs the tokenizer of every input, but model_1 \(.*no_tok'\) has none"):
        merge_from_config(cfg)
