"""The manifest: what the weights alone cannot tell about a model (design §2).

Built next to the live model by :func:`clients.build_manifest` (torch-pruning's DependencyGraph
for coupling, forward hooks for output sizes and MACs), or from an ONNX graph by the service.
With a manifest, the analysis scores coupled layers as one group and the planner knows params
and MACs exactly; without one, every layer is analysed on its own and coupling is ``unknown``.

JSON form: ``Manifest.model_dump_json()``; ``schema_version`` is checked on load.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from graphs._frozen import Frozen

MANIFEST_VERSION = "1.0"
Unit = Literal["channels", "neurons", "heads", "hidden"]
"""What a group's index removes: output channels, FFN neurons, attention heads, or the hidden
units of a recurrent layer (LSTM/GRU/RNN, see :mod:`graphs.recurrent`)."""


class ParamAxis(Frozen):
    """One axis of one parameter tensor that loses an entry per removed channel."""

    param: str = Field(description="parameter name as in model.named_parameters()")
    axis: int = Field(ge=0)
    per_channel: int = Field(
        1,
        ge=1,
        description="entries per channel on this axis: a linear layer after a flatten of C×H×W "
        "has H·W input entries per channel, channel c owning entries [c·H·W, (c+1)·H·W)",
    )
    blocks: int = Field(
        1,
        ge=1,
        exclude_if=lambda v: v == 1,
        description="equal blocks the axis is made of, each holding every channel's entries: "
        "the gates of a recurrent layer (4 for LSTM, 3 for GRU) or the two directions of a "
        "bidirectional one as its consumer reads them; channel c owns entries "
        "[b·C·p + c·p, b·C·p + (c+1)·p) of every block b",
    )

    def indices(self, channels: int, idxs: list[int]) -> list[int]:
        """The entries of this axis that channels ``idxs`` (of ``channels``) own, sorted."""
        per, width = self.per_channel, channels * self.per_channel
        blocks = range(self.blocks)
        return sorted(b * width + i * per + t for b in blocks for i in idxs for t in range(per))


class ChannelGroup(Frozen):
    """Channels that must be removed together (same indices in every member)."""

    id: int = Field(ge=0)
    channels: int = Field(ge=1)
    producers: list[str] = Field(
        description="conv/linear layers whose OUTPUT channels these are (axis 0 of their weight)"
    )
    params: list[ParamAxis] = Field(
        description="every (parameter, axis) that shrinks when a channel of the group is removed"
    )
    prunable: bool = True
    reason: str | None = Field(None, description="why the group is not prunable")
    unit: Unit = Field(
        "channels",
        exclude_if=lambda v: v == "channels",
        description="what a channel is: output channels of the producers, or (``hidden``) the "
        "hidden units of the recurrent module named in ``producers``",
    )


class ModuleCost(Frozen):
    """MACs of one module for the example input (batch of 1) and how they scale.

    ``macs_after = macs · (kept_out / out if out_group else 1) · (kept_in / in if in_group else 1)``
    with kept counts taken from the groups named here.
    """

    name: str
    macs: int = Field(ge=0)
    out_group: int | None = None
    in_group: int | None = None


class Heads(Frozen):
    """How an attention block's projections split into heads (not in the weights: config.json or
    the live module). ``num_kv_heads < num_heads`` is grouped-query attention: each k/v head
    serves ``num_heads / num_kv_heads`` consecutive q heads."""

    num_heads: int = Field(ge=1)
    num_kv_heads: int = Field(ge=1)
    head_dim: int = Field(ge=1)

    @model_validator(mode="after")
    def _check(self) -> Heads:
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_kv_heads {self.num_kv_heads} does not divide num_heads {self.num_heads}"
            )
        return self

    @property
    def n_rep(self) -> int:
        """q heads per k/v head."""
        return self.num_heads // self.num_kv_heads


class AttentionBlock(Frozen):
    """An attention block's q/k/v/o linear layers and its heads."""

    q: str
    k: str
    v: str
    o: str
    heads: Heads


class ManifestLayer(Frozen):
    name: str
    kind: Literal["conv1d", "conv2d", "conv3d", "linear"]
    weight_shape: list[int]
    groups: int = Field(1, ge=1, description="the conv's groups (1 for linear)")
    out_spatial: int = Field(ge=1, description="output positions per channel for one sample")
    role: Literal["stem", "body", "classifier"] = "body"


class Manifest(Frozen):
    schema_version: str = MANIFEST_VERSION
    input_shapes: list[list[int]] = Field(description="shapes of the example inputs")
    params_total: int = Field(ge=0, description="sum of numel over model.parameters()")
    macs_total: int = Field(ge=0, description="MACs of one forward pass on the example inputs")
    param_shapes: dict[str, list[int]] = Field(description="every parameter's shape")
    layers: list[ManifestLayer]
    groups: list[ChannelGroup]
    costs: list[ModuleCost] = Field(description="modules whose MACs depend on channel counts")
    ignored: list[str] = Field(
        default_factory=list,
        description="layers whose output channels are never pruned (stem and classifier by "
        "default, plus the user's)",
    )
    attention: list[AttentionBlock] = Field(
        default_factory=list,
        exclude_if=lambda v: not v,
        description="attention blocks with their heads (lets plans remove whole heads)",
    )

    @model_validator(mode="after")
    def _check(self) -> Manifest:
        if self.schema_version.split(".")[0] != MANIFEST_VERSION.split(".")[0]:
            raise ValueError(
                f"manifest schema {self.schema_version} is not supported (expected "
                f"{MANIFEST_VERSION}); rebuild it with this version of prunegraph"
            )
        ids = [g.id for g in self.groups]
        if len(set(ids)) != len(ids):
            raise ValueError("manifest group ids must be unique")
        known = set(self.param_shapes)
        for g in self.groups:
            for pa in g.params:
                if pa.param not in known:
                    raise ValueError(f"group {g.id} names unknown parameter {pa.param!r}")
                if pa.axis >= len(self.param_shapes[pa.param]):
                    raise ValueError(f"group {g.id}: {pa.param} has no axis {pa.axis}")
                size = g.channels * pa.per_channel * pa.blocks
                if self.param_shapes[pa.param][pa.axis] != size:
                    raise ValueError(
                        f"group {g.id}: {pa.param} axis {pa.axis} has "
                        f"{self.param_shapes[pa.param][pa.axis]} entries, not "
                        f"{g.channels} × {pa.per_channel}"
                        + (f" × {pa.blocks} blocks" if pa.blocks > 1 else "")
                    )
        return self
