"""clients.build_manifest on reference models: coupling groups, roles, shapes and MACs."""

from __future__ import annotations

import functools
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch_pruning as tp
from torch import nn

from clients import build_manifest, manifest_from_factory
from clients.tracing import ROOT_TYPES
from graphs.manifest import ChannelGroup, Manifest
from tests.clients import models

ModelCase = tuple[Callable[[], nn.Module], tuple[int, ...]]
CASES: dict[str, ModelCase] = {
    "resnet56_a": (lambda: models.resnet56("A"), (1, 3, 32, 32)),
    "resnet56_b": (lambda: models.resnet56("B"), (1, 3, 32, 32)),
    "resnet50": (models.resnet50, (1, 3, 64, 64)),
    "vgg16_bn": (models.vgg16_bn, (1, 3, 32, 32)),
    "mobilenet_v2": (models.mobilenet_v2, (1, 3, 96, 96)),
    "digit_cnn": (models.digit_cnn, (1, 1, 28, 28)),
}


@functools.cache
def built(name: str) -> tuple[nn.Module, torch.Tensor, Manifest]:
    """The (unmodified) model, its example input and its default manifest, built once."""
    factory, shape = CASES[name]
    torch.manual_seed(0)
    model = factory().eval()
    x = torch.zeros(shape)
    return model, x, build_manifest(model, x)


def group_of(manifest: Manifest, producer: str) -> ChannelGroup:
    return next(g for g in manifest.groups if producer in g.producers)


def axes(group: ChannelGroup) -> set[tuple[str, int, int]]:
    return {(pa.param, pa.axis, pa.per_channel) for pa in group.params}


# --------------------------------------------------------------------------- every model


@pytest.mark.parametrize("name", sorted(CASES))
def test_every_conv_and_linear_is_the_producer_of_exactly_one_group(name: str) -> None:
    model, _, manifest = built(name)
    layers = [n for n, m in model.named_modules() if isinstance(m, ROOT_TYPES)]
    counts = Counter(p for g in manifest.groups for p in g.producers)
    assert sorted(counts) == sorted(layers)
    assert set(counts.values()) == {1}
    assert [g.id for g in manifest.groups] == list(range(len(manifest.groups)))
    # ids follow the first producer's position in named_modules()
    order = {n: i for i, (n, _) in enumerate(model.named_modules())}
    firsts = [order[g.producers[0]] for g in manifest.groups]
    assert firsts == sorted(firsts)
    assert [layer.name for layer in manifest.layers] == layers


@pytest.mark.parametrize("name", sorted(CASES))
def test_param_axes_are_disjoint_and_cover_every_producer_weight(name: str) -> None:
    model, _, manifest = built(name)
    seen = Counter((pa.param, pa.axis) for g in manifest.groups for pa in g.params)
    assert set(seen.values()) == {1}, "a (parameter, axis) belongs to one group"
    for g in manifest.groups:
        if g.prunable:
            for p in g.producers:
                assert (f"{p}.weight", 0, 1) in axes(g)
    params = dict(model.named_parameters())
    for g in manifest.groups:
        for pa in g.params:  # the Manifest validator checks this too; check it independently
            assert params[pa.param].shape[pa.axis] == g.channels * pa.per_channel


@pytest.mark.parametrize("name", sorted(CASES))
def test_groups_are_torch_prunings_groups(name: str) -> None:
    model, x, manifest = built(name)
    dg = tp.DependencyGraph().build_dependency(model, example_inputs=x, verbose=False)
    names = {m: n for n, m in model.named_modules()}
    theirs = set()
    for group in dg.get_all_groups(root_module_types=[nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear]):
        theirs.add(
            frozenset(
                names[it.dep.target.module]
                for it in group
                if isinstance(it.dep.target.module, ROOT_TYPES)
                and dg.is_out_channel_pruning_fn(it.dep.handler)
            )
        )
    assert {frozenset(g.producers) for g in manifest.groups} == theirs


