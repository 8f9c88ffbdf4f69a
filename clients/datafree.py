"""Data-free statistics: consumer-input second moments from BatchNorm alone (design §8).

Without calibration data, a channel that leaves ``act(BN(·))`` is modelled as ``act(γ z + β)``
with z ~ N(0, 1) (BN's normalized input) and channels independent;
:func:`graphs.datafree.rectified_moments` gives its mean and variance. For every channel-mixing
consumer (a conv with ``groups < in_channels`` or a linear layer, :mod:`clients.gram`) whose
input is such a tensor, :func:`datafree_statistics` returns

    S = n · [[diag(var) + m mᵀ, m], [mᵀ, 1]]     shape (c + 1, c + 1), float64, constant last

— the format of a capture's ``gram/<name>`` — where n is a *nominal* row count,
:data:`NOMINAL_ROWS` (2³⁰) unless ``rows`` says otherwise. n only scales S: the folds it gives
(B = 0, b = the removed channels' means, kind ``mean``) do not depend on it. It is large on
purpose: the planner multiplies a consumer's error by the out-of-sample inflation of a
least-squares fit from n rows, n(n−1)/((n−p−1)(n−p−2)), which has no meaning here (nothing is
fitted); at 2³⁰ rows it is 1 within 1e-5 for p ≤ 4096 (with the example input's own row
count it would be about 1.8 on MobileNetV2's 28×28 stages, or switch the fit off). A BN with
γ ≈ 0 makes a constant channel: exactly redundant, removed first with error 0.

Where a consumer's input comes from is found by one forward pass with module hooks: a
BatchNorm's output, then optionally a ReLU / ReLU6 module, then optionally modules that keep
each channel's mean (Dropout in eval mode, Identity, Flatten that keeps the width, adaptive
average pooling — the variance of a pooled channel is then an upper bound) must reach the
consumer as the same tensor, unmodified (tensor version counters catch in-place changes
such as ``out += identity``). Anything else — another activation, a residual add, a
concatenation, a functional op the hooks cannot see, a depthwise conv between — leaves the
consumer out, with the reason in :attr:`clients.Activations.statistics_skipped`.

Near-duplicate filters are merged (Neuron Merging, :mod:`graphs.merge`): when the BatchNorm
reads a conv/linear layer's output unmodified (the *producer*) and the activation is ReLU or
none (positively homogeneous), channels whose effective filters ``γ/σ · W`` have cosine ≥
``merge_threshold`` (default :data:`graphs.merge.DEFAULT_MERGE_THRESHOLD`) are modelled as
correlated, so the planner's fold replaces a removed one by ``s ×`` its kept near-duplicate
(exactly, when the filters and BN shifts are exact positive multiples). ReLU6 and consumers
whose producer is not found keep independent channels (mean folds); ``merge_threshold=None``
switches merging off. Without a pair above the threshold S is the same, bit for bit.
:func:`datafree_merges` lists the components.

:func:`datafree_activations` returns the same statistics as a statistics-only
:class:`clients.Activations`, whose ``save`` writes the file ``prunegraph plan --activations``
reads (with ``--manifest``)::

    datafree_activations(model, torch.zeros(1, 3, 224, 224)).save("datafree.safetensors")
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from clients.activations import Activations
from clients.gram import input_width, is_mixing_consumer
from graphs.datafree import moments_gram, rectified_moments
from graphs.merge import (
    DEFAULT_MERGE_THRESHOLD,
    MERGE_ACTIVATIONS,
    merged_gram,
)

__all__ = ["NOMINAL_ROWS", "datafree_activations", "datafree_merges", "datafree_statistics"]

NOMINAL_ROWS = float(2**30)
"""The row count n of the data-free S (module docstring)."""
_BN = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
_ACTS = {nn.ReLU: "relu", nn.ReLU6: "relu6"}
_PRODUCERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
_MEAN_KEEPING = (
    nn.Dropout,
    nn.Dropout1d,
    nn.Dropout2d,
    nn.Dropout3d,
    nn.Identity,
    nn.Flatten,
    nn.AdaptiveAvgPool1d,
    nn.AdaptiveAvgPool2d,
    nn.AdaptiveAvgPool3d,
)
_NOT_TRACED = (
    "its input is not the output of a BatchNorm (then ReLU/ReLU6 or nothing) as seen by module "
    "hooks (a residual add, a concatenation, a functional op or another layer comes between)"
)


@dataclass(frozen=True)
class _Source:
    """A tensor that is ``act(BN(·))`` (``reason`` None) or why it does not qualify."""

    bn: str
    act: str = "identity"
    reason: str | None = None


def _version(t: torch.Tensor) -> int:
    return int(getattr(t, "_version", 0))


class _Tracer:
    """Forward hooks that follow BN outputs through activations to the consumers."""

    def __init__(self, model: nn.Module) -> None:
        self.names = {id(m): n for n, m in model.named_modules()}
        self.model = model
        # id(tensor) -> (tensor kept alive so the id is not reused, its version, source)
        self.seen: dict[int, tuple[torch.Tensor, int, _Source]] = {}
        self.pending: dict[int, _Source | None] = {}
        self.inputs: dict[str, tuple[_Source | None, int]] = {}  # name -> source, input width
        # conv/linear outputs (tensor, version, producer name); BN name -> producer (None: mixed)
        self.made: dict[int, tuple[torch.Tensor, int, str]] = {}
        self.producer: dict[str, str | None] = {}

    def lookup(self, x: object) -> _Source | None:
        if not isinstance(x, torch.Tensor):
            return None
        hit = self.seen.get(id(x))
        if hit is None or hit[0] is not x or hit[1] != _version(x):
            return None
        return hit[2]

    def mark(self, t: object, source: _Source | None) -> None:
        if isinstance(t, torch.Tensor) and source is not None:
            self.seen[id(t)] = (t, _version(t), source)

    def made_by(self, x: object) -> str | None:
        hit = self.made.get(id(x)) if isinstance(x, torch.Tensor) else None
        return hit[2] if hit is not None and hit[0] is x and hit[1] == _version(x) else None

    def pre(self, module: nn.Module, args: tuple[object, ...]) -> None:
        src = self.lookup(args[0]) if args else None
        if isinstance(module, _BN):
            name, made = self.names[id(module)], self.made_by(args[0] if args else None)
            if self.producer.setdefault(name, made) != made:
                self.producer[name] = None  # a shared BN reading different layers
        self.pending[id(module)] = src
        if is_mixing_consumer(module):
            x = args[0] if args else None
            if isinstance(x, torch.Tensor):
                name = self.names[id(module)]
                if isinstance(module, nn.Linear):
                    width = x.shape[-1]
                else:
                    spatial = len(module.kernel_size)  # type: ignore[arg-type]
                    width = x.shape[0 if x.dim() == spatial + 1 else 1]
                first = self.inputs.setdefault(name, (src, int(width)))
                if first[0] != src:  # a shared module reading differently made inputs
                    why = "it is called more than once on inputs of different origins"
                    self.inputs[name] = (_Source("", reason=why), first[1])

    def post(self, module: nn.Module, args: tuple[object, ...], out: object) -> None:
        src = self.pending.pop(id(module), None)
        name = self.names[id(module)]
        if isinstance(module, _PRODUCERS) and isinstance(out, torch.Tensor):
            self.made[id(out)] = (out, _version(out), name)
        if isinstance(module, _BN):
            self.mark(out, _Source(bn=name))
        elif type(module) in _ACTS:
            if src is not None and src.reason is None and src.act == "identity":
                self.mark(out, _Source(bn=src.bn, act=_ACTS[type(module)]))
            elif src is not None and src.reason is None:
                self.mark(out, _Source(src.bn, reason=f"two activations after BatchNorm {src.bn}"))
        elif isinstance(module, _MEAN_KEEPING):
            self.mark(out, src)
        elif src is not None and src.reason is None and not list(module.children()):
            why = (
                f"its input passes {type(module).__name__} ({name}) after BatchNorm {src.bn}; "
                "only ReLU, ReLU6 or no activation have closed-form moments"
            )
            self.mark(out, _Source(src.bn, reason=why))

    def run(self, example_inputs: object) -> None:
        leaves = [m for m in self.model.modules() if not list(m.children())]
        handles = []
        for m in leaves:
            handles.append(m.register_forward_pre_hook(self.pre))
            handles.append(m.register_forward_hook(self.post))
        try:
            with torch.no_grad():
                if isinstance(example_inputs, (tuple, list)):
                    self.model(*example_inputs)
                else:
                    self.model(example_inputs)
        finally:
            for h in handles:
                h.remove()
            self.seen.clear()
            self.made.clear()


def _bn_affine(bn: nn.Module) -> tuple[np.ndarray, np.ndarray]:
    c = int(bn.num_features)  # type: ignore[arg-type]
    w = getattr(bn, "weight", None)
    b = getattr(bn, "bias", None)
    gamma = np.ones(c) if w is None else w.detach().double().cpu().numpy()
    beta = np.zeros(c) if b is None else b.detach().double().cpu().numpy()
    return gamma, beta


def _effective_filters(producer: nn.Module, bn: nn.Module) -> np.ndarray | None:
    """Rows ``γ_k/σ_k · W_k`` (c, d) of a conv/linear producer read by ``bn`` (a grouped conv's
    rows zero outside their group); None when the shapes do not match or no two channels can
    share a direction (a depthwise conv)."""
    w = getattr(producer, "weight", None)
    c = int(bn.num_features)  # type: ignore[arg-type]
    if not isinstance(w, torch.Tensor) or w.shape[0] != c:
        return None
    groups = int(getattr(producer, "groups", 1))
    if groups >= c:
        return None
    W = w.detach().double().cpu().reshape(c, -1).numpy()
    gamma, _ = _bn_affine(bn)
    rv = getattr(bn, "running_var", None)
    eps = float(getattr(bn, "eps", 0.0))
    sigma = np.ones(c) if rv is None else np.sqrt(rv.detach().double().cpu().numpy() + eps)
    W = W * (gamma / sigma)[:, None]
    if groups == 1:
        return W
    per, d = c // groups, W.shape[1]
    full = np.zeros((c, groups * d))
    for k in range(c):
        full[k, (k // per) * d : (k // per + 1) * d] = W[k]
    return full


@dataclass(frozen=True)
class _Collected:
    stats: dict[str, torch.Tensor]
    skipped: dict[str, str]
    merges: dict[str, list[list[int]]]


def _check(model: object, example_inputs: object, rows: object, threshold: object) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch nn.Module, got {type(model).__name__}")
    if not (isinstance(rows, (int, float)) and np.isfinite(rows) and rows > 0):
        raise ValueError(f"rows must be a positive finite number, got {rows!r}")
    if threshold is not None and not (
        isinstance(threshold, (int, float)) and np.isfinite(threshold) and 0 < threshold <= 1
    ):
        raise ValueError(
            f"merge_threshold must be a cosine in (0, 1] or None (no merges), got {threshold!r}"
        )
    if not isinstance(example_inputs, (torch.Tensor, tuple, list)):
        raise TypeError(
            "example_inputs must be a tensor or a tuple of the model's positional inputs, "
            f"got {type(example_inputs).__name__}"
        )


def _collect(
    model: nn.Module, example_inputs: object, rows: float, threshold: float | None
) -> _Collected:
    _check(model, example_inputs, rows, threshold)
    modules = dict(model.named_modules())
    consumers = [n for n, m in modules.items() if is_mixing_consumer(m)]
    was_training = model.training
    model.eval()
    tracer = _Tracer(model)
    try:
        tracer.run(example_inputs)
    finally:
        model.train(was_training)
    out = _Collected({}, {}, {})
    for name in consumers:
        found = tracer.inputs.get(name)
        if found is None:
            out.skipped[name] = "did not run in the forward pass on the example inputs"
            continue
        src, width = found
        if src is None:
            out.skipped[name] = _NOT_TRACED
            continue
        if src.reason is not None:
            out.skipped[name] = src.reason
            continue
        bn = modules[src.bn]
        gamma, beta = _bn_affine(bn)
        if width != gamma.size or width != input_width(modules[name]):
            out.skipped[name] = (
                f"its input has {width} values per row but BatchNorm {src.bn} has {gamma.size} "
                "channels (e.g. a flattened map): no per-channel statistics"
            )
            continue
        producer = tracer.producer.get(src.bn)
        S = None
        if threshold is not None and src.act in MERGE_ACTIVATIONS and producer is not None:
            filters = _effective_filters(modules[producer], bn)
            if filters is not None:
                S, comps = merged_gram(
                    gamma, beta, filters, activation=src.act, threshold=threshold, rows=float(rows)
                )
                if comps:
                    out.merges[name] = [[int(i) for i in m] for m in comps]
        if S is None:
            mean, var = rectified_moments(gamma, beta, activation=src.act)  # type: ignore[arg-type]
            S = moments_gram(mean, var, rows=float(rows))
        out.stats[name] = torch.from_numpy(S)
    return out


def datafree_activations(
    model: nn.Module,
    example_inputs: object,
    *,
    rows: float = NOMINAL_ROWS,
    merge_threshold: float | None = DEFAULT_MERGE_THRESHOLD,
) -> Activations:
    """Statistics-only :class:`clients.Activations` from the model's BatchNorm layers.

    Args:
        model: a live torch model (put in eval mode for the pass; its mode is restored).
        example_inputs: one input tensor (or a tuple of positional inputs) for a forward pass;
            only the module call order and the tensors' shapes are used.
        rows: the nominal row count n that scales every S (> 0).
        merge_threshold: cosine of two effective filters from which their channels merge
            (module docstring, :mod:`graphs.merge`); None: no merges, independent channels.

    Returns:
        ``statistics``: consumer module name -> S (c + 1, c + 1) float64 (module docstring);
        ``statistics_skipped``: every other channel-mixing consumer -> why it has no S. No maps.
    """
    got = _collect(model, example_inputs, rows, merge_threshold)
    return Activations(
        tensors={}, layers={}, statistics=got.stats, statistics_skipped=got.skipped, samples=0
    )


def datafree_statistics(
    model: nn.Module,
    example_inputs: object,
    *,
    rows: float = NOMINAL_ROWS,
    merge_threshold: float | None = DEFAULT_MERGE_THRESHOLD,
) -> dict[str, np.ndarray]:
    """Consumer module name -> S (c + 1, c + 1) float64 from BN statistics alone: what
    ``graphs.planner.plan_layers`` takes as ``stats`` (mean folds, kind ``mean``; merges of
    near-duplicates, kind ``least_squares``). Consumers whose input is not ``act(BN(·))`` are
    left out; :func:`datafree_activations` says why."""
    return datafree_activations(
        model, example_inputs, rows=rows, merge_threshold=merge_threshold
    ).stats()


def datafree_merges(
    model: nn.Module,
    example_inputs: object,
    *,
    merge_threshold: float = DEFAULT_MERGE_THRESHOLD,
) -> dict[str, list[list[int]]]:
    """Consumer module name -> its merge components (sorted channel indices, ≥ 2 each): the
    channels :func:`datafree_activations` models as near-duplicates. Consumers without any are
    left out."""
    if merge_threshold is None:
        raise ValueError("merge_threshold must be a cosine in (0, 1]")
    return _collect(model, example_inputs, NOMINAL_ROWS, merge_threshold).merges
