"""The package surface: ``import clients`` for HTTP use imports no torch (PEP 562 names)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

import clients

ROOT = Path(__file__).resolve().parents[2]


def run(code: str) -> str:
    """Run ``code`` in a fresh interpreter at the repository root; returns its stdout."""
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_the_http_client_imports_no_torch() -> None:
    out = run(
        "import sys, clients\n"
        "from clients import ClientError, JobStatus, PruneGraphClient\n"
        "client = clients.PruneGraphClient('http://127.0.0.1:1')\n"
        "client.close()\n"
        "print(sorted(m for m in ('torch', 'torch_pruning') if m in sys.modules))"
    )
    assert out == "[]"


def test_a_torch_function_is_imported_when_used() -> None:
    out = run(
        "import sys, clients\n"
        "before = 'torch' in sys.modules\n"
        "from clients.manifest import build_manifest\n"
        "print(before, clients.build_manifest is build_manifest, 'torch' in sys.modules)"
    )
    assert out == "False True True"


def test_every_public_name_resolves() -> None:
    assert set(clients.__all__) <= set(dir(clients))
    for name in clients.__all__:
        obj = getattr(clients, name)
        assert getattr(obj, "__name__", name) == name
    with pytest.raises(AttributeError, match="no attribute 'nothing_here'"):
        clients.nothing_here  # noqa: B018


def test_no_module_shadows_a_public_name() -> None:
    """A submodule named like a public function (``clients.refit``) would replace it once
    imported: the lazy names must stay what they are whatever was imported first."""
    out = run(
        "import importlib, pkgutil, types, clients\n"
        "for m in pkgutil.iter_modules(clients.__path__):\n"
        "    importlib.import_module('clients.' + m.name)\n"
        "print([n for n in clients.__all__ if isinstance(getattr(clients, n), types.ModuleType)])"
    )
    assert out == "[]"
