"""srr (graphs.srr): the greedy covering number against a slow reference."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp

from graphs.srr import greedy_covering_number


def _slow_greedy_cover(adj: np.ndarray, ell: int) -> int:
    """Reference: pure-Python greedy ℓ-cover by BFS balls."""
    n = adj.shape[0]
    balls = []
    for v in range(n):
        seen, frontier = {v}, {v}
        for _ in range(ell):
            frontier = {u for w in frontier for u in np.flatnonzero(adj[w])} - seen
            seen |= frontier
        balls.append(seen)
    uncovered, count = set(range(n)), 0
    while uncovered:
        best = max(range(n), key=lambda v: (len(balls[v] & uncovered), -v))
        uncovered -= balls[best]
        count += 1
    return count


@pytest.mark.parametrize("seed", range(8))
def test_greedy_cover_matches_slow_reference(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n = int(rng.integers(2, 30))
    upper = np.triu(rng.random((n, n)) < rng.uniform(0.02, 0.3), 1)
    adj = (upper | upper.T).astype(int)
    for ell in (1, 2):
        got = greedy_covering_number(sp.csr_matrix(adj), ell=ell)
        assert got == _slow_greedy_cover(adj, ell)
    assert greedy_covering_number(sp.csr_matrix(adj), ell=2) <= greedy_covering_number(
        sp.csr_matrix(adj), ell=1
    )
