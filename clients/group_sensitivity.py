"""Sensitivity analysis, the ground truth of redundancy (issue 14 point 8, design §8).

:func:`sensitivity` prunes one channel group at a time, on a deep copy of the model, at several
fractions, with and without least-squares compensation, and measures the user's metric each
time (like NNI's ``SensitivityAnalysis``, per coupled group instead of per layer). The result
is a :class:`SensitivityTable`: one row per (group, fraction, compensated) with the metric and
its change from the unpruned model, as CSV or JSON::

    table = clients.sensitivity(model, torch.zeros(1, 3, 224, 224), evaluate,
                                stats=capture_activations(model, calib, maps=False))
    Path("sensitivity.csv").write_text(table.to_csv())

Which channels a fraction removes is set by ``order``: ``l1`` (smallest L1 norm of the
producers' filters first, each producer's norms scaled to mean 1), ``random`` (seeded), or
``functional`` (the greedy least-error path of :func:`graphs.functional.error_curve`, needs
``stats``). The same channels are removed with and without compensation, so the two rows of a
fraction differ only by the fold.
"""

from __future__ import annotations

import copy
import csv
import io
import json
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import numpy as np
import torch_pruning as tp
from torch import nn

from clients.fold import apply_folds, consumer_models, least_squares_folds
from clients.gram import is_mixing_consumer
from clients.manifest import build_manifest
from clients.tracing import ExampleInputs, trace_model
from graphs.manifest import ChannelGroup, Manifest

__all__ = ["SensitivityRow", "SensitivityTable", "sensitivity"]

Order = Literal["l1", "random", "functional"]
_COLUMNS = (
    "group", "name", "producers", "channels", "fraction", "removed", "compensated", "metric",
    "delta",
)  # fmt: skip


@dataclass(frozen=True)
class SensitivityRow:
    """The metric after pruning ``removed`` of the group's ``channels`` (``fraction`` asked)."""

    group: int
    name: str
    producers: tuple[str, ...]
    channels: int
    fraction: float
    removed: int
    compensated: bool
    metric: float
    delta: float


@dataclass(frozen=True)
class SensitivityTable:
    """Rows in (group, fraction, compensated) order; ``baseline`` is the unpruned metric and
    ``skipped`` says, per group id, which measurements were left out and why."""

    baseline: float
    rows: tuple[SensitivityRow, ...]
    order: str = "l1"
    seed: int = 0
    skipped: dict[int, str] = field(default_factory=dict)

    def to_csv(self) -> str:
        """One line per row; producers joined by ``;``."""
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(_COLUMNS)
        for r in self.rows:
            values = asdict(r)
            values["producers"] = ";".join(r.producers)
            values["compensated"] = str(r.compensated).lower()
            writer.writerow([_text(values[c]) for c in _COLUMNS])
        return buf.getvalue()

    @classmethod
    def from_csv(cls, text: str) -> SensitivityTable:
        """Read :meth:`to_csv` back (baseline = metric − delta; order and seed are not in CSV)."""
        rows = []
        for rec in csv.DictReader(io.StringIO(text)):
            rows.append(
                SensitivityRow(
                    group=int(rec["group"]),
                    name=rec["name"],
                    producers=tuple(p for p in rec["producers"].split(";") if p),
                    channels=int(rec["channels"]),
                    fraction=float(rec["fraction"]),
                    removed=int(rec["removed"]),
                    compensated=rec["compensated"] == "true",
                    metric=float(rec["metric"]),
                    delta=float(rec["delta"]),
                )
            )
        baseline = rows[0].metric - rows[0].delta if rows else math.nan
        return cls(baseline=baseline, rows=tuple(rows))

    def to_json(self, *, indent: int | None = 2) -> str:
        data = {
            "baseline": self.baseline,
            "order": self.order,
            "seed": self.seed,
            "skipped": {str(k): v for k, v in sorted(self.skipped.items())},
            "rows": [{**asdict(r), "producers": list(r.producers)} for r in self.rows],
        }
        return json.dumps(data, indent=indent)

    @classmethod
    def from_json(cls, text: str) -> SensitivityTable:
        data = json.loads(text)
        rows = tuple(
            SensitivityRow(**{**r, "producers": tuple(r["producers"])}) for r in data["rows"]
        )
        skipped = {int(k): str(v) for k, v in data.get("skipped", {}).items()}
        return cls(data["baseline"], rows, data["order"], data["seed"], skipped)

    def curve(self, group: int, *, compensated: bool) -> list[tuple[float, float]]:
        """(fraction, delta) of one group, in fraction order."""
        return [
            (r.fraction, r.delta)
            for r in self.rows
            if r.group == group and r.compensated == compensated
        ]


def _text(v: object) -> str:
    return repr(v) if isinstance(v, float) else str(v)


def _stats_of(stats: Any) -> Mapping[str, Any] | None:
    if stats is None:
        return None
    if hasattr(stats, "stats") and callable(stats.stats):  # clients.Activations
        return dict(stats.stats())
    if isinstance(stats, Mapping):
        return stats
    raise TypeError(
        "stats must be a mapping module name -> S or the result of capture_activations, not "
        f"{type(stats).__name__}"
    )


def _l1_order(model: nn.Module, group: ChannelGroup) -> np.ndarray:
    """Channels by the sum over producers of their filters' L1 norms (each scaled to mean 1)."""
    modules = dict(model.named_modules())
    score = np.zeros(group.channels)
    for name in group.producers:
        w = modules[name].weight.detach().cpu().double()
        norms = w.abs().reshape(w.shape[0], -1).sum(dim=1).numpy()
        if norms.shape[0] == group.channels and norms.mean() > 0:
            score += norms / norms.mean()
    return np.argsort(score, kind="stable")


