"""Growing llama-family models: width, depth and experts, as pure functions returning a new consistent model.

    wide = grow_width(model, hidden_size=960, num_heads=15, num_kv_heads=5, intermediate_size=2560)   # exact
    wide = grow_width(model, hidden_size=1152, num_heads=18, method="hypercloning")                    # exact
    deep = grow_depth(model, method="llama_pro", num_layers=40)                                       # exact
    deep = grow_depth(model, method="stack", factor=4)                                                # G_stack
    moe = upcycle(model, num_experts=8, num_experts_per_tok=2)                                        # exact

Each builds its result through models.rebuild (so check_consistent, to_hf and orbax saves accept it) and leaves
its input untouched; the math is in each module's docstring (width.py, depth.py, upcycle.py). Bad targets raise
GrowthError (a ConfigError, hence a UserError and a ValueError) saying which target and why.
"""
from configurable_fm.ops.grow.common import GrowthError
from configurable_fm.ops.grow.depth import depth_sources, grow_depth
from configurable_fm.ops.grow.upcycle import drop_reinit, upcycle
from configurable_fm.ops.grow.width import (Residual, Units, WidthPlan, grow_width, head_layout, plan_width, widen,
                                          widen_params)

__all__ = ["GrowthError", "grow_width", "plan_width", "widen", "widen_params", "head_layout", "WidthPlan", "Units",
           "Residual", "grow_depth", "depth_sources", "upcycle", "drop_reinit"]
