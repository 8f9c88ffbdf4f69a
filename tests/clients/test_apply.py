"""clients.apply_plan: physical pruning with torch-pruning, validated before any weight changes."""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import pytest
import torch
import torch_pruning as tp
from pydantic import ValidationError
from torch import nn

from clients import PlanError, PlanMismatchError, apply_plan, build_manifest
from graphs.manifest import Manifest
from graphs.plan import Constraints, GroupPlan, PruningPlan, Target
from tests.clients import models

Chooser = Callable[[int], list[int]]  # channels -> sorted indices to remove

# --------------------------------------------------------------------------- pure helpers


def shapes_after(manifest: Manifest, removed: Mapping[int, int]) -> dict[str, list[int]]:
    """Every parameter's shape once ``removed[group id]`` channels of each group are gone."""
    shapes = {n: list(s) for n, s in manifest.param_shapes.items()}
    for g in manifest.groups:
        for pa in g.params:
            shapes[pa.param][pa.axis] -= removed.get(g.id, 0) * pa.per_channel
    return shapes


def params_after(manifest: Manifest, removed: Mapping[int, int]) -> int:
    return sum(torch.Size(s).numel() for s in shapes_after(manifest, removed).values())


def macs_after(manifest: Manifest, removed: Mapping[int, int]) -> float:
    """The planner's formula: scaled costs plus the MACs that do not depend on channels."""
    channels = {g.id: g.channels for g in manifest.groups}

    def kept(gid: int | None) -> float:
        return 1.0 if gid is None else (channels[gid] - removed.get(gid, 0)) / channels[gid]

    scaled = sum(c.macs * kept(c.out_group) * kept(c.in_group) for c in manifest.costs)
    return scaled + manifest.macs_total - sum(c.macs for c in manifest.costs)


def make_plan(
    manifest: Manifest, choose: Chooser, *, digest: str | None = None
) -> tuple[PruningPlan, dict[int, list[int]]]:
    """A plan that removes ``choose(channels)`` from every prunable group of the manifest."""
    groups: list[GroupPlan] = []
    removal: dict[int, list[int]] = {}
    for g in manifest.groups:
        if not g.prunable:
            continue
        remove = choose(g.channels)
        removal[g.id] = remove
        groups.append(
            GroupPlan(
                id=g.id,
                name=g.producers[0],
                producers=g.producers,
                channels_before=g.channels,
                channels_after=g.channels - len(remove),
                remove=remove,
                redundancy=None,
                rationale="test",
            )
        )
    removed = {gid: len(r) for gid, r in removal.items()}
    before, after = manifest.macs_total, round(macs_after(manifest, removed))
    plan = PruningPlan(
        checkpoint_sha256=digest,
        method="random",
        target=Target(flops=0.25),
        constraints=Constraints(),
        seed=0,
        parameters={},
        coupling="manifest",
        groups=groups,
        expected_shapes=shapes_after(manifest, removed),
        params_before=manifest.params_total,
        params_after=params_after(manifest, removed),
        flops_before=before,
        flops_after=after,
        achieved={"flops": 1 - after / before},
        rule="test",
    )
    return plan, removal


