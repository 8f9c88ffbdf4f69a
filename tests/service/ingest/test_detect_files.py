"""Format detection from content (service.ingest.detect) and files that are no checkpoint."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import save_file as save_numpy
from safetensors.torch import save_file as save_torch

from graphs.errors import (
    CheckpointError,
    UnsupportedFormatError,
)
from service.ingest.checkpoint import (
    read_checkpoint,
)
from tests.service.ingest.helpers import message, onnx_model, save, state_dict

Tensors = dict[str, torch.Tensor]


def test_reading_safetensors_and_onnx_never_imports_torch(tmp_path: Path) -> None:
    path = tmp_path / "m.safetensors"
    save_numpy({"fc.weight": np.ones((3, 4), np.float32) * np.arange(3)[:, None]}, str(path))
    onnx_path, _ = onnx_model(tmp_path)
    code = (
        "import sys; from service.ingest.checkpoint import read_checkpoint; "
        f"assert read_checkpoint({str(path)!r}).layers; "
        f"assert read_checkpoint({str(onnx_path)!r}).layers; "
        "assert 'torch' not in sys.modules, 'torch was imported'"
    )
    root = Path(__file__).resolve().parents[3]
    done = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


# ------------------------------------------------------------------------ format detection


def test_format_comes_from_content_not_extension(tmp_path: Path) -> None:
    st = tmp_path / "x.pt"
    save_torch({k: v.contiguous() for k, v in state_dict().items()}, str(st))
    pt = save(tmp_path, state_dict(), "y.onnx")
    onnx_path, _ = onnx_model(tmp_path)
    as_st = tmp_path / "z.safetensors"
    as_st.write_bytes(onnx_path.read_bytes())
    assert read_checkpoint(st).info.format == "safetensors"
    assert read_checkpoint(pt).info.format == "pytorch"
    assert read_checkpoint(as_st).info.format == "onnx"
    assert [x.name for x in read_checkpoint(st).layers] == ["0", "3", "5", "7"]


def test_error_messages_can_name_the_upload(tmp_path: Path) -> None:
    path = tmp_path / "blob"
    path.write_bytes(b"")
    with pytest.raises(UnsupportedFormatError) as ei:
        read_checkpoint(path, name="my-model.pt")
    assert "my-model.pt is empty" in message(ei)


# ------------------------------------------------------------------------------- bad input


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.pt"
    with pytest.raises(CheckpointError, match="does not exist") as ei:
        read_checkpoint(path)
    assert str(path) in message(ei)


def test_directory(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="not a regular file") as ei:
        read_checkpoint(tmp_path)
    assert str(tmp_path) in message(ei)


def test_empty_file(tmp_path: Path) -> None:
    path = tmp_path / "empty.pt"
    path.write_bytes(b"")
    with pytest.raises(UnsupportedFormatError, match="is empty") as ei:
        read_checkpoint(path)
    assert str(path) in message(ei)


def test_random_bytes(tmp_path: Path) -> None:
    data = np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes()
    assert data[0] not in (0x80, 0x08, ord("P"))
    path = tmp_path / "random.pt"
    path.write_bytes(data)
    with pytest.raises(UnsupportedFormatError, match="is not a PyTorch, safetensors or ONNX") as ei:
        read_checkpoint(path)
    assert str(path) in message(ei)


def test_text_file(tmp_path: Path) -> None:
    path = tmp_path / "notes.safetensors"
    path.write_text("hello, this is not a model\n")
    with pytest.raises(UnsupportedFormatError, match="text file") as ei:
        read_checkpoint(path)
    assert str(path) in message(ei)
