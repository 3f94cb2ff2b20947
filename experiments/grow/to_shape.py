"""Width and depth together, to a full target shape (grow_width, then grow_depth).

    python scripts/grow.py --config experiments/grow/to_shape.py:smollm2_360m --config.input=smollm2-135m \\
        --config.output=grown/smollm2-135m-to-360m [--config.format=hf|orbax]
    python scripts/grow.py --config experiments/grow/to_shape.py --config.input=IN --config.output=OUT \\
        --config.width.hidden_size=96 --config.width.num_heads=6 --config.depth.num_layers=8

Keys: `width` as experiments/grow/width.py (targets, 0 = unchanged; method exact | hypercloning; noise) and
`depth` as experiments/grow/depth.py (method identity by default, num_layers 0 = unchanged depth: no depth step).
Variant 'smollm2_360m': SmolLM2-360M's shape (hidden 960, 15 heads, 5 kv heads, FFN 2560, 32 layers), reached
from SmolLM2-135M (576, 9/3, 1536, 30 layers) by exact width growth and identity depth growth: the grown model
computes the 135M model's function. Measured on SmolLM2-135M-Instruct (tests/ops/grow/test_smollm2_growth.py, CPU,
three chat prompts, logits up to 38.5): 134.5M -> 361.8M parameters; max |logit diff| 5.3e-6 computed in float64
(the stored float32 parameters through a float64 forward; what is left is the float32 rounding of the scaled norm
gains), 1.40e-4 in float32 (2026-12-07; 9.3e-5 to 1.40e-4 with other XLA flags), the size of the source's own
float32 error against the float64 forward (1.3e-4): all of it from the hidden-size step (heads, FFN and depth alone
give 0.0); identical greedy answers (20 tokens). Load + grow 22 s, the whole test ~65 s on 2 cores.
Common keys (input, output, format, dtype, overwrite, seed):
experiments/grow/__init__.py.
"""
import ml_collections

from configurable_fm.stages.grow import DEPTH_KEYS, WIDTH_KEYS
from experiments.grow import common

SHAPES = {"": ({}, {}),
          "smollm2_360m": (dict(hidden_size=960, num_heads=15, num_kv_heads=5, intermediate_size=2560),
                           dict(method="identity", num_layers=32))}


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    c = common(arg, tuple(SHAPES), where="to_shape")
    width, depth = SHAPES[arg]
    c.width = ml_collections.ConfigDict({**WIDTH_KEYS, **width})
    c.depth = ml_collections.ConfigDict({**DEPTH_KEYS, **depth})
    return c
