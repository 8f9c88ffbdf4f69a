"""Second moments of consumer inputs (issue 14 contract A): exact against a brute-force
reference, invariant to batching, saved in the activations file and validated by the service."""

from __future__ import annotations

import io
import json
import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from torch import nn

from clients.activations import Activations, capture_activations
from clients.gram import is_mixing_consumer, safetensors_bytes
from graphs.contracts.activations import GRAM_PREFIX, PLAIN_VERSION
from graphs.errors import CheckpointError, InvalidInputError
from service.ingest.activations import check_capture, read_activations, read_capture
from service.ingest.checkpoint import read_checkpoint
from service.main import create_app
from service.settings import Settings


class MyConv(nn.Conv2d):
    """A conv subclass (as timm/mmcv define them): still a consumer."""


class Net(nn.Module):
    """stem 3x3 → BN/ReLU → grouped 1x1 → depthwise 3x3 (not a consumer) → subclass conv →
    flatten → linear → linear."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.grouped = nn.Conv2d(8, 8, 1, groups=2)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.sub = MyConv(8, 4, 3, stride=2, padding=1)
        self.fc1 = nn.Linear(4 * 3 * 3, 16)
        self.fc2 = nn.Linear(16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn(self.stem(x)))
        x = self.sub(torch.relu(self.dw(self.grouped(x))))
        return self.fc2(torch.relu(self.fc1(torch.flatten(x, 1))))


CONSUMERS = {"stem", "grouped", "sub", "fc1", "fc2"}


def _net() -> Net:
    torch.manual_seed(0)
    net = Net()
    with torch.no_grad():  # a BN with statistics of its own, so channels have non-zero means
        net.bn.running_mean = torch.rand(8) * 2 - 1
        net.bn.running_var = torch.rand(8) * 1.5 + 0.5
    return net.eval()


def _data(n: int = 8, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, 6, 6, generator=torch.Generator().manual_seed(seed))


def _reference(model: nn.Module, x: torch.Tensor) -> dict[str, np.ndarray]:
    """S from the consumers' full inputs, hooked and summed in numpy."""
    inputs: dict[str, list[torch.Tensor]] = {}
    handles = []
    for name, m in model.named_modules():
        if name in CONSUMERS:

            def keep(_: nn.Module, args: tuple[torch.Tensor, ...], name: str = name) -> None:
                inputs.setdefault(name, []).append(args[0].detach().clone())

            handles.append(m.register_forward_pre_hook(keep))
    with torch.no_grad():
        model(x)
    for h in handles:
        h.remove()
    out = {}
    for name, (t,) in inputs.items():
        a = t.double().numpy()
        rows = np.moveaxis(a, 1, -1).reshape(-1, a.shape[1]) if a.ndim > 2 else a
        z = np.hstack([rows, np.ones((rows.shape[0], 1))])
        out[name] = z.T @ z
    return out


def test_statistics_equal_a_brute_force_reference() -> None:
    net, x = _net(), _data()
    acts = capture_activations(net, [x])
    assert set(acts.statistics) == CONSUMERS  # the depthwise conv is not a consumer
    assert not is_mixing_consumer(net.dw) and is_mixing_consumer(net.sub)
    ref = _reference(net, x)
    for name, s in acts.stats().items():
        assert s.dtype == np.float64 and np.array_equal(s, s.T)
        np.testing.assert_allclose(s, ref[name], rtol=1e-10, atol=1e-9)
        c = s.shape[0] - 1
        rows = 8 if name.startswith("fc") else 8 * 6 * 6  # every input position of every sample
        assert s[c, c] == rows
    assert acts.statistics_skipped == {} and acts.samples == 8


def test_batching_pairs_and_max_samples() -> None:
    net, x = _net().double(), _data(8).double()  # float64 forward: no float32 kernel noise
    one = capture_activations(net, [x], maps=False).stats()
    two = capture_activations(net, [x[:4], x[4:]], maps=False).stats()
    pairs = capture_activations(net, [(x[:4], torch.zeros(4)), [x[4:], torch.ones(4)]]).stats()
    first5 = capture_activations(net, [x[:5]], maps=False).stats()
    cut = capture_activations(net, [x[:3], x[3:]], max_samples=5, maps=False).stats()
    for name in CONSUMERS:
        np.testing.assert_allclose(two[name], one[name], rtol=1e-12, atol=1e-10)
        np.testing.assert_allclose(pairs[name], one[name], rtol=1e-12, atol=1e-10)
        np.testing.assert_allclose(cut[name], first5[name], rtol=1e-12, atol=1e-10)
    assert not np.allclose(first5["fc2"], one["fc2"])  # the cut did change something


