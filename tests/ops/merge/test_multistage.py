"""Multi-stage merges (mergekit-multi's multi-document YAML, ops/merge/multistage.py): a chain equals the
single-document merges run by hand and mergekit-multi's own outputs (golden from scripts/mergekit_multi_golden.py),
intermediates are reused when current and redone when their document or inputs change, name errors name the line,
and `cfm-merge --mergekit_yaml multi.yml` runs it end to end."""
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from configurable_fm.errors import OutputExists
from configurable_fm.interop.safetensors_io import TensorStore
from configurable_fm.ops.merge import multistage as M
from configurable_fm.ops.merge import stream
from configurable_fm.ops.merge.mergekit_yaml import MergekitYamlError, load_mergekit_yaml
from tests.helpers import golden_hf_inputs, run_script
from tests.ops.merge.test_stream import hf  # noqa: F401  (the fixture: tiny HF llamas base, ft_a, ft_b)

ROOT = Path(__file__).resolve().parents[3]
GOLDEN = ROOT / "tests" / "golden" / "mergekit_0.1.5"
ATOL = 1e-6  # float32, mergekit (torch) vs ours (jax): measured 4.8e-7 on these N(0, 1) weights


def _tensors(path):
    store = TensorStore(path)
    return {k: np.array(store[k]) for k in store}


def _assert_same(got, expected):
    assert sorted(got) == sorted(expected)
    for k in expected:
        assert got[k].dtype == expected[k].dtype, k
        np.testing.assert_array_equal(got[k], expected[k], err_msg=k)


STAGE1 = """name: first-merge
merge_method: linear
models:
  - model: {ft_a}
    parameters: {{weight: {w}}}
  - model: {ft_b}
    parameters: {{weight: 0.4}}
"""
STAGE2 = """name: second-merge
merge_method: slerp
base_model: first-merge
models:
  - model: {base}
parameters:
  t: [0.2, 0.7]
"""
FINAL = """merge_method: task_arithmetic
base_model: {base}
models:
  - model: second-merge
    parameters: {{weight: 0.5}}
  - model: {ft_a}
    parameters: {{weight: 0.25}}
"""


def _chain(hf, w=0.6, final=True):
    docs = [STAGE1.format(w=w, **hf), STAGE2.format(**hf)] + ([FINAL.format(**hf)] if final else [])
    return "---\n".join(docs)


def _write(path, text):
    path.write_text(text)
    return path


def test_two_stage_chain_equals_the_single_merges_run_by_hand(hf, tmp_path):
    # mergekit's docs/multimerge.md example: stage 1 a linear merge of A and B, stage 2 a slerp of it with C
    final = "merge_method: slerp\nbase_model: first-merge\nmodels:\n  - model: {base}\nparameters:\n  t: 0.3\n"
    yml = _write(tmp_path / "multi.yml", STAGE1.format(w=0.6, **hf) + "---\n" + final.format(**hf))
    lines = []
    chain = M.load_multistage(yml, output=tmp_path / "out")
    assert [s.name for s in chain.stages] == ["first-merge", None]
    assert chain.intermediate_dir == (tmp_path / "out.stages").absolute()  # the default: next to the output
    out = M.run_multistage(chain, progress=False, log=lines.append)
    assert lines == [f"stage 1/2 'first-merge': merging linear of 2 model(s) into {tmp_path / 'out.stages'}"
                     "/first-merge",
                     f"stage 2/2 (final): merging slerp of 2 model(s) into {tmp_path / 'out'}"]
    assert sorted(os.listdir(tmp_path / "out.stages")) == [".first-merge.stage.json", "first-merge"]

    by_hand = tmp_path / "by_hand"
    one = stream.merge_checkpoints(load_mergekit_yaml(_write(tmp_path / "s1.yml", STAGE1.format(w=0.6, **hf)
                                                             .replace("name: first-merge\n", ""))),
                                   by_hand / "one", progress=False)
    two = stream.merge_checkpoints(load_mergekit_yaml(_write(tmp_path / "s2.yml", final.format(**hf)
                                                             .replace("first-merge", str(one)))),
                                   by_hand / "two", progress=False)
    _assert_same(_tensors(tmp_path / "out.stages" / "first-merge"), _tensors(one))
    _assert_same(_tensors(out), _tensors(two))
    assert (out / "config.json").read_text() == (two / "config.json").read_text()


