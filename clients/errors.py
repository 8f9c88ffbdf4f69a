"""Every error the client side raises on purpose: one tree under :class:`ClientError`.

Each carries a message that says what was wrong and what to do::

    ClientError                               everything clients/ raises on purpose
    ├── ManifestError (+ ValueError)          a live model's manifest cannot be built correctly
    ├── PlanError                             a pruning plan cannot be applied
    │   └── PlanMismatchError                 the plan does not fit this model (nothing changed)
    └── PruneGraphClientError                 everything PruneGraphClient raises
        ├── PruneGraphHTTPError               the server answered 4xx/5xx: .status_code .error .hint
        │   ├── AuthenticationError           401: missing or unknown token
        │   ├── NotFoundError                 404: unknown id, or owned by another token
        │   ├── PayloadTooLargeError          413: checkpoint above the server's upload limit
        │   ├── TooManyRequestsError          429: rate limit or quota: .retry_after (seconds)
        │   ├── InvalidRequestError           any other 4xx (bad checkpoint, bad job request, ...)
        │   └── ServerError                   5xx
        ├── ConnectionFailedError             no connection after ``retries`` attempts
        ├── JobFailedError                    the job ended "failed": .job_id .reason
        └── JobTimeoutError (+ TimeoutError)  the job did not finish within ``wait``'s timeout

``except clients.ClientError`` catches all of them; the HTTP errors map one status each
(:func:`clients.transport.error_for_response`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from graphs.contracts.jobs import JobStatus

__all__ = [
    "AuthenticationError",
    "ClientError",
    "ConnectionFailedError",
    "InvalidRequestError",
    "JobFailedError",
    "JobTimeoutError",
    "ManifestError",
    "NotFoundError",
    "PayloadTooLargeError",
    "PlanError",
    "PlanMismatchError",
    "PruneGraphClientError",
    "PruneGraphHTTPError",
    "ServerError",
    "TooManyRequestsError",
]


class ClientError(Exception):
    """Base of every error the client side raises on purpose (the tree is in this module)."""


# ---- a live model: manifests and plans ---------------------------------------------------------


class ManifestError(ClientError, ValueError):
    """A manifest of this model cannot be built correctly; the message says why and what to do.

    Raised, for example, when the cost model's MACs disagree with an independent count
    (:func:`clients.flops.check_cost_model`): plans for a FLOPs target would miss it.
    """


class PlanError(ClientError):
    """A pruning plan could not be applied; the message says what went wrong and what to do."""


class PlanMismatchError(PlanError):
    """The plan does not fit this model (raised before any weight is changed).

    Typical causes: the plan was built for another model or checkpoint, or it prunes coupled
    layers separately because it was planned without a manifest.
    """


# ---- the service: PruneGraphClient -------------------------------------------------------------


class PruneGraphClientError(ClientError):
    """Base of every error raised by :class:`clients.PruneGraphClient`."""


class PruneGraphHTTPError(PruneGraphClientError):
    """The server answered with an error status; ``error`` and ``hint`` are its JSON body."""

    def __init__(self, status_code: int, error: str, hint: str) -> None:
        super().__init__(f"HTTP {status_code}: {error}" + (f" ({hint})" if hint else ""))
        self.status_code = status_code
        self.error = error
        self.hint = hint


class AuthenticationError(PruneGraphHTTPError):
    """401: the token is missing or unknown to the server."""


class NotFoundError(PruneGraphHTTPError):
    """404: no such checkpoint/job/plan, or it belongs to another token."""


class PayloadTooLargeError(PruneGraphHTTPError):
    """413: the checkpoint is larger than the server accepts."""


class TooManyRequestsError(PruneGraphHTTPError):
    """429: past the server's rate limit or the token's quota; ``retry_after`` in seconds."""

    def __init__(self, status_code: int, error: str, hint: str, retry_after: float | None = None):
        super().__init__(status_code, error, hint)
        self.retry_after = retry_after


class InvalidRequestError(PruneGraphHTTPError):
    """Any other 4xx: the checkpoint or the job request was refused (a job request is checked
    against the service's own model before it is sent, and refused with the server's 422)."""


class ServerError(PruneGraphHTTPError):
    """5xx: the server failed; retrying later may help."""


class ConnectionFailedError(PruneGraphClientError):
    """The server could not be reached after all attempts."""


class JobFailedError(PruneGraphClientError):
    """The job ended with status ``failed``; ``reason`` is the server's explanation."""

    def __init__(self, job_id: str, reason: str) -> None:
        super().__init__(f"job {job_id} failed: {reason}")
        self.job_id = job_id
        self.reason = reason


class JobTimeoutError(PruneGraphClientError, TimeoutError):
    """The job did not finish in time; it keeps running on the server (wait again later)."""

    def __init__(self, job_id: str, timeout: float, last: JobStatus) -> None:
        super().__init__(
            f"job {job_id} still {last.status} ({last.progress:.0%}) after {timeout:g} s; "
            "it keeps running on the server: call wait() again or raise the timeout"
        )
        self.job_id = job_id
        self.last = last