def test_wide_linear_layers_and_unused_consumers_are_skipped() -> None:
    net = _net()
    net.unused = nn.Linear(3, 3)
    acts = capture_activations(net, [_data()], max_linear_inputs=20, maps=False)
    assert "fc1" not in acts.statistics and "36 inputs" in acts.statistics_skipped["fc1"]
    assert "did not run" in acts.statistics_skipped["unused"]
    assert {"stem", "grouped", "sub", "fc2"} == set(acts.statistics)
    budget = (3 + 1) ** 2 * 8 + (8 + 1) ** 2 * 8  # stem's and grouped's Grams fit, not sub's
    acts = capture_activations(
        net, [_data()], maps=False, max_statistics_bytes=budget, holdout_every=0
    )
    assert set(acts.statistics) == {"stem", "grouped"}
    assert "max_statistics_bytes" in acts.statistics_skipped["sub"]
    # with a held-out part (the default) each consumer takes two Grams of the budget
    acts = capture_activations(net, [_data()], maps=False, max_statistics_bytes=2 * budget)
    assert set(acts.statistics) == {"stem", "grouped"}
    acts = capture_activations(net, [_data()], maps=False, max_statistics_bytes=budget)
    assert set(acts.statistics) == {"stem"} and "holdout_every=0" in acts.statistics_skipped["sub"]
    with pytest.raises(ValueError, match="nothing to capture"):
        capture_activations(net, [_data()], maps=False, statistics=False)


def _checkpoint(net: nn.Module, tmp: Path) -> Path:
    path = tmp / "net.pt"
    torch.save(net.state_dict(), path)
    return path


def test_file_round_trips_through_the_service_reader(tmp_path: Path) -> None:
    net = _net()
    acts = capture_activations(net, [_data()], max_pixels=16)
    path = acts.save(tmp_path / "a.safetensors")
    assert path.read_bytes() == acts.save(tmp_path / "b.safetensors").read_bytes()
    capture = read_capture(path)
    assert set(capture.statistics) == CONSUMERS and capture.samples == 8
    for name, s in acts.stats().items():
        assert np.array_equal(capture.statistics[name], s)  # float64 kept bit for bit
    assert set(capture.maps) == set(acts.layers)
    parsed = read_checkpoint(_checkpoint(net, tmp_path))
    check_capture(capture, parsed.layers)
    # statistics only: a smaller file, still a valid upload; the maps reader says what it lacks
    only = capture_activations(net, [_data()], maps=False).save(tmp_path / "s.safetensors")
    assert only.stat().st_size < path.stat().st_size
    stats_only = read_capture(only)
    assert stats_only.maps == {} and set(stats_only.statistics) == CONSUMERS
    check_capture(stats_only, parsed.layers)
    with pytest.raises(CheckpointError, match="only second-moment statistics") as e:
        read_activations(only)
    assert "maps=True" in e.value.hint


def _with(acts: Activations, name: str, s: torch.Tensor) -> Activations:
    acts.statistics = {**acts.statistics, name: s}
    return acts


def _bad_files(net: nn.Module, tmp: Path) -> Iterator[tuple[str, bytes, str]]:
    """(what, file bytes, expected words in the error)."""

    def fresh() -> Activations:
        return capture_activations(net, [_data(4)], maps=False)

    good = fresh().statistics["grouped"]
    nan = good.clone()
    nan[0, 1] = nan[1, 0] = float("nan")
    skew = good.clone()
    skew[0, 1] += 1.0
    empty = good.clone()
    empty[-1, -1] = 0
    cases = {
        "nan": (_with(fresh(), "grouped", nan), "NaN"),
        "asymmetric": (_with(fresh(), "grouped", skew), "not symmetric"),
        "no rows": (_with(fresh(), "grouped", empty), "no rows"),
        "not square": (_with(fresh(), "grouped", good[:, :-1]), "not (c + 1, c + 1)"),
    }
    for what, (acts, words) in cases.items():
        yield what, acts.save(tmp / f"{what}.safetensors").read_bytes(), words
    meta = {**fresh().metadata(), "version": "99"}
    data = safetensors_bytes({GRAM_PREFIX + "stem": good}, meta)
    yield "future version", data, "version 99"
    yield from _bad_holdouts(net, tmp)


