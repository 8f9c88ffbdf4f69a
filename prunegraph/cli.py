"""The ``prunegraph`` command line.

``prunegraph analyze CKPT`` runs embedded: no server is needed. Errors print what is wrong and
what to do on stderr and exit with status 2. Tables and progress are for people (progress and
timings go to stderr); ``--json`` prints the versioned report for machines.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Annotated

import typer
from pydantic import ValidationError
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from graphs import AnalysisOptions, InvalidInputError, PruneGraphError, Report, analyze
from graphs.report import ALL_METHODS, LayerReport, MethodResult

app = typer.Typer(
    name="prunegraph",
    help="Find and remove redundancy in trained neural networks.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _fail(console: Console, err: PruneGraphError) -> typer.Exit:
    console.print(f"[bold red]error:[/] {err.message}", highlight=False, markup=True)
    console.print(f"[yellow]what to do:[/] {err.hint}", highlight=False)
    return typer.Exit(code=2)


def _figure(result: MethodResult) -> str:
    """A method's redundancy with its defining raw figure, for the table."""
    if result.method == "mrp":
        return f"{result.redundancy:.3f} K={result.n_communities}"
    if result.method == "srr":
        return f"{result.redundancy:.3f} k={result.n_components} Nc={result.covering_number:g}"
    if result.method == "hsc":
        return f"{result.redundancy:.3f} K={result.n_clusters}"
    return "scores"


def _layer_row(layer: LayerReport, methods: list[str]) -> list[str]:
    name = layer.name if len(layer.members) == 1 else f"{layer.name} (+{len(layer.members) - 1})"
    shape = "×".join(str(s) for s in layer.shape)
    return [name, layer.kind, shape, str(layer.n_filters)] + [
        _figure(layer.methods[m]) for m in methods
    ]


def render_report(report: Report, console: Console) -> None:
    """Per-layer table, skipped layers and the model summary."""
    table = Table(title=f"prunegraph report · sha256 {report.checkpoint.sha256[:12]}…")
    for col in ("layer", "kind", "shape", "filters"):
        table.add_column(col, justify="right" if col == "filters" else "left", no_wrap=True)
    for m in report.methods:
        table.add_column(m, justify="right", no_wrap=True)
    for layer in report.layers:
        table.add_row(*_layer_row(layer, report.methods))
    console.print(table)
    if report.skipped:
        skip = Table(title="skipped layers")
        skip.add_column("layer")
        skip.add_column("reason")
        for item in report.skipped:
            skip.add_row(item.name, item.reason)
        console.print(skip)
    s = report.summary
    console.print(
        f"{s.n_layers} groups analysed, {s.n_skipped} skipped · "
        f"params {s.params_total:,} ({s.params_analysed:,} in analysed layers) · "
        f"FLOPs {'unknown (no manifest)' if s.flops is None else f'{s.flops:,}'}"
    )
    for m, ms in s.methods.items():
        if ms.redundancy_params_weighted is None:
            console.print(f"  {m}: importance scores only (no layer redundancy)")
            continue
        worst = ", ".join(ms.most_redundant[:3]) or "none"
        console.print(
            f"  {m}: params-weighted redundancy {ms.redundancy_params_weighted:.3f}; "
            f"most redundant: {worst}"
        )


def _console(*, stderr: bool = False) -> Console:
    """A console that does not squeeze tables to 80 columns when output is piped."""
    console = Console(stderr=stderr)
    if not console.is_terminal:
        console = Console(stderr=stderr, width=200)
    return console


def _options(**values: float) -> AnalysisOptions:
    try:
        return AnalysisOptions(**values)
    except ValidationError as e:
        problems = "; ".join(f"--{'-'.join(map(str, x['loc']))}: {x['msg']}" for x in e.errors())
        raise InvalidInputError(
            f"invalid option: {problems}".replace("_", "-"), hint="Check the command's options."
        ) from None


def _output_error(path: Path, e: OSError) -> PruneGraphError:
    return PruneGraphError(
        f"cannot write the report to {path}: {e.strerror or e}",
        hint="Pass -o a path in an existing, writable directory.",
    )


def _check_output(path: Path | None) -> None:
    """Fail before any work when the report could not be written."""
    if path is None:
        return
    parent = path.parent if str(path.parent) else Path(".")
    if path.is_dir() or not parent.is_dir() or not os.access(parent, os.W_OK):
        raise _output_error(path, OSError(0, "no such writable file location"))


def _parse_methods(methods: str) -> list[str]:
    return [m.strip() for m in methods.split(",") if m.strip()]


@app.command("analyze")
def analyze_cmd(
    checkpoint: Annotated[Path, typer.Argument(help=".pt/.pth, .safetensors or ONNX file")],
    methods: Annotated[str, typer.Option(help="comma-separated methods")] = ",".join(ALL_METHODS),
    seed: Annotated[
        int, typer.Option(help="seed of every stochastic step", min=0, max=2**32 - 1)
    ] = 0,
    alpha: Annotated[float, typer.Option(help="null edge rate per layer")] = 0.05,
    min_explained: Annotated[
        float, typer.Option(help="least cos² between filters joined as redundant (0 = any)")
    ] = 0.5,
    as_json: Annotated[bool, typer.Option("--json", help="print the JSON report")] = False,
    output: Annotated[
        Path | None, typer.Option("-o", "--output", help="also write the JSON report here")
    ] = None,
) -> None:
    """Per-layer calibrated redundancy of a checkpoint (embedded: no server needed)."""
    out = _console()
    err = _console(stderr=True)
    # Imported here: torch is only needed once a checkpoint is actually read.
    from service.ingest import read_checkpoint

    t0 = time.perf_counter()
    try:
        _check_output(output)
        options = _options(alpha=alpha, min_explained=min_explained)
        parsed = read_checkpoint(checkpoint)
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
                methods=_parse_methods(methods),
                seed=seed,
                options=options,
                progress=tick,
            )
    except PruneGraphError as e:
        raise _fail(err, e) from None
    t_total = time.perf_counter() - t0
    text = report.to_json()
    if output is not None:
        try:
            output.write_text(text + "\n")
        except OSError as e:
            raise _fail(err, _output_error(output, e)) from None
    if as_json:
        out.out(text, highlight=False)
    else:
        render_report(report, out)
    err.print(
        f"[dim]read {t_read:.2f} s · analysed {len(report.layers)} groups in "
        f"{t_total - t_read:.2f} s[/]"
    )


@app.callback()
def _root() -> None:
    """prunegraph: graph analytics for redundancy in trained neural networks."""


def main() -> None:
    app()
