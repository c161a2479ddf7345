"""On-device clustering of image tokens: positional code, KMeans, cluster adjacency, cluster scores.

Everything is tensor ops with static shapes (no host scalars, no `unique`, no boolean indexing), so it
runs inside CUDA graphs and `torch.compile(fullgraph=True)`. scikit-learn's KMeans is the reference
the torch KMeans is tested against.
"""

from __future__ import annotations

import torch

from catrt.tokens import Grid


def positional_code(grid: Grid, channels: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """(N, C): row / grid height on the first half of the channels, column / grid width on the rest.

    Dividing by each side's own length keeps the code in [0, 1) on non-square grids too.
    """
    rows = torch.arange(grid.height, device=device, dtype=dtype).repeat_interleave(grid.width) / grid.height
    cols = torch.arange(grid.width, device=device, dtype=dtype).repeat(grid.height) / grid.width
    half = channels // 2
    code = torch.empty(grid.num_tokens, channels, device=device, dtype=dtype)
    code[:, :half] = rows[:, None]
    code[:, half:] = cols[:, None]
    return code


def clustering_features(output_tokens: torch.Tensor, grid: Grid, weight: float = 0.05) -> torch.Tensor:
    """(B, N, C) float32 features `weight * y + P` that KMeans groups: close in value and in space.

    Float32 whatever the outputs' dtype: in bf16 the code's rows/H steps and the 0.05 * y term round away.
    """
    code = positional_code(grid, output_tokens.shape[-1], output_tokens.device, torch.float32)
    return weight * output_tokens.float() + code


def _squared_distances(points: torch.Tensor, centers: torch.Tensor) -> torch.Tensor:
    """(B, N, C), (B, K, C) -> (B, N, K) squared L2 distances (exact difference form, not x^2 - 2xc + c^2)."""
    return (points.unsqueeze(2) - centers.unsqueeze(1)).pow(2).sum(-1)


def kmeans_plus_plus(points: torch.Tensor, n_clusters: int, uniform: torch.Tensor) -> torch.Tensor:
    """k-means++ seeding: (B, N, C) -> (B, K, C) initial centers.

    Each draw proportional to the squared distance is an argmax of log(d^2) + Gumbel noise; the noise
    comes from `uniform` (B, K, N) in (0, 1), drawn by the caller from a seeded generator, so the
    seeding is deterministic and needs no host round trip.
    """
    gumbel = -torch.log(-torch.log(uniform.clamp(1e-12, 1 - 1e-7)))
    batch, _, channels = points.shape
    first = gumbel[:, 0].argmax(-1)
    centers = [points.gather(1, first.view(batch, 1, 1).expand(-1, 1, channels))]
    nearest = _squared_distances(points, centers[0]).squeeze(-1)
    for draw in range(1, n_clusters):
        chosen = (torch.log(nearest.clamp_min(1e-30)) + gumbel[:, draw]).argmax(-1)
        center = points.gather(1, chosen.view(batch, 1, 1).expand(-1, 1, channels))
        centers.append(center)
        nearest = torch.minimum(nearest, _squared_distances(points, center).squeeze(-1))
    return torch.cat(centers, 1)


def kmeans(
    points: torch.Tensor, n_clusters: int, iterations: int, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Batched Lloyd KMeans with k-means++ seeding and a fixed iteration count.

    Args:
        points: (B, N, C) features, one clustering per batch row.
        n_clusters: K; clamped to N.
        iterations: Lloyd iterations (fixed, so the op count is static).
        generator: seeds the k-means++ draws (the same draws for every row).

    Returns:
        labels (B, N) int64 in [0, K) and float32 centers (B, K, C). An empty cluster keeps its last center.
    """
    points = points.float()  # fp16/bf16 distances overflow or tie; the clustering is float32 like the scoring
    batch, num_points, channels = points.shape
    clusters = min(n_clusters, num_points)
    # One draw shared by every row: a prompt's clusters must not depend on its place in the batch.
    uniform = torch.rand(
        (1, clusters, num_points), generator=generator, device=points.device, dtype=points.dtype
    ).expand(batch, -1, -1)
    centers = kmeans_plus_plus(points, clusters, uniform)
    ones = torch.ones(batch, num_points, device=points.device, dtype=points.dtype)
    for _ in range(iterations):
        labels = _squared_distances(points, centers).argmin(-1)
        sums = torch.zeros_like(centers).scatter_add(1, labels.unsqueeze(-1).expand(-1, -1, channels), points)
        counts = torch.zeros(batch, clusters, device=points.device, dtype=points.dtype).scatter_add(1, labels, ones)
        centers = torch.where(counts.unsqueeze(-1) > 0, sums / counts.clamp_min(1).unsqueeze(-1), centers)
    labels = _squared_distances(points, centers).argmin(-1)
    return labels, centers


def inertia(points: torch.Tensor, labels: torch.Tensor, centers: torch.Tensor) -> torch.Tensor:
    """(B,) sum of squared distances of points to their assigned centers."""
    assigned = centers.gather(1, labels.unsqueeze(-1).expand(-1, -1, points.shape[-1]))
    return (points - assigned).pow(2).sum((1, 2))


def cluster_adjacency(labels: torch.Tensor, grid: Grid, n_clusters: int) -> torch.Tensor:
    """(B, N) labels -> (B, K, K) bool: clusters touching across a 4-neighbour grid edge.

    The diagonal is False; callers add the cluster itself where they pool over a neighbourhood.
    """
    batch = labels.shape[0]
    cells = labels.view(batch, grid.height, grid.width)
    pairs = [
        (cells[:, :, :-1].reshape(batch, -1), cells[:, :, 1:].reshape(batch, -1)),
        (cells[:, :-1, :].reshape(batch, -1), cells[:, 1:, :].reshape(batch, -1)),
    ]
    flat = torch.zeros(batch, n_clusters * n_clusters, device=labels.device, dtype=torch.int32)
    for left, right in pairs:
        ones = torch.ones_like(left, dtype=torch.int32)
        flat = flat.scatter_add(1, left * n_clusters + right, ones).scatter_add(1, right * n_clusters + left, ones)
    eye = torch.eye(n_clusters, dtype=torch.bool, device=labels.device)
    return (flat.view(batch, n_clusters, n_clusters) > 0) & ~eye


def cluster_maxima(delta: torch.Tensor, labels: torch.Tensor, n_clusters: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel (signed) max of `delta` (B, N, C) over each cluster -> (B, K, C), and (B, K) non-empty mask.

    In float32 whatever `delta`'s dtype (a no-op for the runtime's float32 delta): the cluster scores built on
    these are norms and means over channels, which bf16 would round into ties between clusters.
    """
    delta = delta.float()
    batch, _, channels = delta.shape
    index = labels.unsqueeze(-1).expand(-1, -1, channels)
    maxima = torch.full((batch, n_clusters, channels), float("-inf"), device=delta.device, dtype=delta.dtype)
    maxima = maxima.scatter_reduce(1, index, delta, reduce="amax", include_self=True)
    counts = torch.zeros(batch, n_clusters, device=delta.device, dtype=delta.dtype)
    counts = counts.scatter_add(1, labels, torch.ones_like(labels, dtype=delta.dtype))
    present = counts > 0
    return torch.where(present.unsqueeze(-1), maxima, torch.zeros_like(maxima)), present


def cluster_scores(delta: torch.Tensor, labels: torch.Tensor, n_clusters: int) -> torch.Tensor:
    """(B, K) score ||max_{j in c} delta_j||_2; empty clusters score -inf so they come last."""
    maxima, present = cluster_maxima(delta, labels, n_clusters)
    scores = maxima.norm(dim=-1)
    return torch.where(present, scores, torch.full_like(scores, float("-inf")))


def pooled_cluster_scores(
    delta: torch.Tensor, labels: torch.Tensor, adjacency: torch.Tensor, n_clusters: int
) -> torch.Tensor:
    """(B, K) graph-pooled score: per channel 2 * mean + max over the cluster and its neighbours, then the norm."""
    maxima, present = cluster_maxima(delta, labels, n_clusters)
    eye = torch.eye(n_clusters, dtype=torch.bool, device=delta.device)
    members = (adjacency | eye) & present.unsqueeze(1)  # (B, K, K): row c pools over these clusters
    weights = members.to(maxima.dtype)  # float32: bf16 counts past 256 members round (257 -> 256)
    mean = (weights.unsqueeze(-1) * maxima.unsqueeze(1)).sum(2) / weights.sum(-1, keepdim=True).clamp_min(1)
    masked = torch.where(members.unsqueeze(-1), maxima.unsqueeze(1), torch.full_like(maxima.unsqueeze(1), float("-inf")))
    peak = masked.amax(2)
    peak = torch.where(present.unsqueeze(-1), peak, torch.zeros_like(peak))
    scores = (2 * mean + peak).norm(dim=-1)
    return torch.where(present, scores, torch.full_like(scores, float("-inf")))
