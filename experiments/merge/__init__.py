"""Merge configs (configurable_fm/stages/merge.py) for scripts/merge.py --config."""
