"""clients.datafree merges near-duplicate filters: exact positive multiples fold exactly."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from clients import apply_plan, build_manifest, datafree_activations, datafree_statistics
from clients.datafree import datafree_merges
from graphs.compensated import save_plan
from graphs.plan import Target
from graphs.planner import plan_layers
from service.ingest.checkpoint import read_checkpoint

PAIRS = ((1, 6, 1.7), (3, 4, 0.6))  # (kept i, removed j, s): channel j = s × channel i


class ConvNet(nn.Module):
    """conv-BN-ReLU → conv-BN-act (the producer) → conv k×k (the consumer) → pool → fc."""

    def __init__(self, k: int = 1, act: type[nn.Module] = nn.ReLU) -> None:
        super().__init__()
        self.c1, self.b1, self.r1 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU()
        self.c2, self.b2, self.a2 = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), act()
        self.c3 = nn.Conv2d(8, 6, k, padding=k // 2)
        self.pool, self.flat, self.fc = nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.a2(self.b2(self.c2(self.r1(self.b1(self.c1(x))))))
        return self.fc(self.flat(self.pool(self.c3(x))))


class MLP(nn.Module):
    """stem → Linear → BN1d → ReLU → Linear (producer fc1, consumer fc2)."""

    def __init__(self, act: type[nn.Module] = nn.ReLU) -> None:
        super().__init__()
        self.stem, self.r0 = nn.Linear(10, 12), nn.ReLU()
        self.fc1, self.b2, self.a2 = nn.Linear(12, 8), nn.BatchNorm1d(8), act()
        self.fc2 = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.a2(self.b2(self.fc1(self.r0(self.stem(x))))))


def _randomize(net: nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.5)
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)  # type: ignore[union-attr]
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)  # type: ignore[union-attr]


def _duplicate(producer: Any, bn: Any, pairs: tuple[tuple[int, int, float], ...],
               *, sign: float = 1.0) -> None:  # fmt: skip
    """Channel j's BN output := sign · s · channel i's (same filter and BN statistics)."""
    with torch.no_grad():
        for i, j, s in pairs:
            producer.weight[j] = producer.weight[i]
            producer.bias[j] = producer.bias[i]
            bn.running_mean[j] = bn.running_mean[i]
            bn.running_var[j] = bn.running_var[i]
            bn.weight[j] = sign * s * bn.weight[i]
            bn.bias[j] = sign * s * bn.bias[i]


def _conv(k: int = 1, act: type[nn.Module] = nn.ReLU, seed: int = 0) -> ConvNet:
    torch.manual_seed(seed)
    net = ConvNet(k, act)
    _randomize(net, seed + 1)
    _duplicate(net.c2, net.b2, PAIRS)
    return net.eval()


def _mlp(act: type[nn.Module] = nn.ReLU, seed: int = 0) -> MLP:
    torch.manual_seed(seed)
    net = MLP(act)
    _randomize(net, seed + 1)
    _duplicate(net.fc1, net.b2, PAIRS)
    return net.eval()


def _images(n: int, seed: int) -> torch.Tensor:
    return torch.randn(n, 3, 10, 10, generator=torch.Generator().manual_seed(seed))


def _vectors(n: int, seed: int) -> torch.Tensor:
    return torch.randn(n, 10, generator=torch.Generator().manual_seed(seed))


def _plan_and_apply(net: nn.Module, x: torch.Tensor, tmp_path: Path, target: float) -> tuple:
    torch.save(net.state_dict(), tmp_path / "m.pt")
    parsed = read_checkpoint(tmp_path / "m.pt")
    manifest = build_manifest(net, x)
    plan = plan_layers(
        parsed.layers, method="mrp", target=Target(params=target), manifest=manifest,
        params_total=parsed.info.n_params, stats=datafree_statistics(net, x),
        allocation="functional", checkpoint_sha256=parsed.info.sha256,
    )  # fmt: skip
    save_plan(plan, tmp_path / "plan.json")
    pruned = apply_plan(copy.deepcopy(net), tmp_path / "plan.json", x,
                        checkpoint_sha256=parsed.info.sha256)  # fmt: skip
    return plan, pruned


def _one_of_each_pair(plan: object) -> bool:
    """The plan removes exactly one channel of each duplicate pair, and nothing else."""
    removed = [g.remove for g in plan.groups if g.remove]  # type: ignore[attr-defined]
    return (
        len(removed) == 1
        and len(removed[0]) == len(PAIRS)
        and all(len({i, j} & set(removed[0])) == 1 for i, j, _ in PAIRS)
    )


@pytest.mark.parametrize("k", [1, 3])
def test_conv_duplicates_merge_exactly(k: int, tmp_path: Path) -> None:
    net = _conv(k)
    x = _images(2, 3)
    assert datafree_merges(net, x) == {"c3": [[1, 6], [3, 4]]}
    plan, pruned = _plan_and_apply(net, x, tmp_path, target=0.15)
    assert _one_of_each_pair(plan)  # the duplicates go first: error 0
    assert plan.compensation is not None
    fold = next(f for f in plan.compensation.folds if f.consumer == "c3")
    assert fold.predicted_error < 1e-5
    assert pruned.c3.in_channels == 6
    held_out = _images(8, 11)
    with torch.no_grad():
        torch.testing.assert_close(pruned(held_out), net(held_out), atol=1e-4, rtol=1e-4)
        unfolded = apply_plan(copy.deepcopy(net), plan.model_copy(update={"compensation": None}),
                              x, checkpoint_sha256=plan.checkpoint_sha256)(held_out)  # fmt: skip
        assert (unfolded - net(held_out)).abs().max() > 1e-3  # the merge is what keeps it
    S = datafree_statistics(net, x, merge_threshold=None)["c3"]  # without merges: independent
    cov = S[:8, :8] / S[8, 8] - np.outer(S[:8, 8], S[:8, 8]) / S[8, 8] ** 2
    assert np.allclose(cov - np.diag(np.diag(cov)), 0, atol=1e-12)


def test_linear_duplicates_merge_exactly(tmp_path: Path) -> None:
    net = _mlp()
    x = _vectors(4, 3)
    assert datafree_merges(net, x) == {"fc2": [[1, 6], [3, 4]]}
    plan, pruned = _plan_and_apply(net, x, tmp_path, target=0.1)
    assert _one_of_each_pair(plan)
    held_out = _vectors(64, 11)
    with torch.no_grad():
        torch.testing.assert_close(pruned(held_out), net(held_out), atol=1e-4, rtol=1e-4)


def test_identity_activation_merges_too() -> None:
    net = _conv(1, nn.Identity)
    assert datafree_merges(net, _images(1, 3)) == {"c3": [[1, 6], [3, 4]]}


@pytest.mark.parametrize("act", [nn.ReLU6, nn.GELU, nn.Sigmoid])
def test_non_homogeneous_activations_never_merge(act: type[nn.Module]) -> None:
    net = _conv(1, act)
    x = _images(1, 3)
    assert datafree_merges(net, x) == {}
    acts = datafree_activations(net, x)
    if act is nn.ReLU6:  # independent channels: mean folds, as without merging
        S = acts.stats()["c3"]
        assert np.array_equal(S, datafree_statistics(net, x, merge_threshold=None)["c3"])
    else:
        assert "c3" in acts.statistics_skipped


def test_negative_scales_never_merge() -> None:
    torch.manual_seed(0)
    net = ConvNet()
    _randomize(net, 1)
    _duplicate(net.c2, net.b2, PAIRS, sign=-1.0)
    assert datafree_merges(net.eval(), _images(1, 3)) == {}


def test_random_filters_never_merge_and_keep_the_statistics_bit_for_bit() -> None:
    torch.manual_seed(0)
    net = ConvNet()
    _randomize(net, 1)
    net.eval()
    x = _images(1, 3)
    assert datafree_merges(net, x) == {}
    a, b = datafree_statistics(net, x), datafree_statistics(net, x, merge_threshold=None)
    assert a.keys() == b.keys() and all(a[n].tobytes() == b[n].tobytes() for n in a)


def test_permutation_invariant_and_deterministic(tmp_path: Path) -> None:
    net = _conv(3)
    x = _images(1, 3)
    perm = torch.tensor([5, 2, 7, 0, 1, 6, 3, 4])
    twin = copy.deepcopy(net)
    with torch.no_grad():
        c2: Any = twin.c2
        b2: Any = twin.b2
        tensors: list[torch.Tensor] = [c2.weight, c2.bias, b2.weight, b2.bias, b2.running_mean,
                                       b2.running_var]  # fmt: skip
        for t in tensors:
            t.copy_(t[perm])
        twin.c3.weight.copy_(twin.c3.weight[:, perm])
    S, St = datafree_statistics(net, x)["c3"], datafree_statistics(twin, x)["c3"]
    full = np.append(perm.numpy(), 8)
    np.testing.assert_allclose(St, S[np.ix_(full, full)], rtol=1e-12)
    got = sorted(sorted(int(perm[i]) for i in m) for m in datafree_merges(twin, x)["c3"])
    assert got == [[1, 6], [3, 4]]
    one = datafree_activations(net, x).save(tmp_path / "a.safetensors").read_bytes()
    two = datafree_activations(_conv(3), x).save(tmp_path / "b.safetensors").read_bytes()
    assert one == two


def test_bad_threshold() -> None:
    for bad in (0.0, 1.5, float("nan"), "0.9"):
        with pytest.raises(ValueError, match="merge_threshold"):
            datafree_statistics(_conv(), _images(1, 3), merge_threshold=bad)  # type: ignore[arg-type]


@pytest.mark.real
def test_real_mobilenet_v2_has_no_near_duplicates_where_merges_apply(realdata: Path) -> None:
    """The only dense producers read through a homogeneous activation are the project convs
    (their BN output feeds the next expansion conv); their effective filters are far from
    parallel, so the statistics are those without merges, bit for bit."""
    from tests.clients import models

    net = models.mobilenet_v2()
    net.load_state_dict(torch.load(realdata / "mobilenet_v2_imagenet.pth", weights_only=True))
    x = torch.zeros(1, 3, 64, 64)
    assert datafree_merges(net, x) == {}
    a, b = datafree_statistics(net, x), datafree_statistics(net, x, merge_threshold=None)
    assert a.keys() == b.keys() and all(a[n].tobytes() == b[n].tobytes() for n in a)


def test_merges_travel_in_the_statistics_file_to_the_cli(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from prunegraph.cli import app

    net = _conv(3)
    x = _images(2, 3)
    torch.save(net.state_dict(), tmp_path / "m.pt")
    (tmp_path / "man.json").write_text(build_manifest(net, x).model_dump_json())
    datafree_activations(net, x).save(tmp_path / "df.safetensors")
    res = CliRunner().invoke(app, [
        "plan", str(tmp_path / "m.pt"), "--manifest", str(tmp_path / "man.json"),
        "--activations", str(tmp_path / "df.safetensors"), "--target-params", "0.15",
        "--method", "mrp", "-o", str(tmp_path / "plan.json"),
    ])  # fmt: skip
    assert res.exit_code == 0, res.stderr
    pruned = apply_plan(copy.deepcopy(net), tmp_path / "plan.json", x)
    assert isinstance(pruned, ConvNet) and pruned.c3.in_channels == 6
    held_out = _images(8, 11)
    with torch.no_grad():
        torch.testing.assert_close(pruned(held_out), net(held_out), atol=1e-4, rtol=1e-4)
