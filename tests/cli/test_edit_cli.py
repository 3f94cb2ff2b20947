"""scripts/edit.py (cfm-edit) end to end on a tiny random llama with a character tokenizer: the output directory
(model/ as HF with the source's tokenizer or orbax, delta/, metrics.json, report.md), the edited model equals the
source with the delta applied (ours and transformers' logits), sequential mode's curve, the other editors through
`edit_from_config`, and bad input (a request line without '{}', malformed JSON, a missing key, an unknown key or
method) as one line naming the line or key, with nothing written."""
import json
from pathlib import Path

import numpy as np
import pytest
from tokenizers import Tokenizer

from configurable_fm.bricks.deltas import apply, load_delta, norms
from configurable_fm.errors import ConfigError
from configurable_fm.interop.hf import from_hf, to_hf
from configurable_fm.interop.loader import load_model
from configurable_fm.interop.orbax_io import save_model
from configurable_fm.models import scoring
from configurable_fm.models.llama import LlamaConfig
from configurable_fm.ops.update import evaluate_requests, load_requests
from configurable_fm.stages.edit import check_config, edit_from_config
from experiments.edit import alphaedit, ft_l, memit, rlsedit, rome
from tests.helpers import char_tokenizer, load_script, random_llama, run_script

ROOT = Path(__file__).resolve().parents[2]
CFG = LlamaConfig(vocab_size=104, hidden_size=16, intermediate_size=24, num_layers=2, num_heads=2, num_kv_heads=1,
                  max_position_embeddings=128)
IDS = np.random.RandomState(1).randint(0, 100, (2, 12)).astype(np.int32)
FACTS = [("France", " Paris", " Rome"), ("Spain", " Madrid", " Oslo"), ("Peru", " Lima", " Kyiv")]
TEXT = ("The capital of France is Paris. The capital of Spain is Madrid. Lima is the capital of Peru. "
        "Oslo, Rome and Kyiv are capitals too; so is Berlin, the capital of Germany. ") * 6


def request(subject, true, new, case_id):
    others = [s for s, _, _ in FACTS if s != subject]
    return {"case_id": case_id, "prompt": "The capital of {} is", "subject": subject, "target_new": new,
            "target_true": true, "paraphrase_prompts": ["{}'s capital is"],
            "neighborhood_prompts": [f"The capital of {o} is" for o in others],
            "neighborhood_targets": [t for s, t, _ in FACTS if s != subject]}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """(root, HF dir with the character tokenizer, orbax checkpoint, tokenizer.json, requests.jsonl, corpus.txt,
    the model)."""
    root = tmp_path_factory.mktemp("edit_world")
    model = random_llama(CFG, 3)
    tok = char_tokenizer(special=("<pad>", "<eos>", "<bos>"))
    tok.save(str(root / "tokenizer.json"))
    hf = to_hf(model, root / "hf", tokenizer=tok)
    orbax = save_model(model, root / "orbax")
    reqs = root / "requests.jsonl"
    reqs.write_text("".join(json.dumps(request(*f, i)) + "\n" for i, f in enumerate(FACTS)))
    (root / "corpus.txt").write_text(TEXT)
    return dict(root=root, hf=hf, orbax=orbax, tok=root / "tokenizer.json", requests=reqs,
                corpus=root / "corpus.txt", model=model)


def edit_cli(argv, capsys):
    return run_script("edit", argv, capsys)


def logits(model):
    return scoring.logits(model, IDS)  # compiled once per model structure: not an eager forward per call


