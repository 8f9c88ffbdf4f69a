"""Concrete tensor shapes of an ONNX graph, for FLOPs and the derived manifest (design §2, §5).

Redundancy needs weights only; FLOPs need every layer's output size, hence concrete input
shapes. Models exported with symbolic dims (``dynamic_axes``) get them in one of two ways:

- by default, the symbolic batch dim of every graph input is set to 1 and every other
  symbolic dim is left symbolic: when a layer's output size then depends on one, the shapes are
  unknown (:class:`ShapesUnknownError`) and the caller goes on without a manifest. The batch
  dim (:meth:`GraphInput.batch_axis`) is the first one named like a batch (``batch``,
  ``batch_size``, ``N``, ``B``, ...; a sequence-first recurrent model's is axis 1), else axis 0;
- with the user's input shapes (``--input-shape 1,3,64,256``, a job's ``input_shape``): every
  input gets its shape (fixed dims must match, ranks too), the declared output and
  intermediate shapes are dropped so that nothing contradicts them, and inference runs strictly;
  a shape the model cannot take is an :class:`~graphs.errors.InvalidInputError` naming the
  model's inputs.

Inference is ``onnx.shape_inference.infer_shapes`` with data propagation, so that ``Reshape``
targets computed by ``Shape``/``Gather``/``Concat`` nodes (``x.view(x.size(0), -1)``) are known.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from graphs.contracts.jobs import check_input_shapes
from graphs.errors import CheckpointError, InvalidInputError

__all__ = [
    "GraphInput",
    "Shapes",
    "ShapesUnknownError",
    "describe_inputs",
    "graph_inputs",
    "infer_shapes",
    "parse_input_shapes",
]

Shapes = dict[str, list[int | None]]
"""Tensor name -> its dims (None where unknown)."""
_BATCH = re.compile(r"(?i)n|b|bs|batch(?:[_ ]?size)?|(?:\w*[_/.])?batch(?:[_ ]?size)?")


class ShapesUnknownError(CheckpointError):
    """The layers' output sizes (so FLOPs and a manifest) cannot be known; the weights can.

    ``reason`` says why without naming the file (it goes into reports as a note).
    """

    default_hint = (
        "Give the model's input shape (--input-shape 1,3,224,224, or input_shape in a job "
        "request) to get FLOPs and a manifest; the analysis itself needs no shapes."
    )

    def __init__(self, display: str, reason: str) -> None:
        super().__init__(f"{display}: {reason}.")
        self.reason = reason


@dataclass(frozen=True)
class GraphInput:
    """A graph input that is not an initializer: its name and dims as declared.

    ``dims`` is None when the input declares no shape; a dim is an int when fixed, the symbol's
    name when symbolic, None when unnamed.
    """

    name: str
    dims: tuple[int | str | None, ...] | None

    def describe(self) -> str:
        if self.dims is None:
            return f"{self.name} (shape not declared)"
        return f"{self.name} [{', '.join('?' if d is None else str(d) for d in self.dims)}]"

    @property
    def batch_axis(self) -> int:
        """The axis named like a batch (``batch``, ``batch_size``, ``N``, ``B``, ``bs``), else 0."""
        for k, d in enumerate(self.dims or ()):
            if isinstance(d, str) and _BATCH.fullmatch(d):
                return k
        return 0

    @property
    def symbolic(self) -> list[str]:
        """The dims that are not fixed, as ``name`` or ``axis k``."""
        return [
            d if isinstance(d, str) else f"axis {k}"
            for k, d in enumerate(self.dims or ())
            if not isinstance(d, int)
        ]


def graph_inputs(model: Any) -> list[GraphInput]:
    """The model's inputs, initializers (listed as inputs by old exporters) excluded."""
    inits = {i.name for i in model.graph.initializer}
    found = []
    for i in model.graph.input:
        if i.name in inits:
            continue
        t = i.type.tensor_type
        dims: tuple[int | str | None, ...] | None = None
        if t.HasField("shape"):
            dims = tuple(
                d.dim_value
                if d.HasField("dim_value")
                else (d.dim_param if d.HasField("dim_param") else None)
                for d in t.shape.dim
            )
        found.append(GraphInput(i.name, dims))
    return found


def describe_inputs(inputs: Sequence[GraphInput]) -> str:
    """``x [batch, 3, h, w]; mask [batch, ?]`` (``none`` without inputs)."""
    return "; ".join(i.describe() for i in inputs) or "none"


