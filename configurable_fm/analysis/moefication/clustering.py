"""Balanced partitions of F items into E equal groups of m = F / E: the numerical core of the expert splits.

    labels = balanced_assignment(cost_FxE, m)                  # each item to one group, every group m items
    labels = balanced_kernel_kmeans(K_FxF, E, rng)             # k-means with equal cluster sizes, on a Gram matrix
    labels = spectral_partition(A_FxF, E, rng)                 # balanced graph partition of a weighted graph
    labels = swap_refine(A_FxF, labels)                        # pairwise swaps that raise the within-group weight

All functions are numpy, deterministic given their `rng` (a numpy Generator), and return labels (F,) int64 in
0..E-1 with exactly m items per label.

Balanced assignment (`balanced_assignment`): given costs c (F, E), minimise sum_i c[i, l_i] subject to
#{i : l_i = e} = m for every e. Exactly (the transportation problem as a linear assignment: every group repeated m
times as columns of an (F, F) cost matrix, scipy's `linear_sum_assignment`, what MoEfication's KMeansConstrained
solves with a min-cost flow) when F <= exact_limit (default 4096: about 1 s for F = 4096 on a CPU core), greedily
above: all (item, group) pairs in increasing cost, each taken when the item is free and the group not full (an
approximation, documented as such).

Balanced kernel k-means (`balanced_kernel_kmeans`): points phi_i with Gram K_ij = <phi_i, phi_j> (F, F), never
formed explicitly. With clusters S_e of size m and centroids mu_e = (1/m) sum_{j in S_e} phi_j,
    d(i, e) = ||phi_i - mu_e||^2 = K_ii - (2/m) sum_{j in S_e} K_ij + (1/m^2) sum_{j, l in S_e} K_jl
Lloyd's iterations with the balanced assignment step: assign (exact or greedy as above), recompute d, until the
labels repeat or `max_iter`. Initialised by k-means++ in the kernel space (the first centre uniform, the next ones
with probability proportional to the squared distance to the nearest centre, from `rng`). The objective
sum_i d(i, l_i) = sum_i K_ii - (1/m) sum_e sum_{i, j in S_e} K_ij does not increase (each step is optimal given the
other). With K = X X^T of L2-normalised rows this is Euclidean k-means on the normalised rows (MoEfication's
parameter clustering); with K = Z^T Z of binary activation markers it is k-means on activation patterns (CMoE).
Since all clusters have m items, minimising it maximises the within-cluster sum of K: for a co-activation count
matrix that is the number of co-activations inside experts.

Spectral partition (`spectral_partition`) of a symmetric non-negative graph A (F, F), the co-activation graph: the
normalised adjacency N = D^-1/2 A D^-1/2 (D = diag of the degrees; isolated items get zero rows), its E leading
eigenvectors U (F, E) with rows scaled to unit length (Ng, Jordan and Weiss 2001), balanced k-means on those rows
(kernel U U^T), then `swap_refine` on A. MoEfication partitions this graph with METIS and rebalances by random moves;
this is a balanced spectral partition with Kernighan-Lin-style swap refinement instead (no METIS dependency).

Swap refinement (`swap_refine`) maximises the within-group weight W = sum_e sum_{i != j in S_e} A_ij over
balanced partitions by exchanging pairs: with G[i, e] = sum_{j in S_e} A_ij (diagonal excluded), swapping i (in a)
and j (in b) changes W by 2 (G[i, b] + G[j, a] - G[i, a] - G[j, b] - 2 A_ij). Each round ranks all pairs by that
gain, then applies the best 4 F positive ones greedily (each item at most once per round, the gain re-checked against
the updated G before each swap), until a round applies none or `max_rounds`. Memory F^2 floats per round.
"""
from __future__ import annotations

import numpy as np

EXACT_LIMIT = 4096


def check_sizes(num_items: int, num_groups: int, what: str = "partition") -> int:
    """m = num_items / num_groups; ValueError naming `what` when it is not a positive integer."""
    if num_groups < 1 or num_items % num_groups:
        raise ValueError(f"{what}: {num_items} items cannot be split into {num_groups} equal groups")
    return num_items // num_groups


def balanced_assignment(cost, size: int, *, exact_limit: int = EXACT_LIMIT) -> np.ndarray:
    """Labels (F,) minimising sum_i cost[i, l_i] with exactly `size` items per group (module docstring): exact
    for F <= exact_limit, greedy above. cost: (F, E) with F = E * size."""
    cost = np.asarray(cost, np.float64)
    f, e = cost.shape
    if f != e * size:
        raise ValueError(f"balanced_assignment: {f} items do not fill {e} groups of {size}")
    if f <= exact_limit:
        from scipy.optimize import linear_sum_assignment

        rows, cols = linear_sum_assignment(np.repeat(cost, size, axis=1))
        labels = np.empty(f, np.int64)
        labels[rows] = cols // size
        return labels
    labels = np.full(f, -1, np.int64)
    room = np.full(e, size, np.int64)
    for flat in np.argsort(cost, axis=None, kind="stable"):
        i, g = divmod(int(flat), e)
        if labels[i] < 0 and room[g] > 0:
            labels[i] = g
            room[g] -= 1
    return labels


def kernel_distances(K, labels, num_groups: int) -> np.ndarray:
    """d(i, e) = K_ii - (2/m) sum_{j in S_e} K_ij + (1/m^2) sum_{j, l in S_e} K_jl: (F, E) (module docstring)."""
    K = np.asarray(K, np.float64)
    onehot = np.zeros((K.shape[0], num_groups))
    onehot[np.arange(K.shape[0]), labels] = 1.0
    sizes = np.maximum(onehot.sum(axis=0), 1.0)
    cross = K @ onehot / sizes  # (F, E)
    within = np.einsum("ie,ie->e", onehot, cross) / sizes  # (E,)
    return np.diag(K)[:, None] - 2.0 * cross + within[None, :]


