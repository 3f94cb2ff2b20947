"""Width growth (ops/grow/width.py grow_width): hidden size, query heads, kv heads, FFN width; head_dim fixed.

    python scripts/grow.py --config experiments/grow/width.py --config.input=smollm2-135m \\
        --config.output=grown/wide --config.width.hidden_size=960 --config.width.num_heads=15 \\
        --config.width.num_kv_heads=5 --config.width.intermediate_size=2560 [--config.format=hf|orbax]

width.hidden_size, num_heads, num_kv_heads, intermediate_size: targets (0 = unchanged), each >= the source's.
width.method: 'exact' (zero-extended residual stream, new units with zero output weights; any sizes) or
'hypercloning' (tiling; every target an integer multiple). Both compute the source's function.
width.noise: relative symmetry-breaking noise (>= 0, drawn from `seed`), added only where the function ignores it.
Common keys (input, output, format, dtype, overwrite, seed): experiments/grow/__init__.py.
"""
import ml_collections

from configurable_fm.stages.grow import WIDTH_KEYS
from experiments.grow import common


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    c = common(arg, where="width")
    c.width = ml_collections.ConfigDict(dict(WIDTH_KEYS))
    return c
