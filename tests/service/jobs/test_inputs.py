"""The one loader of a job's inputs (service.jobs.inputs): the same objects as the readers it
stands for, checks against the checkpoint, the known sha256 trusted, no server package needed."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import save_file
from torch import nn

from graphs.contracts.activations import metadata
from graphs.errors import InvalidInputError
from service.ingest.activations import check_capture, read_capture
from service.ingest.checkpoint import read_checkpoint
from service.jobs.inputs import load_inputs

SERVER_PACKAGES = (
    "fastapi", "starlette", "sqlalchemy", "uvicorn", "jinja2", "dask", "distributed",
    "python_multipart", "pydantic_settings",
)  # fmt: skip


def _checkpoint(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 6, 3), nn.Flatten())
    path = tmp_path / "net.pt"
    torch.save(net.state_dict(), path)
    return path


def _activations(tmp_path: Path, channels: int) -> Path:
    maps = np.random.default_rng(0).standard_normal((4, channels, 5)).astype(np.float32)
    meta = metadata(layers={"0": "maps/0"}, sources={"0": "0"}, shapes={"0": [4, channels, 5]},
                    seed=0, skipped={}, samples=4)  # fmt: skip
    path = tmp_path / f"acts{channels}.safetensors"
    save_file({"maps/0": maps}, str(path), metadata=meta)
    return path


def test_the_same_layers_and_info_as_read_checkpoint(tmp_path: Path) -> None:
    path = _checkpoint(tmp_path)
    inputs = load_inputs(path)
    parsed = read_checkpoint(path)
    assert inputs.checkpoint.info == parsed.info
    assert [x.name for x in inputs.checkpoint.layers] == [x.name for x in parsed.layers]
    for got, want in zip(inputs.checkpoint.layers, parsed.layers, strict=True):
        np.testing.assert_array_equal(got.weight, want.weight)
    # a .pt file carries no graph: no manifest and nothing to say about it; no activations
    assert inputs.manifest is None and inputs.notes == []
    assert inputs.capture is None and inputs.maps is None and inputs.stats is None


def test_a_known_sha256_is_trusted_not_recomputed(tmp_path: Path) -> None:
    path = _checkpoint(tmp_path)
    real = hashlib.sha256(path.read_bytes()).hexdigest()
    assert load_inputs(path).checkpoint.info.sha256 == real
    assert load_inputs(path, sha256=real).checkpoint.info == load_inputs(path).checkpoint.info
    stand_in = "0" * 64  # the store names files by digest: what it says is what is reported
    assert load_inputs(path, sha256=stand_in).checkpoint.info.sha256 == stand_in


def test_activations_are_read_and_checked_against_the_layers(tmp_path: Path) -> None:
    path = _checkpoint(tmp_path)
    acts = _activations(tmp_path, 8)
    inputs = load_inputs(path, activations=acts, activations_name="activations a1")
    want = read_capture(acts)
    check_capture(want, inputs.checkpoint.layers)
    assert inputs.maps is not None and set(inputs.maps) == set(want.maps) == {"0"}
    np.testing.assert_array_equal(inputs.maps["0"], want.maps["0"])
    assert inputs.stats is None and inputs.holdout is None  # a file without second moments
    with pytest.raises(InvalidInputError, match="do not fit the checkpoint"):
        load_inputs(path, activations=_activations(tmp_path, 5))


def _statistics(tmp_path: Path, *, holdout: bool, version: str = "3") -> Path:
    """Statistics of the two convs' inputs (3 and 8 channels), their last 20 rows held out."""
    rng = np.random.default_rng(1)
    tensors, held = {}, {}
    for name, c in (("0", 3), ("2", 8)):
        z = np.hstack([rng.standard_normal((50, c)), np.ones((50, 1))])
        tensors[f"gram/{name}"] = z.T @ z
        held[f"holdout/{name}"] = z[30:].T @ z[30:]
    meta = metadata(layers={}, sources={}, shapes={}, seed=0, skipped={}, samples=5,
                    holdout_samples=2 if holdout else None)  # fmt: skip
    path = tmp_path / f"stats-{holdout}-{version}.safetensors"
    save_file(
        {**tensors, **(held if holdout else {})}, str(path), metadata={**meta, "version": version}
    )
    return path


def test_held_out_statistics_come_with_the_statistics(tmp_path: Path) -> None:
    path = _checkpoint(tmp_path)
    inputs = load_inputs(path, activations=_statistics(tmp_path, holdout=True))
    assert inputs.stats is not None and inputs.holdout is not None
    assert set(inputs.holdout) == set(inputs.stats) == {"0", "2"}
    for name, h in inputs.holdout.items():
        s = inputs.stats[name]
        assert h.shape == s.shape and 0 < h[-1, -1] < s[-1, -1]
    assert inputs.capture is not None and inputs.capture.holdout_samples == 2
    # without held-out statistics (a version 2 file, or holdout_every=0): None, as before
    for version in ("2", "3"):
        plain = load_inputs(path, activations=_statistics(tmp_path, holdout=False, version=version))
        assert plain.stats is not None and plain.holdout is None


def test_input_shapes_for_a_checkpoint_without_a_graph_are_refused(tmp_path: Path) -> None:
    with pytest.raises(InvalidInputError, match="ONNX models only"):
        load_inputs(_checkpoint(tmp_path), input_shapes=[[1, 3, 8, 8]])


def test_the_loader_imports_no_server_package() -> None:
    """The CLI's embedded mode uses it on the base install (no ``[server]`` extra)."""
    code = (
        "import sys, service.jobs.inputs, service.ingest.checkpoint; "
        f"print(sorted(m for m in {SERVER_PACKAGES!r} if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
