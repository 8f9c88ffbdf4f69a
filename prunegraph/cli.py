"""The ``prunegraph`` command line.

``prunegraph analyze CKPT`` runs embedded: no server is needed. Errors print what is wrong and
what to do on stderr and exit with status 2. Tables and progress are for people (progress and
timings go to stderr); ``--json`` prints the versioned report for machines.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from pydantic import ValidationError
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from graphs import AnalysisOptions, InvalidInputError, PruneGraphError, Report, analyze
from graphs.analyze import check_features, check_methods
from graphs.features import Activations
from graphs.functional import DEFAULT_EPSILON
from graphs.manifest import Manifest
from graphs.plan import PLAN_METHODS, Constraints, PruningPlan, Target

if TYPE_CHECKING:
    from service.ingest import ParsedCheckpoint
from graphs.report import ALL_METHODS, LayerReport, MethodResult
from prunegraph import compensation as comp

FOLD_WORDS = (("least_squares", "least-squares"), ("mean", "mean"), ("merge", "merge"))
"""How the plan table names each kind of fold (graphs.fold.ConsumerFold.kind)."""

app = typer.Typer(
    name="prunegraph",
    help="Find and remove redundancy in trained neural networks.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _fail(console: Console, err: PruneGraphError) -> typer.Exit:
    console.print(f"[bold red]error:[/] {escape(err.message)}", highlight=False, markup=True)
    console.print(f"[yellow]what to do:[/] {escape(err.hint)}", highlight=False)
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
    functional = any(layer.functional is not None for layer in report.layers)
    if functional:
        table.add_column("functional", justify="right", no_wrap=True)
    for layer in report.layers:
        f = layer.functional
        cell = [] if not functional else ["—" if f is None else f"{f.redundancy:.3f}"]
        table.add_row(*_layer_row(layer, report.methods), *cell)
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
        rm = ms.removable
        gone = (
            ""
            if rm is None
            else f"removable {rm.params:.3f} of params"
            + (f", {rm.flops:.3f} of FLOPs; " if rm.flops is not None else "; ")
        )
        console.print(
            f"  {m}: {gone}params-weighted redundancy {ms.redundancy_params_weighted:.3f}; "
            f"most redundant: {worst}"
        )


def _console(*, stderr: bool = False) -> Console:
    """A console that does not squeeze tables to 80 columns when output is piped."""
    console = Console(stderr=stderr)
    if not console.is_terminal:
        console = Console(stderr=stderr, width=200)
    return console


def _vectors(vectors: str, activations: Path | None) -> str:
    """``--vectors auto``: the feature maps when they are given (they find far more redundancy
    than weights, benchmarks/RESULTS.md, issue 7), else the weights."""
    if vectors != "auto":
        return vectors
    return "activations" if activations is not None and comp.has_maps(activations) else "weights"


def _maps_given(activations: Path | None) -> Activations | None:
    """What ``check_features`` needs to know: whether feature maps were given."""
    return {} if activations is not None and comp.has_maps(activations) else None


def _options(**values: float | str) -> AnalysisOptions:
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


def _emit(
    text: str,
    output: Path | None,
    as_json: bool,
    render: Callable[[], None],
    out: Console,
    err: Console,
) -> None:
    """Write the JSON to ``-o`` if given, then print it (--json) or the table for people."""
    if output is not None:
        try:
            output.write_text(text + "\n")
        except OSError as e:
            raise _fail(err, _output_error(output, e)) from None
    if as_json:
        out.out(text, highlight=False)
    else:
        render()


def _check_output(path: Path | None) -> None:
    """Fail before any work when the report could not be written."""
    if path is None:
        return
    parent = path.parent if str(path.parent) else Path(".")
    if path.is_dir() or not parent.is_dir() or not os.access(parent, os.W_OK):
        raise _output_error(path, OSError(0, "no such writable file location"))


def _load_manifest(path: Path | None) -> Manifest | None:
    if path is None:
        return None
    try:
        return Manifest.model_validate_json(path.read_bytes())
    except OSError as e:
        raise InvalidInputError(
            f"cannot read the manifest {path}: {e.strerror or e}", hint="Check the path."
        ) from None
    except ValidationError as e:
        first = e.errors()[0]
        raise InvalidInputError(
            f"{path} is not a valid prunegraph manifest: {first['msg']} at "
            f"{'.'.join(map(str, first['loc'])) or 'top level'}",
            hint="Build one with `prunegraph manifest --model pkg.module:factory "
            "--input-shape 1,3,224,224 -o manifest.json`.",
        ) from None


def _input_shapes(text: str | None, manifest: Path | None) -> list[list[int]] | None:
    """``--input-shape`` parsed (inputs separated by ';'); None when not given."""
    if text is None:
        return None
    if manifest is not None:
        raise InvalidInputError(
            "--input-shape and --manifest both give shapes", hint="Pass only one of them."
        )
    from service.onnx_shapes import parse_input_shapes

    return parse_input_shapes(text)


def _notes(notes: list[str], err: Console) -> None:
    for note in notes:
        err.print(f"[yellow]note:[/] {escape(note)}", highlight=False)


def _read_inputs(
    checkpoint: Path, manifest: Path | None, input_shape: str | None
) -> tuple[ParsedCheckpoint, Manifest | None, list[str]]:
    """The checkpoint, its manifest (the given file, or for ONNX the one its graph gives) and
    notes on what is missing (for stderr; ONNX with symbolic shapes has no manifest).

    Imported here: torch is only needed once a checkpoint is actually read.
    """
    from service.ingest import derived_manifest, read_checkpoint

    shapes = _input_shapes(input_shape, manifest)
    man = _load_manifest(manifest)
    parsed = read_checkpoint(checkpoint)
    notes: list[str] = []
    if man is None:
        man, notes = derived_manifest(checkpoint, parsed, input_shapes=shapes)
    return parsed, man, notes


def _existing(path: Path) -> Path:
    """A file to read or upload; refused before any work when it is not there."""
    if not path.is_file():
        raise InvalidInputError(f"{path} not found or not a file", hint="Check the path.")
    return path


def _parse_methods(methods: str) -> list[str]:
    return [m.strip() for m in methods.split(",") if m.strip()]


ServerOpt = Annotated[
    str | None,
    typer.Option(
        help="URL of a prunegraph service to compute on (same output as embedded)",
        envvar="PRUNEGRAPH_SERVER",
    ),
]
AlphaOpt = Annotated[float, typer.Option(help="null edge rate per layer")]
MinExplainedOpt = Annotated[
    float, typer.Option(help="least cos² between filters joined as redundant (0 = any)")
]
ManifestOpt = Annotated[Path | None, typer.Option(help="manifest JSON: coupling groups and FLOPs")]
ActivationsOpt = Annotated[
    Path | None,
    typer.Option(
        help="feature maps (clients.capture_activations(...).save): for ci and --vectors "
        "activations"
    ),
]
VectorsOpt = Annotated[
    str,
    typer.Option(
        help="what the graph methods compare: weights, activations, or auto (activations when "
        "--activations is given, else weights)"
    ),
]
EpsilonOpt = Annotated[
    float,
    typer.Option(
        help="functional redundancy: the relative consumer-output error allowed (with "
        "second-moment statistics in --activations)",
        min=0.0,
    ),
]
TokenOpt = Annotated[
    str | None,
    typer.Option(help="bearer token for --server", envvar="PRUNEGRAPH_TOKEN", show_default=False),
]
InputShapeOpt = Annotated[
    str | None,
    typer.Option(
        help="ONNX: the input shape that makes symbolic dims concrete, for FLOPs and a manifest, "
        "e.g. 1,3,64,256 (inputs separated by ';')",
        show_default=False,
    ),
]


def _analyze_here(
    checkpoint: Path,
    manifest: Path | None,
    activations: Path | None,
    methods: list[str],
    seed: int,
    options: AnalysisOptions,
    err: Console,
    input_shape: str | None = None,
    epsilon: float = DEFAULT_EPSILON,
) -> tuple[Report, float]:
    """Embedded analysis with a progress bar on stderr; returns the report and the read time."""
    t0 = time.perf_counter()
    parsed, man, notes = _read_inputs(checkpoint, manifest, input_shape)
    acts, stats = comp.checked(comp.read_capture(activations), parsed)
    stats = comp.usable_stats(stats, man, "analysed", err)
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
            activations=acts,
        )
    report = comp.add_functional(report, parsed, man, stats, epsilon)
    if notes:
        report = report.model_copy(update={"notes": notes})
    return report, t_read


@app.command("analyze")
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
    server: ServerOpt = None,
    token: TokenOpt = None,
) -> None:
    """Per-layer calibrated redundancy of a checkpoint (embedded, or on a service: --server)."""
    out = _console()
    err = _console(stderr=True)
    t0 = time.perf_counter()
    try:
        _check_output(output)
        options = _options(
            alpha=alpha, min_explained=min_explained, vectors=_vectors(vectors, activations)
        )
        chosen = check_methods(_parse_methods(methods))
        check_features(chosen, options, _maps_given(activations))
        if server is not None:
            from prunegraph.remote import remote_report

            report = remote_report(
                server,
                token,
                _existing(checkpoint),
                methods=chosen,
                seed=seed,
                options=options,
                manifest=_load_manifest(manifest),
                activations=_existing(activations) if activations is not None else None,
                progress=err.is_terminal,
                input_shape=_input_shapes(input_shape, manifest),
                epsilon=epsilon,
            )
            _emit(report.to_json(), output, as_json, lambda: render_report(report, out), out, err)
            _notes(report.notes, err)
            err.print(f"[dim]analysed on {server} in {time.perf_counter() - t0:.2f} s[/]")
            return
        report, t_read = _analyze_here(
            checkpoint, manifest, activations, chosen, seed, options, err, input_shape, epsilon
        )
    except PruneGraphError as e:
        raise _fail(err, e) from None
    t_total = time.perf_counter() - t0
    _emit(report.to_json(), output, as_json, lambda: render_report(report, out), out, err)
    _notes(report.notes, err)
    err.print(
        f"[dim]read {t_read:.2f} s · analysed {len(report.layers)} groups in "
        f"{t_total - t_read:.2f} s[/]"
    )


def render_plan(plan: PruningPlan, console: Console) -> None:
    """Per-group before → after table with the method's rationale, then the totals."""
    table = Table(title=f"prunegraph plan · {plan.method} · target {plan.target.kind} "
                  f"{plan.target.ratio:.0%} · coupling {plan.coupling}")  # fmt: skip
    extra_cols = comp.plan_columns(plan)
    for col in ("group", "layers", "channels", "removed", *extra_cols, "rationale"):
        table.add_column(col, no_wrap=col != "rationale")
    for g in plan.groups:
        extra = f" (+{len(g.producers) - 1})" if len(g.producers) > 1 else ""
        table.add_row(
            f"{g.name}{extra}",
            str(len(g.producers)),
            f"{g.channels_before} → {g.channels_after}",
            str(len(g.remove)),
            *comp.plan_cells(plan, g.id),
            g.rationale,
        )
    console.print(table)
    console.print(
        f"params {plan.params_before:,} → {plan.params_after:,} "
        f"(−{plan.achieved['params']:.1%})"
        + (
            f" · FLOPs (MACs) {plan.flops_before:,} → {plan.flops_after:,} "
            f"(−{plan.achieved['flops']:.1%})"
            if plan.flops_before is not None and plan.flops_after is not None
            else " · FLOPs unknown (no manifest)"
        )
    )
    console.print(f"rule: {plan.rule}", highlight=False)
    if plan.compensation is not None:
        total = sum(g.predicted_error or 0.0 for g in plan.groups)
        kinds = [f.kind for f in plan.compensation.folds]
        folds = ", ".join(f"{kinds.count(k)} {word} folds" for k, word in FOLD_WORDS if k in kinds)
        console.print(
            f"compensation: {folds}; predicted "
            f"relative consumer-output error summed over groups {total:.3g}",
            highlight=False,
        )


