"""prunegraph's thin client side: what runs next to the user's live torch model.

- :func:`build_manifest` / :func:`manifest_from_factory`: coupling groups, shapes and MACs of a
  live model (torch-pruning's dependency graph), sent with a job so that coupled layers are
  analysed and planned together;
- :func:`apply_plan`: replay a :class:`graphs.plan.PruningPlan` on the model, validated before
  any weight changes (:class:`PlanMismatchError`).

- :class:`PruneGraphClient`: the HTTP client of the service (upload, submit, wait, report/plan),
  with its exception tree in :mod:`clients.http`; ``client.plan(model, example_inputs,
  target_flops=0.5)`` plans a live model in one call.

- :func:`capture_activations`: post-activation feature maps on calibration data, for the
  data-aware methods (``ci``, ``vectors="activations"``), and the second moments of every
  consumer's input that compensated plans fold with; :class:`PCCLoss`: the pixel-level
  cross-correlation loss that decorrelates channels during pre-training.
- :func:`datafree_statistics` / :func:`datafree_activations`: the same consumer statistics
  without data, from BatchNorm statistics (mean folds; γ ≈ 0 channels exactly redundant).
- :func:`sensitivity`: prune one group at a time, with and without compensation, and measure a
  metric (:class:`SensitivityTable`, CSV/JSON); :func:`recalibrate_batchnorm` re-estimates BN
  statistics of a pruned model; :func:`refit` refits a pruned model's conv/linear layers in
  forward order against the unpruned model on calibration data (no compounding of fold errors).
"""

from clients.activations import Activations, capture_activations
from clients.apply import apply_plan
from clients.datafree import datafree_activations, datafree_statistics
from clients.errors import ManifestError, PlanError, PlanMismatchError
from clients.fold import recalibrate_batchnorm
from clients.http import (
    AuthenticationError,
    ConnectionFailedError,
    InvalidRequestError,
    JobFailedError,
    JobStatus,
    JobTimeoutError,
    NotFoundError,
    PayloadTooLargeError,
    PruneGraphClient,
    PruneGraphClientError,
    PruneGraphHTTPError,
    ServerError,
    TooManyRequestsError,
)
from clients.manifest import build_manifest, manifest_from_factory
from clients.pcc import PCCLoss, pixel_correlation
from clients.refit import LayerRefit, RefitReport, refit
from clients.sensitivity import SensitivityTable, sensitivity

__all__ = [
    "Activations",
    "AuthenticationError",
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
    "datafree_statistics",
    "manifest_from_factory",
    "pixel_correlation",
    "recalibrate_batchnorm",
    "refit",
    "sensitivity",
]
