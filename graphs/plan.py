"""The pruning plan: a versioned, frozen, replayable record of which channels to remove.

Like torch-pruning's pruning history, a plan lists per channel group the ORIGINAL indices to
remove; replaying it on the unpruned model (``clients.apply_plan``) gives the pruned model.
JSON from :meth:`PruningPlan.to_json` is byte-identical for the same input, config and seed.
"""

from __future__ import annotations

from typing import Literal, get_args

from pydantic import Field, PrivateAttr, model_validator

from graphs._frozen import Frozen
from graphs.fold import Compensation
from graphs.manifest import Heads, ParamAxis, Unit

PLAN_VERSION = "1.0"
PlanMethod = Literal["mrp", "srr", "hsc", "l1", "fpgm", "random", "ci"]
PLAN_METHODS: tuple[PlanMethod, ...] = get_args(PlanMethod)
AllocationRule = Literal["method", "uniform", "functional", "marginal"]
"""How a plan with activation statistics counts each group's removals
(:mod:`graphs.error_allocation`)."""
ALLOCATION_RULES: tuple[AllocationRule, ...] = ("method", "uniform", "functional", "marginal")


class Target(Frozen):
    """Fraction of FLOPs (MACs) or of parameters to remove; exactly one is set."""

    flops: float | None = Field(None, gt=0, lt=1)
    params: float | None = Field(None, gt=0, lt=1)

    @model_validator(mode="after")
    def _one(self) -> Target:
        if (self.flops is None) == (self.params is None):
            raise ValueError("a target sets exactly one of flops or params, e.g. {'flops': 0.5}")
        return self

    @property
    def kind(self) -> Literal["flops", "params"]:
        return "flops" if self.flops is not None else "params"

    @property
    def ratio(self) -> float:
        return float(self.flops if self.flops is not None else self.params)  # type: ignore[arg-type]


class Constraints(Frozen):
    min_channels: int = Field(1, ge=1, description="never keep fewer channels in a group")
    max_ratio: float = Field(0.9, gt=0, le=1, description="never remove more of a group")
    round_to: int | None = Field(None, ge=1, description="kept channels are a multiple of this")
    ignored: list[str] = Field(default_factory=list, description="layers never pruned")


class GroupPlan(Frozen):
    id: int
    name: str = Field(description="the group's first producer")
    producers: list[str]
    channels_before: int
    channels_after: int
    remove: list[int] = Field(description="sorted ORIGINAL indices of the removed channels")
    redundancy: float | None = Field(description="the method's redundancy of the group")
    rationale: str
    unit: Unit = Field(
        "channels",
        exclude_if=lambda v: v == "channels",
        description="what an index removes: output channels of the producers, FFN neurons, or "
        "attention heads (a k/v head with its q heads under grouped-query attention)",
    )
    params: list[ParamAxis] = Field(
        default_factory=list,
        exclude_if=lambda v: not v,
        description="neurons and heads: every (parameter, axis) that loses per_channel "
        "consecutive entries per removed index",
    )
    heads: Heads | None = Field(
        None, exclude_if=lambda v: v is None, description="heads: the block's heads before pruning"
    )
    functional_redundancy: float | None = Field(
        None,
        exclude_if=lambda v: v is None,
        description="largest fraction of the channels removable with relative consumer-output "
        "error <= epsilon after least-squares folds (plans made with activation statistics)",
    )
    predicted_error: float | None = Field(
        None,
        exclude_if=lambda v: v is None,
        description="relative consumer-output error of this group's removal after the plan's "
        "folds, summed over its consumers (compensated plans)",
    )


class PruningPlan(Frozen):
    schema_version: str = PLAN_VERSION
    checkpoint_sha256: str | None
    method: PlanMethod
    target: Target
    constraints: Constraints
    seed: int
    parameters: dict[str, float | int | str]
    coupling: Literal["manifest", "unknown"]
    groups: list[GroupPlan]
    expected_shapes: dict[str, list[int]] = Field(
        description="parameter shapes after pruning (all parameters when a manifest is known, "
        "else the analysed layers' weights)"
    )
    params_before: int
    params_after: int
    flops_before: int | None = Field(description="MACs; null without a manifest")
    flops_after: int | None
    achieved: dict[str, float] = Field(description="fraction of params/flops removed")
    rule: str = Field(description="how channels were allocated, including any fallback")
    compensation: Compensation | None = Field(
        None,
        exclude_if=lambda v: v is None,
        description="folds that let the kept channels take over the removed ones' role "
        "(graphs.fold); their matrices are in the sidecar the plan pins by sha256",
    )

    # the sidecar bytes of a plan made with compensation (graphs.compensated.plan_sidecar);
    # not serialized, and compared as always equal: the fields pin them by sha256
    _sidecar: object = PrivateAttr(default=None)

    def to_json(self, *, indent: int | None = 2) -> str:
        return self.model_dump_json(indent=indent)

    @model_validator(mode="after")
    def _check(self) -> PruningPlan:
        for g in self.groups:
            if sorted(set(g.remove)) != g.remove:
                raise ValueError(f"group {g.name}: indices must be sorted and unique")
            if g.remove and (g.remove[0] < 0 or g.remove[-1] >= g.channels_before):
                raise ValueError(f"group {g.name}: indices out of range [0, {g.channels_before})")
            if g.channels_after != g.channels_before - len(g.remove):
                raise ValueError(f"group {g.name}: channels_after does not match the indices")
        if self.compensation is not None:
            by_id = {g.id: g for g in self.groups}
            for f in self.compensation.folds:
                gp = by_id.get(f.group)
                if gp is None:
                    raise ValueError(f"fold {f.consumer}: the plan has no group {f.group}")
                if f.removed != gp.remove or len(f.kept) + len(f.removed) != gp.channels_before:
                    raise ValueError(
                        f"fold {f.consumer}: kept/removed do not match group {gp.name}'s plan"
                    )
                if f.kept and f.kept[-1] >= gp.channels_before:
                    raise ValueError(f"fold {f.consumer}: kept index out of range")
        return self
