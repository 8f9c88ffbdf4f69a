"""Compensation on a live model: fold removed channels into the kept ones (issue 14, design §8).

A plan that carries :class:`graphs.fold.Compensation` lists, per pruned group and channel-mixing
consumer, a fold ``X_R ≈ X_K Bᵀ + 1 bᵀ`` whose matrices are in a sidecar file pinned by sha256.
:func:`check_compensation` validates everything against the live model before any weight
changes (sidecar present and unmodified, every fold's consumer, parameter names, widths and
matrix shapes, grouped convs' block structure); :func:`apply_folds` then rewrites each
consumer's weight and bias with :func:`graphs.fold.fold_weight` (k×k convs tap by tap, a linear
after a flatten per position, a bias created where there is none). The channels are removed
afterwards, as without compensation, by their ORIGINAL indices.

:func:`least_squares_folds` computes the folds of one group from captured statistics (used by
:func:`clients.sensitivity`); :func:`recalibrate_batchnorm` re-estimates BN statistics.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from clients.errors import PlanMismatchError
from clients.gram import input_width, is_mixing_consumer
from graphs.errors import InvalidInputError
from graphs.fold import (
    SIDECAR_SUFFIX,
    ConsumerFold,
    decode_sidecar,
    encode_sidecar,
    fold_weight,
    sidecar_sha256,
)
from graphs.manifest import ChannelGroup
from graphs.plan import PruningPlan

__all__ = [
    "Fold",
    "SidecarSource",
    "apply_folds",
    "check_compensation",
    "consumer_models",
    "group_consumers",
    "least_squares_folds",
    "recalibrate_batchnorm",
]

SidecarSource = str | Path | bytes | Mapping[str, np.ndarray] | None
_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_GROUP_TOLERANCE = 1e-12  # |B| entries allowed between different conv groups (relative)


@dataclass(frozen=True)
class Fold:
    """One checked fold, ready to apply: the consumer module, its indices and B (|R|, |K|),
    b (|R|,) as float64."""

    consumer: str
    kept: list[int]
    removed: list[int]
    matrix: np.ndarray
    shift: np.ndarray
    per_channel: int = 1


# -- applying ------------------------------------------------------------------------------


def _groups(module: nn.Module) -> int:
    return int(module.groups) if isinstance(module, _CONVS) else 1


@torch.no_grad()
def fold_module(module: nn.Module, fold: Fold) -> None:
    """Rewrite ``module``'s weight and bias in place (float64 math, written back in the
    parameter's dtype); a bias is created when the module has none."""
    weight = module.weight
    bias = module.bias
    assert isinstance(weight, torch.Tensor) and (bias is None or isinstance(bias, torch.Tensor))
    w, b = fold_weight(
        weight.detach().cpu().double().numpy(),
        None if bias is None else bias.detach().cpu().double().numpy(),
        kept=fold.kept,
        removed=fold.removed,
        matrix=fold.matrix,
        shift=fold.shift,
        per_channel=fold.per_channel,
        groups=_groups(module),
    )
    weight.copy_(torch.from_numpy(w).to(weight.dtype))
    new_bias = torch.from_numpy(b).to(device=weight.device, dtype=weight.dtype)
    if bias is None:
        module.bias = nn.Parameter(new_bias, requires_grad=weight.requires_grad)
    else:
        bias.copy_(new_bias)


def apply_folds(model: nn.Module, folds: Iterable[Fold]) -> None:
    """Apply checked folds (from :func:`check_compensation`) to ``model`` in place."""
    modules = dict(model.named_modules())
    for fold in folds:
        fold_module(modules[fold.consumer], fold)


# -- validation ----------------------------------------------------------------------------


def _sidecar_bytes(source: SidecarSource, given: object) -> tuple[bytes, str]:
    """The sidecar's bytes and how to name it in errors. Without ``source``: the sidecar a
    freshly made plan object carries, or the file next to a plan given as a path."""
    from graphs.compensated import plan_sidecar, sidecar_path

    if source is None and isinstance(given, PruningPlan):
        try:
            return plan_sidecar(given), "the plan's own sidecar"
        except InvalidInputError:
            pass  # loaded from JSON: the sidecar must be given
    if source is None:
        if not isinstance(given, str | Path):
            raise PlanMismatchError(
                "the plan carries compensation but no sidecar was given; pass "
                f"compensation=<the {SIDECAR_SUFFIX} file written next to the plan> (or its "
                "bytes), or pass the plan as a path with the sidecar next to it"
            )
        source = sidecar_path(given)
    if isinstance(source, Mapping):
        try:
            return encode_sidecar(source), "the given fold arrays"
        except InvalidInputError as exc:
            raise PlanMismatchError(f"the given fold arrays are not usable: {exc}") from exc
    if isinstance(source, bytes):
        return source, "the given sidecar bytes"
    path = Path(source)
    try:
        return path.read_bytes(), str(path)
    except OSError as exc:
        raise PlanMismatchError(
            f"the plan carries compensation, but its sidecar {path} cannot be read "
            f"({exc.strerror or exc}); keep the .fold.safetensors file next to the plan, or "
            "pass compensation=<its path>"
        ) from exc


