"""How every command talks to people: consoles, errors (exit 2), notes and the JSON/table output.

Errors print what is wrong and what to do on stderr and exit with status 2. Tables are for
people; ``--json`` prints the versioned model for machines; ``-o`` also writes it to a file.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape

from graphs import PruneGraphError


def make_console(*, stderr: bool = False) -> Console:
    """A console that does not squeeze tables to 80 columns when output is piped."""
    console = Console(stderr=stderr)
    if not console.is_terminal:
        console = Console(stderr=stderr, width=200)
    return console


def fail(console: Console, err: PruneGraphError) -> typer.Exit:
    """Print the error and what to do; the exit (status 2) for the caller to raise."""
    console.print(f"[bold red]error:[/] {escape(err.message)}", highlight=False, markup=True)
    console.print(f"[yellow]what to do:[/] {escape(err.hint)}", highlight=False)
    return typer.Exit(code=2)


def print_notes(notes: list[str], err: Console) -> None:
    """A report's notes (e.g. what an ONNX model without shapes lacks), on stderr."""
    for note in notes:
        err.print(f"[yellow]note:[/] {escape(note)}", highlight=False)


def output_error(path: Path, e: OSError) -> PruneGraphError:
    """The error of an output file that cannot be written."""
    return PruneGraphError(
        f"cannot write the report to {path}: {e.strerror or e}",
        hint="Pass -o a path in an existing, writable directory.",
    )


def check_output(path: Path | None) -> None:
    """Fail before any work when the report could not be written."""
    if path is None:
        return
    parent = path.parent if str(path.parent) else Path(".")
    if path.is_dir() or not parent.is_dir() or not os.access(parent, os.W_OK):
        raise output_error(path, OSError(0, "no such writable file location"))


def emit(
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
            raise fail(err, output_error(output, e)) from None
    if as_json:
        out.out(text, highlight=False)
    else:
        render()