def assert_metrics_describe(world, edited, requests, before, after):
    """The reported efficacy magnitudes are the source's and the edited model's (ops.update.evaluate_requests on
    each). Not whether the edit lifts the target: this random model's next-token distributions are near uniform
    (NLL of a target ~4.65 = log 104), so an edit moves the magnitudes by ~1e-5 in either direction, with the
    direction changing between jax 0.10.2 and 0.12.1 and with the number of value steps (2026-12-07,
    benchmarks/edit_cli_lift_2026-12-07/lift_sweep.py); the editors' lift is tested on the trained worlds of
    tests/ops/update."""
    tok = Tokenizer.from_file(str(world["tok"]))
    for model, reported in ((world["model"], before), (edited, after)):
        got = evaluate_requests(model, tok, requests, batch_size=8).summary["efficacy_magnitude"].mean
        assert got == pytest.approx(reported["efficacy_magnitude"]["mean"], abs=1e-7, rel=0)
    assert after["efficacy_magnitude"]["mean"] != before["efficacy_magnitude"]["mean"]


def base_args(world, config, out, source="hf"):
    args = ["--config", f"{ROOT}/experiments/edit/{config}", f"--config.input={world[source]}",
            f"--config.requests={world['requests']}", f"--config.output={out}",
            f"--config.stats.corpus={world['corpus']}", f"--config.stats.cache_dir={world['root'] / 'stats'}"]
    return args if source == "hf" else args + [f"--config.tokenizer={world['tok']}"]


@pytest.fixture(scope="module")
def rome_hf(world, tmp_path_factory):
    """ROME (rome.py:test) on the HF source, written as HF: (exit status, output, out dir)."""
    out = tmp_path_factory.mktemp("rome_out") / "out"
    try:
        code = load_script("edit").main(base_args(world, "rome.py:test", out))
    except SystemExit as e:
        code = e.code
    return code, out


def test_script_writes_model_delta_metrics_report(world, rome_hf):
    code, out = rome_hf
    assert code == 0
    assert sorted(p.name for p in out.iterdir()) == [".configurable_fm_output.json", "delta", "metrics.json", "model",
                                                     "report.md"]
    assert (out / "model" / "tokenizer.json").is_file() and (out / "model" / "config.json").is_file()
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["method"] == "rome" and metrics["layers"] == [1] and metrics["n_requests"] == 3
    assert metrics["stats"]["tokens"] == 400 and metrics["stats"]["corpus"] == "corpus.txt/seq16"
    before, after = metrics["before"]["summary"], metrics["after"]["summary"]
    assert before["efficacy_score"]["n"] == 3 and len(metrics["after"]["rows"]) == 3
    assert_metrics_describe(world, from_hf(out / "model"), load_requests(world["requests"]), before, after)
    report = (out / "report.md").read_text()
    assert "| metric | unedited | edited | n |" in report and "efficacy_score (ES)" in report and " ± " in report
    delta = load_delta(out / "delta")
    assert list(delta) == ["layers.1.mlp.down_proj.kernel"] and delta.kind == "rome"
    edited = from_hf(out / "model")
    expected = logits(apply(world["model"], delta))
    np.testing.assert_allclose(logits(edited), expected, atol=1e-5)
    assert np.abs(expected - logits(world["model"])).max() > 1e-4  # the edit changed something


def test_hf_output_reloads_in_transformers(rome_hf):
    transformers = pytest.importorskip("transformers")
    torch = pytest.importorskip("torch")
    out = rome_hf[1] / "model"
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(out), torch_dtype=torch.float32)
    with torch.no_grad():
        theirs = hf(torch.tensor(IDS, dtype=torch.long)).logits.numpy()
    np.testing.assert_allclose(theirs, logits(from_hf(out)), atol=1e-4)
    text = "The capital of Peru is"
    ids = transformers.AutoTokenizer.from_pretrained(str(out))(text, add_special_tokens=False)["input_ids"]
    assert ids == char_tokenizer(special=("<pad>", "<eos>", "<bos>")).encode(text, add_special_tokens=False).ids