def _order(
    model: nn.Module,
    group: ChannelGroup,
    order: Order,
    stats: Mapping[str, Any] | None,
    most: int,
    seed: int,
) -> np.ndarray:
    if order == "l1":
        return _l1_order(model, group)
    if order == "random":
        return np.random.default_rng([seed, group.id]).permutation(group.channels)
    from graphs.functional import error_curve

    assert stats is not None
    consumers = [c for _, _, c in consumer_models(model, group, stats)]
    if not consumers:  # nothing reads the channels through a conv/linear: no error to rank by
        return _l1_order(model, group)
    return np.asarray(error_curve(consumers, max_remove=most).order)


def _unfoldable(model: nn.Module, group: ChannelGroup) -> list[str]:
    """Modules that read the group's channels (input axis) but cannot take a fold."""
    modules = dict(model.named_modules())
    out = []
    for pa in group.params:
        if pa.axis != 1 or not pa.param.endswith(".weight"):
            continue
        name = pa.param[: -len(".weight")]
        module = modules.get(name)
        if module is not None and (not is_mixing_consumer(module) or pa.blocks != 1):
            out.append(f"{name} ({type(module).__name__})")
    return out


def _prune(model: nn.Module, example_inputs: ExampleInputs, root: str, remove: list[int]) -> None:
    traced = trace_model(model, example_inputs)
    module = dict(model.named_modules())[root]
    fn = (
        tp.prune_linear_out_channels
        if isinstance(module, nn.Linear)
        else tp.prune_conv_out_channels
    )
    traced.dg.get_pruning_group(module, fn, idxs=remove).prune()


def _check(fractions: Sequence[float], compensation: Sequence[bool], order: str) -> None:
    if not fractions or any(not (0 < f < 1) for f in fractions):
        raise ValueError(f"fractions must be in (0, 1), e.g. (0.1, 0.25, 0.5); got {fractions}")
    if not compensation or any(not isinstance(c, bool) for c in compensation):
        raise ValueError(
            f"compensation is a tuple of booleans, e.g. (False, True); got {compensation}"
        )
    if order not in ("l1", "random", "functional"):
        raise ValueError(f"order must be 'l1', 'random' or 'functional', not {order!r}")


def sensitivity(
    model: nn.Module,
    example_inputs: ExampleInputs,
    evaluate: Callable[[nn.Module], float],
    *,
    manifest: Manifest | None = None,
    fractions: Sequence[float] = (0.1, 0.25, 0.5),
    compensation: Sequence[bool] = (False, True),
    stats: Any = None,
    order: Order = "l1",
    seed: int = 0,
    groups: Iterable[int] | None = None,
) -> SensitivityTable:
    """Prune each channel group alone at each fraction and measure ``evaluate``.

    Args:
        model: the unpruned model (never changed: every measurement prunes a deep copy).
        example_inputs: inputs that trace the model (batch first), as for ``build_manifest``.
        evaluate: ``evaluate(model) -> float``, the metric (e.g. accuracy on held-out data).
        manifest: the model's manifest (built from ``example_inputs`` when None); its prunable
            channel groups are measured.
        fractions: fractions of a group's channels to remove (rounded, at least 1, at most all
            but one).
        compensation: which variants to measure; True folds the removed channels into the kept
            ones at every consumer by least squares (needs ``stats``).
        stats: module name -> S from ``capture_activations(...).stats()`` (or the Activations).
        order: which channels go first: ``l1``, ``random`` (seeded) or ``functional``.
        seed: seed of ``random``.
        groups: only these group ids (default: every prunable channel group).

    Raises:
        ValueError: bad options, or compensation/functional order without statistics.
    """
    _check(fractions, compensation, order)
    table_stats = _stats_of(stats)
    if table_stats is None and (any(compensation) or order == "functional"):
        raise ValueError(
            "compensation and order='functional' need stats: pass "
            "stats=capture_activations(model, batches, maps=False)"
        )
    manifest = manifest or build_manifest(model, example_inputs)
    wanted = None if groups is None else set(groups)
    chosen = [
        g for g in manifest.groups
        if g.prunable and g.unit == "channels" and g.channels >= 2
        and (wanted is None or g.id in wanted)
    ]  # fmt: skip
    baseline = float(evaluate(model))
    rows: list[SensitivityRow] = []
    skipped: dict[int, str] = {}
    for group in chosen:
        counts = [min(group.channels - 1, max(1, round(f * group.channels))) for f in fractions]
        ranked = _order(model, group, order, table_stats, max(counts), seed)
        blocked = _unfoldable(model, group)
        if blocked and any(compensation):
            skipped[group.id] = f"not compensated: {', '.join(blocked)} cannot take a fold"
        measured: dict[tuple[int, bool], float] = {}
        for fraction, k in zip(fractions, counts, strict=True):
            remove = sorted(int(i) for i in ranked[:k])
            for comp in compensation:
                if comp and blocked:
                    continue
                if (k, comp) not in measured:
                    pruned = copy.deepcopy(model)
                    if comp:
                        assert table_stats is not None
                        apply_folds(pruned, least_squares_folds(pruned, group, remove, table_stats))
                    _prune(pruned, example_inputs, group.producers[0], remove)
                    measured[k, comp] = float(evaluate(pruned))
                metric = measured[k, comp]
                row = SensitivityRow(
                    group=group.id,
                    name=group.producers[0],
                    producers=tuple(group.producers),
                    channels=group.channels,
                    fraction=float(fraction),
                    removed=k,
                    compensated=comp,
                    metric=metric,
                    delta=metric - baseline,
                )
                rows.append(row)
    return SensitivityTable(baseline, tuple(rows), order, seed, skipped)
