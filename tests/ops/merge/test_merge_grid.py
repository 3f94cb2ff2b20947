"""The multi-task merging study (experiments/merge/multitask.py, stage kind 'merge_grid' in experiments/merge/grid.py):
the whole pipeline end to end on CPU (tiny pre-trained llama, character tokenizer), its files and numbers, and the
pieces: grid expansion, validation/test problems, joint scoring, selection on validation."""
import csv
import json
import math
import subprocess
import sys

import numpy as np
import pytest

from configurable_fm.bricks.paths import flat_params
from configurable_fm.data.synthetic import Example, evaluate_examples, get_task, make_task
from configurable_fm.interop.loader import load_model
from configurable_fm.models.llama import LlamaConfig
from configurable_fm.ops.merge import tree
from experiments.merge import grid as study
from configurable_fm.stages import run
from configurable_fm.train.data import load_task_tokenizer
from experiments.merge import multitask
from tests.helpers import random_llama
from tests.train.test_finetune import EOS, PAD, VOCAB, use_char_tokenizer, write_char_tokenizer
from tests.train.test_train_cli import ROOT, child_env


@pytest.fixture(scope="module")
def char_tok(tmp_path_factory):
    return write_char_tokenizer(tmp_path_factory.mktemp("tok") / "tokenizer.json")


def char_config(tok):
    """experiments/merge/multitask.py:test with the character tokenizer (vocabulary 128) and save_best on, and the
    same as command-line overrides."""
    c = multitask.get_config("test")
    flags = []
    for i, s in enumerate(c.stages):
        use_char_tokenizer(s, tok)
        flags += [f"--config.stages[{i}].tokenizer={tok}", f"--config.stages[{i}].token_ids.eos={EOS}",
                  f"--config.stages[{i}].token_ids.pad={PAD}"]
        if "model" in s:
            flags.append(f"--config.stages[{i}].model.vocab_size={VOCAB}")
    c.stages[-1].save_best = True
    flags.append(f"--config.stages[{len(c.stages) - 1}].save_best=True")
    return c, flags


@pytest.fixture(scope="module")
def study_run(tmp_path_factory, char_tok):
    """The study through scripts/run.py in a subprocess (a persistent compilation cache: the five train stages
    share one train-step program), then `run` of the same config in this process: every stage is skipped and
    the records come back."""
    c, flags = char_config(char_tok)
    workdir = tmp_path_factory.mktemp("study") / "run"
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "run.py"), "--config",
                           "experiments/merge/multitask.py:test", "--workdir", str(workdir), *flags],
                          cwd=ROOT, env=child_env(), capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    result = run(c, workdir, log=lambda s: None)
    assert [r.status for r in result.stages] == ["skipped"] * len(c.stages)
    return result, workdir


@pytest.mark.slow  # the whole grid study (about 40 s in CI); the parts have fast tests below
def test_study_writes_table_plots_and_every_score(study_run):
    result, workdir = study_run
    names = [r.name for r in result.stages]
    assert names == ["pretrain"] + [f"finetune_{t}" for t in multitask.LOCAL_TASKS] + ["merge_grid"]
    d = workdir / result["merge_grid"].dir
    for f in ("results.csv", "results.json", "table.md", "methods.png", "hparams.png"):
        assert (d / f).stat().st_size > 0, f
    groups = [s["label"] if s.get("label") else s["method"] for s in multitask.SMALL_GRID]
    assert {"linear", "task_arithmetic", "ties", "dare_ties", "dare_linear", "breadcrumbs_ties", "della",
            "model_stock"} <= set(groups)
    rows = list(csv.DictReader(open(d / "results.csv")))
    points = study.grid_points(multitask.SMALL_GRID)
    labels = ["base"] + [f"finetune:{t}" for t in multitask.LOCAL_TASKS] + [p["label"] for p in points]
    # every model x task x set, once
    assert sorted((r["label"], r["task"], r["set"]) for r in rows) == sorted(
        (lb, t, s) for lb in labels for t in multitask.LOCAL_TASKS for s in ("val", "test"))
    assert all(0.0 <= float(r["exact_match"]) <= 1.0 for r in rows)
    table = (d / "table.md").read_text()
    assert "problems per task: one task's accuracy has a standard error of at most" in table
    for g in groups:
        assert f"| {g} |" in table, g
    for t in multitask.LOCAL_TASKS:
        assert t in table.splitlines()[0], t
    js = json.loads((d / "results.json").read_text())
    assert [c["group"] for c in js["chosen"]] == groups
    for c in js["chosen"]:
        assert all(0.0 <= v <= 1.0 for v in c["test"].values())
        assert set(c["test"]) == set(multitask.LOCAL_TASKS)
    report = (workdir / "report.md").read_text()
    assert f"]({result['merge_grid'].dir}/methods.png)" in report and "hparams.png" in report
    assert result["merge_grid"].metrics["points"] == len(points)


