"""clients.datafree: consumer statistics from BatchNorm alone, wired to the planner and the CLI."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from clients import apply_plan, build_manifest, datafree_activations, datafree_statistics
from clients.datafree import NOMINAL_ROWS
from clients.gram import is_mixing_consumer
from graphs.compensated import save_plan
from graphs.plan import PruningPlan, Target
from graphs.planner import plan_layers
from prunegraph.cli import app
from service.ingest.checkpoint import read_checkpoint
from tests.clients import models

DEAD = (2, 5)  # channels of b2 with γ = 0 (b1 feeds the stem group, never pruned)


class Net(nn.Module):
    """conv-BN-ReLU → conv(valid)-BN-ReLU6 → conv-BN → conv-BN-SiLU → pool → fc."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.b1, self.r1 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU()
        self.c2, self.b2, self.r2 = nn.Conv2d(8, 8, 3), nn.BatchNorm2d(8), nn.ReLU6(inplace=True)
        self.c3, self.b3 = nn.Conv2d(8, 6, 1), nn.BatchNorm2d(6)
        self.c4, self.b4, self.a4 = nn.Conv2d(6, 6, 1), nn.BatchNorm2d(6), nn.SiLU()
        self.pool, self.flat = nn.AdaptiveAvgPool2d(1), nn.Flatten()
        self.fc = nn.Linear(6, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.r2(self.b2(self.c2(self.r1(self.b1(self.c1(x))))))
        x = self.a4(self.b4(self.c4(self.b3(self.c3(x)))))
        return self.fc(self.flat(self.pool(x)))


def _net(seed: int = 0) -> Net:
    torch.manual_seed(seed)
    net = Net()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for bn in (net.b1, net.b2, net.b3, net.b4):
            bn.weight.copy_(torch.rand(bn.num_features, generator=g) + 0.5)
            bn.bias.copy_(torch.randn(bn.num_features, generator=g))
            assert bn.running_mean is not None and bn.running_var is not None
            bn.running_mean.copy_(torch.randn(bn.num_features, generator=g) * 0.1)
            bn.running_var.copy_(torch.rand(bn.num_features, generator=g) + 0.5)
        net.b2.weight[list(DEAD)] = 0.0
        net.b2.bias[DEAD[0]] = 0.7  # a constant 0.7 after ReLU6: its role goes to c3's bias
        net.b2.bias[DEAD[1]] = -0.3  # a constant 0 after ReLU6
    return net.eval()


def _x(n: int = 4, seed: int = 3) -> torch.Tensor:
    return torch.randn(n, 3, 12, 12, generator=torch.Generator().manual_seed(seed))


def test_traced_consumers_and_reasons() -> None:
    net = _net()
    acts = datafree_activations(net, _x(2))
    consumers = {n for n, m in net.named_modules() if is_mixing_consumer(m)}
    assert set(acts.statistics) == {"c2", "c3", "c4"}
    assert set(acts.statistics) | set(acts.statistics_skipped) == consumers
    assert "not the output of a BatchNorm" in acts.statistics_skipped["c1"]
    assert "SiLU" in acts.statistics_skipped["fc"]
    S = acts.statistics["c2"].numpy()
    assert S.shape == (9, 9) and S[8, 8] == NOMINAL_ROWS and np.array_equal(S, S.T)
    assert acts.statistics["c3"].shape == (9, 9) and acts.statistics["c4"].shape == (7, 7)
    scaled = datafree_statistics(net, _x(5), rows=10.0)  # n only scales S; the input size: nothing
    for name, s in acts.statistics.items():
        np.testing.assert_allclose(scaled[name] * NOMINAL_ROWS / 10.0, s.numpy(), rtol=1e-12)
    assert not net.training


def test_moments_match_a_monte_carlo_reference() -> None:
    net = _net()
    stats = datafree_statistics(net, _x(1))
    z = torch.randn(400_000, generator=torch.Generator().manual_seed(7)).double()
    cases = {"c2": (net.b1, torch.relu), "c3": (net.b2, lambda t: t.clamp(0, 6)),
             "c4": (net.b3, lambda t: t)}  # fmt: skip
    for name, (bn, act) in cases.items():
        S = stats[name]
        c = S.shape[0] - 1
        n = S[c, c]
        mean, second = S[:c, c] / n, np.diag(S)[:c] / n
        off = S[:c, :c] / n - np.outer(mean, mean)
        assert np.allclose(off - np.diag(np.diag(off)), 0, atol=1e-12)  # independent channels
        for k in range(c):
            y = act(bn.weight[k].double().detach() * z + bn.bias[k].double().detach())
            se = float(y.std()) / np.sqrt(z.numel()) + 1e-12
            assert abs(mean[k] - float(y.mean())) < 6 * se, (name, k)
            dev2 = (y - y.mean()) ** 2
            se_var = float(dev2.std()) / np.sqrt(z.numel()) + 1e-12
            assert abs(second[k] - mean[k] ** 2 - float(dev2.mean())) < 6 * se_var, (name, k)


def test_dead_channels_are_exactly_redundant_and_fold_into_the_bias(tmp_path: Path) -> None:
    from graphs.compensated import group_consumers
    from graphs.functional import error_curve

    net = _net()
    x = _x(2)
    torch.save(net.state_dict(), tmp_path / "m.pt")
    parsed = read_checkpoint(tmp_path / "m.pt")
    manifest = build_manifest(net, x)
    stats = datafree_statistics(net, x)
    found = group_consumers(parsed.layers, manifest, stats)
    gid = next(g for g, specs in found.consumers.items() if any(s.consumer == "c3" for s in specs))
    curve = error_curve([s.data for s in found.consumers[gid]], max_remove=7)
    assert sorted(int(i) for i in curve.order[:2]) == list(DEAD)
    assert np.allclose(curve.errors[:3], 0, atol=1e-12) and curve.errors[3] > 1e-3
    plan = plan_layers(
        parsed.layers, method="mrp", target=Target(flops=0.02), manifest=manifest,
        params_total=parsed.info.n_params, stats=stats, allocation="functional",
        checkpoint_sha256=parsed.info.sha256,
    )  # fmt: skip
    removed = {g.id: g.remove for g in plan.groups if g.remove}
    assert removed == {gid: list(DEAD)}
    assert plan.compensation is not None
    assert {f.kind for f in plan.compensation.folds} == {"mean"}
    g = next(g for g in plan.groups if g.id == gid)
    assert g.functional_redundancy is not None and g.functional_redundancy >= 2 / 8
    path = tmp_path / "plan.json"
    save_plan(plan, path)
    pruned = apply_plan(copy.deepcopy(net), path, x, checkpoint_sha256=parsed.info.sha256)
    held_out = _x(8, seed=11)
    with torch.no_grad():
        before, after = net(held_out), pruned(held_out)
        uncompensated = apply_plan(
            copy.deepcopy(net),
            plan.model_copy(update={"compensation": None}),
            x,
            checkpoint_sha256=parsed.info.sha256,
        )(held_out)
    assert isinstance(pruned, Net) and pruned.c3.in_channels == pruned.c2.out_channels == 6
    torch.testing.assert_close(after, before, atol=1e-4, rtol=1e-4)
    assert (uncompensated - before).abs().max() > 1e-3  # the fold is what keeps the output


def test_cli_plans_from_a_datafree_file(tmp_path: Path) -> None:
    net = _net()
    x = _x(2)
    torch.save(net.state_dict(), tmp_path / "m.pt")
    (tmp_path / "man.json").write_text(build_manifest(net, x).model_dump_json())
    datafree_activations(net, x).save(tmp_path / "df.safetensors")
    res = CliRunner().invoke(app, [
        "plan", str(tmp_path / "m.pt"), "--manifest", str(tmp_path / "man.json"),
        "--activations", str(tmp_path / "df.safetensors"), "--target-flops", "0.02",
        "--method", "mrp", "--allocation", "functional", "-o", str(tmp_path / "plan.json"),
    ])  # fmt: skip
    assert res.exit_code == 0, res.stderr
    assert (tmp_path / "plan.fold.safetensors").is_file()
    plan = PruningPlan.model_validate_json((tmp_path / "plan.json").read_text())
    assert plan.compensation is not None
    assert [g.remove for g in plan.groups if g.remove] == [list(DEAD)]
    pruned = apply_plan(copy.deepcopy(net), tmp_path / "plan.json", x)
    held_out = _x(8, seed=11)
    with torch.no_grad():
        torch.testing.assert_close(pruned(held_out), net(held_out), atol=1e-4, rtol=1e-4)


def test_inplace_residual_add_and_flatten_are_left_out() -> None:
    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.c1, self.b1, self.r = nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4), nn.ReLU(True)
            self.c2 = nn.Conv2d(4, 4, 1)
            self.flat, self.fc = nn.Flatten(), nn.Linear(4 * 9, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            out = self.b1(self.c1(x))
            out += x  # torchvision ResNet style: modifies the BN output in place
            out = self.r(out)
            return self.fc(self.flat(self.r(self.b1(self.c2(out)))))

    net = Block().eval()
    acts = datafree_activations(net, torch.randn(1, 4, 3, 3))
    assert acts.statistics == {}
    assert "not the output of a BatchNorm" in acts.statistics_skipped["c2"]
    assert "flattened" in acts.statistics_skipped["fc"]


def test_bad_input_says_what_to_pass() -> None:
    with pytest.raises(TypeError, match="torch nn"):
        datafree_statistics(object(), _x(1))  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="example_inputs"):
        datafree_statistics(_net(), {"x": _x(1)})
    for rows in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="rows must be"):
            datafree_statistics(_net(), _x(1), rows=rows)


