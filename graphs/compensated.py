"""Compensated plans: every pruned group's consumers take over the removed channels (design §8).

Given the second moments of the consumers' inputs (``stats``: consumer module name → S, as
``clients.capture_activations`` records them under ``gram/<name>``), :func:`group_consumers`
finds, from the manifest, every channel-mixing consumer of every group: the conv/linear
weights that lose entries on axis 1 when a channel goes (a depthwise conv shrinks on axis 0 and
is not a mixing consumer; a linear after a flatten has ``per_channel`` entries per channel).
:func:`compensate` then adds to a plan, for each pruned group and each of its consumers, the
least-squares fold (:mod:`graphs.functional`) and its predicted error; the fold matrices go to a
sidecar (:mod:`graphs.fold`) whose bytes travel with the returned plan (:func:`plan_sidecar`,
:func:`save_plan`) and that the plan pins by sha256. Every method gets the same compensation,
so comparisons isolate the choice of the removed channels.

:func:`stat_features` turns the same statistics into the feature maps the graph methods compare
(Pearson correlations at the consumer inputs, through the exact embedding of
:func:`graphs.features.activation_vectors`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from graphs.consumers import Consumer, ConsumerStats, channel_gram, dense_weight
from graphs.errors import InvalidInputError
from graphs.fold import (
    SIDECAR_SUFFIX,
    Compensation,
    ConsumerFold,
    encode_sidecar,
    fold_keys,
    sidecar_sha256,
)
from graphs.functional import ErrorCurve, error_curve, least_squares_fold
from graphs.layers import LayerWeights
from graphs.manifest import Manifest
from graphs.options import DEFAULT_RIDGE
from graphs.plan import PruningPlan

_HINT = (
    "Capture the statistics with clients.capture_activations from the model this checkpoint "
    "belongs to (every conv/linear consumer gets gram/<module name>)."
)


@dataclass(frozen=True)
class ConsumerSpec:
    """A channel-mixing consumer of one group, with its statistics at channel level."""

    group: int
    consumer: str
    weight: str
    bias: str | None
    per_channel: int
    data: Consumer


@dataclass(frozen=True)
class GroupConsumers:
    """Per group id its consumers with statistics, and consumers that had none (name list)."""

    consumers: dict[int, list[ConsumerSpec]]
    missing: dict[int, list[str]]

    def curves(
        self,
        ids: Iterable[int],
        *,
        ridge: float = DEFAULT_RIDGE,
        max_ratio: float = 1.0,
        stop_above: float | None = None,
    ) -> dict[int, ErrorCurve]:
        """The error curve of every listed group that has consumers with statistics (up to
        ``max_ratio`` of its channels, or the first error above ``stop_above``). One thread:
        the greedy steps hold the GIL, so threads only slowed them (cross-fitting, whose
        matrix products do not, runs beside them: :func:`graphs.crossfit.crossfit_curves`)."""
        out: dict[int, ErrorCurve] = {}
        for gid in ids:
            specs = self.consumers.get(gid)
            if specs:
                c = specs[0].data.stats.channels
                steps = min(c - 1, int(np.floor(max_ratio * c)))
                out[gid] = error_curve(
                    [s.data for s in specs], ridge=ridge, max_remove=steps, stop_above=stop_above
                )
        return out


def curve_workers() -> int:
    """Threads for computing error curves side by side: the BLAS threads this process may use
    now (the service limits them per worker; 1 when unknown). Read it before planning drops BLAS
    to one thread per curve."""
    from threadpoolctl import threadpool_info

    n = [int(i.get("num_threads") or 1) for i in threadpool_info() if i.get("user_api") == "blas"]
    return max(1, min(n)) if n else 1


def group_consumers(
    layers: Iterable[LayerWeights], manifest: Manifest, stats: Mapping[str, np.ndarray]
) -> GroupConsumers:
    """Every prunable group's channel-mixing consumers that have statistics.

    Args:
        layers: the checkpoint's conv/linear layers (``name`` = module name, weight as stored).
        manifest: the model's manifest (which parameters shrink with each group).
        stats: consumer module name → S, shape (F+1, F+1) with F the consumer's input width
            (F = C·H·W for a linear after a flatten), constant column last.

    Raises:
        InvalidInputError: a Gram of the wrong size, or statistics naming no consumer.
    """
    by_name = {layer.name: layer for layer in layers}
    known: set[str] = set()
    consumers: dict[int, list[ConsumerSpec]] = {}
    missing: dict[int, list[str]] = {}
    for g in manifest.groups:
        for pa in g.params:
            name = pa.param.removesuffix(".weight")
            layer = by_name.get(name)
            if pa.axis != 1 or not pa.param.endswith(".weight") or layer is None:
                continue
            if layer.is_depthwise:
                continue
            known.add(name)
            if not g.prunable:
                continue
            if name not in stats:
                missing.setdefault(g.id, []).append(name)
                continue
            consumers.setdefault(g.id, []).append(_spec(g.id, g.channels, pa.per_channel, layer,
                                                        stats[name], manifest))  # fmt: skip
    unknown = sorted(set(stats) - known - set(by_name))
    if unknown:
        raise InvalidInputError(
            f"statistics for {unknown[0]!r}, which is no conv/linear layer of the checkpoint",
            hint=_HINT,
        )
    return GroupConsumers(consumers, missing)


def _spec(
    gid: int,
    channels: int,
    per_channel: int,
    layer: LayerWeights,
    gram: np.ndarray,
    manifest: Manifest,
) -> ConsumerSpec:
    S = np.asarray(gram, dtype=np.float64)
    width = layer.shape[1] * layer.groups if layer.kind != "linear" else layer.shape[1]
    if S.shape != (width + 1, width + 1):
        raise InvalidInputError(
            f"the statistics of {layer.name} have shape {S.shape}; its input has {width} "
            f"entries, so S must be ({width + 1}, {width + 1})",
            hint=_HINT,
        )
    if width != channels * per_channel:
        raise InvalidInputError(
            f"{layer.name} reads {width} inputs, not the {channels} × {per_channel} of group "
            f"{gid} (concatenated inputs cannot be compensated yet)",
            hint="Plan without statistics for this model, or pass --no-compensation.",
        )
    stats = ConsumerStats(channel_gram(S, per_channel))
    w = dense_weight(layer.weight, per_channel=per_channel, groups=layer.groups)
    bias = f"{layer.name}.bias"
    return ConsumerSpec(
        group=gid,
        consumer=layer.name,
        weight=f"{layer.name}.weight",
        bias=bias if bias in manifest.param_shapes else None,
        per_channel=per_channel,
        data=Consumer(layer.name, stats, w, groups=layer.groups),
    )


class _Attached:
    """The sidecar bytes riding along with a plan object. Always equal: the plan's fields pin
    the bytes by sha256, so two plans with equal fields have the same sidecar."""

    def __init__(self, data: bytes) -> None:
        self.data = data

    def __eq__(self, other: object) -> bool:
        return True

    __hash__ = None  # type: ignore[assignment]


def compensate(
    plan: PruningPlan,
    consumers: GroupConsumers,
    *,
    ridge: float = DEFAULT_RIDGE,
    curves: Mapping[int, ErrorCurve] | None = None,
    epsilon: float | None = None,
) -> PruningPlan:
    """``plan`` with least-squares folds for every pruned group's consumers.

    Every group's ``predicted_error`` is set (0 for groups that lose nothing), and its
    ``functional_redundancy`` when ``curves`` and ``epsilon`` are given. The returned plan
    carries its sidecar's bytes: :func:`plan_sidecar`, :func:`save_plan`.
    """
    folds: list[ConsumerFold] = []
    arrays: dict[str, np.ndarray] = {}
    groups = []
    for g in plan.groups:
        specs = consumers.consumers.get(g.id, [])
        removed = list(g.remove)
        gone = set(removed)
        kept = [i for i in range(g.channels_before) if i not in gone]
        total = 0.0
        for s in specs if removed else []:
            B, b, err = least_squares_fold(s.data, kept, removed, ridge=ridge)
            mkey, skey = fold_keys(g.id, s.consumer)
            arrays[mkey], arrays[skey] = B, b
            total += err
            folds.append(
                ConsumerFold(
                    group=g.id,
                    consumer=s.consumer,
                    weight=s.weight,
                    bias=s.bias,
                    per_channel=s.per_channel,
                    kept=kept,
                    removed=removed,
                    matrix=mkey,
                    shift=skey,
                    predicted_error=round(err, 9),
                    kind="least_squares" if B.any() else "mean",
                )
            )
        update: dict[str, float | None] = {}
        if specs:
            update["predicted_error"] = round(total, 9)
        if curves is not None and epsilon is not None and g.id in curves:
            update["functional_redundancy"] = round(curves[g.id].redundancy(epsilon), 6)
        groups.append(g.model_copy(update=update))
    data = encode_sidecar(arrays)
    comp = Compensation(sidecar_sha256=sidecar_sha256(data), sidecar_bytes=len(data), folds=folds)
    fields = {**plan.model_dump(), "groups": [g.model_dump() for g in groups]}
    out = PruningPlan.model_validate({**fields, "compensation": comp.model_dump()})
    out._sidecar = _Attached(data)
    return out


def plan_sidecar(plan: PruningPlan) -> bytes:
    """The sidecar bytes of a plan made by :func:`compensate` (b"" for plans without folds).

    Raises:
        InvalidInputError: the plan has compensation but was loaded from JSON (read its
            ``.fold.safetensors`` file instead).
    """
    if plan.compensation is None:
        return b""
    att = plan._sidecar
    if not isinstance(att, _Attached):
        raise InvalidInputError(
            "this plan's sidecar is not in memory",
            hint=f"Read the {SIDECAR_SUFFIX} file written next to the plan.",
        )
    return att.data


def attach_sidecar(plan: PruningPlan, data: bytes) -> PruningPlan:
    """``plan`` (e.g. loaded from JSON) carrying its sidecar's bytes, as :func:`compensate`
    returns it: :func:`plan_sidecar` and ``clients.apply_plan`` then find them.

    Raises:
        InvalidInputError: the plan has no compensation, or ``data`` is not the sidecar it pins.
    """
    comp = plan.compensation
    if comp is None:
        raise InvalidInputError(
            "the plan carries no compensation", hint="Only a compensated plan has a sidecar."
        )
    if len(data) != comp.sidecar_bytes or sidecar_sha256(data) != comp.sidecar_sha256:
        raise InvalidInputError(
            f"the sidecar ({len(data)} bytes, sha256 {sidecar_sha256(data)[:12]}…) is not the "
            f"one the plan pins ({comp.sidecar_bytes} bytes, sha256 {comp.sidecar_sha256[:12]}…)",
            hint="Fetch the sidecar of this very plan again.",
        )
    out = plan.model_copy()
    out._sidecar = _Attached(data)
    return out


def sidecar_path(plan_path: str | Path) -> Path:
    """``plan.json`` → ``plan.fold.safetensors`` (next to the plan)."""
    p = Path(plan_path)
    return p.with_name(p.name.removesuffix(".json") + SIDECAR_SUFFIX)


def save_plan(plan: PruningPlan, path: str | Path) -> Path | None:
    """Write the plan's JSON to ``path`` and, when it has folds, its sidecar next to it.
    Returns the sidecar's path (None without compensation)."""
    p = Path(path)
    p.write_text(plan.to_json() + "\n")
    if plan.compensation is None:
        return None
    side = sidecar_path(p)
    side.write_bytes(plan_sidecar(plan))
    return side


