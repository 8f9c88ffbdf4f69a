"""Checkpoint ingestion: formats, nesting, layer extraction, groups, BN pairing and bad input."""

from __future__ import annotations

import hashlib
import os
import pickle
import subprocess
import sys
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from safetensors.numpy import save_file as save_numpy
from safetensors.torch import save_file as save_torch
from torch import nn

from graphs.errors import (
    CheckpointError,
    InvalidInputError,
    NoPrunableLayersError,
    UnsafeCheckpointError,
    UnsupportedFormatError,
)
from graphs.layers import LayerWeights
from service.ingest.checkpoint import (
    DEAD_REASON,
    NAN_REASON,
    ONE_FILTER_REASON,
    ParsedCheckpoint,
    read_checkpoint,
)

Tensors = dict[str, torch.Tensor]


def _net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3),  # 0
        nn.BatchNorm2d(8),  # 1
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, groups=8, bias=False),  # 3: depthwise
        nn.BatchNorm2d(8),  # 4
        nn.Conv2d(8, 16, 1),  # 5
        nn.Flatten(),
        nn.Linear(16, 4),  # 7
    )


def _sd() -> Tensors:
    return dict(_net().state_dict())


def _save(tmp_path: Path, obj: object, name: str = "ckpt.pt", **kw: object) -> Path:
    path = tmp_path / name
    torch.save(obj, path, **kw)  # type: ignore[arg-type]
    return path


def _by_name(parsed: ParsedCheckpoint) -> dict[str, LayerWeights]:
    return {layer.name: layer for layer in parsed.layers}


def _reasons(parsed: ParsedCheckpoint) -> dict[str, str]:
    return {s.name: s.reason for s in parsed.skipped}


def _message(excinfo: pytest.ExceptionInfo[CheckpointError]) -> str:
    return excinfo.value.message


# ------------------------------------------------------------------------------------ pytorch


def test_plain_state_dict(tmp_path: Path) -> None:
    sd = _sd()
    path = _save(tmp_path, sd)
    parsed = read_checkpoint(path)
    assert [layer.name for layer in parsed.layers] == ["0", "3", "5", "7"]
    conv0, dw, pw, fc = parsed.layers
    assert (conv0.kind, conv0.groups, conv0.groups_source) == ("conv2d", 1, "default")
    assert (dw.groups, dw.groups_source, dw.is_depthwise) == (8, "inferred", True)
    assert (pw.groups, fc.kind, fc.shape) == (1, "linear", (4, 16))
    assert conv0.bn == "1" and dw.bn == "4" and pw.bn is None and fc.bn is None
    assert conv0.extra_params == 16 and conv0.params == 8 * 27 + 8 + 16
    assert dw.bias is None and conv0.bias is not None
    np.testing.assert_array_equal(conv0.weight, sd["0.weight"].numpy())
    np.testing.assert_array_equal(fc.bias, sd["7.bias"].numpy())
    assert conv0.weight.dtype == np.float32
    info = parsed.info
    assert info.format == "pytorch" and info.size_bytes == path.stat().st_size
    assert info.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert info.n_tensors == len(sd)
    buffers = ("running_mean", "running_var", "num_batches_tracked")
    assert info.n_params == sum(p.numel() for p in _net().parameters())
    assert info.n_params == sum(v.numel() for k, v in sd.items() if not k.endswith(buffers))
    assert parsed.skipped == ()


@pytest.mark.parametrize(
    "wrap",
    [
        lambda sd: {"state_dict": sd, "epoch": 3},
        lambda sd: {"model_state_dict": sd, "optimizer_state_dict": {"state": {}}, "step": 1},
        lambda sd: {"model": sd, "args": {"lr": 0.1}},
        lambda sd: {"ema": {"module": sd}, "note": "x"},
        lambda sd: {"params": sd},
        lambda sd: {"a": 1, "b": {"c": {"net": sd}}},  # three levels down
        lambda sd: {"optimizer": {"exp_avg": torch.zeros(8, 3, 3, 3)}, "network": sd, "n": 1},
    ],
)
def test_nested_state_dicts_are_found(tmp_path: Path, wrap: Callable[[Tensors], object]) -> None:
    parsed = read_checkpoint(_save(tmp_path, wrap(_sd())))
    assert [layer.name for layer in parsed.layers] == ["0", "3", "5", "7"]


def test_nesting_deeper_than_three_levels_is_not_searched(tmp_path: Path) -> None:
    path = _save(tmp_path, {"a": {"b": {"c": {"d": {"state_dict": _sd()}}}}, "e": 1})
    with pytest.raises(NoPrunableLayersError) as ei:
        read_checkpoint(path)
    assert str(path) in _message(ei)


def test_known_keys_win_over_other_tensor_dicts(tmp_path: Path) -> None:
    other = {"head.weight": torch.randn(5, 7)}
    parsed = read_checkpoint(_save(tmp_path, {"aux": other, "state_dict": _sd(), "x": 0}))
    assert "head" not in _by_name(parsed) and "0" in _by_name(parsed)


@pytest.mark.parametrize(
    "prefix", ["module.", "_orig_mod.", "module._orig_mod.", "_orig_mod.module."]
)
def test_wrapper_prefixes_are_stripped(tmp_path: Path, prefix: str) -> None:
    sd = {prefix + k: v for k, v in _sd().items()}
    parsed = read_checkpoint(_save(tmp_path, {"model": sd}))
    assert [layer.name for layer in parsed.layers] == ["0", "3", "5", "7"]
    assert parsed.layers[0].bn == "1"


def test_a_submodule_called_module_is_not_a_prefix(tmp_path: Path) -> None:
    sd = {"module.fc.weight": torch.randn(4, 3), "head.weight": torch.randn(2, 4)}
    parsed = read_checkpoint(_save(tmp_path, sd))
    assert [layer.name for layer in parsed.layers] == ["module.fc", "head"]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_tensors_become_float32(tmp_path: Path, dtype: torch.dtype) -> None:
    sd = {k: v.to(dtype) if v.is_floating_point() else v for k, v in _sd().items()}
    parsed = read_checkpoint(_save(tmp_path, sd))
    conv0 = parsed.layers[0]
    assert conv0.weight.dtype == np.float32
    np.testing.assert_array_equal(conv0.weight, sd["0.weight"].float().numpy())
    assert parsed.info.n_params == sum(p.numel() for p in _net().parameters())


def test_float64_is_kept(tmp_path: Path) -> None:
    sd = {"a.weight": torch.randn(4, 3, dtype=torch.float64), "b.weight": torch.randn(2, 4)}
    parsed = read_checkpoint(_save(tmp_path, sd))
    assert parsed.layers[0].weight.dtype == np.float64
    assert parsed.layers[1].weight.dtype == np.float32


