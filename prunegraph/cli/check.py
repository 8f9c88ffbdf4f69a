"""``prunegraph check``: the CI gate on model bloat (the checks are :mod:`prunegraph.gate`)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Annotated

import typer
from pydantic import ValidationError
from rich.console import Console

from graphs import AnalysisOptions, InvalidInputError, PruneGraphError, Report
from graphs.options import check_features
from prunegraph.cli.analyze import analyze_here
from prunegraph.cli.console import fail, make_console, output_error, print_notes
from prunegraph.cli.options import (
    ActivationsOpt,
    InputShapeOpt,
    SeedOpt,
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
from prunegraph.gate import CheckConfig, CheckResult

CHECK_HELP = (
    "Fail a build on model bloat: exit 0 within the thresholds, 1 beyond, 2 on bad input."
    "\n\nThe model's redundancy (--max-redundancy, --max-growth) is the fraction of the model "
    "that removing every layer's redundant channels would remove: their rows, biases and norm "
    "entries and the next layers' input slices, each parameter once; of FLOPs when a manifest "
    "gives them, else of parameters; classifier outputs are kept. A failure names the layers "
    "whose redundant channels remove the most. (Reports before schema 1.1 held a params-weighted "
    "mean of the layers' redundancy instead, which a large non-redundant layer diluted: analyse "
    "them again.)\n\nPer-layer limits (--max-layer-redundancy, --layer-max) apply to each "
    "layer's own redundancy: the fraction of its filters that are redundant."
)


def report_of(
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
    head = existing(path).open("rb").read(1)
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
        from prunegraph.cli.remote import remote_report

        report = remote_report(
            server, token, path, methods=methods, seed=seed, options=options,
            manifest=load_manifest(manifest), activations=activations,
            progress=err.is_terminal, input_shape=input_shapes(input_shape, manifest),
        )  # fmt: skip
        print_notes(report.notes, err)
        return report
    report, _ = analyze_here(path, manifest, activations, methods, seed, options, err, input_shape)
    print_notes(report.notes, err)
    return report


def gate_config(
    config: Path | None,
    flags: Mapping[str, object],
    layer_max: list[str] | None,
) -> CheckConfig:
    """The thresholds: ``--config`` (or the nearest pyproject.toml) overridden by the flags."""
    from prunegraph.gate import find_config, parse_config, parse_layer_max

    if config is not None:
        try:
            import tomllib

            data = tomllib.loads(existing(config).read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise InvalidInputError(f"cannot read {config}: {e}", hint="Fix it.") from None
        cfg = parse_config(data.get("tool", {}).get("prunegraph", {}).get("check", {}),
                           str(config))  # fmt: skip
    else:
        cfg, _ = find_config(Path.cwd())
    updates: dict[str, object] = {k: v for k, v in flags.items() if v is not None}
    if layer_max:
        updates["layer_max"] = {**cfg.layer_max, **parse_layer_max(layer_max)}
    return parse_config({**cfg.model_dump(), **updates}, "the command line")


def print_result(result: CheckResult, as_json: bool, out: Console) -> None:
    """Each check with pass/FAIL and the verdict (or the result as JSON)."""
    if as_json:
        out.out(result.model_dump_json(indent=2), highlight=False)
        return
    for c in result.checks:
        mark = "[green]pass[/]" if c.passed else "[bold red]FAIL[/]"
        out.print(f"{mark} {c.message}", highlight=False)
    verdict = "[green]passed[/]" if result.passed else "[bold red]failed[/]"
    out.print(f"prunegraph check {verdict}: {sum(c.passed for c in result.checks)} of "
              f"{len(result.checks)} checks within their limits")  # fmt: skip


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
    seed: SeedOpt = 0,
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
    from prunegraph.gate import evaluate, junit_xml

    out = make_console()
    err = make_console(stderr=True)
    try:
        flags = {
            "method": method, "max_redundancy": max_redundancy,
            "max_layer_redundancy": max_layer_redundancy, "max_growth": max_growth,
        }  # fmt: skip
        cfg = gate_config(config, flags, layer_max)
        if cfg.max_growth is not None and baseline is None:
            raise InvalidInputError("--max-growth needs --baseline", hint="Pass an earlier report.")
        options = analysis_options(vectors=choose_vectors(vectors, activations))
        check_features([cfg.method], options, maps_given(activations))
        kw = dict(manifest=manifest, activations=activations, methods=[cfg.method], seed=seed,
                  options=options, server=server, token=token, err=err,
                  input_shape=input_shape)  # fmt: skip
        report = report_of(checkpoint, **kw)  # type: ignore[arg-type]
        base = report_of(baseline, **kw) if baseline is not None else None  # type: ignore[arg-type]
        result = evaluate(report, cfg, base)
        if junit is not None:
            try:
                junit.write_text(junit_xml(result), encoding="utf-8")
            except OSError as e:
                raise output_error(junit, e) from None
    except PruneGraphError as e:
        raise fail(err, e) from None
    print_result(result, as_json, out)
    raise typer.Exit(code=0 if result.passed else 1)
