"""Expert splits: a partition of one FFN's F neurons into E experts of m = F / E neurons each.

    s = random_split(F, E, rng)                       # control: a random permutation cut into E chunks
    s = kmeans_split(rows_FxD, E, rng)                # MoEfication's parameter clustering (weights only)
    s = coactivation_split(C_FxF, E, rng)             # MoEfication's co-activation graph partition
    s = cmoe_split(C_FxF, tokens, E, num_shared, rng) # CMoE: shared experts by activation rate, the rest clustered
    s.groups                                          # (E, m) dense neuron indices, shared experts first

A neuron i is what the FFN computes through unit i of its hidden layer h (analysis/neurons.py): for SwiGLU
h_i = act(g_i . x) (u_i . x) with g_i, u_i the i-th columns of gate_proj / up_proj, and its output h_i d_i with
d_i the i-th row of down_proj; for GPT-2 h_i = act(w_i . x + b_i) with w_i the i-th column of c_fc. Any partition
keeps the function: FFN(x) = sum_e sum_{i in S_e} h_i(x) d_i (+ the output bias).

Splits (all balanced: every expert has exactly m neurons, every neuron is in exactly one expert):
- random: a uniformly random permutation of 0..F-1 cut into E consecutive chunks (LLaMA-MoE's random split;
  MoEfication's RandomSplit cuts the unpermuted order).
- kmeans: balanced k-means (clustering.balanced_kernel_kmeans) of the L2-normalised input rows r_i / ||r_i||,
  r_i = g_i for SwiGLU (the gate decides whether a SwiGLU neuron is on: silu is small for negative inputs, while the
  sign of u_i . x only flips h_i's sign, so the up rows carry no information about |h_i|) and r_i = w_i for GPT-2.
  MoEfication clusters the normalised W_in rows of ReLU models the same way (KMeansConstrained, Euclidean).
- coactivation: a balanced partition of the co-activation graph A_ij = C_ij (i != j), C the counts of tokens on
  which neurons i and j are both among the top `active_fraction` of |h| of that token (calibration.py), by
  clustering.spectral_partition (spectral embedding, balanced k-means, Kernighan-Lin-style swaps that maximise the
  co-activations inside experts). MoEfication uses METIS on its ReLU co-activation graph.
- cmoe: CMoE (Pei et al. 2025)-style, training-free. The activation rate of neuron i is mu_i = C_ii / N (the
  fraction of the N calibration tokens on which it is among the top `active_fraction`). The num_shared * m neurons
  of the highest rate (ties: lower index) form num_shared shared experts (always active; in decreasing rate, cut
  into chunks of m); the others are clustered into E - num_shared routed experts by balanced k-means on their
  binary activation-marker vectors z_i in {0, 1}^N, whose Gram matrix is C restricted to them (kernel k-means: no
  N x F marker matrix is kept).

With equal sizes, the k-means objective on the markers equals -(1/m) times the co-activations inside the experts
plus a constant, so `coactivation` and `cmoe`'s routed part optimise the same criterion by different searches
(spectral + swaps vs k-means++ + Lloyd); `cmoe` differs by taking out the always-on neurons first.
Within an expert the neuron indices are sorted (their order does not change the function).
"""
from __future__ import annotations

import dataclasses

import numpy as np

from configurable_fm.analysis.moefication.clustering import (EXACT_LIMIT, balanced_kernel_kmeans, check_sizes,
                                                             spectral_partition)

SPLITS = ("kmeans", "coactivation", "cmoe", "random")
NEEDS_DATA = ("coactivation", "cmoe")  # splits that read calibration statistics


