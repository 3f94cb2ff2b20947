"""Bricks: named sub-trees of a model's state, addressed by dotted paths and selectors.

    select(model).at("layers.*.mlp").apply(fn)     # a new model with every MLP replaced by fn(mlp)
    tree_at(model, "layers.0.mlp", new_mlp)        # one replacement, by exact path
    bricks = extract(model, "layers.*.mlp", source="tiny")
    save_bricks(bricks, "out/mlps"); insert(other, load_bricks("out/mlps"))
    tv = deltas.diff(base, finetuned); deltas.apply(base, deltas.low_rank(tv, 8))   # changes to parameters
"""
from configurable_fm.bricks import deltas
from configurable_fm.bricks.brickset import Brick, BrickSet, extract, insert, load_bricks, save_bricks
from configurable_fm.bricks.deltas import Delta, DeltaError, Dense, LowRank, Masked, load_delta, save_delta
from configurable_fm.bricks.paths import flat_params, flat_state, param_count, path_str, with_params
from configurable_fm.bricks.select import Selection, SelectionError, select, tree_at
from configurable_fm.bricks import adapters  # noqa: E402  (registers the adapter kinds for checkpoint restores)

__all__ = [
    "flat_params", "flat_state", "param_count", "path_str", "with_params",
    "Selection", "SelectionError", "select", "tree_at",
    "Brick", "BrickSet", "extract", "insert", "load_bricks", "save_bricks",
    "adapters", "deltas", "Delta", "DeltaError", "Dense", "LowRank", "Masked", "load_delta", "save_delta",
]
