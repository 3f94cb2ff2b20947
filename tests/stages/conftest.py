"""The pre-training stage the studies of this directory begin with (study_tiny:test on the character tokenizer,
no evaluation during training), run once per test process: a study that begins with the same stage (the same
config, the tokenizer's path included, so the same fingerprint) in a copy of its work directory skips it."""
import shutil

import pytest

from configurable_fm.stages import run
from experiments import study_tiny
from tests.train.test_finetune import use_char_tokenizer, write_char_tokenizer


def pretrain_stage(tok):
    pre = use_char_tokenizer(study_tiny.get_config("test").stages[0], tok)
    pre.eval_every = 0
    return pre


@pytest.fixture(scope="session")
def pretrained(tmp_path_factory):
    """(tokenizer.json, a study directory whose only stage, 'pretrain', is complete)."""
    root = tmp_path_factory.mktemp("pretrained")
    tok = write_char_tokenizer(root / "tokenizer.json")
    c = study_tiny.get_config("test")
    c.stages = [pretrain_stage(tok)]
    result = run(c, root / "study", log=lambda s: None)
    assert [r.status for r in result.stages] == ["ran"]
    return tok, root / "study"


@pytest.fixture
def pretrained_study(pretrained, tmp_path):
    """(tokenizer.json, the pretrain stage's config, tmp_path / 'study': a copy of the pre-trained study)."""
    tok, study = pretrained
    shutil.copytree(study, tmp_path / "study")
    return tok, pretrain_stage(tok), tmp_path / "study"
