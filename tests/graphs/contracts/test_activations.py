"""The activations file contract (graphs.contracts.activations): the metadata the client writes
is what the header reader accepts; other formats, versions and damaged headers are refused."""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import pytest

from graphs.contracts.activations import (
    FORMAT,
    GRAM_PREFIX,
    HOLDOUT_PREFIX,
    MAX_HEADER_BYTES,
    PLAIN_VERSION,
    VERSION,
    VERSIONS,
    gram_key,
    has_maps,
    holdout_key,
    metadata,
    read_header,
)
from graphs.errors import CheckpointError


def _write(path: Path, meta: dict[str, str] | None, tensors: tuple[str, ...] = ("maps/0",)) -> Path:
    """A safetensors file: one float32 value per tensor, ``meta`` as its metadata."""
    header: dict[str, Any] = {}
    if meta is not None:
        header["__metadata__"] = meta
    for i, name in enumerate(tensors):
        header[name] = {"dtype": "F32", "shape": [1, 1, 1], "data_offsets": [4 * i, 4 * i + 4]}
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + b"\0" * (4 * len(tensors)))
    return path


def _meta(**change: Any) -> dict[str, str]:
    base = metadata(
        layers={"conv2": "k1", "conv1": "k0"},
        sources={"k0": "out:relu#0", "k1": "out:conv2#0"},
        shapes={"k0": [4, 8, 8], "k1": [4, 8, 8]},
        seed=3,
        skipped={"fc": "too wide"},
        samples=16,
    )
    return {**base, **change}


def test_written_metadata_reads_back(tmp_path: Path) -> None:
    path = _write(tmp_path / "a.safetensors", _meta(), ("k0", "k1", gram_key("fc1")))
    header = read_header(path)
    assert header.version == PLAIN_VERSION == "2" and PLAIN_VERSION in VERSIONS  # no held-out part
    assert header.metadata == _meta() and header.metadata["format"] == FORMAT
    assert json.loads(header.metadata["layers"]) == {"conv1": "k0", "conv2": "k1"}
    assert header.metadata["layers"].index("conv1") < header.metadata["layers"].index("conv2")
    assert header.tensors == ("gram/fc1", "k0", "k1")
    assert header.has_maps and header.has_statistics and has_maps(path)


def test_statistics_only(tmp_path: Path) -> None:
    path = _write(tmp_path / "s.safetensors", _meta(layers="{}"), (gram_key("conv2"),))
    header = read_header(path)
    assert gram_key("conv2") == GRAM_PREFIX + "conv2"
    assert not header.has_maps and header.has_statistics
    assert not has_maps(path)


def test_held_out_statistics_are_named_and_counted(tmp_path: Path) -> None:
    """Version 3: ``holdout/<module>`` beside ``gram/<module>``, ``holdout_samples`` only when
    written; without it the metadata is version 2's, version included."""
    assert VERSION == "3" and VERSIONS == ("1", "2", "3")
    assert holdout_key("conv2") == HOLDOUT_PREFIX + "conv2" != gram_key("conv2")
    assert "holdout_samples" not in _meta() and _meta()["version"] == "2"
    assert set(_meta()) == {"format", "version", "layers", "sources", "shapes", "seed",
                            "gram_skipped", "samples"}  # fmt: skip
    meta = _meta(**metadata(layers={}, sources={}, shapes={}, seed=3, skipped={}, samples=16,
                            holdout_samples=8))  # fmt: skip
    assert meta["holdout_samples"] == "8" and meta["version"] == VERSION
    names = (gram_key("conv2"), holdout_key("conv2"))
    header = read_header(_write(tmp_path / "h.safetensors", meta, names))
    assert header.version == "3" and header.has_statistics and header.has_holdout
    assert header.metadata["holdout_samples"] == "8" and not header.has_maps
    assert not read_header(_write(tmp_path / "g.safetensors", _meta(), names[:1])).has_holdout


def test_version_2_files_read_as_before(tmp_path: Path) -> None:
    v2 = _meta(version="2")
    header = read_header(_write(tmp_path / "v2.safetensors", v2, ("k0", gram_key("fc1"))))
    assert header.version == "2" and header.metadata == v2
    assert header.has_maps and header.has_statistics and not header.has_holdout


def test_a_file_without_version_is_version_1(tmp_path: Path) -> None:
    meta = {"format": FORMAT, "layers": json.dumps({"conv1": "maps/0"})}
    header = read_header(_write(tmp_path / "v1.safetensors", meta))
    assert header.version == "1" and header.has_maps and not header.has_statistics


def test_other_versions_are_refused(tmp_path: Path) -> None:
    path = _write(tmp_path / "v4.safetensors", _meta(version="4"))
    with pytest.raises(CheckpointError, match="of version 4; this service reads versions 1, 2, 3"):
        read_header(path, display="activations x")
    assert has_maps(path)  # cannot tell: the reader says why


@pytest.mark.parametrize(
    "meta", [None, {"layers": "{}"}, {"format": "prunegraph-checkpoint", "version": "2"}]
)
def test_other_files_are_not_activations(tmp_path: Path, meta: dict[str, str] | None) -> None:
    path = _write(tmp_path / "other.safetensors", meta)
    with pytest.raises(CheckpointError, match="not a prunegraph activations file") as info:
        read_header(path, display="upload")
    assert "capture_activations" in info.value.hint
    assert str(info.value).startswith("upload ")


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", "is not a safetensors file"),
        (b"\0" * 8, "is not a safetensors file"),
        (struct.pack("<Q", MAX_HEADER_BYTES + 1) + b"{}", "is not a safetensors file"),
        (struct.pack("<Q", 5) + b"{nope", "truncated or corrupt: its safetensors header is not"),
        (struct.pack("<Q", 2) + b"[]", "truncated or corrupt: its safetensors header is not a"),
        (
            struct.pack("<Q", 40) + b"{}",
            "truncated or corrupt: its safetensors header is cut short",
        ),
    ],
)
def test_damaged_headers_are_refused(tmp_path: Path, content: bytes, message: str) -> None:
    path = tmp_path / "bad.safetensors"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match=message):
        read_header(path)
    assert has_maps(path)


def test_unreadable_files_say_so(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="cannot be read"):
        read_header(tmp_path / "missing.safetensors")
    with pytest.raises(CheckpointError, match="cannot be read"):
        read_header(tmp_path)  # a directory
    assert has_maps(tmp_path / "missing.safetensors")


def test_unparsable_layers_count_as_maps(tmp_path: Path) -> None:
    """The peek cannot tell, so it does not skip the maps; the full reader refuses the file."""
    header = read_header(_write(tmp_path / "l.safetensors", _meta(layers="not json")))
    assert header.has_maps
