"""The lifelong-editing study (experiments/edit/lifelong.py) end to end at its 'test' size: a tiny llama pre-trained
with the trainer on a synthetic facts world, AlphaEdit and sequential ROME editing the facts it knows one at a time,
evaluated every few edits; outputs, resuming (slow: ~1-2 min on CPU), and the helpers (fast)."""
import json

import numpy as np
import pytest

from experiments.edit import lifelong as L


def test_crosstalk_bad_input_is_a_usage_error(tmp_path, capsys):
    from experiments.edit import crosstalk

    with pytest.raises(SystemExit):
        crosstalk.main(["--study", str(tmp_path), "--edits", "10,x"])
    assert "give comma-separated integers" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        crosstalk.main(["--study", str(tmp_path)])
    assert "not a finished study directory" in capsys.readouterr().err


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    out = tmp_path_factory.mktemp("lifelong")
    results = L.run_study(out, size="test", editors=("alphaedit", "memit"), n_edits=8, eval_every=4,
                          overrides={"memit": {"batch": 3}})
    return out, results


@pytest.mark.slow
def test_study_outputs(study):
    out, r = study
    assert r["complete"]
    for name in ("results.json", "results.jsonl", "report.md", "lifelong.png", "tokenizer.json", "stream.jsonl",
                 "knowledge.json", "baseline.json", "trace.json"):
        assert (out / name).is_file(), name
    assert (out / "model" / "model_config.json").is_file()
    assert json.loads((out / "results.json").read_text())["editors"].keys() == {"alphaedit", "memit"}
    # the model learnt the world before it is edited, and only known facts are edited
    k = r["knowledge"]
    assert k["prompt_known"] >= 0.3 and k["stream"] >= 9, k  # test_study_resumes edits 9
    curve = r["pretrain"]["fact_recall_curve"]  # (step, recall of 128 candidates) at each evaluation
    assert curve[-1][1] >= 0.3 and curve[-1][1] > curve[0][1] + 0.2, curve
    base = r["editors"]["alphaedit"]["curve"][0]["scores"]
    assert base["efficacy"]["mean"] <= 0.1 and base["specificity"]["mean"] >= 0.8  # unedited: ES ~ 0, NS ~ 100
    assert base["unedited_recall"]["mean"] == 1.0  # the unedited sample holds known facts only
    # memit in steps of 3 requests: evaluated after the steps crossing 4 and 8 (at 6 and 8 edits)
    assert [p["edits"] for p in r["editors"]["memit"]["curve"]] == [0, 6, 8]
    assert [p["steps"] for p in r["editors"]["memit"]["curve"]] == [0, 2, 3]
    lines = [json.loads(l) for l in (out / "results.jsonl").read_text().splitlines()]
    assert [(l["editor"], l["edits"]) for l in lines] == [("alphaedit", 4), ("alphaedit", 8), ("memit", 6),
                                                           ("memit", 8)]
    assert r["trace"]["n"] > 0 and len(r["trace"]["mlp_subject"]) == 3
    for name, e in r["editors"].items():
        assert e["edits"] == 8 and e["complete"] and not e["stopped"]
        assert len(e["delta_norms"]) == {"alphaedit": 8, "memit": 3}[name]
        changes = [p["preserved_change"] for p in e["curve"]]
        assert changes[0] == 0.0 and all(0.0 < c < 10 for c in changes[1:]), (name, changes)
        for point in e["curve"]:
            for score in L.SCORES:
                s = point["scores"][score]
                if s["n"] == 0:  # none of the sampled unedited facts is about a subject edited so far (or all are)
                    assert score in ("unedited_same_subject", "unedited_other_subject") and s["se"] is s["mean"] is None
                    continue
                assert 0.0 <= s["mean"] <= 1.0 and s["n"] > 0, (name, score, s)
                np.testing.assert_allclose(s["se"], np.sqrt(s["mean"] * (1 - s["mean"]) / s["n"]))
            assert point["scores"]["unedited_same_subject"]["n"] == 0 or point["edits"] > 0
            u = point["scores"]
            assert u["unedited_same_subject"]["n"] + u["unedited_other_subject"]["n"] == u["unedited_recall"]["n"]
    a = r["editors"]["alphaedit"]
    assert a["settings"]["L2"] > 0 and all(d > 0 for d in a["settings"]["nullspace_dim"].values())
    # the edits work (from ES 0 before): after 4 and 8 edits, the edited facts say their new object (at most one
    # miss in 8), and a held-out paraphrase of most of them too
    four, eight = a["curve"][1]["scores"], a["curve"][2]["scores"]
    assert four["efficacy"]["n"] == 4 and four["efficacy"]["mean"] >= 0.75, four
    assert eight["efficacy"]["n"] == 8 and eight["efficacy"]["mean"] >= 7 / 8, eight
    assert eight["efficacy_top1"]["mean"] >= 0.75 and eight["generalisation"]["mean"] >= 0.5, eight
    report = (out / "report.md").read_text()
    assert "## alphaedit (alphaedit, layers [0, 1], 8 of 8 edits, 1 per step, complete)" in report
    assert "## memit (memit, layers [0, 1], 8 of 8 edits, 3 per step, complete)" in report
    check_crosstalk_runs(out)  # here, not in a test of its own: xdist would build the study again on another worker


