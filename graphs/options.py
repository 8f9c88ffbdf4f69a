"""Method parameters and per-group seeds, shared by analysis, planning and the cache keys."""

from __future__ import annotations

import zlib
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from graphs.similarity import DEFAULT_ALPHA, DEFAULT_MIN_EXPLAINED


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