@pytest.mark.parametrize("name", sorted(CASES))
def test_costs_reproduce_torch_prunings_macs(name: str) -> None:
    model, x, manifest = built(name)
    total, _, layer_flops, _ = tp.utils.count_ops_and_params(model, x, layer_wise=True)
    assert manifest.macs_total == round(total)
    per_name: Counter[str] = Counter()
    for c in manifest.costs:
        per_name[c.name] += c.macs
    modules = dict(model.named_modules())
    for cname, macs in per_name.items():
        assert macs == pytest.approx(layer_flops[modules[cname]] / x.shape[0], abs=1)
    # everything that a prunable group scales has a cost naming that group
    modules = dict(model.named_modules())
    outs = {(c.name, c.out_group) for c in manifest.costs}
    ins = {(c.name, c.in_group) for c in manifest.costs}
    for g in manifest.groups:
        if not g.prunable:
            continue
        for pa in g.params:
            owner = pa.param.rsplit(".", 1)[0]
            if pa.axis == 0:
                assert (owner, g.id) in outs, (owner, g.id)
            elif isinstance(modules[owner], ROOT_TYPES):
                assert (owner, g.id) in ins, (owner, g.id)
    assert sum(per_name.values()) <= manifest.macs_total
    assert manifest.params_total == sum(p.numel() for p in model.parameters())
    assert manifest.param_shapes == {n: list(p.shape) for n, p in model.named_parameters()}


@pytest.mark.parametrize("name", sorted(CASES))
def test_stem_and_classifier_are_ignored(name: str) -> None:
    _, _, manifest = built(name)
    roles = {layer.name: layer.role for layer in manifest.layers}
    stems = [n for n, r in roles.items() if r == "stem"]
    classifiers = [n for n, r in roles.items() if r == "classifier"]
    assert len(stems) == 1 and len(classifiers) == 1
    assert stems[0] == manifest.layers[0].name
    assert classifiers[0] == manifest.layers[-1].name
    assert manifest.ignored == [stems[0], classifiers[0]]
    assert group_of(manifest, stems[0]).prunable is False
    assert "stem" in (group_of(manifest, stems[0]).reason or "")
    assert group_of(manifest, classifiers[0]).reason == "classifier"


@pytest.mark.parametrize("name", sorted(CASES))
def test_json_round_trip_and_byte_identical_rebuild(name: str) -> None:
    model, x, manifest = built(name)
    text = manifest.model_dump_json()
    assert Manifest.model_validate_json(text) == manifest
    assert build_manifest(model, x).model_dump_json() == text


# --------------------------------------------------------------------------- per architecture


def test_resnet56_b_stages_are_groups_of_conv2s_and_the_projection() -> None:
    _, _, m = built("resnet56_b")
    for stage in (2, 3):
        g = group_of(m, f"layer{stage}.0.conv2")
        expected = [f"layer{stage}.{i}.conv2" for i in range(9)]
        assert sorted(g.producers) == sorted([*expected, f"layer{stage}.0.shortcut.0"])
        assert g.prunable and g.channels == 16 * 2 ** (stage - 1)
        assert ("linear.weight", 1, 1) in axes(g) if stage == 3 else True
        assert (f"layer{stage}.4.conv1.weight", 1, 1) in axes(g)
        assert (f"layer{stage}.0.shortcut.1.weight", 0, 1) in axes(g)
    stage1 = group_of(m, "layer1.0.conv2")
    assert sorted(stage1.producers) == sorted(["conv1", *[f"layer1.{i}.conv2" for i in range(9)]])
    assert not stage1.prunable and stage1.reason == "stem"
    inner = group_of(m, "layer2.3.conv1")
    assert inner.producers == ["layer2.3.conv1"] and inner.prunable
    assert axes(inner) == {
        ("layer2.3.conv1.weight", 0, 1),
        ("layer2.3.bn1.weight", 0, 1),
        ("layer2.3.bn1.bias", 0, 1),
        ("layer2.3.conv2.weight", 1, 1),
    }
    assert len(m.groups) == 31  # 27 inner + 3 stages + classifier


