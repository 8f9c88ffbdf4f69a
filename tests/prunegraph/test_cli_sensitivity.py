"""`prunegraph plan --sensitivity`: a measured sensitivity table prices the marginal
allocation of a compensated plan; bad tables and flag combinations exit 2 saying what to do."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from clients.activations import capture_activations
from clients.group_sensitivity import SensitivityRow, SensitivityTable
from graphs.plan import PruningPlan
from prunegraph.cli import app
from tests.prunegraph.stats_net import save_net

runner = CliRunner()
PRUNED = {1: "a", 2: "b"}  # the prunable groups of Net's manifest: id → producer


@dataclass(frozen=True)
class Files:
    ckpt: Path
    manifest: Path
    stats: Path
    root: Path


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> Files:
    root = tmp_path_factory.mktemp("sensitivity")
    net, manifest = save_net(root)
    assert {g.id: g.producers[0] for g in manifest.groups if g.prunable} == PRUNED
    stats = capture_activations(net, [torch.randn(64, 3, 4, 4)], maps=False)
    return Files(root / "net.pt", root / "manifest.json", stats.save(root / "s.safetensors"), root)


def write_table(path: Path, heavy: int, *, group: dict[int, str] = PRUNED) -> Path:
    """A clients.sensitivity JSON table (functional order, compensated rows) in which group
    ``heavy`` changes the output 10⁴ times as much per removed channel as the others."""
    rows = []
    for gid, name in group.items():
        for k in (1, 3, 6):
            d = (100.0 if gid == heavy else 0.01) * k
            # group, name, producers, channels, fraction, removed, compensated, metric, delta
            rows.append(SensitivityRow(gid, name, (name,), 12, k / 12, k, True, d, d))
    table = SensitivityTable(0.0, tuple(rows), order="functional")
    path.write_text(table.to_json())
    return path


def plan(files: Files, *extra: str) -> tuple[int, str, str]:
    args = ["plan", str(files.ckpt), "--manifest", str(files.manifest), "--target-flops", "0.4",
            "--method", "l1", "--json", *extra]  # fmt: skip
    res = runner.invoke(app, args)
    return res.exit_code, res.stdout, res.stderr


def removed(stdout: str) -> dict[int, int]:
    return {g.id: len(g.remove) for g in PruningPlan.model_validate_json(stdout).groups}


def test_a_sensitive_group_loses_fewer_channels(files: Files) -> None:
    acts = ("--activations", str(files.stats))
    code, plain, err = plan(files, *acts, "--allocation", "marginal")
    assert code == 0, err
    counts = {}
    for heavy in PRUNED:
        table = write_table(files.root / f"heavy{heavy}.json", heavy)
        code, out, err = plan(files, *acts, "--sensitivity", str(table))
        assert code == 0, err
        again = plan(files, *acts, "--sensitivity", str(table), "--allocation", "marginal")
        assert again[:2] == (0, out)  # deterministic (stderr has timings); marginal is implied
        p = PruningPlan.model_validate_json(out)
        assert p.parameters["allocation"] == "marginal" and p.achieved["flops"] >= 0.4
        assert "weights from a sensitivity table (2 groups measured" in p.rule
        assert p.compensation is not None
        counts[heavy] = removed(out)
    assert "sensitivity" not in PruningPlan.model_validate_json(plain).rule
    without = removed(plain)
    assert counts[1][1] < without[1] and counts[2][2] < without[2]
    assert counts[1][1] < counts[2][1] and counts[2][2] < counts[1][2]


def test_bad_tables_and_flags_exit_2_saying_what_to_do(files: Files) -> None:
    acts = ("--activations", str(files.stats))
    good = write_table(files.root / "good.json", 1)
    (files.root / "text.json").write_text("group,delta\n1,0.3\n")
    (files.root / "list.json").write_text("[]")
    plain = json.loads(good.read_text())
    for r in plain["rows"]:
        r["compensated"] = False
    (files.root / "plain.json").write_text(json.dumps(plain))
    stranger = write_table(files.root / "stranger.json", 1, group={9: "a"})
    cases = [
        ((*acts, "--sensitivity", str(files.root / "text.json")), "is not JSON"),
        ((*acts, "--sensitivity", str(files.root / "list.json")), "is not a sensitivity table"),
        ((*acts, "--sensitivity", str(files.root / "plain.json")), "no compensated rows"),
        ((*acts, "--sensitivity", str(files.root / "nope.json")), "cannot read"),
        ((*acts, "--sensitivity", str(stranger)), "group 9"),
        ((*acts, "--sensitivity", str(good), "--allocation", "functional"), "marginal"),
        (("--sensitivity", str(good)), "needs --activations"),
        ((*acts, "--sensitivity", str(good), "--server", "http://x"), "not sent to a service"),
    ]
    for args, message in cases:
        code, out, err = plan(files, *args)
        text = " ".join(err.split())
        assert code == 2 and message in text and "what to do:" in text, (args, err)
        assert out == ""
