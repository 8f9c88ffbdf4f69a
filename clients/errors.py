"""Errors raised by the client side when a pruning plan cannot be applied to a live model."""

from __future__ import annotations

__all__ = ["PlanError", "PlanMismatchError"]


class PlanError(Exception):
    """A pruning plan could not be applied; the message says what went wrong and what to do."""


class PlanMismatchError(PlanError):
    """The plan does not fit this model (raised before any weight is changed).

    Typical causes: the plan was built for another model or checkpoint, or it prunes coupled
    layers separately because it was planned without a manifest.
    """