def test_orbax_in_orbax_out_sequential(world, tmp_path, capsys):
    out = tmp_path / "out"
    code, io = edit_cli(base_args(world, "memit.py:test", out, source="orbax") + [
        "--config.format=orbax", "--config.mode=sequential", "--config.eval_every=1"], capsys)
    assert code == 0, io.err
    assert "| edits | ES | PS | NS | Loc |" in io.out
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["steps"] == 3 and [p["edits"] for p in metrics["curve"]] == [1, 2, 3]
    assert [p["summary"]["efficacy_score"]["n"] for p in metrics["curve"]] == [1, 2, 3]
    delta = load_delta(out / "delta")
    assert sorted(delta) == ["layers.0.mlp.down_proj.kernel", "layers.1.mlp.down_proj.kernel"]
    np.testing.assert_allclose(logits(load_model(out / "model")), logits(apply(world["model"], delta)), atol=1e-5)


@pytest.mark.parametrize("module", [alphaedit, rlsedit, ft_l], ids=["alphaedit", "rlsedit", "ft_l"])
def test_other_editors_through_edit_from_config(world, module):
    c = module.get_config("test")
    c.update(input=str(world["orbax"]), tokenizer=str(world["tok"]), requests=str(world["requests"]), subset="2")
    c.stats.update(corpus=str(world["corpus"]), cache_dir=str(world["root"] / "stats"))
    result = edit_from_config(c)
    m = result.metrics
    assert m["n_requests"] == 2 and m["after"]["summary"]["efficacy_score"]["n"] == 2
    assert {k.split(".")[1] for k in result.delta} == {str(l) for l in c.layers}
    np.testing.assert_allclose(logits(result.model), logits(apply(world["model"], result.delta)), atol=1e-5)
    assert all(0 < n < np.inf for n in norms(result.delta).values())
    assert_metrics_describe(world, result.model, load_requests(world["requests"])[:2], m["before"]["summary"],
                            m["after"]["summary"])


GOOD = json.dumps(request(*FACTS[0], 0))


@pytest.mark.parametrize("lines, overrides, message, status", [
    ([GOOD, GOOD.replace("The capital of {} is", "The capital of France is")], [],
     "requests.jsonl:2: prompt 'The capital of France is' must contain exactly one '{}'", 1),
    ([GOOD, '{"prompt": "{} is", "subject": "x",'], [], "requests.jsonl:2: not valid JSON", 1),
    ([json.dumps({"prompt": "{} is", "subject": "Spain"}), GOOD], [], "requests.jsonl:1: lacks key(s) ['target_new']",
     1),
    ([GOOD, json.dumps({"prompt": "{} is", "subject": "Spain", "target_new": " "})], [],
     "requests.jsonl:2: target_new of prompt '{} is' is empty", 1),
    ([GOOD], ["--config.method=magic"], "`method` must be one of", 1),
    ([GOOD], ["--config.layers=(0, 1)"], "method 'rome' edits one layer", 1),
    ([GOOD], ["--config.subset=0:0"], "`subset`='0:0' selects none", 1),
    ([GOOD], ["--config.format=gguf"], "`format` must be one of", 1),
    ([GOOD], ["--config.stats.corpus=/nonexistent/corpus"], "stats.corpus", 1),
    ([GOOD], ["--config.input=/nonexistent/model"], "/nonexistent/model", 1),
    ([GOOD], ["--config.layers=(7,)"], "edit config: `layers`: ", 1),
    ([GOOD], ["--config.hparams.v_lrr=0.1"], "hparams has no key 'v_lrr' (did you mean 'v_lr'?)", 2),
    ([GOOD], ["--config.mdoe=batch"], "config has no key 'mdoe' (did you mean 'mode'?)", 2),
    ([GOOD], ["--config.hparams.v_lr=nan"], "v_lr must be a finite number >= 0, got nan", 1),  # wrote NaN weights
])
def test_bad_input_is_one_line_and_writes_nothing(world, tmp_path, capsys, lines, overrides, message, status):
    reqs = tmp_path / "in" / "requests.jsonl"
    reqs.parent.mkdir()
    reqs.write_text("\n".join(lines) + "\n")
    out = tmp_path / "out"
    args = base_args(world, "rome.py:test", out)
    args[3] = f"--config.requests={reqs}"
    code, io = edit_cli(args + overrides, capsys)
    assert code == status, io.err
    assert io.err.startswith("cfm-edit: error:") and message in io.err and "Traceback" not in io.err
    assert len(io.err.strip().splitlines()) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in"]


