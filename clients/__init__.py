"""prunegraph's thin client side: what runs next to the user's live torch model.

- :func:`build_manifest` / :func:`manifest_from_factory`: coupling groups, shapes and MACs of a
  live model (torch-pruning's dependency graph), sent with a job so that coupled layers are
  analysed and planned together;
- :func:`apply_plan`: replay a :class:`graphs.plan.PruningPlan` on the model, validated before
  any weight changes (:class:`PlanMismatchError`).

- :class:`PruneGraphClient`: the HTTP client of the service (upload, submit, wait, report/plan);
  ``client.plan(model, example_inputs, target_flops=0.5)`` plans a live model in one call.

- :func:`capture_activations`: post-activation feature maps on calibration data, for the
  data-aware methods (``ci``, ``vectors="activations"``), and the second moments of every
  consumer's input that compensated plans fold with; :class:`PCCLoss`: the pixel-level
  cross-correlation loss that decorrelates channels during pre-training.
- :func:`datafree_statistics` / :func:`datafree_activations`: the same consumer statistics
  without data, from BatchNorm statistics (mean folds; γ ≈ 0 channels exactly redundant);
  :func:`datafree_merges` lists the near-duplicate filters those statistics merge.
- :func:`sensitivity`: prune one group at a time, with and without compensation, and measure a
  metric (:class:`SensitivityTable`, CSV/JSON); :func:`recalibrate_batchnorm` re-estimates BN
  statistics of a pruned model; :func:`refit` refits a pruned model's conv/linear layers in
  forward order against the unpruned model on calibration data (no compounding of fold errors).

Every error raised on purpose derives from :class:`ClientError` (the tree is drawn in
:mod:`clients.errors`). Names are imported on first use: ``import clients`` and
``clients.PruneGraphClient`` import no torch; ``clients.build_manifest`` and the other
live-model functions do.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from clients.errors import (
    AuthenticationError,
    ClientError,
    ConnectionFailedError,
    InvalidRequestError,
    JobFailedError,
    JobTimeoutError,
    ManifestError,
    NotFoundError,
    PayloadTooLargeError,
    PlanError,
    PlanMismatchError,
    PruneGraphClientError,
    PruneGraphHTTPError,
    ServerError,
    TooManyRequestsError,
)

if TYPE_CHECKING:
    from clients.activations import Activations, capture_activations
    from clients.apply import apply_plan
    from clients.datafree import datafree_activations, datafree_merges, datafree_statistics
    from clients.fold import recalibrate_batchnorm
    from clients.group_sensitivity import SensitivityTable, sensitivity
    from clients.http_client import PruneGraphClient
    from clients.layer_refit import LayerRefit, RefitReport, refit
    from clients.manifest import build_manifest, manifest_from_factory
    from clients.pcc import PCCLoss, pixel_correlation
    from graphs.contracts.jobs import JobStatus

__all__ = [
    "Activations",
    "AuthenticationError",
    "ClientError",
    "ConnectionFailedError",
    "InvalidRequestError",
    "JobFailedError",
    "JobStatus",
    "JobTimeoutError",
    "LayerRefit",
    "ManifestError",
    "NotFoundError",
    "PCCLoss",
    "PayloadTooLargeError",
    "PlanError",
    "PlanMismatchError",
    "PruneGraphClient",
    "PruneGraphClientError",
    "PruneGraphHTTPError",
    "RefitReport",
    "SensitivityTable",
    "ServerError",
    "TooManyRequestsError",
    "apply_plan",
    "build_manifest",
    "capture_activations",
    "datafree_activations",
    "datafree_merges",
    "datafree_statistics",
    "manifest_from_factory",
    "pixel_correlation",
    "recalibrate_batchnorm",
    "refit",
    "sensitivity",
]

_LAZY: dict[str, str] = {
    "Activations": "clients.activations",
    "capture_activations": "clients.activations",
    "apply_plan": "clients.apply",
    "datafree_activations": "clients.datafree",
    "datafree_merges": "clients.datafree",
    "datafree_statistics": "clients.datafree",
    "recalibrate_batchnorm": "clients.fold",
    "PruneGraphClient": "clients.http_client",
    "JobStatus": "graphs.contracts.jobs",
    "build_manifest": "clients.manifest",
    "manifest_from_factory": "clients.manifest",
    "PCCLoss": "clients.pcc",
    "pixel_correlation": "clients.pcc",
    "LayerRefit": "clients.layer_refit",
    "RefitReport": "clients.layer_refit",
    "refit": "clients.layer_refit",
    "SensitivityTable": "clients.group_sensitivity",
    "sensitivity": "clients.group_sensitivity",
}
"""Public name -> the module that defines it, imported on first use (PEP 562): ``import
clients`` for HTTP use imports no torch; the errors above are imported at once (no dependencies)."""


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'clients' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
