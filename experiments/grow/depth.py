"""Depth growth (ops/grow/depth.py grow_depth): new decoder layers.

    python scripts/grow.py --config experiments/grow/depth.py --config.input=IN --config.output=OUT \\
        --config.depth.num_layers=40 [--config.depth.method=identity|llama_pro] [--config.format=hf|orbax]
    python scripts/grow.py --config experiments/grow/depth.py:stack --config.input=IN --config.output=OUT
    python scripts/grow.py --config experiments/grow/depth.py:dus --config.input=IN --config.output=OUT

depth.method: 'identity' (exact: new blocks with fresh input weights from `seed`, zero output projections),
'llama_pro' (exact: copies of the layer before, output projections zeroed), 'stack' (G_stack, the stack repeated
`factor` times; not function-preserving) or 'dus' (SOLAR depth up-scaling: 2 (n - drop) layers; not exact).
depth.num_layers (target count, new blocks spread evenly) or depth.positions (insertion points, 0..n) for
identity / llama_pro; depth.factor (>= 2) for stack; depth.drop (< n/2) for dus. Unset: 0 / ().
Variants: '' (identity; set num_layers or positions), 'llama_pro', 'stack' (factor 2), 'dus' (drop 8, SOLAR).
Common keys (input, output, format, dtype, overwrite, seed): experiments/grow/__init__.py.
"""
import ml_collections

from configurable_fm.stages.grow import DEPTH_KEYS
from experiments.grow import common

VARIANTS = {"": {}, "llama_pro": {"method": "llama_pro"}, "stack": {"method": "stack", "factor": 2},
            "dus": {"method": "dus", "drop": 8}}


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    c = common(arg, tuple(VARIANTS), where="depth")
    c.depth = ml_collections.ConfigDict({**DEPTH_KEYS, **VARIANTS[arg]})
    return c
