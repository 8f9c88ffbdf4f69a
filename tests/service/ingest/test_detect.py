"""A safetensors file whose header length starts with the bytes of a pickle's protocol mark
(0x80, 2..5: headers of 640, 896, 1152 or 1408 bytes) is read as safetensors, not refused as a
pickle; pickles are still pickles."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from service.ingest.detect import detect_format


def _safetensors(path: Path, header_len: int) -> Path:
    header = {"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}
    base = len(json.dumps({**header, "__metadata__": {"pad": ""}}).encode())
    header["__metadata__"] = {"pad": "x" * (header_len - base)}
    text = json.dumps(header).encode()
    assert len(text) == header_len
    path.write_bytes(header_len.to_bytes(8, "little") + text + b"\0" * 4)
    return path


@pytest.mark.parametrize("n", [640, 896, 1152, 1408, 1409])
def test_header_lengths_that_look_like_a_pickle_mark(tmp_path: Path, n: int) -> None:
    path = _safetensors(tmp_path / "a.safetensors", n)
    head = path.read_bytes()[:2]
    assert (head[0] == 0x80 and 2 <= head[1] <= 5) == (n != 1409)
    assert detect_format(path, "a", path.stat().st_size) == "safetensors"


def test_pickles_are_still_pickles(tmp_path: Path) -> None:
    for proto in (2, 4, 5):
        path = tmp_path / f"p{proto}.pt"
        torch.save({"w": torch.zeros(3)}, path, pickle_protocol=proto,
                   _use_new_zipfile_serialization=False)  # fmt: skip
        assert detect_format(path, "p", path.stat().st_size) == "pytorch"