def first_quarter(channels: int) -> list[int]:
    return list(range(channels // 4))


def seeded_random(seed: int, low: float = 0.0, high: float = 0.6) -> Chooser:
    rng = random.Random(seed)

    def choose(channels: int) -> list[int]:
        k = int(channels * rng.uniform(low, high))
        return sorted(rng.sample(range(channels), k))

    return choose


def state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def same_state(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def kept_original(
    manifest: Manifest, removal: Mapping[int, list[int]], original: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """The original parameters restricted to the kept entries of every pruned axis."""
    out = {n: original[n] for n in manifest.param_shapes}
    for g in manifest.groups:
        gone = set(removal.get(g.id, []))
        keep = [c for c in range(g.channels) if c not in gone]
        for pa in g.params:
            k = pa.per_channel
            entries = torch.tensor([c * k + j for c in keep for j in range(k)], dtype=torch.long)
            out[pa.param] = out[pa.param].index_select(pa.axis, entries)
    return out


def macs_of(model: nn.Module, x: torch.Tensor) -> float:
    macs, _ = tp.utils.count_ops_and_params(model, x)
    return float(macs)


def fresh(factory: Callable[[], nn.Module], seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = factory().eval()
    for m in model.modules():  # non-trivial BN statistics so that a wrong row would show
        if isinstance(m, nn.BatchNorm2d):
            assert m.running_mean is not None and m.running_var is not None
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
    return model


CASES: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...]]] = {
    "resnet56_a": (lambda: models.resnet56("A"), (1, 3, 32, 32)),
    "resnet56_b": (lambda: models.resnet56("B"), (1, 3, 32, 32)),
    "resnet50": (models.resnet50, (1, 3, 64, 64)),
    "vgg16_bn": (models.vgg16_bn, (1, 3, 32, 32)),
    "mobilenet_v2": (models.mobilenet_v2, (1, 3, 96, 96)),
    "digit_cnn": (models.digit_cnn, (1, 1, 28, 28)),
}


# --------------------------------------------------------------------------- applying


@pytest.mark.parametrize("name", sorted(CASES))
def test_first_quarter_plan_prunes_to_the_predicted_model(name: str) -> None:
    factory, shape = CASES[name]
    model = fresh(factory)
    x = torch.randn(shape)
    manifest = build_manifest(model, x)
    plan, removal = make_plan(manifest, first_quarter)
    assert plan.params_after < plan.params_before
    original = state(model)

    pruned = apply_plan(model, plan, x)

    assert pruned is model
    assert {n: list(p.shape) for n, p in model.named_parameters()} == plan.expected_shapes
    assert sum(p.numel() for p in model.parameters()) == plan.params_after
    assert plan.flops_after is not None
    assert macs_of(model, x) == pytest.approx(plan.flops_after, rel=0.01)
    # original indices stay valid group after group: what survives is the original kept rows
    expected = kept_original(manifest, removal, original)
    params = dict(model.named_parameters())
    for n, t in expected.items():
        assert torch.equal(params[n].detach(), t), n
    assert model(x).shape == factory().eval()(x).shape


@pytest.mark.parametrize("name", ["resnet56_a", "resnet56_b", "mobilenet_v2"])
@pytest.mark.parametrize("seed", [0, 1])
def test_costs_formula_predicts_macs_after_random_pruning(name: str, seed: int) -> None:
    factory, shape = CASES[name]
    model = fresh(factory)
    x = torch.zeros(shape)
    manifest = build_manifest(model, x)
    plan, removal = make_plan(manifest, seeded_random(seed))
    apply_plan(model, plan, x)
    removed = {gid: len(r) for gid, r in removal.items()}
    assert macs_after(manifest, removed) == pytest.approx(macs_of(model, x), rel=0.01)
    assert sum(p.numel() for p in model.parameters()) == params_after(manifest, removed)


def test_bn_statistics_follow_the_kept_channels() -> None:
    model = fresh(models.vgg16_bn)
    x = torch.randn(2, 3, 32, 32)
    manifest = build_manifest(model, x)
    mean, mean4 = (model.state_dict()[f"features.{i}.running_mean"].clone() for i in (1, 4))
    plan, removal = make_plan(manifest, seeded_random(3, 0.2, 0.5))
    apply_plan(model, plan, x)
    # features.0 (the stem) is not pruned: its BN keeps all statistics
    assert torch.equal(model.state_dict()["features.1.running_mean"], mean)
    g3 = next(g for g in manifest.groups if g.producers == ["features.3"])
    keep = [c for c in range(g3.channels) if c not in set(removal[g3.id])]
    assert torch.equal(model.state_dict()["features.4.running_mean"], mean4[keep])


def test_an_empty_plan_changes_nothing() -> None:
    model = fresh(models.digit_cnn)
    x = torch.randn(2, 1, 28, 28)
    manifest = build_manifest(model, x)
    plan, _ = make_plan(manifest, lambda c: [])
    before, out = state(model), model(x)
    apply_plan(model, plan, x)
    assert same_state(before, state(model))
    assert torch.equal(model(x), out)


def test_plan_as_dict_and_as_path(tmp_path: Path) -> None:
    x = torch.randn(1, 1, 28, 28)
    reference = fresh(models.digit_cnn)
    plan, _ = make_plan(build_manifest(reference, x), first_quarter)
    apply_plan(reference, plan, x)
    path = tmp_path / "plan.json"
    path.write_text(plan.to_json())
    for form in (plan.model_dump(mode="json"), path, str(path)):
        model = fresh(models.digit_cnn)
        apply_plan(model, form, x)
        assert same_state(state(model), state(reference))
    with pytest.raises(PlanError, match="cannot read the plan file"):
        apply_plan(fresh(models.digit_cnn), tmp_path / "missing.json", x)


def test_training_mode_is_kept_and_stats_are_not_updated() -> None:
    model = fresh(models.digit_cnn).train()
    x = torch.randn(4, 1, 28, 28)
    plan, _ = make_plan(build_manifest(model, x), first_quarter)
    apply_plan(model, plan, x)
    assert model.training and all(m.training for m in model.modules())


def test_mbv2_bn_stats_untouched_by_the_checks() -> None:
    model = fresh(models.mobilenet_v2).train()
    x = torch.randn(2, 3, 64, 64)
    manifest = build_manifest(model, x)
    plan, _ = make_plan(manifest, lambda c: [])
    before = state(model)
    apply_plan(model, plan, x)
    assert same_state(before, state(model)), "tracing and the final forward run in eval mode"


# --------------------------------------------------------------------------- refusals


def assert_refused(
    model: nn.Module,
    plan: PruningPlan | dict[str, Any] | Path,
    x: torch.Tensor,
    error: type[Exception] = PlanMismatchError,
    match: str = "",
    **kwargs: str,
) -> None:
    before = state(model)
    with pytest.raises(error, match=match):
        apply_plan(model, plan, x, **kwargs)
    assert same_state(before, state(model)), "no weight may change before the plan is refused"


def test_plan_for_resnet56_on_vgg16_is_refused() -> None:
    x = torch.zeros(1, 3, 32, 32)
    plan, _ = make_plan(build_manifest(fresh(models.resnet56), x), first_quarter)
    assert_refused(fresh(models.vgg16_bn), plan, x, match="another model")


def test_option_b_plan_on_option_a_model_is_refused() -> None:
    x = torch.zeros(1, 3, 32, 32)
    plan, _ = make_plan(build_manifest(fresh(lambda: models.resnet56("B")), x), first_quarter)
    assert_refused(fresh(lambda: models.resnet56("A")), plan, x, match="shortcut")


def test_plan_for_another_head_is_refused_by_the_untouched_shapes() -> None:
    x = torch.zeros(1, 3, 32, 32)
    plan, _ = make_plan(build_manifest(fresh(models.vgg16_bn), x), first_quarter)
    other = fresh(lambda: models.vgg16_bn(num_classes=100))
    assert_refused(other, plan, x, match=r"classifier\.2\.weight.*made for another model")


def test_checkpoint_digest_must_match() -> None:
    x = torch.zeros(1, 1, 28, 28)
    manifest = build_manifest(fresh(models.digit_cnn), x)
    plan, _ = make_plan(manifest, first_quarter, digest="ab" * 32)
    assert_refused(
        fresh(models.digit_cnn), plan, x, match="made for checkpoint", checkpoint_sha256="cd" * 32
    )
    unsigned, _ = make_plan(manifest, first_quarter)
    assert_refused(
        fresh(models.digit_cnn), unsigned, x, match="no checkpoint", checkpoint_sha256="cd" * 32
    )
    apply_plan(fresh(models.digit_cnn), plan, x, checkpoint_sha256="AB" * 32)


@pytest.mark.parametrize(
    ("remove", "what"),
    [([0, 64], "out of range"), ([3, 3], "sorted and unique"), ([5, 2], "sorted and unique")],
)
def test_bad_indices_are_refused_before_any_change(remove: list[int], what: str) -> None:
    x = torch.zeros(1, 1, 28, 28)
    manifest = build_manifest(fresh(models.digit_cnn), x)
    plan, _ = make_plan(manifest, first_quarter)
    data = plan.model_dump(mode="json")
    group = next(g for g in data["groups"] if g["name"] == "conv_layers.3")
    group["remove"], group["channels_after"] = remove, 64 - len(remove)
    assert_refused(fresh(models.digit_cnn), data, x, ValidationError, what)
    # a plan object that skipped validation is validated again
    forged = PruningPlan.model_construct(
        **{**dict(plan), "groups": [GroupPlan.model_construct(**group)]}
    )
    assert_refused(fresh(models.digit_cnn), forged, x, ValidationError, what)


def test_wrong_channel_count_and_unknown_layer_are_refused() -> None:
    x = torch.zeros(1, 1, 28, 28)
    plan, _ = make_plan(build_manifest(fresh(models.digit_cnn), x), first_quarter)
    data = plan.model_dump(mode="json")
    data["groups"][0]["producers"] = ["conv_layers.1"]
    assert_refused(fresh(models.digit_cnn), data, x, match="is a ReLU")
    data = plan.model_dump(mode="json")
    data["groups"][0]["producers"] = ["conv_layers.9"]
    assert_refused(fresh(models.digit_cnn), data, x, match="is not a module")
    wide = models.digit_cnn().eval()
    wide.conv_layers[3] = nn.Conv2d(32, 80, 3, padding=1)
    wide.conv_layers[6] = nn.Conv2d(80, 128, 3, padding=1)
    assert_refused(wide, plan, x, match="has 80 output channels")


def test_all_channels_of_a_group_cannot_go() -> None:
    x = torch.zeros(1, 1, 28, 28)
    plan, _ = make_plan(build_manifest(fresh(models.digit_cnn), x), lambda c: list(range(c)))
    assert_refused(fresh(models.digit_cnn), plan, x, match="must keep at least one")


def unknown_plan(model: nn.Module, remove: Mapping[str, list[int]]) -> PruningPlan:
    """A plan as the service makes it without a manifest: one group per layer, shapes of the
    analysed layers' weights only (each losing its own rows and nothing else)."""
    modules = dict(model.named_modules())
    groups, shapes = [], {}
    for i, (name, idx) in enumerate(remove.items()):
        weight = modules[name].weight
        assert isinstance(weight, torch.Tensor)
        groups.append(
            GroupPlan(
                id=i,
                name=name,
                producers=[name],
                channels_before=weight.shape[0],
                channels_after=weight.shape[0] - len(idx),
                remove=idx,
                redundancy=0.5,
                rationale="test",
            )
        )
        shapes[f"{name}.weight"] = [weight.shape[0] - len(idx), *weight.shape[1:]]
    return PruningPlan(
        checkpoint_sha256=None,
        method="l1",
        target=Target(params=0.1),
        constraints=Constraints(),
        seed=0,
        parameters={},
        coupling="unknown",
        groups=groups,
        expected_shapes=shapes,
        params_before=0,
        params_after=0,
        flops_before=None,
        flops_after=None,
        achieved={},
        rule="test",
    )


def test_coupling_unknown_plan_that_prunes_coupled_layers_separately_is_refused() -> None:
    model = fresh(lambda: models.resnet56("B"))
    x = torch.zeros(1, 3, 32, 32)
    plan = unknown_plan(model, {"layer2.0.conv2": [0, 1], "layer2.1.conv2": [2, 3]})
    assert_refused(model, plan, x, match="prunes them separately")
    # one layer of a coupled group alone: the other members would shrink against the plan
    plan = unknown_plan(model, {"layer2.0.conv2": [0, 1], "layer2.1.conv1": [2, 3]})
    data = plan.model_dump(mode="json")
    data["expected_shapes"]["layer2.1.conv2.weight"] = [32, 32, 3, 3]
    assert_refused(model, data, x, match="coupling does not match")


def test_coupling_unknown_plan_of_uncoupled_layers_applies() -> None:
    model = fresh(lambda: models.resnet56("B"))
    x = torch.zeros(1, 3, 32, 32)
    conv1, conv2 = model.get_submodule("layer2.1.conv1"), model.get_submodule("layer2.1.conv2")
    assert isinstance(conv1, nn.Conv2d) and isinstance(conv2, nn.Conv2d)
    original = conv1.weight.detach().clone()
    plan = unknown_plan(model, {"layer2.1.conv1": [0, 5], "layer3.2.conv1": [1]})
    apply_plan(model, plan, x)
    assert conv1.weight.shape == (30, 32, 3, 3)
    assert conv2.weight.shape == (32, 30, 3, 3)
    keep = [i for i in range(32) if i not in (0, 5)]
    assert torch.equal(conv1.weight.detach(), original[keep])


def test_unprunable_group_in_a_plan_is_refused() -> None:
    model = fresh(lambda: models.resnet56("A"))
    x = torch.zeros(1, 3, 32, 32)
    manifest = build_manifest(model, x)
    plan, _ = make_plan(manifest, first_quarter)
    residual = next(g for g in manifest.groups if not g.prunable and "conv1" in g.producers)
    data = plan.model_dump(mode="json")
    data["groups"].append(
        {
            "id": residual.id,
            "name": "conv1",
            "producers": ["conv1"],
            "channels_before": 16,
            "channels_after": 15,
            "remove": [0],
            "redundancy": None,
            "rationale": "test",
        }
    )
    assert_refused(model, data, x, match="zero-padding shortcut")


# --------------------------------------------------------------------------- real weights


@pytest.mark.real
def test_real_digit_cnn_pruned_keeps_its_weights(realdata: Path) -> None:
    model = models.digit_cnn().eval()
    model.load_state_dict(torch.load(realdata / "digit_cnn.pth", weights_only=True))
    x = torch.randn(8, 1, 28, 28)
    manifest = build_manifest(model, x)

    def every_fourth(channels: int) -> list[int]:
        return list(range(0, channels, 4))

    plan, removal = make_plan(manifest, every_fourth)
    original = state(model)
    apply_plan(model, plan, x)
    params = dict(model.named_parameters())
    for n, t in kept_original(manifest, removal, original).items():
        assert torch.equal(params[n].detach(), t), n
    assert sum(p.numel() for p in model.parameters()) == plan.params_after


@pytest.mark.real
def test_real_mobilenet_v2_applies_a_plan(realdata: Path) -> None:
    model = models.mobilenet_v2().eval()
    model.load_state_dict(torch.load(realdata / "mobilenet_v2_imagenet.pth", weights_only=True))
    x = torch.randn(1, 3, 96, 96)
    manifest = build_manifest(model, x)
    plan, removal = make_plan(manifest, seeded_random(7, 0.1, 0.4))
    original = state(model)
    apply_plan(model, plan, x)
    params = dict(model.named_parameters())
    for n, t in kept_original(manifest, removal, original).items():
        assert torch.equal(params[n].detach(), t), n
    assert plan.flops_after is not None
    assert macs_of(model, x) == pytest.approx(plan.flops_after, rel=0.01)


def test_a_plan_that_prunes_the_classifier_is_refused() -> None:
    """E.g. a plan made without a manifest from a file whose layer order hid the classifier."""
    from graphs.plan import Constraints, GroupPlan, PruningPlan, Target

    torch.manual_seed(0)
    model = models.digit_cnn().eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    w = model.fc_layers[2].weight
    plan = PruningPlan(
        checkpoint_sha256=None, method="l1", target=Target(params=0.1), constraints=Constraints(),
        seed=0, parameters={}, coupling="unknown",
        groups=[GroupPlan(id=0, name="fc_layers.2", producers=["fc_layers.2"], channels_before=10,
                          channels_after=8, remove=[0, 1], redundancy=None, rationale="test")],
        expected_shapes={"fc_layers.2.weight": [8, int(w.shape[1])]},
        params_before=0, params_after=0, flops_before=None, flops_after=None, achieved={},
        rule="test",
    )  # fmt: skip
    with pytest.raises(PlanMismatchError, match="output"):
        apply_plan(model, plan, torch.zeros(1, 1, 28, 28))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