def test_stages_run_in_dependency_order_whatever_the_file_order(hf, tmp_path):
    text = "---\n".join([FINAL.format(**hf), STAGE2.format(**hf), STAGE1.format(w=0.6, **hf)]) + "---\n"
    chain = M.parse_multistage(text, source="m.yml", intermediate_dir=tmp_path / "i", output=tmp_path / "o")
    assert [s.name for s in chain.stages] == ["first-merge", "second-merge", None]
    assert [s.depends for s in chain.stages] == [(), ("first-merge",), ("second-merge",)]
    second = chain.stages[1]
    assert second.plan.base.path == (tmp_path / "i" / "first-merge").absolute() and second.line == 9
    assert chain.final.plan.model_names == ["second-merge", str(hf["ft_a"])]
    # a stage's name wins over a directory of the same name (mergekit replaces the name without looking)
    (tmp_path / "first-merge").mkdir()
    shutil.copy(hf["base"] / "config.json", tmp_path / "first-merge" / "config.json")
    chain = M.parse_multistage(text, source="m.yml", yaml_dir=tmp_path, intermediate_dir=tmp_path / "i",
                               output=tmp_path / "o")
    assert chain.stages[1].plan.base.path == (tmp_path / "i" / "first-merge").absolute()
    # all named, no output: every stage an intermediate (mergekit-multi without --out-path)
    chain = M.parse_multistage(_chain(hf, final=False), intermediate_dir=tmp_path / "i")
    assert chain.final is None and [s.name for s in chain.stages] == ["first-merge", "second-merge"]


def test_rerun_reuses_current_intermediates_and_redoes_changed_ones(hf, tmp_path, monkeypatch):
    calls = []
    real = stream.merge_checkpoints
    monkeypatch.setattr(stream, "merge_checkpoints", lambda plan, out, **kw: calls.append(Path(out).name)
                        or real(plan, out, **kw))
    yml = _write(tmp_path / "multi.yml", _chain(hf))
    inter = tmp_path / "stages"

    def run(**kw):
        calls.clear()
        lines = []
        M.run_multistage(M.load_multistage(yml, output=tmp_path / "out", intermediate_dir=inter), progress=False,
                         log=lines.append, **kw)
        return lines

    def mtimes():
        return {p.relative_to(inter): p.stat().st_mtime_ns for p in inter.rglob("*")}

    run()
    assert calls == ["first-merge", "second-merge", "out"]
    first = mtimes()
    # the final output is refused as in a single merge (before any work), then replaced with overwrite=True
    with pytest.raises(OutputExists):
        run()
    assert calls == []
    lines = run(overwrite=True)
    assert calls == ["out"] and mtimes() == first
    assert lines[:2] == [f"stage 1/3 'first-merge': up to date, reusing {inter / 'first-merge'}",
                         f"stage 2/3 'second-merge': up to date, reusing {inter / 'second-merge'}"]
    # comments and layout are not part of the hash; the final document is not an intermediate
    _write(yml, "# a comment\n" + _chain(hf).replace("{weight: 0.25}", "{weight: 0.3}"))
    run(overwrite=True)
    assert calls == ["out"] and mtimes() == first
    # a changed stage-1 document redoes stage 1 and everything after it
    _write(yml, _chain(hf, w=0.9))
    lines = run(overwrite=True)
    assert calls == ["first-merge", "second-merge", "out"]
    assert "changed" in lines[0] and mtimes() != first
    a, b = _tensors(hf["ft_a"]), _tensors(hf["ft_b"])
    k = "model.layers.0.mlp.up_proj.weight"
    np.testing.assert_allclose(_tensors(inter / "first-merge")[k], (0.9 * a[k] + 0.4 * b[k]) / 1.3, atol=1e-6)
    # a changed input file (here its mtime) redoes the stages that read it
    os.utime(hf["base"] / "config.json")
    run(overwrite=True)
    assert calls == ["second-merge", "out"]
    # a changed intermediate (edited by hand) is not trusted
    os.utime(inter / "second-merge" / "config.json", ns=(0, 0))
    run(overwrite=True)
    assert calls == ["second-merge", "out"]
    # a stage directory this library did not write (e.g. mergekit-multi's) is refused before any work
    shutil.rmtree(inter / "first-merge")
    (inter / "first-merge").mkdir()
    (inter / "first-merge" / "model.safetensors").write_bytes(b"x")
    before = mtimes()
    with pytest.raises(OutputExists, match="did not write"):
        run(overwrite=True)
    assert calls == [] and mtimes() == before