def _bad_holdouts(net: nn.Module, tmp: Path) -> Iterator[tuple[str, bytes, str]]:
    """Files whose held-out statistics (``holdout/<module>``) are unusable."""

    def fresh(**change: torch.Tensor | None) -> Activations:
        acts = capture_activations(net, [_data(4), _data(4, seed=1)], maps=False)
        assert set(acts.holdout) == CONSUMERS  # two batches: the second one is held out
        for name, s in change.items():
            if s is None:
                del acts.holdout[name]
            else:
                acts.holdout[name] = s
        return acts

    held, full = fresh().holdout["grouped"], fresh().statistics["grouped"]
    nan = held.clone()
    nan[0, 1] = nan[1, 0] = float("nan")
    skew = held.clone()
    skew[0, 1] += 1.0
    no_gram = fresh()
    del no_gram.statistics["grouped"]
    cases = {
        "holdout nan": (fresh(grouped=nan), "held-out statistics of 'grouped' contain NaN"),
        "holdout asymmetric": (fresh(grouped=skew), "are not symmetric"),
        "holdout without gram": (no_gram, "without statistics of all the data"),
        "holdout shape": (fresh(grouped=held[1:, 1:]), "have shape [8, 8], its statistics [9, 9]"),
        "holdout all rows": (fresh(grouped=full), "are not a part of its statistics"),
        "holdout too large": (fresh(grouped=held + full), "are not a part of its statistics"),
        "holdout partial": (fresh(grouped=None), "for every consumer or for none"),
    }
    for what, (acts, words) in cases.items():
        yield what, acts.save(tmp / f"{what}.safetensors").read_bytes(), words


def test_bad_statistics_are_refused(tmp_path: Path) -> None:
    net = _net()
    for what, data, words in _bad_files(net, tmp_path):
        path = tmp_path / f"up-{what}.safetensors"
        path.write_bytes(data)
        with pytest.raises(CheckpointError, match=re.escape(words)) as e:
            read_capture(path)
        assert e.value.hint, what
    parsed = read_checkpoint(_checkpoint(net, tmp_path))
    base = capture_activations(net, [_data(4)], maps=False)
    wide = torch.eye(12, dtype=torch.float64)  # stem reads 3 channels, not 11
    for acts, words in (
        (_with(base, "stem", wide), "stem has 11 inputs in the statistics, 3 per conv group"),
        (_with(capture_activations(net, [_data(4)]), "nope", wide), "does not have"),
    ):
        capture = read_capture(acts.save(tmp_path / "x.safetensors"))
        with pytest.raises(InvalidInputError, match=words):
            check_capture(capture, parsed.layers)


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    settings = Settings(data_dir=tmp_path_factory.mktemp("gram-api"), tokens="a:a", workers=1)
    with TestClient(create_app(settings)) as c:
        yield c


def test_upload_endpoint_keeps_good_statistics_and_refuses_bad(
    client: TestClient, tmp_path: Path
) -> None:
    net = _net()
    headers = {"Authorization": "Bearer a"}

    def post(url: str, data: bytes) -> tuple[int, dict[str, object]]:
        r = client.post(url, files={"file": ("f.safetensors", data)}, headers=headers)
        return r.status_code, r.json()

    buf = io.BytesIO()
    torch.save(net.state_dict(), buf)
    status, body = post("/v1/checkpoints", buf.getvalue())
    assert status == 201, body
    url = f"/v1/checkpoints/{body['id']}/activations"
    only = capture_activations(net, [_data()], maps=False).save(tmp_path / "s.safetensors")
    status, body = post(url, only.read_bytes())
    assert status == 201 and body["n_layers"] == len(CONSUMERS) and body["n_samples"] == 8, body
    both = capture_activations(net, [_data()]).save(tmp_path / "b.safetensors")
    assert post(url, both.read_bytes())[0] == 201
    for what, data, words in _bad_files(net, tmp_path):
        status, body = post(url, data)
        assert status == 422 and words in str(body["error"]) and body["hint"], (what, body)


def test_metadata_names_the_version_and_skipped_consumers(tmp_path: Path) -> None:
    acts = capture_activations(_net(), [_data()], max_linear_inputs=20)
    raw = acts.save(tmp_path / "a.safetensors").read_bytes()
    header = json.loads(raw[8 : 8 + int.from_bytes(raw[:8], "little")])
    meta = header["__metadata__"]
    assert meta["version"] == PLAIN_VERSION == "2" and meta["samples"] == "8"
    assert "holdout_samples" not in meta and not acts.holdout  # one batch: nothing held out
    assert set(json.loads(meta["gram_skipped"])) == {"fc1"}
    assert all(header[GRAM_PREFIX + n]["dtype"] == "F64" for n in acts.statistics)
