"""``prunegraph plan``: a pruning plan that reaches a FLOPs or params target."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated, Any

import typer
from pydantic import ValidationError
from rich.console import Console

from graphs import InvalidInputError, PruneGraphError
from graphs.options import DEFAULT_EPSILON, check_features
from graphs.plan import ALLOCATION_RULES, PLAN_METHODS, Constraints, PruningPlan, Target
from prunegraph.cli import compensation as comp
from prunegraph.cli.console import check_output, emit, fail, make_console, print_notes
from prunegraph.cli.inputs import read_inputs
from prunegraph.cli.options import (
    ActivationsOpt,
    AlphaOpt,
    CrossfitOpt,
    EpsilonOpt,
    HoldoutOpt,
    InputShapeOpt,
    ManifestOpt,
    MinExplainedOpt,
    SeedOpt,
    SensitivityOpt,
    ServerOpt,
    TokenOpt,
    VectorsOpt,
    analysis_options,
    choose_vectors,
    existing,
    input_shapes,
    load_manifest,
    maps_given,
)
from prunegraph.cli.render import render_plan

FALLBACK_HELP = (
    "mrp/srr/hsc once no layer is redundant: uniform (one uniform ratio) or anneal (first go on "
    "at softer calibrated levels; measured worse, see benchmarks/RESULTS.md)"
)
COMPENSATION_HELP = (
    "with second-moment statistics in --activations (and a manifest): fold the removed channels "
    "into the kept ones by least squares (the sidecar goes next to -o as <stem>.fold.safetensors);"
    " --no-compensation: the same channels, no folds"
)


def target_and_constraints(
    target_flops: float | None,
    target_params: float | None,
    min_channels: int,
    max_ratio: float,
    round_to: int | None,
    ignore: list[str] | None,
) -> tuple[Target, Constraints]:
    """The plan's target and constraints; invalid ones are usage errors."""
    try:
        target = Target(flops=target_flops, params=target_params)
        constraints = Constraints(
            min_channels=min_channels,
            max_ratio=max_ratio,
            round_to=round_to,
            ignored=sorted(ignore or []),
        )
    except ValidationError as e:
        raise InvalidInputError(
            e.errors()[0]["msg"].replace("Value error, ", ""),
            hint="Give exactly one of --target-flops or --target-params, in (0, 1).",
        ) from None
    return target, constraints


def check_choices(method: str, allocation: str | None) -> None:
    """``--method`` and ``--allocation`` name ones the planner knows."""
    if method not in PLAN_METHODS:
        raise InvalidInputError(
            f"unknown method {method!r}", hint=f"Choose one of {', '.join(PLAN_METHODS)}."
        )
    if allocation is not None and allocation not in ALLOCATION_RULES:
        raise InvalidInputError(
            f"unknown allocation {allocation!r}",
            hint=f"Choose one of {', '.join(ALLOCATION_RULES)}.",
        )


def plan_here(
    checkpoint: Path,
    manifest: Path | None,
    activations: Path | None,
    input_shape: str | None,
    err: Console,
    sensitivity: dict[str, Any] | None = None,
    holdout: Path | None = None,
    crossfit: bool = True,
    **job: Any,
) -> PruningPlan:
    """The embedded plan (``job``: the planner's method, target, constraints, options, ...;
    ``sensitivity``: the parsed ``--sensitivity`` table; ``holdout``: the
    ``--holdout-activations`` file, which wins over the activations file's own held-out
    statistics; ``crossfit``: whether those cross-fit the curves)."""
    from graphs.planner import plan_layers

    inputs = read_inputs(checkpoint, manifest, input_shape, activations)
    print_notes(inputs.notes, err)
    parsed = inputs.checkpoint
    stats = comp.usable_stats(inputs.stats, inputs.manifest, "planned", err)
    return plan_layers(
        parsed.layers,
        params_total=parsed.info.n_params,
        manifest=inputs.manifest,
        checkpoint_sha256=parsed.info.sha256,
        activations=inputs.maps,
        stats=stats,
        sensitivity=sensitivity,
        holdout_stats=comp.holdout_for(holdout, inputs, stats, crossfit),
        **job,
    )


