"""What can go wrong in the service itself (the library's errors are :mod:`graphs.errors`).

These are domain errors: the store, the jobs and the dashboard raise them and know nothing of
HTTP. :mod:`service.api.errors` is the one place that turns them (and the library's errors) into
HTTP status codes and JSON bodies. Every error carries a ``hint``: what to do about it.
::

    ServiceError
    ├── NotFoundError          no such checkpoint, job or layer visible to the caller   (404)
    ├── NotReadyError          the job has not finished yet                             (409)
    ├── JobFailedError         the job failed: its result does not exist                (422)
    └── UploadError            the request body is not a usable upload                  (400)
        ├── TooLargeError      over the size limit (the rest is not read)               (413)
        ├── NotMultipartError  not multipart/form-data                                  (415)
        └── MissingPartError   the multipart body lacks a required field                (422)
"""

from __future__ import annotations

__all__ = [
    "JobFailedError",
    "MissingPartError",
    "NotFoundError",
    "NotMultipartError",
    "NotReadyError",
    "ServiceError",
    "TooLargeError",
    "UploadError",
    "not_found",
    "unfinished",
]


class ServiceError(Exception):
    """Base class: ``message`` says what is wrong, ``hint`` what to do."""

    def __init__(self, message: str, hint: str) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint


class NotFoundError(ServiceError):
    pass


class NotReadyError(ServiceError):
    pass


class JobFailedError(ServiceError):
    pass


class UploadError(ServiceError):
    pass


class TooLargeError(UploadError):
    pass


class NotMultipartError(UploadError):
    pass


class MissingPartError(UploadError):
    pass


def not_found(what: str, ident: str) -> NotFoundError:
    """``what`` (checkpoint, job) ``ident`` is not there, or not the caller's."""
    return NotFoundError(
        f"{what} {ident} not found",
        f"Check the id; a {what} is visible only to the token that created it.",
    )


def unfinished(job_id: str, status: str, error: str | None) -> NotReadyError | JobFailedError:
    """Why a job (``status``, failed with ``error``) has no result yet, or never will."""
    why = f": {error}" if error else ""
    message = f"job {job_id} is {status}{why}"
    if status == "failed":
        return JobFailedError(message, "Fix the input named in the error and submit a new job.")
    return NotReadyError(message, "Poll GET /v1/jobs/{id} until its status is done.")
