"""Recurrent models end to end: a CRNN (convs → sequence → bidirectional LSTM/GRU → linear) and
a VAD-like model (linear → nn.LSTMCell looped over time steps → linear): analysis from a saved
state dict, planted duplicate hidden units, manifests, plans, and applying them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from clients import apply_plan, build_manifest
from clients.flops import count_model_macs
from graphs import analyze
from graphs.plan import Target
from graphs.planner import plan_layers
from graphs.recurrent import PROJ_REASON
from service.ingest.checkpoint import read_checkpoint
from tests.graphs.planted import same_partition

METHODS = ["mrp", "srr", "hsc", "l1", "fpgm"]


class CRNN(nn.Module):
    def __init__(
        self, rnn: str = "lstm", hidden: int = 12, classes: int = 7, layers: int = 1
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 16, 3, padding=1)
        self.pool = nn.MaxPool2d((2, 1))
        kind = nn.LSTM if rnn == "lstm" else nn.GRU
        self.rnn = kind(16 * 4, hidden, layers, batch_first=True, bidirectional=True)
        self.fc = nn.Linear(2 * hidden, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = self.pool(torch.relu(self.conv2(x)))
        b, c, h, w = x.shape
        out, _ = self.rnn(x.permute(0, 3, 1, 2).reshape(b, w, c * h))
        return self.fc(out)


class VAD(nn.Module):
    def __init__(self, feats: int = 10, hidden: int = 16) -> None:
        super().__init__()
        self.inp = nn.Linear(feats, 12)
        self.cell = nn.LSTMCell(12, hidden)
        self.out = nn.Linear(hidden, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        h = x.new_zeros(b, self.cell.hidden_size)
        c = x.new_zeros(b, self.cell.hidden_size)
        ys = []
        for i in range(t):
            h, c = self.cell(torch.relu(self.inp(x[:, i])), (h, c))
            ys.append(self.out(h))
        return torch.stack(ys, 1)


def _crnn(rnn: str, layers: int = 1) -> tuple[Any, torch.Tensor]:
    torch.manual_seed(0)
    return CRNN(rnn, layers=layers).eval(), torch.randn(2, 1, 8, 20)


def _vad() -> tuple[Any, torch.Tensor]:
    torch.manual_seed(0)
    return VAD().eval(), torch.randn(2, 5, 10)


def _plant(cell: Any, protos: int, seed: int = 0) -> np.ndarray:
    """Make the cell's hidden units copies of ``protos`` prototypes (all gates, weight_hh rows
    and columns, biases) with small noise; returns the prototype of each unit."""
    g = torch.Generator().manual_seed(seed)
    h = cell.hidden_size
    truth = torch.randperm(h, generator=g) % protos
    gates = cell.weight_ih.shape[0] // h
    with torch.no_grad():
        for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
            p = getattr(cell, name)
            blocks = p.view(gates, h, *p.shape[1:])
            blocks.copy_(blocks[:, truth] + 0.01 * torch.randn(blocks.shape, generator=g))
        hh = cell.weight_hh.view(gates * h, h)
        hh.copy_(hh[:, truth] + 0.01 * torch.randn(hh.shape, generator=g))
    return truth.numpy()


def _read(model: nn.Module, tmp_path: Path):  # type: ignore[no-untyped-def]
    path = tmp_path / "model.pt"
    torch.save(model.state_dict(), path)
    return read_checkpoint(path)


@pytest.mark.parametrize("rnn", ["lstm", "gru"])
def test_crnn_checkpoint_reports_each_direction_with_every_method(rnn: str, tmp_path: Path) -> None:
    model, x = _crnn(rnn)
    parsed = _read(model, tmp_path)
    assert not [s for s in parsed.skipped if "rnn" in s.name]
    report = analyze(parsed.layers, checkpoint=parsed.info, skipped=parsed.skipped, methods=METHODS)
    rec = [r for r in report.layers if r.kind == "recurrent"]
    assert [r.name for r in rec] == ["rnn.weight_ih_l0", "rnn.weight_ih_l0_reverse"]
    for r in rec:
        assert r.n_filters == 12 and set(r.methods) == set(METHODS)
        for m in ("mrp", "srr", "hsc"):
            red = r.methods[m].redundancy
            assert red is not None and red <= 0.05, (r.name, m, red)
    manifest = build_manifest(model, x)
    hidden = [g for g in manifest.groups if g.unit == "hidden"]
    assert len(hidden) == 1 and hidden[0].prunable, hidden[0].reason
    with_manifest = analyze(
        parsed.layers, checkpoint=parsed.info, methods=METHODS, manifest=manifest
    )
    (group,) = [r for r in with_manifest.layers if r.kind == "recurrent"]
    assert group.coupling == "manifest" and group.n_filters == 12 and "fc" in group.members


def test_vad_cell_planted_duplicates_are_found(tmp_path: Path) -> None:
    model, _ = _vad()
    truth = _plant(model.cell, protos=4)
    parsed = _read(model, tmp_path)
    report = analyze(parsed.layers, checkpoint=parsed.info, methods=METHODS)
    (cell,) = [r for r in report.layers if r.kind == "recurrent"]
    assert cell.name == "cell.weight_ih" and cell.n_filters == 16
    for m, labels in [("mrp", "communities"), ("srr", "components"), ("hsc", "clusters")]:
        result = cell.methods[m]
        assert result.redundancy == pytest.approx(1 - 4 / 16, abs=0.05), m
        assert same_partition(np.asarray(getattr(result, labels)), truth), m


def _kept_rows(before: torch.Tensor, after: torch.Tensor, gates: int, keep: list[int]) -> None:
    h = before.shape[0] // gates
    rows = [g * h + k for g in range(gates) for k in keep]
    torch.testing.assert_close(after, before[rows][..., : after.shape[-1]], rtol=0, atol=0)


@pytest.mark.parametrize("method", ["mrp", "l1", "random"])
@pytest.mark.parametrize("which", ["crnn", "crnn-gru-2", "vad"])
def test_plans_remove_hidden_units_and_the_model_runs(
    which: str, method: str, tmp_path: Path
) -> None:
    if which == "vad":
        model, x = _vad()
    else:
        model, x = _crnn("gru", layers=2) if which == "crnn-gru-2" else _crnn("lstm")
    rnn = model.cell if which == "vad" else model.rnn
    gates = 3 if which == "crnn-gru-2" else 4
    if which == "vad":
        _plant(model.cell, protos=4)
    manifest = build_manifest(model, x)
    parsed = _read(model, tmp_path)
    plan = plan_layers(
        parsed.layers, method=method, target=Target(params=0.2),  # type: ignore[arg-type]
        params_total=manifest.params_total, manifest=manifest,
    )  # fmt: skip
    (gp,) = [g for g in plan.groups if g.unit == "hidden"]
    assert gp.remove, plan.rule
    keep = [i for i in range(gp.channels_before) if i not in gp.remove]
    wname = "weight_ih" if which == "vad" else "weight_ih_l0"
    before = getattr(rnn, wname).detach().clone()
    with torch.no_grad():
        y0 = model(x)
    apply_plan(model, plan, x)
    assert rnn.hidden_size == gp.channels_after
    _kept_rows(before, getattr(rnn, wname).detach(), gates, keep)
    shapes = {n: list(p.shape) for n, p in model.named_parameters()}
    assert all(shapes[n] == s for n, s in plan.expected_shapes.items())
    with torch.no_grad():
        y = model(x)
    assert y.shape == y0.shape
    if which == "vad" and method == "mrp":  # removed units were near-copies of kept ones
        assert float((y - y0).abs().max()) < 0.5


def test_proj_size_lstm_is_skipped_and_unprunable(tmp_path: Path) -> None:
    class Proj(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.rnn = nn.LSTM(6, 8, proj_size=4, batch_first=True)
            self.fc = nn.Linear(4, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(self.rnn(x)[0])

    model = Proj().eval()
    parsed = _read(model, tmp_path)
    reasons = {s.name: s.reason for s in parsed.skipped}
    assert reasons["rnn.weight_hr_l0"] == PROJ_REASON == reasons["rnn.weight_ih_l0"]
    manifest = build_manifest(model, torch.randn(1, 4, 6))
    (g,) = [g for g in manifest.groups if g.unit == "hidden"]
    assert not g.prunable and g.reason and "proj_size" in g.reason


def test_building_keeps_weights_and_training_mode_and_refuses_what_it_cannot_follow() -> None:
    model, x = _vad()
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    manifest = build_manifest(model, x)
    assert model.training and all(m.training for m in model.modules())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    (g,) = [g for g in manifest.groups if g.unit == "hidden"]
    assert g.prunable and g.producers == ["cell"]

    class Normed(nn.Module):  # a LayerNorm over the units: not a consumer the manifest follows
        def __init__(self) -> None:
            super().__init__()
            self.rnn = nn.GRU(6, 8, batch_first=True)
            self.norm = nn.LayerNorm(8)
            self.fc = nn.Linear(8, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(self.norm(self.rnn(x)[0]))

    class Bare(nn.Module):  # the units are the model's output
        def __init__(self) -> None:
            super().__init__()
            self.rnn = nn.LSTM(6, 8, batch_first=True)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.rnn(x)[0]

    for model, why in [(Normed(), "breaks the forward pass"), (Bare(), "model's output")]:
        manifest = build_manifest(model.eval(), torch.randn(2, 4, 6))
        (g,) = [g for g in manifest.groups if g.unit == "hidden"]
        assert not g.prunable and why in (g.reason or ""), g.reason


@pytest.mark.parametrize("which", ["crnn", "vad"])
def test_flops_plans_predict_the_pruned_models_macs(which: str, tmp_path: Path) -> None:
    """Recurrent MACs scale with the units (weight_ih) and their square (weight_hh)."""
    model, x = _crnn("lstm") if which == "crnn" else _vad()
    manifest = build_manifest(model, x)
    parsed = _read(model, tmp_path)
    plan = plan_layers(
        parsed.layers, method="l1", target=Target(flops=0.3),
        params_total=manifest.params_total, manifest=manifest,
    )  # fmt: skip
    assert any(g.remove for g in plan.groups if g.unit == "hidden")
    before = count_model_macs(model, (x,))
    apply_plan(model, plan, x)
    measured = 1 - count_model_macs(model, (x,)) / before
    assert plan.achieved["flops"] >= 0.3
    assert abs(plan.achieved["flops"] - measured) <= 0.02
