"""Sharded safetensors folders and lazy (memory-mapped) reading of large safetensors files."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from graphs import analyze
from graphs.errors import CheckpointError
from service.ingest.checkpoint import read_checkpoint

ROOT = Path(__file__).resolve().parents[3]


def _state(rng: np.random.Generator) -> dict[str, np.ndarray]:
    base = rng.standard_normal((12, 3, 3, 3)).astype(np.float32)
    return {
        "features.0.weight": np.concatenate([base, base + 0.01 * base]),  # planted duplicates
        "features.1.weight": rng.random(24, dtype=np.float32) + 0.5,
        "features.1.bias": rng.standard_normal(24).astype(np.float32),
        "features.1.running_mean": np.zeros(24, np.float32),
        "features.1.running_var": np.ones(24, np.float32),
        "features.3.weight": rng.standard_normal((32, 24, 3, 3)).astype(np.float32),
        "features.6.weight": rng.standard_normal((48, 32, 1, 1)).astype(np.float16),
        "classifier.weight": rng.standard_normal((10, 48)).astype(np.float32),
        "classifier.bias": rng.standard_normal(10).astype(np.float32),
    }


def _shard(
    folder: Path, tensors: dict[str, np.ndarray], n: int, name: str = "model"
) -> dict[str, str]:
    """``tensors`` as n shards plus ``model.safetensors.index.json`` (transformers' layout)."""
    folder.mkdir(parents=True, exist_ok=True)
    keys = sorted(tensors)
    weight_map: dict[str, str] = {}
    for i in range(n):
        file = f"{name}-{i + 1:05d}-of-{n:05d}.safetensors"
        part = {k: tensors[k] for k in keys[i::n]}
        save_file(part, str(folder / file))
        weight_map |= dict.fromkeys(part, file)
    index = {"metadata": {"total_size": 0}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    return weight_map


def _comparable(path: Path) -> tuple[object, ...]:
    ckpt = read_checkpoint(path)
    report = analyze(ckpt.layers, checkpoint=ckpt.info, skipped=ckpt.skipped, seed=1)
    return (
        ckpt.info.n_tensors,
        ckpt.info.n_params,
        [layer.model_dump() for layer in report.layers],
        report.skipped,
        report.summary,
    )


@pytest.mark.parametrize("n_shards", [2, 3])
def test_a_sharded_folder_gives_the_report_of_the_single_file(
    tmp_path: Path, n_shards: int
) -> None:
    tensors = _state(np.random.default_rng(0))
    single = tmp_path / "single.safetensors"
    save_file(tensors, str(single))
    folder = tmp_path / "sharded"
    _shard(folder, tensors, n_shards)
    expected = _comparable(single)
    assert _comparable(folder) == expected
    assert _comparable(folder / "model.safetensors.index.json") == expected
    info = read_checkpoint(folder).info
    assert info.format == "safetensors" and info.n_tensors == len(tensors)
    assert info.size_bytes == sum(f.stat().st_size for f in folder.glob("*.safetensors"))
    assert read_checkpoint(folder).info.sha256 == info.sha256  # shards' digest, deterministic


def test_a_folder_with_one_safetensors_file_is_read(tmp_path: Path) -> None:
    save_file(_state(np.random.default_rng(0)), str(tmp_path / "model.safetensors"))
    (tmp_path / "README.md").write_text("not a checkpoint")
    assert (
        read_checkpoint(tmp_path).info.sha256
        == read_checkpoint(tmp_path / "model.safetensors").info.sha256
    )


@pytest.mark.parametrize(
    "bad", ["../outside.safetensors", "/etc/passwd", "sub/../../x.safetensors", "C:\\x", ""]
)
def test_a_shard_name_escaping_the_folder_is_refused(tmp_path: Path, bad: str) -> None:
    (tmp_path / "outside.safetensors").write_bytes(b"")
    folder = tmp_path / "model"
    weight_map = _shard(folder, _state(np.random.default_rng(0)), 2)
    key = next(iter(weight_map))
    weight_map[key] = bad
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(CheckpointError, match="not a file inside its folder") as ei:
        read_checkpoint(folder)
    assert "'..'" in str(ei.value)


def test_a_missing_shard_is_refused(tmp_path: Path) -> None:
    folder = tmp_path / "model"
    _shard(folder, _state(np.random.default_rng(0)), 3)
    (folder / "model-00002-of-00003.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"model-00002-of-00003\.safetensors.*missing"):
        read_checkpoint(folder)


def test_index_and_shards_must_agree(tmp_path: Path) -> None:
    folder = tmp_path / "model"
    weight_map = _shard(folder, _state(np.random.default_rng(0)), 2)
    files = sorted(set(weight_map.values()))
    key = next(k for k, f in weight_map.items() if f == files[0])
    index = folder / "model.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": {**weight_map, key: files[1]}}))
    with pytest.raises(CheckpointError, match=f"puts '{key}' in {files[1]}, which lacks it"):
        read_checkpoint(folder)
    save_file({key: np.ones((2, 2), np.float32)}, str(folder / "extra.safetensors"))
    index.write_text(json.dumps({"weight_map": {**weight_map, "x": "extra.safetensors"}}))
    with pytest.raises(CheckpointError, match="is in both"):
        read_checkpoint(folder)
    for broken in ("[1, 2]", '{"weight_map": {"a": 3}}', "{"):
        index.write_text(broken)
        with pytest.raises(CheckpointError):
            read_checkpoint(index)


