"""In-memory layer containers: the numpy side of the data model (design §2).

A :class:`LayerWeights` is one prunable layer as read from a checkpoint; a :class:`LayerGroup` is
the unit that is scored and pruned (one layer, or coupled layers that must lose the same output
channels, such as a producer conv and the depthwise conv that follows it; or a transformer
block's FFN neurons or attention heads, see :mod:`graphs.transformer`).

Weights may be read-only views of a memory-mapped file (:mod:`service.ingest.safetensors_file`):
they are read when a group's vectors are built, and :func:`release` then drops the mapped pages
from the process's resident memory, so analysing a checkpoint holds about one group in memory at
a time.
"""

from __future__ import annotations

import mmap
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from graphs.manifest import Heads, Unit

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
        heads: for an attention projection (q/k/v/o), its block's heads when known (config.json
            next to the checkpoint, or a manifest); the weights alone cannot tell them.
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
    heads: Heads | None = None

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
        """The filter matrix, shape (n_filters, fan_in), float64 (a writable array of its own
        when the weight is a read-only view of a mapped file)."""
        return as_float64(self.weight).reshape(self.n_filters, -1)


def as_float64(weight: np.ndarray) -> np.ndarray:
    """``weight`` as a writable float64 array; a file-mapped weight is copied, then released."""
    out = np.asarray(weight, dtype=np.float64)
    if not out.flags.writeable:
        out = out.copy()
    release(weight)
    return out


def release(arr: np.ndarray) -> None:
    """Drop the pages of a memory-mapped array from the process's resident set.

    The array stays valid: the pages stay in the OS page cache and the next access maps them
    again. Does nothing for arrays that do not view an ``mmap`` (or where ``madvise`` is missing).
    """
    base: object = arr
    while isinstance(base, np.ndarray) and base.base is not None:
        base = base.base
    if not isinstance(base, memoryview) or not isinstance(base.obj, mmap.mmap):
        return
    if not hasattr(mmap, "MADV_DONTNEED") or arr.nbytes == 0:
        return
    mm = base.obj
    start = arr.__array_interface__["data"][0] - np.frombuffer(base, np.uint8).ctypes.data
    lo = start // mmap.PAGESIZE * mmap.PAGESIZE
    hi = min(start + arr.nbytes, len(mm))
    if 0 <= lo < hi:
        mm.madvise(mmap.MADV_DONTNEED, lo, hi - lo)