def check_crosstalk_runs(out):
    """experiments.edit.crosstalk on a finished study: one row per layer of its window, sqrt(N) scaling."""
    from experiments.edit import crosstalk

    with pytest.raises(SystemExit):  # the test model has 3 layers
        crosstalk.main(["--study", str(out), "--layers", "3"])
    assert crosstalk.main(["--study", str(out), "--edits", "10,100"]) == 0
    res = json.loads((out / "crosstalk.json").read_text())
    assert set(res) == {"0", "1"}  # the test size's window
    for r in res.values():
        assert r["subjects"] > 1 and 0 < r["F_eff"] <= r["F"] and r["rms_chi"] > 0
        assert r["accumulated"]["100"] == pytest.approx(np.sqrt(10) * r["accumulated"]["10"])


@pytest.mark.slow
def test_study_resumes(study):
    """A rerun reuses the model, stream and statistics, and continues an editor from its saved state."""
    out, r = study
    more = L.run_study(out, size="test", editors=("alphaedit",), n_edits=9, eval_every=4,
                       overrides={"memit": {"batch": 3}})
    e = more["editors"]["alphaedit"]
    assert [p["edits"] for p in e["curve"]] == [0, 4, 8, 9] and e["edits"] == 9
    assert e["curve"][:3] == r["editors"]["alphaedit"]["curve"]
    assert more["editors"]["memit"] == r["editors"]["memit"]  # editors of earlier calls stay in the results
    assert len(e["delta_norms"]) == 9 and e["delta_norms"][:8] == r["editors"]["alphaedit"]["delta_norms"]
    with pytest.raises(ValueError, match="holds a study of"):
        L.run_study(out, size="small")