@dataclasses.dataclass(frozen=True)
class Split:
    """groups (E, m) int64: the dense neuron indices of each expert, the num_shared shared experts first."""

    groups: np.ndarray
    num_shared: int = 0

    @property
    def num_experts(self) -> int:
        return int(self.groups.shape[0])

    @property
    def expert_size(self) -> int:
        return int(self.groups.shape[1])

    @property
    def num_routed(self) -> int:
        return self.num_experts - self.num_shared

    @property
    def labels(self) -> np.ndarray:
        """(F,) the expert of every dense neuron."""
        out = np.empty(self.groups.size, np.int64)
        out[self.groups.reshape(-1)] = np.repeat(np.arange(self.num_experts), self.expert_size)
        return out

    def check(self, num_neurons: int) -> "Split":
        """Self, after checking that the groups hold each of 0..num_neurons-1 exactly once (ValueError)."""
        flat = np.sort(np.asarray(self.groups).reshape(-1))
        if self.groups.ndim != 2 or not np.array_equal(flat, np.arange(num_neurons)):
            raise ValueError(f"a split must hold each of the {num_neurons} neurons exactly once in equal groups; got "
                             f"groups of shape {np.shape(self.groups)}")
        if not 0 <= self.num_shared < self.num_experts:
            raise ValueError(f"num_shared={self.num_shared} must be in 0..{self.num_experts - 1}")
        return self


def from_labels(labels: np.ndarray, num_groups: int, num_shared: int = 0) -> Split:
    """The Split whose expert e holds the neurons labelled e (sorted)."""
    labels = np.asarray(labels)
    return Split(np.stack([np.flatnonzero(labels == e) for e in range(num_groups)]).astype(np.int64), num_shared)


def random_split(num_neurons: int, num_experts: int, rng: np.random.Generator) -> Split:
    """A random permutation of the neurons cut into num_experts chunks (module docstring)."""
    size = check_sizes(num_neurons, num_experts, "random_split")
    perm = rng.permutation(num_neurons).reshape(num_experts, size)
    return Split(np.sort(perm, axis=1).astype(np.int64))


def normalized_rows(rows) -> np.ndarray:
    """rows (F, D) scaled to unit L2 norm (zero rows stay zero)."""
    rows = np.asarray(rows, np.float64)
    norms = np.linalg.norm(rows, axis=1, keepdims=True)
    return np.where(norms > 0, rows / np.where(norms > 0, norms, 1.0), 0.0)


def kmeans_split(rows, num_experts: int, rng: np.random.Generator, *, max_iter: int = 30,
                 exact_limit: int = EXACT_LIMIT) -> Split:
    """Balanced k-means of the normalised neuron input rows (F, D) (module docstring)."""
    x = normalized_rows(rows)
    return from_labels(balanced_kernel_kmeans(x @ x.T, num_experts, rng, max_iter=max_iter,
                                              exact_limit=exact_limit), num_experts)


def coactivation_split(counts, num_experts: int, rng: np.random.Generator, *, exact_limit: int = EXACT_LIMIT) -> Split:
    """Balanced partition of the co-activation graph of `counts` (F, F) (module docstring)."""
    return from_labels(spectral_partition(np.asarray(counts, np.float64), num_experts, rng, exact_limit=exact_limit),
                       num_experts)


def activation_rate(counts, tokens: int) -> np.ndarray:
    """mu_i = C_ii / N: the fraction of calibration tokens on which each neuron is marked active."""
    return np.diag(np.asarray(counts, np.float64)) / max(int(tokens), 1)


def cmoe_split(counts, tokens: int, num_experts: int, num_shared: int, rng: np.random.Generator, *,
               max_iter: int = 30, exact_limit: int = EXACT_LIMIT) -> Split:
    """CMoE-style split (module docstring): num_shared shared experts of the highest activation rates, the other
    neurons clustered into num_experts - num_shared routed experts on their activation markers."""
    counts = np.asarray(counts, np.float64)
    f = counts.shape[0]
    size = check_sizes(f, num_experts, "cmoe_split")
    if not 1 <= num_shared < num_experts:
        raise ValueError(f"cmoe_split: num_shared={num_shared} must be in 1..{num_experts - 1}")
    order = np.argsort(-activation_rate(counts, tokens), kind="stable")
    shared = order[: num_shared * size]
    rest = np.sort(order[num_shared * size:])
    routed = num_experts - num_shared
    labels = balanced_kernel_kmeans(counts[np.ix_(rest, rest)], routed, rng, max_iter=max_iter,
                                    exact_limit=exact_limit)
    groups = [np.sort(shared[s * size:(s + 1) * size]) for s in range(num_shared)]
    groups += [rest[labels == e] for e in range(routed)]
    return Split(np.stack(groups).astype(np.int64), num_shared)