@pytest.mark.slow  # the whole grid study (about 40 s in CI); the parts have fast tests below
def test_saved_best_merge_is_the_tree_merge_of_the_finetunes(study_run):
    """The stage's output (save_best) equals tree.merge of the chosen point, recomputed from the checkpoints."""
    result, workdir = study_run
    src = {r.name: r.model_source(workdir) for r in result.stages}
    best = result["merge_grid"].metrics["best"]
    point = next(p for p in study.grid_points(multitask.SMALL_GRID) if p["label"] == best)
    fts = [load_model(src[f"finetune_{t}"]) for t in multitask.LOCAL_TASKS]
    base = None if point["method"] == "linear" else load_model(src["pretrain"])
    expected = flat_params(tree.merge(point["method"], base, fts, parameters=point["parameters"], seed=0))
    got = flat_params(load_model(src["merge_grid"]))
    assert list(got) == list(expected)
    for k in got:
        np.testing.assert_allclose(np.asarray(got[k]), np.asarray(expected[k]), rtol=0, atol=1e-6, err_msg=k)


def test_grid_points_expand_sweeps_in_order():
    pts = study.grid_points([
        {"method": "linear", "parameters": {"weight": 1.0}},
        {"method": "ties", "parameters": {"weight": 1.0}, "sweep": {"density": [0.2, 0.5], "lambda": [1.0, 1.5]}},
        {"method": "ties", "label": "ties_count", "parameters": {"election": "count"}, "sweep": {"density": [0.3]}},
    ])
    assert [p["label"] for p in pts] == ["linear", "ties density=0.2 lambda=1", "ties density=0.2 lambda=1.5",
                                         "ties density=0.5 lambda=1", "ties density=0.5 lambda=1.5",
                                         "ties_count density=0.3"]
    assert pts[2]["parameters"] == {"weight": 1.0, "density": 0.2, "lambda": 1.5}
    assert pts[2]["swept"] == {"density": 0.2, "lambda": 1.5} and pts[0]["swept"] == {}
    assert pts[5]["group"] == "ties_count" and pts[5]["method"] == "ties"


@pytest.mark.parametrize("spec,message", [
    ([{"method": "tise"}], "unknown merge method 'tise'"),
    ([{"method": "ties", "sweep": {"density": []}}], r"sweep.density must be a non-empty list"),
    ([{"method": "ties", "parameters": {"density": 0.2}, "sweep": {"density": [0.5]}}], "both in `parameters`"),
    ([{"method": "ties"}, {"method": "ties"}], "label 'ties' is used twice"),
    ([{"method": "ties", "lambdas": [1]}], r"unknown key\(s\) \['lambdas'\]"),
])
def test_grid_errors_name_the_entry(spec, message):
    with pytest.raises(ValueError, match=message):
        study.grid_points(spec)


@pytest.mark.parametrize("task", ["sort", "parity"])
def test_validation_problems_avoid_finetuning_and_test_problems(task):
    t = get_task(task)
    ps = study.problems(task, 40, 30, val_seed=1, test_seed=0, exclude_n=300, exclude_seed=0)
    assert len(ps["val"]) == 40 and len(ps["test"]) == 30
    canon = lambda exs: {t.canonical(e.prompt) for e in exs}
    trained = canon(t.examples("train", 300, 0))
    assert not canon(ps["val"]) & trained
    assert not canon(ps["val"]) & canon(ps["test"])
    assert len(canon(ps["val"])) == 40 and len({e.prompt for e in ps["test"]}) == 30
    assert all(t.split_of(e.prompt) == "train" for e in ps["val"])
    assert all(t.split_of(e.prompt) == "test" for e in ps["test"])
    again = study.problems(task, 40, 30, val_seed=1, test_seed=0, exclude_n=300, exclude_seed=0)
    assert again == ps  # deterministic


def test_problems_error_names_a_task_with_too_few_unseen_problems():
    tiny = make_task("parity", min_len=2, max_len=3)  # 12 problems: 200 fine-tuning draws see every train one
    with pytest.raises(ValueError, match=r"task 'parity': cannot find 5 validation problems outside the \d+ "):
        study.problems(tiny, 5, 1, val_seed=1, test_seed=0, exclude_n=200, exclude_seed=0)