def _arrays(data: bytes, name: str, plan: PruningPlan) -> dict[str, np.ndarray]:
    comp = plan.compensation
    assert comp is not None
    digest = sidecar_sha256(data)
    if digest != comp.sidecar_sha256 or len(data) != comp.sidecar_bytes:
        raise PlanMismatchError(
            f"the sidecar {name} (sha256 {digest[:12]}…, {len(data)} bytes) is not the one the "
            f"plan pins (sha256 {comp.sidecar_sha256[:12]}…, {comp.sidecar_bytes} bytes); use "
            "the .fold.safetensors file written with this plan, unmodified"
        )
    try:
        return decode_sidecar(data)
    except InvalidInputError as exc:  # pinned bytes that do not decode: a broken writer
        raise PlanMismatchError(f"the sidecar {name} cannot be read: {exc}") from exc


def _check_consumer(f: ConsumerFold, modules: dict[str, nn.Module], params: set[str]) -> str:
    """Problems of one fold's consumer in this model ('' when none)."""
    module = modules.get(f.consumer)
    if module is None or not is_mixing_consumer(module):
        what = "is not a module" if module is None else f"is a {type(module).__name__}"
        return f"its consumer {f.consumer!r} {what} of this model (expected a conv/linear)"
    if f.weight != f"{f.consumer}.weight" or f.weight not in params:
        return f"its weight {f.weight!r} is not {f.consumer!r}'s weight"
    has_bias = getattr(module, "bias", None) is not None
    if f.bias is None and has_bias:
        return f"it says {f.consumer!r} has no bias, but it has one here"
    if f.bias is not None and (f.bias != f"{f.consumer}.bias" or f.bias not in params):
        return f"its bias {f.bias!r} is not a parameter of {f.consumer!r} here"
    width = input_width(module)
    channels = len(f.kept) + len(f.removed)
    if width != channels * f.per_channel:
        return (
            f"{f.consumer!r} reads {width} inputs here, the fold {channels} channels × "
            f"{f.per_channel}"
        )
    return ""


def _check_blocks(f: ConsumerFold, module: nn.Module, B: np.ndarray) -> str:
    """A grouped conv: kept channels may only stand in for removed ones of the same group."""
    groups = _groups(module)
    if groups == 1 or B.size == 0:
        return ""
    per = input_width(module) // groups
    rg = np.asarray(f.removed)[:, None] // per
    kg = np.asarray(f.kept)[None, :] // per
    cross = np.abs(np.where(rg != kg, B, 0.0)).max()
    if cross > _GROUP_TOLERANCE * max(float(np.abs(B).max()), 1.0):
        return f"its matrix mixes channels of different conv groups of {f.consumer!r}"
    return ""


def check_compensation(
    model: nn.Module,
    plan: PruningPlan,
    sidecar: SidecarSource = None,
    *,
    given: object = None,
) -> list[Fold]:
    """Every fold of ``plan`` checked against ``model`` and its sidecar; nothing is changed.

    ``given`` is the plan as the caller passed it: a plan object made with its sidecar in
    memory (``graphs.compensated.compensate``) or a path with the sidecar next to it provide the
    sidecar when ``sidecar`` is None.

    Raises:
        PlanMismatchError: sidecar missing, modified or malformed; a fold that does not fit the
            model (consumer, parameters, widths, matrix shapes, conv groups).
    """
    comp = plan.compensation
    if comp is None:
        return []
    data, name = _sidecar_bytes(sidecar, given)
    arrays = _arrays(data, name, plan)
    modules = dict(model.named_modules())
    params = {n for n, _ in model.named_parameters()}
    out: list[Fold] = []
    for f in comp.folds:
        where = f"fold of plan group {f.group} at {f.consumer!r}"
        problem = _check_consumer(f, modules, params)
        if not problem:
            B, b = arrays.get(f.matrix), arrays.get(f.shift)
            shape_b, shape_s = (len(f.removed), len(f.kept)), (len(f.removed),)
            if B is None or b is None:
                problem = f"the sidecar lacks {f.matrix if B is None else f.shift!r}"
            elif B.shape != shape_b or b.shape != shape_s:
                problem = (
                    f"the sidecar's matrix/shift have shapes {list(B.shape)}/{list(b.shape)}, "
                    f"not {list(shape_b)}/{list(shape_s)}"
                )
            elif not (np.isfinite(B).all() and np.isfinite(b).all()):
                problem = "the sidecar's matrix or shift hold NaN or Inf"
            else:
                problem = _check_blocks(f, modules[f.consumer], B)
        if problem:
            raise PlanMismatchError(
                f"{where}: {problem}; the plan was made for another model (or its sidecar was "
                "changed): plan again for this model"
            )
        out.append(Fold(f.consumer, f.kept, f.removed, B, b, f.per_channel))  # type: ignore[arg-type]
    return out