def test_legacy_torch_format(tmp_path: Path) -> None:
    path = _save(tmp_path, _sd(), _use_new_zipfile_serialization=False)
    assert not path.read_bytes().startswith(b"PK")
    parsed = read_checkpoint(path)
    assert [layer.name for layer in parsed.layers] == ["0", "3", "5", "7"]
    assert parsed.info.format == "pytorch"


def test_cuda_tensors_load_on_cpu(tmp_path: Path) -> None:
    """A file whose storages say cuda:0 (as saved on a GPU) loads through map_location=cpu."""
    src = _save(tmp_path, {"c.weight": torch.randn(4, 3, 3, 3)}, "cpu.pt")
    dst = tmp_path / "cuda.pt"
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as zout:
        for item in zin.infolist():
            data = zin.read(item)
            if item.filename.endswith("/data.pkl"):
                assert b"X\x03\x00\x00\x00cpu" in data
                data = data.replace(b"X\x03\x00\x00\x00cpu", b"X\x06\x00\x00\x00cuda:0")
            zout.writestr(item, data)
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError):
            torch.load(dst, weights_only=True)  # the rewrite really says cuda
    parsed = read_checkpoint(dst)
    assert parsed.layers[0].shape == (4, 3, 3, 3)


def test_non_tensor_entries_are_ignored(tmp_path: Path) -> None:
    sd: dict[str, object] = dict(_sd())
    sd["meta"] = "v1"
    sd["step"] = 7
    parsed = read_checkpoint(_save(tmp_path, sd))
    assert len(parsed.layers) == 4 and parsed.info.n_tensors == len(_sd())


def test_a_single_module_state_dict_has_the_root_name(tmp_path: Path) -> None:
    parsed = read_checkpoint(_save(tmp_path, nn.Conv2d(3, 8, 3).state_dict()))
    assert [(x.name, x.kind, x.bias is not None) for x in parsed.layers] == [("", "conv2d", True)]


def test_top_level_tensors_among_many_other_entries(tmp_path: Path) -> None:
    obj = {"fc.weight": torch.randn(4, 3), "a": 1, "b": "x", "c": [1]}
    assert [x.name for x in read_checkpoint(_save(tmp_path, obj)).layers] == ["fc"]


def test_a_checkpoint_without_tensors(tmp_path: Path) -> None:
    path = _save(tmp_path, {"epoch": 3, "config": {"lr": 0.1}})
    with pytest.raises(NoPrunableLayersError, match="no tensors") as ei:
        read_checkpoint(path)
    assert str(path) in _message(ei)


def test_reading_safetensors_and_onnx_never_imports_torch(tmp_path: Path) -> None:
    path = tmp_path / "m.safetensors"
    save_numpy({"fc.weight": np.ones((3, 4), np.float32) * np.arange(3)[:, None]}, str(path))
    onnx_path, _ = _onnx_model(tmp_path)
    code = (
        "import sys; from service.ingest.checkpoint import read_checkpoint; "
        f"assert read_checkpoint({str(path)!r}).layers; "
        f"assert read_checkpoint({str(onnx_path)!r}).layers; "
        "assert 'torch' not in sys.modules, 'torch was imported'"
    )
    root = Path(__file__).resolve().parents[2]
    done = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


# ---------------------------------------------------------------------------- skipped layers


def test_embedding_and_attention_are_skipped_with_reasons_lstm_read(tmp_path: Path) -> None:
    model = nn.ModuleDict(
        {
            "embed": nn.Embedding(10, 6),
            "lstm": nn.LSTM(6, 5, bidirectional=True),
            "attn": nn.MultiheadAttention(8, 2),
            "head": nn.Linear(8, 3),
        }
    )
    sd = model.state_dict()
    parsed = read_checkpoint(_save(tmp_path, sd))
    reasons = _reasons(parsed)
    assert "recurrent/attention" in reasons["attn.in_proj_weight"]
    assert "embedding" in reasons["embed"]
    # the attention's output projection is an ordinary linear layer; the LSTM's matrices are
    # layers named by their parameters (grouped into hidden units, tests/graphs/test_recurrent.py)
    lstm = [f"lstm.weight_{m}_l0{s}" for s in ("", "_reverse") for m in ("ih", "hh")]
    assert set(_by_name(parsed)) == {"attn.out_proj", "head", *lstm}
    weights = {k for k, v in sd.items() if v.ndim >= 2}
    listed = {layer.name + ".weight" for layer in parsed.layers} | set(reasons) | {"embed.weight"}
    listed |= set(lstm)
    assert weights <= listed


def test_a_projection_inside_an_embed_module_is_a_layer(tmp_path: Path) -> None:
    sd = {
        "patch_embed.proj.weight": torch.randn(16, 3, 4, 4),
        "tok_embed.weight": torch.randn(9, 4),
    }
    parsed = read_checkpoint(_save(tmp_path, sd))
    assert [layer.name for layer in parsed.layers] == ["patch_embed.proj"]
    assert "embedding" in _reasons(parsed)["tok_embed"]


def test_other_matrices_are_listed_and_vectors_are_not(tmp_path: Path) -> None:
    sd = {
        "pos_embed": torch.randn(1, 5, 8),
        "conv.weight_g": torch.randn(6, 1, 1, 1),
        "conv.weight_v": torch.randn(6, 3, 3, 3),
        "fc.weight": torch.randn(4, 8),
        "prelu.weight": torch.randn(4),
        "ln.weight": torch.randn(4),
        "ids": torch.arange(10).reshape(2, 5),
    }
    parsed = read_checkpoint(_save(tmp_path, sd))
    reasons = _reasons(parsed)
    assert set(reasons) == {"pos_embed", "conv"}
    assert "weight norm" in reasons["conv"] and "not analysed" in reasons["pos_embed"]
    assert [layer.name for layer in parsed.layers] == ["fc"]


def test_integer_weights_are_skipped(tmp_path: Path) -> None:
    sd = {
        "q.weight": torch.randint(-8, 8, (4, 3), dtype=torch.int8),
        "fc.weight": torch.randn(3, 4),
    }
    parsed = read_checkpoint(_save(tmp_path, sd))
    assert "int8" in _reasons(parsed)["q"]


def test_nan_layer_is_skipped_and_others_kept(tmp_path: Path) -> None:
    sd = _sd()
    sd["5.weight"][3, 2, 0, 0] = float("nan")
    sd["7.weight"][0, 0] = float("inf")
    parsed = read_checkpoint(_save(tmp_path, sd))
    assert [layer.name for layer in parsed.layers] == ["0", "3"]
    assert _reasons(parsed) == {"5": NAN_REASON, "7": NAN_REASON}


