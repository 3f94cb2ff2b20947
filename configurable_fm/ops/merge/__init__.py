"""Merging bricks: per-tensor merge kernels registered by name (registry.py), keys for randomised merges.

Task-vector family (task_vectors.py, sparsify.py; mergekit 0.1.5 semantics, merging.md 1.3):
`task_arithmetic`, `ties`, `dare_linear`, `dare_ties`, `breadcrumbs`, `breadcrumbs_ties`, `della`,
`della_linear` (all `generalized_task_arithmetic` with a sparsifier and an optional sign election) and `sce`.
Each kernel is `kernel(base (S), xs (N, *S), *, key=None, **params) -> y (S) float32`; look methods up with
`get_method(name)`. Randomised kernels draw masks from `tensor_key(seed, path)` folded with the model index,
or take them as `masks=`. The sparsifiers (one task vector at a time) are in the submodule
`configurable_fm.ops.merge.sparsify` (`sparsify.sparsify(delta, density, method, ...)`).
"""
from configurable_fm.ops.merge.keys import model_keys, tensor_key
from configurable_fm.ops.merge.registry import METHODS, REQUIRED, MergeMethod, get_method, register
from configurable_fm.ops.merge.sparsify import (
    della_mask,
    della_probabilities,
    magnitude_mask,
    magnitude_outliers_mask,
    random_mask,
    rescale_masked,
)
from configurable_fm.ops.merge.task_vectors import (
    breadcrumbs,
    breadcrumbs_ties,
    dare_linear,
    dare_ties,
    della,
    della_linear,
    generalized_task_arithmetic,
    sce,
    task_arithmetic,
    ties,
)

__all__ = [
    "METHODS", "REQUIRED", "MergeMethod", "get_method", "register",
    "tensor_key", "model_keys",
    "magnitude_mask", "magnitude_outliers_mask", "random_mask", "della_probabilities", "della_mask",
    "rescale_masked",
    "generalized_task_arithmetic", "task_arithmetic", "ties", "dare_linear", "dare_ties", "breadcrumbs",
    "breadcrumbs_ties", "della", "della_linear", "sce",
]

# Tree-level API (tree.py) and mergekit's parameter resolution (params.py). The whole-model wrappers share the
# kernels' names, so they stay in the submodule: `from configurable_fm.ops.merge import tree; tree.ties(...)`.
from configurable_fm.ops.merge import params, tree  # noqa: E402
from configurable_fm.ops.merge.params import ParameterError, resolve_for_tensor  # noqa: E402
from configurable_fm.ops.merge.tree import MergeInputError, merge  # noqa: E402

__all__ += ["params", "tree", "merge", "MergeInputError", "ParameterError", "resolve_for_tensor"]

# Merging deltas (bricks.deltas) with the task-vector kernels: a delta is a task vector against a zero base.
from configurable_fm.ops.merge.deltas import TASK_VECTOR_METHODS, merge_deltas  # noqa: E402

__all__ += ["merge_deltas", "TASK_VECTOR_METHODS"]
