"""The base install (``pip install prunegraph``, no ``server`` extra) is what a training job needs.

Each command runs in a subprocess whose ``sitecustomize`` makes the server extra's packages
unimportable, as on a machine without them: the client, graphs and the embedded CLI work;
``prunegraph serve`` exits 2 and says how to install the extra.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import torch

from prunegraph.cli.serve import INSTALL_HINT, SERVER_PACKAGES
from tests.clients import models

ROOT = Path(__file__).resolve().parents[2]
BLOCKER = """
import importlib.abc
import sys

BLOCKED = {blocked!r}


class NoServerExtra(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
        return None


sys.meta_path.insert(0, NoServerExtra())
"""


def _import_name(requirement: str) -> str:
    """``python-multipart>=0.0.18`` → ``python_multipart``; ``dask[distributed]`` → ``dask``."""
    name = re.split(r"[\[<>=~!; ]", requirement, maxsplit=1)[0]
    return name.lower().replace("-", "_")


@pytest.fixture(scope="module")
def without_server(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """The environment of a subprocess that cannot import the server extra."""
    site = tmp_path_factory.mktemp("no-server-extra")
    (site / "sitecustomize.py").write_text(BLOCKER.format(blocked=sorted(SERVER_PACKAGES)))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return {**env, "PYTHONPATH": f"{site}{os.pathsep}{ROOT}", "OMP_NUM_THREADS": "1"}


def _run(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, *args], env=env, cwd=ROOT, capture_output=True, text=True, timeout=300
    )


def test_the_server_extra_is_what_the_blocker_blocks() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    server = {_import_name(r) for r in project["optional-dependencies"]["server"]}
    base = {_import_name(r) for r in project["dependencies"]}
    assert server <= SERVER_PACKAGES, server - SERVER_PACKAGES
    assert not base & SERVER_PACKAGES, f"the base install pulls {base & SERVER_PACKAGES}"


def test_the_blocker_blocks(without_server: dict[str, str]) -> None:
    for name in ("fastapi", "sqlalchemy", "dask", "uvicorn"):
        res = _run(without_server, "-c", f"import {name}")
        assert res.returncode != 0 and "ModuleNotFoundError" in res.stderr, name


def test_client_and_graphs_import_without_the_server_extra(without_server: dict[str, str]) -> None:
    code = (
        "import clients, graphs, graphs.report, graphs.plan\n"
        "from clients import PruneGraphClient, apply_plan, build_manifest\n"
        "from graphs import analyze\n"
    )
    res = _run(without_server, "-c", code)
    assert res.returncode == 0, res.stderr


def test_embedded_analyze_and_plan_without_the_server_extra(
    without_server: dict[str, str], tmp_path: Path
) -> None:
    torch.manual_seed(0)
    ckpt = tmp_path / "digit_cnn.pt"
    torch.save(models.digit_cnn().state_dict(), ckpt)
    res = _run(without_server, "-m", "prunegraph", "analyze", str(ckpt), "--json")
    assert res.returncode == 0, res.stderr
    assert '"schema_version"' in res.stdout and '"mrp"' in res.stdout
    plan = tmp_path / "plan.json"
    res = _run(
        without_server, "-m", "prunegraph", "plan", str(ckpt), "--target-params", "0.3",
        "-o", str(plan),
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert '"groups"' in plan.read_text()


def test_serve_without_the_server_extra_says_how_to_install_it(
    without_server: dict[str, str], tmp_path: Path
) -> None:
    res = _run(without_server, "-m", "prunegraph", "serve", "--data-dir", str(tmp_path))
    assert res.returncode == 2, res.stderr
    text = " ".join(res.stderr.split())
    assert "server extra" in text and INSTALL_HINT in text and "Traceback" not in text
