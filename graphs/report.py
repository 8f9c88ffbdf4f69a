"""The report format: versioned, frozen pydantic models, defined once (design §2).

JSON produced by :meth:`Report.to_json` is byte-identical for the same checkpoint, methods,
parameters and seed: floats are rounded on construction, keys keep declaration order, and no
timing or path is stored.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

from graphs._frozen import Frozen

SCHEMA_VERSION = "1.1"
"""1.1: ``MethodSummary.removable`` (the fraction of the model its redundant channels are)."""

Method = Literal["mrp", "srr", "hsc", "l1", "fpgm", "ci"]
ALL_METHODS: tuple[Method, ...] = ("mrp", "srr", "hsc", "l1", "fpgm")
"""The weight-only methods: the default, and all that a checkpoint alone allows."""
DATA_METHODS: tuple[Method, ...] = ("ci",)
"""Methods that need feature maps (captured activations)."""
METHODS: tuple[Method, ...] = ALL_METHODS + DATA_METHODS
CROSSFIT_NOTE = (
    "functional redundancy: cross-fitted error curves (folds fitted on one part of the "
    "calibration data, their error measured on the held-out part)"
)
"""The report's note (:attr:`Report.notes`) when its functional figures are cross-fitted
(:func:`graphs.functional_report.with_functional`); here, in the light module, so that readers
of reports (the dashboard) need not import the heavy one."""


class MrpResult(Frozen):
    """RMCD: Leiden communities of the null-calibrated cosine graph."""

    method: Literal["mrp"] = "mrp"
    redundancy: float = Field(ge=0, le=1, description="1 - K/N, K communities of N filters")
    n_communities: int
    modularity: float
    threshold: float = Field(description="cosine above which two filters are joined")
    null_dim: float = Field(description="dimension of the null fitted to the layer (≤ fan-in)")
    n_edges: int
    n_zero: int = Field(description="all-zero filters (dead; counted as redundant)")
    communities: list[int] = Field(
        description="community per filter, numbered by first occurrence; -1 for dead filters"
    )
    replaceability: list[float] = Field(
        description="mean similarity to the other members of the filter's community"
    )


class SrrResult(Frozen):
    """Structural redundancy: quotient space size and ℓ-covering number of the γ-graph."""

    method: Literal["srr"] = "srr"
    redundancy: float = Field(ge=0, le=1, description="1 - 1/r")
    ratio: float = Field(description="r = N / (0.35 k + 0.65 N^c)")
    n_components: int = Field(description="quotient space size k")
    covering_number: float = Field(description="N^c, mean of the ℓ=1 and ℓ=2 covering numbers")
    covering_1: int
    covering_2: int
    gamma: float = Field(description="distance threshold between unit-normalized filters")
    null_dim: float = Field(description="dimension of the null fitted to the layer (≤ fan-in)")
    n_edges: int
    components: list[int] = Field(description="component per filter; -1 for dead filters")
    l1_norm: list[float]


class HscResult(Frozen):
    """High-order spectral clustering of the kNN hypergraph."""

    method: Literal["hsc"] = "hsc"
    redundancy: float = Field(ge=0, le=1, description="1 - K/N, K clusters by eigengap")
    n_clusters: int
    eigengap: float
    n_components: int
    k: int = Field(description="neighbours per hyperedge")
    threshold: float = Field(description="cosine a neighbour must exceed to join a hyperedge")
    null_dim: float = Field(description="dimension of the null fitted to the layer (≤ fan-in)")
    clusters: list[int] = Field(description="cluster per filter; -1 for dead filters")
    representatives: list[int] = Field(description="the kept filter (medoid) of each cluster")


class L1Result(Frozen):
    """Li et al. 2017: importance is the filter's L1 norm (no layer redundancy)."""

    method: Literal["l1"] = "l1"
    redundancy: None = None
    l1_norm: list[float]


class FpgmResult(Frozen):
    """He et al. 2019: filters nearest the geometric median are the most replaceable."""

    method: Literal["fpgm"] = "fpgm"
    redundancy: None = None
    gm_distance: list[float] = Field(description="sum of distances to the layer's other filters")


