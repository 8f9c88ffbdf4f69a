"""clients.refit: sequential least-squares refit of a pruned model against the unpruned one."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from torch import nn

from clients import PlanMismatchError, apply_plan, build_manifest, capture_activations, refit
from graphs.plan import PruningPlan, Target
from graphs.planner import plan_layers
from service.ingest.checkpoint import read_checkpoint
from tests.clients.fold_models import Chain, chain, data, error, make_plan, residual

SIZE = {"Residual": 4, "Chain": 12}


def _size(net: nn.Module) -> int:
    return SIZE[type(net).__name__]


def _compensated(
    net: nn.Module, calibration: torch.Tensor, tmp: Path
) -> tuple[nn.Module, PruningPlan]:
    """An l1 plan at -20 % FLOPs planned from the calibration statistics, applied with its
    least-squares folds to a copy of ``net``."""
    x = torch.zeros(1, 3, _size(net), _size(net))
    stats = capture_activations(net, calibration.split(64), maps=False).stats()
    torch.save(net.state_dict(), tmp / "model.pt")
    parsed = read_checkpoint(tmp / "model.pt")
    plan = plan_layers(
        parsed.layers, method="l1", target=Target(flops=0.2), manifest=build_manifest(net, x),
        params_total=parsed.info.n_params, stats=stats, compensation=True,
        allocation="uniform",  # the same fraction everywhere: folds with errors to refit
    )  # fmt: skip
    assert plan.compensation is not None and plan.groups
    return apply_plan(copy.deepcopy(net), plan, x), plan


@pytest.mark.parametrize("make", [residual, chain])
def test_refit_reduces_the_held_out_error_of_fold_only(make, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    net = make(False)
    size = _size(net)
    calibration = data(768, 0, size)
    held_out = data(64, 7, size)
    folded, plan = _compensated(net, calibration, tmp_path)
    refitted = copy.deepcopy(folded)
    report = refit(refitted, net, calibration.split(128), plan=plan)
    assert report.layers and all(r.error_after <= r.error_before + 1e-12 for r in report.layers)
    with torch.no_grad():
        before = net(held_out)
        e_fold, e_refit = error(before, folded(held_out)), error(before, refitted(held_out))
    assert e_refit < e_fold, (e_refit, e_fold, report)


@pytest.mark.parametrize(
    ("make", "removal"),
    [(residual, {"p1": [5, 6, 7]}), (chain, {"a": [6, 7], "b": [6, 7]})],
)
def test_refit_is_exact_where_the_pruned_model_can_represent_the_original(  # type: ignore[no-untyped-def]
    make, removal
) -> None:
    """Removed channels are exact linear combinations of kept ones (residual: 1×1 consumers;
    chain: 3×3 consumers and a linear after flatten). Pruned WITHOUT folds, the refit alone
    must recover the original outputs."""
    net = make(True)
    size = _size(net)
    x = torch.zeros(1, 3, size, size)
    plan, _ = make_plan(net, build_manifest(net, x), removal, None)
    pruned = apply_plan(copy.deepcopy(net), plan, x)
    held_out = data(32, 7, size)
    with torch.no_grad():
        before = net(held_out)
        assert error(before, pruned(held_out)) > 1e-3  # the bare pruning does lose something
    report = refit(pruned, net, data(768, 0, size).split(128), plan=plan, ridge=0.0)
    assert not report.skipped, report.skipped
    with torch.no_grad():
        after = pruned(held_out)
    assert torch.allclose(after, before, atol=1e-4, rtol=1e-4)
    assert all(r.error_after < 1e-8 for r in report.layers)


def test_refit_leaves_the_original_untouched_and_its_modes() -> None:
    net = chain(False)
    x = torch.zeros(1, 3, 12, 12)
    plan, _ = make_plan(net, build_manifest(net, x), {"a": [0, 3]}, None)
    pruned = apply_plan(copy.deepcopy(net), plan, x)
    net.train()
    state = {k: v.clone() for k, v in net.state_dict().items()}
    refit(pruned, net, [data(768, 0, 12)], plan=plan)
    assert net.training and all(m.training for m in net.modules())
    assert all(torch.equal(state[k], v) for k, v in net.state_dict().items())


def test_too_few_rows_and_unselected_layers_are_skipped_or_left_alone() -> None:
    net = chain(False)
    x = torch.zeros(1, 3, 12, 12)
    plan, _ = make_plan(net, build_manifest(net, x), {"b": [1]}, None)
    pruned = apply_plan(copy.deepcopy(net), plan, x)
    weights = dict(pruned.named_parameters())
    stem, fc2 = weights["stem.weight"].clone(), weights["fc2.weight"].clone()
    report = refit(pruned, net, [data(48, 0, 12)], plan=plan, layers=["a", "fc1", "fc2"])
    assert "fc1" in report.skipped and "rows" in report.skipped["fc1"]  # 48 rows, 253 inputs
    assert [r.name for r in report.layers] == ["a", "fc2"]
    assert torch.equal(weights["stem.weight"], stem)
    assert not torch.equal(weights["fc2.weight"], fc2)


def _unchanged(model: nn.Module, fn) -> None:  # type: ignore[no-untyped-def]
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(PlanMismatchError) as info:
        fn()
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert "refit" in str(info.value)


def test_bad_inputs_are_refused_before_any_weight_changes() -> None:
    net = chain(False)
    x = torch.zeros(1, 3, 12, 12)
    plan, _ = make_plan(net, build_manifest(net, x), {"a": [0, 3]}, None)
    pruned = apply_plan(copy.deepcopy(net), plan, x)
    batches = [data(64, 0, 12)]
    _unchanged(pruned, lambda: refit(pruned, residual(False), batches))  # other module names
    _unchanged(pruned, lambda: refit(pruned, net, batches))  # a lost outputs: plan= needed
    other, _ = make_plan(net, build_manifest(net, x), {"a": [0]}, None)
    _unchanged(pruned, lambda: refit(pruned, net, batches, plan=other))  # not the applied plan
    _unchanged(pruned, lambda: refit(net, pruned, batches, plan=plan))  # swapped
    _unchanged(pruned, lambda: refit(pruned, net, batches, plan=plan, layers=["nope"]))
    _unchanged(pruned, lambda: refit(pruned, pruned, batches, plan=plan))  # same object
    strided = Chain().eval()
    strided.a = nn.Conv2d(8, 8, 3, padding=1, stride=1, dilation=1)
    strided.b = nn.Conv2d(8, 8, 3, stride=2, padding=2, dilation=2)  # other geometry
    _unchanged(pruned, lambda: refit(pruned, strided, batches, plan=plan))
    with pytest.raises(ValueError, match="batches"):
        refit(pruned, net, [], plan=plan)


def _patches(x: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:
    """Rows (N·positions, C·kh·kw) by explicit slicing (the slow reference of F.unfold)."""
    (kh, kw), (sh, sw), (dh, dw) = conv.kernel_size, conv.stride, conv.dilation
    assert not isinstance(conv.padding, str)
    ph, pw = conv.padding
    xp = torch.nn.functional.pad(x, (pw, pw, ph, ph))
    ho = (xp.shape[2] - dh * (kh - 1) - 1) // sh + 1
    wo = (xp.shape[3] - dw * (kw - 1) - 1) // sw + 1
    rows = [
        xp[:, :, i * sh : i * sh + dh * (kh - 1) + 1 : dh, j * sw : j * sw + dw * (kw - 1) + 1 : dw]
        for i in range(ho)
        for j in range(wo)
    ]
    return torch.stack(rows, 1).reshape(x.shape[0] * ho * wo, -1).double()


def test_a_strided_3x3_refit_agrees_with_least_squares_on_explicit_patches() -> None:
    net = chain(False)
    x = torch.zeros(1, 3, 12, 12)
    plan, _ = make_plan(net, build_manifest(net, x), {"a": [0, 3], "b": [2]}, None)
    pruned = apply_plan(copy.deepcopy(net), plan, x)
    calibration = data(96, 0, 12)
    modules = dict(pruned.named_modules())
    b_new, b_old = modules["b"], dict(net.named_modules())["b"]
    assert isinstance(b_new, nn.Conv2d) and isinstance(b_old, nn.Conv2d)
    seen: list[torch.Tensor] = []
    handle = b_new.register_forward_pre_hook(lambda _, args: seen.append(args[0]))
    with torch.no_grad():
        pruned(calibration)
        target = b_old(torch.relu(net.a(torch.relu(net.stem(calibration)))))
    handle.remove()
    rows = _patches(seen[0], b_new)
    rows = torch.cat([rows, torch.ones(rows.shape[0], 1, dtype=rows.dtype)], 1)
    kept = [i for i in range(8) if i != 2]
    y = target[:, kept].movedim(1, -1).reshape(rows.shape[0], -1).double()
    expected = torch.linalg.lstsq(rows, y).solution.T  # (out, C·9 + 1)
    report = refit(pruned, net, [calibration], plan=plan, ridge=0.0, layers=["b"])
    assert [r.name for r in report.layers] == ["b"]
    got = torch.cat([b_new.weight.reshape(len(kept), -1), b_new.bias.reshape(-1, 1)], 1)  # type: ignore[union-attr]
    assert torch.allclose(got.double(), expected, atol=1e-4, rtol=1e-3)


def test_bias_only_restores_the_calibration_mean_and_keeps_the_weights() -> None:
    net = chain(False)
    x = torch.zeros(1, 3, 12, 12)
    plan, _ = make_plan(net, build_manifest(net, x), {"a": [0, 3], "b": [2]}, None)
    pruned = apply_plan(copy.deepcopy(net), plan, x)
    calibration = data(48, 0, 12)
    weights = {k: v.clone() for k, v in pruned.state_dict().items() if k.endswith("weight")}
    with torch.no_grad():
        want, before = net(calibration).mean(0), pruned(calibration).mean(0)
    assert not torch.allclose(before, want, atol=1e-3)
    report = refit(pruned, net, calibration.split(16), plan=plan, weights=False)
    assert not report.skipped  # bias correction needs no rows per input
    assert all(torch.equal(weights[k], v) for k, v in pruned.state_dict().items() if k in weights)
    with torch.no_grad():
        assert torch.allclose(pruned(calibration).mean(0), want, atol=1e-5)