def test_single_filter_layer_is_skipped(tmp_path: Path) -> None:
    sd = {"a.weight": torch.randn(4, 3, 3, 3), "score.weight": torch.randn(1, 4, 1, 1)}
    parsed = read_checkpoint(_save(tmp_path, sd))
    assert _reasons(parsed) == {"score": ONE_FILTER_REASON}
    assert [layer.name for layer in parsed.layers] == ["a"]


def test_dead_layer_is_skipped_but_some_zero_filters_are_kept(tmp_path: Path) -> None:
    sd = _sd()
    sd["5.weight"].zero_()
    sd["7.weight"][:2] = 0
    parsed = read_checkpoint(_save(tmp_path, sd))
    assert _reasons(parsed) == {"5": DEAD_REASON}
    assert "7" in _by_name(parsed)


def test_only_vectors_means_no_prunable_layers(tmp_path: Path) -> None:
    bn = nn.BatchNorm2d(8).state_dict()
    path = _save(tmp_path, bn)
    with pytest.raises(NoPrunableLayersError) as ei:
        read_checkpoint(path)
    assert str(path) in _message(ei)


def test_all_layers_skipped_means_no_prunable_layers_with_reasons(tmp_path: Path) -> None:
    path = _save(tmp_path, {"fc.weight": torch.full((3, 4), float("nan"))})
    with pytest.raises(NoPrunableLayersError) as ei:
        read_checkpoint(path)
    assert str(path) in _message(ei) and "NaN" in _message(ei)


# ------------------------------------------------------------------------- groups and BN pairing


def test_first_single_channel_conv_is_not_depthwise(tmp_path: Path) -> None:
    sd = {"c0.weight": torch.randn(32, 1, 3, 3), "c1.weight": torch.randn(64, 32, 3, 3)}
    parsed = read_checkpoint(_save(tmp_path, sd))
    assert [(x.groups, x.groups_source) for x in parsed.layers] == [(1, "default")] * 2


def test_single_channel_conv_after_a_different_width_is_not_depthwise(tmp_path: Path) -> None:
    sd = {"a.weight": torch.randn(16, 3, 3, 3), "b.weight": torch.randn(32, 1, 3, 3)}
    parsed = read_checkpoint(_save(tmp_path, sd))
    assert (parsed.layers[1].groups, parsed.layers[1].groups_source) == (1, "default")


def test_grouped_convs_other_than_depthwise_are_not_inferred(tmp_path: Path) -> None:
    """(C, C/g, k, k) after C outputs may be ResNeXt's grouped conv or HRNet's fuse conv."""
    sd = {
        "stem.weight": torch.randn(64, 3, 7, 7),
        "b.conv1.weight": torch.randn(128, 64, 1, 1),
        "b.conv2.weight": torch.randn(128, 4, 3, 3),  # ResNeXt 32x4d: needs a manifest
        "b.conv3.weight": torch.randn(256, 128, 1, 1),
        "b.downsample.0.weight": torch.randn(256, 64, 1, 1),  # input is the block's input
        "c.conv.weight": torch.randn(256, 128, 3, 3),
        "d.dw.weight": torch.randn(256, 1, 3, 3),
    }
    layers = _by_name(read_checkpoint(_save(tmp_path, sd)))
    for name in ["stem", "b.conv1", "b.conv2", "b.conv3", "b.downsample.0", "c.conv"]:
        assert (layers[name].groups, layers[name].groups_source) == (1, "default"), name
    assert (layers["d.dw"].groups, layers["d.dw"].groups_source) == (256, "inferred")
    manifest = read_checkpoint(_save(tmp_path, sd), groups={"b.conv2": 32})
    assert _by_name(manifest)["b.conv2"].groups == 32


def test_manifest_groups_win(tmp_path: Path) -> None:
    path = _save(tmp_path, _sd())
    parsed = read_checkpoint(path, groups={"3": 1, "0": 1, "unknown": 4})
    dw = _by_name(parsed)["3"]
    assert (dw.groups, dw.groups_source) == (1, "manifest")
    assert parsed.layers[0].groups_source == "manifest"


def test_manifest_groups_may_be_numpy_integers(tmp_path: Path) -> None:
    parsed = read_checkpoint(_save(tmp_path, _sd()), groups={"3": np.int64(8)})  # type: ignore[dict-item]
    assert (parsed.layers[1].groups, parsed.layers[1].groups_source) == (8, "manifest")


@pytest.mark.parametrize("bad", [{"3": 3}, {"3": 0}, {"7": 2}, {"3": 2.0}])
def test_invalid_manifest_groups_are_rejected(tmp_path: Path, bad: dict[str, int]) -> None:
    with pytest.raises(InvalidInputError, match="groups"):
        read_checkpoint(_save(tmp_path, _sd()), groups=bad)


def test_bn_pairs_with_the_latest_free_layer_of_its_width(tmp_path: Path) -> None:
    bn = nn.BatchNorm2d(8).state_dict()
    sd: Tensors = {"first.weight": torch.randn(8, 3, 3, 3)}
    sd |= {f"n_first.{k}": v for k, v in bn.items()}
    sd["second.weight"] = torch.randn(8, 8, 3, 3)
    sd["third.weight"] = torch.randn(4, 8, 1, 1)
    sd |= {f"n_x.{k}": v for k, v in bn.items()}  # after third: its width is second's
    sd |= {f"n_y.{k}": v for k, v in nn.BatchNorm2d(8, affine=False).state_dict().items()}
    layers = _by_name(read_checkpoint(_save(tmp_path, sd)))
    assert layers["first"].bn == "n_first" and layers["first"].extra_params == 16
    assert layers["second"].bn == "n_x" and layers["third"].bn is None


def test_safetensors_alphabetical_order_pairs_bn_by_name(tmp_path: Path) -> None:
    torch.manual_seed(1)
    block = nn.ModuleDict(
        {
            "conv1": nn.Conv2d(8, 8, 3, bias=False),
            "bn1": nn.BatchNorm2d(8),
            "conv2": nn.Conv2d(8, 8, 3, bias=False),
            "bn2": nn.BatchNorm2d(8),
        }
    )
    sd = {f"layer1.0.{k}": v.clone() for k, v in block.state_dict().items()}
    sd |= {f"layer10.0.{k}": v.clone() for k, v in block.state_dict().items()}
    path = tmp_path / "m.safetensors"
    save_torch({k: v.contiguous() for k, v in sd.items()}, str(path))
    parsed = read_checkpoint(path)
    assert [x.name for x in parsed.layers] == [
        "layer1.0.conv1",
        "layer1.0.conv2",
        "layer10.0.conv1",
        "layer10.0.conv2",
    ]
    assert [x.bn for x in parsed.layers] == [
        "layer1.0.bn1",
        "layer1.0.bn2",
        "layer10.0.bn1",
        "layer10.0.bn2",
    ]


