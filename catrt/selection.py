"""Which k image tokens a pruned step recomputes (algorithm.md, "Selection").

Pure tensor functions over (B, N) per-prompt data, with static shapes and no host synchronisation:
every choice is made by ranking (stable sorts and top-k over a priority order), never by `unique`,
`nonzero` or boolean indexing, so the result is always exactly k distinct indices in [0, N).
"""

from __future__ import annotations

import math

import torch

from catrt.clustering import cluster_scores
from catrt.config import ceil_of_fraction


def relative_magnitude(output_tokens: torch.Tensor, reference_tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """delta = y_prev - y_ref (B, N, C) and its per-token L2 norm r (B, N), in float32 whatever the
    inputs' dtype: fp16/bf16 rounding would turn close scores into ties and change the ranking."""
    delta = output_tokens.float() - reference_tokens.float()
    return delta, delta.norm(dim=-1)


def lexsort(keys: list[torch.Tensor]) -> torch.Tensor:
    """(B, N) permutation sorting rows by keys[0], then keys[1], ..., then by index (stable).

    The last key sorts the identity, so its sort is the first permutation (no gathers): every op saved
    is a kernel launch saved in each pruned step's selection.
    """
    perm = torch.sort(keys[-1], dim=1, stable=True).indices
    for key in reversed(keys[:-1]):
        order = torch.sort(key.gather(1, perm), dim=1, stable=True).indices
        perm = perm.gather(1, order)
    return perm


def ranks(keys: list[torch.Tensor]) -> torch.Tensor:
    """(B, N) rank of each position under `lexsort(keys)` (0 = first)."""
    perm = lexsort(keys)
    positions = torch.arange(perm.shape[1], device=perm.device).expand_as(perm)
    return torch.empty_like(perm).scatter(1, perm, positions)


def ranks_within_groups(groups: torch.Tensor, keys: list[torch.Tensor], n_groups: int) -> torch.Tensor:
    """(B, N) rank of each position among the members of its group (groups in [0, n_groups))."""
    perm = lexsort([groups, *keys])
    sorted_groups = groups.gather(1, perm)
    counts = torch.zeros(groups.shape[0], n_groups, device=groups.device, dtype=torch.long)
    counts = counts.scatter_add(1, groups, torch.ones_like(groups))
    starts = counts.cumsum(1) - counts
    positions = torch.arange(perm.shape[1], device=perm.device).expand_as(perm)
    within = positions - starts.gather(1, sorted_groups)
    return torch.empty_like(perm).scatter(1, perm, within)


def take_first(order: torch.Tensor, k: int) -> torch.Tensor:
    """(B, k) indices of the k smallest values of an (integer) priority order, best first."""
    return torch.topk(order, k, dim=1, largest=False, sorted=True).indices


def select_first(magnitude: torch.Tensor, labels: torch.Tensor, pooled_scores: torch.Tensor, k: int) -> torch.Tensor:
    """First selection (step t0): walk clusters by pooled score, top ceil(k/10) tokens by r from each.

    Tokens past every cluster's share come last, by r, so the result always has exactly k indices.
    """
    num = magnitude.shape[1]
    n_clusters = pooled_scores.shape[1]
    cluster_position = ranks([-pooled_scores])  # (B, K): 0 = best cluster
    share = math.ceil(k / 10)
    within = ranks_within_groups(labels, [-magnitude], n_clusters)
    picked = within < share
    walk = cluster_position.gather(1, labels) * num + within
    rest = n_clusters * num + ranks([-magnitude])
    return take_first(torch.where(picked, walk, rest), k)


def staleness_ranks(staleness: torch.Tensor, last_computed: torch.Tensor) -> torch.Tensor:
    """(B, N) rank by staleness: smallest EWMA first, then computed longest ago, then lowest index."""
    return ranks([staleness, last_computed])


def select_next(
    magnitude: torch.Tensor,
    labels: torch.Tensor,
    scores: torch.Tensor,
    staleness: torch.Tensor,
    last_computed: torch.Tensor,
    k: int,
    magnitude_fraction: float,
) -> torch.Tensor:
    """Later selections: a magnitude part M walked over clusters, the rest the stalest tokens.

    |M| = ceil(magnitude_fraction * k), m = ceil(|M| / 6); the q-th cluster by score gives
    (3 - q) * m tokens (q < 3), later clusters m each; in every cluster after the first, half of its
    share goes to its stalest members instead of its largest r.
    """
    num = magnitude.shape[1]
    n_clusters = scores.shape[1]
    magnitude_size = ceil_of_fraction(magnitude_fraction, k)
    m = max(1, math.ceil(magnitude_size / 6))
    cluster_position = ranks([-scores])  # (B, K)
    # (3 - q) * m for the q-th cluster, m past the third: arithmetic on the rank, not a table lookup by it
    # (inductor, torch 2.13 on the CPU, fails to compile a gather indexed by a gathered index).
    quota = torch.clamp(3 - cluster_position, min=1) * m
    stale_quota = torch.where(cluster_position > 0, quota // 2, torch.zeros_like(quota))
    token_quota, token_stale_quota = quota.gather(1, labels), stale_quota.gather(1, labels)

    by_magnitude = ranks_within_groups(labels, [-magnitude], n_clusters)
    magnitude_pick = by_magnitude < token_quota - token_stale_quota
    by_staleness = ranks_within_groups(labels, [magnitude_pick.long(), staleness, last_computed], n_clusters)
    stale_pick = ~magnitude_pick & (by_staleness < token_stale_quota)
    candidate = magnitude_pick | stale_pick

    within = torch.where(magnitude_pick, by_magnitude, num + by_staleness)
    walk = cluster_position.gather(1, labels) * (2 * num) + within
    walk = torch.where(candidate, walk, torch.full_like(walk, n_clusters * 2 * num))
    walk_rank = ranks([walk])
    in_magnitude_part = candidate & (walk_rank < magnitude_size)
    order = torch.where(in_magnitude_part, walk_rank, magnitude_size + staleness_ranks(staleness, last_computed))
    return take_first(order, k)


def select_cat_step(
    output_tokens: torch.Tensor,
    reference_tokens: torch.Tensor,
    labels: torch.Tensor,
    staleness: torch.Tensor,
    last_computed: torch.Tensor,
    *,
    k: int,
    n_clusters: int,
    magnitude_fraction: float,
) -> torch.Tensor:
    """One later CAT selection from the output cache: scores, cluster walk, stalest tokens -> (B, k)."""
    delta, magnitude = relative_magnitude(output_tokens, reference_tokens)
    scores = cluster_scores(delta, labels, n_clusters)
    return select_next(magnitude, labels, scores, staleness, last_computed, k, magnitude_fraction)


def update_staleness(staleness: torch.Tensor, indices: torch.Tensor, decay: float) -> torch.Tensor:
    """f <- decay * f + 1[computed this step], for a pruned step's (B, k) indices."""
    computed = torch.zeros_like(staleness).scatter(1, indices, 1.0)
    return decay * staleness + computed


# -- baselines for bench/: same k, same schedule, other rules ----------------------------------


def select_random(batch: int, num: int, k: int, generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    """k distinct uniformly random tokens, one draw for every prompt of the batch: a prompt's image must not depend on
    its place in the batch (as KMeans' draws), and a draw per row gave the same seed another image at row 1 than at 0."""
    noise = torch.rand((1, num), generator=generator, device=device).expand(batch, -1)
    return torch.topk(noise, k, dim=1).indices


def select_top(scores: torch.Tensor, k: int) -> torch.Tensor:
    """The k highest-scoring tokens (by noise magnitude, or by attention received): no clusters, no staleness."""
    return torch.topk(scores, k, dim=1).indices


def select_sequential(batch: int, num: int, k: int, pruned_step: int, device: torch.device) -> torch.Tensor:
    """The paper's Figure 6 strawman: consecutive raster-order rows, sliding by k each pruned step."""
    start = (pruned_step * k) % num
    window = (start + torch.arange(k, device=device)) % num
    return window.expand(batch, k)
