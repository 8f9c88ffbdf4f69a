"""apply_plan with compensation (issue 14 contract B): folds validated before any weight changes,
exact where removed channels are linear combinations of kept ones, better than no fold
elsewhere; BN recalibration."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from clients import PlanMismatchError, apply_plan, build_manifest, capture_activations
from clients.fold import (
    Fold,
    check_compensation,
    fold_module,
    recalibrate_batchnorm,
)
from graphs.fold import (
    SIDECAR_SUFFIX,
    encode_sidecar,
    fold_keys,
    sidecar_sha256,
)
from graphs.manifest import ParamAxis
from graphs.plan import PruningPlan
from tests.clients.fold_models import (
    Removal,
    Residual,
    chain,
    data,
    error,
    make_plan,
    outputs,
    residual,
)


def test_exact_linear_combinations_are_folded_exactly() -> None:
    before, after = outputs(residual, True, {"p1": [5, 6, 7]}, True)
    assert torch.allclose(after, before, atol=1e-4, rtol=1e-4)
    _, plain = outputs(residual, True, {"p1": [5, 6, 7]}, False)
    assert error(before, plain) > 1e-2  # without the fold the same removal shows
    before, after = outputs(chain, True, {"a": [6, 7], "b": [6, 7]}, True)
    assert torch.allclose(after, before, atol=1e-4, rtol=1e-4)  # 3×3 and flatten → linear


@pytest.mark.parametrize(
    ("make", "removal"),
    [
        (residual, {"p1": [1, 4, 6]}),  # two consumers (one without bias, followed by BN)
        (chain, {"a": [0, 3, 5]}),  # 3×3 consumer
        (chain, {"b": [1, 2, 4]}),  # linear after flatten (per_channel 36)
    ],
)
def test_fold_reduces_the_error_of_independent_channels(
    make: Callable[[bool], nn.Module], removal: Removal
) -> None:
    before, folded = outputs(make, False, removal, True)
    _, plain = outputs(make, False, removal, False)
    assert error(before, folded) < 0.8 * error(before, plain)


def test_creates_a_bias_and_accepts_the_plan_path(tmp_path: Path) -> None:
    net = residual(True)
    x = torch.zeros(1, 3, 4, 4)
    stats = capture_activations(net, [data(64, 0)], maps=False).stats()
    plan, sidecar = make_plan(net, build_manifest(net, x), {"p1": [5, 6, 7]}, stats)
    path = tmp_path / "plan.json"
    path.write_text(plan.to_json())
    (tmp_path / ("plan" + SIDECAR_SUFFIX)).write_bytes(sidecar)
    assert net.c1.bias is None
    apply_plan(net, path, x)  # the sidecar is found next to the plan
    assert net.c1.bias is not None and net.c1.bias.shape == (6,)
    assert net.c1.weight.shape == (6, 5, 1, 1) and net.p2.weight.shape == (5, 8, 1, 1)


def test_grouped_consumer_folds_within_its_conv_groups() -> None:
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 4, 3, padding=1, groups=2)  # input channels 0-3 | 4-7
    x = torch.randn(2, 8, 5, 5)
    x[:, 3] = 2 * x[:, 1]  # group 0: channel 3 = 2 · channel 1 (no offset: padding stays exact)
    x[:, 6] = 0.5 * x[:, 4] - x[:, 5]  # group 1
    with torch.no_grad():
        before = conv(x)
        kept, removed = [0, 1, 2, 4, 5, 7], [3, 6]
        B = np.zeros((2, 6))
        B[0, 1], B[1, 3], B[1, 4] = 2.0, 0.5, -1.0
        fold_module(conv, Fold("conv", kept, removed, B, np.zeros(2)))
        x[:, removed] = 0  # the removed inputs no longer reach the conv
        assert torch.allclose(conv(x), before, atol=1e-5)


def _bad_cases(
    net: Residual, plan: PruningPlan, sidecar: bytes, tmp: Path
) -> list[tuple[str, PruningPlan | Path, object, str]]:
    """(what, plan, compensation argument, words of the error)."""
    comp = plan.compensation
    assert comp is not None
    tampered = bytearray(sidecar)
    tampered[-1] ^= 1
    wrong_shape: dict[str, np.ndarray] = {
        fold_keys(f.group, f.consumer)[0]: np.zeros((2, 2)) for f in comp.folds
    }
    wrong_shape |= {fold_keys(f.group, f.consumer)[1]: np.zeros(3) for f in comp.folds}
    data = encode_sidecar(wrong_shape)
    reshaped = plan.model_copy(
        update={"compensation": comp.model_copy(
            update={"sidecar_sha256": sidecar_sha256(data), "sidecar_bytes": len(data)}
        )}
    )  # fmt: skip
    renamed = [comp.folds[0].model_copy(update={"consumer": "nope", "weight": "nope.weight"})]
    renamed += comp.folds[1:]
    foreign = plan.model_copy(update={"compensation": comp.model_copy(update={"folds": renamed})})
    lonely = tmp / "lonely.json"
    lonely.write_text(plan.to_json())
    return [
        ("tampered sidecar", plan, bytes(tampered), "is not the one the plan pins"),
        ("no sidecar", plan, None, "no sidecar was given"),
        ("no sidecar next to the plan", lonely, None, "cannot be read"),
        ("wrong shapes", reshaped, data, "not [3, 5]/[3]"),
        ("another model's consumer", foreign, sidecar, "'nope' is not a module"),
    ]


def test_bad_sidecars_are_refused_before_any_weight_changes(tmp_path: Path) -> None:
    net = residual(True)
    x = torch.zeros(1, 3, 4, 4)
    stats = capture_activations(net, [data(64, 0)], maps=False).stats()
    plan, sidecar = make_plan(net, build_manifest(net, x), {"p1": [5, 6, 7]}, stats)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    for what, bad_plan, comp, words in _bad_cases(net, plan, sidecar, tmp_path):
        with pytest.raises(PlanMismatchError, match=re.escape(words)):
            apply_plan(net, bad_plan, x, compensation=comp)  # type: ignore[arg-type]
        state = net.state_dict()
        assert state.keys() == before.keys(), what
        assert all(torch.equal(before[k], state[k]) for k in before), what
    plain, _ = make_plan(net, build_manifest(net, x), {"p1": [5, 6, 7]}, None)
    with pytest.raises(PlanMismatchError, match="carries no compensation"):
        apply_plan(net, plain, x, compensation=sidecar)
    other = chain(False)  # a plan for another model fails before its folds are looked at
    with pytest.raises(PlanMismatchError):
        apply_plan(other, plan, torch.zeros(1, 3, 12, 12), compensation=sidecar)


def test_recalibrate_re_estimates_batchnorm() -> None:
    net = residual(False)
    net.bn.momentum = 0.3
    batch = data(16, 3)
    seen: list[torch.Tensor] = []
    hook = net.bn.register_forward_pre_hook(lambda _, args: seen.append(args[0].detach()))
    assert recalibrate_batchnorm(net, [(batch, torch.zeros(16))]) == 16
    hook.remove()
    z, mean, var = seen[0], net.bn.running_mean, net.bn.running_var
    assert mean is not None and var is not None
    assert torch.allclose(mean, z.mean(dim=(0, 2, 3)), atol=1e-5)
    assert torch.allclose(var, z.var(dim=(0, 2, 3), unbiased=True), atol=1e-4)
    assert not net.training and not net.bn.training and net.bn.momentum == 0.3
    with pytest.raises(ValueError, match="at least one batch"):
        recalibrate_batchnorm(net, [])
    x = torch.zeros(1, 3, 4, 4)
    plan, _ = make_plan(net, build_manifest(net, x), {"p1": [0, 1]}, None)
    apply_plan(net, plan, x, recalibrate=[batch])
    with torch.no_grad():
        y = net.p1(torch.relu(net.stem(batch))) + net.p2(torch.relu(net.stem(batch)))
    assert net.bn.running_mean is not None
    assert torch.allclose(net.bn.running_mean, y.mean(dim=(0, 2, 3)), atol=1e-5)


def test_grouped_consumer_folds_stay_within_conv_groups() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 1), nn.ReLU(), nn.Conv2d(8, 4, 3, groups=2)).eval()
    x = torch.zeros(1, 3, 5, 5)
    stats = capture_activations(net, [torch.randn(16, 3, 5, 5)], maps=False).stats()
    # the manifest keeps groups that feed grouped convs whole; describe the consumer by hand
    manifest = build_manifest(net, x)
    reads = ParamAxis(param="2.weight", axis=1)
    group = manifest.groups[0].model_copy(update={"params": [*manifest.groups[0].params, reads]})
    manifest = manifest.model_copy(update={"groups": [group]})
    plan, sidecar = make_plan(net, manifest, {"0": [3]}, stats)
    (fold,) = check_compensation(net, plan, sidecar)
    assert fold.consumer == "2" and not fold.matrix[0, 3:].any()  # only channels 0-2 stand in
    comp = plan.compensation
    assert comp is not None
    mixed = fold.matrix.copy()
    mixed[0, 4] = 0.5  # kept channel 5 (conv group 1) for removed channel 3 (group 0)
    keys = fold_keys(comp.folds[0].group, "2")
    data = encode_sidecar({keys[0]: mixed, keys[1]: fold.shift})
    bad = plan.model_copy(
        update={"compensation": comp.model_copy(
            update={"sidecar_sha256": sidecar_sha256(data), "sidecar_bytes": len(data)}
        )}
    )  # fmt: skip
    with pytest.raises(PlanMismatchError, match="different conv groups"):
        check_compensation(net, bad, data)