def test_a_shared_consumer_with_inputs_of_different_origins_is_left_out() -> None:
    class Shared(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bn, self.r, self.c = nn.BatchNorm2d(3), nn.ReLU(), nn.Conv2d(3, 3, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.c(self.r(self.bn(x))) + self.c(x)

    acts = datafree_activations(Shared().eval(), torch.randn(1, 3, 4, 4))
    assert acts.statistics == {} and "more than once" in acts.statistics_skipped["c"]


def test_deterministic(tmp_path: Path) -> None:
    a = datafree_activations(_net(), _x(2)).save(tmp_path / "a.safetensors").read_bytes()
    b = datafree_activations(_net(), _x(2)).save(tmp_path / "b.safetensors").read_bytes()
    assert a == b


@pytest.mark.real
def test_real_mobilenet_v2(realdata: Path) -> None:
    net = models.mobilenet_v2()
    state = torch.load(realdata / "mobilenet_v2_imagenet.pth", weights_only=True)
    net.load_state_dict(state)
    acts = datafree_activations(net, torch.zeros(1, 3, 64, 64))
    stats, skipped = acts.stats(), acts.statistics_skipped
    blocks = list(range(1, 18))
    for i in blocks:  # the project conv reads ReLU6(BN(depthwise))
        project = f"features.{i}.conv.{1 if i == 1 else 2}"
        assert project in stats, (project, skipped.get(project))
        assert np.all(np.isfinite(stats[project])) and stats[project][-1, -1] > 0
    for i in blocks[1:]:  # the expansion conv reads the previous block's output: the sum of a
        # residual add (not traced) unless that block has no shortcut (then a bare BN output)
        expand = f"features.{i}.conv.0.0"
        if net.features[i - 1].use_res_connect:
            assert expand in skipped and "not the output of a BatchNorm" in skipped[expand]
        else:
            assert expand in stats, (expand, skipped.get(expand))
    assert any(net.features[i].use_res_connect for i in blocks)
    assert "features.1.conv.0.0" not in stats  # depthwise: not a consumer
    assert "classifier.1" in skipped  # functional pooling and flatten: not traced
