"""ONNX ``GRU``/``LSTM``/``RNN`` nodes as PyTorch-named recurrent weights (:mod:`graphs.recurrent`).

An ONNX recurrent node holds ``W`` (directions, G·H, in), ``R`` (directions, G·H, H) and
``B`` (directions, 2·G·H) with its gates in ONNX's order (GRU: z, r, h; LSTM: i, o, f, c). They
become the tensors ``nn.GRU``/``nn.LSTM``/``nn.RNN`` would save: ``{module}.weight_ih_l{k}``,
``weight_hh_l{k}``, ``bias_ih_l{k}``, ``bias_hh_l{k}`` (``_reverse`` for the second direction),
gates in PyTorch's order (GRU: r, z, n; LSTM: i, f, g, o), so that
:func:`service.ingest.layers.extract_layers` analyses their hidden units as it does a
PyTorch checkpoint's. ``module`` is the node's scope as the TorchScript exporter names it
(``/encoder/rnn/GRU`` -> ``encoder.rnn``), else the node's name (or its W's prefix: ``lstm.W`` ->
``lstm``); ``k`` counts the nodes of one
scope in graph order (a 2-layer ``nn.GRU`` exports two nodes).

Exported without constant folding, a node's ``W``/``R``/``B`` are computed (Slice, Concat, ...)
from the module's own initializers, already named ``gru.weight_ih_l0`` etc.: those are taken as
they are.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import numpy as np

from graphs.manifest import ChannelGroup, ParamAxis
from graphs.recurrent import parse

__all__ = ["HIDDEN_REASON", "RECURRENT_OPS", "hidden_groups", "recurrent_weights"]

HIDDEN_REASON = (
    "hidden units of an ONNX recurrent node: they are analysed, but removing them needs the "
    "PyTorch model (prunegraph manifest / clients.build_manifest)"
)
RECURRENT_OPS = frozenset({"GRU", "LSTM", "RNN"})
_TORCH_ORDER = {"GRU": (1, 0, 2), "LSTM": (0, 2, 3, 1), "RNN": (0,)}  # ONNX gate blocks
_SCOPE = re.compile(r"^/(?P<scope>.+)/(?:GRU|LSTM|RNN)(?:_\d+)?$")


def recurrent_weights(reader: Any) -> dict[str, np.ndarray]:
    """Recurrent weights of the reader's graph (``service.ingest.onnx_file.OnnxReader``), PyTorch
    named; the constants they come from are marked used by the reader."""
    out: dict[str, np.ndarray] = {}
    layer_of: dict[str, int] = {}
    for node in reader.graph.node:
        if node.op_type not in RECURRENT_OPS:
            continue
        if len(node.input) > 2 and all(reader.is_const(i) for i in node.input[1:3]):
            module = _module(node, reader.resolve(node.input[1]))
            k = layer_of[module] = layer_of.get(module, -1) + 1
            out.update(_node_weights(reader, node, module, k))
    for name in reader.protos:  # unfolded exports: the module's own initializers
        parsed = parse(name)
        if name in reader.used or parsed is None or parsed[2] == "hr":
            continue
        _, ends = reader.prepared(name)
        if any(n.op_type in RECURRENT_OPS for n in ends):
            out[name] = reader.array(name)
            reader.used.add(name)
    return out


def _module(node: Any, w: str) -> str:
    """``/encoder/rnn/GRU`` -> ``encoder.rnn``; else the node's name, its W's prefix, its output."""
    match = _SCOPE.match(node.name or "")
    if match:
        return match["scope"].replace("/", ".")
    return node.name or (w.rsplit(".", 1)[0] if "." in w else node.output[0])


def _node_weights(reader: Any, node: Any, module: str, k: int) -> dict[str, np.ndarray]:
    w, r = reader.array(node.input[1]), reader.array(node.input[2])
    b = (
        reader.array(node.input[3])
        if len(node.input) > 3 and reader.is_const(node.input[3])
        else None
    )
    gates = _TORCH_ORDER[node.op_type]
    if w.ndim != 3 or r.ndim != 3 or w.shape[:2] != r.shape[:2]:
        return {}
    dirs, gh, h = w.shape[0], w.shape[1], r.shape[2]
    if gh != len(gates) * h or any(n in reader.used for n in map(reader.resolve, node.input[1:3])):
        return {}
    rows = np.concatenate([np.arange(g * h, (g + 1) * h) for g in gates])
    out: dict[str, np.ndarray] = {}
    for d in range(dirs):
        suffix = f"_l{k}" + ("_reverse" if d else "")
        out[f"{module}.weight_ih{suffix}"] = np.ascontiguousarray(w[d][rows])
        out[f"{module}.weight_hh{suffix}"] = np.ascontiguousarray(r[d][rows])
        if b is not None and b.shape == (dirs, 2 * gh):
            out[f"{module}.bias_ih{suffix}"] = np.ascontiguousarray(b[d, :gh][rows])
            out[f"{module}.bias_hh{suffix}"] = np.ascontiguousarray(b[d, gh:][rows])
    taken = {reader.resolve(i) for i in node.input[1:4] if i and reader.is_const(i)}
    reader.used |= taken
    reader.converted |= taken  # the manifest lists the PyTorch-named tensors instead
    return out


def hidden_groups(tensors: Mapping[str, np.ndarray], first_id: int) -> list[ChannelGroup]:
    """One unprunable group of hidden units (``unit="hidden"``) per recurrent module among the
    PyTorch-named ``tensors``, ids from ``first_id``: its rows of every gate of every layer and
    direction, its columns of ``weight_hh`` and of the next layer's ``weight_ih``, as
    ``clients.build_manifest`` lists a live module's, so that the analysis scores a module's units
    as one group and plans keep them (removing them needs the PyTorch model)."""
    modules: dict[str, list[tuple[str, str, str]]] = {}
    for name in tensors:
        p = parse(name)
        if p is not None:
            modules.setdefault(p[0], []).append((name, f"{p[1]}_{p[2]}", p[3]))
    out: list[ChannelGroup] = []
    for module, params in modules.items():
        hh = next((tensors[n] for n, what, _ in params if what == "weight_hh"), None)
        if hh is None or hh.ndim != 2 or hh.shape[1] < 1 or hh.shape[0] % hh.shape[1]:
            continue
        h, dirs = hh.shape[1], 2 if any(s.endswith("_reverse") for *_, s in params) else 1
        axes = []
        for name, what, suffix in params:
            axes.append(ParamAxis(param=name, axis=0, blocks=hh.shape[0] // h))
            if what == "weight_hh":
                axes.append(ParamAxis(param=name, axis=1))
            elif what == "weight_ih" and not suffix.startswith("_l0"):
                axes.append(ParamAxis(param=name, axis=1, blocks=dirs))
        out.append(
            ChannelGroup(
                id=first_id + len(out),
                channels=h,
                producers=[module],
                params=axes,
                prunable=False,
                reason=HIDDEN_REASON,
                unit="hidden",
            )
        )
    return out