@app.command("plan")
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
    seed: Annotated[int, typer.Option(min=0, max=2**32 - 1)] = 0,
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
    fallback: Annotated[
        str,
        typer.Option(
            help="mrp/srr/hsc once no layer is redundant: uniform (one uniform ratio) or "
            "anneal (first go on at softer calibrated levels; measured worse, see "
            "benchmarks/RESULTS.md)"
        ),
    ] = "uniform",
    input_shape: InputShapeOpt = None,
    compensation: Annotated[
        bool,
        typer.Option(
            help="with second-moment statistics in --activations (and a manifest): fold the "
            "removed channels into the kept ones by least squares (the sidecar goes next to "
            "-o as <stem>.fold.safetensors); --no-compensation: the same channels, no folds"
        ),
    ] = True,
    allocation: Annotated[
        str | None, typer.Option(help=comp.ALLOCATION_HELP, show_default=False)
    ] = None,
    epsilon: EpsilonOpt = DEFAULT_EPSILON,
    server: ServerOpt = None,
    token: TokenOpt = None,
) -> None:
    """A pruning plan that reaches a FLOPs or params target (embedded, or --server)."""
    from graphs.error_allocation import ALLOCATION_RULES
    from graphs.planner import plan_layers

    out = _console()
    err = _console(stderr=True)
    t0 = time.perf_counter()
    try:
        _check_output(output)
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
        if method not in PLAN_METHODS:
            raise InvalidInputError(
                f"unknown method {method!r}", hint=f"Choose one of {', '.join(PLAN_METHODS)}."
            )
        if allocation is not None and allocation not in ALLOCATION_RULES:
            raise InvalidInputError(
                f"unknown allocation {allocation!r}",
                hint=f"Choose one of {', '.join(ALLOCATION_RULES)}.",
            )
        options = _options(
            alpha=alpha,
            min_explained=min_explained,
            vectors=_vectors(vectors, activations),
            fallback=fallback,
        )
        check_features([method], options, _maps_given(activations))
        if server is not None:
            from prunegraph.remote import remote_plan

            plan = remote_plan(
                server,
                token,
                _existing(checkpoint),
                method=method,
                target=target,
                seed=seed,
                step=step,
                constraints=constraints,
                options=options,
                manifest=_load_manifest(manifest),
                activations=_existing(activations) if activations is not None else None,
                progress=err.is_terminal,
                input_shape=_input_shapes(input_shape, manifest),
                compensation=compensation,
                allocation=allocation,
                epsilon=epsilon,
            )
            _emit(plan.to_json(), output, as_json, lambda: render_plan(plan, out), out, err)
            comp.write_sidecar(plan, output, err)
            err.print(f"[dim]planned on {server} in {time.perf_counter() - t0:.2f} s[/]")
            return
        parsed, man, notes = _read_inputs(checkpoint, manifest, input_shape)
        _notes(notes, err)
        acts, stats = comp.checked(comp.read_capture(activations), parsed)
        plan = plan_layers(
            parsed.layers,
            method=method,
            target=target,
            params_total=parsed.info.n_params,
            manifest=man,
            constraints=constraints,
            options=options,
            step=step,
            seed=seed,
            checkpoint_sha256=parsed.info.sha256,
            activations=acts,
            stats=comp.usable_stats(stats, man, "planned", err),
            compensation=compensation,
            allocation=allocation,
            epsilon=epsilon,
        )
        _emit(plan.to_json(), output, as_json, lambda: render_plan(plan, out), out, err)
        comp.write_sidecar(plan, output, err)
    except PruneGraphError as e:
        raise _fail(err, e) from None
    err.print(f"[dim]planned in {time.perf_counter() - t0:.2f} s[/]")