def test_joint_scoring_matches_per_example_answers(char_tok):
    """score() runs one generation over every set; each set's score is its own fraction of exact matches. The
    answers are set to the model's own greedy predictions on chosen rows, so the expected fractions are known."""
    tok = load_task_tokenizer(str(char_tok), eos=EOS, pad=PAD)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_layers=1, num_heads=2,
                      num_kv_heads=1, max_position_embeddings=128)
    model = random_llama(cfg, 3)
    base = {("sort", "val"): get_task("sort").examples("test", 3, 0),
            ("count", "val"): get_task("count").examples("test", 4, 0),
            ("count", "test"): get_task("count").examples("test", 2, 5)}
    flat = [e for v in base.values() for e in v]
    out = evaluate_examples(model, tok.tokenizer, flat, batch_size=4, max_new_tokens=3, eos_id=EOS, pad_id=PAD,
                            n_show=len(flat))
    preds = iter(e["prediction"] for e in out["examples"])
    right = {("sort", "val"): [True, False, True], ("count", "val"): [False, False, False, True],
             ("count", "test"): [True, True]}
    sets = {k: [Example(e.prompt, pred if ok else " not this")
                for e, ok, pred in zip(base[k], right[k], [next(preds) for _ in base[k]])] for k in base}
    got = study.score(model, tok, sets, batch_size=4, max_new_tokens=3)
    assert got == {k: float(np.mean(v)) for k, v in right.items()}


def _rows(label, acc):
    return [{"label": label, "task": t, "set": s, "exact_match": v} for (t, s), v in acc.items()]


def test_selection_uses_validation_and_normalizes_by_the_individual_finetunes():
    tasks = ["a", "b"]
    acc = lambda av, bv, at, bt: {("a", "val"): av, ("b", "val"): bv, ("a", "test"): at, ("b", "test"): bt}
    rows = (_rows("base", acc(0.1, 0.0, 0.0, 0.0)) + _rows("finetune:a", acc(0.8, 0.0, 0.5, 0.1))
            + _rows("finetune:b", acc(0.0, 0.4, 0.2, 0.0))  # b's individual test score is 0: left out of norm_test
            + _rows("ta l=1", acc(0.4, 0.4, 0.5, 0.0)) + _rows("ta l=2", acc(0.4, 0.2, 0.5, 0.9))
            + _rows("ties", acc(0.8, 0.4, 0.25, 0.3)))
    points = [{"method": "task_arithmetic", "group": "ta", "label": "ta l=1", "parameters": {"lambda": 1},
               "swept": {"lambda": 1}},
              {"method": "task_arithmetic", "group": "ta", "label": "ta l=2", "parameters": {"lambda": 2},
               "swept": {"lambda": 2}},
              {"method": "ties", "group": "ties", "label": "ties", "parameters": {}, "swept": {}}]
    r = study.summarize(rows, tasks, points)
    ta, ties = r["chosen"]
    assert ta["label"] == "ta l=1"  # val: (0.5 + 1.0) / 2 = 0.75 beats (0.5 + 0.5) / 2, though l=2 is better on test
    assert ta["norm_val"] == pytest.approx(0.75) and ta["norm_test"] == pytest.approx(1.0)  # only task a counts
    assert ta["avg_test"] == pytest.approx(0.25)
    assert ties["norm_val"] == pytest.approx(1.0) and ties["norm_test_per_task"] == {"a": 0.5}
    assert r["individual"]["test"] == {"a": 0.5, "b": 0.0} and r["individual"]["avg_val"] == pytest.approx(0.6)
    assert r["base"]["norm_val"] == pytest.approx(0.0625)  # (0.1/0.8 + 0/0.4) / 2
    table = study._table(r, tasks)
    assert table.index("| ta |") < table.index("| ties |")  # rows by normalized test accuracy
    assert "standard error" not in table  # no legend without the problems' statistics
    r["uncertainty"] = {"n_test": 64, "max_se_task": 0.0625, "max_se_mean": 0.5 / math.sqrt(128),
                        "chance": {"a": 0.5, "b": 0.25}}
    assert ("n = 64 problems per task: one task's accuracy has a standard error of at most 6.2 points, the mean "
            "over the 2 tasks at most 4.4") in study._table(r, tasks) and "a 50.0%, b 25.0%" in study._table(r, tasks)
    assert math.isnan(study.mean_or_nan([]))


def test_stage_config_errors(tmp_path):
    from configurable_fm.stages import StageContext

    cfg = study.merge_grid_config(base="b", tasks=["sort", "reverse"], models=["x"], methods=[{"method": "linear"}])
    ctx = StageContext(tmp_path, tmp_path, 0, "g", {})
    with pytest.raises(ValueError, match=r"2 tasks \['sort', 'reverse'\] but 1 models"):
        study.merge_grid_stage(cfg, ctx)
    cfg.models = ("x", "y")
    cfg.tasks = ("sort", "sortt")
    with pytest.raises(ValueError, match=r"unknown task\(s\) \['sortt'\]"):
        study.merge_grid_stage(cfg, ctx)
