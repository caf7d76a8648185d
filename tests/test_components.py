"""IdSpace.components on intervals of ids (runs of aligned edges) gives the labels of plain label
propagation over the same edges: aligned runs, overlapping shifted runs, NONE ends, self edges."""

import torch

from tritonprune.graph.channels import IdSpace, _interval_labels, _propagate, _runs


def _space(n: int, edges: list[tuple[torch.Tensor, torch.Tensor]]) -> IdSpace:
    space = IdSpace()
    space.fresh(n)
    for a, b in edges:
        space.union(a, b)
    return space


def _check(space: IdSpace, on_intervals: bool | None = None) -> torch.Tensor:
    labels = space.components()
    a, b = torch.cat(space.edges_a), torch.cat(space.edges_b)
    assert torch.equal(labels, _propagate(space.count, a, b))
    if on_intervals is not None:  # which way components() went
        runs = _runs(a, b)
        assert (runs is not None and _interval_labels(space.count, *runs) is not None) == on_intervals
    return labels


def test_aligned_runs_chain_layers():
    # three "layers" of 5000 channels: 0.. ~ 5000.. ~ 10000.., plus a half-width run inside the last
    r = torch.arange(5000)
    labels = _check(_space(20000, [(r, r + 5000), (r + 5000, r + 10000), (r[:2500] + 15000, r[2500:] + 10000)]), on_intervals=True)
    assert labels[12500] == 2500 and labels[15000] == 2500 and labels[19999] == 19999


def test_overlapping_shift_and_none_ends():
    r = torch.arange(9000)
    a, b = r.clone(), r + 1  # each id joined to the next: one component, found by propagation
    a[100] = -1
    b[7000] = -1
    labels = _check(_space(9100, [(a, b), (r[:50], r[:50])]), on_intervals=False)
    assert labels[0] == 0 and labels[101] == 101 and labels[9050] == 9050


def test_random_runs_match_propagation():
    g = torch.Generator().manual_seed(0)
    ways = set()
    for _ in range(20):
        n = 30000
        edges = []
        for _ in range(int(torch.randint(1, 40, (1,), generator=g))):
            k = int(torch.randint(1, 3000, (1,), generator=g))
            x, y = (int(v) for v in torch.randint(0, n - k, (2,), generator=g))
            a, b = torch.arange(x, x + k), torch.arange(y, y + k)
            if torch.rand(1, generator=g) < 0.3:
                a[int(torch.randint(0, k, (1,), generator=g))] = -1
            edges.append((a, b))
        space = _space(n, edges)
        _check(space)
        runs = _runs(torch.cat(space.edges_a), torch.cat(space.edges_b))
        ways.add(runs is not None and _interval_labels(n, *runs) is not None)
    assert ways == {True, False}  # both ways were checked