def _report_of(
    path: Path,
    *,
    manifest: Path | None,
    activations: Path | None,
    methods: list[str],
    seed: int,
    options: AnalysisOptions,
    server: str | None,
    token: str | None,
    err: Console,
    input_shape: str | None = None,
) -> Report:
    """A report JSON as it is, or the report of a checkpoint (embedded or on ``server``)."""
    head = _existing(path).open("rb").read(1)
    if head == b"{":  # a checkpoint never starts with "{": a report
        try:
            return Report.model_validate_json(path.read_bytes())
        except ValidationError:
            if path.suffix == ".json":
                raise InvalidInputError(
                    f"{path} is not a prunegraph report",
                    hint="Pass a checkpoint, or a report written by `prunegraph analyze -o`.",
                ) from None
    if server is not None:
        from prunegraph.remote import remote_report

        report = remote_report(
            server, token, path, methods=methods, seed=seed, options=options,
            manifest=_load_manifest(manifest), activations=activations,
            progress=err.is_terminal, input_shape=_input_shapes(input_shape, manifest),
        )  # fmt: skip
        _notes(report.notes, err)
        return report
    report, _ = _analyze_here(path, manifest, activations, methods, seed, options, err, input_shape)
    _notes(report.notes, err)
    return report


@app.command(
    "check",
    help="Fail a build on model bloat: exit 0 within the thresholds, 1 beyond, 2 on bad input."
    "\n\nThe model's redundancy (--max-redundancy, --max-growth) is the fraction of the model "
    "that removing every layer's redundant channels would remove: their rows, biases and norm "
    "entries and the next layers' input slices, each parameter once; of FLOPs when a manifest "
    "gives them, else of parameters; classifier outputs are kept. A failure names the layers "
    "whose redundant channels remove the most. (Reports before schema 1.1 held a params-weighted "
    "mean of the layers' redundancy instead, which a large non-redundant layer diluted: analyse "
    "them again.)\n\nPer-layer limits (--max-layer-redundancy, --layer-max) apply to each "
    "layer's own redundancy: the fraction of its filters that are redundant.",
)
def check_cmd(
    checkpoint: Annotated[
        Path, typer.Argument(help="checkpoint (.pt/.pth, .safetensors, ONNX) or a report JSON")
    ],
    max_redundancy: Annotated[
        float | None,
        typer.Option(
            help="limit on the model's redundancy: the fraction of its FLOPs (with a manifest; "
            "else of its parameters) that removing the redundant channels would remove"
        ),
    ] = None,
    max_layer_redundancy: Annotated[
        float | None, typer.Option(help="limit on every layer's redundancy")
    ] = None,
    layer_max: Annotated[
        list[str] | None,
        typer.Option(help="PATTERN=LIMIT per layer, e.g. 'features.*=0.5' (repeatable)"),
    ] = None,
    baseline: Annotated[
        Path | None, typer.Option(help="earlier report JSON (or checkpoint) to compare with")
    ] = None,
    max_growth: Annotated[
        float | None, typer.Option(help="limit on the growth since --baseline")
    ] = None,
    method: Annotated[str | None, typer.Option(help="mrp (default), srr or hsc")] = None,
    manifest: Annotated[
        Path | None, typer.Option(help="manifest JSON: coupling and FLOPs weighting")
    ] = None,
    activations: ActivationsOpt = None,
    vectors: VectorsOpt = "auto",
    seed: Annotated[int, typer.Option(min=0, max=2**32 - 1)] = 0,
    config: Annotated[
        Path | None,
        typer.Option(help="pyproject.toml with [tool.prunegraph.check] (default: nearest)"),
    ] = None,
    junit: Annotated[Path | None, typer.Option(help="write JUnit XML here")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print the result as JSON")] = False,
    input_shape: InputShapeOpt = None,
    server: ServerOpt = None,
    token: TokenOpt = None,
) -> None:
    """Fail a build on model bloat: exit 0 within the thresholds, 1 beyond, 2 on bad input."""
    from prunegraph.check import evaluate, find_config, junit_xml, parse_config, parse_layer_max

    out = _console()
    err = _console(stderr=True)
    try:
        if config is not None:
            try:
                import tomllib

                data = tomllib.loads(_existing(config).read_text(encoding="utf-8"))
            except (OSError, ValueError) as e:
                raise InvalidInputError(f"cannot read {config}: {e}", hint="Fix it.") from None
            cfg = parse_config(data.get("tool", {}).get("prunegraph", {}).get("check", {}),
                               str(config))  # fmt: skip
        else:
            cfg, _ = find_config(Path.cwd())
        flags = {
            "method": method, "max_redundancy": max_redundancy,
            "max_layer_redundancy": max_layer_redundancy, "max_growth": max_growth,
        }  # fmt: skip
        updates: dict[str, object] = {k: v for k, v in flags.items() if v is not None}
        if layer_max:
            updates["layer_max"] = {**cfg.layer_max, **parse_layer_max(layer_max)}
        cfg = parse_config({**cfg.model_dump(), **updates}, "the command line")
        if cfg.max_growth is not None and baseline is None:
            raise InvalidInputError("--max-growth needs --baseline", hint="Pass an earlier report.")
        options = _options(vectors=_vectors(vectors, activations))
        check_features([cfg.method], options, _maps_given(activations))
        kw = dict(manifest=manifest, activations=activations, methods=[cfg.method], seed=seed,
                  options=options, server=server, token=token, err=err,
                  input_shape=input_shape)  # fmt: skip
        report = _report_of(checkpoint, **kw)  # type: ignore[arg-type]
        base = _report_of(baseline, **kw) if baseline is not None else None  # type: ignore[arg-type]
        result = evaluate(report, cfg, base)
        if junit is not None:
            try:
                junit.write_text(junit_xml(result), encoding="utf-8")
            except OSError as e:
                raise _output_error(junit, e) from None
    except PruneGraphError as e:
        raise _fail(err, e) from None
    if as_json:
        out.out(result.model_dump_json(indent=2), highlight=False)
    else:
        for c in result.checks:
            mark = "[green]pass[/]" if c.passed else "[bold red]FAIL[/]"
            out.print(f"{mark} {c.message}", highlight=False)
        verdict = "[green]passed[/]" if result.passed else "[bold red]failed[/]"
        out.print(f"prunegraph check {verdict}: {sum(c.passed for c in result.checks)} of "
                  f"{len(result.checks)} checks within their limits")  # fmt: skip
    raise typer.Exit(code=0 if result.passed else 1)


@app.command("manifest")
def manifest_cmd(
    model: Annotated[str, typer.Option(help="importable factory, pkg.module:function")],
    input_shape: Annotated[str, typer.Option(help="example input shape, e.g. 1,3,224,224")],
    output: Annotated[Path, typer.Option("-o", "--output", help="write the manifest here")],
) -> None:
    """Build a manifest (coupling groups, output sizes, MACs) from a model factory."""
    err = _console(stderr=True)
    try:
        _check_output(output)
        try:
            shape = tuple(int(x) for x in input_shape.split(","))
        except ValueError:
            raise InvalidInputError(
                f"--input-shape {input_shape!r} is not a comma-separated list of integers",
                hint="For example --input-shape 1,3,224,224.",
            ) from None
        from clients.manifest import manifest_from_factory

        if os.getcwd() not in sys.path:  # like uvicorn: factories in the current folder import
            sys.path.insert(0, os.getcwd())

        try:
            man = manifest_from_factory(model, shape)
        except (ImportError, AttributeError, ValueError, RuntimeError, TypeError) as e:
            raise InvalidInputError(
                f"cannot build the model {model!r}: {e}",
                hint="Pass --model as pkg.module:factory, importable from here, and an input "
                "shape the model accepts.",
            ) from None
        output.write_text(man.model_dump_json(indent=2) + "\n")
    except PruneGraphError as e:
        raise _fail(err, e) from None
    err.print(f"manifest: {len(man.groups)} channel groups, {man.macs_total:,} MACs → {output}")


@app.command("serve")
def serve_cmd(
    host: Annotated[str, typer.Option(help="address to listen on")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="port to listen on", min=1, max=65535)] = 8000,
    data_dir: Annotated[
        Path | None, typer.Option(help="checkpoints and the SQLite database (PRUNEGRAPH_DATA_DIR)")
    ] = None,
    workers: Annotated[
        int | None, typer.Option(help="analysis worker processes (PRUNEGRAPH_WORKERS)", min=1)
    ] = None,
    dask_scheduler: Annotated[
        str | None,
        typer.Option(
            help="run the per-layer analysis on this Dask cluster, e.g. tcp://127.0.0.1:8786; "
            "its workers must share the data dir (PRUNEGRAPH_DASK_SCHEDULER)",
            show_default=False,
        ),
    ] = None,
    demo: Annotated[
        Path | None,
        typer.Option(help="once serving, upload this checkpoint and analyse it as a demo job"),
    ] = None,
) -> None:
    """Run the HTTP service; settings come from PRUNEGRAPH_* and these flags."""
    import uvicorn

    from service.app import create_app
    from service.settings import Settings

    overrides: dict[str, object] = {}
    if data_dir is not None:
        overrides["data_dir"] = data_dir
    if workers is not None:
        overrides["workers"] = workers
    if dask_scheduler is not None:
        overrides["dask_scheduler"] = dask_scheduler
    try:
        settings = Settings(**overrides)  # type: ignore[arg-type]
        settings.token_users()  # a malformed token list is a usage error, before listening
    except (ValidationError, ValueError) as e:
        raise _fail(_console(stderr=True), InvalidInputError(str(e), hint="Check PRUNEGRAPH_* "
                    "and the command's options.")) from None  # fmt: skip
    url = f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{port}"
    err = _console(stderr=True)
    err.print(f"prunegraph serving on {url} (API docs at {url}/docs)", highlight=False)
    if settings.dask_scheduler:
        err.print(f"per-layer analysis runs on the Dask cluster {settings.dask_scheduler}",
                  highlight=False)  # fmt: skip
    if demo is not None and not demo.is_file():
        err.print(f"[yellow]demo skipped:[/] {demo} not found", highlight=False)
    elif demo is not None:
        from prunegraph.demo import start_demo

        start_demo(url, demo, next(iter(settings.token_users()), None), err)
    uvicorn.run(create_app(settings), host=host, port=port, log_level="warning")


@app.callback()
def _root() -> None:
    """prunegraph: graph analytics for redundancy in trained neural networks."""


def main() -> None:
    app()
