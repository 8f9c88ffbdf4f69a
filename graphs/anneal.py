"""Softer calibration levels for the graph methods' greedy allocation (SRP past strict redundancy).

The strict graph (design §3: a Bonferroni bound on chance cosines and an effect-size floor
cos² ≥ ``min_explained``) finds little redundancy in trained weights: ≈ 1 % on the real
MobileNetV2 and the benchmark's digit nets (issue 7). Once no group has any left, the planner
used to take the rest of the target by one uniform ratio — a predefined per-layer ratio, which
SRP (design §4, mrp) does without, and which made mrp/srr plans equal to L1's.

Annealing keeps SRP's rule ("prune the most redundant layer") and lowers the bar in fixed,
still calibrated steps: each level is a null-calibrated graph with a lower effect-size floor or
more expected chance edges, *the same for every layer relative to its own null*, so layers stay
comparable. Levels, from the user's options (``alpha`` = α, ``min_explained`` = e):

1. (α, e) — the strict graph of the report;
2. (α, min(e, 0.25)) — a quarter of the energy explained;
3. (α, 0) — significance alone (the Bonferroni bound);
4. (0.05·n, 0) — n filters expect 0.05·n chance edges (a chance degree of 0.1);
5. (0.25·n, 0) — a chance degree of 0.5.

At levels 4–5 a layer of i.i.d. random filters shows some redundancy too (chance edges); a
layer's rank then says how far it is *above* that common floor. The levels never change what
the report calls a layer's redundancy (level 1), only how many filters the planner takes from
each group beyond what strict redundancy provided (which filters: the strict level's order,
:mod:`graphs.allocation`); the uniform ratio stays as the last resort, once level 5 has no
redundancy left either. Levels equal to an earlier one are skipped.

Measured (issue 7, benchmarks/RESULTS.md): on the plan-quality benchmark annealing did not beat
the uniform fallback. Letting the softer levels choose *which* filters go lost up to 85 points
of accuracy before fine-tuning; letting them set only *how many* was within noise after
fine-tuning for mrp, worse in 1 of 12 cells for srr and in 6 of 12 for hsc. So the planner's
default is ``fallback="uniform"``; ``"anneal"`` is kept, opt-in, for experiments.
"""

from __future__ import annotations

from graphs.options import AnalysisOptions

SOFT_MIN_EXPLAINED = (0.25, 0.0)
"""Effect-size floors of levels 2 and 3 (each capped by the user's own ``min_explained``)."""
CHANCE_EDGES_PER_FILTER = (0.05, 0.25)
"""Expected chance edges per filter of levels 4 and 5 (α = rate · n for a group of n)."""


def anneal_levels(
    options: AnalysisOptions, n: int, *, anneal: bool = True
) -> list[AnalysisOptions]:
    """The calibration levels for a group of ``n`` filters, strictest first (level 1 is
    ``options`` itself); only level 1 when ``anneal`` is False.

    The returned options differ from ``options`` only in ``alpha`` and ``min_explained``;
    ``alpha`` may exceed 1 at levels 4–5 (an expected number of chance edges, see
    :func:`graphs.similarity.calibrated_threshold`), so they are built without re-validation.
    """
    levels = [options]
    if not anneal:
        return levels
    seen = {(options.alpha, options.min_explained)}
    wanted = [(options.alpha, min(options.min_explained, e)) for e in SOFT_MIN_EXPLAINED]
    wanted += [(max(options.alpha, rate * n), 0.0) for rate in CHANCE_EDGES_PER_FILTER]
    for alpha, min_explained in wanted:
        if (alpha, min_explained) in seen:
            continue
        seen.add((alpha, min_explained))
        levels.append(options.model_copy(update={"alpha": alpha, "min_explained": min_explained}))
    return levels