def test_resnet56_a_padding_shortcuts_make_the_residual_stream_unprunable() -> None:
    _, _, m = built("resnet56_a")
    residual = group_of(m, "layer3.8.conv2")
    assert not residual.prunable
    assert "zero-padding" in (residual.reason or "")
    assert {f"layer{s}.{i}.conv2" for s in (1, 2, 3) for i in range(9)} <= set(residual.producers)
    inner = [g for g in m.groups if g.prunable]
    assert len(inner) == 27
    assert all(len(g.producers) == 1 and g.producers[0].endswith(".conv1") for g in inner)


def test_resnet50_bottleneck_stages() -> None:
    _, _, m = built("resnet50")
    for stage, blocks, width in ((1, 3, 256), (2, 4, 512), (3, 6, 1024), (4, 3, 2048)):
        g = group_of(m, f"layer{stage}.0.conv3")
        assert sorted(g.producers) == sorted(
            [f"layer{stage}.0.downsample.0", *[f"layer{stage}.{i}.conv3" for i in range(blocks)]]
        )
        assert g.channels == width and g.prunable
    assert group_of(m, "conv1").producers == ["conv1"]
    assert ("fc.weight", 1, 1) in axes(group_of(m, "layer4.0.conv3"))
    shared_relu = [c for c in m.costs if c.name == "layer1.0.relu"]
    assert len(shared_relu) == 3, "one ReLU module on three channel groups: one cost each"


def test_mobilenet_v2_depthwise_convs_join_their_expansion() -> None:
    model, _, m = built("mobilenet_v2")
    for i in range(2, 18):
        g = group_of(m, f"features.{i}.conv.0.0")
        assert g.producers == [f"features.{i}.conv.0.0", f"features.{i}.conv.1.0"]
        assert g.prunable
        assert (f"features.{i}.conv.1.0.weight", 0, 1) in axes(g)
        assert (f"features.{i}.conv.1.1.weight", 0, 1) in axes(g)
        assert (f"features.{i}.conv.2.weight", 1, 1) in axes(g)
    # features.1 has no expansion: its depthwise conv filters the stem's channels
    assert group_of(m, "features.1.conv.0.0").producers == ["features.0.0", "features.1.conv.0.0"]
    assert sorted(group_of(m, "features.4.conv.2").producers) == [
        "features.4.conv.2",
        "features.5.conv.2",
        "features.6.conv.2",
    ]
    depthwise = {n for n, mod in model.named_modules() if getattr(mod, "groups", 1) > 1}
    assert len(depthwise) == 17
    for c in m.costs:
        if c.name in depthwise:
            assert c.in_group is None and c.out_group is not None
    for layer in m.layers:
        assert layer.groups == (layer.weight_shape[0] if layer.name in depthwise else 1)


def test_digit_cnn_flatten_gives_nine_entries_per_channel() -> None:
    _, _, m = built("digit_cnn")
    g = group_of(m, "conv_layers.6")
    assert ("fc_layers.0.weight", 1, 9) in axes(g)
    cost = next(c for c in m.costs if c.name == "fc_layers.0")
    assert (cost.in_group, cost.out_group) == (g.id, group_of(m, "fc_layers.0").id)
    spatial = {layer.name: layer.out_spatial for layer in m.layers}
    assert spatial == {
        "conv_layers.0": 28 * 28,
        "conv_layers.3": 14 * 14,
        "conv_layers.6": 7 * 7,
        "fc_layers.0": 1,
        "fc_layers.2": 1,
    }


def test_vgg_each_conv_is_its_own_group() -> None:
    _, _, m = built("vgg16_bn")
    convs = [g for g in m.groups if g.producers[0].startswith("features.")]
    assert len(convs) == 13 and all(len(g.producers) == 1 for g in convs)
    assert [layer.out_spatial for layer in m.layers][:3] == [1024, 1024, 256]


