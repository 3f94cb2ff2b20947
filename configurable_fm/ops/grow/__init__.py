"""Growing llama-family models: width, depth and experts, as pure functions returning a new consistent model.

    wide = grow_width(model, hidden_size=960, num_heads=15, num_kv_heads=5, intermediate_size=2560)   # exact
    wide = grow_width(model, hidden_size=1152, num_heads=18, method="hypercloning")                    # exact
    deep = grow_depth(model, method="llama_pro", num_layers=40)                                       # exact
    deep = grow_depth(model, method="stack", factor=4)                                                # G_stack
    moe = upcycle(model, num_experts=8, num_experts_per_tok=2, key=jax.random.key(0))                 # exact
    grown = grow_masked(model, hidden_size=960, intermediate_size=2560, num_layers=40, key=key)   # MSG: masks at 0
    plain = unmask(grown_and_trained)                                                             # masks at 1 folded
    g = grow_steps(model, [("width", dict(hidden_size=960))]); g.model; grow_opt_state(state, fresh, g.moments)

Each builds its result through models.rebuild (so check_consistent, to_hf and orbax saves accept it) and leaves
its input untouched; the math is in each module's docstring (width.py, depth.py, upcycle.py; state.py: the
optimizer state grown with the parameters). Bad targets raise
GrowthError (a ConfigError, hence a UserError and a ValueError) saying which target and why.
"""
from configurable_fm.ops.grow.common import GrowthError
from configurable_fm.ops.grow.depth import deepen_moments, depth_sources, grow_depth
from configurable_fm.ops.grow.masked import grow_masked, mask_ramps, unmask, with_ramp
from configurable_fm.ops.grow.state import OPS, OPTIMIZER_MODES, Growth, grow_opt_state, grow_steps, growth
from configurable_fm.ops.grow.upcycle import drop_reinit, drop_sets, upcycle, upcycle_moments
from configurable_fm.ops.grow.width import (Residual, Units, WidthPlan, gather_axis, grow_width, head_layout,
                                          plan_width, widen, widen_moments, widen_params)

__all__ = ["GrowthError", "grow_width", "plan_width", "widen", "widen_params", "head_layout", "WidthPlan", "Units",
           "Residual", "grow_depth", "depth_sources", "upcycle", "drop_reinit", "widen_moments", "gather_axis",
           "deepen_moments", "upcycle_moments", "drop_sets", "Growth", "growth", "grow_steps", "grow_opt_state",
           "OPS", "OPTIMIZER_MODES", "grow_masked", "unmask", "with_ramp", "mask_ramps"]
