"""The manifest model (graphs.manifest): its validation."""

from __future__ import annotations

import json

import pytest

from graphs.manifest import Manifest
from tests.graphs.chain import tiny_manifest


def test_manifest_validation() -> None:
    man, _ = tiny_manifest()
    data = json.loads(man.model_dump_json())
    data["groups"][1]["params"][2]["per_channel"] = 3  # 6 × 3 ≠ 24
    with pytest.raises(ValueError, match="entries"):
        Manifest.model_validate(data)
    data = json.loads(man.model_dump_json())
    data["schema_version"] = "9.0"
    with pytest.raises(ValueError, match="not supported"):
        Manifest.model_validate(data)
