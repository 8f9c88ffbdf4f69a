"""Held-out statistics inside the activations file (``holdout/<module>``) cross-fit the plans
and the functional figures of ``prunegraph plan|analyze`` by default, exactly as the library
does with them; ``--no-crossfit`` is in-sample, which is what a file without them gives;
``--holdout-activations`` wins over the file's own part."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from clients.activations import capture_activations
from graphs import AnalysisOptions, Report
from graphs.functional_report import CROSSFIT_NOTE, functional_figures
from graphs.manifest import Manifest
from graphs.plan import Constraints, PruningPlan, Target
from graphs.planner import plan_layers
from prunegraph.cli import app
from service.ingest.activations import read_capture
from service.jobs.inputs import load_inputs
from tests.prunegraph.stats_net import save_net

runner = CliRunner()


@dataclass(frozen=True)
class Files:
    ckpt: Path
    manifest: Path
    own: Path  # statistics of 4 batches, the odd ones also held out (the default capture)
    none: Path  # the same batches, nothing held out
    part: Path  # statistics of the first 2 batches (an explicit --holdout-activations)


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> Files:
    root = tmp_path_factory.mktemp("crossfit")
    net, _ = save_net(root)
    batches = [
        torch.randn(32, 3, 4, 4, generator=torch.Generator().manual_seed(i)) for i in range(4)
    ]
    own = capture_activations(net, batches, maps=False).save(root / "own.safetensors")
    none = capture_activations(net, batches, maps=False, holdout_every=0)
    part = capture_activations(net, batches[:2], maps=False, holdout_every=0)
    return Files(
        root / "net.pt",
        root / "manifest.json",
        own,
        none.save(root / "none.safetensors"),
        part.save(root / "part.safetensors"),
    )


def invoke(files: Files, command: str, acts: Path, *extra: str) -> tuple[int, str, str]:
    args = [command, str(files.ckpt), "--manifest", str(files.manifest), "--activations",
            str(acts), "--json", *extra]  # fmt: skip
    if command == "plan":
        args += ["--target-flops", "0.4", "--method", "l1"]
    else:
        args += ["--methods", "l1"]
    res = runner.invoke(app, args)
    return res.exit_code, res.stdout, res.stderr


def direct(files: Files, holdout: str | None, *, compensation: bool = True) -> PruningPlan:
    """The plan of the planner called directly on ``own``'s statistics (the CLI's defaults
    spelled out); ``holdout``: "own" (the file's part), "part" (the explicit file) or None."""
    man = Manifest.model_validate_json(files.manifest.read_bytes())
    inputs = load_inputs(files.ckpt, manifest=man, activations=files.own)
    parsed = inputs.checkpoint
    held = {"own": inputs.holdout, "part": read_capture(files.part).statistics, None: None}
    return plan_layers(
        parsed.layers, params_total=parsed.info.n_params, manifest=inputs.manifest,
        checkpoint_sha256=parsed.info.sha256, activations=inputs.maps, stats=inputs.stats,
        holdout_stats=held[holdout], method="l1", target=Target(flops=0.4), seed=0, step=0.05,
        constraints=Constraints(min_channels=1, max_ratio=0.9, round_to=None, ignored=[]),
        options=AnalysisOptions(alpha=0.05, min_explained=0.5, vectors="weights"),
        compensation=compensation,
    )  # fmt: skip


def test_the_files_are_what_the_tests_need(files: Files) -> None:
    own, none = read_capture(files.own), read_capture(files.none)
    assert own.holdout and set(own.holdout) == set(own.statistics) and not none.holdout
    for name, s in own.statistics.items():  # the same pooled statistics either way
        assert (s == none.statistics[name]).all()


def test_a_plan_is_cross_fitted_by_the_files_own_part(files: Files) -> None:
    code, out, err = invoke(files, "plan", files.own)
    assert code == 0, err
    assert out.rstrip("\n") == direct(files, "own").to_json()
    assert "cross-fitted error curves" in PruningPlan.model_validate_json(out).rule
    assert invoke(files, "plan", files.own)[:2] == (0, out)  # deterministic

    code, inside, err = invoke(files, "plan", files.own, "--no-crossfit")
    assert code == 0, err
    assert inside.rstrip("\n") == direct(files, None).to_json() != out.rstrip("\n")
    assert "cross-fitted" not in PruningPlan.model_validate_json(inside).rule
    # a file without a held-out part: the in-sample plan, as before
    assert invoke(files, "plan", files.none)[:2] == (0, inside)
    assert invoke(files, "plan", files.none, "--no-crossfit")[:2] == (0, inside)


def test_no_compensation_plans_the_same_channels_without_folds(files: Files) -> None:
    code, out, err = invoke(files, "plan", files.own)
    code2, plain, err2 = invoke(files, "plan", files.own, "--no-compensation")
    assert code == code2 == 0, (err, err2)
    folded, bare = PruningPlan.model_validate_json(out), PruningPlan.model_validate_json(plain)
    assert bare.compensation is None and folded.compensation is not None
    assert [g.remove for g in bare.groups] == [g.remove for g in folded.groups]
    assert plain.rstrip("\n") == direct(files, "own", compensation=False).to_json()


def test_an_explicit_holdout_file_wins_over_the_files_own_part(files: Files) -> None:
    code, out, err = invoke(files, "plan", files.own, "--holdout-activations", str(files.part))
    assert code == 0, err
    assert out.rstrip("\n") == direct(files, "part").to_json() != direct(files, "own").to_json()
    code, out, err = invoke(
        files, "plan", files.own, "--holdout-activations", str(files.part), "--no-crossfit"
    )
    text = " ".join(err.split())
    assert code == 2 and out == "" and "--no-crossfit" in text and "what to do:" in text


def test_analyze_reports_cross_fitted_figures_and_says_so(files: Files) -> None:
    man = Manifest.model_validate_json(files.manifest.read_bytes())
    inputs = load_inputs(files.ckpt, manifest=man, activations=files.own)
    layers, stats = inputs.checkpoint.layers, inputs.stats
    assert stats is not None
    code, out, err = invoke(files, "analyze", files.own)
    assert code == 0, err
    report = Report.model_validate_json(out)
    assert report.notes == [CROSSFIT_NOTE] and CROSSFIT_NOTE in " ".join(err.split())
    crossed = functional_figures(layers, man, stats, holdout=inputs.holdout)
    inside = functional_figures(layers, man, stats)
    assert crossed != inside
    assert {la.name: la.functional for la in report.layers if la.functional} == crossed
    assert invoke(files, "analyze", files.own)[:2] == (0, out)  # deterministic

    code, plain, err = invoke(files, "analyze", files.own, "--no-crossfit")
    assert code == 0, err
    report = Report.model_validate_json(plain)
    assert report.notes == [] and '"notes"' not in plain
    assert {la.name: la.functional for la in report.layers if la.functional} == inside
    assert invoke(files, "analyze", files.none)[:2] == (0, plain)  # no held-out part: as before
