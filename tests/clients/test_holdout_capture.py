"""Held-out statistics in every capture (``capture_activations(..., holdout_every=2)``): the
held-out S is exactly the S of the held-out batches, the rest is the S of the others, S itself
is what it is without a holdout; nothing is held out when that would not be a strict part."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from clients.activations import Activations, capture_activations
from clients.gram import safetensors_bytes
from graphs.contracts.activations import GRAM_PREFIX, HOLDOUT_PREFIX, holdout_key
from graphs.crossfit import split_stats
from service.ingest.activations import read_capture
from service.jobs.inputs import load_inputs


class Net(nn.Module):
    """conv 3x3 → BN/ReLU → 1x1 → pool → linear; ``gate``: a consumer that only runs on batches
    of 4 samples."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 6, 3, padding=1)
        self.bn = nn.BatchNorm2d(6)
        self.mix = nn.Conv2d(6, 5, 1)
        self.fc = nn.Linear(5, 4)
        self.gate = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn(self.stem(x)))
        y = self.fc(self.mix(x).mean(dim=(2, 3)))
        return self.gate(y) if x.shape[0] == 4 else y


CONSUMERS = {"stem", "mix", "fc"}


def _net() -> Net:
    torch.manual_seed(0)
    net = Net()
    with torch.no_grad():
        net.bn.running_mean = torch.rand(6) - 0.5
    return net.double().eval()  # float64 forward: captures of the same batches agree bit for bit


def _batches(n: int, size: int = 3) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randn(size, 3, 5, 5, generator=g, dtype=torch.float64) for _ in range(n)]


def _stats(batches: list[torch.Tensor], **kw: object) -> Activations:
    return capture_activations(_net(), batches, maps=False, **kw)  # type: ignore[arg-type]


def test_the_held_out_part_is_exactly_every_second_batch() -> None:
    xs = _batches(4)
    acts = _stats(xs)
    assert set(acts.holdout) == set(acts.statistics) == CONSUMERS and acts.samples == 12
    assert acts.holdout_samples == 6
    held = _stats([xs[1], xs[3]], holdout_every=0).stats()
    rest = _stats([xs[0], xs[2]], holdout_every=0).stats()
    whole = _stats(xs, holdout_every=0).stats()
    for name, s in acts.stats().items():
        h = acts.holdout_stats()[name]
        assert h.dtype == np.float64 and np.array_equal(h, h.T)
        np.testing.assert_array_equal(h, held[name])  # the same float64 updates
        np.testing.assert_array_equal(s, whole[name])  # S is unchanged by the holdout
        scale = np.abs(s).max()
        assert np.abs((s - h) - rest[name]).max() <= 1e-9 * scale
        assert not np.allclose(h, s - h)  # the halves differ: the test can tell them apart
        a, b = split_stats(s, h, name)  # a strict part by the planner's rule
        assert a[-1, -1] > 0 and b[-1, -1] > 0


def test_holdout_every_picks_batches_that_contribute() -> None:
    xs = _batches(6)
    acts = _stats(xs, holdout_every=3)
    want = _stats([xs[2], xs[5]], holdout_every=0).stats()
    for name, h in acts.holdout_stats().items():
        np.testing.assert_array_equal(h, want[name])
    # an empty batch contributes no samples and is not counted; batches past max_samples neither
    empty = xs[0][:0]
    acts = _stats([xs[0], empty, xs[1], xs[2], xs[3]], max_samples=8)
    assert acts.samples == 8 and acts.holdout_samples == 3
    want = _stats([xs[1]], holdout_every=0).stats()
    for name, h in acts.holdout_stats().items():
        np.testing.assert_array_equal(h, want[name])


