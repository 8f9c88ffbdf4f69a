"""Error-vs-fraction curves of functional redundancy, drawn on the server as small SVGs.

One curve per group (:class:`graphs.report.FunctionalFigure`): x is the fraction of the group's
channels removed (0 … 1), y the relative consumer-output error after least-squares folds, on a
log axis from :data:`FLOOR` (errors below it are drawn at it) up to the next power of ten above
the largest error (at most :data:`CEILING`; larger errors are drawn at it). A dashed line marks
ε and a vertical line the functional redundancy (the last fraction with error ≤ ε). The SVG
carries its axis bounds (``data-y-min``, ``data-y-max``) so that the drawn points can be read
back into errors and checked against the report.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from graphs.report import Report

FLOOR, CEILING = 1e-4, 10.0
W, H, PAD_L, PAD_R, PAD_T, PAD_B = 220.0, 70.0, 4.0, 4.0, 4.0, 4.0


@dataclass(frozen=True)
class Curve:
    """One group's curve, ready to draw (``points``: the SVG polyline's ``x,y`` pairs)."""

    layer: str
    n_filters: int
    redundancy: float
    epsilon: float
    consumers: list[str]
    points: str
    count: int
    eps_y: float
    cut_x: float
    y_min: float
    y_max: float
    worst: float
    width: float = W
    height: float = H


def _y(e: float, lo: float, hi: float) -> float:
    v = min(max(e, lo), hi)
    f = (math.log10(v) - math.log10(lo)) / (math.log10(hi) - math.log10(lo))
    return round(PAD_T + (H - PAD_T - PAD_B) * (1.0 - f), 3)


def _x(k: int, n: int) -> float:
    return round(PAD_L + (W - PAD_L - PAD_R) * k / max(n, 1), 3)


def functional_curves(report: Report) -> list[Curve]:
    """The curve of every group that has a functional figure, in report order."""
    out = []
    for layer in report.layers:
        f = layer.functional
        if f is None:
            continue
        worst = max(f.errors, default=0.0)
        hi = min(CEILING, 10.0 ** math.ceil(math.log10(max(worst, 10 * f.epsilon, 10 * FLOOR))))
        n = layer.n_filters
        points = " ".join(f"{_x(k, n)},{_y(e, FLOOR, hi)}" for k, e in enumerate(f.errors))
        out.append(
            Curve(
                layer=layer.name,
                n_filters=n,
                redundancy=f.redundancy,
                epsilon=f.epsilon,
                consumers=f.consumers,
                points=points,
                count=len(f.errors),
                eps_y=_y(f.epsilon, FLOOR, hi) if f.epsilon > 0 else H - PAD_B,
                cut_x=_x(round(f.redundancy * n), n),
                y_min=FLOOR,
                y_max=hi,
                worst=worst,
            )
        )
    return out


def error_of(y: float, y_min: float, y_max: float) -> float:
    """The error a drawn y stands for (the inverse of the curve's axis; tests read it back)."""
    f = 1.0 - (y - PAD_T) / (H - PAD_T - PAD_B)
    return 10 ** (math.log10(y_min) + f * (math.log10(y_max) - math.log10(y_min)))
