"""The ``prunegraph`` command line.

``prunegraph analyze CKPT`` runs embedded: no server is needed. Errors print what is wrong and
what to do on stderr and exit with status 2. Tables and progress are for people (progress and
timings go to stderr); ``--json`` prints the versioned report for machines.

One module per command (:mod:`.analyze`, :mod:`.plan`, :mod:`.check`, :mod:`.manifest`,
:mod:`.serve`); what they share: :mod:`.console` (output, errors), :mod:`.options` (flags and
their parsing), :mod:`.inputs` (the embedded inputs), :mod:`.render` (tables),
:mod:`.compensation` (activations files, sidecars) and :mod:`.remote` (``--server``: the client).
"""

from __future__ import annotations

import typer

from prunegraph.cli.analyze import analyze_cmd
from prunegraph.cli.check import CHECK_HELP, check_cmd
from prunegraph.cli.manifest import manifest_cmd
from prunegraph.cli.plan import plan_cmd
from prunegraph.cli.serve import serve_cmd

app = typer.Typer(
    name="prunegraph",
    help="Find and remove redundancy in trained neural networks.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
app.command("analyze")(analyze_cmd)
app.command("plan")(plan_cmd)
app.command("check", help=CHECK_HELP)(check_cmd)
app.command("manifest")(manifest_cmd)
app.command("serve")(serve_cmd)


@app.callback()
def _root() -> None:
    """prunegraph: graph analytics for redundancy in trained neural networks."""


def main() -> None:
    """The console script ``prunegraph``."""
    app()
