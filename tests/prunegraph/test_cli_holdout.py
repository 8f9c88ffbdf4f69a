"""`prunegraph plan --holdout-activations`: the statistics of a part of the calibration data
cross-fit the error curves of a compensated plan, exactly as ``plan_layers(...,
holdout_stats=...)`` does; bad files and flag combinations exit 2 saying what to do."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from clients.activations import capture_activations
from graphs import AnalysisOptions
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
    all: Path  # statistics of every batch
    part: Path  # statistics of the first half of the batches
    maps: Path  # feature maps only, no statistics
    root: Path


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> Files:
    root = tmp_path_factory.mktemp("holdout")
    net, _ = save_net(root)
    batches = [torch.randn(32, 3, 4, 4) for _ in range(4)]
    # no held-out part of its own (that is tests/prunegraph/test_cli_crossfit.py): the flag's
    every = capture_activations(net, batches, maps=False, holdout_every=0).save(
        root / "all.safetensors"
    )
    part = capture_activations(net, batches[:2], maps=False).save(root / "part.safetensors")
    maps = capture_activations(net, batches[:2], statistics=False).save(root / "maps.safetensors")
    return Files(root / "net.pt", root / "manifest.json", every, part, maps, root)


def plan(files: Files, *extra: str, manifest: bool = True) -> tuple[int, str, str]:
    args = ["plan", str(files.ckpt), "--target-flops", "0.4", "--method", "l1", "--json",
            "--allocation", "marginal", *extra]  # fmt: skip
    if manifest:
        args += ["--manifest", str(files.manifest)]
    res = runner.invoke(app, args)
    return res.exit_code, res.stdout, res.stderr


def direct(files: Files, holdout: Path | None) -> PruningPlan:
    """The same plan from the planner called directly (the CLI's defaults spelled out)."""
    man = Manifest.model_validate_json(files.manifest.read_bytes())
    inputs = load_inputs(files.ckpt, manifest=man, activations=files.all)
    parsed = inputs.checkpoint
    return plan_layers(
        parsed.layers,
        params_total=parsed.info.n_params,
        manifest=inputs.manifest,
        checkpoint_sha256=parsed.info.sha256,
        activations=inputs.maps,
        stats=inputs.stats,
        holdout_stats=None if holdout is None else read_capture(holdout).statistics,
        method="l1",
        target=Target(flops=0.4),
        seed=0,
        step=0.05,
        constraints=Constraints(min_channels=1, max_ratio=0.9, round_to=None, ignored=[]),
        options=AnalysisOptions(
            alpha=0.05, min_explained=0.5, vectors="weights", fallback="uniform"
        ),
        allocation="marginal",
    )


def test_the_holdout_file_cross_fits_the_plan_as_the_planner_does(files: Files) -> None:
    acts = ("--activations", str(files.all))
    out_file = files.root / "crossfit.json"
    code, out, err = plan(files, *acts, "--holdout-activations", str(files.part))
    assert code == 0, err
    assert plan(files, *acts, "--holdout-activations", str(files.part))[:2] == (0, out)
    code, _, err = plan(files, *acts, "--holdout-activations", str(files.part), "-o", str(out_file))
    assert code == 0, err
    assert out_file.read_bytes() == (direct(files, files.part).to_json() + "\n").encode()
    p = PruningPlan.model_validate_json(out)
    assert "cross-fitted error curves" in p.rule and p.compensation is not None

    code, plain, err = plan(files, *acts)
    assert code == 0, err
    assert plain.rstrip("\n") == direct(files, None).to_json()  # unchanged without the flag
    assert "cross-fitted" not in PruningPlan.model_validate_json(plain).rule


def test_no_compensation_plans_the_channels_of_the_cross_fitted_compensated_plan(
    files: Files,
) -> None:
    """The explicit part cross-fits a --no-compensation plan as the file's own part does
    (tests/prunegraph/test_cli_crossfit.py): the compensated plan's channels, no folds."""
    args = ("--activations", str(files.all), "--holdout-activations", str(files.part))
    code, out, err = plan(files, *args)
    code2, plain, err2 = plan(files, *args, "--no-compensation")
    assert code == code2 == 0, (err, err2)
    folded, bare = PruningPlan.model_validate_json(out), PruningPlan.model_validate_json(plain)
    assert folded.compensation is not None and bare.compensation is None
    assert [g.remove for g in bare.groups] == [g.remove for g in folded.groups]
    assert "cross-fitted error curves" in bare.rule
    assert [g.remove for g in bare.groups] == [g.remove for g in direct(files, files.part).groups]


def test_bad_files_and_flags_exit_2_saying_what_to_do(files: Files) -> None:
    acts = ("--activations", str(files.all))
    part = ("--holdout-activations", str(files.part))
    (files.root / "text.safetensors").write_text("not a capture")
    cases = [
        ((*part,), {}, "needs --activations"),
        ((*acts, *part, "--server", "http://x"), {}, "not sent to a service"),
        ((*acts, "--holdout-activations", str(files.maps)), {}, "no second-moment statistics"),
        ((*acts, "--holdout-activations", str(files.root / "nope")), {}, "not found"),
        (
            (*acts, "--holdout-activations", str(files.root / "text.safetensors")),
            {},
            "text.safetensors is not",
        ),
        # the whole data as the part, a part as the whole: not a part of the statistics
        (
            ("--activations", str(files.part), "--holdout-activations", str(files.all)),
            {},
            "not a part of its statistics",
        ),
        (("--activations", str(files.maps), *part), {}, "statistics in --activations"),
        ((*acts, *part), {"manifest": False}, "statistics in --activations"),
    ]
    for args, kw, message in cases:
        code, out, err = plan(files, *args, **kw)
        text = " ".join(err.split())
        assert code == 2 and message in text and "what to do:" in text, (args, err)
        assert out == ""