def _factor(cov: np.ndarray) -> np.ndarray:
    """V (c, c) with V Vᵀ = cov: Cholesky of the varying channels (constant ones: zero rows,
    as activation_vectors expects of dead channels), eigh when that fails."""
    var = np.diag(cov)
    live = np.flatnonzero(var > 1e-12 * max(float(var.max()), 1e-300))
    V = np.zeros_like(cov)
    sub = cov[np.ix_(live, live)]
    try:
        V[np.ix_(live, live)] = np.linalg.cholesky(sub)
    except np.linalg.LinAlgError:
        lam, Q = np.linalg.eigh(sub)
        V[np.ix_(live, live)] = Q * np.sqrt(np.clip(lam, 0.0, None))[None, :]
    return V


def stat_features(specs: list[ConsumerSpec]) -> np.ndarray:
    """Pseudo feature maps (1, c, 2c·m) of a group whose centred Gram is the sum of its m
    consumers' input covariances (each scaled to unit mean variance): what
    :func:`graphs.features.activation_vectors` embeds, so the graph methods compare the
    channels' Pearson correlations at the consumer inputs."""
    parts = []
    for s in specs:
        _, cov = s.data.stats.moments()
        V = _factor(cov)
        mean_var = float(np.trace(cov)) / cov.shape[0]
        V = V / np.sqrt(mean_var) if mean_var > 0 else V
        parts.extend([V, -V])  # zero mean per channel: the centring leaves the Gram as it is
    return np.concatenate(parts, axis=1)[None]
