"""Reading safetensors checkpoints (service.ingest.safetensors_file): dtypes and corrupt headers."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import save_file as save_numpy
from safetensors.torch import save_file as save_torch

from graphs.errors import (
    CheckpointError,
)
from service.ingest.checkpoint import (
    read_checkpoint,
)
from tests.service.ingest.helpers import by_name, message, small_net, state_dict

Tensors = dict[str, torch.Tensor]


# ----------------------------------------------------------------------------- safetensors


def test_safetensors_from_torch_with_bf16(tmp_path: Path) -> None:
    sd = {k: v.contiguous() for k, v in state_dict().items()}
    sd["0.weight"] = sd["0.weight"].to(torch.bfloat16)
    sd["7.weight"] = sd["7.weight"].half()
    path = tmp_path / "model.safetensors"
    save_torch({"module." + k: v for k, v in sd.items()}, str(path))
    parsed = read_checkpoint(path)
    assert parsed.info.format == "safetensors" and parsed.info.n_tensors == len(sd)
    assert [x.name for x in parsed.layers] == ["0", "3", "5", "7"]
    conv0, dw, _, fc = parsed.layers
    np.testing.assert_array_equal(conv0.weight, sd["0.weight"].float().numpy())
    np.testing.assert_array_equal(fc.weight, sd["7.weight"].float().numpy())
    # lazy: read-only views of the mapped file in its own dtypes, float64 when analysed
    assert (conv0.weight.dtype.name, fc.weight.dtype) == ("bfloat16", np.float16)
    assert not conv0.weight.flags.writeable
    np.testing.assert_array_equal(conv0.filters(), sd["0.weight"].double().numpy().reshape(8, -1))
    assert (dw.groups_source, conv0.bn, dw.bn) == ("inferred", "1", "4")
    assert parsed.info.n_params == sum(p.numel() for p in small_net().parameters())


def test_safetensors_from_numpy_with_many_dtypes(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    arrays: dict[str, np.ndarray] = {
        "a.weight": rng.standard_normal((6, 5)),
        "b.weight": rng.standard_normal((4, 6, 3)).astype(np.float16),
        "c.weight": rng.standard_normal((3, 4, 2, 2, 2)).astype(np.float32),
        "c.bias": rng.standard_normal(3).astype(np.float32),
        "steps": np.arange(12, dtype=np.int64).reshape(3, 4),
    }
    path = tmp_path / "n.safetensors"
    save_numpy(arrays, str(path))
    layers = by_name(read_checkpoint(path))
    assert [(x.kind, x.weight.dtype) for x in layers.values()] == [
        ("linear", np.float64),
        ("conv1d", np.float16),  # a lazy view of the file: converted when analysed
        ("conv3d", np.float32),
    ]
    np.testing.assert_array_equal(layers["a"].weight, arrays["a.weight"])
    np.testing.assert_array_equal(layers["b"].weight, arrays["b.weight"].astype(np.float32))
    assert layers["b"].filters().dtype == np.float64
    np.testing.assert_array_equal(layers["c"].bias, arrays["c.bias"])


def _safetensors_bytes(header: bytes, data: bytes) -> bytes:
    return len(header).to_bytes(8, "little") + header + data


def test_safetensors_offsets_beyond_the_file_are_corrupt(tmp_path: Path) -> None:
    header = b'{"w.weight":{"dtype":"F32","shape":[4,4],"data_offsets":[0,64]}}'
    path = tmp_path / "cut.safetensors"
    path.write_bytes(_safetensors_bytes(header, bytes(32)))
    with pytest.raises(CheckpointError, match="truncated or corrupt") as ei:
        read_checkpoint(path)
    assert str(path) in message(ei)


def test_safetensors_size_mismatch_is_corrupt(tmp_path: Path) -> None:
    header = b'{"w.weight":{"dtype":"F32","shape":[4,4],"data_offsets":[0,60]}}'
    path = tmp_path / "bad.safetensors"
    path.write_bytes(_safetensors_bytes(header, bytes(64)))
    with pytest.raises(CheckpointError, match="corrupt"):
        read_checkpoint(path)


@pytest.mark.parametrize(
    "entry",
    [
        b'{"dtype":"F32","shape":"4","data_offsets":[0,16]}',
        b'{"dtype":"F32","shape":[4],"data_offsets":[16,0]}',
        b'{"dtype":"F32","shape":[-4],"data_offsets":[0,16]}',
        b'{"dtype":"F32","shape":[4]}',
        b"[1, 2]",
    ],
)
def test_safetensors_malformed_entries_are_corrupt(tmp_path: Path, entry: bytes) -> None:
    path = tmp_path / "m.safetensors"
    path.write_bytes(_safetensors_bytes(b'{"w.weight":' + entry + b"}", bytes(16)))
    with pytest.raises(CheckpointError, match="malformed") as ei:
        read_checkpoint(path)
    assert str(path) in message(ei)


def test_safetensors_bad_json_is_corrupt(tmp_path: Path) -> None:
    path = tmp_path / "json.safetensors"
    path.write_bytes(_safetensors_bytes(b'{"w.weight": [1, 2', b""))
    with pytest.raises(CheckpointError, match="JSON") as ei:
        read_checkpoint(path)
    assert str(path) in message(ei)


@pytest.mark.parametrize(
    "header",
    [
        b'{"w.weight":' + b"[" * 100_000 + b"]" * 100_000 + b"}",
        b'{"w.weight":{"dtype":"F32","shape":[0,100000000000000000000],"data_offsets":[0,0]}}',
        b'{"w.weight":{"dtype":"F32","shape":[0,1099511627777],"data_offsets":[0,0]}}',
        b'{"w.weight":{"dtype":"F32","shape":[' + b"1" * 5000 + b'],"data_offsets":[0,0]}}',
        b'{"w.weight":{"dtype":"F32","shape":' + b"[1]" * 1 + b',"data_offsets":[0,8]}}',
        b'{"w.weight":{"dtype":"F32","shape":[' + b"1," * 100 + b'1],"data_offsets":[0,4]}}',
    ],
    ids=["deep-json", "dim-1e20", "dim-2**40+1", "5000-digit-int", "too-many-bytes", "101-dims"],
)
def test_hostile_safetensors_headers_are_corrupt(tmp_path: Path, header: bytes) -> None:
    path = tmp_path / "h.safetensors"
    path.write_bytes(_safetensors_bytes(header, bytes(8)))
    with pytest.raises(CheckpointError, match="corrupt") as ei:
        read_checkpoint(path)
    assert str(path) in message(ei)
