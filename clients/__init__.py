"""prunegraph's thin client side: what runs next to the user's live torch model.

- :func:`build_manifest` / :func:`manifest_from_factory`: coupling groups, shapes and MACs of a
  live model (torch-pruning's dependency graph), sent with a job so that coupled layers are
  analysed and planned together;
- :func:`apply_plan`: replay a :class:`graphs.plan.PruningPlan` on the model, validated before
  any weight changes (:class:`PlanMismatchError`).

The HTTP client, activation capture and the PCC loss arrive with the service (design §6).
"""

from clients.apply import apply_plan
from clients.errors import PlanError, PlanMismatchError
from clients.manifest import build_manifest, manifest_from_factory

__all__ = [
    "PlanError",
    "PlanMismatchError",
    "apply_plan",
    "build_manifest",
    "manifest_from_factory",
]
