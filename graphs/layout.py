"""A seeded, deterministic 2-D layout of a graph for drawing (Fruchterman–Reingold, numpy only).

Used by the dashboard to draw a layer's filter similarity graph: joined filters are pulled
together (more strongly the heavier the edge), all filters repel each other, and a weak pull to
the centre keeps isolated filters from drifting away. The same input and seed give the same
positions: the start is drawn from ``numpy.random.default_rng(seed)`` and every later step is
elementwise arithmetic and fixed-order reductions (no BLAS, no threads).
"""

from __future__ import annotations

import numpy as np

from graphs.errors import InvalidInputError


def spring_layout(
    n: int,
    edges: np.ndarray,
    weights: np.ndarray | None = None,
    *,
    seed: int = 0,
    iterations: int = 150,
    gravity: float = 0.1,
) -> np.ndarray:
    """Positions of ``n`` vertices in the unit square.

    Args:
        n: number of vertices.
        edges: (m, 2) integer array of vertex pairs (i, j), 0 <= i, j < n.
        weights: (m,) positive edge weights (default 1); a heavier edge pulls harder.
        seed: seed of the start positions.
        iterations: steps of the cooling schedule.
        gravity: strength of the pull towards the centre.

    Returns:
        (n, 2) float64 array in [0, 1]², the drawing centred and scaled to fill it.
    """
    E = np.asarray(edges, dtype=np.int64).reshape(-1, 2)
    if n < 0 or (E.size and (E.min() < 0 or E.max() >= n)):
        raise InvalidInputError(f"edges must join vertices 0..{n - 1}")
    w = np.ones(len(E)) if weights is None else np.asarray(weights, dtype=np.float64)
    if w.shape != (len(E),) or not np.all(np.isfinite(w)) or np.any(w <= 0):
        raise InvalidInputError("edge weights must be positive and finite, one per edge")
    if n == 0:
        return np.zeros((0, 2))
    if n == 1:
        return np.full((1, 2), 0.5)
    rng = np.random.default_rng(seed)
    pos = rng.random((n, 2))
    k = 1.0 / np.sqrt(n)  # the ideal distance between vertices
    w = w / w.max() if w.size else w
    i, j = E[:, 0], E[:, 1]
    temperature = 0.1
    cooling = temperature / (iterations + 1)
    for _ in range(iterations):
        delta = pos[:, None, :] - pos[None, :, :]
        dist2 = np.maximum(np.einsum("abk,abk->ab", delta, delta), 1e-9)
        disp = np.einsum("ab,abk->ak", k * k / dist2, delta)  # repulsion k²/d along delta/d
        d = pos[i] - pos[j]
        pull = (np.sqrt(np.einsum("ak,ak->a", d, d)) / k * w)[:, None] * d  # attraction d²/k
        np.add.at(disp, i, -pull)
        np.add.at(disp, j, pull)
        disp -= gravity * n * k * (pos - pos.mean(axis=0))
        length = np.maximum(np.sqrt(np.einsum("ak,ak->a", disp, disp)), 1e-12)
        pos = pos + disp * (np.minimum(length, temperature) / length)[:, None]
        temperature -= cooling
    return _fit(pos)


def _fit(pos: np.ndarray) -> np.ndarray:
    """Scale uniformly into [0, 1]² and centre (aspect kept)."""
    lo, hi = pos.min(axis=0), pos.max(axis=0)
    span = float((hi - lo).max())
    if span <= 0:
        return np.full_like(pos, 0.5)
    out: np.ndarray = (pos - lo) / span
    return out + (1.0 - out.max(axis=0)) / 2


__all__ = ["spring_layout"]