def test_helpers():
    assert L.parse_overrides(["alphaedit.l2_rel=0.05", "rls.layers=1,2", "rome.layers=3",
                              "memit.context=bare"]) == {
        "alphaedit": {"l2_rel": 0.05}, "rls": {"layers": [1, 2]}, "rome": {"layers": [3]},
        "memit": {"context": "bare"}}
    with pytest.raises(ValueError, match=r"unknown editor\(s\) \['grace'\]"):
        L.parse_overrides(["grace.layers=1"])
    with pytest.raises(ValueError, match=r"unknown editor\(s\) \['grace@x'\]"):
        L.parse_overrides(["grace@x.layers=1"])
    # a variant EDITOR@LABEL: the editor's overrides, then its own on top; its own name in results and state
    o = L.parse_overrides(["memit.lambda_rel=0.5", "memit.batch=3", "memit@wide.layers=0,1", "memit@wide.batch=2"])
    assert o == {"memit": {"lambda_rel": 0.5, "batch": 3}, "memit@wide": {"layers": [0, 1], "batch": 2}}
    assert L.parse_overrides(["rls@lam0.25.lambda_rel=0.25"]) == {"rls@lam0.25": {"lambda_rel": 0.25}}
    plain, wide = (L.make_plan(n, L.SIZES["test"], None, 4, o) for n in ("memit", "memit@wide"))
    assert (plain.name, plain.method, plain.layers, plain.batch) == ("memit", "memit", (0, 1), 3)
    assert (wide.name, wide.method, wide.layers, wide.batch) == ("memit@wide", "memit", (0, 1), 2)
    assert plain.extra["lambda_rel"] == wide.extra["lambda_rel"] == 0.5 and wide.n_edits == 4
    with pytest.raises(ValueError, match="given twice"):
        L.run_study("/nonexistent", editors=("memit", "memit"))
    with pytest.raises(ValueError, match="EDITOR.FIELD=VALUE"):
        L.parse_overrides(["l2_rel=0.05"])
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({"<|endoftext|>": 0, "a": 1, "b": 2, "c": 3}, unk_token="<|endoftext|>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    rows = L.packed_rows(tok, ["a b", "c", "a b c a"], seq_len=5)
    # [SEP a b SEP c SEP] then [SEP a b c a SEP] (a text is never split across rows)
    np.testing.assert_array_equal(rows["inputs"], [[0, 1, 2, 0, 3], [0, 1, 2, 3, 1]])
    np.testing.assert_array_equal(rows["targets"], [[1, 2, 0, 3, 0], [1, 2, 3, 1, 0]])
    np.testing.assert_array_equal(rows["loss_mask"], np.ones((2, 5)))
    assert L.binomial(0.9, 100) == pytest.approx(0.03)
    # layers from a causal trace: ROME at the peak of the subject's MLP effect, MEMIT on the best window
    trace = {"mlp_subject": [0.1, 0.5, 0.4, 0.45, 0.0]}
    sz = L.choose_layers(L.dataclasses.replace(L.SIZES["test"], rome_layer=None, window=3), trace)
    assert sz.rome_layer == 1 and sz.window == (1, 2, 3)
    assert L.choose_layers(L.SIZES["test"], trace) == L.SIZES["test"]  # fixed layers stay
    with pytest.raises(ValueError, match="ROME: 1"):
        L.make_plan("rome", L.SIZES["test"], None, 4, {"rome": {"batch": 2}})
    with pytest.raises(ValueError, match="unknown size"):
        L.run_study("/nonexistent/never", size="huge")
    with pytest.raises(ValueError, match=r"subject_mix must be in \[0, 1\]"):
        L.make_plan("rls", L.SIZES["test"], None, 4, {"rls": {"subject_mix": 1.5}})
    # AlphaEdit's null space by energy share: a setting of the plan, off (0) unless given
    e = L.make_plan("alphaedit@e20", L.SIZES["test"], None, 4, {"alphaedit@e20": {"null_energy": 0.2}})
    assert e.extra["null_energy"] == 0.2 and L.make_plan("alphaedit", L.SIZES["test"], None, 4, {}).extra[
        "null_energy"] == 0.0


def test_subject_end_mask_and_mixed_stats():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from configurable_fm.ops.update.stats import KeyStats

    vocab = {"<|endoftext|>": 0, "Ann": 1, "Lee": 2, "Bo": 3, "is": 4, "x": 5}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<|endoftext|>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    rows = np.array([[0, 1, 2, 4, 5, 0, 3, 2], [2, 4, 1, 0, 1, 2, 0, 0]])
    # 'Ann Lee' ends at (0, 2) and (1, 5); 'Bo Lee' at (0, 7); a lone 'Lee' (1, 0) or 'Ann' (1, 2) is no mention
    m = L.subject_end_mask(tok, rows, ["Ann Lee", "Bo Lee"])
    assert sorted(zip(*np.nonzero(m))) == [(0, 2), (0, 7), (1, 5)]
    a = {0: KeyStats(np.eye(2, dtype=np.float32), 10, 0, "p", "corpus")}
    b = {0: KeyStats(np.diag([3.0, 5.0]).astype(np.float32), 4, 0, "p", "corpus-subjects")}
    assert L.mixed_stats(a, b, 0.0) is a
    mixed = L.mixed_stats(a, b, 0.25)[0]
    np.testing.assert_allclose(mixed.second_moment, np.diag([1.5, 2.0]))
    assert (mixed.layer, mixed.point, mixed.corpus) == (0, "p", "corpus+0.25*corpus-subjects")


def test_diagnose_layer_report_closed_form():
    """experiments.edit.diagnose.layer_report: one key k, MEMIT's update writes the share s / (lambda + s) of its
    residual, s = k^T C^-1 k (Sherman-Morrison); updates along a dead eigen-direction of C count as dead."""
    from configurable_fm.ops.update import memit_update
    from experiments.edit.diagnose import dead_directions, layer_report

    rng = np.random.default_rng(0)
    f, d, lam = 6, 4, 3.0
    a = rng.normal(size=(f, f))
    c = a @ a.T / f + 0.1 * np.eye(f)
    k, r = rng.normal(size=(1, f)), rng.normal(size=(1, d))
    dw = np.asarray(memit_update(k, r, c, lam).materialize(), np.float64)
    rep = layer_report(c, k, r, dw, dead_directions(c))
    s = float((k @ np.linalg.solve(c, k.T))[0, 0])
    assert rep["written"] == pytest.approx(s / (lam + s), rel=1e-5)
    assert rep["s_rel"] == pytest.approx(s / f, rel=1e-6)
    assert rep["dW"] == pytest.approx(np.linalg.norm(dw), rel=1e-12) and rep["dead"] < 1e-12
    ev, vecs = np.linalg.eigh(c)
    c_dead = (vecs * np.r_[1e-9, ev[1:]]) @ vecs.T  # the first direction dead
    along = np.outer(vecs[:, 0], r[0])  # an update entirely along it
    assert layer_report(c_dead, k, r, along, dead_directions(c_dead))["dead"] == pytest.approx(1.0)


def test_crosstalk_is_what_a_memit_step_writes_on_another_key():
    """experiments.edit.crosstalk: chi(s, j) = <k_j, k_s>_{C^-1} / <k_s, k_s>_{C^-1} is the ratio of what a
    one-key MEMIT step for s writes at k_j to what it writes at k_s, for any lambda; invariant under a change of key
    basis (k -> A k, C -> A C A^T); orthogonal whitened keys have none."""
    from configurable_fm.ops.update import memit_update
    from experiments.edit.crosstalk import crosstalk

    rng = np.random.default_rng(1)
    f, d = 5, 3
    a = rng.normal(size=(f, f))
    c = a @ a.T / f + 0.2 * np.eye(f)
    keys, r = rng.normal(size=(3, f)), rng.normal(size=(1, d))
    w = keys @ np.linalg.inv(np.linalg.cholesky(c)).T
    chi = (w @ w.T) / np.diag(w @ w.T)[None, :]
    for lam in (0.5, 4.0):
        dw = np.asarray(memit_update(keys[1:2], r, c, lam).materialize(), np.float64)  # an edit of subject 1
        wrote = keys @ dw  # (3, D): what each key's output gets
        np.testing.assert_allclose(wrote[2] / wrote[1], np.full(d, chi[2, 1]), rtol=1e-5)
    rep = crosstalk(keys, c)
    off = chi[~np.eye(3, dtype=bool)]
    assert rep["rms_chi"] == pytest.approx(np.sqrt(np.mean(off ** 2)), rel=1e-9)
    t = rng.normal(size=(f, f))
    assert crosstalk(keys @ t.T, t @ c @ t.T)["rms_chi"] == pytest.approx(rep["rms_chi"], rel=1e-6)
    assert crosstalk(np.eye(f)[:3], np.eye(f))["rms_chi"] == 0.0


@pytest.mark.slow
def test_diagnose_runs_on_the_study(study):
    from experiments.edit import diagnose

    out, _ = study
    assert diagnose.main(["--study", str(out), "--n", "4", "--batches", "4,1", "--ridges", "0,0.01",
                          "--v_steps", "2,4", "--stats_tokens", "2000"]) == 0
    res = json.loads((out / "diagnose.json").read_text())
    assert len(res) == 8 and sum(name.endswith("v_steps 4") for name in res) == 4
    for name, r in res.items():
        assert np.isfinite(r["value_loss"]) and r["n"] == 4 and 0 <= r["ES"] <= 100
        for layer in r["layers"].values():
            assert 0 <= layer["written"] < 1 and layer["dW"] > 0 and 0 <= layer["dead"] <= 1


def test_diagnose_bad_input_is_a_usage_error(tmp_path, capsys):
    from experiments.edit import diagnose

    with pytest.raises(SystemExit):
        diagnose.main(["--study", str(tmp_path)])
    assert "not a finished study directory (no study.json, stream.jsonl, model)" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        diagnose.main(["--study", str(tmp_path), "--batches", "1,x"])
    assert "'1,x' is not a comma-separated list of int" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        diagnose.main(["--study", str(tmp_path), "--v_steps", "0"])
    assert "--v_steps must be at least 1" in capsys.readouterr().err
