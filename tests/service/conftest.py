"""Fixtures of the service tests: ONNX models with dynamic dims, exported once per module."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.service.onnx_models import MODELS, export


@pytest.fixture(scope="module", params=[True, False], ids=["folded", "unfolded"])
def exported(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("onnx-folded" if request.param else "onnx-unfolded")
    return {n: export(n, request.param, folder / f"{n}.onnx") for n in MODELS}
