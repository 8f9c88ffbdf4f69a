"""Reading .pt/.pth checkpoints (service.ingest.torch_file through read_checkpoint): nesting,
prefixes, dtypes, and hostile or broken pickles and zips (refused, never run)."""

from __future__ import annotations

import hashlib
import os
import pickle
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file as save_torch
from torch import nn

from graphs.errors import (
    CheckpointError,
    NoPrunableLayersError,
    UnsafeCheckpointError,
    UnsupportedFormatError,
)
from service.ingest.checkpoint import (
    read_checkpoint,
)
from tests.service.ingest.helpers import by_name, message, save, small_net, state_dict

Tensors = dict[str, torch.Tensor]


# ------------------------------------------------------------------------------------ pytorch


def test_plain_state_dict(tmp_path: Path) -> None:
    sd = state_dict()
    path = save(tmp_path, sd)
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
    assert info.n_params == sum(p.numel() for p in small_net().parameters())
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
    parsed = read_checkpoint(save(tmp_path, wrap(state_dict())))
    assert [layer.name for layer in parsed.layers] == ["0", "3", "5", "7"]


def test_nesting_deeper_than_three_levels_is_not_searched(tmp_path: Path) -> None:
    path = save(tmp_path, {"a": {"b": {"c": {"d": {"state_dict": state_dict()}}}}, "e": 1})
    with pytest.raises(NoPrunableLayersError) as ei:
        read_checkpoint(path)
    assert str(path) in message(ei)


def test_known_keys_win_over_other_tensor_dicts(tmp_path: Path) -> None:
    other = {"head.weight": torch.randn(5, 7)}
    parsed = read_checkpoint(save(tmp_path, {"aux": other, "state_dict": state_dict(), "x": 0}))
    assert "head" not in by_name(parsed) and "0" in by_name(parsed)


@pytest.mark.parametrize(
    "prefix", ["module.", "_orig_mod.", "module._orig_mod.", "_orig_mod.module."]
)
def test_wrapper_prefixes_are_stripped(tmp_path: Path, prefix: str) -> None:
    sd = {prefix + k: v for k, v in state_dict().items()}
    parsed = read_checkpoint(save(tmp_path, {"model": sd}))
    assert [layer.name for layer in parsed.layers] == ["0", "3", "5", "7"]
    assert parsed.layers[0].bn == "1"


def test_a_submodule_called_module_is_not_a_prefix(tmp_path: Path) -> None:
    sd = {"module.fc.weight": torch.randn(4, 3), "head.weight": torch.randn(2, 4)}
    parsed = read_checkpoint(save(tmp_path, sd))
    assert [layer.name for layer in parsed.layers] == ["module.fc", "head"]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_tensors_become_float32(tmp_path: Path, dtype: torch.dtype) -> None:
    sd = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state_dict().items()}
    parsed = read_checkpoint(save(tmp_path, sd))
    conv0 = parsed.layers[0]
    assert conv0.weight.dtype == np.float32
    np.testing.assert_array_equal(conv0.weight, sd["0.weight"].float().numpy())
    assert parsed.info.n_params == sum(p.numel() for p in small_net().parameters())


def test_float64_is_kept(tmp_path: Path) -> None:
    sd = {"a.weight": torch.randn(4, 3, dtype=torch.float64), "b.weight": torch.randn(2, 4)}
    parsed = read_checkpoint(save(tmp_path, sd))
    assert parsed.layers[0].weight.dtype == np.float64
    assert parsed.layers[1].weight.dtype == np.float32


def test_legacy_torch_format(tmp_path: Path) -> None:
    path = save(tmp_path, state_dict(), _use_new_zipfile_serialization=False)
    assert not path.read_bytes().startswith(b"PK")
    parsed = read_checkpoint(path)
    assert [layer.name for layer in parsed.layers] == ["0", "3", "5", "7"]
    assert parsed.info.format == "pytorch"


def test_cuda_tensors_load_on_cpu(tmp_path: Path) -> None:
    """A file whose storages say cuda:0 (as saved on a GPU) loads through map_location=cpu."""
    src = save(tmp_path, {"c.weight": torch.randn(4, 3, 3, 3)}, "cpu.pt")
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
    sd: dict[str, object] = dict(state_dict())
    sd["meta"] = "v1"
    sd["step"] = 7
    parsed = read_checkpoint(save(tmp_path, sd))
    assert len(parsed.layers) == 4 and parsed.info.n_tensors == len(state_dict())


def test_a_single_module_state_dict_has_the_root_name(tmp_path: Path) -> None:
    parsed = read_checkpoint(save(tmp_path, nn.Conv2d(3, 8, 3).state_dict()))
    assert [(x.name, x.kind, x.bias is not None) for x in parsed.layers] == [("", "conv2d", True)]


def test_top_level_tensors_among_many_other_entries(tmp_path: Path) -> None:
    obj = {"fc.weight": torch.randn(4, 3), "a": 1, "b": "x", "c": [1]}
    assert [x.name for x in read_checkpoint(save(tmp_path, obj)).layers] == ["fc"]


def test_a_checkpoint_without_tensors(tmp_path: Path) -> None:
    path = save(tmp_path, {"epoch": 3, "config": {"lr": 0.1}})
    with pytest.raises(NoPrunableLayersError, match="no tensors") as ei:
        read_checkpoint(path)
    assert str(path) in message(ei)