def plan_cmd(
    checkpoint: Annotated[Path, typer.Argument(help=".pt/.pth, .safetensors or ONNX file")],
    method: Annotated[
        str, typer.Option(help="mrp, srr, hsc, ci (needs --activations), l1, fpgm or random")
    ] = "mrp",
    target_flops: Annotated[
        float | None, typer.Option(help="fraction of FLOPs to remove (needs a manifest)")
    ] = None,
    target_params: Annotated[
        float | None, typer.Option(help="fraction of params to remove")
    ] = None,
    manifest: ManifestOpt = None,
    seed: SeedOpt = 0,
    step: Annotated[
        float, typer.Option(help="filters per greedy step: an integer, or a fraction of a group")
    ] = 0.05,
    min_channels: Annotated[int, typer.Option(help="never keep fewer channels")] = 1,
    max_ratio: Annotated[float, typer.Option(help="never remove more of a group")] = 0.9,
    round_to: Annotated[int | None, typer.Option(help="kept channels a multiple of this")] = None,
    ignore: Annotated[
        list[str] | None, typer.Option(help="layer never pruned (repeatable)")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print the JSON plan")] = False,
    output: Annotated[
        Path | None, typer.Option("-o", "--output", help="write the JSON plan here")
    ] = None,
    alpha: AlphaOpt = 0.05,
    min_explained: MinExplainedOpt = 0.5,
    activations: ActivationsOpt = None,
    vectors: VectorsOpt = "auto",
    fallback: Annotated[str, typer.Option(help=FALLBACK_HELP)] = "uniform",
    input_shape: InputShapeOpt = None,
    compensation: Annotated[bool, typer.Option(help=COMPENSATION_HELP)] = True,
    allocation: Annotated[
        str | None, typer.Option(help=comp.ALLOCATION_HELP, show_default=False)
    ] = None,
    epsilon: EpsilonOpt = DEFAULT_EPSILON,
    sensitivity: SensitivityOpt = None,
    holdout_activations: HoldoutOpt = None,
    crossfit: CrossfitOpt = True,
    server: ServerOpt = None,
    token: TokenOpt = None,
) -> None:
    """A pruning plan that reaches a FLOPs or params target (embedded, or --server)."""
    out = make_console()
    err = make_console(stderr=True)
    t0 = time.perf_counter()
    try:
        check_output(output)
        target, constraints = target_and_constraints(
            target_flops, target_params, min_channels, max_ratio, round_to, ignore
        )
        check_choices(method, allocation)
        table = comp.read_sensitivity(sensitivity, activations, server, allocation)
        comp.check_holdout(holdout_activations, activations, server, crossfit)
        options = analysis_options(
            alpha=alpha,
            min_explained=min_explained,
            vectors=choose_vectors(vectors, activations),
            fallback=fallback,
        )
        check_features([method], options, maps_given(activations))
        job: dict[str, Any] = dict(
            method=method, target=target, seed=seed, step=step, constraints=constraints,
            options=options, compensation=compensation, allocation=allocation, epsilon=epsilon,
        )  # fmt: skip
        if server is not None:
            from prunegraph.cli.remote import remote_plan

            plan = remote_plan(
                server,
                token,
                existing(checkpoint),
                manifest=load_manifest(manifest),
                activations=existing(activations) if activations is not None else None,
                progress=err.is_terminal,
                input_shape=input_shapes(input_shape, manifest),
                crossfit=crossfit,
                **job,
            )
        else:
            plan = plan_here(
                checkpoint, manifest, activations, input_shape, err,
                sensitivity=table, holdout=holdout_activations, crossfit=crossfit, **job,
            )  # fmt: skip
        emit(plan.to_json(), output, as_json, lambda: render_plan(plan, out), out, err)
        comp.write_sidecar(plan, output, err)
    except PruneGraphError as e:
        raise fail(err, e) from None
    where = "" if server is None else f" on {server}"
    err.print(f"[dim]planned{where} in {time.perf_counter() - t0:.2f} s[/]")
