"""Layers from tensors (service.ingest.layers): skipped layers and why, conv groups, BN pairing,
depthwise producers."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file as save_torch
from torch import nn

from graphs.errors import (
    InvalidInputError,
    NoPrunableLayersError,
)
from service.ingest.checkpoint import ParsedCheckpoint, read_checkpoint
from service.ingest.layers import DEAD_REASON, NAN_REASON, ONE_FILTER_REASON
from tests.service.ingest.helpers import by_name, message, save, skip_reasons, state_dict

Tensors = dict[str, torch.Tensor]


# ---------------------------------------------------------------------------- skipped layers


def test_embedding_and_attention_are_skipped_with_reasons_lstm_read(tmp_path: Path) -> None:
    model = nn.ModuleDict(
        {
            "embed": nn.Embedding(10, 6),
            "lstm": nn.LSTM(6, 5, bidirectional=True),
            "attn": nn.MultiheadAttention(8, 2),
            "head": nn.Linear(8, 3),
        }
    )
    sd = model.state_dict()
    parsed = read_checkpoint(save(tmp_path, sd))
    reasons = skip_reasons(parsed)
    assert "recurrent/attention" in reasons["attn.in_proj_weight"]
    assert "embedding" in reasons["embed"]
    # the attention's output projection is an ordinary linear layer; the LSTM's matrices are
    # layers named by their parameters (grouped into hidden units, tests/graphs/test_recurrent.py)
    lstm = [f"lstm.weight_{m}_l0{s}" for s in ("", "_reverse") for m in ("ih", "hh")]
    assert set(by_name(parsed)) == {"attn.out_proj", "head", *lstm}
    weights = {k for k, v in sd.items() if v.ndim >= 2}
    listed = {layer.name + ".weight" for layer in parsed.layers} | set(reasons) | {"embed.weight"}
    listed |= set(lstm)
    assert weights <= listed


def test_a_projection_inside_an_embed_module_is_a_layer(tmp_path: Path) -> None:
    sd = {
        "patch_embed.proj.weight": torch.randn(16, 3, 4, 4),
        "tok_embed.weight": torch.randn(9, 4),
    }
    parsed = read_checkpoint(save(tmp_path, sd))
    assert [layer.name for layer in parsed.layers] == ["patch_embed.proj"]
    assert "embedding" in skip_reasons(parsed)["tok_embed"]


def test_other_matrices_are_listed_and_vectors_are_not(tmp_path: Path) -> None:
    sd = {
        "pos_embed": torch.randn(1, 5, 8),
        "conv.weight_g": torch.randn(6, 1, 1, 1),
        "conv.weight_v": torch.randn(6, 3, 3, 3),
        "fc.weight": torch.randn(4, 8),
        "prelu.weight": torch.randn(4),
        "ln.weight": torch.randn(4),
        "ids": torch.arange(10).reshape(2, 5),
    }
    parsed = read_checkpoint(save(tmp_path, sd))
    reasons = skip_reasons(parsed)
    assert set(reasons) == {"pos_embed", "conv"}
    assert "weight norm" in reasons["conv"] and "not analysed" in reasons["pos_embed"]
    assert [layer.name for layer in parsed.layers] == ["fc"]


def test_integer_weights_are_skipped(tmp_path: Path) -> None:
    sd = {
        "q.weight": torch.randint(-8, 8, (4, 3), dtype=torch.int8),
        "fc.weight": torch.randn(3, 4),
    }
    parsed = read_checkpoint(save(tmp_path, sd))
    assert "int8" in skip_reasons(parsed)["q"]


def test_nan_layer_is_skipped_and_others_kept(tmp_path: Path) -> None:
    sd = state_dict()
    sd["5.weight"][3, 2, 0, 0] = float("nan")
    sd["7.weight"][0, 0] = float("inf")
    parsed = read_checkpoint(save(tmp_path, sd))
    assert [layer.name for layer in parsed.layers] == ["0", "3"]
    assert skip_reasons(parsed) == {"5": NAN_REASON, "7": NAN_REASON}


def test_single_filter_layer_is_skipped(tmp_path: Path) -> None:
    sd = {"a.weight": torch.randn(4, 3, 3, 3), "score.weight": torch.randn(1, 4, 1, 1)}
    parsed = read_checkpoint(save(tmp_path, sd))
    assert skip_reasons(parsed) == {"score": ONE_FILTER_REASON}
    assert [layer.name for layer in parsed.layers] == ["a"]


def test_dead_layer_is_skipped_but_some_zero_filters_are_kept(tmp_path: Path) -> None:
    sd = state_dict()
    sd["5.weight"].zero_()
    sd["7.weight"][:2] = 0
    parsed = read_checkpoint(save(tmp_path, sd))
    assert skip_reasons(parsed) == {"5": DEAD_REASON}
    assert "7" in by_name(parsed)


def test_only_vectors_means_no_prunable_layers(tmp_path: Path) -> None:
    bn = nn.BatchNorm2d(8).state_dict()
    path = save(tmp_path, bn)
    with pytest.raises(NoPrunableLayersError) as ei:
        read_checkpoint(path)
    assert str(path) in message(ei)


def test_all_layers_skipped_means_no_prunable_layers_with_reasons(tmp_path: Path) -> None:
    path = save(tmp_path, {"fc.weight": torch.full((3, 4), float("nan"))})
    with pytest.raises(NoPrunableLayersError) as ei:
        read_checkpoint(path)
    assert str(path) in message(ei) and "NaN" in message(ei)


# ------------------------------------------------------------------------- groups and BN pairing


def test_first_single_channel_conv_is_not_depthwise(tmp_path: Path) -> None:
    sd = {"c0.weight": torch.randn(32, 1, 3, 3), "c1.weight": torch.randn(64, 32, 3, 3)}
    parsed = read_checkpoint(save(tmp_path, sd))
    assert [(x.groups, x.groups_source) for x in parsed.layers] == [(1, "default")] * 2


def test_single_channel_conv_after_a_different_width_is_not_depthwise(tmp_path: Path) -> None:
    sd = {"a.weight": torch.randn(16, 3, 3, 3), "b.weight": torch.randn(32, 1, 3, 3)}
    parsed = read_checkpoint(save(tmp_path, sd))
    assert (parsed.layers[1].groups, parsed.layers[1].groups_source) == (1, "default")


def test_grouped_convs_other_than_depthwise_are_not_inferred(tmp_path: Path) -> None:
    """(C, C/g, k, k) after C outputs may be ResNeXt's grouped conv or HRNet's fuse conv."""
    sd = {
        "stem.weight": torch.randn(64, 3, 7, 7),
        "b.conv1.weight": torch.randn(128, 64, 1, 1),
        "b.conv2.weight": torch.randn(128, 4, 3, 3),  # ResNeXt 32x4d: needs a manifest
        "b.conv3.weight": torch.randn(256, 128, 1, 1),
        "b.downsample.0.weight": torch.randn(256, 64, 1, 1),  # input is the block's input
        "c.conv.weight": torch.randn(256, 128, 3, 3),
        "d.dw.weight": torch.randn(256, 1, 3, 3),
    }
    layers = by_name(read_checkpoint(save(tmp_path, sd)))
    for name in ["stem", "b.conv1", "b.conv2", "b.conv3", "b.downsample.0", "c.conv"]:
        assert (layers[name].groups, layers[name].groups_source) == (1, "default"), name
    assert (layers["d.dw"].groups, layers["d.dw"].groups_source) == (256, "inferred")
    manifest = read_checkpoint(save(tmp_path, sd), groups={"b.conv2": 32})
    assert by_name(manifest)["b.conv2"].groups == 32


def test_manifest_groups_win(tmp_path: Path) -> None:
    path = save(tmp_path, state_dict())
    parsed = read_checkpoint(path, groups={"3": 1, "0": 1, "unknown": 4})
    dw = by_name(parsed)["3"]
    assert (dw.groups, dw.groups_source) == (1, "manifest")
    assert parsed.layers[0].groups_source == "manifest"


def test_manifest_groups_may_be_numpy_integers(tmp_path: Path) -> None:
    parsed = read_checkpoint(save(tmp_path, state_dict()), groups={"3": np.int64(8)})  # type: ignore[dict-item]
    assert (parsed.layers[1].groups, parsed.layers[1].groups_source) == (8, "manifest")


@pytest.mark.parametrize("bad", [{"3": 3}, {"3": 0}, {"7": 2}, {"3": 2.0}])
def test_invalid_manifest_groups_are_rejected(tmp_path: Path, bad: dict[str, int]) -> None:
    with pytest.raises(InvalidInputError, match="groups"):
        read_checkpoint(save(tmp_path, state_dict()), groups=bad)


def test_bn_pairs_with_the_latest_free_layer_of_its_width(tmp_path: Path) -> None:
    bn = nn.BatchNorm2d(8).state_dict()
    sd: Tensors = {"first.weight": torch.randn(8, 3, 3, 3)}
    sd |= {f"n_first.{k}": v for k, v in bn.items()}
    sd["second.weight"] = torch.randn(8, 8, 3, 3)
    sd["third.weight"] = torch.randn(4, 8, 1, 1)
    sd |= {f"n_x.{k}": v for k, v in bn.items()}  # after third: its width is second's
    sd |= {f"n_y.{k}": v for k, v in nn.BatchNorm2d(8, affine=False).state_dict().items()}
    layers = by_name(read_checkpoint(save(tmp_path, sd)))
    assert layers["first"].bn == "n_first" and layers["first"].extra_params == 16
    assert layers["second"].bn == "n_x" and layers["third"].bn is None


def test_safetensors_alphabetical_order_pairs_bn_by_name(tmp_path: Path) -> None:
    torch.manual_seed(1)
    block = nn.ModuleDict(
        {
            "conv1": nn.Conv2d(8, 8, 3, bias=False),
            "bn1": nn.BatchNorm2d(8),
            "conv2": nn.Conv2d(8, 8, 3, bias=False),
            "bn2": nn.BatchNorm2d(8),
        }
    )
    sd = {f"layer1.0.{k}": v.clone() for k, v in block.state_dict().items()}
    sd |= {f"layer10.0.{k}": v.clone() for k, v in block.state_dict().items()}
    path = tmp_path / "m.safetensors"
    save_torch({k: v.contiguous() for k, v in sd.items()}, str(path))
    parsed = read_checkpoint(path)
    assert [x.name for x in parsed.layers] == [
        "layer1.0.conv1",
        "layer1.0.conv2",
        "layer10.0.conv1",
        "layer10.0.conv2",
    ]
    assert [x.bn for x in parsed.layers] == [
        "layer1.0.bn1",
        "layer1.0.bn2",
        "layer10.0.bn1",
        "layer10.0.bn2",
    ]


# -------------------------------------------------------------------- depthwise producers


def test_depthwise_producer_is_the_layer_used_for_inference_even_if_skipped(
    tmp_path: Path,
) -> None:
    sd = {
        "stem.weight": torch.randn(8, 3, 3, 3),
        "a.weight": torch.full((8, 8, 3, 3), float("nan")),
        "dw.weight": torch.randn(8, 1, 3, 3),
        "dw2.weight": torch.randn(8, 1, 3, 3),
        "pw.weight": torch.randn(16, 8, 1, 1),
    }
    parsed = read_checkpoint(save(tmp_path, sd))
    layers = by_name(parsed)
    assert skip_reasons(parsed)["a"] == NAN_REASON
    assert (layers["dw"].groups, layers["dw"].groups_source) == (8, "inferred")
    assert layers["dw"].producer == "a"
    assert layers["dw2"].producer == "a"  # a depthwise conv after a depthwise conv
    assert layers["stem"].producer is None and layers["pw"].producer is None
    manifest = by_name(read_checkpoint(save(tmp_path, sd), groups={"dw": 8, "dw2": 1}))
    assert manifest["dw"].producer == "a" and manifest["dw2"].producer is None


class _InvertedResidual(nn.Module):
    """timm's attribute names and registration order (conv_pw, bn1, conv_dw, bn2, se, ...)."""

    def __init__(self, cin: int, mid: int, cout: int) -> None:
        super().__init__()
        self.conv_pw = nn.Conv2d(cin, mid, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(mid)
        self.conv_dw = nn.Conv2d(mid, mid, 3, groups=mid, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        self.se = nn.ModuleDict(
            {"conv_reduce": nn.Conv2d(mid, 8, 1), "conv_expand": nn.Conv2d(8, mid, 1)}
        )
        self.conv_pwl = nn.Conv2d(mid, cout, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(cout)


class _DepthwiseSeparable(nn.Module):
    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.conv_dw = nn.Conv2d(cin, cin, 3, groups=cin, bias=False)
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv_pw = nn.Conv2d(cin, cout, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)


def _timm_like() -> nn.Module:
    torch.manual_seed(2)
    net = nn.Module()
    net.conv_stem = nn.Conv2d(3, 16, 3, bias=False)
    net.bn1 = nn.BatchNorm2d(16)
    net.blocks = nn.Sequential(
        nn.Sequential(_DepthwiseSeparable(16, 24)),
        nn.Sequential(_InvertedResidual(24, 72, 32), _InvertedResidual(32, 96, 32)),
        nn.Sequential(_DepthwiseSeparable(32, 40)),
    )
    net.conv_head = nn.Conv2d(40, 64, 1, bias=False)
    net.bn2 = nn.BatchNorm2d(64)
    net.classifier = nn.Linear(64, 10)
    return net


def _summary(parsed: ParsedCheckpoint) -> dict[str, tuple[object, ...]]:
    return {
        x.name: (x.groups, x.groups_source, x.bn, x.extra_params, x.producer) for x in parsed.layers
    }


def test_safetensors_without_order_finds_the_same_producers_and_bns(tmp_path: Path) -> None:
    sd = {k: v.contiguous() for k, v in _timm_like().state_dict().items()}
    pt = read_checkpoint(save(tmp_path, sd))
    st_path = tmp_path / "timm.safetensors"
    save_torch(sd, str(st_path))
    st = read_checkpoint(st_path)
    assert _summary(st) == _summary(pt)
    layers = by_name(st)
    assert layers["blocks.0.0.conv_dw"].producer == "conv_stem"
    assert layers["blocks.1.0.conv_dw"].producer == "blocks.1.0.conv_pw"
    assert layers["blocks.2.0.conv_dw"].producer == "blocks.1.1.conv_pwl"
    assert layers["blocks.1.0.conv_pw"].bn == "blocks.1.0.bn1"
    assert layers["blocks.1.0.conv_dw"].bn == "blocks.1.0.bn2"
    assert layers["blocks.1.0.conv_pwl"].bn == "blocks.1.0.bn3"
    assert layers["conv_stem"].bn == "bn1" and layers["conv_head"].bn == "bn2"
    depthwise = [x.name for x in st.layers if x.is_depthwise]
    assert depthwise == [n for n in layers if n.endswith("conv_dw")]


def test_safetensors_unclear_producer_is_depthwise_without_producer(tmp_path: Path) -> None:
    """Two width-8 siblings could feed blk.conv_dw: it stays depthwise, its producer unknown."""
    sd = {
        "blk.conv_a.weight": torch.randn(8, 4, 1, 1),
        "blk.conv_b.weight": torch.randn(8, 4, 1, 1),
        "blk.conv_dw.weight": torch.randn(8, 1, 3, 3),
        "gray.0.weight": torch.randn(8, 1, 3, 3),  # first conv of its Sequential: not depthwise
    }
    path = tmp_path / "amb.safetensors"
    save_torch(sd, str(path))
    layers = by_name(read_checkpoint(path))
    dw = layers["blk.conv_dw"]
    assert (dw.groups, dw.groups_source, dw.producer) == (8, "inferred", None)
    assert (layers["gray.0"].groups, layers["gray.0"].groups_source) == (1, "default")


@pytest.mark.real
def test_real_mobilenet_v2_as_safetensors_has_the_same_producers(
    realdata: Path, tmp_path: Path
) -> None:
    pth = read_checkpoint(realdata / "mobilenet_v2_imagenet.pth")
    sd = torch.load(realdata / "mobilenet_v2_imagenet.pth", weights_only=True, map_location="cpu")
    path = tmp_path / "mobilenet_v2.safetensors"
    save_torch({k: v.contiguous() for k, v in sd.items()}, str(path))
    st = read_checkpoint(path)
    producers = {x.name: x.producer for x in pth.layers if x.is_depthwise}
    assert len(producers) == 17
    assert producers["features.1.conv.0.0"] == "features.0.0"
    rest = {n: p for n, p in producers.items() if n != "features.1.conv.0.0"}
    assert all(p == f"{n.removesuffix('1.0')}0.0" for n, p in rest.items())
    assert {x.name: x.producer for x in st.layers if x.is_depthwise} == producers
    assert _summary(st) == _summary(pth)
