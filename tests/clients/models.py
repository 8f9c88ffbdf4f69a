"""Plain-torch reference models for the client tests (random init; no torchvision needed).

Names and layouts follow the usual public definitions so that real state dicts load strictly:
``mobilenet_v2`` matches torchvision's ImageNet MobileNetV2 and ``digit_cnn`` the
digit-recognizer-py MNIST CNN (input 1×28×28).
"""

from __future__ import annotations

from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

# --------------------------------------------------------------------------- CIFAR ResNet-56


class _PadShortcut(nn.Module):
    """Option A shortcut: subsample by 2, zero-pad channels: (N, C, H, W) → (N, 2C, H/2, W/2)."""

    def __init__(self, planes: int) -> None:
        super().__init__()
        self.pad = planes // 4

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad, self.pad))


class CifarBasicBlock(nn.Module):
    """conv3×3-BN-ReLU-conv3×3-BN plus shortcut, then ReLU."""

    def __init__(self, in_planes: int, planes: int, stride: int, option: Literal["A", "B"]) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut: nn.Module = nn.Sequential()
        if stride != 1 or in_planes != planes:
            if option == "A":
                self.shortcut = _PadShortcut(planes)
            else:
                self.shortcut = nn.Sequential(
                    nn.Conv2d(in_planes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes)
                )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """ResNet-(6n+2) for 3×32×32 inputs: stem conv, 3 stages of n blocks (16/32/64), linear."""

    def __init__(self, n: int, option: Literal["A", "B"], num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        in_planes = 16
        stages: list[nn.Sequential] = []
        for planes, stride in ((16, 1), (32, 2), (64, 2)):
            blocks = []
            for i in range(n):
                blocks.append(CifarBasicBlock(in_planes, planes, stride if i == 0 else 1, option))
                in_planes = planes
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.linear = nn.Linear(64, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.linear(out)


def resnet56(option: Literal["A", "B"] = "A") -> CifarResNet:
    """CIFAR ResNet-56 (9 blocks a stage); option A: zero-padded identity shortcuts, B: 1×1 conv."""
    return CifarResNet(9, option)


# --------------------------------------------------------------------------- ImageNet ResNet-50


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(
        self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None
    ) -> None:
        super().__init__()
        width = planes
        self.conv1 = nn.Conv2d(inplanes, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, planes * self.expansion, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class ResNet50(nn.Module):
    """torchvision's resnet50 layout: conv1/bn1/relu/maxpool, layer1..4, avgpool, fc."""

    def __init__(self, num_classes: int = 1000) -> None:
        super().__init__()
        self.inplanes = 64
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.layer1 = self._make_layer(64, 3, 1)
        self.layer2 = self._make_layer(128, 4, 2)
        self.layer3 = self._make_layer(256, 6, 2)
        self.layer4 = self._make_layer(512, 3, 2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(512 * Bottleneck.expansion, num_classes)

    def _make_layer(self, planes: int, blocks: int, stride: int) -> nn.Sequential:
        downsample = nn.Sequential(
            nn.Conv2d(self.inplanes, planes * Bottleneck.expansion, 1, stride, bias=False),
            nn.BatchNorm2d(planes * Bottleneck.expansion),
        )
        layers = [Bottleneck(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * Bottleneck.expansion
        layers += [Bottleneck(self.inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def resnet50() -> ResNet50:
    """ImageNet ResNet-50 with torchvision's module names."""
    return ResNet50()


# --------------------------------------------------------------------------- CIFAR VGG-16-BN

_VGG16 = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")


class VGG(nn.Module):
    """VGG-16-BN for 3×32×32: ``features`` (13 conv-BN-ReLU, 5 max-pools), then ``classifier``."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c = 3
        for v in _VGG16:
            if v == "M":
                layers.append(nn.MaxPool2d(2))
            else:
                assert isinstance(v, int)
                layers += [nn.Conv2d(c, v, 3, padding=1), nn.BatchNorm2d(v), nn.ReLU(inplace=True)]
                c = v
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(
            nn.Linear(512, 512), nn.ReLU(inplace=True), nn.Linear(512, num_classes)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.features(x), 1))


def vgg16_bn(num_classes: int = 10) -> VGG:
    """CIFAR VGG-16 with BatchNorm (13 convs)."""
    return VGG(num_classes)


# --------------------------------------------------------------------------- MobileNetV2


class ConvBNReLU6(nn.Sequential):
    """torchvision's Conv2dNormActivation: (conv, bn, ReLU6) as indices 0, 1, 2."""

    def __init__(
        self, cin: int, cout: int, kernel: int = 3, stride: int = 1, groups: int = 1
    ) -> None:
        super().__init__(
            nn.Conv2d(cin, cout, kernel, stride, (kernel - 1) // 2, groups=groups, bias=False),
            nn.BatchNorm2d(cout),
            nn.ReLU6(inplace=True),
        )


class InvertedResidual(nn.Module):
    """[1×1 expand] → 3×3 depthwise → 1×1 project (+ identity when shapes allow)."""

    def __init__(self, inp: int, oup: int, stride: int, expand_ratio: int) -> None:
        super().__init__()
        hidden = round(inp * expand_ratio)
        self.use_res_connect = stride == 1 and inp == oup
        layers: list[nn.Module] = []
        if expand_ratio != 1:
            layers.append(ConvBNReLU6(inp, hidden, kernel=1))
        layers += [
            ConvBNReLU6(hidden, hidden, stride=stride, groups=hidden),
            nn.Conv2d(hidden, oup, 1, bias=False),
            nn.BatchNorm2d(oup),
        ]
        self.conv = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.use_res_connect else self.conv(x)


class MobileNetV2(nn.Module):
    """torchvision's ImageNet MobileNetV2 (width 1.0): features.0..18, classifier.1."""

    def __init__(self, num_classes: int = 1000) -> None:
        super().__init__()
        settings = [
            (1, 16, 1, 1),
            (6, 24, 2, 2),
            (6, 32, 3, 2),
            (6, 64, 4, 2),
            (6, 96, 3, 1),
            (6, 160, 3, 2),
            (6, 320, 1, 1),
        ]
        cin = 32
        feats: list[nn.Module] = [ConvBNReLU6(3, cin, stride=2)]
        for t, c, n, s in settings:
            for i in range(n):
                feats.append(InvertedResidual(cin, c, s if i == 0 else 1, t))
                cin = c
        feats.append(ConvBNReLU6(cin, 1280, kernel=1))
        self.features = nn.Sequential(*feats)
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(1280, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.adaptive_avg_pool2d(self.features(x), (1, 1))
        return self.classifier(torch.flatten(x, 1))


def mobilenet_v2() -> MobileNetV2:
    """MobileNetV2 whose state_dict matches torchvision's ImageNet checkpoint key for key."""
    return MobileNetV2()


# --------------------------------------------------------------------------- MNIST CNN


class DigitCNN(nn.Module):
    """digit-recognizer-py's MNIST CNN: 1×28×28 → 3 × (conv3×3 pad 1, ReLU, pool 2) → 128×3×3."""

    def __init__(self) -> None:
        super().__init__()
        self.conv_layers = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(64, 128, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.fc_layers = nn.Sequential(nn.Linear(128 * 3 * 3, 256), nn.ReLU(), nn.Linear(256, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc_layers(torch.flatten(self.conv_layers(x), 1))


def digit_cnn() -> DigitCNN:
    """The MNIST CNN of ``digit_cnn.pth`` (28 → 14 → 7 → 3 after the pools: 128·3·3 = 1152)."""
    return DigitCNN()


class MtcnnRNet(nn.Module):
    """MTCNN's R-Net (facenet-pytorch layout): note the permute before the flatten."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 28, 3)
        self.prelu1 = nn.PReLU(28)
        self.pool1 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv2 = nn.Conv2d(28, 48, 3)
        self.prelu2 = nn.PReLU(48)
        self.pool2 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv3 = nn.Conv2d(48, 64, 2)
        self.prelu3 = nn.PReLU(64)
        self.dense4 = nn.Linear(576, 128)
        self.prelu4 = nn.PReLU(128)
        self.dense5_1 = nn.Linear(128, 2)
        self.dense5_2 = nn.Linear(128, 4)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.pool1(self.prelu1(self.conv1(x)))
        x = self.pool2(self.prelu2(self.conv2(x)))
        x = self.prelu3(self.conv3(x))
        x = x.permute(0, 3, 2, 1).contiguous()
        x = self.prelu4(self.dense4(x.view(x.shape[0], -1)))
        return self.dense5_1(x), self.dense5_2(x)


def mtcnn_rnet() -> MtcnnRNet:
    """Input 1×3×24×24; matches ~/.cache/prunegraph-realdata/mtcnn_rnet.pt."""
    return MtcnnRNet()


# --------------------------------------------------------------------------- conv subclasses


def _same_pad(
    x: torch.Tensor, kernel: tuple[int, ...], stride: tuple[int, ...], dilation: tuple[int, ...]
) -> list[int]:
    """TensorFlow "SAME" padding of the last ``len(kernel)`` dims, in F.pad's order (last first)."""
    pads: list[int] = []
    sizes = x.shape[-len(kernel) :]
    for size, k, s, d in reversed(list(zip(sizes, kernel, stride, dilation, strict=True))):
        total = max((-(-size // s) - 1) * s + (k - 1) * d + 1 - size, 0)
        pads += [total // 2, total - total // 2]
    return pads


class Conv2dSame(nn.Conv2d):
    """timm's ``Conv2dSame``: "SAME" padding computed from the input in ``forward`` (F.pad +
    F.conv2d), so the module's own ``padding`` is 0."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **{**kwargs, "padding": 0})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pads = _same_pad(x, self.kernel_size, self.stride, self.dilation)
        x = F.pad(x, pads)
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


class Conv2dStaticSame(nn.Conv2d):
    """EfficientNet-PyTorch's ``Conv2dStaticSamePadding``: a ``ZeroPad2d`` child sized for a
    fixed image size at construction, then F.conv2d."""

    def __init__(self, cin: int, cout: int, kernel: int, image_size: int, **kwargs: Any) -> None:
        super().__init__(cin, cout, kernel, **kwargs)
        probe = torch.empty(1, 1, image_size, image_size)
        self.static_padding = nn.ZeroPad2d(
            _same_pad(probe, self.kernel_size, self.stride, self.dilation)  # type: ignore[arg-type]
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.static_padding(x)
        return F.conv2d(
            x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups
        )


class StdConv2d(nn.Conv2d):
    """timm's ``StdConv2d`` (BiT): weight standardization per output filter in ``forward``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        w = F.batch_norm(
            w.reshape(1, self.out_channels, -1), None, None, training=True, momentum=0.0, eps=1e-6
        ).reshape_as(w)
        return F.conv2d(x, w, self.bias, self.stride, self.padding, self.dilation, self.groups)


class SameConv1d(nn.Conv1d):
    """A 1-d "SAME" conv (F.pad + F.conv1d in forward)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **{**kwargs, "padding": 0})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.pad(x, _same_pad(x, self.kernel_size, self.stride, self.dilation))
        return F.conv1d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


class SameConv3d(nn.Conv3d):
    """A 3-d "SAME" conv (F.pad + F.conv3d in forward)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **{**kwargs, "padding": 0})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.pad(x, _same_pad(x, self.kernel_size, self.stride, self.dilation))
        return F.conv3d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


class _SubclassBlock(nn.Module):
    """conv-BN-SiLU, with the conv built by ``make`` (a subclass or its plain twin)."""

    def __init__(self, conv: nn.Module, act: bool = True) -> None:
        super().__init__()
        self.conv = conv
        self.bn = nn.BatchNorm2d(conv.out_channels)  # type: ignore[arg-type]
        self.act = nn.SiLU() if act else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self.conv(x)))


class SubclassConvNet(nn.Module):
    """An EfficientNet/BiT-like net for 3×64×64 whose convs are nn.Conv2d subclasses with their own
    ``forward`` (``plain=False``) or, with ``plain=True``, its twin built of plain ``nn.Conv2d``
    with explicit padding: same weights' shapes, same output shapes, hence the same MACs.

    Stem (strided), MBConv-like blocks (weight-standardized 1×1 expand, depthwise 3×3 and strided
    depthwise 5×5, 1×1 project, residual), a grouped conv (groups=4), a dilated conv, a strided
    conv, a 1×1 head conv and a linear classifier.
    """

    def __init__(self, plain: bool = False, num_classes: int = 10) -> None:
        super().__init__()

        def same(cin: int, cout: int, k: int, s: int = 1, d: int = 1, g: int = 1) -> nn.Module:
            if plain:
                return nn.Conv2d(cin, cout, k, s, d * (k - 1) // 2, d, g, bias=False)
            return Conv2dSame(cin, cout, k, s, dilation=d, groups=g, bias=False)

        def static(cin: int, cout: int, k: int, size: int, s: int = 1, g: int = 1) -> nn.Module:
            if plain:
                return nn.Conv2d(cin, cout, k, s, (k - 1) // 2, groups=g, bias=False)
            return Conv2dStaticSame(cin, cout, k, size, stride=s, groups=g, bias=False)

        def std(cin: int, cout: int, k: int = 1, d: int = 1) -> nn.Module:
            cls = nn.Conv2d if plain else StdConv2d
            return cls(cin, cout, k, 1, d * (k - 1) // 2, d, bias=False)

        B = _SubclassBlock
        self.stem = B(same(3, 24, 3, s=2))  # 32×32
        self.b1 = nn.Sequential(B(std(24, 96)), B(same(96, 96, 3, g=96)), B(same(96, 24, 1), False))
        self.b2 = nn.Sequential(
            B(std(24, 96)), B(static(96, 96, 5, 32, s=2, g=96)), B(same(96, 40, 1), False)
        )  # 16×16
        self.b3 = nn.Sequential(B(std(40, 64)), B(same(64, 64, 3, g=4)), B(same(64, 40, 1), False))
        self.b4 = nn.Sequential(B(same(40, 80, 3, d=2)), B(std(80, 40, 3, d=1), False))
        self.b5 = nn.Sequential(B(same(40, 96, 3, s=2)), B(std(96, 96, 3)))  # 8×8
        self.head = B(static(96, 192, 1, 8))
        self.fc = nn.Linear(192, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = x + self.b1(x)
        x = self.b2(x)
        x = x + self.b3(x)
        x = x + self.b4(x)
        x = self.head(self.b5(x))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def subclass_convnet() -> SubclassConvNet:
    """Input 1×3×64×64; convs are Conv2dSame / Conv2dStaticSame / StdConv2d."""
    return SubclassConvNet(plain=False)


def plain_twin_convnet() -> SubclassConvNet:
    """:func:`subclass_convnet`'s twin of plain nn.Conv2d (same parameter names and shapes)."""
    return SubclassConvNet(plain=True)
