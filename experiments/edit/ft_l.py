"""FT-L (the ROME paper's constrained fine-tuning baseline): Adam on one MLP output projection with an
L-infinity clamp on the change (ops/update/finetune.py); no key statistics.

    python scripts/edit.py --config experiments/edit/ft_l.py:smollm2 --config.output=runs/edit/ft_l \\
        [--config.subset=::24] [--config.format=hf|orbax]

'' : the released FT+L JSON for GPT-2 XL (layer 0; 25 steps, lr 5e-4, norm_constraint 5e-4; GPT-J used 5e-5).
'smollm2': SmolLM2-135M-Instruct at ROME's layer (rome.py's sweep), the same steps, lr and clamp.
'test' : a tiny model for CI (layer 1, 4 steps, lr 1e-2, clamp 1e-2).
Common keys: experiments/edit/__init__.py and configurable_fm/stages/edit.py.
"""
from experiments.edit import common
from experiments.edit.rome import LAYER_SMOLLM2


def get_config(arg: str = ""):
    return common(arg, "ft", "ft_l", layers=(0,), smollm2_layers=(LAYER_SMOLLM2,),
                  test_hparams=dict(num_steps=4, lr=1e-2, norm_constraint=1e-2))
