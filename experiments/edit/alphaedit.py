"""AlphaEdit (Fang et al., 2025): MEMIT's update projected onto the null space of the preserved keys, with a
history of the keys already written (ops/update/alphaedit.py): the editor for sequential editing.

    python scripts/edit.py --config experiments/edit/alphaedit.py:smollm2 --config.output=runs/edit/alphaedit \\
        --config.mode=sequential --config.batch_size=10 --config.eval_every=50 [--config.format=hf|orbax]

'' : the authors' GPT-J JSON (layers 3-8; 25 steps, lr 0.5, clamp 0.75; nullspace_threshold 2e-2, L2 10; C from
     the stdlib shards: set stats.corpus for another tokenizer).
'smollm2': SmolLM2-135M-Instruct, the same window of 5 layers as memit.py:smollm2, the authors' threshold and L2.
     On SmolLM2's keys (40k stdlib tokens) the threshold 2e-2 leaves a large null space: 1373, 1322, 1296, 1267,
     1236 of 1536 directions at layers 3-7, holding 27, 22, 19, 15, 16 % of the keys' energy (tr C), so the
     preservation is looser than the name suggests; a lower threshold (e.g. 2e-3: 668 / 466 directions, 3.7 /
     1.7 % at layers 3 / 5) preserves more and leaves less room for edits (not swept). A check (one run, 6 facts,
     batch mode, CPU 181 s): `--config experiments/edit/alphaedit.py:smollm2 --config.subset=::48` gives ES 100,
     PS 100, NS 100, Loc 83 ± 6 (unedited ES 0, PS 0, NS 100).
'test' : a tiny model for CI (layers 0-1, the bare prompt, 4 steps, clamp 100; threshold 1e9: the whole key space).
Common keys: experiments/edit/__init__.py and configurable_fm/stages/edit.py.
"""
from experiments.edit import TEST_HPARAMS, common
from experiments.edit.memit import WINDOW_SMOLLM2


def get_config(arg: str = ""):
    return common(arg, "alphaedit", "alphaedit", layers=(3, 4, 5, 6, 7, 8), smollm2_layers=WINDOW_SMOLLM2,
                  test_layers=(0, 1), test_hparams=dict(TEST_HPARAMS, nullspace_threshold=1e9, L2=1.0))
