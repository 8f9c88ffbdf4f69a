"""Errors raised by the client side: a manifest cannot be built, or a plan cannot be applied."""

from __future__ import annotations

__all__ = ["ManifestError", "PlanError", "PlanMismatchError"]


class PlanError(Exception):
    """A pruning plan could not be applied; the message says what went wrong and what to do."""


class PlanMismatchError(PlanError):
    """The plan does not fit this model (raised before any weight is changed).

    Typical causes: the plan was built for another model or checkpoint, or it prunes coupled
    layers separately because it was planned without a manifest.
    """


class ManifestError(ValueError):
    """A manifest of this model cannot be built correctly; the message says why and what to do.

    Raised, for example, when the cost model's MACs disagree with an independent count
    (:func:`clients.flops.check_cost_model`): plans for a FLOPs target would miss it.
    """