def test_no_holdout_when_it_is_not_a_strict_part(tmp_path: Path) -> None:
    xs = _batches(3)
    for acts in (
        _stats(xs, holdout_every=0),
        _stats(xs[:1]),  # one batch
        _stats(xs[:2], holdout_every=3),  # the held-out part got no batch
        # gate runs only on the batch of 4, which is held out: it would hold every gate row
        _stats([xs[0], _batches(1, size=4)[0]]),
    ):
        assert acts.holdout == {} and acts.holdout_stats() == {} and acts.holdout_samples == 0
        raw = acts.save(tmp_path / "a.safetensors").read_bytes()
        header = json.loads(raw[8 : 8 + int.from_bytes(raw[:8], "little")])
        assert "holdout_samples" not in header["__metadata__"]
        assert header["__metadata__"]["version"] == "2"  # nothing new: older readers read it
        assert not any(k.startswith(HOLDOUT_PREFIX) for k in header)
        assert any(k.startswith(GRAM_PREFIX) for k in header)
    gated = _stats([xs[0], _batches(1, size=4)[0], xs[1]])  # gate's rows: all in one part
    assert gated.holdout == {} and "gate" in gated.statistics
    fours = _batches(2, size=4)
    kept = _stats([fours[0], fours[1], xs[0], xs[1]])  # batches 1 and 3 held out
    assert set(kept.holdout) == CONSUMERS | {"gate"} and kept.holdout_samples == 4 + 3


@pytest.mark.parametrize("bad", [1, -1, 2.0, True, "2"])
def test_bad_holdout_every_is_refused(bad: object) -> None:
    words = "strict part" if bad == 1 and bad is not True else "int >= 0"
    with pytest.raises(ValueError, match=words):
        _stats(_batches(2), holdout_every=bad)


def test_the_file_round_trips_through_the_service(tmp_path: Path) -> None:
    net = _net()
    acts = capture_activations(net, _batches(4), sorted(CONSUMERS), max_pixels=8)
    path = acts.save(tmp_path / "a.safetensors")
    assert path.read_bytes() == acts.save(tmp_path / "b.safetensors").read_bytes()
    capture = read_capture(path)
    assert set(capture.holdout) == CONSUMERS and capture.holdout_samples == 6
    for name, h in acts.holdout_stats().items():
        assert np.array_equal(capture.holdout[name], h)  # float64 bit for bit
    none = capture_activations(net, _batches(4), sorted(CONSUMERS), max_pixels=8, holdout_every=0)
    plain = none.save(tmp_path / "n.safetensors")
    assert plain.stat().st_size < path.stat().st_size
    assert read_capture(plain).holdout == {} and read_capture(plain).holdout_samples == 0
    checkpoint = tmp_path / "net.pt"
    torch.save(net.float().state_dict(), checkpoint)
    inputs = load_inputs(checkpoint, activations=path)
    assert inputs.holdout is not None and set(inputs.holdout) == CONSUMERS
    assert np.array_equal(inputs.holdout["mix"], acts.holdout_stats()["mix"])
    assert inputs.stats is not None and set(inputs.stats) == CONSUMERS
    assert load_inputs(checkpoint, activations=plain).holdout is None
    assert load_inputs(checkpoint).holdout is None
    header = json.loads(path.read_bytes()[8 : 8 + int.from_bytes(path.read_bytes()[:8], "little")])
    assert header[holdout_key("mix")]["dtype"] == "F64"
    assert header["__metadata__"]["holdout_samples"] == "6"
    assert header["__metadata__"]["version"] == "3"


def test_a_capture_without_a_held_out_part_is_the_version_2_file(tmp_path: Path) -> None:
    """holdout_every=0 (or one batch): byte for byte what the writer of version 2 wrote, its
    metadata built here by hand (version 2, no holdout_samples), so services and CLIs that read
    versions 1 and 2 read it."""
    for acts in (
        capture_activations(_net(), _batches(3), sorted(CONSUMERS), max_pixels=8, holdout_every=0),
        _stats(_batches(1)),
    ):
        raw = acts.save(tmp_path / "a.safetensors").read_bytes()
        meta = json.loads(raw[8 : 8 + int.from_bytes(raw[:8], "little")])["__metadata__"]
        assert meta["version"] == "2" and "holdout_samples" not in meta
        version_2 = {
            "format": "prunegraph-activations",
            "version": "2",
            "layers": json.dumps(acts.layers, sort_keys=True),
            "sources": json.dumps(acts.sources, sort_keys=True),
            "shapes": json.dumps(acts.shapes, sort_keys=True),
            "seed": str(acts.seed),
            "gram_skipped": json.dumps(acts.statistics_skipped, sort_keys=True),
            "samples": str(acts.samples),
        }
        grams = {GRAM_PREFIX + n: s.to(torch.float64) for n, s in acts.statistics.items()}
        assert raw == safetensors_bytes({**acts.tensors, **grams}, version_2)
        assert read_capture(tmp_path / "a.safetensors").holdout == {}
