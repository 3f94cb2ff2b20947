"""MEMIT (Meng et al., 2023): every request of a step in one least-squares update spread over several layers
(ops/update/memit.py).

    python scripts/edit.py --config experiments/edit/memit.py:smollm2 --config.output=runs/edit/memit \\
        [--config.subset=::24] [--config.batch_size=0] [--config.format=hf|orbax]

'' : the released GPT-J JSON (layers 3-8; 25 steps, lr 0.5, clamp 0.75, kl 0.0625, weight decay 0.5,
     mom2_update_weight 15,000; context '{}' and 5 prefixes of 10 tokens).
'smollm2': SmolLM2-135M-Instruct, a window of 5 layers around ROME's layer (experiments/edit/rome.py: the sweep),
     mom2_update_weight scaled to the key width (memit.py "Choosing lambda": the share of a residual one new key
     writes is about F / (lambda + F); GPT-J's 15,000 at F = 16,384 is ~52 %, the same share at F = 1,536 is
     lambda ~ 1,400). A check (one run, 6 facts, CPU 170 s): `--config experiments/edit/memit.py:smollm2
     --config.subset=::48` gives ES 100, PS 100, NS 100, Loc 87 ± 6 (unedited ES 0, PS 0, NS 100).
'test' : a tiny model for CI (layers 0-1, the bare prompt as the only template, 4 steps, clamp 100, lambda 16).
Common keys: experiments/edit/__init__.py and configurable_fm/stages/edit.py.
"""
from experiments.edit import TEST_HPARAMS, common
from experiments.edit.rome import LAYER_SMOLLM2

WINDOW_SMOLLM2 = tuple(range(LAYER_SMOLLM2 - 2, LAYER_SMOLLM2 + 3))
LAMBDA_SMOLLM2 = 1400.0


def get_config(arg: str = ""):
    return common(arg, "memit", "memit", layers=(3, 4, 5, 6, 7, 8), smollm2_layers=WINDOW_SMOLLM2,
                  smollm2_hparams=dict(mom2_update_weight=LAMBDA_SMOLLM2), test_layers=(0, 1),
                  test_hparams=dict(TEST_HPARAMS, mom2_update_weight=16.0))
