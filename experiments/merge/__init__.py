"""Merge configs (configurable_fm/ops/merge/stage.py) for scripts/merge.py --config."""
