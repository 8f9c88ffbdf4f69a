"""The HTTP client of the prunegraph service (design §6).

:class:`PruneGraphClient` uploads a checkpoint, submits an analysis job, waits for it (with an
optional progress bar on stderr) and fetches the :class:`~graphs.report.Report` or the
:class:`~graphs.plan.PruningPlan`::

    with PruneGraphClient("http://127.0.0.1:8000", token="secret") as client:
        report = client.analyze("resnet56.pt")                # or a live nn.Module
        plan = client.plan(model, torch.zeros(1, 3, 32, 32), target_flops=0.5, method="mrp")
        apply_plan(model, plan)                                  # clients.apply_plan
        plan = client.plan_for("resnet56.pt", target={"params": 0.3})   # a file, no manifest

Any ``httpx.Client`` can be injected (``http=``), e.g. FastAPI's ``TestClient`` to run the real
app in-process. Connection failures (``httpx.ConnectError``/``ConnectTimeout``: the request never
reached the server) are retried with a short exponential backoff; a 429 whose ``Retry-After`` is
short (a rate limit) is retried after that pause; nothing else is retried.

Exceptions (all carry a message that says what was wrong and what to do)::

    PruneGraphClientError                 everything this module raises
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
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import IO, TYPE_CHECKING, Any, overload

import httpx
from pydantic import BaseModel, ConfigDict

from graphs.analyze import AnalysisOptions
from graphs.manifest import Manifest
from graphs.plan import Constraints, PruningPlan
from graphs.report import ALL_METHODS, Report

if TYPE_CHECKING:
    from torch import nn

    from clients.activations import Activations
    from clients.manifest import ExampleInputs

__all__ = [
    "AuthenticationError",
    "ConnectionFailedError",
    "InvalidRequestError",
    "JobFailedError",
    "JobStatus",
    "JobTimeoutError",
    "NotFoundError",
    "PayloadTooLargeError",
    "PruneGraphClient",
    "PruneGraphClientError",
    "PruneGraphHTTPError",
    "ServerError",
    "TooManyRequestsError",
]

DEFAULT_METHODS: tuple[str, ...] = ALL_METHODS
_BACKOFF_S = 0.1  # first pause between connection attempts; doubles each time
_MAX_BACKOFF_S = 2.0
_MAX_RATE_WAIT_S = 10.0  # a 429 asking for a longer pause (a quota) is raised, not waited out
_MANIFEST_AS_FILE = 1 << 20  # a job's JSON above this sends its manifest as a multipart file
Checkpoint = str | os.PathLike[str] | bytes
Options = AnalysisOptions | Mapping[str, Any]
Calibration = Iterable[Any]
"""Calibration batches: input tensors or (inputs, labels) pairs, e.g. a DataLoader."""
PlanConstraints = Constraints | Mapping[str, Any]


# ---- errors ------------------------------------------------------------------------------------


class PruneGraphClientError(Exception):
    """Base of every error raised by :class:`PruneGraphClient`."""


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
    """Any other 4xx: the checkpoint or the job request was refused."""


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


_STATUS_ERRORS: dict[int, type[PruneGraphHTTPError]] = {
    401: AuthenticationError,
    404: NotFoundError,
    413: PayloadTooLargeError,
}


def _error_for(response: httpx.Response) -> PruneGraphHTTPError:
    error, hint = response.reason_phrase or "error", ""
    try:
        body = response.json()
    except ValueError:
        body = None
    if isinstance(body, dict) and "error" in body:
        error, hint = str(body["error"]), str(body.get("hint") or "")
    elif response.text:
        error = response.text[:500]
    code = response.status_code
    if code == 429:
        after = response.headers.get("retry-after", "")
        return TooManyRequestsError(code, error, hint, float(after) if after.isdigit() else None)
    cls = _STATUS_ERRORS.get(code) or (ServerError if code >= 500 else InvalidRequestError)
    return cls(code, error, hint)


# ---- the client --------------------------------------------------------------------------------


class JobStatus(BaseModel):
    """Where a job stands: ``queued`` → ``running`` → ``done`` | ``failed``."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    id: str
    status: str
    progress: float
    error: str | None = None

    @property
    def finished(self) -> bool:
        return self.status in ("done", "failed")