def parse_input_shapes(text: str) -> list[list[int]]:
    """``"1,3,64,256"`` -> ``[[1, 3, 64, 256]]``; inputs separated by ``;`` (``"1,3,8,8;1,4"``).

    Raises:
        InvalidInputError: not comma-separated positive integers.
    """
    try:
        shapes = [[int(x) for x in part.split(",")] for part in text.split(";")]
    except ValueError:
        raise InvalidInputError(
            f"--input-shape {text!r} is not a comma-separated list of integers",
            hint="For example --input-shape 1,3,224,224 (inputs separated by ';').",
        ) from None
    return check_input_shapes(shapes)


def infer_shapes(
    model: Any, display: str, input_shapes: Sequence[Sequence[int]] | None = None
) -> tuple[Shapes, list[list[int | None]]]:
    """Every tensor's shape, and the graph inputs' shapes the inference started from (their
    batch axes: :meth:`GraphInput.batch_axis` of :func:`graph_inputs`).

    Args:
        model: an ``onnx.ModelProto`` (not modified).
        display: how the model is called in errors.
        input_shapes: one concrete shape per graph input; None: symbolic batch (axis 0) set to 1,
            other symbolic dims left symbolic.

    Raises:
        ShapesUnknownError: without ``input_shapes``, when shape inference fails.
        InvalidInputError: ``input_shapes`` does not fit the model's inputs, or inference fails
            with them (the message names the model's inputs).
    """
    import onnx

    m = onnx.ModelProto()
    m.CopyFrom(model)
    inputs = graph_inputs(m)
    if input_shapes is not None:
        _set_inputs(m, inputs, check_input_shapes(input_shapes))
    else:
        by_name = {i.name: i for i in m.graph.input}
        for gi in inputs:
            dims = by_name[gi.name].type.tensor_type.shape.dim
            axis = gi.batch_axis
            if len(dims) > axis and not dims[axis].HasField("dim_value"):
                dims[axis].dim_value = 1
    strict = input_shapes is not None
    try:
        try:
            m = onnx.shape_inference.infer_shapes(m, strict_mode=strict, data_prop=True)
        except Exception:
            if strict:
                raise
            m = onnx.shape_inference.infer_shapes(m, strict_mode=False)
    except Exception as e:
        if not strict:
            why = " ".join(str(e).split())[:300]
            raise ShapesUnknownError(display, f"ONNX shape inference fails on it ({why})") from e
        raise InvalidInputError(
            f"ONNX shape inference fails with input shape(s) "
            f"{'; '.join(','.join(map(str, s)) for s in input_shapes or ())}: "
            f"{' '.join(str(e).split())[:500]}",
            hint=f"The model's inputs are {describe_inputs(inputs)}: give a shape it accepts "
            "(fixed dims as they are, large enough for its strides and pooling).",
        ) from None
    shapes: Shapes = {}
    for v in [*m.graph.input, *m.graph.value_info, *m.graph.output]:
        t = v.type.tensor_type
        if t.HasField("shape"):
            shapes[v.name] = [d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim]
    names = [i.name for i in inputs]
    return shapes, [shapes.get(n, []) for n in names]


def _set_inputs(m: Any, inputs: list[GraphInput], shapes: list[list[int]]) -> None:
    """Give every graph input its shape; forget declared output and intermediate shapes."""
    described = describe_inputs(inputs)
    if len(shapes) != len(inputs):
        raise InvalidInputError(
            f"{len(shapes)} input shape(s) given, but the model has {len(inputs)} input(s): "
            f"{described}",
            hint="Give one shape per input, separated by ';' (e.g. 1,3,224,224;1,10).",
        )
    by_name = {i.name: i for i in m.graph.input}
    for gi, shape in zip(inputs, shapes, strict=True):
        if gi.dims is not None and len(gi.dims) != len(shape):
            raise InvalidInputError(
                f"input shape {','.join(map(str, shape))} has {len(shape)} dims, but the model's "
                f"input {gi.name} has {len(gi.dims)}: {described}",
                hint="Give a shape of the input's rank, its fixed dims as they are.",
            )
        fixed = [
            (k, d, s)
            for k, (d, s) in enumerate(zip(gi.dims or (), shape, strict=True))
            if isinstance(d, int) and d != s
        ]
        if fixed:
            k, d, s = fixed[0]
            raise InvalidInputError(
                f"input shape {','.join(map(str, shape))} gives {s} at axis {k}, but the model's "
                f"input {gi.name} fixes it to {d}: {described}",
                hint="Keep the fixed dims as they are; choose only the symbolic ones.",
            )
        t = by_name[gi.name].type.tensor_type
        t.shape.ClearField("dim")
        for s in shape:
            t.shape.dim.add().dim_value = s
    del m.graph.value_info[:]
    for o in m.graph.output:
        if o.type.HasField("tensor_type"):
            o.type.tensor_type.ClearField("shape")