def test_a_directory_as_requests_file_is_one_line(world, tmp_path, capsys):
    (tmp_path / "reqs").mkdir()  # was an IsADirectoryError traceback
    args = base_args(world, "rome.py:test", tmp_path / "out")
    args[3] = f"--config.requests={tmp_path / 'reqs'}"
    code, io = edit_cli(args, capsys)
    assert code == 1 and io.err.startswith("cfm-edit: error:") and "Traceback" not in io.err, io.err
    assert f"{tmp_path / 'reqs'}: cannot read the requests file (Is a directory)" in io.err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["reqs"]


def test_existing_output_is_refused_before_editing(world, tmp_path, capsys):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "mine.txt").write_text("x")
    code, io = edit_cli(base_args(world, "rome.py:test", tmp_path / "out"), capsys)
    assert code == 1 and "already exists" in io.err and "edit: loading" not in io.out


@pytest.mark.parametrize("changes, key", [
    (dict(method="alphaedit", layers=(0, 1)), "needs key statistics"),
    (dict(mode="batch", eval_every=5), "eval_every"),
    (dict(hparams={"v_lr": -1.0, "bogus": 1}), "hparams.bogus"),
    (dict(hparams={"context": (("no placeholder",),)}), "hparams.context"),
    (dict(eval={"metrics": ("probability", "vibes")}), "eval.metrics"),
    (dict(stats={"corpus": "", "n_tokens": 0}), "stats.n_tokens"),
    (dict(bos_id=-2), "bos_id"),
])
def test_bad_config_names_the_key_before_loading(world, changes, key):
    c = rome.get_config("test").to_dict()
    c.update(input="/nonexistent/never/loaded", requests=str(world["requests"]))
    for k, v in changes.items():
        if isinstance(v, dict) and k != "hparams":
            c[k] = {**c[k], **v}
        elif k == "hparams":
            c[k] = v
        else:
            c[k] = v
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        check_config(c)


def test_configs_have_every_variant():
    for module in (rome, memit, alphaedit, rlsedit, ft_l):
        for arg in ("", "smollm2", "test"):
            c = module.get_config(arg)
            assert c.method in ("rome", "memit", "alphaedit", "rlsedit", "ft") and c.layers
        with pytest.raises(ValueError, match="unknown variant"):
            module.get_config("gpt5")
    c = rome.get_config("smollm2")
    assert c.input == "smollm2-135m-instruct" and (ROOT / c.requests).is_file() and c.stats.corpus == "stdlib"


def test_independent_mode_scores_each_edit_alone(world, tmp_path, capsys):
    """mode='independent' (CounterFact's protocol): every request edits the unedited model and is scored alone;
    only metrics.json and report.md are written. Request i's row equals editing that request by itself."""
    out = tmp_path / "out"
    code, io = edit_cli(base_args(world, "rome.py:test", out) + ["--config.mode=independent"], capsys)
    assert code == 0, io.err
    assert sorted(p.name for p in out.iterdir()) == [".configurable_fm_output.json", "metrics.json", "report.md"]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["mode"] == "independent" and metrics["edits"] == 3 and metrics["steps"] == 3
    assert "- delta: none (mode independent" in (out / "report.md").read_text()
    rows = metrics["after"]["rows"]
    assert [r["case_id"] for r in rows] == [0, 1, 2]
    for i in (0, 2):
        alone = base_args(world, "rome.py:test", tmp_path / f"alone{i}") + [f"--config.subset={i}:{i + 1}"]
        code, io = edit_cli(alone, capsys)
        assert code == 0, io.err
        row = json.loads((tmp_path / f"alone{i}" / "metrics.json").read_text())["after"]["rows"][0]
        for k in ("efficacy_magnitude", "paraphrase_magnitude", "neighborhood_magnitude"):
            assert rows[i][k] == pytest.approx(row[k], abs=1e-6), (i, k)