class PruneGraphClient:
    """A client of one prunegraph service.

    Args:
        base_url: the service's root URL.
        token: bearer token, when the server has auth enabled.
        http: an ``httpx.Client`` to send requests with (e.g. FastAPI's ``TestClient``); it is
            not closed by :meth:`close`. Default: a client of this object's own.
        retries: attempts per request when the connection fails (at least 1).
        timeout: seconds per HTTP request (only for the client of this object's own).
    """

    def __init__(
        self,
        base_url: str = "http://127.0.0.1:8000",
        token: str | None = None,
        http: httpx.Client | None = None,
        retries: int = 3,
        timeout: float = 60.0,
    ) -> None:
        if retries < 1:
            raise ValueError(f"retries must be at least 1, got {retries}")
        self.base_url = base_url.rstrip("/")
        self._headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._owns_http = http is None
        self._http = http if http is not None else httpx.Client(timeout=timeout)
        self._retries = retries

    # -- plumbing

    def _url(self, path: str) -> str:
        return f"{self.base_url}{path}"

    def _call(self, send: Callable[[], httpx.Response]) -> httpx.Response:
        last: httpx.TransportError | None = None
        for attempt in range(self._retries):
            if attempt:
                time.sleep(min(_BACKOFF_S * 2 ** (attempt - 1), _MAX_BACKOFF_S))
            try:
                response = send()
            except (httpx.ConnectError, httpx.ConnectTimeout) as e:
                last = e
                continue
            if response.is_error:
                error = _error_for(response)
                wait = getattr(error, "retry_after", None)
                if wait is not None and wait <= _MAX_RATE_WAIT_S and attempt + 1 < self._retries:
                    time.sleep(wait)  # a rate limit: the server said when to come back
                    continue
                raise error
            return response
        raise ConnectionFailedError(
            f"cannot connect to {self.base_url} after {self._retries} attempts: {last}; "
            "is the service running (prunegraph serve) and the URL right?"
        ) from last

    def _request(self, method: str, path: str, json: Any = None) -> httpx.Response:
        return self._call(
            lambda: self._http.request(method, self._url(path), json=json, headers=self._headers)
        )

    # -- endpoints

    def upload(self, path_or_bytes: Checkpoint, *, filename: str | None = None) -> str:
        """Upload a checkpoint (.pt/.pth, .safetensors, .onnx); returns its id (sha256)."""
        if isinstance(path_or_bytes, bytes):
            return self._upload(filename or "checkpoint", path_or_bytes)
        path = Path(path_or_bytes)
        with path.open("rb") as f:
            return self._upload(filename or path.name, f)

    def _upload(self, name: str, content: bytes | IO[bytes]) -> str:
        def send() -> httpx.Response:
            if not isinstance(content, bytes):
                content.seek(0)  # a retried attempt sends the whole file again
            return self._http.post(
                self._url("/v1/checkpoints"),
                files={"file": (name, content)},
                headers=self._headers,
            )

        return str(self._call(send).json()["id"])

    def upload_activations(
        self, checkpoint_id: str, activations: Activations | str | os.PathLike[str]
    ) -> str:
        """Upload feature maps of a checkpoint (:func:`clients.capture_activations`, or the file
        its ``save`` wrote); returns their id for :meth:`submit`'s ``activations_id``."""
        if not isinstance(activations, (str, os.PathLike)):
            with tempfile.TemporaryDirectory(prefix="prunegraph-") as tmp:
                return self.upload_activations(
                    checkpoint_id, activations.save(Path(tmp) / "activations.safetensors")
                )
        path = Path(activations)
        with path.open("rb") as f:

            def send() -> httpx.Response:
                f.seek(0)
                return self._http.post(
                    self._url(f"/v1/checkpoints/{checkpoint_id}/activations"),
                    files={"file": (path.name, f)},
                    headers=self._headers,
                )

            return str(self._call(send).json()["id"])

    def submit(
        self,
        checkpoint_id: str,
        *,
        methods: Iterable[str] = DEFAULT_METHODS,
        seed: int = 0,
        target: Mapping[str, float] | None = None,
        plan_method: str = "mrp",
        manifest: Manifest | Mapping[str, Any] | None = None,
        options: Options | None = None,
        constraints: PlanConstraints | None = None,
        step: float | None = None,
        activations_id: str | None = None,
        input_shape: Sequence[int] | Sequence[Sequence[int]] | None = None,
        compensation: bool | None = None,
        allocation: str | None = None,
        epsilon: float | None = None,
    ) -> str:
        """Submit an analysis job (planned too when ``target`` is set); returns the job id.

        With activations that hold second-moment statistics (and a manifest) plans are
        compensated unless ``compensation=False``; ``allocation`` and ``epsilon`` are the
        compensated planner's (see the server's /docs).

        ``options`` are the methods' parameters (``alpha``, ``min_explained``, ...; see
        :class:`graphs.AnalysisOptions`), ``constraints`` and ``step`` the planner's
        (:class:`graphs.plan.Constraints`); the server's defaults apply to what is not given.
        ``input_shape`` (ONNX models only, e.g. ``(1, 3, 64, 256)``, or one shape per input)
        makes symbolic dims concrete, so that the server derives FLOPs and a manifest.
        """
        body: dict[str, Any] = {
            "checkpoint_id": checkpoint_id,
            "methods": list(methods),
            "seed": seed,
            "target": dict(target) if target is not None else None,
            "plan_method": plan_method,
        }
        extra = {"manifest": manifest, "options": options, "constraints": constraints}
        for name, value in extra.items():
            if isinstance(value, BaseModel):
                body[name] = value.model_dump(mode="json")
            elif value is not None:
                body[name] = dict(value)
        if step is not None:
            body["step"] = step
        if activations_id is not None:
            body["activations_id"] = activations_id
        planning = {"compensation": compensation, "allocation": allocation, "epsilon": epsilon}
        body.update({k: v for k, v in planning.items() if v is not None})
        if input_shape is not None:
            body["input_shape"] = [
                [int(d) for d in s] if isinstance(s, Sequence) else int(s) for s in input_shape
            ]
        text = json.dumps(body)
        if len(text) > _MANIFEST_AS_FILE and body.get("manifest") is not None:
            # a large manifest goes as a file: the server bounds JSON bodies (a few MiB)
            short = json.dumps({k: v for k, v in body.items() if k != "manifest"})
            files = {
                "request": (None, short),
                "manifest": ("manifest.json", json.dumps(body["manifest"])),
            }
            r = self._call(
                lambda: self._http.post(self._url("/v1/jobs"), files=files, headers=self._headers)
            )
            return str(r.json()["id"])
        return str(self._request("POST", "/v1/jobs", json=body).json()["id"])

    def job(self, job_id: str) -> JobStatus:
        return JobStatus.model_validate(self._request("GET", f"/v1/jobs/{job_id}").json())

    def wait(
        self, job_id: str, *, timeout: float = 600.0, poll: float = 0.5, progress: bool = False
    ) -> JobStatus:
        """Poll until the job is done; ``progress=True`` draws a progress bar on stderr.

        Raises :class:`JobFailedError` (with the server's reason) when the job failed and
        :class:`JobTimeoutError` when it is still unfinished after ``timeout`` seconds.
        """
        if not progress:
            status = self._poll(job_id, timeout, poll, lambda _: None)
        else:
            from rich.console import Console
            from rich.progress import Progress

            with Progress(console=Console(stderr=True), transient=True) as bar:
                task = bar.add_task(f"job {job_id[:12]}", total=1.0)

                def show(s: JobStatus) -> None:
                    bar.update(
                        task, completed=s.progress, description=f"job {job_id[:12]} {s.status}"
                    )

                status = self._poll(job_id, timeout, poll, show)
        if status.status == "failed":
            raise JobFailedError(job_id, status.error or "no reason given")
        return status

    def _poll(
        self, job_id: str, timeout: float, poll: float, show: Callable[[JobStatus], None]
    ) -> JobStatus:
        deadline = time.monotonic() + timeout
        while True:
            status = self.job(job_id)
            show(status)
            if status.finished:
                return status
            left = deadline - time.monotonic()
            if left <= 0:
                raise JobTimeoutError(job_id, timeout, status)
            time.sleep(min(poll, left))

    def report(self, job_id: str) -> Report:
        return Report.model_validate_json(self._request("GET", f"/v1/jobs/{job_id}/report").text)

    @overload
    def plan(self, job_or_model: str) -> PruningPlan: ...

    @overload
    def plan(
        self,
        job_or_model: nn.Module,
        example_inputs: ExampleInputs,
        *,
        target_flops: float | None = None,
        target_params: float | None = None,
        method: str = "mrp",
        checkpoint: Checkpoint | None = None,
        seed: int = 0,
        options: Options | None = None,
        constraints: PlanConstraints | None = None,
        step: float | None = None,
        calibration: Calibration | None = None,
        timeout: float = 600.0,
        progress: bool = False,
    ) -> PruningPlan: ...

    def plan(
        self,
        job_or_model: str | nn.Module,
        example_inputs: ExampleInputs | None = None,
        *,
        target_flops: float | None = None,
        target_params: float | None = None,
        method: str = "mrp",
        checkpoint: Checkpoint | None = None,
        seed: int = 0,
        options: Options | None = None,
        constraints: PlanConstraints | None = None,
        step: float | None = None,
        calibration: Calibration | None = None,
        timeout: float = 600.0,
        progress: bool = False,
    ) -> PruningPlan:
        """A job's plan (``plan(job_id)``), or in one call the plan of a live model.

        ``plan(model, example_inputs, target_flops=0.5, method="mrp")`` builds the model's
        manifest (coupling groups, MACs) from a forward pass on ``example_inputs``, uploads the
        weights (``checkpoint``, or else the model's state dict), plans on the server and returns
        the plan; apply it with :func:`clients.apply_plan`. Set exactly one of
        ``target_flops``/``target_params`` (fractions to remove). ``calibration`` (batches, or a
        DataLoader) makes the plan data-aware: the model's feature maps on them are captured
        (:func:`clients.capture_activations`) and sent — required by ``method="ci"``, and
        compared by the graph methods instead of the weights (unless ``options`` set
        ``vectors``, e.g. ``{"vectors": "weights"}``).
        """
        if isinstance(job_or_model, str):
            text = self._request("GET", f"/v1/jobs/{job_or_model}/plan").text
            return self._with_sidecar(job_or_model, PruningPlan.model_validate_json(text))
        if example_inputs is None:
            raise TypeError("plan(model, example_inputs, ...): example inputs are needed")
        if (target_flops is None) == (target_params is None):
            raise ValueError("set exactly one of target_flops or target_params, e.g. 0.5")
        from clients.manifest import build_manifest

        manifest = build_manifest(job_or_model, example_inputs)
        target = {"flops": target_flops} if target_flops is not None else {"params": target_params}
        activations = None
        if calibration is not None:
            from clients.activations import capture_activations

            activations = capture_activations(job_or_model, _batches(calibration), seed=seed)
        return self.plan_for(
            checkpoint if checkpoint is not None else job_or_model,
            target={k: float(v) for k, v in target.items() if v is not None},
            method=method,
            manifest=manifest,
            seed=seed,
            options=options,
            constraints=constraints,
            step=step,
            activations=activations,
            timeout=timeout,
            progress=progress,
        )

    def _with_sidecar(self, job_id: str, plan: PruningPlan) -> PruningPlan:
        """A compensated plan with its sidecar fetched (sha256 checked): apply_plan folds it."""
        if plan.compensation is None:
            return plan
        from graphs.compensated import attach_sidecar
        from graphs.errors import InvalidInputError

        data = self._request("GET", f"/v1/jobs/{job_id}/plan/compensation").content
        try:
            return attach_sidecar(plan, data)
        except InvalidInputError as e:
            raise PruneGraphClientError(f"job {job_id}: {e.message}. {e.hint}") from None

    # -- one call each

    def _upload_any(self, source: Checkpoint | nn.Module) -> str:
        """Upload a path or bytes as they are, or a live model's state dict."""
        if isinstance(source, (str, os.PathLike, bytes)):
            return self.upload(source)
        import torch

        with tempfile.TemporaryDirectory(prefix="prunegraph-") as tmp:
            path = Path(tmp) / "model.pt"
            torch.save(source.state_dict(), path)
            return self.upload(path)

    def analyze(
        self,
        model_or_path: Checkpoint | nn.Module,
        example_inputs: ExampleInputs | None = None,
        *,
        methods: Iterable[str] = DEFAULT_METHODS,
        seed: int = 0,
        options: Options | None = None,
        manifest: Manifest | Mapping[str, Any] | None = None,
        calibration: Calibration | None = None,
        activations: Activations | str | os.PathLike[str] | None = None,
        timeout: float = 600.0,
        progress: bool = False,
    ) -> Report:
        """Upload, analyse and return the report.

        ``model_or_path`` is a checkpoint (path or bytes) or a live ``nn.Module`` (its state dict
        is uploaded). With ``example_inputs`` (a live model only) the model's manifest goes with
        the job: coupled layers are scored together and the report gains FLOPs.
        ``calibration`` batches (a live model only) or saved ``activations`` add feature maps:
        needed by ``ci``, and compared by the graph methods instead of the weights unless
        ``options`` set ``vectors``.
        """
        if calibration is not None:
            if isinstance(model_or_path, (str, os.PathLike, bytes)):
                raise TypeError("calibration needs a live model; pass saved activations instead")
            from clients.activations import capture_activations

            activations = capture_activations(model_or_path, _batches(calibration), seed=seed)
        if example_inputs is not None:
            if isinstance(model_or_path, (str, os.PathLike, bytes)):
                raise TypeError("example_inputs need a live model, not a checkpoint file")
            from clients.manifest import build_manifest

            manifest = build_manifest(model_or_path, example_inputs)
        checkpoint_id = self._upload_any(model_or_path)
        job_id = self.submit(
            checkpoint_id,
            methods=methods,
            seed=seed,
            options=_data_aware(options, _has_maps(activations)),
            manifest=manifest,
            activations_id=(
                self.upload_activations(checkpoint_id, activations) if activations else None
            ),
        )
        self.wait(job_id, timeout=timeout, progress=progress)
        return self.report(job_id)

    def plan_for(
        self,
        model_or_path: Checkpoint | nn.Module,
        *,
        target: Mapping[str, float],
        method: str = "mrp",
        manifest: Manifest | Mapping[str, Any] | None = None,
        seed: int = 0,
        options: Options | None = None,
        constraints: PlanConstraints | None = None,
        step: float | None = None,
        activations: Activations | str | os.PathLike[str] | None = None,
        timeout: float = 600.0,
        progress: bool = False,
        compensation: bool | None = None,
        allocation: str | None = None,
    ) -> PruningPlan:
        """Upload, plan for ``target`` (e.g. ``{"flops": 0.5}``) and return the plan
        (``activations``: feature maps for ``ci``, and compared by the graph methods unless
        ``options`` set ``vectors``; their second moments make the plan compensated unless
        ``compensation=False``: the plan then carries its sidecar for apply_plan)."""
        checkpoint_id = self._upload_any(model_or_path)
        job_id = self.submit(
            checkpoint_id,
            methods=(method,) if method != "random" else ("l1",),
            seed=seed,
            target=target,
            plan_method=method,
            manifest=manifest,
            options=_data_aware(options, _has_maps(activations)),
            constraints=constraints,
            step=step,
            activations_id=(
                self.upload_activations(checkpoint_id, activations) if activations else None
            ),
            compensation=compensation,
            allocation=allocation,
        )
        self.wait(job_id, timeout=timeout, progress=progress)
        return self.plan(job_id)

    # -- lifetime

    def close(self) -> None:
        """Close the HTTP client if this object created it (an injected one stays open)."""
        if self._owns_http:
            self._http.close()

    def __enter__(self) -> PruneGraphClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def _data_aware(options: Options | None, has_maps: bool) -> Options | None:
    """With feature maps sent, the graph methods compare them (``vectors="activations"``)
    unless the caller's options chose ``vectors`` themselves: maps that cost a capture are
    used, and they find far more redundancy than weights (benchmarks/RESULTS.md, issue 7)."""
    if not has_maps:
        return options
    if options is None:
        return {"vectors": "activations"}
    if isinstance(options, AnalysisOptions):
        if "vectors" in options.model_fields_set:
            return options
        return options.model_copy(update={"vectors": "activations"})
    return options if "vectors" in options else {**options, "vectors": "activations"}


def _has_maps(activations: Activations | str | os.PathLike[str] | None) -> bool:
    """Whether activations (captured, or a saved file) hold feature maps, not only second
    moments (``capture_activations(..., maps=False)``); a file's header says (its ``layers``)."""
    if activations is None:
        return False
    if not isinstance(activations, (str, os.PathLike)):
        return bool(activations.layers)
    try:
        with open(activations, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if not 0 < n <= 1 << 27:
                return True
            meta = json.loads(f.read(n)).get("__metadata__") or {}
        return bool(json.loads(meta.get("layers", "{}")))
    except (OSError, ValueError, AttributeError):
        return True  # the server says what is wrong with the file


def _batches(calibration: Any) -> Iterable[Any]:
    """A single tensor is one batch; anything else is iterated as batches."""
    import torch

    return [calibration] if isinstance(calibration, torch.Tensor) else calibration