# -- folds from statistics -----------------------------------------------------------------


def group_consumers(group: ChannelGroup, modules: Mapping[str, nn.Module]) -> list[tuple[str, int]]:
    """(module name, per_channel) of every channel-mixing consumer reading ``group``'s channels
    (axis 1 of a conv/linear weight in the group's parameters)."""
    out = []
    for pa in group.params:
        if pa.axis != 1 or not pa.param.endswith(".weight") or pa.blocks != 1:
            continue
        name = pa.param[: -len(".weight")]
        module = modules.get(name)
        if module is not None and is_mixing_consumer(module):
            out.append((name, pa.per_channel))
    return out


def _gram(s: Any) -> np.ndarray:
    if isinstance(s, torch.Tensor):
        return s.detach().cpu().double().numpy()
    return np.asarray(s, dtype=np.float64)


def consumer_models(
    model: nn.Module, group: ChannelGroup, stats: Mapping[str, Any]
) -> list[tuple[str, int, Any]]:
    """(module name, per_channel, :class:`graphs.functional.Consumer`) of every mixing consumer
    of ``group``, from captured statistics (module name -> S (c + 1, c + 1), numpy or torch).

    Raises:
        ValueError: a consumer without statistics.
    """
    from graphs.consumers import Consumer, ConsumerStats, channel_gram, dense_weight

    modules = dict(model.named_modules())
    out = []
    for name, per_channel in group_consumers(group, modules):
        if name not in stats:
            raise ValueError(
                f"no statistics for {name!r}, a consumer of group {group.id}: capture them with "
                "clients.capture_activations(model, batches) (statistics=True)"
            )
        module = modules[name]
        weight = module.weight.detach().cpu().double().numpy()
        groups = _groups(module)
        consumer = Consumer(
            name,
            ConsumerStats(channel_gram(_gram(stats[name]), per_channel)),
            dense_weight(weight, per_channel=per_channel, groups=groups),
            groups=groups,
        )
        out.append((name, per_channel, consumer))
    return out


def least_squares_folds(
    model: nn.Module,
    group: ChannelGroup,
    removed: list[int],
    stats: Mapping[str, Any],
) -> list[Fold]:
    """The least-squares folds of every mixing consumer of ``group`` when ``removed`` channels
    go (:func:`graphs.functional.least_squares_fold` on the captured statistics).

    Raises:
        ValueError: a consumer without statistics.
    """
    from graphs.functional import least_squares_fold

    gone = sorted(removed)
    kept = sorted(set(range(group.channels)) - set(gone))
    folds = []
    for name, per_channel, consumer in consumer_models(model, group, stats):
        B, b, _ = least_squares_fold(consumer, kept, gone)
        folds.append(Fold(name, kept, gone, B, b, per_channel))
    return folds


# -- BN recalibration ----------------------------------------------------------------------


def _inputs(batch: object) -> tuple[torch.Tensor, ...]:
    if isinstance(batch, torch.Tensor):
        return (batch,)
    if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], torch.Tensor):
        return (batch[0],)  # (inputs, labels) from a DataLoader
    raise TypeError(
        f"each recalibration batch must be a tensor or an (inputs, labels) pair; got "
        f"{type(batch).__name__}"
    )


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, batches: Iterable[object]) -> int:
    """Re-estimate every BatchNorm's running statistics on ``batches`` (reset, cumulative
    average with momentum None, BN layers alone in train mode); returns the samples seen. The
    modules' training flags and momenta are restored afterwards."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    it = iter(batches)
    first = next(it, None)
    if first is None:
        raise ValueError("recalibrate needs at least one batch (an empty iterable was given)")
    flags = {m: m.training for m in model.modules()}
    momenta = [(bn, bn.momentum) for bn in norms]
    seen = 0
    try:
        model.eval()
        for bn in norms:
            if bn.track_running_stats:
                bn.reset_running_stats()
                bn.momentum = None
                bn.train()
        for batch in itertools.chain([first], it):
            x = _inputs(batch)
            model(*x)
            seen += int(x[0].shape[0])
    finally:
        for m, flag in flags.items():
            m.train(flag)
        for bn, momentum in momenta:
            bn.momentum = momentum
    return seen
