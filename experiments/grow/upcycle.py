"""Sparse upcycling (ops/grow/upcycle.py upcycle): a dense llama into a Mixtral-style mixture of experts.

    python scripts/grow.py --config experiments/grow/upcycle.py --config.input=IN --config.output=OUT \\
        [--config.upcycle.num_experts=8] [--config.upcycle.num_experts_per_tok=2] [--config.format=hf|orbax]
    python scripts/grow.py --config experiments/grow/upcycle.py:drop --config.input=IN --config.output=OUT

upcycle.num_experts (>= 2) copies of every MLP, upcycle.num_experts_per_tok (1..num_experts) chosen per token.
upcycle.router: 'topk_softmax' (Mixtral; exact) or 'softmax_topk' (scales the MLP by the top-k mass; not exact).
upcycle.router_init: 'normal' (default: N(0, 0.02^2) from `seed`, still exact, and the experts diverge in
training) or 'zeros' (every token goes to the same experts, which stay identical in training: checks only).
upcycle.drop_fraction: Drop-Upcycling's re-initialised fraction in [0, 1] (variant 'drop': 0.5, the paper's best;
not function-preserving). The HF output is a MixtralForCausalLM directory.
Common keys (input, output, format, dtype, overwrite, seed): experiments/grow/__init__.py.
"""
import ml_collections

from configurable_fm.stages.grow import UPCYCLE_KEYS
from experiments.grow import common

VARIANTS = {"": {}, "drop": {"drop_fraction": 0.5}}


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    c = common(arg, tuple(VARIANTS), where="upcycle")
    c.upcycle = ml_collections.ConfigDict({**UPCYCLE_KEYS, **VARIANTS[arg]})
    return c
