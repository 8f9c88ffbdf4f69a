"""ONNX models: weights from initializers and ``Constant`` nodes, coupling from the graph (§5).

``onnx.load`` runs without external data. Conv weights keep their (out, in/groups, *k) layout and
their ``group`` attribute; Gemm/MatMul weights are oriented to (out, in). A depthwise Conv's
producer is read from the graph: the Conv/Gemm/MatMul layer whose output reaches the depthwise
conv's input through channel-preserving nodes only (BatchNormalization, activations, Pad, other
depthwise convs, and elementwise Add/Mul/... whose data inputs all come from that same layer).

A MatMul whose right operand is a ``Transpose`` of a 2-D constant (torch's ``nn.Linear`` on 3-D
input exported without constant folding) is a layer with that constant as its (out, in) weight.
Every other weight that Conv/Gemm/MatMul/GRU/... nodes use is reported as skipped with the
reason: a float constant by what it feeds, through the constant-only nodes (Slice, Concat,
Unsqueeze, DequantizeLinear, ...) that prepare it (an unfolded GRU's weights are recurrent
weights); a layer node whose weight is computed from constants of no float type (quantized
weights) by the node's name.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from graphs.errors import CheckpointError, corrupt
from graphs.report import SkippedLayer
from service.ingest.detect import (
    EMBEDDING_REASON,
    RECURRENT_REASON,
    RawCheckpoint,
    as_float,
    layer_name,
    not_supported,
)
from service.ingest.onnx_recurrent import recurrent_weights

# ONNX TensorProto.DataType codes of floating types: FLOAT, FLOAT16, DOUBLE, BFLOAT16, FLOAT8*.
ONNX_FLOAT_TYPES = frozenset({1, 10, 11, 16, 17, 18, 19, 20})
_ONNX_RECURRENT_OPS = frozenset({"LSTM", "GRU", "RNN", "Attention", "MultiHeadAttention"})
# Nodes whose first input's channels pass through unchanged, one to one.
_UNARY_NAMES = (
    "BatchNormalization InstanceNormalization Relu Clip LeakyRelu PRelu Sigmoid HardSigmoid "
    "HardSwish Elu Selu Celu Gelu Mish Softplus Softsign Tanh Identity Dropout Cast Pad Neg Abs "
    "ThresholdedRelu"
)
UNARY_OPS = frozenset(_UNARY_NAMES.split())
# Elementwise nodes: followed only when all their non-constant inputs lead to one layer.
_ELEMENTWISE = frozenset({"Add", "Sub", "Mul", "Div", "Max", "Min", "Sum", "Mean"})
_MAX_TRACE = 256
_WEIGHT_OPS = frozenset({"Conv", "ConvTranspose", "Gemm", "MatMul"})


def read_onnx(path: Path, display: str) -> RawCheckpoint:
    """Weights of Conv/Gemm/MatMul nodes as ``{layer}.weight`` arrays of shape (out, in, ...).

    Layer names: the weight tensor's name without ``.weight`` when it ends so, else the node name.
    Gemm weights follow ``transB`` (and ``alpha``); a MatMul's constant right operand (in, out) is
    transposed. BatchNormalization parameters become ``{bn}.weight/.bias/.running_mean/...``.
    """
    import onnx

    try:
        model = onnx.load(os.fspath(path), load_external_data=False)
    except Exception as e:  # protobuf DecodeError and friends
        raise corrupt(display, f"it starts like an ONNX model but cannot be parsed ({e})") from e
    if not model.HasField("graph"):
        with open(path, "rb") as f:
            raise not_supported(display, f.read(32))
    try:
        return OnnxReader(model.graph, display).read()
    except (TypeError, ValueError, AttributeError, KeyError, IndexError, OverflowError) as e:
        # protobuf hands back bytes for names that are not UTF-8, tensors for numeric attributes...
        raise corrupt(display, f"its ONNX graph is malformed ({type(e).__name__}: {e})") from e
    except (RecursionError, MemoryError) as e:
        raise corrupt(display, f"its ONNX graph cannot be read ({type(e).__name__})") from e


class OnnxReader:
    def __init__(self, graph: Any, display: str) -> None:
        import onnx

        self.onnx = onnx
        self.graph = graph
        self.display = display
        self.protos: dict[str, Any] = {i.name: i for i in graph.initializer}
        self.alias: dict[str, str] = {}
        self.derived: dict[str, Any] = {}  # tensor computed from constants only -> its node
        self.consumers: dict[str, list[Any]] = {}
        self.makers: dict[str, Any] = {}  # tensor name -> the node that outputs it
        for node in graph.node:
            for name in node.output:
                self.makers[name] = node
            for name in node.input:
                self.consumers.setdefault(name, []).append(node)
            if node.op_type == "Constant" and node.output:
                for a in node.attribute:
                    if a.name == "value" and a.type == onnx.AttributeProto.TENSOR:
                        self.protos[node.output[0]] = a.t
            elif node.op_type == "Identity" and node.input and self.is_const(node.input[0]):
                self.alias[node.output[0]] = self.resolve(node.input[0])
            elif node.input and all(self._fixed(i) for i in node.input):
                self.derived.update((o, node) for o in node.output)  # computed from constants
        self.tensors: dict[str, np.ndarray] = {}
        self.groups: dict[str, int] = {}
        self.used: set[str] = set()
        self.buffers: set[str] = set()
        self.names: set[str] = set()
        self.layer_of: dict[str, str] = {}  # a layer node's first output -> layer name
        self.traced: dict[str, str | None] = {}
        self.depthwise: dict[str, Any] = {}  # layer name -> its Conv node
        self.arrays: dict[str, np.ndarray] = {}  # decoded constants
        self.aliases_of: dict[str, list[str]] = {}  # constant -> Identity outputs naming it
        for a, target in self.alias.items():
            self.aliases_of.setdefault(target, []).append(a)
        self.weight_of: dict[str, tuple[str, bool]] = {}  # layer -> (constant, transposed)
        self.converted: set[str] = set()  # recurrent W/R/B now in tensors under torch's names

    def read(self) -> RawCheckpoint:
        for node in self.graph.node:
            handler = getattr(self, f"_on_{node.op_type.lower()}", None)
            if handler is not None:
                handler(node)
        self.recurrent = recurrent_weights(self)  # PyTorch-named, see service.ingest.onnx_recurrent
        self.tensors.update(self.recurrent)
        skipped = self._leftovers()
        n_params = sum(
            math.prod(p.dims)
            for n, p in self.protos.items()
            if p.data_type in ONNX_FLOAT_TYPES and n not in self.buffers
        )
        producers = {name: self._trace(node.input[0], 0) for name, node in self.depthwise.items()}
        return RawCheckpoint(
            "onnx",
            self.tensors,
            len(self.protos),
            n_params,
            groups=self.groups,
            skipped=skipped,
            producers=producers,
        )

    def _trace(self, tensor: str, steps: int) -> str | None:
        """The layer whose output channels reach ``tensor`` unchanged, or None if unclear."""
        if tensor not in self.traced:
            self.traced[tensor] = None  # also what a cycle in a malformed graph yields
            self.traced[tensor] = self._trace_node(self.makers.get(tensor), steps)
        return self.traced[tensor]

    def _trace_node(self, node: Any, steps: int) -> str | None:
        if node is None or not node.output or steps > _MAX_TRACE:
            return None
        layer = self.layer_of.get(node.output[0])
        if layer is not None:
            return self._trace(node.input[0], steps + 1) if layer in self.depthwise else layer
        inputs = [i for i in node.input if i and not self.is_const(i)]
        if node.op_type in UNARY_OPS and node.input and not self.is_const(node.input[0]):
            return self._trace(node.input[0], steps + 1)
        if node.op_type in _ELEMENTWISE and inputs:
            found = {self._trace(i, steps + 1) for i in inputs}
            return found.pop() if len(found) == 1 else None
        return None

    def _fixed(self, name: str) -> bool:
        """An absent optional input, a constant, or a tensor computed from constants only."""
        return not name or self.is_const(name) or name in self.derived

    def resolve(self, name: str) -> str:
        return self.alias.get(name, name)

    def is_const(self, name: str) -> bool:
        return bool(name) and self.resolve(name) in self.protos

    def array(self, name: str) -> np.ndarray:
        """The constant's array, decoded once: many nodes may name one large initializer."""
        key = self.resolve(name)
        if key not in self.arrays:
            self.arrays[key] = self._decode(key)
        return self.arrays[key]

    def _decode(self, key: str) -> np.ndarray:
        proto = self.protos[key]
        if proto.data_location == self.onnx.TensorProto.EXTERNAL:
            raise CheckpointError(
                f"{self.display} keeps tensor {proto.name!r} in an external data file; upload a "
                "single-file model (onnx.save(model, path, save_as_external_data=False))."
            )
        try:
            arr = self.onnx.numpy_helper.to_array(proto)
        except Exception as e:
            raise corrupt(self.display, f"tensor {proto.name!r} cannot be decoded ({e})") from e
        return as_float(np.asarray(arr))

    def _name(self, weight: str, node: Any) -> str:
        weight = self.resolve(weight)
        base = weight[: -len(".weight")] if weight.endswith(".weight") else node.name or weight
        name, i = base, 2
        while name in self.names:
            name, i = f"{base}#{i}", i + 1
        self.names.add(name)
        return name

    def attr(self, node: Any, name: str, default: float) -> float:
        for a in node.attribute:
            if a.name == name:
                return float(self.onnx.helper.get_attribute_value(a))
        return default

    def _add_layer(
        self,
        node: Any,
        weight_input: str,
        w: np.ndarray,
        bias: np.ndarray | None,
        transposed: bool = False,
    ) -> str:
        name = self._name(weight_input, node)
        self.used.add(self.resolve(weight_input))
        self.weight_of[name] = (self.resolve(weight_input), transposed)
        if node.output:
            self.layer_of[node.output[0]] = name
        self.tensors[f"{name}.weight"] = w
        if bias is not None and bias.size == w.shape[0] and bias.dtype.kind == "f":
            self.tensors[f"{name}.bias"] = bias.reshape(-1)
        return name

    def _new_weight(self, node: Any) -> np.ndarray | None:
        """The node's constant second input not yet taken by another layer, else None."""
        if len(node.input) < 2 or not self.is_const(node.input[1]):
            return None
        if self.resolve(node.input[1]) in self.used:
            return None
        return self.array(node.input[1])

    def _on_conv(self, node: Any) -> None:
        w = self._new_weight(node)
        if w is None or w.ndim not in (3, 4, 5):
            return
        bias = (
            self.array(node.input[2])
            if len(node.input) > 2 and self.is_const(node.input[2])
            else None
        )
        name = self._add_layer(node, node.input[1], w, bias)
        g = self.groups[name] = int(self.attr(node, "group", 1))
        if g > 1 and g == w.shape[0] and w.shape[1] == 1 and node.input[0]:
            self.depthwise[name] = node

    def _on_gemm(self, node: Any) -> None:
        b = self._new_weight(node)
        if b is None or b.ndim != 2:
            return
        w = b if self.attr(node, "transB", 0) else b.T
        alpha, beta = self.attr(node, "alpha", 1.0), self.attr(node, "beta", 1.0)
        w = w * np.asarray(alpha, dtype=w.dtype) if alpha != 1.0 else w
        bias = None
        if len(node.input) > 2 and self.is_const(node.input[2]):
            c = self.array(node.input[2])
            bias = c * np.asarray(beta, dtype=c.dtype) if beta != 1.0 else c
        self._add_layer(node, node.input[1], np.ascontiguousarray(w), bias)

    def _on_matmul(self, node: Any) -> None:
        if len(node.input) < 2 or self.is_const(node.input[0]):
            return
        flip = self._transposed(node.input[1])  # MatMul(x, Transpose(W)): W is (out, in)
        b = self.array(flip).T if flip is not None else self._new_weight(node)
        if b is None or b.ndim != 2:
            return
        bias = None
        adds = self.consumers.get(node.output[0], [])
        if len(adds) == 1 and adds[0].op_type == "Add":
            other = [i for i in adds[0].input if i != node.output[0]]
            if len(other) == 1 and self.is_const(other[0]):
                bias = self.array(other[0])
        weight = flip if flip is not None else node.input[1]
        self._add_layer(node, weight, np.ascontiguousarray(b.T), bias, flip is not None)

    def _transposed(self, name: str) -> str | None:
        """The unused 2-D constant that ``name`` is the plain transpose of, else None."""
        node = self.derived.get(name)
        if node is None or node.op_type != "Transpose" or not self.is_const(node.input[0]):
            return None
        src = self.resolve(node.input[0])
        perm = [int(p) for a in node.attribute if a.name == "perm" for p in a.ints]
        if len(self.protos[src].dims) != 2 or perm not in ([], [1, 0]) or src in self.used:
            return None
        return src

    def _on_batchnormalization(self, node: Any) -> None:
        if len(node.input) < 5 or not all(self.is_const(i) for i in node.input[1:5]):
            return
        bn = self._name(node.input[1], node)
        for suffix, name in zip(
            ("weight", "bias", "running_mean", "running_var"), node.input[1:5], strict=True
        ):
            self.tensors[f"{bn}.{suffix}"] = self.array(name)
        self.buffers.update(self.resolve(i) for i in node.input[3:5])

    def _leftovers(self) -> list[SkippedLayer]:
        """Floating constants of 2+ dimensions that no Conv/Gemm/MatMul uses as a weight, then
        Conv/Gemm/MatMul nodes whose weight is computed from constants none of which is."""
        skipped = []
        for name, proto in self.protos.items():
            if name in self.used or proto.data_type not in ONNX_FLOAT_TYPES or len(proto.dims) < 2:
                continue
            ops = sorted({n.op_type for n in self._users(name)})
            prep, ends = self.prepared(name)
            end_ops = {n.op_type for n in ends}
            weighted = [n for n in ends if n.op_type in _WEIGHT_OPS]
            if _ONNX_RECURRENT_OPS.intersection(end_ops):
                reason = RECURRENT_REASON
            elif "Gather" in ops:
                reason = EMBEDDING_REASON
            elif "ConvTranspose" in end_ops:
                reason = "transposed convolution weights are not analysed yet"
            elif prep and weighted:
                reason = (
                    f"computed by {', '.join(sorted(set(prep)))} nodes before it is the weight of "
                    f"{weighted[0].op_type} node {weighted[0].name or weighted[0].output[0]!r}; "
                    "only weights stored as constants (or transposed ones) are analysed"
                )
            elif ops:
                reason = (
                    f"used by {', '.join(ops)} in a way that is not analysed (layers are Conv "
                    "weights, Gemm B operands and 2-D right-hand MatMul operands)"
                )
            else:
                reason = "not used by any node of the graph"
            skipped.append(SkippedLayer(name=layer_name(name), reason=reason))
        return skipped + self._computed_weights()

    def prepared(self, name: str) -> tuple[list[str], list[Any]]:
        """(op types of the constant-only nodes that the constant flows through, the nodes that
        take the result: its users when it is used as it is)."""
        prep: list[str] = []
        ends: list[Any] = []
        todo, seen = [name, *self.aliases_of.get(name, [])], set[int]()
        while todo and len(seen) < _MAX_TRACE:
            for node in self.consumers.get(todo.pop(), []):
                out = node.output[0] if node.output else ""
                if id(node) in seen or (node.op_type == "Identity" and out in self.alias):
                    continue
                seen.add(id(node))
                if out in self.derived:
                    prep.append(node.op_type)
                    todo.extend(node.output)
                else:
                    ends.append(node)
        return prep, ends

    def _computed_weights(self) -> list[SkippedLayer]:
        """Weight nodes without a layer whose weight is computed from constants of which none
        is a float matrix (reported by name): quantized weights (DequantizeLinear), ..."""
        skipped = []
        for node in self.graph.node:
            out = node.output[0] if node.output else ""
            if node.op_type not in _WEIGHT_OPS or not out or out in self.layer_of:
                continue
            computed = [i for i in node.input[:2] if i in self.derived]
            if not computed:
                continue
            ops, sources = self._sources(computed[0])
            if not any(
                self.protos[c].data_type in ONNX_FLOAT_TYPES and len(self.protos[c].dims) >= 2
                for c in sources
            ):
                skipped.append(
                    SkippedLayer(
                        name=node.name or node.output[0],
                        reason=f"its weight is computed in the graph ({', '.join(ops)}) from "
                        "constants that are not float matrices (quantized?): not analysed",
                    )
                )
        return skipped

    def _sources(self, tensor: str) -> tuple[list[str], set[str]]:
        """(op types computing ``tensor`` from constants, the constants it is computed from)."""
        ops: set[str] = set()
        sources: set[str] = set()
        todo, seen = [tensor], 0
        while todo and seen < _MAX_TRACE:
            t, seen = todo.pop(), seen + 1
            if self.is_const(t):
                sources.add(self.resolve(t))
            elif t in self.derived:
                ops.add(self.derived[t].op_type)
                todo.extend(i for i in self.derived[t].input if i)
        return sorted(ops), sources

    def _users(self, name: str) -> Iterable[Any]:
        names = [name, *self.aliases_of.get(name, [])]
        return [
            node for n in names for node in self.consumers.get(n, []) if node.op_type != "Identity"
        ]