# ----------------------------------------------------------------------------- safetensors


def test_safetensors_from_torch_with_bf16(tmp_path: Path) -> None:
    sd = {k: v.contiguous() for k, v in _sd().items()}
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
    assert parsed.info.n_params == sum(p.numel() for p in _net().parameters())


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
    layers = _by_name(read_checkpoint(path))
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
    assert str(path) in _message(ei)


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
    assert str(path) in _message(ei)


def test_safetensors_bad_json_is_corrupt(tmp_path: Path) -> None:
    path = tmp_path / "json.safetensors"
    path.write_bytes(_safetensors_bytes(b'{"w.weight": [1, 2', b""))
    with pytest.raises(CheckpointError, match="JSON") as ei:
        read_checkpoint(path)
    assert str(path) in _message(ei)


# ------------------------------------------------------------------------------------ ONNX


def _init(name: str, arr: np.ndarray) -> TensorProto:
    return numpy_helper.from_array(np.asarray(arr, dtype=np.float32), name)


def _onnx_model(tmp_path: Path) -> tuple[Path, dict[str, np.ndarray]]:
    rng = np.random.default_rng(0)
    w = {
        "features.0.0.weight": rng.standard_normal((8, 3, 3, 3)),
        "features.0.0.bias": rng.standard_normal(8),
        "features.0.1.weight": rng.random(8) + 0.5,
        "features.0.1.bias": rng.standard_normal(8),
        "features.0.1.running_mean": rng.standard_normal(8),
        "features.0.1.running_var": rng.random(8) + 0.5,
        "gray.weight": rng.standard_normal((8, 1, 3, 3)),
        "dw": rng.standard_normal((8, 1, 3, 3)),
        "onnx::Conv_7": rng.standard_normal((16, 8, 1, 1)),
        "fc1.weight": rng.standard_normal((4, 16)),  # Gemm transB=1: (out, in)
        "fc1.bias": rng.standard_normal(4),
        "fc2.weight": rng.standard_normal((4, 6)),  # Gemm transB=0: (in, out)
        "proj": rng.standard_normal((6, 5)),  # MatMul: (in, out)
        "proj_bias": rng.standard_normal(5),
        "tok.weight": rng.standard_normal((10, 4)),
    }
    dw_const = helper.make_node(
        "Constant", [], ["dw_out"], name="dw_const", value=_init("dw_value", w["dw"])
    )
    nodes = [
        helper.make_node(
            "Conv", ["x", "features.0.0.weight", "features.0.0.bias"], ["c0"], name="/c0"
        ),
        helper.make_node(
            "BatchNormalization",
            [
                "c0",
                *(f"features.0.1.{k}" for k in ("weight", "bias", "running_mean", "running_var")),
            ],
            ["b0"],
            name="/bn0",
        ),
        helper.make_node("Conv", ["g", "gray.weight"], ["gc"], name="/gray", group=1),
        dw_const,
        helper.make_node("Conv", ["b0", "dw_out"], ["d0"], name="dw_conv", group=8),
        helper.make_node("Conv", ["d0", "onnx::Conv_7"], ["p0"], name="/pw/Conv"),
        helper.make_node("GlobalAveragePool", ["p0"], ["gp"]),
        helper.make_node("Flatten", ["gp"], ["f0"]),
        helper.make_node("Gemm", ["f0", "fc1.weight", "fc1.bias"], ["h1"], name="/fc1", transB=1),
        helper.make_node("Gemm", ["h1", "fc2.weight"], ["h2"], name="/fc2/Gemm"),
        helper.make_node("MatMul", ["h2", "proj"], ["h3"], name="/proj/MatMul"),
        helper.make_node("Add", ["h3", "proj_bias"], ["y"]),
        helper.make_node("Gather", ["tok.weight", "ids"], ["emb"]),
    ]
    inits = [_init(k, v) for k, v in w.items() if k != "dw"]
    graph = helper.make_graph(
        nodes,
        "g",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8]),
            helper.make_tensor_value_info("g", TensorProto.FLOAT, [1, 1, 8, 8]),
            helper.make_tensor_value_info("ids", TensorProto.INT64, [2]),
        ],
        [
            helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 5]),
            helper.make_tensor_value_info("gc", TensorProto.FLOAT, [1, 8, 6, 6]),
            helper.make_tensor_value_info("emb", TensorProto.FLOAT, [2, 4]),
        ],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    path = tmp_path / "model.onnx"
    onnx.save(model, str(path))
    return path, w


def test_onnx_layers_orientation_names_and_groups(tmp_path: Path) -> None:
    path, w = _onnx_model(tmp_path)
    parsed = read_checkpoint(path)
    layers = _by_name(parsed)
    assert list(layers) == [
        "features.0.0",
        "gray",
        "dw_conv",
        "/pw/Conv",
        "fc1",
        "fc2",
        "/proj/MatMul",
    ]
    c0, gray, dw, pw = (layers[n] for n in ["features.0.0", "gray", "dw_conv", "/pw/Conv"])
    assert (c0.groups, c0.groups_source, c0.bn, c0.extra_params) == (1, "onnx", "features.0.1", 16)
    assert c0.bias is not None
    np.testing.assert_allclose(c0.bias, w["features.0.0.bias"], rtol=1e-6)
    # ONNX says group=1 although a (8, 1, 3, 3) conv after 8 outputs would be inferred depthwise
    assert (gray.groups, gray.groups_source) == (1, "onnx")
    assert (dw.groups, dw.groups_source, dw.is_depthwise) == (8, "onnx", True)
    np.testing.assert_allclose(dw.weight, w["dw"], rtol=1e-6)
    assert pw.shape == (16, 8, 1, 1)
    np.testing.assert_allclose(layers["fc1"].weight, w["fc1.weight"], rtol=1e-6)
    np.testing.assert_allclose(layers["fc2"].weight, w["fc2.weight"].T, rtol=1e-6)
    proj = layers["/proj/MatMul"]
    np.testing.assert_allclose(proj.weight, w["proj"].T, rtol=1e-6)
    assert proj.bias is not None
    np.testing.assert_allclose(proj.bias, w["proj_bias"], rtol=1e-6)
    assert all(x.kind == "linear" for x in (layers["fc1"], layers["fc2"], proj))
    assert "embedding" in _reasons(parsed)["tok"]
    info = parsed.info
    assert info.format == "onnx" and info.n_tensors == len(w)
    buffers = sum(v.size for k, v in w.items() if k.endswith(("running_mean", "running_var")))
    assert info.n_params == sum(v.size for v in w.values()) - buffers