def test_interrupted_stage_leaves_nothing_and_is_redone(hf, tmp_path, monkeypatch):
    yml = _write(tmp_path / "multi.yml", _chain(hf))
    chain = M.load_multistage(yml, output=tmp_path / "out")
    real = stream.merge_checkpoints

    def failing(plan, out, **kw):
        if Path(out).name == "second-merge":
            raise KeyboardInterrupt
        return real(plan, out, **kw)

    monkeypatch.setattr(stream, "merge_checkpoints", failing)
    with pytest.raises(KeyboardInterrupt):
        M.run_multistage(chain, progress=False, log=None)
    assert sorted(os.listdir(chain.intermediate_dir)) == [".first-merge.stage.json", "first-merge"]
    assert not (tmp_path / "out").exists()
    monkeypatch.setattr(stream, "merge_checkpoints", real)
    lines = []
    M.run_multistage(chain, progress=False, log=lines.append)
    assert "up to date" in lines[0] and "merging" in lines[1] and (tmp_path / "out" / "config.json").exists()


HEAD = "name: s1\nmerge_method: linear\nmodels:\n  - model: {ft_a}\n    parameters: {{weight: 1.0}}\n"  # lines 1-5


@pytest.mark.parametrize("text, words", [
    # an unknown reference (neither a path, a registry model nor a stage)
    (HEAD + "---\nmerge_method: slerp\nbase_model: s2\nmodels: [{{model: {ft_b}}}]\nparameters: {{t: 0.5}}\n",
     ["line 8", "'s2'", "nor the name of a stage of this file ['s1']"]),
    (HEAD + "---\nname: s1\nmerge_method: linear\nmodels: [{{model: {ft_b}}}]\nparameters: {{weight: 1}}\n",
     ["line 7", "duplicate stage name 's1'", "line 1"]),
    (HEAD.replace("{ft_a}", "s2") + "---\nname: s2\nmerge_method: linear\nmodels: [{{model: s1}}]\n"
     "parameters: {{weight: 1}}\n---\nmerge_method: linear\nmodels: [{{model: s2}}]\nparameters: {{weight: 1}}\n",
     ["line 9", "circular dependency", "'s1' -> 's2' -> 's1'"]),
    (HEAD.replace("{ft_a}", "s1") + "---\nmerge_method: linear\nmodels: [{{model: s1}}]\n"
     "parameters: {{weight: 1}}\n", ["line 4", "'s1' refers to itself"]),
    (HEAD.replace("name: s1\n", "") + "---\nmerge_method: linear\nmodels: [{{model: {ft_b}}}]\n"
     "parameters: {{weight: 1}}\n", ["line 6", "document 2 has no name", "line 1", "give the others a `name:`"]),
    (HEAD.replace("name: s1", "name: a/b") + "---\nmerge_method: linear\nmodels: [{{model: {ft_b}}}]\n"
     "parameters: {{weight: 1}}\n", ["line 1", "'a/b'", "plain directory name"]),
    (HEAD + "---\nname: s2\nmerge_method: linear\nmodels: [{{model: s1}}]\nparameters: {{weight: 1}}\n",
     ["every document has a `name:`", "remove the `name:` of the final document"]),
    (HEAD + "---\n- merge_method: linear\n", ["line 7", "document 2 must be a mapping"]),
    (HEAD + "---\nmerge_method: linear\nmodels: [{{model: s1}}\nparameters: {{weight: 1}}\n", ["not valid YAML",
                                                                                             "line 9"]),
    # the keys of each document are checked as in a single-document YAML, with the file's lines
    (HEAD + "---\nmerge_method: linear\nmodels: [{{model: s1}}]\nweights: 1\n",
     ["line 9", "unsupported key 'weights'"]),
])
def test_name_errors_name_the_line(hf, tmp_path, text, words):
    with pytest.raises(MergekitYamlError) as e:
        M.parse_multistage(text.format(**hf), source="m.yml", intermediate_dir=tmp_path / "i", output=tmp_path / "o")
    assert str(e.value).startswith("m.yml") and all(w in str(e.value) for w in words), str(e.value)


def test_output_and_intermediate_directory_must_be_apart(hf, tmp_path):
    text = _chain(hf)
    for inter, out in ((tmp_path / "o" / "i", tmp_path / "o"), (tmp_path / "i", tmp_path / "i" / "o")):
        with pytest.raises(MergekitYamlError, match="must not contain one another"):
            M.parse_multistage(text, intermediate_dir=inter, output=out)


