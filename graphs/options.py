"""Method parameters and per-group seeds, shared by analysis, planning and the cache keys.

Also the parameters' defaults and the checks of methods and options made before any work
(:func:`check_methods`, :func:`check_features`, :func:`check_inputs`): light (numpy and pydantic
only), so that the wire contracts (:mod:`graphs.contracts`) can validate a job request without
importing the methods.
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping, Sequence
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from graphs.errors import InvalidInputError
from graphs.report import DATA_METHODS, METHODS

DEFAULT_ALPHA = 0.05
"""Null edge rate per layer of the calibrated graphs (:mod:`graphs.similarity`)."""
DEFAULT_MIN_EXPLAINED = 0.5
"""Least share of a filter's energy that another must explain (cos²) for the two to be joined."""
DEFAULT_EPSILON = 0.01
"""Relative consumer-output error allowed by functional redundancy. Calibration: removing a
fraction f of *independent* channels costs a relative error ≈ f, so the figure of a group with
no redundancy is ≈ ε (plus one channel) — ε must be small for "independent → ≈ 0". 1 % of the
output variance (SNR 20 dB per layer) is about the per-layer error of int8 post-training
quantization, which networks tolerate; larger ε would count channels as redundant whose removal
is visible in the output."""
DEFAULT_RIDGE = 1e-6
"""Ridge of the fold, relative to each kept channel's variance: numerical safety only (exact
linear combinations stay exact to ~1e-6); raise it when the calibration rows are few compared
with the channels."""


class AnalysisOptions(BaseModel):
    """Method parameters; they are part of the report and of every cache key."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    alpha: float = Field(DEFAULT_ALPHA, gt=0, lt=1, description="null edge rate per layer")
    min_explained: float = Field(
        DEFAULT_MIN_EXPLAINED, ge=0, lt=1, description="least cos² between joined filters"
    )
    resolution: float = Field(1.0, gt=0, description="Leiden resolution (mrp)")
    k: int = Field(5, ge=1, description="neighbours per hyperedge (hsc)")
    n_rounds: int = Field(3, ge=0, description="structure-learning rounds (hsc)")
    vectors: Literal["weights", "activations"] = Field(
        "weights",
        description="what the graph methods compare: filter weights, or the channels' "
        "feature maps (Pearson correlation; needs captured activations)",
    )
    fallback: Literal["uniform", "anneal"] = Field(
        "uniform",
        description="planning with mrp/srr/hsc once no layer has redundancy left: 'uniform' "
        "takes the rest by one uniform ratio; 'anneal' first goes on pruning the most redundant "
        "layer at softer, still calibrated graph levels (graphs.anneal) — measured worse on the "
        "plan-quality benchmark (benchmarks/RESULTS.md), kept for experiments",
    )

    def parameters(self, method: str) -> dict[str, float | int | str]:
        if method == "mrp":
            return {**self._edges(), "resolution": self.resolution}
        if method == "srr":
            return self._edges()
        if method == "hsc":
            return {**self._edges(), "k": self.k, "n_rounds": self.n_rounds}
        return {}

    def _edges(self) -> dict[str, float | int | str]:
        edges: dict[str, float | int | str] = {
            "alpha": self.alpha,
            "min_explained": self.min_explained,
        }
        if self.vectors != "weights":
            edges["vectors"] = self.vectors
        return edges


def layer_seed(seed: int, name: str) -> int:
    """A per-group seed that depends on the run's seed and the group's name only.

    Results of a group therefore do not depend on which other groups are analysed, or in what
    order (needed for caching and for distributing groups as separate tasks).
    """
    state = np.random.SeedSequence([int(seed), zlib.crc32(name.encode())])
    return int(state.generate_state(1)[0] & 0x7FFFFFFF)


def check_methods(methods: Sequence[str]) -> list[str]:
    """Validate and de-duplicate method names, keeping the canonical order."""
    unknown = sorted(set(methods) - set(METHODS))
    if unknown or not methods:
        raise InvalidInputError(
            f"unknown or missing methods: {', '.join(unknown) or '(none given)'}",
            hint=f"Choose one or more of {', '.join(METHODS)}.",
        )
    return [m for m in METHODS if m in set(methods)]


def check_features(
    methods: Sequence[str],
    options: AnalysisOptions,
    activations: Mapping[str, np.ndarray] | None,
) -> None:
    """Refuse, before any work, what needs feature maps when there are none.

    ``activations``: layer name → feature maps (samples, channels, pixels), or None.
    """
    needs: list[str] = [m for m in methods if m in DATA_METHODS]
    if options.vectors == "activations":
        needs.append("vectors=activations")
    if needs and activations is None:
        raise InvalidInputError(
            f"{', '.join(needs)} need feature maps, and no activations were given",
            hint="Capture them with clients.capture_activations on calibration data and pass "
            "the file (--activations acts.safetensors, or an activations_id in a job).",
        )


def check_inputs(
    methods: Sequence[str],
    seed: int,
    options: AnalysisOptions | None,
    activations: Mapping[str, np.ndarray] | None,
) -> tuple[list[str], AnalysisOptions]:
    """What :func:`graphs.analyze.analyze` checks before any work: the chosen methods
    (canonical order) and the options (defaults when None).

    Raises:
        InvalidInputError: unknown methods, a seed outside [0, 2**32), or methods that need
            feature maps without any.
    """
    chosen = check_methods(methods)
    if not 0 <= seed < 2**32:
        raise InvalidInputError(f"seed must be in [0, 2**32), got {seed}")
    opts = options or AnalysisOptions()
    check_features(chosen, opts, activations)
    return chosen, opts