@dataclass(frozen=True, eq=False)
class LayerGroup:
    """Layers whose output channels (or neurons, or heads) are scored and pruned as one unit.

    ``members[0]`` is the producer; every member has the same number of output channels. For
    ``unit`` ``neurons``, ``heads`` and ``hidden`` (linear-shaped members only),
    ``axes[i] = (axis, per)`` says that vertex j owns entries ``[j·per, (j+1)·per)`` of axis
    ``axis`` of member i's weight (rows of q/k/v and up/gate, columns of o and down), in each of
    ``blocks[i]`` equal blocks of that axis when ``blocks`` is given (the gates of a recurrent
    layer: a hidden unit owns rows j, H+j, 2H+j, 3H+j of an LSTM's ``weight_ih``; see
    :mod:`graphs.recurrent`). A member may appear twice with different axes (a recurrent
    ``weight_hh``: the unit's rows and its column); it counts once (by name) in ``params``.
    """

    name: str
    members: tuple[LayerWeights, ...]
    coupling: Coupling = "none"
    group_id: int | None = None  # the manifest's channel group, when a manifest made it
    unit: Unit = "channels"
    axes: tuple[tuple[int, int], ...] = ()
    heads: Heads | None = None
    blocks: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if not self.members:
            raise ValueError(f"{self.name}: a group needs at least one layer")
        if self.unit == "channels":
            widths = {m.n_filters for m in self.members}
        else:
            if (
                len(self.axes) != len(self.members)
                or len(self.blocks) not in (0, len(self.members))
                or any(
                    m.kind != "linear" or b < 1 or m.shape[a] % (per * b)
                    for m, (a, per), b in self._parts()
                )
            ):
                raise ValueError(f"{self.name}: every member needs an axis its vertices divide")
            widths = {m.shape[a] // (per * b) for m, (a, per), b in self._parts()}
        if len(widths) != 1:
            raise ValueError(f"{self.name}: members have different widths {sorted(widths)}")

    def _parts(self) -> list[tuple[LayerWeights, tuple[int, int], int]]:
        blocks = self.blocks or (1,) * len(self.members)
        return list(zip(self.members, self.axes, blocks, strict=True))

    @property
    def n_filters(self) -> int:
        """Vertices: output channels, neurons, heads (k/v heads under GQA) or hidden units."""
        if self.unit == "channels":
            return self.members[0].n_filters
        m, (axis, per), b = self._parts()[0]
        return m.shape[axis] // (per * b)

    @property
    def producers(self) -> tuple[LayerWeights, ...]:
        """The members whose OUTPUTS the group's indices remove (rows of q/k/v or up/gate; o
        and down lose input columns)."""
        if self.unit == "channels":
            return self.members
        rows = {m.name: m for m, (axis, _), _b in self._parts() if axis == 0}
        return tuple(rows.values())

    @property
    def fan_in(self) -> int:
        """Length of a vertex's vector."""
        if self.unit == "channels":
            return sum(m.fan_in for m in self.members)
        return sum(int(m.weight.size) // self.n_filters for m in self.members)

    @property
    def params(self) -> int:
        return sum(m.params for m in {m.name: m for m in self.members}.values())

    def vectors(self) -> np.ndarray:
        """Filter vectors of the group, shape (n_filters, sum of members' fan_in), float64.

        A single layer gives its filter matrix unchanged. Coupled layers are concatenated after
        dividing each member by the RMS of its weights, so that every weight value counts the
        same: a member's say in a similarity is proportional to its fan-in. (A depthwise conv's
        9 values per channel therefore cannot outvote its producer's 96; depthwise kernels are
        often near-identical shapes, which would otherwise make every channel look alike.)
        Neurons and heads: member i contributes each vertex's rows (axis 0) or columns (axis 1)
        of ``axes[i]``, flattened, scaled the same way: an FFN neuron is its row of up (and
        gate) and its column of down; a head its rows of q, k, v and its columns of o.
        """
        if self.unit != "channels":
            return self._unit_vectors()
        if len(self.members) == 1:
            return self.members[0].filters()
        parts = []
        for m in self.members:
            f = m.filters()
            rms = float(np.sqrt(np.mean(f * f)))
            parts.append(f / rms if rms > 0 else f)
        return np.concatenate(parts, axis=1)

    def _unit_vectors(self) -> np.ndarray:
        """Neurons/heads: written member by member into one array (peak: the result plus one
        member in float64), so that a large FFN costs about its vectors' size once."""
        n = self.n_filters
        widths = [int(m.weight.size) // n for m in self.members]
        out = np.empty((n, sum(widths)))
        start = 0
        for i, width in enumerate(widths):
            f = self._block(i)
            ss = float(np.einsum("ij,ij->", f, f))
            rms = float(np.sqrt(ss / f.size)) if f.size else 0.0
            np.divide(f, rms if rms > 0 else 1.0, out=out[:, start : start + width])
            start += width
        return out

    def _block(self, i: int) -> np.ndarray:
        """Member i as (vertices, entries): its rows or columns of each vertex (in every block),
        flattened."""
        m, (axis, per), b = self._parts()[i]
        n = self.n_filters
        w = as_float64(m.weight)
        if axis == 0:
            return w.reshape(b, n, -1).transpose(1, 0, 2).reshape(n, -1)
        return w.reshape(w.shape[0], b, n, per).transpose(2, 1, 0, 3).reshape(n, -1)
