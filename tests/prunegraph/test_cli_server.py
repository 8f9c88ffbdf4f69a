"""`prunegraph analyze|plan --server URL --token T` against a real `prunegraph serve` process:
the same stdout as the embedded command, byte for byte, and clear errors (exit 2)."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from graphs.report import CROSSFIT_NOTE
from prunegraph.cli import app
from tests.clients import models
from tests.server_process import Server

pytestmark = pytest.mark.slow

runner = CliRunner()
TOKEN = "s3cret"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    s = Server(tmp_path_factory.mktemp("cli-server"), env={"PRUNEGRAPH_TOKENS": f"ci:{TOKEN}"})
    s.start()
    try:
        yield s
    finally:
        s.kill()


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The digit CNN's checkpoint and its manifest (from the model factory)."""
    root = tmp_path_factory.mktemp("cli-files")
    torch.manual_seed(0)
    ckpt = root / "digit_cnn.pt"
    torch.save(models.digit_cnn().state_dict(), ckpt)
    manifest = root / "manifest.json"
    res = runner.invoke(
        app,
        ["manifest", "--model", "tests.clients.models:digit_cnn", "--input-shape", "1,1,28,28",
         "-o", str(manifest)],
    )  # fmt: skip
    assert res.exit_code == 0, res.stderr
    return ckpt, manifest


def _both(server: Server, *args: str) -> tuple[str, str]:
    """stdout of the embedded command and of the same command with --server."""
    local = runner.invoke(app, list(args))
    assert local.exit_code == 0, local.stderr
    remote = runner.invoke(app, [*args, "--server", server.url, "--token", TOKEN])
    assert remote.exit_code == 0, remote.stderr
    assert f"on {server.url}" in remote.stderr
    return local.stdout, remote.stdout


def test_analyze_json_and_table_are_identical(server: Server, files: tuple[Path, Path]) -> None:
    ckpt, manifest = files
    args = ["analyze", str(ckpt), "--methods", "mrp,srr,hsc,l1", "--seed", "3"]
    local, remote = _both(server, *args, "--json", "--min-explained", "0.3")
    assert local == remote and '"min_explained": 0.3' in remote
    local, remote = _both(server, *args, "--manifest", str(manifest))
    assert local == remote and "FLOPs" in remote


def test_plan_json_is_identical(server: Server, files: tuple[Path, Path]) -> None:
    ckpt, manifest = files
    for method in ("mrp", "hsc", "random"):
        args = ["plan", str(ckpt), "--method", method, "--target-flops", "0.4", "--json",
                "--manifest", str(manifest), "--round-to", "2", "--step", "1"]  # fmt: skip
        local, remote = _both(server, *args)
        assert local == remote and '"round_to": 2' in remote


def test_check_is_identical(server: Server, files: tuple[Path, Path]) -> None:
    ckpt, manifest = files
    args = ["check", str(ckpt), "--manifest", str(manifest), "--max-redundancy", "0.5",
            "--layer-max", "conv_layers.*=0.0", "--json"]  # fmt: skip
    local = runner.invoke(app, args)
    remote = runner.invoke(app, [*args, "--server", server.url, "--token", TOKEN])
    assert local.exit_code == remote.exit_code and local.stdout == remote.stdout


