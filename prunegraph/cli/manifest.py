"""``prunegraph manifest``: coupling groups, output sizes and MACs from a model factory."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated

import typer

from graphs import InvalidInputError, PruneGraphError
from prunegraph.cli.console import check_output, fail, make_console


def manifest_cmd(
    model: Annotated[str, typer.Option(help="importable factory, pkg.module:function")],
    input_shape: Annotated[str, typer.Option(help="example input shape, e.g. 1,3,224,224")],
    output: Annotated[Path, typer.Option("-o", "--output", help="write the manifest here")],
) -> None:
    """Build a manifest (coupling groups, output sizes, MACs) from a model factory."""
    err = make_console(stderr=True)
    try:
        check_output(output)
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
        raise fail(err, e) from None
    err.print(f"manifest: {len(man.groups)} channel groups, {man.macs_total:,} MACs → {output}")