def test_a_corrupt_shard_is_refused_like_a_single_file(tmp_path: Path) -> None:
    folder = tmp_path / "model"
    _shard(folder, _state(np.random.default_rng(0)), 2)
    shard = folder / "model-00001-of-00002.safetensors"
    shard.write_bytes(shard.read_bytes()[:-7])
    with pytest.raises(CheckpointError, match=r"shard model-00001-of-00002\.safetensors"):
        read_checkpoint(folder)


def test_a_folder_without_a_checkpoint_says_what_it_needs(tmp_path: Path) -> None:
    (tmp_path / "a.safetensors").write_bytes(b"")
    (tmp_path / "b.safetensors").write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"model\.safetensors\.index\.json"):
        read_checkpoint(tmp_path)


def test_weights_are_read_only_views_of_the_file(tmp_path: Path) -> None:
    path = tmp_path / "m.safetensors"
    save_file(_state(np.random.default_rng(0)), str(path))
    layer = next(x for x in read_checkpoint(path).layers if x.name == "features.3")
    assert not layer.weight.flags.writeable and not layer.weight.flags.owndata
    filters = layer.filters()
    assert filters.flags.writeable and filters.dtype == np.float64
    filters[:] = 0  # the analysis' copy, never the file
    assert np.any(layer.weight)


_MEASURE = """
import resource, sys
from graphs import analyze
from service.ingest.checkpoint import read_checkpoint
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
ckpt = read_checkpoint(sys.argv[1])
analyze(ckpt.layers, checkpoint=ckpt.info, skipped=ckpt.skipped, methods=["l1"])
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) * 1024)
"""


@pytest.mark.slow
@pytest.mark.parametrize("sharded", [False, True])
def test_analysing_a_large_file_keeps_memory_near_one_layer(tmp_path: Path, sharded: bool) -> None:
    """16 layers of 1024×4096 float32 (256 MiB): reading everything would grow RSS by the file
    size (and did: +260 MiB before lazy reading); layer by layer, the growth is about one layer
    in float64 and the method's temporaries (measured +68 MiB)."""
    rng = np.random.default_rng(0)
    tensors = {
        f"blocks.{i}.fc.weight": rng.standard_normal((1024, 4096), dtype=np.float32)
        for i in range(16)
    }
    size = sum(a.nbytes for a in tensors.values())
    if sharded:
        path = tmp_path / "sharded"
        _shard(path, tensors, 3)
    else:
        path = tmp_path / "big.safetensors"
        save_file(tensors, str(path))
    del tensors
    done = subprocess.run(
        [sys.executable, "-c", _MEASURE, str(path)], cwd=ROOT, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    growth = int(done.stdout.split()[-1])
    assert growth < size / 2, f"RSS grew by {growth / 2**20:.0f} MiB for a {size >> 20} MiB file"
