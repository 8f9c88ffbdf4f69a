"""Validation for :func:`clients.layer_refit.refit`: do the pruned and the original model correspond
(module names, kinds, conv geometry, widths, kept outputs from the plan)? Nothing is changed."""

from __future__ import annotations

from collections.abc import Iterable

from torch import nn

from clients.errors import PlanMismatchError
from graphs.plan import PruningPlan

__all__ = ["CONVS", "in_width", "is_consumer", "out_width", "validate"]

CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def is_consumer(m: nn.Module) -> bool:
    if isinstance(m, CONVS):
        return int(m.groups) < int(m.in_channels)
    return isinstance(m, nn.Linear)


def kept_outputs(plan: PruningPlan | None) -> dict[str, list[int]]:
    """Producer module name → ORIGINAL indices of its kept output channels."""
    out: dict[str, list[int]] = {}
    for g in plan.groups if plan is not None else []:
        if g.unit != "channels":
            continue
        gone = set(g.remove)
        for p in g.producers:
            out[p] = [i for i in range(g.channels_before) if i not in gone]
    return out


def out_width(m: nn.Module) -> int:
    return int(m.out_channels if isinstance(m, CONVS) else m.out_features)  # type: ignore[arg-type]


def in_width(m: nn.Module) -> int:
    return int(m.in_channels if isinstance(m, CONVS) else m.in_features)  # type: ignore[arg-type]


def check_pair(name: str, p: nn.Module, o: nn.Module, kept: dict[str, list[int]]) -> None:
    if type(p) is not type(o):
        raise PlanMismatchError(
            f"refit: module {name!r} is a {type(p).__name__} in the pruned model but a "
            f"{type(o).__name__} in the original; pass the unpruned model the plan was applied to"
        )
    if isinstance(p, CONVS):
        for attr in ("kernel_size", "stride", "padding", "dilation", "padding_mode"):
            if getattr(p, attr) != getattr(o, attr):
                raise PlanMismatchError(
                    f"refit: conv {name!r} has {attr}={getattr(p, attr)} in the pruned model but "
                    f"{getattr(o, attr)} in the original; pass the unpruned model it came from"
                )
    if in_width(p) > in_width(o):
        raise PlanMismatchError(
            f"refit: {name!r} reads {in_width(p)} inputs in the pruned model but only "
            f"{in_width(o)} in the original; pass (pruned, original) in that order"
        )
    if out_width(p) != out_width(o):
        k = kept.get(name)
        if k is None:
            raise PlanMismatchError(
                f"refit: {name!r} has {out_width(p)} outputs in the pruned model but "
                f"{out_width(o)} in the original; pass plan= (the applied plan) so that its "
                "kept output channels are known"
            )
        if len(k) != out_width(p) or (k and k[-1] >= out_width(o)):
            raise PlanMismatchError(
                f"refit: the plan keeps {len(k)} of {name!r}'s outputs but the pruned model has "
                f"{out_width(p)} (original {out_width(o)}); pass the plan that was applied"
            )


def validate(
    pruned: nn.Module,
    original: nn.Module,
    plan: PruningPlan | None,
    layers: Iterable[str] | None,
) -> tuple[dict[str, nn.Module], dict[str, nn.Module], dict[str, list[int]], set[str]]:
    if pruned is original:
        raise PlanMismatchError("refit: pruned and original are the same object; prune a copy")
    pm = {n: m for n, m in pruned.named_modules() if is_consumer(m)}
    om = {n: m for n, m in original.named_modules() if is_consumer(m)}
    if set(pm) != set(om):
        only_p, only_o = sorted(set(pm) - set(om)), sorted(set(om) - set(pm))
        raise PlanMismatchError(
            f"refit: the models' conv/linear consumers differ (only in pruned: {only_p[:5]}, "
            f"only in original: {only_o[:5]}); pass the unpruned model the pruned one was made "
            "from (module names must match)"
        )
    kept = kept_outputs(plan)
    for name in pm:
        check_pair(name, pm[name], om[name], kept)
    wanted = set(pm) if layers is None else set(layers)
    unknown = sorted(wanted - set(pm))
    if unknown:
        raise PlanMismatchError(
            f"refit: layers {unknown[:5]} are not conv/linear consumers of the model; give names "
            "from model.named_modules()"
        )
    return pm, om, kept, wanted