def test_zip_that_is_not_a_torch_file(tmp_path: Path) -> None:
    path = tmp_path / "arrays.pt"
    with open(path, "wb") as f:
        np.savez(f, a=np.zeros(3))
    with pytest.raises(UnsupportedFormatError, match="zip archive") as ei:
        read_checkpoint(path)
    assert str(path) in message(ei)


def test_truncated_zip(tmp_path: Path) -> None:
    full = save(tmp_path, state_dict(), "full.pt")
    path = tmp_path / "half.pt"
    path.write_bytes(full.read_bytes()[: full.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="is truncated or corrupt") as ei:
        read_checkpoint(path)
    assert not isinstance(ei.value, UnsafeCheckpointError)
    assert str(path) in message(ei)


@pytest.mark.parametrize("keep", [0.5, 0.9])
def test_truncated_legacy_file(tmp_path: Path, keep: float) -> None:
    full = save(tmp_path, state_dict(), "full.pt", _use_new_zipfile_serialization=False)
    path = tmp_path / "cut.pt"
    path.write_bytes(full.read_bytes()[: int(full.stat().st_size * keep)])
    with pytest.raises(CheckpointError, match="is truncated or corrupt") as ei:
        read_checkpoint(path)
    assert not isinstance(ei.value, UnsafeCheckpointError)
    assert str(path) in message(ei)


def test_plain_pickle_is_not_a_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "data.pkl"
    path.write_bytes(pickle.dumps({"a": [1, 2, 3]}, protocol=2))
    with pytest.raises(UnsupportedFormatError, match="pickle") as ei:
        read_checkpoint(path)
    assert str(path) in message(ei)


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
    payload = {"state_dict": state_dict(), "hook": _Evil(sentinel)}
    path = tmp_path / f"{how}.pt"
    if how == "raw-pickle":
        payload = {"weights": [0.5, 1.5], "hook": _Evil(sentinel)}
        path.write_bytes(pickle.dumps(payload, protocol=2))
    else:
        save(tmp_path, payload, path.name, _use_new_zipfile_serialization=how == "torch-zip")
    with pytest.raises(UnsafeCheckpointError) as ei:
        read_checkpoint(path)
    assert str(path) in message(ei)
    assert "system" in message(ei)
    assert not sentinel.exists()


def test_pickled_objects_that_are_not_tensors_are_refused(tmp_path: Path) -> None:
    import argparse

    path = save(tmp_path, {"args": argparse.Namespace(lr=0.1), "state_dict": state_dict()})
    with pytest.raises(UnsafeCheckpointError, match=r"argparse\.Namespace") as ei:
        read_checkpoint(path)
    assert str(path) in message(ei)


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
    assert str(path) in message(ei)
    assert peak < 16 << 20, f"{peak} bytes allocated"


def test_members_that_fit_the_archive_are_still_crc_checked(tmp_path: Path) -> None:
    src = save(tmp_path, state_dict(), "ok.pt")
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
    assert str(path) in message(ei)


def test_best_metric_tensors_next_to_the_model_do_not_win(tmp_path: Path) -> None:
    obj = {"model": state_dict(), "best_acc": torch.tensor(0.93), "epoch": torch.tensor(7)}
    parsed = read_checkpoint(save(tmp_path, obj))
    assert [layer.name for layer in parsed.layers] == ["0", "3", "5", "7"]


def test_without_known_keys_the_mapping_with_most_weights_wins(tmp_path: Path) -> None:
    small = {"head.weight": torch.randn(5, 7)}
    obj = {"teacher_head": small, "weights_v2": state_dict(), "lr": torch.tensor(0.1)}
    parsed = read_checkpoint(save(tmp_path, obj))
    assert [layer.name for layer in parsed.layers] == ["0", "3", "5", "7"]


def test_averaged_model_state_dict_loses_its_module_prefix(tmp_path: Path) -> None:
    from torch.optim.swa_utils import AveragedModel

    sd = AveragedModel(small_net()).state_dict()
    assert "n_averaged" in sd and all(k.startswith("module.") for k in sd if k != "n_averaged")
    for path in (save(tmp_path, sd), tmp_path / "swa.safetensors"):
        if path.suffix == ".safetensors":
            save_torch({k: v.contiguous() for k, v in sd.items()}, str(path))
        layers = by_name(read_checkpoint(path))
        assert sorted(layers) == ["0", "3", "5", "7"]
        assert layers["0"].bn == "1" and layers["3"].producer == "0"


@pytest.mark.filterwarnings("ignore:`torch.jit.*deprecated:DeprecationWarning")
def test_torchscript_archives_are_refused_with_advice(tmp_path: Path) -> None:
    path = tmp_path / "scripted.pt"
    torch.jit.save(torch.jit.script(small_net()), str(path))
    with pytest.raises(UnsupportedFormatError, match="TorchScript archive") as ei:
        read_checkpoint(path)
    assert "state_dict()" in message(ei) and str(path) in message(ei)
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
    path = save(tmp_path, state_dict())

    def fail(*args: object, **kwargs: object) -> None:
        raise RuntimeError(advice)

    monkeypatch.setattr(torch, "load", fail)
    with pytest.raises(CheckpointError, match="truncated or corrupt") as ei:
        read_checkpoint(path)
    text = str(ei.value)
    assert "False" not in text and "trusted source" not in text and "weights_only" not in text
