"""Importing this module registers every merge method in `registry.METHODS`."""
from configurable_fm.ops.merge import geometric, selective, task_vectors  # noqa: F401
