"""Selection and clustering: exact-k invariants, no host sync, KMeans against scikit-learn."""

from __future__ import annotations

import math
import re
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.cluster import KMeans
from torch.utils._python_dispatch import TorchDispatchMode

from catrt import selection
from catrt.clustering import (
    cluster_adjacency,
    cluster_scores,
    clustering_features,
    inertia,
    kmeans,
    kmeans_plus_plus,
    pooled_cluster_scores,
    positional_code,
)
from catrt.config import CATConfig
from catrt.tokens import Grid

CASES = [  # (batch, grid, alpha)
    (1, Grid(4, 4), 0.3),
    (2, Grid(8, 12), 0.3),
    (3, Grid(16, 16), 0.2),
    (2, Grid(6, 10), 0.5),
    (1, Grid(5, 7), 1.0),
    (2, Grid(32, 24), 0.3),
]


def _state(batch: int, grid: Grid, channels: int = 16, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    num = grid.num_tokens
    output = torch.randn(batch, num, channels, generator=gen)
    reference = torch.randn(batch, num, channels, generator=gen)
    labels, _ = kmeans(clustering_features(output, grid), min(20, num), 10, gen)
    staleness = torch.rand(batch, num, generator=gen).round(decimals=1)  # with ties
    last = torch.randint(0, 20, (batch, num), generator=gen)
    return {"output": output, "reference": reference, "labels": labels, "staleness": staleness, "last": last}


def _assert_valid(indices: torch.Tensor, batch: int, num: int, k: int) -> None:
    assert indices.shape == (batch, k) and indices.dtype == torch.long
    assert int(indices.min()) >= 0 and int(indices.max()) < num
    for row in indices:
        assert len(set(row.tolist())) == k


@pytest.mark.parametrize(("batch", "grid", "alpha"), CASES)
def test_every_rule_returns_exactly_k_distinct_in_range(batch: int, grid: Grid, alpha: float) -> None:
    num = grid.num_tokens
    k = math.ceil(alpha * num)
    state = _state(batch, grid)
    clusters = min(20, num)
    delta, magnitude = selection.relative_magnitude(state["output"], state["reference"])
    adjacency = cluster_adjacency(state["labels"], grid, clusters)
    pooled = pooled_cluster_scores(delta, state["labels"], adjacency, clusters)
    results = [
        selection.select_first(magnitude, state["labels"], pooled, k),
        selection.select_cat_step(
            state["output"], state["reference"], state["labels"], state["staleness"], state["last"],
            k=k, n_clusters=clusters, magnitude_fraction=0.25,
        ),
        selection.select_next(magnitude, state["labels"], cluster_scores(delta, state["labels"], clusters),
                              state["staleness"], state["last"], k, 1.0),
        selection.select_random(batch, num, k, torch.Generator().manual_seed(1), torch.device("cpu")),
        selection.select_top(magnitude, k),
        selection.select_sequential(batch, num, k, 3, torch.device("cpu")),
    ]
    for indices in results:
        _assert_valid(indices, batch, num, k)


def test_first_selection_walks_the_best_cluster_first() -> None:
    grid = Grid(8, 8)
    labels = (torch.arange(64) // 16).view(1, 64)  # 4 clusters of 16 tokens, in raster blocks
    magnitude = torch.rand(1, 64, generator=torch.Generator().manual_seed(0))
    pooled = torch.tensor([[0.1, 5.0, 0.3, 0.2]])
    k = 20  # share per cluster = ceil(20 / 10) = 2
    indices = selection.select_first(magnitude, labels, pooled, k)
    best_two = magnitude[0, 16:32].topk(2).indices + 16
    assert indices[0, :2].tolist() == best_two.tolist()
    # then cluster 2 (score 0.3), cluster 3, cluster 0: 2 each, then the rest by magnitude
    assert set(indices[0, 2:4].tolist()) <= set(range(32, 48))
    assert set(indices[0, 4:6].tolist()) <= set(range(48, 64))
    _assert_valid(indices, 1, 64, k)
    del grid


def test_later_selection_takes_magnitude_part_then_stalest() -> None:
    num, k = 64, 24
    labels = (torch.arange(num) // 16).view(1, num)
    magnitude = torch.rand(1, num, generator=torch.Generator().manual_seed(0))
    scores = torch.tensor([[3.0, 2.0, 1.0, 0.0]])
    staleness = torch.zeros(1, num)
    staleness[0, :32] = 1.0  # the first two clusters were just computed
    last = torch.zeros(1, num, dtype=torch.long)
    indices = selection.select_next(magnitude, labels, scores, staleness, last, k, magnitude_fraction=0.25)
    size_m = math.ceil(0.25 * k)  # 6, m = 1: 3 from cluster 0, 2 from cluster 1 (1 by magnitude), 1 from cluster 2
    first = indices[0, :3].tolist()
    assert first == magnitude[0, :16].topk(3).indices.tolist()
    rest = set(indices[0, size_m:].tolist())
    assert rest <= set(range(32, 64)), "the remaining budget must be the stalest tokens"


@pytest.mark.parametrize("n_keys", [1, 2, 3])
def test_lexsort_and_ranks_match_numpy_lexsort_with_ties(n_keys: int) -> None:
    gen = torch.Generator().manual_seed(n_keys)
    keys = [torch.randint(0, 4, (3, 50), generator=gen) for _ in range(n_keys - 1)]
    keys.append(torch.rand(3, 50, generator=gen).round(decimals=1))  # float ties too
    perm = selection.lexsort(keys)
    ranks = selection.ranks(keys)
    for row in range(3):
        # numpy sorts by its last key first; a trailing index key makes every tie explicit.
        expected = np.lexsort([np.arange(50), *[key[row].numpy() for key in reversed(keys)]])
        assert perm[row].tolist() == expected.tolist()
        assert ranks[row, perm[row]].tolist() == list(range(50))


def test_ranks_within_groups_count_from_zero_in_each_group() -> None:
    gen = torch.Generator().manual_seed(0)
    groups = torch.randint(0, 5, (2, 40), generator=gen)
    values = torch.rand(2, 40, generator=gen).round(decimals=1)
    within = selection.ranks_within_groups(groups, [values], 5)
    for row in range(2):
        for group in range(5):
            members = [i for i in range(40) if int(groups[row, i]) == group]
            expected = sorted(members, key=lambda i: (float(values[row, i]), i))
            assert [int(within[row, i]) for i in expected] == list(range(len(members)))


def test_token_score_is_the_l2_norm_of_the_change_over_channels() -> None:
    """r_j = ||y_prev_j - y_ref_j||_2 (algorithm.md "Selection"), on Pythagorean quadruples (exact in float32): the
    spec sweeps below take r from the code itself, so they cannot tell the L2 norm from another."""
    reference = torch.tensor([[[1.0, 1.0, 1.0], [0.0, 0.0, 0.0], [5.0, -1.0, 2.0], [2.0, 2.0, 2.0]]])
    change = torch.tensor([[[3.0, 4.0, 0.0], [1.0, -2.0, 2.0], [2.0, 3.0, -6.0], [0.0, 0.0, 0.0]]])
    delta, magnitude = selection.relative_magnitude(reference + change, reference)
    assert torch.equal(delta, change)
    assert magnitude.tolist() == [[5.0, 3.0, 7.0, 0.0]]  # L1 would give 7, 5, 11; the max norm 4, 2, 6


def test_staleness_ewma() -> None:
    f = torch.zeros(2, 6)
    f = selection.update_staleness(f, torch.tensor([[0, 1], [2, 3]]), 0.5)
    f = selection.update_staleness(f, torch.tensor([[0, 5], [2, 4]]), 0.5)
    assert f.tolist() == [[1.5, 0.5, 0.0, 0.0, 0.0, 1.0], [0.0, 0.0, 1.5, 0.5, 1.0, 0.0]]


def test_staleness_ewma_decays_by_the_configured_rate() -> None:
    """f <- a * f + 1[computed] at a = 0.25 and a = 0 (at the default 0.5, a and 1 - a are the same number)."""
    chosen = [torch.tensor([[0, 1]]), torch.tensor([[0, 3]]), torch.tensor([[0, 2]])]
    for decay, expected in ((0.25, [1.3125, 0.0625, 1.0, 0.25]), (0.0, [1.0, 0.0, 1.0, 0.0])):
        f = torch.zeros(1, 4)
        for indices in chosen:
            f = selection.update_staleness(f, indices, decay)
        assert f.tolist() == [expected], decay


def test_clustering_features_are_a_twentieth_of_the_output_plus_the_positional_code() -> None:
    """0.05 * y_t0 + P (algorithm.md "Clustering"), P written out: row / H on the first half of the channels, col / W
    on the rest."""
    grid = Grid(2, 3)
    output = torch.arange(24, dtype=torch.float32).view(1, 6, 4) - 7
    features = clustering_features(output, grid)
    for token in range(6):
        row, col = divmod(token, 3)
        code = [row / 2, row / 2, col / 3, col / 3]
        expected = torch.tensor([0.05 * float(output[0, token, c]) + code[c] for c in range(4)])
        assert torch.allclose(features[0, token], expected, rtol=0, atol=1e-6), token


def test_kmeans_plus_plus_draws_the_first_center_by_its_noise_then_by_squared_distance() -> None:
    """With the first draw's noise peaking at token 2 and the later draws' noise flat, each later draw is the point
    farthest from the centers so far (the Gumbel argmax of log d^2): on a line 0, 1, 3, 7, 11 that is 3, then 11, then
    7 (16 from both)."""
    points = torch.tensor([[[0.0], [1.0], [3.0], [7.0], [11.0]]])
    uniform = torch.full((1, 3, 5), 0.5)
    uniform[0, 0, 2] = 0.9
    centers = kmeans_plus_plus(points, 3, uniform)
    assert centers.flatten().tolist() == [3.0, 11.0, 7.0]


def _lloyd(points: np.ndarray, centers: np.ndarray, iterations: int) -> tuple[np.ndarray, np.ndarray]:
    """Lloyd's iterations written out in float64 (an empty cluster keeps its center), then the final assignment."""
    def nearest(centers: np.ndarray) -> np.ndarray:
        return ((points[:, None, :] - centers[None, :, :]) ** 2).sum(-1).argmin(1)

    for _ in range(iterations):
        labels = nearest(centers)
        centers = np.stack([points[labels == c].mean(0) if (labels == c).any() else centers[c] for c in range(len(centers))])
    return nearest(centers), centers


@pytest.mark.parametrize("iterations", [1, 3])
def test_kmeans_runs_exactly_its_lloyd_iterations_from_its_seeding(iterations: int) -> None:
    """kmeans = k-means++ from one (1, K, N) uniform draw of the generator, `iterations` Lloyd steps, then labels by
    the final centers: against the iterations written out (one fewer, or labels of the centers before the last
    step, differ here)."""
    points = torch.randn(1, 40, 2, generator=torch.Generator().manual_seed(5))
    labels, centers = kmeans(points, 4, iterations, torch.Generator().manual_seed(9))
    seeds = kmeans_plus_plus(points, 4, torch.rand((1, 4, 40), generator=torch.Generator().manual_seed(9)))
    expected_labels, expected_centers = _lloyd(points[0].double().numpy(), seeds[0].double().numpy(), iterations)
    fewer_labels, _ = _lloyd(points[0].double().numpy(), seeds[0].double().numpy(), iterations - 1)
    assert labels[0].tolist() == expected_labels.tolist() != fewer_labels.tolist()  # precondition: the count tells
    assert np.allclose(centers[0].numpy(), expected_centers, atol=1e-6)


def test_an_empty_cluster_keeps_its_center() -> None:
    """Points 5, 1, 1, 1 into 3 clusters: k-means++ seeds a point twice (only two values exist), so one cluster gets
    no member; its center stays at its seed, a data point (not at the origin, where an empty mean would put it)."""
    points = torch.tensor([[[5.0], [1.0], [1.0], [1.0]]])
    labels, centers = kmeans(points, 3, 2, torch.Generator().manual_seed(0))
    row = labels[0].tolist()
    assert len(set(row)) == 2 and row[1] == row[2] == row[3] != row[0]  # precondition: one cluster is empty
    assert set(centers.flatten().tolist()) == {1.0, 5.0}


def test_positional_code_on_non_square_grid() -> None:
    code = positional_code(Grid(2, 4), 6, torch.device("cpu"), torch.float32)
    assert code.shape == (8, 6)
    assert code[5, :3].tolist() == [0.5] * 3 and code[5, 3:].tolist() == [0.25] * 3


def test_adjacency_marks_touching_clusters_only() -> None:
    labels = torch.tensor([[0, 0, 1, 1, 0, 0, 1, 1, 2, 2, 2, 2]])  # grid 3x4: rows [0011] [0011] [2222]
    adjacency = cluster_adjacency(labels, Grid(3, 4), 4)[0]
    assert adjacency[0, 1] and adjacency[1, 0] and adjacency[0, 2] and adjacency[1, 2]
    assert not adjacency[0, 0] and not adjacency[3].any()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_torch_kmeans_matches_scikit_learn(seed: int) -> None:
    grid = Grid(16, 16)
    gen = torch.Generator().manual_seed(seed)
    # Smooth, structured outputs like a denoiser's, plus the positional code.
    base = torch.randn(1, 4, 4, 16, generator=gen).permute(0, 3, 1, 2)
    smooth = torch.nn.functional.interpolate(base, size=(16, 16), mode="bilinear").permute(0, 2, 3, 1)
    features = clustering_features(smooth.reshape(1, 256, 16) * 10, grid)
    labels, centers = kmeans(features, 20, 30, torch.Generator().manual_seed(seed))
    ours = float(inertia(features, labels, centers)[0])
    reference = KMeans(n_clusters=20, n_init=1, random_state=seed).fit(features[0].numpy()).inertia_
    assert ours <= reference * 1.05, (ours, reference)
    assert labels.unique().numel() >= 18


HOST_SYNC_OPS = {
    "aten::_local_scalar_dense", "aten::nonzero", "aten::_unique2", "aten::unique_dim",
    "aten::unique_consecutive", "aten::masked_select", "aten::repeat_interleave",
}


class NoHostSync(TorchDispatchMode):
    """Raises on every op that needs the host to see a tensor's values."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        name = func._schema.name
        if name in HOST_SYNC_OPS and not (name == "aten::repeat_interleave" and isinstance(args[1], int)):
            raise AssertionError(f"host synchronisation: {func}")
        if name == "aten::index" and any(a is not None and a.dtype == torch.bool for a in args[1]):
            raise AssertionError(f"boolean-mask indexing: {func}")
        return func(*args, **(kwargs or {}))


def test_guard_catches_item() -> None:
    with pytest.raises(AssertionError, match="host synchronisation"), NoHostSync():
        torch.ones(2).sum().item()


def test_selection_and_clustering_need_no_host_sync() -> None:
    grid = Grid(8, 12)
    state = _state(2, grid)
    with NoHostSync():
        features = clustering_features(state["output"], grid)
        labels, _ = kmeans(features, 20, 5, torch.Generator().manual_seed(0))
        delta, magnitude = selection.relative_magnitude(state["output"], state["reference"])
        pooled = pooled_cluster_scores(delta, labels, cluster_adjacency(labels, grid, 20), 20)
        first = selection.select_first(magnitude, labels, pooled, 29)
        staleness = selection.update_staleness(torch.zeros(2, 96), first, 0.5)
        selection.select_cat_step(
            state["output"], state["reference"], labels, staleness, state["last"],
            k=29, n_clusters=20, magnitude_fraction=0.25,
        )


@pytest.mark.parametrize(("backend", "k"), [("eager", 29), ("inductor", 15)])
def test_per_step_selection_compiles_fullgraph_without_recompiles(backend: str, k: int) -> None:
    """Dynamo captures the step as one graph (no host sync), and inductor, torch.compile's default backend, compiles
    and runs it with the same indices. k = 15 (m = 1 token a cluster share) failed in inductor on the CPU ('vr must
    not be None for symbol indirect5') while the quotas were a table gathered by cluster rank."""
    grid = Grid(8, 12)

    def step(output, reference, labels, staleness, last):  # noqa: ANN001, ANN202
        indices = selection.select_cat_step(
            output, reference, labels, staleness, last, k=k, n_clusters=20, magnitude_fraction=0.25
        )
        return indices, selection.update_staleness(staleness, indices, 0.5)

    torch._dynamo.reset()  # the other backend's graph of this same function is no recompile of this one
    compiled = torch.compile(step, fullgraph=True, backend=backend)
    with torch._dynamo.config.patch(error_on_recompile=True):
        for seed in range(3):
            state = _state(2, grid, seed=seed)
            args = (state["output"], state["reference"], state["labels"], state["staleness"], state["last"])
            got, _ = compiled(*args)
            expected, _ = step(*args)
            assert torch.equal(got, expected)


def test_runtime_code_has_no_host_round_trips() -> None:
    root = Path(__file__).resolve().parents[1] / "catrt"
    for name in ("selection.py", "clustering.py", "runtime.py", "step_state.py", "cuda_graphs.py"):
        text = (root / name).read_text()
        assert not re.search(r"\.(tolist|item|cpu|numpy)\(", text), name


def test_a_prompts_clusters_do_not_depend_on_its_batch_position() -> None:
    grid = Grid(8, 12)
    state = _state(2, grid)
    features = clustering_features(state["output"], grid)
    labels, _ = kmeans(features, 20, 10, torch.Generator().manual_seed(0))
    swapped, _ = kmeans(features.flip(0), 20, 10, torch.Generator().manual_seed(0))
    single, _ = kmeans(features[1:], 20, 10, torch.Generator().manual_seed(0))
    assert torch.equal(labels, swapped.flip(0))
    assert torch.equal(labels[1:], single)


# -- property sweeps: the spec's selection, written out plainly, against the tensor code ---------------


def _spec_first(r: list[float], labels: list[int], pooled: list[float], k: int) -> list[int]:
    """algorithm.md "First selection", one prompt: clusters by pooled score, top ceil(k/10) by r from each."""
    share = -(-k // 10)
    picked: list[int] = []
    for cluster in sorted(range(len(pooled)), key=lambda c: (-pooled[c], c)):
        members = sorted((j for j in range(len(r)) if labels[j] == cluster), key=lambda j: (-r[j], j))
        picked += members[:share]
    taken = set(picked)
    rest = sorted((j for j in range(len(r)) if j not in taken), key=lambda j: (-r[j], j))
    return (picked + rest)[:k]


def _spec_next(r: list[float], labels: list[int], scores: list[float], f: list[float], last: list[int],
               k: int, fraction: Fraction) -> list[int]:
    """algorithm.md "Later selections", one prompt, with |M| = ceil(fraction * k) in exact arithmetic."""
    size_m = math.ceil(fraction * k)
    m = max(1, -(-size_m // 6))
    stalest = lambda j: (f[j], last[j], j)  # noqa: E731
    part: list[int] = []
    for q, cluster in enumerate(sorted(range(len(scores)), key=lambda c: (-scores[c], c))):
        quota = (3 - q) * m if q < 3 else m
        stale = quota // 2 if q > 0 else 0
        members = [j for j in range(len(r)) if labels[j] == cluster]
        by_r = sorted(members, key=lambda j: (-r[j], j))[: quota - stale]
        part += by_r + sorted((j for j in members if j not in by_r), key=stalest)[:stale]
    part = part[:size_m]
    taken = set(part)
    rest = sorted((j for j in range(len(r)) if j not in taken), key=stalest)
    return (part + rest)[:k]


SWEEP = [  # (batch, grid, alpha, n_clusters, magnitude_fraction): N = 1, 2, prime, non-square, > and = N clusters
    (1, Grid(1, 1), 0.3, 20, 0.25),
    (2, Grid(1, 2), 1e-6, 1, 0.25),
    (3, Grid(1, 7), 0.5, 7, 0.25),
    (1, Grid(13, 1), 1.0, 20, 0.25),
    (2, Grid(2, 5), 0.3, 3, 0.3),  # alpha * N = 3 up to float error
    (3, Grid(5, 3), 0.6, 1, 1.0),
    (2, Grid(10, 20), 0.5, 20, 0.55),  # k = 100, 0.55 * 100 = 55.00000000000001
    (1, Grid(9, 11), 0.3, 99, 0.0),
    (2, Grid(17, 23), 0.2, 20, 0.25),
    (1, Grid(64, 64), 0.3, 20, 0.25),  # SD3 at 1024x1024: k = 1229
]


@pytest.mark.parametrize(("batch", "grid", "alpha", "clusters", "fraction"), SWEEP)
def test_selection_matches_the_spec_written_out(batch: int, grid: Grid, alpha: float, clusters: int, fraction: float) -> None:
    num = grid.num_tokens
    k = CATConfig(alpha=alpha).num_selected(num)
    assert k == max(1, math.ceil(Fraction(repr(alpha)) * num))
    for seed in range(3):
        gen = torch.Generator().manual_seed(seed)
        output = torch.randn(batch, num, 5, generator=gen)
        reference = torch.randn(batch, num, 5, generator=gen)
        labels = torch.randint(0, clusters, (batch, num), generator=gen)  # empty clusters included
        staleness = torch.randint(0, 3, (batch, num), generator=gen) / 2.0  # many ties
        last = torch.randint(0, 2, (batch, num), generator=gen)
        delta, magnitude = selection.relative_magnitude(output, reference)
        pooled = pooled_cluster_scores(delta, labels, cluster_adjacency(labels, grid, clusters), clusters)
        scores = cluster_scores(delta, labels, clusters)
        first = selection.select_first(magnitude, labels, pooled, k)
        later = selection.select_cat_step(output, reference, labels, staleness, last,
                                          k=k, n_clusters=clusters, magnitude_fraction=fraction)
        for indices in (first, later):
            _assert_valid(indices, batch, num, k)
        assert torch.equal(first, selection.select_first(magnitude, labels, pooled, k))
        for row in range(batch):
            r, lab = magnitude[row].tolist(), labels[row].tolist()
            assert first[row].tolist() == _spec_first(r, lab, pooled[row].tolist(), k)
            expected = _spec_next(r, lab, scores[row].tolist(), staleness[row].tolist(), last[row].tolist(),
                                  k, Fraction(repr(fraction)))
            assert later[row].tolist() == expected


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_outputs_are_scored_and_clustered_in_float32(dtype: torch.dtype) -> None:
    grid = Grid(8, 12)
    state = _state(2, grid)
    output, reference = state["output"].to(dtype), state["reference"].to(dtype)
    delta, magnitude = selection.relative_magnitude(output, reference)
    assert delta.dtype == magnitude.dtype == torch.float32
    assert torch.equal(magnitude, selection.relative_magnitude(output.float(), reference.float())[1])
    features = clustering_features(output, grid)
    assert features.dtype == torch.float32
    assert torch.equal(features, clustering_features(output.float(), grid))
    labels, centers = kmeans(features.to(dtype), 20, 5, torch.Generator().manual_seed(0))
    expected, _ = kmeans(features.to(dtype).float(), 20, 5, torch.Generator().manual_seed(0))
    assert centers.dtype == torch.float32 and torch.equal(labels, expected)
    # The cluster scores too, handed a half-precision delta directly: float32 norms of the exact maxima.
    half = delta.to(dtype)
    adjacency = cluster_adjacency(labels, grid, 20)
    for scores, exact in ((cluster_scores(half, labels, 20), cluster_scores(half.float(), labels, 20)),
                          (pooled_cluster_scores(half, labels, adjacency, 20), pooled_cluster_scores(half.float(), labels, adjacency, 20))):
        assert scores.dtype == torch.float32 and torch.equal(scores, exact)


def test_pooled_scores_of_a_bf16_delta_count_a_clusters_many_neighbours_in_float32() -> None:
    """The pooled mean divides by the member count, which bf16 rounds past 256 (257 -> 256): counted in float32, as the
    maxima are, a half-precision delta scores exactly as its float32 copy."""
    clusters = 257
    labels = torch.arange(clusters).unsqueeze(0)  # one token per cluster, every cluster pooling over all of them
    adjacency = torch.ones(1, clusters, clusters, dtype=torch.bool)
    delta = torch.randn(1, clusters, 4, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    scores = pooled_cluster_scores(delta, labels, adjacency, clusters)
    assert scores.dtype == torch.float32
    assert torch.equal(scores, pooled_cluster_scores(delta.float(), labels, adjacency, clusters))


def test_non_finite_outputs_still_select_exactly_k_distinct() -> None:
    """A NaN or inf in a step's output (an fp16 overflow upstream) must not break the static-shape contract."""
    grid = Grid(6, 7)
    state = _state(2, grid)
    output = state["output"].clone()
    output[0, :5] = float("nan")
    output[1, 3:9] = float("inf")
    output[1, 20, 0] = float("-inf")
    labels, _ = kmeans(clustering_features(output, grid), 20, 5, torch.Generator().manual_seed(0))
    assert labels.min() >= 0 and labels.max() < 20
    delta, magnitude = selection.relative_magnitude(output, state["reference"])
    pooled = pooled_cluster_scores(delta, labels, cluster_adjacency(labels, grid, 20), 20)
    _assert_valid(selection.select_first(magnitude, labels, pooled, 13), 2, 42, 13)
    later = selection.select_cat_step(output, state["reference"], labels, state["staleness"], state["last"],
                                      k=13, n_clusters=20, magnitude_fraction=0.25)
    _assert_valid(later, 2, 42, 13)


@pytest.mark.parametrize(("num", "k", "fraction"), [(10, 3, 0.25), (97, 1, 0.25), (64, 20, 0.0), (30, 30, 0.25), (50, 7, 0.5)])
def test_staleness_stays_bounded_and_every_token_comes_round(num: int, k: int, fraction: float) -> None:
    """f <- 0.5 f + 1[computed] stays in [0, 1 / (1 - 0.5)]; the stalest part brings every token back within the steps
    a pure round robin of its size needs (plus one), whatever the magnitude part keeps choosing."""
    gen = torch.Generator().manual_seed(num)
    labels = torch.randint(0, 4, (1, num), generator=gen)
    magnitude = torch.rand(1, num, generator=gen)  # fixed: the magnitude part asks for the same tokens every step
    staleness = torch.zeros(1, num)
    last = torch.zeros(1, num, dtype=torch.long)
    stale_budget = k - math.ceil(Fraction(repr(fraction)) * k)
    period = math.ceil(num / max(stale_budget, 1)) + 1
    scores = cluster_scores(magnitude.unsqueeze(-1), labels, 4)
    for step in range(1, 4 * period + 1):
        indices = selection.select_next(magnitude, labels, scores, staleness, last, k, fraction)
        _assert_valid(indices, 1, num, k)
        before = staleness.clone()
        staleness = selection.update_staleness(staleness, indices, 0.5)
        computed = torch.zeros(1, num, dtype=torch.bool).scatter(1, indices, True)
        assert torch.equal(staleness, 0.5 * before + computed.float())
        assert staleness.min() >= 0 and staleness.max() <= 2  # < 2 exactly; float32 rounds 1.99999999 up
        last = torch.where(computed, torch.full_like(last, step), last)
        if stale_budget and step >= period:
            assert (step - last).max() < period, f"a token waited {(step - last).max()} steps"


def test_round_robin_rule_covers_every_token_in_ceil_n_over_k_steps() -> None:
    num, k = 23, 5
    staleness = torch.zeros(2, num)
    last = torch.zeros(2, num, dtype=torch.long)
    seen = torch.zeros(2, num, dtype=torch.bool)
    for step in range(1, math.ceil(num / k) + 1):
        indices = selection.take_first(selection.staleness_ranks(staleness, last), k)
        _assert_valid(indices, 2, num, k)
        seen.scatter_(1, indices, True)
        staleness = selection.update_staleness(staleness, indices, 0.5)
        last.scatter_(1, indices, step)
    assert seen.all()


@pytest.mark.parametrize(("grid", "clusters", "channels"), [
    (Grid(1, 1), 20, 1), (Grid(1, 2), 1, 3), (Grid(1, 7), 7, 4), (Grid(5, 3), 30, 5), (Grid(6, 9), 20, 16),
])
def test_cluster_scores_adjacency_and_code_match_the_spec_written_out(grid: Grid, clusters: int, channels: int) -> None:
    """||max_c delta||, the adjacency of 4-neighbour cells, the pooled 2 * mean + max and the positional code, by loops."""
    gen = torch.Generator().manual_seed(grid.num_tokens)
    num = grid.num_tokens
    delta = torch.randn(2, num, channels, generator=gen)
    labels = torch.randint(0, clusters, (2, num), generator=gen)
    adjacency = cluster_adjacency(labels, grid, clusters)
    scores = cluster_scores(delta, labels, clusters)
    pooled = pooled_cluster_scores(delta, labels, adjacency, clusters)
    for row in range(2):
        lab = labels[row].tolist()
        touching = set()
        for i in range(grid.height):
            for j in range(grid.width):
                for ni, nj in ((i + 1, j), (i, j + 1)):
                    if ni < grid.height and nj < grid.width:
                        a, b = lab[i * grid.width + j], lab[ni * grid.width + nj]
                        touching |= {(a, b), (b, a)} if a != b else set()
        assert {(a, b) for a in range(clusters) for b in range(clusters) if adjacency[row, a, b]} == touching
        maxima = {c: delta[row][labels[row] == c].amax(0) for c in set(lab)}
        for c in range(clusters):
            if c not in maxima:
                assert scores[row, c] == pooled[row, c] == float("-inf")
                continue
            assert torch.allclose(scores[row, c], maxima[c].norm())
            around = torch.stack([maxima[c]] + [maxima[d] for d in maxima if (c, d) in touching])
            assert torch.allclose(pooled[row, c], (2 * around.mean(0) + around.amax(0)).norm(), atol=1e-6)
    code = positional_code(grid, channels, torch.device("cpu"), torch.float32)
    for token in range(num):
        row, col = divmod(token, grid.width)
        half = channels // 2
        expected = torch.tensor([row / grid.height] * half + [col / grid.width] * (channels - half))
        assert torch.allclose(code[token], expected, rtol=0, atol=1e-7)


@pytest.mark.parametrize(("grid", "clusters", "dtype"), [
    (Grid(1, 1), 20, torch.float32), (Grid(1, 7), 7, torch.bfloat16), (Grid(5, 3), 30, torch.float16),
])
def test_edge_shapes_need_no_host_sync(grid: Grid, clusters: int, dtype: torch.dtype) -> None:
    num = grid.num_tokens
    state = _state(3, grid)
    output, reference = state["output"].to(dtype), state["reference"].to(dtype)
    k = CATConfig(alpha=0.3).num_selected(num)
    with NoHostSync():
        labels, _ = kmeans(clustering_features(output, grid), clusters, 3, torch.Generator().manual_seed(0))
        delta, magnitude = selection.relative_magnitude(output, reference)
        pooled = pooled_cluster_scores(delta, labels, cluster_adjacency(labels, grid, clusters), clusters)
        first = selection.select_first(magnitude, labels, pooled, k)
        staleness = selection.update_staleness(torch.zeros(3, num), first, 0.5)
        later = selection.select_cat_step(output, reference, labels, staleness, state["last"],
                                          k=k, n_clusters=clusters, magnitude_fraction=0.25)
    _assert_valid(first, 3, num, k)
    _assert_valid(later, 3, num, k)


def test_baselines_are_deterministic_and_sequential_covers_every_token() -> None:
    num, k = 29, 4
    draws = [selection.select_random(3, num, k, torch.Generator().manual_seed(7), torch.device("cpu")) for _ in range(2)]
    assert torch.equal(draws[0], draws[1])
    _assert_valid(draws[0], 3, num, k)
    seen = torch.zeros(2, num, dtype=torch.bool)
    for step in range(math.ceil(num / k)):
        indices = selection.select_sequential(2, num, k, step, torch.device("cpu"))
        _assert_valid(indices, 2, num, k)
        seen.scatter_(1, indices, True)
    assert seen.all()


def test_kmeans_is_deterministic_for_a_seed_at_edge_shapes() -> None:
    for grid, clusters in ((Grid(1, 1), 20), (Grid(1, 2), 2), (Grid(3, 5), 15), (Grid(7, 3), 40)):
        features = clustering_features(_state(2, grid)["output"], grid)
        runs = [kmeans(features, clusters, 4, torch.Generator().manual_seed(3)) for _ in range(2)]
        assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])
        labels, centers = runs[0]
        assert centers.shape == (2, min(clusters, grid.num_tokens), features.shape[-1])
        assert labels.min() >= 0 and labels.max() < min(clusters, grid.num_tokens)
        if clusters >= grid.num_tokens:  # as many clusters as tokens: each token its own
            assert all(len(set(row.tolist())) == grid.num_tokens for row in labels)


def test_all_equal_scores_fall_back_to_index_order_as_the_spec_does() -> None:
    """y_prev == y_ref (nothing moved) and equal staleness: every tie is broken by index, cluster and token alike."""
    grid, clusters, k = Grid(5, 7), 6, 11
    output = torch.ones(2, 35, 4)
    labels = torch.arange(35).remainder(clusters).expand(2, -1)
    delta, magnitude = selection.relative_magnitude(output, output.clone())
    pooled = pooled_cluster_scores(delta, labels, cluster_adjacency(labels, grid, clusters), clusters)
    staleness, last = torch.full((2, 35), 0.5), torch.zeros(2, 35, dtype=torch.long)
    first = selection.select_first(magnitude, labels, pooled, k)
    later = selection.select_cat_step(output, output.clone(), labels, staleness, last,
                                      k=k, n_clusters=clusters, magnitude_fraction=0.25)
    for row in range(2):
        r, lab = magnitude[row].tolist(), labels[row].tolist()
        assert first[row].tolist() == _spec_first(r, lab, pooled[row].tolist(), k) == [0, 6, 1, 7, 2, 8, 3, 9, 4, 10, 5]
        scores = cluster_scores(delta, labels, clusters)[row].tolist()
        assert later[row].tolist() == _spec_next(r, lab, scores, staleness[row].tolist(), last[row].tolist(), k, Fraction(1, 4))