@pytest.fixture(scope="module")
def golden():
    return load_file(str(GOLDEN / "multimerge.safetensors")), json.loads((GOLDEN / "multimerge.json").read_text())


def test_chain_equals_mergekit_multi(golden, tmp_path):
    tensors, meta = golden
    text = meta["yaml"]
    for name, d in golden_hf_inputs(tensors, meta["input_config"], "ABC", tmp_path).items():
        text = text.replace("{" + name + "}", str(d))
    yml = _write(tmp_path / "multi.yml", text)
    chain = M.load_multistage(yml, output=tmp_path / "final", intermediate_dir=tmp_path / "inter")
    assert [s.name for s in chain.stages] == ["first-merge", "second-merge", None]  # the final is the 2nd document
    M.run_multistage(chain, progress=False, log=None)
    for stage, out in (("first-merge", tmp_path / "inter" / "first-merge"),
                       ("second-merge", tmp_path / "inter" / "second-merge"), ("final", tmp_path / "final")):
        got = _tensors(out)
        assert sorted(got) == meta["stages"][stage], stage
        for k in got:
            ref = tensors[f"{stage}/{k}"]
            assert got[k].dtype == ref.dtype, (stage, k)
            diff = float(np.max(np.abs(got[k] - ref)))
            assert diff <= ATOL, f"{stage}: {k} differs from mergekit-multi by {diff}"


def _main(argv, capsys):
    return run_script("merge", argv, capsys)


def test_cli_runs_a_multi_stage_yaml_end_to_end(hf, tmp_path, capsys):
    yml = _write(tmp_path / "multi.yml", _chain(hf))
    out, inter = tmp_path / "merged", tmp_path / "work"
    code, cap = _main(["--mergekit_yaml", str(yml), "--output", str(out), "--intermediate_dir", str(inter),
                       "--no_progress"], capsys)
    assert code == 0, cap.err
    assert [line.split(":")[0] for line in cap.out.splitlines()[:3]] == [
        "stage 1/3 'first-merge'", "stage 2/3 'second-merge'", "stage 3/3 (final)"]
    assert f"merged 3 stage(s) of {yml} into {out} (intermediates in {inter.absolute()})" in cap.out
    assert sorted(p.name for p in inter.iterdir()) == [".first-merge.stage.json", ".second-merge.stage.json",
                                                       "first-merge", "second-merge"]
    expected = _tensors(out)
    code, cap = _main(["--mergekit_yaml", str(yml), "--output", str(out), "--intermediate_dir", str(inter),
                       "--no_progress", "--overwrite"], capsys)
    assert code == 0 and cap.out.count("up to date, reusing") == 2, cap
    _assert_same(_tensors(out), expected)


def test_cli_errors_are_one_line_without_a_traceback(hf, tmp_path, capsys):
    single = _write(tmp_path / "single.yml", STAGE1.format(w=0.6, **hf).replace("name: first-merge\n", ""))
    code, cap = _main(["--mergekit_yaml", str(single), "--output", str(tmp_path / "o"), "--intermediate_dir",
                       str(tmp_path / "i")], capsys)
    # usage errors found after parsing exit with status 1, as cfm-merge's --format / --seed misuse
    assert code == 1 and "cfm-merge: error: --intermediate_dir applies to a multi-stage YAML" in cap.err
    code, cap = _main(["--config", str(ROOT / "experiments/merge/task_arithmetic_tiny.py"),
                       "--output", str(tmp_path / "o"), "--intermediate_dir", str(tmp_path / "i")], capsys)
    assert code == 1 and "--intermediate_dir applies to a multi-stage --mergekit_yaml only" in cap.err
    dup = _write(tmp_path / "dup.yml", _chain(hf).replace("name: second-merge", "name: first-merge"))
    code, cap = _main(["--mergekit_yaml", str(dup), "--output", str(tmp_path / "o")], capsys)
    assert code == 1 and "Traceback" not in cap.err
    assert cap.err.startswith(f"cfm-merge: error: {dup}, line 9: duplicate stage name 'first-merge' (first given at "
                              "line 1)"), cap.err
    assert not (tmp_path / "o").exists() and not (tmp_path / "o.stages").exists()
    # a single document behaves as before: one merge, no intermediate directory
    code, cap = _main(["--mergekit_yaml", str(single), "--output", str(tmp_path / "o"), "--no_progress"], capsys)
    assert code == 0 and "merged 2 models with linear" in cap.out and not (tmp_path / "o.stages").exists()
