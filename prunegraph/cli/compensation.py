"""The CLI's side of compensated plans and functional redundancy (design §8).

An activations file (``clients.capture_activations(...).save``) may hold feature maps, second
moments of the consumers' inputs (``gram/<module>``), or both. The maps feed ``ci`` and
``--vectors activations`` as before; the statistics make ``plan`` compensated by default and add
functional redundancy to ``analyze``'s report. A compensated plan written with ``-o plan.json``
has its sidecar written next to it (``plan.fold.safetensors``, pinned by sha256 in the plan).
Held-out statistics (the file's own ``holdout/<module>``, or ``plan --holdout-activations``,
which wins) cross-fit the error curves of both unless ``--no-crossfit``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from rich.console import Console
from rich.markup import escape

from graphs import InvalidInputError, PruneGraphError, Report
from graphs.manifest import Manifest
from graphs.options import DEFAULT_EPSILON
from graphs.plan import PruningPlan
from prunegraph.cli.options import existing

if TYPE_CHECKING:
    from graphs.layers import LayerWeights
    from service.ingest.checkpoint import ParsedCheckpoint
    from service.jobs.inputs import JobInputs

ALLOCATION_HELP = (
    "compensated plans: how many channels each group loses: functional (SRP on functional "
    "redundancy: one common error; the default, chosen on MNIST validation digits), uniform (the "
    "same fraction of each group), marginal (equal error per FLOP; priced by --sensitivity when "
    "given) or method (the method's own "
    "rule)"
)
NO_MANIFEST = (
    "the activations hold second-moment statistics, but compensation and functional redundancy "
    "need the model's manifest (--manifest): {what} without them"
)


def usable_stats(
    stats: dict[str, np.ndarray] | None, manifest: Manifest | None, what: str, err: Console
) -> dict[str, np.ndarray] | None:
    """The statistics when a manifest lets them be used; else None and a note on stderr."""
    if stats and manifest is None:
        err.print(f"[yellow]note:[/] {escape(NO_MANIFEST.format(what=what))}", highlight=False)
        return None
    return stats or None


SENSITIVITY_HINT = (
    "Write it with clients.sensitivity(model, example_inputs, evaluate, order='functional', "
    "compensation=(True,), stats=...).to_json() on the model this plan is for."
)


def read_sensitivity(
    path: Path | None, activations: Path | None, server: str | None, allocation: str | None
) -> dict[str, Any] | None:
    """``--sensitivity``: the parsed table (a JSON object with compensated rows); None when
    not given. Refused before any work without ``--activations``, with ``--server`` or with
    an ``--allocation`` other than marginal (the table's weights are marginal's currency)."""
    if path is None:
        return None
    if allocation not in (None, "marginal"):
        raise InvalidInputError(
            f"--sensitivity weights the marginal allocation, not --allocation {allocation}",
            hint="Leave out --allocation (--sensitivity implies marginal) or pass "
            "--allocation marginal.",
        )
    if activations is None:
        raise InvalidInputError(
            "--sensitivity weights the allocation of compensated plans: it needs --activations",
            hint="Pass --activations with second-moment statistics "
            "(clients.capture_activations(model, batches, maps=False).save(...)) and --manifest.",
        )
    if server is not None:
        raise InvalidInputError(
            "--sensitivity is not sent to a service", hint="Plan embedded: leave out --server."
        )
    try:
        table = json.loads(path.read_bytes())
    except OSError as e:
        raise InvalidInputError(
            f"cannot read the sensitivity table {path}: {e.strerror or e}", hint="Check the path."
        ) from None
    except ValueError as e:
        raise InvalidInputError(f"{path} is not JSON ({e})", hint=SENSITIVITY_HINT) from None
    rows = table.get("rows") if isinstance(table, dict) else None
    if not isinstance(rows, list):
        raise InvalidInputError(
            f"{path} is not a sensitivity table (a JSON object with a 'rows' list)",
            hint=SENSITIVITY_HINT,
        )
    if not any(isinstance(r, dict) and r.get("compensated") is True for r in rows):
        raise InvalidInputError(
            f"the sensitivity table {path} has no compensated rows", hint=SENSITIVITY_HINT
        )
    return table


HOLDOUT_HINT = (
    "Capture it like the file of --activations, on a part of the same calibration data (best "
    "whole source images): clients.capture_activations(model, part_of_the_batches, "
    "maps=False).save(...)."
)


def check_holdout(
    path: Path | None, activations: Path | None, server: str | None, crossfit: bool = True
) -> None:
    """``--holdout-activations``: refused before any work without ``--activations``, with
    ``--server`` (not sent to a service) or with ``--no-crossfit`` (in-sample curves). With
    ``--no-compensation`` it cross-fits the curves as the file's own held-out part does: the
    channels of the compensated plan with it, without folds."""
    if path is None:
        return
    if not crossfit:
        raise InvalidInputError(
            "--holdout-activations cross-fits the error curves, and --no-crossfit asks for "
            "in-sample curves",
            hint="Leave out --no-crossfit, or leave out --holdout-activations.",
        )
    if activations is None:
        raise InvalidInputError(
            "--holdout-activations cross-fits the error curves of compensated plans: it needs "
            "--activations (the statistics of all the calibration data)",
            hint="Pass --activations with second-moment statistics of all the calibration data "
            "(clients.capture_activations(model, batches, maps=False).save(...)) and --manifest.",
        )
    if server is not None:
        raise InvalidInputError(
            "--holdout-activations is not sent to a service",
            hint="Plan embedded: leave out --server.",
        )
    existing(path)


def read_holdout(
    path: Path | None, layers: Sequence[LayerWeights], stats: dict[str, np.ndarray] | None
) -> dict[str, np.ndarray] | None:
    """The held-out statistics of ``--holdout-activations`` (consumer module name → S (c + 1,
    c + 1) float64), read and checked against the checkpoint's ``layers`` like
    ``--activations``; None when not given. ``stats``: the usable statistics of
    ``--activations`` (None: refused, there is nothing to cross-fit). Whether they are a part of
    ``stats`` is checked by the planner.

    Raises:
        CheckpointError: not an activations file.
        InvalidInputError: no statistics in it, or none usable in ``--activations``.
    """
    if path is None:
        return None
    from service.ingest.activations import check_capture, read_capture

    if not stats:
        raise InvalidInputError(
            "--holdout-activations cross-fits the error curves of compensated plans: it needs "
            "second-moment statistics in --activations and the model's --manifest",
            hint="Pass --activations written by clients.capture_activations(model, batches, "
            "maps=False).save(...) and --manifest, or leave out --holdout-activations.",
        )
    capture = read_capture(path)
    check_capture(capture, layers)
    if not capture.statistics:
        raise InvalidInputError(
            f"{path} holds no second-moment statistics (feature maps only)", hint=HOLDOUT_HINT
        )
    return dict(capture.statistics)


def holdout_for(
    path: Path | None, inputs: JobInputs, stats: dict[str, np.ndarray] | None, crossfit: bool
) -> dict[str, np.ndarray] | None:
    """The held-out statistics that cross-fit the curves: ``--holdout-activations`` when given
    (:func:`read_holdout`), else the activations file's own when ``crossfit`` and ``stats``
    (the usable statistics) are there, as a job on the service takes them; None: in-sample."""
    if path is not None:
        return read_holdout(path, inputs.checkpoint.layers, stats)
    from service.jobs.compensation import used_holdout

    return used_holdout(inputs, crossfit=crossfit) if stats else None


def add_functional(
    report: Report,
    parsed: ParsedCheckpoint,
    manifest: Manifest | None,
    stats: dict[str, np.ndarray] | None,
    epsilon: float = DEFAULT_EPSILON,
    holdout: dict[str, np.ndarray] | None = None,
) -> Report:
    """``report`` with every group's functional redundancy when there are statistics
    (cross-fitted with ``holdout``: :func:`service.jobs.compensation.with_figures`)."""
    from service.jobs.compensation import with_figures

    return with_figures(report, parsed.layers, manifest, stats, epsilon, holdout)


def write_sidecar(plan: PruningPlan, output: Path | None, err: Console) -> None:
    """With ``-o``: the compensated plan's sidecar next to it, said on stderr."""
    if output is None or plan.compensation is None:
        return
    from graphs.compensated import plan_sidecar, sidecar_path

    path = sidecar_path(output)
    try:
        path.write_bytes(plan_sidecar(plan))
    except OSError as e:
        raise PruneGraphError(
            f"cannot write the plan's sidecar to {path}: {e.strerror or e}",
            hint="Pass -o a path in a writable directory.",
        ) from None
    comp = plan.compensation
    err.print(
        f"compensation: {len(comp.folds)} folds → {escape(str(path))} "
        f"({comp.sidecar_bytes:,} bytes, sha256 {comp.sidecar_sha256[:12]}…; keep it next to "
        "the plan: apply_plan reads it)",
        highlight=False,
    )


def plan_columns(plan: PruningPlan) -> list[str]:
    """Extra columns of the plan table: functional redundancy, predicted output error."""
    cols = []
    if any(g.functional_redundancy is not None for g in plan.groups):
        cols.append("functional")
    if any(g.predicted_error is not None for g in plan.groups):
        cols.append("pred. error")
    return cols


def plan_cells(plan: PruningPlan, gid: int) -> list[str]:
    """The extra cells of group ``gid`` (see :func:`plan_columns`)."""
    g = next(g for g in plan.groups if g.id == gid)
    cells = []
    for col in plan_columns(plan):
        v = g.functional_redundancy if col == "functional" else g.predicted_error
        cells.append("—" if v is None else (f"{v:.3f}" if col == "functional" else f"{v:.2e}"))
    return cells