def kmeans_objective(K, labels, num_groups: int) -> float:
    """sum_i d(i, l_i): the within-cluster sum of squared distances in the kernel's space."""
    d = kernel_distances(K, labels, num_groups)
    return float(d[np.arange(d.shape[0]), labels].sum())


def _kmeans_pp(K, k: int, rng: np.random.Generator) -> list[int]:
    diag = np.diag(K)
    centres = [int(rng.integers(K.shape[0]))]
    nearest = diag - 2.0 * K[:, centres[0]] + diag[centres[0]]
    for _ in range(1, k):
        p = np.maximum(nearest, 0.0)
        total = p.sum()
        c = int(rng.choice(K.shape[0], p=p / total)) if total > 0 else int(rng.integers(K.shape[0]))
        centres.append(c)
        nearest = np.minimum(nearest, diag - 2.0 * K[:, c] + diag[c])
    return centres


def balanced_kernel_kmeans(K, num_groups: int, rng: np.random.Generator, *, max_iter: int = 30,
                           exact_limit: int = EXACT_LIMIT) -> np.ndarray:
    """Labels (F,) of balanced k-means on the Gram matrix K (F, F) (module docstring)."""
    K = np.asarray(K, np.float64)
    f = K.shape[0]
    size = check_sizes(f, num_groups, "balanced_kernel_kmeans")
    if num_groups == 1:
        return np.zeros(f, np.int64)
    diag = np.diag(K)
    centres = _kmeans_pp(K, num_groups, rng)
    cost = diag[:, None] - 2.0 * K[:, centres] + diag[centres][None, :]
    labels = balanced_assignment(cost, size, exact_limit=exact_limit)
    for _ in range(max_iter):
        new = balanced_assignment(kernel_distances(K, labels, num_groups), size, exact_limit=exact_limit)
        if np.array_equal(new, labels):
            break
        labels = new
    return labels


def within_weight(A, labels) -> float:
    """W = sum_e sum_{i != j in S_e} A_ij: the graph weight inside the groups."""
    A = np.asarray(A, np.float64)
    same = labels[:, None] == labels[None, :]
    return float((A * same).sum() - np.trace(A))


def swap_refine(A, labels, *, max_rounds: int = 50) -> np.ndarray:
    """Labels after pairwise swaps that raise the within-group weight of the graph A (module docstring)."""
    A = np.array(A, np.float64)
    np.fill_diagonal(A, 0.0)
    labels = np.array(labels, np.int64)
    f, e = A.shape[0], int(labels.max()) + 1
    onehot = np.zeros((f, e))
    onehot[np.arange(f), labels] = 1.0
    G = A @ onehot  # (F, E)
    for _ in range(max_rounds):
        P = G[:, labels]  # P[i, j] = G[i, l_j]
        own = G[np.arange(f), labels]
        gain = P + P.T - own[:, None] - own[None, :] - 2.0 * A
        gain[np.tril_indices(f)] = 0.0
        cand = np.flatnonzero(gain > 1e-12)
        if cand.size == 0:
            break
        if cand.size > 4 * f:  # at most f / 2 disjoint swaps fit in a round: keep the 4 f best candidates
            cand = cand[np.argpartition(-gain.reshape(-1)[cand], 4 * f)[:4 * f]]
        cand = cand[np.argsort(-gain.reshape(-1)[cand], kind="stable")]
        used = np.zeros(f, bool)
        applied = 0
        for flat in cand:
            i, j = divmod(int(flat), f)
            if used[i] or used[j]:
                continue
            a, b = labels[i], labels[j]
            g = G[i, b] + G[j, a] - G[i, a] - G[j, b] - 2.0 * A[i, j]
            if g <= 1e-12:
                continue
            labels[i], labels[j] = b, a
            G[:, a] += A[:, j] - A[:, i]
            G[:, b] += A[:, i] - A[:, j]
            used[i] = used[j] = True
            applied += 1
        if applied == 0:
            break
    return labels


def spectral_embedding(A, dims: int) -> np.ndarray:
    """Rows (F, dims) of the `dims` leading eigenvectors of D^-1/2 A D^-1/2, each scaled to unit length (zero rows
    for isolated items)."""
    A = np.asarray(A, np.float64)
    degree = A.sum(axis=1)
    inv = np.where(degree > 0, 1.0 / np.sqrt(np.where(degree > 0, degree, 1.0)), 0.0)
    _, vectors = np.linalg.eigh(inv[:, None] * A * inv[None, :])
    U = vectors[:, ::-1][:, :dims]
    norms = np.linalg.norm(U, axis=1, keepdims=True)
    return np.where(norms > 0, U / np.where(norms > 0, norms, 1.0), 0.0)


def spectral_partition(A, num_groups: int, rng: np.random.Generator, *, max_iter: int = 30,
                       max_rounds: int = 50, exact_limit: int = EXACT_LIMIT) -> np.ndarray:
    """Labels (F,) of a balanced partition of the graph A (module docstring): spectral embedding, balanced
    k-means on it, swap refinement on A."""
    A = np.array(A, np.float64)
    np.fill_diagonal(A, 0.0)
    check_sizes(A.shape[0], num_groups, "spectral_partition")
    U = spectral_embedding(A, num_groups)
    labels = balanced_kernel_kmeans(U @ U.T, num_groups, rng, max_iter=max_iter, exact_limit=exact_limit)
    return swap_refine(A, labels, max_rounds=max_rounds)