# --------------------------------------------------------------------------- options


def test_user_ignored_layers_and_stem_option() -> None:
    model, x, _ = built("resnet56_b")
    m = build_manifest(model, x, ignored_layers=["layer2"], ignore_stem=False)
    assert group_of(m, "layer1.0.conv2").prunable  # the stem is no longer ignored
    assert "conv1" not in m.ignored and "linear" in m.ignored
    for g in m.groups:
        if any(p.startswith("layer2.") for p in g.producers):
            assert not g.prunable and "ignored by the user" in (g.reason or "")
    assert "layer2.4.conv1" in m.ignored
    assert group_of(m, "layer3.4.conv1").prunable
    with pytest.raises(ValueError, match="not a module"):
        build_manifest(model, x, ignored_layers=["layer9"])


def test_building_changes_no_weight_and_keeps_training_mode() -> None:
    torch.manual_seed(1)
    model = models.resnet56("B").train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    build_manifest(model, torch.randn(2, 3, 32, 32))
    assert model.training and all(m.training for m in model.modules())
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_batch_of_two_gives_per_sample_macs() -> None:
    model, x, m1 = built("digit_cnn")
    m2 = build_manifest(model, torch.zeros(2, *x.shape[1:]))
    assert m2.input_shapes == [[2, 1, 28, 28]]
    assert m2.groups == m1.groups and m2.layers == m1.layers
    assert abs(m2.macs_total - m1.macs_total) <= 200  # tp counts a linear's bias once a batch
    assert sum(c.macs for c in m2.costs) == pytest.approx(sum(c.macs for c in m1.costs), abs=200)


def test_manifest_from_factory() -> None:
    m = manifest_from_factory("tests.clients.models:digit_cnn", (1, 1, 28, 28))
    assert m == built("digit_cnn")[2]
    with pytest.raises(ValueError, match=r"package\.module:factory"):
        manifest_from_factory("tests.clients.models", (1, 1, 28, 28))


# --------------------------------------------------------------------------- real checkpoints


@pytest.mark.real
def test_real_state_dicts_load_strictly(realdata: Path) -> None:
    for factory, file in (
        (models.mobilenet_v2, "mobilenet_v2_imagenet.pth"),
        (models.digit_cnn, "digit_cnn.pth"),
    ):
        model = factory()
        state = torch.load(realdata / file, weights_only=True, map_location="cpu")
        model.load_state_dict(state, strict=True)
        for k, v in model.state_dict().items():
            assert torch.equal(v, state[k])


@pytest.mark.real
def test_real_mobilenet_v2_manifest_matches_the_random_one(realdata: Path) -> None:
    model = models.mobilenet_v2().eval()
    state = torch.load(realdata / "mobilenet_v2_imagenet.pth", weights_only=True)
    model.load_state_dict(state)
    m = build_manifest(model, torch.zeros(1, 3, 96, 96))
    assert m == built("mobilenet_v2")[2]  # weights do not change the structure
    assert set(m.param_shapes) == {
        k for k in state if not k.endswith(("running_mean", "running_var", "num_batches_tracked"))
    }


@pytest.mark.real
def test_channels_interleaved_by_a_permute_are_not_prunable(realdata: Path) -> None:
    """R-Net permutes before flattening: conv3's channels reach dense4 interleaved, so removing
    them as contiguous blocks would silently change the model; the group is refused."""
    from tests.clients.models import mtcnn_rnet

    model = mtcnn_rnet()
    model.load_state_dict(torch.load(realdata / "mtcnn_rnet.pt", weights_only=True))
    man = build_manifest(model.eval(), torch.zeros(1, 3, 24, 24))
    by = {g.producers[0]: g for g in man.groups}
    assert not by["conv3"].prunable and "interleaved" in (by["conv3"].reason or "")
    assert by["conv2"].prunable and by["dense4"].prunable
    assert not by["dense5_1"].prunable and not by["dense5_2"].prunable  # both heads: outputs
