"""The 'edit' stage kind (stages/edit.py) in a tiny study: pretrain (study_tiny:test with a character tokenizer;
run once per process: conftest.py) -> edit (rome.py:test from '@pretrain'); the stage writes its model, delta,
metrics.json and report.md, its metrics reach the study report, the edited model is the pretrained one plus the
delta, and a rerun skips every stage. A stage with the script's keys (output, format) is refused before anything
runs."""
import json

import jax.numpy as jnp
import numpy as np
import pytest

from configurable_fm.bricks.deltas import apply, load_delta
from configurable_fm.errors import ConfigError
from configurable_fm.interop.loader import load_model
from configurable_fm.models.scoring import logits
from configurable_fm.stages import STAGES, run, stage
from experiments import study_tiny
from experiments.edit import rome, stage_config

FACTS = [("France", " Paris", " Rome"), ("Spain", " Madrid", " Oslo")]


def edit_stage_config(tmp_path, tok):
    reqs = tmp_path / "requests.jsonl"
    reqs.write_text("".join(json.dumps({"prompt": "The capital of {} is", "subject": s, "target_new": new,
                                        "target_true": true, "paraphrase_prompts": ["{}'s capital is"],
                                        "neighborhood_prompts": ["The capital of Peru is"],
                                        "neighborhood_targets": [" Lima"]}) + "\n" for s, true, new in FACTS))
    (tmp_path / "corpus.txt").write_text("The capital of Peru is Lima. Paris is in France; Madrid is in Spain. " * 8)
    e = rome.get_config("test")
    e.update(input="@pretrain", tokenizer=str(tok), requests=str(reqs))
    e.stats.update(corpus=str(tmp_path / "corpus.txt"), cache_dir=str(tmp_path / "stats"))
    return e


def test_study_train_edit_runs_and_reruns_skip(pretrained_study, tmp_path):
    assert "edit" in STAGES
    tok, pre, workdir = pretrained_study  # its pretrain stage is complete (conftest.py)
    c = study_tiny.get_config("test")
    c.stages = [pre, stage_config(edit_stage_config(tmp_path, tok), "edit")]
    logs = []
    result = run(c, workdir, log=logs.append)
    assert [r.status for r in result.stages] == ["skipped", "ran"]
    rec = result["edit"]
    stage_dir = workdir / rec.dir
    assert {"model", "delta", "metrics.json", "report.md", "stage.json"} <= {p.name for p in stage_dir.iterdir()}
    assert rec.metrics["n_requests"] == 2 and "efficacy_score_after" in rec.metrics
    metrics = json.loads((stage_dir / "metrics.json").read_text())
    assert metrics["method"] == "rome" and metrics["input"] == str(workdir / "stages/00_pretrain/model")
    pretrained = load_model(result["pretrain"].model_source(workdir))
    edited = load_model(rec.model_source(workdir))
    ids = jnp.asarray(np.arange(24, dtype=np.int32).reshape(2, 12) + 4)
    delta = load_delta(stage_dir / "delta")
    # one compiled forward for both models, not two eager ones (~2 s)
    np.testing.assert_allclose(logits(edited, ids), logits(apply(pretrained, delta), ids), atol=1e-5)
    assert "Edited @pretrain with rome at layers [1]" in (workdir / "report.md").read_text()
    again = run(c, workdir, log=logs.append)
    assert [r.status for r in again.stages] == ["skipped", "skipped"]


def test_edit_stage_refuses_script_keys(tmp_path):
    c = study_tiny.get_config("test")
    e = rome.get_config("test")
    e.update(input="@pretrain", requests=str(tmp_path / "r.jsonl"))
    c.stages = [c.stages[0], stage("edit", "edit", e)]
    with pytest.raises(ConfigError, match="output"):
        run(c, tmp_path / "study", log=lambda s: None)
    assert not (tmp_path / "study").exists()
