"""The HTTP client of the prunegraph service (design §6).

:class:`PruneGraphClient` uploads a checkpoint, submits an analysis job, waits for it (with an
optional progress bar on stderr) and fetches the :class:`~graphs.report.Report` or the
:class:`~graphs.plan.PruningPlan`::

    with PruneGraphClient("http://127.0.0.1:8000", token="secret") as client:
        report = client.analyze("resnet56.pt")                # or a live nn.Module
        plan = client.plan(model, torch.zeros(1, 3, 32, 32), target_flops=0.5, method="mrp")
        apply_plan(model, plan)                                  # clients.apply_plan
        plan = client.plan_for("resnet56.pt", target={"params": 0.3})   # a file, no manifest

Any ``httpx.Client`` can be injected (``http=``), e.g. FastAPI's ``TestClient``. Retries and errors
by status: :mod:`clients.transport`; the job body (the service's own model):
:mod:`clients.job_request`; waiting: :mod:`clients.polling`; exceptions: :mod:`clients.errors`.
No torch is imported until a live model is given (:mod:`clients.live_model`).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, overload

import httpx

from clients.errors import PruneGraphClientError
from clients.job_request import (
    Options,
    PlanConstraints,
    data_aware_options,
    has_feature_maps,
    job_request,
    multipart_body,
    wire_body,
)
from clients.polling import wait_for_job
from clients.transport import Transport
from graphs.contracts.jobs import JobStatus
from graphs.manifest import Manifest
from graphs.plan import PruningPlan
from graphs.report import ALL_METHODS, Report

if TYPE_CHECKING:
    from torch import nn

    from clients.activations import Activations
    from clients.tracing import ExampleInputs

__all__ = ["DEFAULT_METHODS", "Calibration", "Checkpoint", "PruneGraphClient"]

DEFAULT_METHODS: tuple[str, ...] = ALL_METHODS
Checkpoint = str | os.PathLike[str] | bytes
Calibration = Iterable[Any]
"""Calibration batches: input tensors or (inputs, labels) pairs, e.g. a DataLoader."""


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
        self.transport = Transport(base_url, token, http, retries, timeout)
        self.base_url = self.transport.base_url

    # -- endpoints

    def upload(self, path_or_bytes: Checkpoint, *, filename: str | None = None) -> str:
        """Upload a checkpoint (.pt/.pth, .safetensors, .onnx); returns its id (sha256)."""
        if isinstance(path_or_bytes, bytes):
            content: bytes | Path = path_or_bytes
        else:
            content = Path(path_or_bytes)
        name = filename or (content.name if isinstance(content, Path) else "checkpoint")
        return str(self.transport.post_file("/v1/checkpoints", name, content).json()["id"])

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
        path, file = f"/v1/checkpoints/{checkpoint_id}/activations", Path(activations)
        return str(self.transport.post_file(path, file.name, file).json()["id"])

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
        crossfit: bool | None = None,
    ) -> str:
        """Submit an analysis job (planned too when ``target`` is set); returns the job id.

        With activations that hold second-moment statistics (and a manifest) plans are
        compensated unless ``compensation=False``; ``allocation`` and ``epsilon`` are the
        compensated planner's, ``crossfit=False`` keeps their error curves (and functional
        redundancy) in-sample where the file has held-out statistics (see the server's /docs).

        ``options`` are the methods' parameters (``alpha``, ``min_explained``, ...; see
        :class:`graphs.AnalysisOptions`), ``constraints`` and ``step`` the planner's
        (:class:`graphs.plan.Constraints`); the server's defaults apply to what is not given.
        ``input_shape`` (ONNX models only, e.g. ``(1, 3, 64, 256)``, or one shape per input)
        makes symbolic dims concrete, so that the server derives FLOPs and a manifest.
        The request is validated before it is sent (:class:`~clients.errors.InvalidRequestError`,
        422, as the server would answer).
        """
        request = job_request(
            checkpoint_id, methods=methods, seed=seed, target=target, plan_method=plan_method,
            manifest=manifest, options=options, constraints=constraints, step=step,
            activations_id=activations_id, input_shape=input_shape, compensation=compensation,
            allocation=allocation, epsilon=epsilon, crossfit=crossfit,
        )  # fmt: skip
        body = wire_body(request)
        files = multipart_body(body)
        if files is not None:  # a large manifest goes as a file
            return str(self.transport.post_files("/v1/jobs", files).json()["id"])
        return str(self.transport.request("POST", "/v1/jobs", json=body).json()["id"])

    def job(self, job_id: str) -> JobStatus:
        """Where the job stands (:class:`graphs.contracts.jobs.JobStatus`)."""
        return JobStatus.model_validate(self.transport.request("GET", f"/v1/jobs/{job_id}").json())

    def wait(
        self, job_id: str, *, timeout: float = 600.0, poll: float = 0.5, progress: bool = False
    ) -> JobStatus:
        """Poll until the job is done; ``progress=True`` draws a progress bar on stderr.

        Raises :class:`~clients.errors.JobFailedError` (with the server's reason) when the job
        failed and :class:`~clients.errors.JobTimeoutError` when it is still unfinished after
        ``timeout`` seconds.
        """
        return wait_for_job(self.job, job_id, timeout=timeout, poll=poll, progress=progress)

    def report(self, job_id: str) -> Report:
        text = self.transport.request("GET", f"/v1/jobs/{job_id}/report").text
        return Report.model_validate_json(text)

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
            text = self.transport.request("GET", f"/v1/jobs/{job_or_model}/plan").text
            return self._with_sidecar(job_or_model, PruningPlan.model_validate_json(text))
        if example_inputs is None:
            raise TypeError("plan(model, example_inputs, ...): example inputs are needed")
        if (target_flops is None) == (target_params is None):
            raise ValueError("set exactly one of target_flops or target_params, e.g. 0.5")
        from clients import live_model

        manifest = live_model.manifest(job_or_model, example_inputs)
        target = {"flops": target_flops} if target_flops is not None else {"params": target_params}
        activations = None
        if calibration is not None:
            activations = live_model.capture(job_or_model, calibration, seed=seed)
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

        data = self.transport.request("GET", f"/v1/jobs/{job_id}/plan/compensation").content
        try:
            return attach_sidecar(plan, data)
        except InvalidInputError as e:
            raise PruneGraphClientError(f"job {job_id}: {e.message}. {e.hint}") from None

    # -- one call each

    def _upload_any(self, source: Checkpoint | nn.Module) -> str:
        """Upload a path or bytes as they are, or a live model's state dict."""
        if isinstance(source, (str, os.PathLike, bytes)):
            return self.upload(source)
        from clients.live_model import save_state_dict

        with tempfile.TemporaryDirectory(prefix="prunegraph-") as tmp:
            return self.upload(save_state_dict(source, Path(tmp) / "model.pt"))

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
        input_shape: Sequence[int] | Sequence[Sequence[int]] | None = None,
        epsilon: float | None = None,
        crossfit: bool | None = None,
    ) -> Report:
        """Upload, analyse and return the report.

        ``model_or_path`` is a checkpoint (path or bytes) or a live ``nn.Module`` (its state dict
        is uploaded). With ``example_inputs`` (a live model only) the model's manifest goes with
        the job: coupled layers are scored together and the report gains FLOPs.
        ``calibration`` batches (a live model only) or saved ``activations`` add feature maps:
        needed by ``ci``, and compared by the graph methods instead of the weights unless
        ``options`` set ``vectors``. ``input_shape``, ``epsilon``, ``crossfit``: as in
        :meth:`submit`.
        """
        if calibration is not None:
            if isinstance(model_or_path, (str, os.PathLike, bytes)):
                raise TypeError("calibration needs a live model; pass saved activations instead")
            from clients import live_model

            activations = live_model.capture(model_or_path, calibration, seed=seed)
        if example_inputs is not None:
            if isinstance(model_or_path, (str, os.PathLike, bytes)):
                raise TypeError("example_inputs need a live model, not a checkpoint file")
            from clients import live_model

            manifest = live_model.manifest(model_or_path, example_inputs)
        job_id = self._run(
            model_or_path, activations, options, timeout, progress,
            methods=methods, seed=seed, manifest=manifest, input_shape=input_shape,
            epsilon=epsilon, crossfit=crossfit,
        )  # fmt: skip
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
        epsilon: float | None = None,
        input_shape: Sequence[int] | Sequence[Sequence[int]] | None = None,
        crossfit: bool | None = None,
    ) -> PruningPlan:
        """Upload, plan for ``target`` (e.g. ``{"flops": 0.5}``) and return the plan
        (``activations``: feature maps for ``ci``, and compared by the graph methods unless
        ``options`` set ``vectors``; their second moments make the plan compensated unless
        ``compensation=False``: the plan then carries its sidecar for apply_plan; ``allocation``,
        ``epsilon``, ``crossfit`` and ``input_shape`` as in :meth:`submit`)."""
        job_id = self._run(
            model_or_path, activations, options, timeout, progress,
            methods=(method,) if method != "random" else ("l1",), seed=seed, target=target,
            plan_method=method, manifest=manifest, constraints=constraints, step=step,
            compensation=compensation, allocation=allocation, epsilon=epsilon,
            input_shape=input_shape, crossfit=crossfit,
        )  # fmt: skip
        return self.plan(job_id)

    def _run(
        self,
        source: Checkpoint | nn.Module,
        activations: Activations | str | os.PathLike[str] | None,
        options: Options | None,
        timeout: float,
        progress: bool,
        **job: Any,
    ) -> str:
        """Check ``job`` (:meth:`submit`'s keywords), upload, submit, wait; returns the job id."""
        options = data_aware_options(options, has_feature_maps(activations))
        job = {"methods": DEFAULT_METHODS, "seed": 0, "target": None, "plan_method": "mrp", **job}
        job_request("0" * 64, options=options, activations_id="0" if activations else None, **job)
        checkpoint_id = self._upload_any(source)
        job_id = self.submit(
            checkpoint_id,
            options=options,
            activations_id=(
                self.upload_activations(checkpoint_id, activations) if activations else None
            ),
            **job,
        )
        self.wait(job_id, timeout=timeout, progress=progress)
        return job_id

    def close(self) -> None:
        """Close the HTTP client if this object created it (an injected one stays open)."""
        self.transport.close()

    def __enter__(self) -> PruneGraphClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
