"""The lifelong RLS editor (ops/update/rlsedit.py): MEMIT's objective over every edit so far, kept exact by
recursive least squares (a sequence of steps equals one batch least squares over all of them).

    python scripts/edit.py --config experiments/edit/rlsedit.py:smollm2 --config.output=runs/edit/rls \\
        --config.mode=sequential --config.batch_size=10 --config.eval_every=50 [--config.format=hf|orbax]

'' : MEMIT's GPT-J settings (layers 3-8; 25 steps, lr 0.5, clamp 0.75, mom2_update_weight 15,000), ridge 0,
     exact re-inversion every 1,000 steps.
'smollm2': SmolLM2-135M-Instruct, memit.py:smollm2's window and lambda (scaled to the key width).
'test' : a tiny model for CI (layers 0-1, the bare prompt, 4 steps, clamp 100, lambda 16).
Common keys: experiments/edit/__init__.py and configurable_fm/stages/edit.py.
"""
from experiments.edit import TEST_HPARAMS, common
from experiments.edit.memit import LAMBDA_SMOLLM2, WINDOW_SMOLLM2


def get_config(arg: str = ""):
    return common(arg, "rlsedit", "rlsedit", layers=(3, 4, 5, 6, 7, 8), smollm2_layers=WINDOW_SMOLLM2,
                  smollm2_hparams=dict(mom2_update_weight=LAMBDA_SMOLLM2), test_layers=(0, 1),
                  test_hparams=dict(TEST_HPARAMS, mom2_update_weight=16.0))
