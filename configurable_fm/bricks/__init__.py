"""Bricks: named sub-trees of a model's state, addressed by dotted paths and selectors."""
from configurable_fm.bricks.paths import flat_params, flat_state, param_count, path_str, with_params

__all__ = ["flat_params", "flat_state", "param_count", "path_str", "with_params"]