def test_data_aware_plan_is_identical(server: Server, files: tuple[Path, Path]) -> None:
    from clients.activations import capture_activations

    ckpt, manifest = files
    model = models.digit_cnn()
    model.load_state_dict(torch.load(ckpt, weights_only=True))
    x = torch.randn(32, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    acts = capture_activations(model, [x]).save(ckpt.parent / "acts.safetensors")
    for method in ("ci", "mrp"):
        args = ["plan", str(ckpt), "--method", method, "--target-flops", "0.4", "--json",
                "--manifest", str(manifest), "--activations", str(acts),
                "--vectors", "activations"]  # fmt: skip
        local, remote = _both(server, *args)
        assert local == remote


def test_token_from_the_environment_and_errors(
    server: Server, files: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    ckpt, _ = files
    args = ["analyze", str(ckpt), "--methods", "l1", "--server", server.url]
    res = runner.invoke(app, args, env={"PRUNEGRAPH_TOKEN": TOKEN})
    assert res.exit_code == 0, res.stderr
    res = runner.invoke(app, [*args, "--token", "wrong"])
    assert res.exit_code == 2 and "refused the token" in res.stderr and "--token" in res.stderr
    res = runner.invoke(app, [*args, "--token", TOKEN, "--methods", "nope"])
    assert res.exit_code == 2 and "unknown" in res.stderr
    res = runner.invoke(
        app, ["analyze", str(ckpt), "--server", "http://127.0.0.1:9", "--token", "t"]
    )
    assert res.exit_code == 2 and "cannot connect" in res.stderr
    res = runner.invoke(app, ["analyze", "missing.pt", "--server", server.url])
    assert res.exit_code == 2 and "not found" in res.stderr
    bad = ckpt.parent / "random.pt"
    bad.write_bytes(b"\x00garbage" * 100)
    res = runner.invoke(app, ["analyze", str(bad), "--server", server.url, "--token", TOKEN])
    assert res.exit_code == 2 and "what to do" in res.stderr
    plan = ["plan", str(ckpt), "--target-flops", "0.5", "--server", server.url, "--token", TOKEN]
    res = runner.invoke(app, plan)  # FLOPs need a manifest: the job fails with the reason
    assert res.exit_code == 2 and "manifest" in res.stderr


def test_serve_with_a_demo_checkpoint(files: tuple[Path, Path], tmp_path: Path) -> None:
    """What `make run` does: the service starts, analyses the demo checkpoint through its own
    HTTP API as the first token's user, and prints where the report is."""
    import httpx

    ckpt, _ = files
    log = tmp_path / "serve.log"
    demo = Server(
        tmp_path / "data",
        env={"PRUNEGRAPH_TOKENS": f"demo:{TOKEN}"},
        args=("--demo", str(ckpt)),
        log=log,
    )
    demo.start()
    try:
        deadline = time.monotonic() + 120
        while "demo done" not in log.read_text() and time.monotonic() < deadline:
            time.sleep(0.2)
        text = log.read_text()
        assert f"prunegraph serving on {demo.url}" in text
        assert "demo done: 5 groups analysed" in text, text  # the digit CNN has 5
        bearer = {"Authorization": f"Bearer {TOKEN}"}
        jobs = httpx.get(f"{demo.url}/v1/jobs", headers=bearer).json()["items"]
        assert [j["status"] for j in jobs] == ["done"]
        assert f"{demo.url}/v1/jobs/{jobs[0]['id']}/report" in text
    finally:
        demo.kill()


def test_compensated_plan_and_sidecar_are_identical(
    server: Server, files: tuple[Path, Path], tmp_path: Path
) -> None:
    """Second moments in the activations: both modes plan compensated, print the same table
    and write the same plan and sidecar with -o."""
    from clients.activations import capture_activations

    ckpt, manifest = files
    model = models.digit_cnn()
    model.load_state_dict(torch.load(ckpt, weights_only=True))
    x = torch.randn(64, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    acts = capture_activations(model, [x], maps=False).save(tmp_path / "stats.safetensors")
    base = ["plan", str(ckpt), "--target-flops", "0.4", "--manifest", str(manifest),
            "--activations", str(acts)]  # fmt: skip
    outs = {}
    for mode in ("local", "remote"):
        (tmp_path / mode).mkdir()
        extra = ["--server", server.url, "--token", TOKEN] if mode == "remote" else []
        res = runner.invoke(app, [*base, "-o", str(tmp_path / mode / "plan.json"), *extra])
        assert res.exit_code == 0, res.stderr
        assert "plan.fold.safetensors" in res.stderr.replace("\n", "")
        outs[mode] = res.stdout
    assert outs["local"] == outs["remote"] and "pred. error" in outs["local"]
    for name in ("plan.json", "plan.fold.safetensors"):
        assert (tmp_path / "local" / name).read_bytes() == (tmp_path / "remote" / name).read_bytes()


def test_cross_fitted_plans_and_reports_are_identical(
    server: Server, files: tuple[Path, Path]
) -> None:
    """Held-out statistics in the activations file cross-fit both sides; --no-crossfit is
    sent as crossfit=false and gives the in-sample plan and report on both."""
    from clients.activations import capture_activations

    ckpt, manifest = files
    model = models.digit_cnn()
    model.load_state_dict(torch.load(ckpt, weights_only=True))
    gen = torch.Generator().manual_seed(1)
    batches = [torch.randn(16, 1, 28, 28, generator=gen) for _ in range(4)]
    acts = capture_activations(model, batches, maps=False).save(ckpt.parent / "held.safetensors")
    common = ["--json", "--manifest", str(manifest), "--activations", str(acts)]
    plan = ["plan", str(ckpt), "--method", "l1", "--target-flops", "0.4", *common]
    crossed, remote = _both(server, *plan)
    assert crossed == remote and "cross-fitted error curves" in crossed
    inside, remote = _both(server, *plan, "--no-crossfit")
    assert inside == remote != crossed and "cross-fitted" not in inside
    report = ["analyze", str(ckpt), "--methods", "l1", *common]
    local, remote = _both(server, *report)
    assert local == remote and json.loads(local)["notes"] == [CROSSFIT_NOTE]
    local, remote = _both(server, *report, "--no-crossfit")
    assert local == remote and '"notes"' not in local and '"functional"' in local
