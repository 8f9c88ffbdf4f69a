"""In-memory layer containers: the numpy side of the data model (design §2).

A :class:`LayerWeights` is one prunable layer as read from a checkpoint; a :class:`LayerGroup` is
the unit that is scored and pruned (one layer, or coupled layers that must lose the same output
channels, such as a producer conv and the depthwise conv that follows it).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import numpy as np

LayerKind = Literal["conv1d", "conv2d", "conv3d", "linear"]
GroupsSource = Literal["default", "shape", "inferred", "manifest", "onnx"]
Coupling = Literal["none", "inferred", "manifest", "unknown"]

_KIND_NDIM: dict[str, int] = {"linear": 2, "conv1d": 3, "conv2d": 4, "conv3d": 5}


@dataclass(frozen=True, eq=False)
class LayerWeights:
    """One prunable layer.

    Attributes:
        name: state_dict prefix, e.g. ``layer1.0.conv1`` (the weight key without ``.weight``).
        kind: ``conv1d``, ``conv2d``, ``conv3d`` or ``linear``.
        weight: array of shape (out, in/groups, *kernel) for convs, (out, in) for linear.
        groups: the conv's ``groups`` (1 for linear).
        groups_source: where ``groups`` came from (``default`` when nothing said otherwise).
        bias: array of shape (out,) or None.
        bn: name of the BatchNorm paired with this layer's outputs, if any.
        extra_params: parameters of that BatchNorm (its weight and bias).
        producer: for a depthwise conv, the layer whose output channels it filters, when the
            reader knows it (else the grouping takes the nearest preceding layer of that width).
    """

    name: str
    kind: LayerKind
    weight: np.ndarray
    groups: int = 1
    groups_source: GroupsSource = "default"
    bias: np.ndarray | None = None
    bn: str | None = None
    extra_params: int = field(default=0)
    producer: str | None = None

    def __post_init__(self) -> None:
        if self.weight.ndim != _KIND_NDIM[self.kind]:
            raise ValueError(
                f"{self.name}: a {self.kind} weight must have {_KIND_NDIM[self.kind]} dimensions, "
                f"got shape {self.weight.shape}"
            )
        if self.groups < 1 or self.weight.shape[0] % self.groups:
            raise ValueError(f"{self.name}: groups={self.groups} does not divide {self.n_filters}")

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(int(s) for s in self.weight.shape)

    @property
    def n_filters(self) -> int:
        return int(self.weight.shape[0])

    @property
    def fan_in(self) -> int:
        return int(np.prod(self.weight.shape[1:]))

    @property
    def is_depthwise(self) -> bool:
        """True for a conv whose every output channel sees exactly one input channel."""
        return (
            self.kind != "linear"
            and self.groups > 1
            and self.weight.shape[1] == 1
            and self.groups == self.n_filters
        )

    @property
    def params(self) -> int:
        """Weights, bias and the paired BN's affine parameters (``extra_params``)."""
        n = int(self.weight.size) + self.extra_params
        return n + (int(self.bias.size) if self.bias is not None else 0)

    def filters(self) -> np.ndarray:
        """The filter matrix, shape (n_filters, fan_in), float64."""
        return np.asarray(self.weight, dtype=np.float64).reshape(self.n_filters, -1)


@dataclass(frozen=True, eq=False)
class LayerGroup:
    """Layers whose output channels are scored and pruned as one unit.

    ``members[0]`` is the producer; every member has the same number of output channels.
    """

    name: str
    members: tuple[LayerWeights, ...]
    coupling: Coupling = "none"
    group_id: int | None = None  # the manifest's channel group, when a manifest made it

    def __post_init__(self) -> None:
        if not self.members:
            raise ValueError(f"{self.name}: a group needs at least one layer")
        widths = {m.n_filters for m in self.members}
        if len(widths) != 1:
            raise ValueError(f"{self.name}: members have different widths {sorted(widths)}")

    @property
    def n_filters(self) -> int:
        return self.members[0].n_filters

    @property
    def params(self) -> int:
        return sum(m.params for m in self.members)

    def vectors(self) -> np.ndarray:
        """Filter vectors of the group, shape (n_filters, sum of members' fan_in), float64.

        A single layer gives its filter matrix unchanged. Coupled layers are concatenated after
        dividing each member by the RMS of its weights, so that every weight value counts the
        same: a member's say in a similarity is proportional to its fan-in. (A depthwise conv's
        9 values per channel therefore cannot outvote its producer's 96; depthwise kernels are
        often near-identical shapes, which would otherwise make every channel look alike.)
        """
        if len(self.members) == 1:
            return self.members[0].filters()
        parts = []
        for m in self.members:
            f = m.filters()
            rms = float(np.sqrt(np.mean(f * f)))
            parts.append(f / rms if rms > 0 else f)
        return np.concatenate(parts, axis=1)
