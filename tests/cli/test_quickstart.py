"""The quickstart job end to end with tiny settings (loads the packaged SmolLM2: real_model), and its helpers."""
import io
import json
import sys

import numpy as np
import pytest

from configurable_fm.cli import quickstart
from configurable_fm.train.metrics import ProgressBar


def test_smoothed_ends():
    losses = list(np.linspace(10, 1, 100))
    first, last, k = quickstart.smoothed_ends(losses)
    assert k == 10 and first == pytest.approx(np.mean(losses[:10])) and last == pytest.approx(np.mean(losses[-10:]))
    assert quickstart.smoothed_ends([3.0, 2.0]) == (3.0, 2.0, 1)


def test_kind_totals():
    groups = {"embed_tokens": 100, "layers.0.self_attn": 10, "layers.0.mlp": 20, "layers.0.norms": 1,
              "layers.1.self_attn": 10, "layers.1.mlp": 20, "layers.1.norms": 1, "norm": 1}
    assert dict(quickstart.kind_totals(groups)) == {"embeddings": 100, "attention": 20, "MLP": 40, "norms": 3}


def test_progress_lines_when_not_a_terminal(monkeypatch):
    monkeypatch.delitem(sys.modules, "ipykernel", raising=False)  # imported by nbclient once a notebook test ran here
    out = io.StringIO()
    bar = ProgressBar(100, file=out, every_seconds=0.0)
    assert bar.lines and bar.disabled
    bar.update(10, loss=5.0, tokens_per_s=1500.0)
    bar.update(50, loss=4.0, tokens_per_s=1500.0)
    bar.update(100, loss=3.0)
    bar.close()
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("train step 10/100 (10%): loss 5.0000, 1.5k tok/s, elapsed")
    assert "ETA" in lines[1] and lines[2].startswith("train step 100/100 (100%): loss 3.0000")
    assert ProgressBar(100, file=io.StringIO(), disable=True).lines is False


@pytest.mark.real_model
def test_quickstart_runs_and_reports(tmp_path, monkeypatch):
    from experiments import pretrain

    shipped = pretrain.get_config

    def small_pretrain(arg):
        """The shipped config on one device (the suite's 8 fake CPU devices would shard the 3 steps and their
        evaluations 8 ways: over a minute) and the ~1 MB stdlib_tiny shards (the whole stdlib's take ~15 s to
        build on first use), evaluated on 1 batch; batches of 2 x 32 tokens instead of 8 x 128 (the report has
        the same sections; the 3 steps and their evaluations take ~6 s less)."""
        cfg = shipped(arg)
        cfg.mesh.shape = (1, 1, 1)
        cfg.data.update(dir="data/stdlib_tiny", prepare="stdlib_tiny", max_eval_batches=1, eval_batch_size=2)
        cfg.batch_size, cfg.seq_len = 2, 32
        return cfg

    monkeypatch.setattr(pretrain, "get_config", small_pretrain)
    monkeypatch.setattr(quickstart, "CHAT_PROMPTS", quickstart.CHAT_PROMPTS[:1])  # one question: one compilation
    workdir = tmp_path / "qs"
    logged = []
    path = quickstart.run(workdir, max_new_tokens=4, pretrain_steps=3, log=logged.append)
    md = path.read_text()
    js = json.loads((workdir / "report.json").read_text())
    for key in ("total_seconds", "device", "jax", "flax", "git_revision", "generations", "perplexity"):
        assert key in js
    assert f"jax {js['jax']}" in md and f"flax {js['flax']}" in md and "Total time" in md
    assert js["git_revision"] in md
    assert all(isinstance(g["prompt"], str) and isinstance(g["text"], str) for g in js["generations"])
    assert [g["prompt"] for g in js["generations"]] == list(quickstart.CHAT_PROMPTS[:1])
    assert "Training loss" in md and "mean of the" in md or "first step's loss" in md
    assert js["pretrain"]["steps"] == 3 and "smoothed_last_loss" in js["pretrain"]
    assert js["pretrain"]["best_val_loss"] is not None and "1 held-out batches" in md
    assert "Q4_1-dequantised" in md and "not measured here" in md
    assert (workdir / "bricks.png").exists() and (workdir / "pretrain_loss.png").exists()
