"""prunegraph's analysis library: calibrated filter redundancy from numpy arrays.

Pure functions over numpy arrays; no torch, no web code. Start with :func:`analyze` for a whole
checkpoint's layers, or call one method on a filter matrix of shape (n_filters, fan_in)::

    from graphs import mrp
    mrp(X, seed=0).redundancy
"""

from graphs.analyze import AnalysisOptions, analyze, analyze_group, layer_seed
from graphs.baselines import fpgm, l1
from graphs.errors import (
    CheckpointError,
    InvalidInputError,
    NoPrunableLayersError,
    PruneGraphError,
    UnsafeCheckpointError,
    UnsupportedFormatError,
)
from graphs.grouping import build_groups
from graphs.hsc import hsc
from graphs.layers import LayerGroup, LayerWeights
from graphs.mrp import mrp
from graphs.report import SCHEMA_VERSION, CheckpointInfo, LayerReport, Report, SkippedLayer
from graphs.srr import srr

__all__ = [
    "SCHEMA_VERSION",
    "AnalysisOptions",
    "CheckpointError",
    "CheckpointInfo",
    "InvalidInputError",
    "LayerGroup",
    "LayerReport",
    "LayerWeights",
    "NoPrunableLayersError",
    "PruneGraphError",
    "Report",
    "SkippedLayer",
    "UnsafeCheckpointError",
    "UnsupportedFormatError",
    "analyze",
    "analyze_group",
    "build_groups",
    "fpgm",
    "hsc",
    "l1",
    "layer_seed",
    "mrp",
    "srr",
]
