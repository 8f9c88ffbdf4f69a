"""prunegraph's analysis library: calibrated filter redundancy from numpy arrays.

Pure functions over numpy arrays; no torch, no web code. Start with :func:`analyze` for a whole
checkpoint's layers, or call one method on a filter matrix of shape (n_filters, fan_in)::

    from graphs import mrp
    mrp(X, seed=0).redundancy

The names below are imported on first use (PEP 562), so that ``import graphs.report``,
``graphs.plan`` or ``graphs.contracts`` does not import igraph, leidenalg or scipy.
"""

from __future__ import annotations

import sys
from importlib import import_module
from types import ModuleType
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from graphs.analyze import analyze, analyze_group
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
    from graphs.options import AnalysisOptions, layer_seed
    from graphs.report import SCHEMA_VERSION, CheckpointInfo, LayerReport, Report, SkippedLayer
    from graphs.srr import srr

_HOME = {
    "SCHEMA_VERSION": "graphs.report",
    "AnalysisOptions": "graphs.options",
    "CheckpointError": "graphs.errors",
    "CheckpointInfo": "graphs.report",
    "InvalidInputError": "graphs.errors",
    "LayerGroup": "graphs.layers",
    "LayerReport": "graphs.report",
    "LayerWeights": "graphs.layers",
    "NoPrunableLayersError": "graphs.errors",
    "PruneGraphError": "graphs.errors",
    "Report": "graphs.report",
    "SkippedLayer": "graphs.report",
    "UnsafeCheckpointError": "graphs.errors",
    "UnsupportedFormatError": "graphs.errors",
    "analyze": "graphs.analyze",
    "analyze_group": "graphs.analyze",
    "build_groups": "graphs.grouping",
    "fpgm": "graphs.baselines",
    "hsc": "graphs.hsc",
    "l1": "graphs.baselines",
    "layer_seed": "graphs.options",
    "mrp": "graphs.mrp",
    "srr": "graphs.srr",
}
"""Public name -> the module that defines it."""

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


_SHADOWED = frozenset(n for n, home in _HOME.items() if home == f"{__name__}.{n}")
"""Functions named like their module (``graphs.mrp.mrp``): the package attribute is the function."""


class _Package(ModuleType):
    """The package module, keeping ``graphs.mrp`` (and the like) the function.

    Importing a submodule binds it on its package (``graphs.mrp = <module graphs.mrp>``); for
    the functions named like their module the function is bound instead, as the eager imports of
    earlier versions did.
    """

    def __setattr__(self, name: str, value: Any) -> None:
        if name in _SHADOWED and isinstance(value, ModuleType):
            value = getattr(value, name)
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package


def __getattr__(name: str) -> Any:
    home = _HOME.get(name)
    if home is None:
        raise AttributeError(f"module 'graphs' has no attribute {name!r}")
    value = getattr(import_module(home), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
