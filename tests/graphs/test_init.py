"""The package surface (graphs/__init__.py): every public name resolves, and importing the light
modules (models, contracts) does not import the methods' heavy dependencies."""

from __future__ import annotations

import importlib
import json
import subprocess
import sys

import pytest

import graphs

HEAVY = ("igraph", "leidenalg", "hypernetx", "scipy", "torch")
LIGHT = (
    "graphs",
    "graphs.report",
    "graphs.plan",
    "graphs.manifest",
    "graphs.options",
    "graphs.errors",
    "graphs.contracts.jobs",
    "graphs.contracts.activations",
)


@pytest.mark.parametrize("module", LIGHT)
def test_light_modules_import_no_heavy_dependency(module: str) -> None:
    code = (
        f"import json, sys, {module}\n"
        f"print(json.dumps(sorted(m for m in {HEAVY!r} if m in sys.modules)))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    )
    assert json.loads(out.stdout) == []


def test_every_public_name_resolves_to_its_definition() -> None:
    for name in graphs.__all__:
        value = getattr(graphs, name)
        home = getattr(value, "__module__", None) if not isinstance(value, str) else None
        if home is None:
            assert value == importlib.import_module("graphs.report").SCHEMA_VERSION, name
        else:
            assert home.startswith("graphs."), name
            assert getattr(importlib.import_module(home), name) is value, name
    assert set(graphs.__all__) <= set(dir(graphs))


def test_an_unknown_name_is_an_attribute_error() -> None:
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        graphs.nope  # noqa: B018
    with pytest.raises(ImportError):
        from graphs import nope  # noqa: F401


def test_functions_named_like_their_module_stay_functions() -> None:
    code = (
        "import graphs.mrp, graphs.analyze\n"
        "import graphs\n"
        "from graphs import mrp, analyze, hsc, srr\n"
        "assert all(callable(f) and not isinstance(f, type(graphs)) "
        "for f in (mrp, analyze, hsc, srr, graphs.mrp, graphs.analyze)), (mrp, analyze)\n"
        "assert graphs.mrp is mrp and mrp.__module__ == 'graphs.mrp'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