def test_onnx_manifest_groups_win(tmp_path: Path) -> None:
    path, _ = _onnx_model(tmp_path)
    dw = _by_name(read_checkpoint(path, groups={"dw_conv": 1}))["dw_conv"]
    assert (dw.groups, dw.groups_source) == (1, "manifest")


def test_onnx_recurrent_nodes_are_recurrent_layers(tmp_path: Path) -> None:
    """An ONNX LSTM's W/R become torch's weight_ih_l0/weight_hh_l0, gates i,o,f,c -> i,f,g,o
    (service.ingest.onnx_recurrent; tests/service/test_onnx_dynamic.py checks exported torch
    models)."""
    rng = np.random.default_rng(0)
    inits = [
        _init("lstm.W", rng.standard_normal((1, 20, 3))),
        _init("lstm.R", rng.standard_normal((1, 20, 5))),
        _init("head.weight", rng.standard_normal((4, 5))),
    ]
    nodes = [
        helper.make_node("LSTM", ["x", "lstm.W", "lstm.R"], ["ys"], hidden_size=5),
        helper.make_node("Squeeze", ["ys"], ["s"]),
        helper.make_node("Gemm", ["s", "head.weight"], ["y"], transB=1),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [7, 1, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        initializer=inits,
    )
    path = tmp_path / "rnn.onnx"
    onnx.save(helper.make_model(graph), str(path))
    parsed = read_checkpoint(path)
    layers = {x.name: x.weight for x in parsed.layers}
    assert set(layers) == {"head", "lstm.weight_ih_l0", "lstm.weight_hh_l0"}
    assert _reasons(parsed) == {}
    torch_order = np.r_[0:5, 10:15, 15:20, 5:10]  # ONNX i, o, f, c -> torch i, f, g, o
    for name, onnx_w in (("ih", inits[0]), ("hh", inits[1])):
        w = numpy_helper.to_array(onnx_w)[0]
        np.testing.assert_array_equal(layers[f"lstm.weight_{name}_l0"], w[torch_order])


def test_onnx_external_data_is_refused(tmp_path: Path) -> None:
    path, _ = _onnx_model(tmp_path)
    model = onnx.load(str(path))
    ext = tmp_path / "ext.onnx"
    onnx.save(model, str(ext), save_as_external_data=True, size_threshold=0, location="ext.bin")
    with pytest.raises(CheckpointError, match="external data") as ei:
        read_checkpoint(ext)
    assert str(ext) in _message(ei)


def test_truncated_onnx_is_corrupt(tmp_path: Path) -> None:
    path, _ = _onnx_model(tmp_path)
    cut = tmp_path / "cut.onnx"
    cut.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt") as ei:
        read_checkpoint(cut)
    assert str(cut) in _message(ei)


# ------------------------------------------------------------------------ format detection


def test_format_comes_from_content_not_extension(tmp_path: Path) -> None:
    st = tmp_path / "x.pt"
    save_torch({k: v.contiguous() for k, v in _sd().items()}, str(st))
    pt = _save(tmp_path, _sd(), "y.onnx")
    onnx_path, _ = _onnx_model(tmp_path)
    as_st = tmp_path / "z.safetensors"
    as_st.write_bytes(onnx_path.read_bytes())
    assert read_checkpoint(st).info.format == "safetensors"
    assert read_checkpoint(pt).info.format == "pytorch"
    assert read_checkpoint(as_st).info.format == "onnx"
    assert [x.name for x in read_checkpoint(st).layers] == ["0", "3", "5", "7"]


def test_sha256_is_streamed_over_large_files(tmp_path: Path) -> None:
    sd = {"big.weight": torch.randn(600, 1000), "fc.weight": torch.randn(3, 600)}
    path = _save(tmp_path, sd)
    assert path.stat().st_size > 2 * 2**20
    a, b = read_checkpoint(path).info, read_checkpoint(path).info
    assert a.sha256 == b.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()


def test_error_messages_can_name_the_upload(tmp_path: Path) -> None:
    path = tmp_path / "blob"
    path.write_bytes(b"")
    with pytest.raises(UnsupportedFormatError) as ei:
        read_checkpoint(path, name="my-model.pt")
    assert "my-model.pt is empty" in _message(ei)


# ------------------------------------------------------------------------------- bad input


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.pt"
    with pytest.raises(CheckpointError, match="does not exist") as ei:
        read_checkpoint(path)
    assert str(path) in _message(ei)


def test_directory(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="not a regular file") as ei:
        read_checkpoint(tmp_path)
    assert str(tmp_path) in _message(ei)


def test_empty_file(tmp_path: Path) -> None:
    path = tmp_path / "empty.pt"
    path.write_bytes(b"")
    with pytest.raises(UnsupportedFormatError, match="is empty") as ei:
        read_checkpoint(path)
    assert str(path) in _message(ei)


def test_random_bytes(tmp_path: Path) -> None:
    data = np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes()
    assert data[0] not in (0x80, 0x08, ord("P"))
    path = tmp_path / "random.pt"
    path.write_bytes(data)
    with pytest.raises(UnsupportedFormatError, match="is not a PyTorch, safetensors or ONNX") as ei:
        read_checkpoint(path)
    assert str(path) in _message(ei)


def test_text_file(tmp_path: Path) -> None:
    path = tmp_path / "notes.safetensors"
    path.write_text("hello, this is not a model\n")
    with pytest.raises(UnsupportedFormatError, match="text file") as ei:
        read_checkpoint(path)
    assert str(path) in _message(ei)


def test_bytes_that_look_like_onnx_but_are_not(tmp_path: Path) -> None:
    path = tmp_path / "fake.onnx"
    path.write_bytes(b"\x08\x07" + bytes(range(256)) * 4)
    with pytest.raises(CheckpointError) as ei:
        read_checkpoint(path)
    assert str(path) in _message(ei)


def test_zip_that_is_not_a_torch_file(tmp_path: Path) -> None:
    path = tmp_path / "arrays.pt"
    with open(path, "wb") as f:
        np.savez(f, a=np.zeros(3))
    with pytest.raises(UnsupportedFormatError, match="zip archive") as ei:
        read_checkpoint(path)
    assert str(path) in _message(ei)


def test_truncated_zip(tmp_path: Path) -> None:
    full = _save(tmp_path, _sd(), "full.pt")
    path = tmp_path / "half.pt"
    path.write_bytes(full.read_bytes()[: full.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="is truncated or corrupt") as ei:
        read_checkpoint(path)
    assert not isinstance(ei.value, UnsafeCheckpointError)
    assert str(path) in _message(ei)


@pytest.mark.parametrize("keep", [0.5, 0.9])
def test_truncated_legacy_file(tmp_path: Path, keep: float) -> None:
    full = _save(tmp_path, _sd(), "full.pt", _use_new_zipfile_serialization=False)
    path = tmp_path / "cut.pt"
    path.write_bytes(full.read_bytes()[: int(full.stat().st_size * keep)])
    with pytest.raises(CheckpointError, match="is truncated or corrupt") as ei:
        read_checkpoint(path)
    assert not isinstance(ei.value, UnsafeCheckpointError)
    assert str(path) in _message(ei)


def test_plain_pickle_is_not_a_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "data.pkl"
    path.write_bytes(pickle.dumps({"a": [1, 2, 3]}, protocol=2))
    with pytest.raises(UnsupportedFormatError, match="pickle") as ei:
        read_checkpoint(path)
    assert str(path) in _message(ei)


class _Evil:
    """Unpickling this runs a shell command that creates the file ``sentinel``."""

    def __init__(self, sentinel: Path) -> None:
        self.sentinel = sentinel

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.system, (f"touch '{self.sentinel}'",))


def test_the_malicious_payload_is_real(tmp_path: Path) -> None:
    """Guards the tests below: plain pickle.loads of the payload does create the sentinel."""
    sentinel = tmp_path / "SENTINEL"
    pickle.loads(pickle.dumps(_Evil(sentinel)))  # on purpose
    assert sentinel.exists()


@pytest.mark.parametrize("how", ["raw-pickle", "torch-zip", "torch-legacy"])
def test_malicious_pickle_is_refused_and_never_run(tmp_path: Path, how: str) -> None:
    sentinel = tmp_path / "SENTINEL"
    payload = {"state_dict": _sd(), "hook": _Evil(sentinel)}
    path = tmp_path / f"{how}.pt"
    if how == "raw-pickle":
        payload = {"weights": [0.5, 1.5], "hook": _Evil(sentinel)}
        path.write_bytes(pickle.dumps(payload, protocol=2))
    else:
        _save(tmp_path, payload, path.name, _use_new_zipfile_serialization=how == "torch-zip")
    with pytest.raises(UnsafeCheckpointError) as ei:
        read_checkpoint(path)
    assert str(path) in _message(ei)
    assert "system" in _message(ei)
    assert not sentinel.exists()


def test_pickled_objects_that_are_not_tensors_are_refused(tmp_path: Path) -> None:
    import argparse

    path = _save(tmp_path, {"args": argparse.Namespace(lr=0.1), "state_dict": _sd()})
    with pytest.raises(UnsafeCheckpointError, match=r"argparse\.Namespace") as ei:
        read_checkpoint(path)
    assert str(path) in _message(ei)


# ------------------------------------------------------------------------- real checkpoints


REAL_FILES = [
    "mobilenet_v2_imagenet.pth",
    "digit_cnn.pth",
    "mtcnn_pnet.pt",
    "mtcnn_rnet.pt",
    "mtcnn_onet.pt",
]


@pytest.mark.real
@pytest.mark.parametrize("name", REAL_FILES)
def test_real_every_weight_is_a_layer_or_skipped(realdata: Path, name: str) -> None:
    path = realdata / name
    sd = torch.load(path, weights_only=True, map_location="cpu")
    weights = {k[: -len(".weight")] for k, v in sd.items() if k.endswith(".weight") and v.ndim >= 2}
    parsed = read_checkpoint(path)
    names = [x.name for x in parsed.layers]
    assert weights == set(names) | {s.name for s in parsed.skipped}
    assert names == [k for k in (k[: -len(".weight")] for k in sd) if k in set(names)]
    for layer in parsed.layers:
        np.testing.assert_array_equal(layer.weight, sd[layer.name + ".weight"].numpy())
    info = parsed.info
    assert info.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert info.sha256 == read_checkpoint(path).info.sha256
    assert info.n_tensors == len(sd)


@pytest.mark.real
def test_real_mobilenet_v2(realdata: Path) -> None:
    parsed = read_checkpoint(realdata / "mobilenet_v2_imagenet.pth")
    convs = [x for x in parsed.layers if x.kind == "conv2d"]
    assert len(parsed.layers) == 53 and len(convs) == 52 and parsed.skipped == ()
    inferred = [x for x in parsed.layers if x.groups_source == "inferred"]
    assert len(inferred) == 17
    assert all(x.is_depthwise and x.groups == x.n_filters > 1 for x in inferred)
    assert all(x.groups == 1 for x in parsed.layers if x.groups_source != "inferred")
    assert all(x.bn is not None and x.extra_params == 2 * x.n_filters for x in convs)
    assert parsed.layers[-1].name == "classifier.1" and parsed.layers[-1].bn is None
    assert parsed.layers[0].bn == "features.0.1"
    assert parsed.info.n_params == 3_504_872  # torchvision's MobileNetV2 parameter count


@pytest.mark.real
def test_real_digit_cnn_first_conv_is_not_depthwise(realdata: Path) -> None:
    parsed = read_checkpoint(realdata / "digit_cnn.pth")
    assert [x.name for x in parsed.layers] == [
        "conv_layers.0",
        "conv_layers.3",
        "conv_layers.6",
        "fc_layers.0",
        "fc_layers.2",
    ]
    first = parsed.layers[0]
    assert first.shape == (32, 1, 3, 3) and first.groups == 1 and not first.is_depthwise
    assert all(x.groups_source == "default" and x.bias is not None for x in parsed.layers)


@pytest.mark.real
def test_real_mtcnn(realdata: Path) -> None:
    pnet = _by_name(read_checkpoint(realdata / "mtcnn_pnet.pt"))
    assert list(pnet) == ["conv1", "conv2", "conv3", "conv4_1", "conv4_2"]
    assert pnet["conv4_1"].n_filters == 2
    onet = read_checkpoint(realdata / "mtcnn_onet.pt")
    assert [x.kind for x in onet.layers].count("linear") == 4
    assert all(x.groups == 1 for x in onet.layers)


# ------------------------------------------------------------------ hostile and unusual files


def test_zip_bomb_is_refused_without_inflating_it(tmp_path: Path) -> None:
    """A small zip whose deflated data.pkl declares 200 MB is refused from its directory."""
    import tracemalloc

    path = tmp_path / "bomb.pt"
    chunk = bytes(1 << 20)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED, compresslevel=1) as zf:
        with zf.open("archive/data.pkl", "w", force_zip64=True) as member:
            for _ in range(200):
                member.write(chunk)
        zf.writestr("archive/version", "3\n")
    assert path.stat().st_size < 2 << 20
    tracemalloc.start()
    try:
        with pytest.raises(CheckpointError, match="compression bomb") as ei:
            read_checkpoint(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert str(path) in _message(ei)
    assert peak < 16 << 20, f"{peak} bytes allocated"


def test_members_that_fit_the_archive_are_still_crc_checked(tmp_path: Path) -> None:
    src = _save(tmp_path, _sd(), "ok.pt")
    raw = bytearray(src.read_bytes())
    with zipfile.ZipFile(src) as zf:
        info = zf.getinfo(next(n for n in zf.namelist() if n.endswith("/data.pkl")))
    start = info.header_offset + 30 + len(info.filename.encode()) + len(info.extra)
    raw[start + info.compress_size // 2] ^= 0xFF  # flip one byte inside the stored pickle
    path = tmp_path / "flipped.pt"
    path.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        read_checkpoint(path)


def test_legacy_pickle_declaring_a_huge_length_is_corrupt(tmp_path: Path) -> None:
    """BINBYTES8 of 2**50 bytes in a 30-byte file: refused, never asked of the file."""
    path = tmp_path / "huge.pt"
    path.write_bytes((b"\x80\x02\x8e" + (2**50).to_bytes(8, "little")).ljust(30, b"x"))
    with pytest.raises(CheckpointError, match="truncated or corrupt") as ei:
        read_checkpoint(path)
    assert not isinstance(ei.value, UnsafeCheckpointError)
    assert str(path) in _message(ei)


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
    assert str(path) in _message(ei)


def test_best_metric_tensors_next_to_the_model_do_not_win(tmp_path: Path) -> None:
    obj = {"model": _sd(), "best_acc": torch.tensor(0.93), "epoch": torch.tensor(7)}
    parsed = read_checkpoint(_save(tmp_path, obj))
    assert [layer.name for layer in parsed.layers] == ["0", "3", "5", "7"]


def test_without_known_keys_the_mapping_with_most_weights_wins(tmp_path: Path) -> None:
    small = {"head.weight": torch.randn(5, 7)}
    obj = {"teacher_head": small, "weights_v2": _sd(), "lr": torch.tensor(0.1)}
    parsed = read_checkpoint(_save(tmp_path, obj))
    assert [layer.name for layer in parsed.layers] == ["0", "3", "5", "7"]


def test_averaged_model_state_dict_loses_its_module_prefix(tmp_path: Path) -> None:
    from torch.optim.swa_utils import AveragedModel

    sd = AveragedModel(_net()).state_dict()
    assert "n_averaged" in sd and all(k.startswith("module.") for k in sd if k != "n_averaged")
    for path in (_save(tmp_path, sd), tmp_path / "swa.safetensors"):
        if path.suffix == ".safetensors":
            save_torch({k: v.contiguous() for k, v in sd.items()}, str(path))
        layers = _by_name(read_checkpoint(path))
        assert sorted(layers) == ["0", "3", "5", "7"]
        assert layers["0"].bn == "1" and layers["3"].producer == "0"


@pytest.mark.filterwarnings("ignore:`torch.jit.*deprecated:DeprecationWarning")
def test_torchscript_archives_are_refused_with_advice(tmp_path: Path) -> None:
    path = tmp_path / "scripted.pt"
    torch.jit.save(torch.jit.script(_net()), str(path))
    with pytest.raises(UnsupportedFormatError, match="TorchScript archive") as ei:
        read_checkpoint(path)
    assert "state_dict()" in _message(ei) and str(path) in _message(ei)
    assert "weights_only" not in str(ei.value)


def test_torch_advice_to_turn_weights_only_off_is_never_passed_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    advice = (
        "Cannot use ``weights_only=True`` with this archive. In PyTorch 2.6, we changed the "
        "default value of the `weights_only` argument in `torch.load` from `False` to `True`. "
        "Re-running `torch.load` with `weights_only` set to `False` will likely succeed, but it "
        "can result in arbitrary code execution. Do it only if you got the file from a trusted "
        "source."
    )
    path = _save(tmp_path, _sd())

    def fail(*args: object, **kwargs: object) -> None:
        raise RuntimeError(advice)

    monkeypatch.setattr(torch, "load", fail)
    with pytest.raises(CheckpointError, match="truncated or corrupt") as ei:
        read_checkpoint(path)
    text = str(ei.value)
    assert "False" not in text and "trusted source" not in text and "weights_only" not in text


# -------------------------------------------------------------------- depthwise producers


def test_depthwise_producer_is_the_layer_used_for_inference_even_if_skipped(
    tmp_path: Path,
) -> None:
    sd = {
        "stem.weight": torch.randn(8, 3, 3, 3),
        "a.weight": torch.full((8, 8, 3, 3), float("nan")),
        "dw.weight": torch.randn(8, 1, 3, 3),
        "dw2.weight": torch.randn(8, 1, 3, 3),
        "pw.weight": torch.randn(16, 8, 1, 1),
    }
    parsed = read_checkpoint(_save(tmp_path, sd))
    layers = _by_name(parsed)
    assert _reasons(parsed)["a"] == NAN_REASON
    assert (layers["dw"].groups, layers["dw"].groups_source) == (8, "inferred")
    assert layers["dw"].producer == "a"
    assert layers["dw2"].producer == "a"  # a depthwise conv after a depthwise conv
    assert layers["stem"].producer is None and layers["pw"].producer is None
    manifest = _by_name(read_checkpoint(_save(tmp_path, sd), groups={"dw": 8, "dw2": 1}))
    assert manifest["dw"].producer == "a" and manifest["dw2"].producer is None


def _onnx_dw_graph(tmp_path: Path) -> Path:
    rng = np.random.default_rng(3)
    inits = [
        _init("a.weight", rng.standard_normal((8, 3, 1, 1))),
        _init("b.weight", rng.standard_normal((8, 3, 1, 1))),
        _init("dw1.weight", rng.standard_normal((8, 1, 3, 3))),
        _init("dw2.weight", rng.standard_normal((8, 1, 3, 3))),
        _init("dw3.weight", rng.standard_normal((8, 1, 3, 3))),
        *(_init(f"bn.{k}", rng.random(8) + 0.5) for k in ("w", "b", "m", "v")),
        _init("lo", np.zeros(())),
        _init("hi", np.full((), 6.0)),
    ]
    conv = helper.make_node
    nodes = [
        conv("Conv", ["x", "a.weight"], ["a"], name="/a"),
        conv("Conv", ["x", "b.weight"], ["b"], name="/b"),  # between a and dw1 in graph order
        conv("BatchNormalization", ["a", "bn.w", "bn.b", "bn.m", "bn.v"], ["an"], name="/bn"),
        conv("Clip", ["an", "lo", "hi"], ["ac"]),
        conv("Sigmoid", ["ac"], ["as"]),
        conv("Mul", ["ac", "as"], ["aw"]),  # swish: both inputs come from a
        conv("Conv", ["aw", "dw1.weight"], ["d1"], name="/dw1", group=8, pads=[1, 1, 1, 1]),
        conv("Conv", ["d1", "dw2.weight"], ["d2"], name="/dw2", group=8, pads=[1, 1, 1, 1]),
        conv("Add", ["a", "b"], ["ab"]),  # a residual sum: no single producer
        conv("Conv", ["ab", "dw3.weight"], ["d3"], name="/dw3", group=8, pads=[1, 1, 1, 1]),
    ]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])
    outs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [1, 8, 8, 8]) for n in ("d2", "d3")]
    graph = helper.make_graph(nodes, "g", [x], outs, initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    path = tmp_path / "dw.onnx"
    onnx.save(model, str(path))
    return path


def test_onnx_depthwise_producers_come_from_the_graph(tmp_path: Path) -> None:
    layers = _by_name(read_checkpoint(_onnx_dw_graph(tmp_path)))
    assert [layers[n].groups_source for n in ("dw1", "dw2", "dw3")] == ["onnx"] * 3
    assert layers["dw1"].producer == "a"  # through BN, Clip and swish, not b (nearer in order)
    assert layers["dw2"].producer == "a"  # through dw1
    assert layers["dw3"].producer is None
    path, _ = _onnx_model(tmp_path)
    assert _by_name(read_checkpoint(path))["dw_conv"].producer == "features.0.0"


class _InvertedResidual(nn.Module):
    """timm's attribute names and registration order (conv_pw, bn1, conv_dw, bn2, se, ...)."""

    def __init__(self, cin: int, mid: int, cout: int) -> None:
        super().__init__()
        self.conv_pw = nn.Conv2d(cin, mid, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(mid)
        self.conv_dw = nn.Conv2d(mid, mid, 3, groups=mid, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        self.se = nn.ModuleDict(
            {"conv_reduce": nn.Conv2d(mid, 8, 1), "conv_expand": nn.Conv2d(8, mid, 1)}
        )
        self.conv_pwl = nn.Conv2d(mid, cout, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(cout)


class _DepthwiseSeparable(nn.Module):
    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.conv_dw = nn.Conv2d(cin, cin, 3, groups=cin, bias=False)
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv_pw = nn.Conv2d(cin, cout, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)


def _timm_like() -> nn.Module:
    torch.manual_seed(2)
    net = nn.Module()
    net.conv_stem = nn.Conv2d(3, 16, 3, bias=False)
    net.bn1 = nn.BatchNorm2d(16)
    net.blocks = nn.Sequential(
        nn.Sequential(_DepthwiseSeparable(16, 24)),
        nn.Sequential(_InvertedResidual(24, 72, 32), _InvertedResidual(32, 96, 32)),
        nn.Sequential(_DepthwiseSeparable(32, 40)),
    )
    net.conv_head = nn.Conv2d(40, 64, 1, bias=False)
    net.bn2 = nn.BatchNorm2d(64)
    net.classifier = nn.Linear(64, 10)
    return net


def _summary(parsed: ParsedCheckpoint) -> dict[str, tuple[object, ...]]:
    return {
        x.name: (x.groups, x.groups_source, x.bn, x.extra_params, x.producer) for x in parsed.layers
    }


def test_safetensors_without_order_finds_the_same_producers_and_bns(tmp_path: Path) -> None:
    sd = {k: v.contiguous() for k, v in _timm_like().state_dict().items()}
    pt = read_checkpoint(_save(tmp_path, sd))
    st_path = tmp_path / "timm.safetensors"
    save_torch(sd, str(st_path))
    st = read_checkpoint(st_path)
    assert _summary(st) == _summary(pt)
    layers = _by_name(st)
    assert layers["blocks.0.0.conv_dw"].producer == "conv_stem"
    assert layers["blocks.1.0.conv_dw"].producer == "blocks.1.0.conv_pw"
    assert layers["blocks.2.0.conv_dw"].producer == "blocks.1.1.conv_pwl"
    assert layers["blocks.1.0.conv_pw"].bn == "blocks.1.0.bn1"
    assert layers["blocks.1.0.conv_dw"].bn == "blocks.1.0.bn2"
    assert layers["blocks.1.0.conv_pwl"].bn == "blocks.1.0.bn3"
    assert layers["conv_stem"].bn == "bn1" and layers["conv_head"].bn == "bn2"
    depthwise = [x.name for x in st.layers if x.is_depthwise]
    assert depthwise == [n for n in layers if n.endswith("conv_dw")]


def test_safetensors_unclear_producer_is_depthwise_without_producer(tmp_path: Path) -> None:
    """Two width-8 siblings could feed blk.conv_dw: it stays depthwise, its producer unknown."""
    sd = {
        "blk.conv_a.weight": torch.randn(8, 4, 1, 1),
        "blk.conv_b.weight": torch.randn(8, 4, 1, 1),
        "blk.conv_dw.weight": torch.randn(8, 1, 3, 3),
        "gray.0.weight": torch.randn(8, 1, 3, 3),  # first conv of its Sequential: not depthwise
    }
    path = tmp_path / "amb.safetensors"
    save_torch(sd, str(path))
    layers = _by_name(read_checkpoint(path))
    dw = layers["blk.conv_dw"]
    assert (dw.groups, dw.groups_source, dw.producer) == (8, "inferred", None)
    assert (layers["gray.0"].groups, layers["gray.0"].groups_source) == (1, "default")


@pytest.mark.real
def test_real_mobilenet_v2_as_safetensors_has_the_same_producers(
    realdata: Path, tmp_path: Path
) -> None:
    pth = read_checkpoint(realdata / "mobilenet_v2_imagenet.pth")
    sd = torch.load(realdata / "mobilenet_v2_imagenet.pth", weights_only=True, map_location="cpu")
    path = tmp_path / "mobilenet_v2.safetensors"
    save_torch({k: v.contiguous() for k, v in sd.items()}, str(path))
    st = read_checkpoint(path)
    producers = {x.name: x.producer for x in pth.layers if x.is_depthwise}
    assert len(producers) == 17
    assert producers["features.1.conv.0.0"] == "features.0.0"
    rest = {n: p for n, p in producers.items() if n != "features.1.conv.0.0"}
    assert all(p == f"{n.removesuffix('1.0')}0.0" for n, p in rest.items())
    assert {x.name: x.producer for x in st.layers if x.is_depthwise} == producers
    assert _summary(st) == _summary(pth)


def test_onnx_names_that_are_not_utf8_are_corrupt_not_a_crash(tmp_path: Path) -> None:
    path, _ = _onnx_model(tmp_path)
    data = path.read_bytes()
    assert data.count(b"tok.weight") >= 1
    path.write_bytes(data.replace(b"tok.weight", b"tok.weigh\xff"))
    with pytest.raises(CheckpointError, match="corrupt") as ei:
        read_checkpoint(path)
    assert str(path) in _message(ei)