class CiResult(Frozen):
    """CHIP channel independence from feature maps: importance per channel (no redundancy)."""

    method: Literal["ci"] = "ci"
    redundancy: None = None
    ci: list[float] = Field(description="mean drop of the nuclear norm when the channel is removed")
    ci_std: list[float] = Field(description="its standard deviation over the samples")
    n_samples: int


MethodResult = Annotated[
    MrpResult | SrrResult | HscResult | L1Result | FpgmResult | CiResult,
    Field(discriminator="method"),
]


class CheckpointInfo(Frozen):
    sha256: str
    format: Literal["pytorch", "safetensors", "onnx"]
    size_bytes: int
    n_tensors: int
    n_params: int


class FunctionalFigure(Frozen):
    """Functional redundancy of a group (design §8; :mod:`graphs.functional_report`), from the
    second moments of its consumers' inputs."""

    redundancy: float = Field(
        ge=0,
        le=1,
        description="largest fraction of the channels removable with relative "
        "consumer-output error <= epsilon after least-squares folds",
    )
    epsilon: float
    consumers: list[str] = Field(description="the channel-mixing layers reading the group")
    errors: list[float] = Field(
        description="relative consumer-output error after removing k channels (greedy, with "
        "folds), k = 0 .. len - 1: the error-vs-fraction curve at fractions k / n_filters"
    )


class LayerReport(Frozen):
    name: str = Field(description="the group's producer layer")
    kind: str
    shape: list[int]
    n_filters: int
    fan_in: int
    groups: int
    members: list[str] = Field(description="all layers of the group, producer first")
    coupling: Literal["none", "inferred", "manifest", "unknown"]
    bn: str | None
    params: int
    methods: dict[str, MethodResult]
    functional: FunctionalFigure | None = Field(
        None,
        exclude_if=lambda v: v is None,
        description="functional redundancy and its error curve (reports made with activation "
        "statistics; absent otherwise)",
    )


class SkippedLayer(Frozen):
    name: str
    reason: str


class LayerRemoval(Frozen):
    """What removing one group's redundant channels alone removes."""

    name: str = Field(description="the group's producer layer")
    channels: int = Field(description="its redundant channels: round(redundancy · n_filters)")
    params: float = Field(description="fraction of the model's parameters they remove")
    flops: float | None = Field(description="fraction of the model's MACs (null: no manifest)")


class Removal(Frozen):
    """The model-level figure: what removing every group's redundant channels would remove
    (:mod:`graphs.removable`): the producers' rows, biases and norm entries and the consumers'
    input slices, each parameter once. Model outputs (classifiers) are left whole."""

    params: float = Field(ge=0, le=1, description="fraction of the model's parameters")
    flops: float | None = Field(description="fraction of its MACs; null without a manifest")
    params_removed: int
    flops_removed: int | None
    exact: bool = Field(description="from a manifest; false: estimated from the layers alone")
    largest: list[LayerRemoval] = Field(
        description="up to five groups whose redundant channels remove the most (FLOPs when "
        "known, else parameters), most first"
    )


class MethodSummary(Frozen):
    redundancy_params_weighted: float | None = Field(
        description="mean of the layers' own redundancy weighted by their parameters (what "
        "fraction of the analysed layers' filters are redundant, not of the model: see removable)"
    )
    redundancy_flops_weighted: float | None = Field(
        description="the same weighted by MACs; null when output sizes are unknown (no manifest)"
    )
    most_redundant: list[str] = Field(description="up to five layers, most redundant first")
    removable: Removal | None = Field(
        None, description="null for importance-only methods and in reports before schema 1.1"
    )


class Summary(Frozen):
    n_layers: int
    n_skipped: int
    params_total: int
    params_analysed: int
    flops: int | None
    methods: dict[str, MethodSummary]


class Report(Frozen):
    schema_version: str = SCHEMA_VERSION
    checkpoint: CheckpointInfo
    methods: list[str]
    parameters: dict[str, dict[str, float | int | str]]
    seed: int
    layers: list[LayerReport]
    skipped: list[SkippedLayer]
    summary: Summary
    notes: list[str] = Field(
        default_factory=list,
        exclude_if=lambda v: not v,
        description="what the analysis could not do and why, e.g. no FLOPs: an ONNX model's "
        "shapes are symbolic (absent when empty)",
    )

    def to_json(self, *, indent: int | None = 2) -> str:
        return self.model_dump_json(indent=indent)
