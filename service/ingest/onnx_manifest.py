"""A :class:`~graphs.manifest.Manifest` from an ONNX graph alone (design §2, §5).

Layers and their names come from :mod:`service.ingest.onnx_file` (Conv/Gemm/MatMul nodes with
constant weights; ``LayerWeights.name``), so the manifest's producers match ``read_checkpoint``'s
layers. Channels flow from a producer (Conv: activation axis 1; Gemm/MatMul: the last axis) through
channel-preserving nodes to consumers. A depthwise Conv joins the group of its input and carries
it on; ``Add``/``Sum``/``Mul``/... merge the groups of their inputs (residuals, squeeze-excite,
swish); Flatten/Reshape/Squeeze/Unsqueeze that keep (batch, channels) leading turn into
``per_channel`` entries (a Gemm after flattening C×H×W has ``per_channel = H·W``). Groups feeding
a Concat, a grouped (non-depthwise) Conv or any other node (Transpose, Split, Gather, attention
MatMuls, ...) are marked ``prunable=False`` with the reason. A tensor shared by two groups (an
exporter's deduplicated constants) couples them. Stem: the first layer in topological order;
classifier: the producers of a group that reaches a graph output.

ParamAxis names are the ONNX tensors (initializers or Constant outputs, Identity aliases resolved)
with THEIR axes: a Gemm with ``transB=0`` or a MatMul keeps its (in, out) weight, so its output
channels are axis 1. ``params_total`` and ``param_shapes`` cover every floating tensor except
BatchNormalization running mean/var (buffers, as in torch and in the reader's ``n_params``);
mean/var are therefore in no ParamAxis list, which keeps the cost model equal to
``params_total``. ``macs_total`` counts Conv, Gemm and MatMul layers (``ModuleCost`` per layer:
weight size × output positions) and GRU/LSTM/RNN nodes ((W + R) size × input positions; fixed),
per sample of the first input's batch dim (:meth:`.onnx_shapes.GraphInput.batch_axis`). Shapes:
:mod:`.onnx_shapes` (unknown ones: :func:`.checkpoint.derived_manifest` goes on without a
manifest). ``ManifestLayer.weight_shape`` is the reader's layout ((out, in) for linear layers).
The reader reads the graph once more to name layers: a model is decoded twice per call.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from graphs.errors import CheckpointError, InvalidInputError, corrupt
from graphs.manifest import ChannelGroup, Manifest, ManifestLayer, ModuleCost, ParamAxis
from service.ingest.detect import detect_format
from service.ingest.onnx_file import ONNX_FLOAT_TYPES, UNARY_OPS, OnnxReader
from service.ingest.onnx_recurrent import RECURRENT_OPS, hidden_groups
from service.ingest.onnx_shapes import (
    ShapesUnknownError,
    describe_inputs,
    graph_inputs,
    infer_shapes,
)

__all__ = ["manifest_from_onnx"]

_PASS = UNARY_OPS | {
    "MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool", "LpPool", "Softmax",
    "LogSoftmax",
}  # fmt: skip
_MERGE = frozenset({"Add", "Sub", "Mul", "Div", "Max", "Min", "Sum", "Mean", "Pow"})
_RESHAPE = frozenset({"Flatten", "Reshape", "Squeeze", "Unsqueeze"})
_SHAPE_ONLY = frozenset({"Shape", "Size"})
Kind = Literal["conv1d", "conv2d", "conv3d", "linear"]
_KINDS: dict[int, Kind] = {3: "conv1d", 4: "conv2d", 5: "conv3d"}


@dataclass(frozen=True)
class _Flow:
    group: int  # raw group id (union-find element)
    axis: int  # channel axis of the activation
    rank: int
    per: int  # entries per channel on that axis


@dataclass
class _Group:
    channels: int
    producers: list[tuple[int, str]] = field(default_factory=list)
    params: list[ParamAxis] = field(default_factory=list)
    reasons: dict[str, None] = field(default_factory=dict)


def manifest_from_onnx(
    path: str | os.PathLike[str],
    *,
    ignore_stem: bool = True,
    ignore_classifier: bool = True,
    input_shapes: Sequence[Sequence[int]] | None = None,
    name: str | None = None,
) -> Manifest:
    """Coupling groups, shapes, params and MACs of an ONNX model, from its graph.

    Args:
        path: the ``.onnx`` file (single file, no external data).
        ignore_stem: keep the first layer in topological order whole (``ignored``, its group
            ``prunable=False``, reason ``stem``).
        ignore_classifier: the same for the layers whose channels reach a graph output.
        input_shapes: one concrete shape per graph input (makes symbolic dims concrete);
            default: a symbolic batch dim is 1, other symbolic dims stay unknown.
        name: how the model is called in errors (default: ``path``).

    Raises:
        ShapesUnknownError: a layer's output size cannot be known (a :class:`CheckpointError`).
        CheckpointError: not an ONNX model, unreadable or malformed graph.
        InvalidInputError: ``input_shapes`` does not fit the model's inputs.
    """
    import onnx

    p, display = Path(path), name or os.fspath(path)
    try:
        if detect_format(p, display, p.stat().st_size) != "onnx":
            raise CheckpointError(f"{display} is not an ONNX model.")
        model = onnx.load(os.fspath(p), load_external_data=False)
    except OSError as e:
        raise CheckpointError(f"{display} cannot be read: {e.strerror or e}.") from e
    except CheckpointError:
        raise
    except Exception as e:  # protobuf DecodeError and friends
        raise corrupt(display, f"it cannot be parsed as ONNX ({e})") from e
    try:
        return _Builder(model, display, input_shapes).build(ignore_stem, ignore_classifier)
    except InvalidInputError:  # the given input shapes do not fit (a ValueError too)
        raise
    except (TypeError, ValueError, AttributeError, KeyError, IndexError, OverflowError) as e:
        raise corrupt(display, f"its ONNX graph is malformed ({type(e).__name__}: {e})") from e


class _Builder:
    def __init__(
        self, model: Any, display: str, input_shapes: Sequence[Sequence[int]] | None
    ) -> None:
        self.display, self.graph = display, model.graph
        self.reader = OnnxReader(model.graph, display)
        self.reader.read()  # names layers exactly as read_checkpoint does
        self.shapes, inputs = infer_shapes(model, display, input_shapes)
        declared = graph_inputs(model)
        self.inputs = describe_inputs(declared)
        self.input_shapes = [[d or 1 for d in s] for s in inputs]
        axis = declared[0].batch_axis if declared else 0
        first = self.input_shapes[0] if self.input_shapes else []
        self.batch = max(first[axis], 1) if len(first) > axis else 1  # MACs are per sample
        self.fixed_macs = 0  # recurrent nodes: MACs no group scales
        r = self.reader  # recurrent nodes' W/R/B are listed by their PyTorch names
        self.param_shapes = {
            n: [int(d) for d in t.dims]
            for n, t in r.protos.items()
            if t.data_type in ONNX_FLOAT_TYPES and n not in r.buffers and n not in r.converted
        } | {n: list(a.shape) for n, a in r.recurrent.items()}
        self.flows: dict[str, _Flow] = {}  # activation -> where its channels come from
        self.parent: list[int] = []
        self.groups: list[_Group] = []
        self.layers: list[ManifestLayer] = []
        self.costs: list[tuple[str, int, int, int | None]] = []
        self.group_of: dict[str, int] = {}  # layer -> raw group

    # --- union-find over groups ----------------------------------------------------------------
    def _new(self, channels: int, pos: int, name: str) -> int:
        self.parent.append(len(self.groups))
        self.groups.append(_Group(channels, [(pos, name)]))
        return len(self.groups) - 1

    def _find(self, g: int) -> int:
        while self.parent[g] != g:
            self.parent[g] = self.parent[self.parent[g]]
            g = self.parent[g]
        return g

    def _union(self, a: int, b: int) -> bool:
        a, b = self._find(a), self._find(b)
        ga, gb = self.groups[a], self.groups[b]
        if a != b and ga.channels == gb.channels:
            self.parent[b] = a
            ga.producers += gb.producers
            ga.params += gb.params
            ga.reasons.update(gb.reasons)
        return ga.channels == gb.channels

    def _block(self, g: int, reason: str) -> None:
        self.groups[self._find(g)].reasons[reason] = None

    def _param(self, flow: _Flow, name: str, axis: int) -> bool:
        """Add (tensor, axis) to the flow's group if its size fits; False (and blocked) if not."""
        name = self.reader.resolve(name)
        shape = self.param_shapes.get(name)
        g = self.groups[self._find(flow.group)]
        if shape is None or not 0 <= axis < len(shape) or shape[axis] != g.channels * flow.per:
            self._block(flow.group, f"{name} does not have {g.channels} channels on axis {axis}")
            return False
        g.params.append(ParamAxis(param=name, axis=axis, per_channel=flow.per))
        return True

    def _const(self, flow: _Flow, name: str) -> None:
        """A constant operand broadcast against the flow: scalars are free, per-channel shrinks."""
        dims = [int(d) for d in self.reader.protos[self.reader.resolve(name)].dims]
        if math.prod(dims) > 1:
            axis = flow.axis - flow.rank + len(dims)
            if 0 <= axis and math.prod(dims) == dims[axis]:
                self._param(flow, name, axis)
            else:
                self._block(flow.group, f"a constant of shape {dims} is applied to its channels")

    # --- the pass over the graph ---------------------------------------------------------------
    def build(self, ignore_stem: bool, ignore_classifier: bool) -> Manifest:
        for pos, node in enumerate(self.graph.node):
            layer = self.reader.layer_of.get(node.output[0]) if node.output else None
            op = node.op_type
            inputs = [i for i in node.input if i and i in self.flows]
            if layer is not None:
                self._layer(pos, node, layer)
            elif op in _PASS and node.input and node.input[0] in self.flows:
                self._pass(node)
            elif op in _MERGE and inputs:
                self._merge(node)
            elif op in _RESHAPE and node.input and node.input[0] in self.flows:
                self._reshape(node)
            elif op in RECURRENT_OPS:
                self.fixed_macs += self._recurrent_macs(node)
                for i in inputs:
                    self._block(self.flows[i].group, f"feeds {op}")
            elif op not in _SHAPE_ONLY:
                why = "feeds a Concat (not supported yet)" if op == "Concat" else f"feeds {op}"
                for i in inputs:
                    self._block(self.flows[i].group, why)
        stem = self.layers[0].name if self.layers else None
        heads = {
            self._find(self.flows[o.name].group) for o in self.graph.output if o.name in self.flows
        }
        classifier = {n for h in heads for _, n in self.groups[h].producers}
        ignored: list[str] = []
        for i, lay in enumerate(self.layers):
            role = (
                "classifier" if lay.name in classifier else "stem" if lay.name == stem else "body"
            )
            self.layers[i] = lay.model_copy(update={"role": role})
            if (role == "stem" and ignore_stem) or (role == "classifier" and ignore_classifier):
                ignored.append(lay.name)
                self._block(self.group_of[lay.name], role)
        return self._manifest(ignored)

    def _layer(self, pos: int, node: Any, name: str) -> None:
        r = self.reader
        weight, transposed = r.weight_of[name]  # a MatMul's transposed weight is (out, in)
        w = [int(d) for d in r.protos[weight].dims]
        out = self._shape(node.output[0], node)
        conv, groups = node.op_type == "Conv", r.groups.get(name, 1)
        kind: Kind = _KINDS[len(w)] if conv else "linear"
        trans = int(r.attr(node, "transB", 0)) if node.op_type == "Gemm" else int(transposed)
        out_axis, in_axis = (0, 1) if conv else (1 - trans, trans)
        positions = out[0] * math.prod(out[2:]) if conv else math.prod(out[:-1])
        spatial = max(round(positions / self.batch), 1)  # per sample
        flow_in = self.flows.get(node.input[0])
        if name in r.depthwise and flow_in and flow_in.axis == 1 and flow_in.per == 1:
            g, in_group = flow_in.group, None  # same channels in and out: one group
            self.groups[self._find(g)].producers.append((pos, name))
        else:
            g, in_group = self._new(w[out_axis], pos, name), None
            if groups > 1:
                self._block(g, "grouped convolution, or depthwise on channels of no group")
            if flow_in:
                layout = (1, 1) if conv else (flow_in.rank - 1, flow_in.per)
                ok = (flow_in.axis, flow_in.per) == layout and groups == 1
                if ok and not r.attr(node, "transA", 0) and self._param(flow_in, weight, in_axis):
                    in_group = flow_in.group
                else:
                    self._block(flow_in.group, f"feeds {node.op_type} {name!r} in another layout")
        self.group_of[name] = g
        flow = _Flow(g, 1 if conv else len(out) - 1, len(out), 1)
        self._param(flow, weight, out_axis)
        if len(node.input) > 2 and node.input[2] and r.is_const(node.input[2]):
            if conv:
                self._param(flow, node.input[2], 0)
            else:
                self._const(flow, node.input[2])  # Gemm's C broadcasts
        self.flows[node.output[0]] = flow
        self.layers.append(
            ManifestLayer(
                name=name,
                kind=kind,
                weight_shape=list(r.tensors[f"{name}.weight"].shape),
                groups=groups,
                out_spatial=spatial,
            )
        )
        self.costs.append((name, round(math.prod(w) * positions / self.batch), g, in_group))

    def _shape(self, tensor: str, node: Any, which: str = "output") -> list[int]:
        """The tensor's concrete shape; ShapesUnknownError when a dim is unknown."""
        shape, what = self.shapes.get(tensor), f"{node.op_type} node {node.name or tensor!r}"
        if shape is None or None in shape:
            raise ShapesUnknownError(
                self.display,
                f"ONNX shape inference cannot tell the {which} shape of {what} (the model's "
                f"inputs: {self.inputs})",
            )
        if any(d is not None and d < 1 for d in shape):
            raise InvalidInputError(
                f"{self.display}: the {which} of {what} would be empty ({shape}) with input "
                f"shape(s) {self.input_shapes}",
                hint=f"The model's inputs are {self.inputs}: give a shape large enough for "
                "its strides and pooling.",
            )
        return [int(d) for d in shape if d is not None]

    def _recurrent_macs(self, node: Any) -> int:
        """MACs of a GRU/LSTM/RNN node's weights W and R for one sample: their sizes × the
        (sequence, batch) positions of its input X."""
        r, x = self.reader, self._shape(node.input[0], node, "input")
        sizes = [
            [int(d) for d in r.protos[r.resolve(i)].dims] if r.is_const(i) else self._shape(i, node)
            for i in node.input[1:3]
        ]
        return round(sum(math.prod(s) for s in sizes) * math.prod(x[:-1]) / self.batch)

    def _pass(self, node: Any) -> None:
        flow = self.flows[node.input[0]]
        before, after = self.shapes.get(node.input[0]), self.shapes.get(node.output[0])
        if before and after and before[flow.axis] != after[flow.axis]:
            self._block(flow.group, f"feeds {node.op_type}, which changes the channel count")
            return
        if node.op_type in ("BatchNormalization", "InstanceNormalization"):
            if flow.axis != 1 or flow.per != 1:
                self._block(flow.group, f"feeds {node.op_type} on another axis")
                return
            for name in node.input[1:3]:
                self._param(flow, name, 0)
        elif node.op_type == "PRelu" and node.input[1:] and self.reader.is_const(node.input[1]):
            self._const(flow, node.input[1])
        self.flows[node.output[0]] = flow

    def _merge(self, node: Any) -> None:
        flows = [self.flows[i] for i in node.input if i in self.flows]
        head = flows[0]
        for name in node.input:
            if name and name not in self.flows and self.reader.is_const(name):
                self._const(head, name)
            elif name and name not in self.flows:
                self._block(
                    head.group, f"{node.op_type} with a tensor whose channels are untracked"
                )
        for f in flows[1:]:
            if (f.axis - f.rank, f.per) != (head.axis - head.rank, head.per) or not self._union(
                head.group, f.group
            ):
                for g in (head.group, f.group):
                    self._block(g, f"{node.op_type} of tensors with different channel layouts")
                return
        rank = max(f.rank for f in flows)
        self.flows[node.output[0]] = _Flow(head.group, head.axis - head.rank + rank, rank, head.per)

    def _reshape(self, node: Any) -> None:
        flow = self.flows[node.input[0]]
        src, dst = self.shapes.get(node.input[0]), self.shapes.get(node.output[0])
        if src and dst and flow.axis == 1 and len(dst) >= 2 and None not in src + dst:
            a, b = [d or 1 for d in src], [d or 1 for d in dst]
            size, rest = flow.per * math.prod(a[2:]), math.prod(b[2:])
            if a[0] == b[0] and size % rest == 0:
                self.flows[node.output[0]] = _Flow(flow.group, 1, len(dst), size // rest)
                return
        self._block(flow.group, f"feeds {node.op_type}, which moves the channel axis")

    def _manifest(self, ignored: list[str]) -> Manifest:
        owner: dict[tuple[str, int], int] = {}  # a tensor shared by two groups couples them
        for g, group in enumerate(self.groups):
            for pa in group.params if self.parent[g] == g else []:
                other = owner.setdefault((pa.param, pa.axis), g)
                if other != g and not self._union(other, g):
                    for x in (other, g):
                        self._block(x, f"shares {pa.param} with a group of another width")
        roots = sorted(
            {self._find(g) for g in range(len(self.groups))},
            key=lambda r: min(self.groups[r].producers),
        )
        ids = {r: i for i, r in enumerate(roots)}

        def gid(g: int | None) -> int | None:
            return None if g is None else ids[self._find(g)]

        groups = [
            ChannelGroup(
                id=ids[r],
                channels=g.channels,
                producers=[n for _, n in sorted(g.producers)],
                params=list({(p.param, p.axis): p for p in g.params}.values()),
                prunable=not g.reasons,
                reason="; ".join(g.reasons) or None,
            )
            for r in roots
            for g in [self.groups[r]]
        ]
        costs = [
            ModuleCost(name=n, macs=m, out_group=gid(o), in_group=gid(i))
            for n, m, o, i in self.costs
        ]
        groups += hidden_groups(self.reader.recurrent, len(groups))
        return Manifest(
            input_shapes=self.input_shapes,
            params_total=sum(math.prod(s) for s in self.param_shapes.values()),
            macs_total=sum(c.macs for c in costs) + self.fixed_macs,
            param_shapes=self.param_shapes,
            layers=self.layers,
            groups=groups,
            costs=costs,
            ignored=ignored,
        )
