"""``prunegraph analyze``: per-layer calibrated redundancy, embedded or on a service."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from graphs import AnalysisOptions, PruneGraphError, Report, analyze
from graphs.options import DEFAULT_EPSILON, check_features, check_methods
from graphs.report import ALL_METHODS
from prunegraph.cli import compensation as comp
from prunegraph.cli.console import check_output, emit, fail, make_console, print_notes
from prunegraph.cli.inputs import read_inputs
from prunegraph.cli.options import (
    ActivationsOpt,
    AlphaOpt,
    CrossfitOpt,
    EpsilonOpt,
    InputShapeOpt,
    ManifestOpt,
    MinExplainedOpt,
    ServerOpt,
    TokenOpt,
    VectorsOpt,
    analysis_options,
    choose_vectors,
    existing,
    input_shapes,
    load_manifest,
    maps_given,
    parse_methods,
)
from prunegraph.cli.render import render_report


def analyze_here(
    checkpoint: Path,
    manifest: Path | None,
    activations: Path | None,
    methods: list[str],
    seed: int,
    options: AnalysisOptions,
    err: Console,
    input_shape: str | None = None,
    epsilon: float = DEFAULT_EPSILON,
    crossfit: bool = True,
) -> tuple[Report, float]:
    """Embedded analysis with a progress bar on stderr; returns the report and the read time
    (``crossfit``: the activations file's held-out statistics cross-fit the functional
    figures, as on the service)."""
    t0 = time.perf_counter()
    inputs = read_inputs(checkpoint, manifest, input_shape, activations)
    parsed, man = inputs.checkpoint, inputs.manifest
    stats = comp.usable_stats(inputs.stats, man, "analysed", err)
    t_read = time.perf_counter() - t0
    with Progress(
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=err,
        transient=True,
        disable=not err.is_terminal,
    ) as bar:
        task = bar.add_task("analysing", total=None)

        def tick(done: int, total: int, name: str) -> None:
            bar.update(task, completed=done, total=total, description=name)

        report = analyze(
            parsed.layers,
            checkpoint=parsed.info,
            skipped=parsed.skipped,
            methods=methods,
            seed=seed,
            options=options,
            progress=tick,
            manifest=man,
            activations=inputs.maps,
        )
    if inputs.notes:
        report = report.model_copy(update={"notes": inputs.notes})
    holdout = comp.holdout_for(None, inputs, stats, crossfit)
    return comp.add_functional(report, parsed, man, stats, epsilon, holdout), t_read


def analyze_cmd(
    checkpoint: Annotated[Path, typer.Argument(help=".pt/.pth, .safetensors or ONNX file")],
    methods: Annotated[str, typer.Option(help="comma-separated methods")] = ",".join(ALL_METHODS),
    seed: Annotated[
        int, typer.Option(help="seed of every stochastic step", min=0, max=2**32 - 1)
    ] = 0,
    alpha: AlphaOpt = 0.05,
    min_explained: MinExplainedOpt = 0.5,
    as_json: Annotated[bool, typer.Option("--json", help="print the JSON report")] = False,
    output: Annotated[
        Path | None, typer.Option("-o", "--output", help="also write the JSON report here")
    ] = None,
    manifest: ManifestOpt = None,
    activations: ActivationsOpt = None,
    vectors: VectorsOpt = "auto",
    input_shape: InputShapeOpt = None,
    epsilon: EpsilonOpt = DEFAULT_EPSILON,
    crossfit: CrossfitOpt = True,
    server: ServerOpt = None,
    token: TokenOpt = None,
) -> None:
    """Per-layer calibrated redundancy of a checkpoint (embedded, or on a service: --server)."""
    out = make_console()
    err = make_console(stderr=True)
    t0 = time.perf_counter()
    try:
        check_output(output)
        options = analysis_options(
            alpha=alpha, min_explained=min_explained, vectors=choose_vectors(vectors, activations)
        )
        chosen = check_methods(parse_methods(methods))
        check_features(chosen, options, maps_given(activations))
        if server is not None:
            from prunegraph.cli.remote import remote_report

            report = remote_report(
                server,
                token,
                existing(checkpoint),
                methods=chosen,
                seed=seed,
                options=options,
                manifest=load_manifest(manifest),
                activations=existing(activations) if activations is not None else None,
                progress=err.is_terminal,
                input_shape=input_shapes(input_shape, manifest),
                epsilon=epsilon,
                crossfit=crossfit,
            )
            emit(report.to_json(), output, as_json, lambda: render_report(report, out), out, err)
            print_notes(report.notes, err)
            err.print(f"[dim]analysed on {server} in {time.perf_counter() - t0:.2f} s[/]")
            return
        report, t_read = analyze_here(
            checkpoint, manifest, activations, chosen, seed, options, err, input_shape, epsilon,
            crossfit,
        )  # fmt: skip
    except PruneGraphError as e:
        raise fail(err, e) from None
    t_total = time.perf_counter() - t0
    emit(report.to_json(), output, as_json, lambda: render_report(report, out), out, err)
    print_notes(report.notes, err)
    err.print(
        f"[dim]read {t_read:.2f} s · analysed {len(report.layers)} groups in "
        f"{t_total - t_read:.2f} s[/]"
    )
