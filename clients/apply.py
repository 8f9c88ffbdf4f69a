"""Apply a pruning plan to a live model with torch-pruning (design §2, §6).

The plan lists, per channel group, the ORIGINAL output-channel indices of its producers to
remove. Every group touches its own channel axes only (a producer's axis 0 and the coupled
norms, consumers' input axes), so pruning one group never shifts the indices of another:
the groups can be replayed one after the other with their original indices.

Everything is checked against the model before the first weight changes, and raises
:class:`~clients.errors.PlanMismatchError` with what is wrong and what to do:

- producers are conv/linear modules of the model, run by the forward pass, with
  ``channels_before`` output channels; indices are sorted, unique, in range, and leave a channel;
- ``checkpoint_sha256`` (when given) equals the plan's digest;
- the coupling torch-pruning finds in the model agrees with the plan: the layers of one plan
  group are coupled, two plan groups are never coupled (with ``coupling="unknown"`` this means
  coupled layers were planned separately: rebuild the plan with a manifest), and no group
  touches channel ranges the plan format cannot express;
- the parameter shapes predicted from that coupling equal ``expected_shapes`` (a plan for
  another model fails here even on layers that the plan does not prune).

A plan that carries compensation (``plan.compensation``, design §8) needs its sidecar (the
``.fold.safetensors`` file written next to it, pinned by sha256): it is checked with every fold
against the live model before any weight changes (:func:`clients.fold.check_compensation`), the
folds rewrite the consumers' weights and biases by the ORIGINAL indices, then the channels are
removed as usual. ``recalibrate=batches`` re-estimates BatchNorm statistics afterwards.

Groups whose unit is ``neurons`` (an FFN's intermediate neurons) or ``heads`` (an attention
block's heads; k/v heads with their q heads under grouped-query attention) carry the exact
(parameter, axis, entries per index) they shrink; they are checked and pruned layer by layer by
:mod:`clients.attention`, which also updates the attention module's head counts.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
import torch_pruning as tp
from torch import nn

from clients.attention import check_unit_group, prune_unit_group
from clients.channel_groups import GroupStructure, group_structure
from clients.errors import PlanError, PlanMismatchError
from clients.fold import SidecarSource, apply_folds, check_compensation, recalibrate_batchnorm
from clients.recurrent import check_hidden_group, prune_hidden_group
from clients.tracing import (
    ROOT_TYPES,
    ExampleInputs,
    TracedModel,
    as_input_tuple,
    find_roles,
    keep_training_flags,
    out_channels,
    trace_model,
)
from graphs.plan import GroupPlan, PruningPlan

__all__ = ["apply_plan", "load_plan"]

_REBUILD = (
    "build a manifest of this model (clients.build_manifest) and plan again with it, so that "
    "coupled layers are planned as one group"
)


def load_plan(plan: PruningPlan | Mapping[str, Any] | str | Path) -> PruningPlan:
    """A validated plan from a :class:`PruningPlan`, its JSON dict, or a path to its JSON file.

    Raises:
        PlanError: the file cannot be read or is not JSON.
        pydantic.ValidationError: the content is not a valid plan (the message names the field).
    """
    if isinstance(plan, PruningPlan):
        return PruningPlan.model_validate(plan.model_dump())
    if isinstance(plan, str | Path):
        path = Path(plan)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise PlanError(
                f"cannot read the plan file {path}: {exc}; pass the JSON file written by "
                "PruningPlan.to_json() (e.g. from GET /v1/jobs/{id}/plan)"
            ) from exc
        return PruningPlan.model_validate(data)
    if isinstance(plan, Mapping):
        return PruningPlan.model_validate(dict(plan))
    raise TypeError(f"a plan is a PruningPlan, a dict or a path, not {type(plan).__name__}")


def _check_digest(plan: PruningPlan, checkpoint_sha256: str | None) -> None:
    if checkpoint_sha256 is None:
        return
    if plan.checkpoint_sha256 is None:
        raise PlanMismatchError(
            "the plan records no checkpoint digest, so it cannot be checked against "
            f"{checkpoint_sha256}; apply it without checkpoint_sha256 if you trust it"
        )
    if plan.checkpoint_sha256.lower() != checkpoint_sha256.lower():
        raise PlanMismatchError(
            f"the plan was made for checkpoint {plan.checkpoint_sha256}, not {checkpoint_sha256}; "
            "load the checkpoint the plan was made for, or plan again for this one"
        )


def _check_group(gp: GroupPlan, modules: dict[str, nn.Module], traced: TracedModel) -> None:
    """Producers, channel counts and indices of one plan group."""
    if not gp.producers:
        raise PlanMismatchError(f"plan group {gp.id} ({gp.name}) names no producer layer")
    for name in gp.producers:
        module = modules.get(name)
        if module is None or not isinstance(module, ROOT_TYPES):
            what = "is not a module" if module is None else f"is a {type(module).__name__}"
            raise PlanMismatchError(
                f"plan group {gp.id} prunes {name!r}, which {what} of this model (expected a "
                "Conv1d/2d/3d or Linear): the plan was made for another model"
            )
        if module not in traced.dg.module2node:
            raise PlanMismatchError(
                f"layer {name!r} of plan group {gp.id} is not used by the forward pass on the "
                "example inputs; pass inputs that run it"
            )
        if out_channels(module) != gp.channels_before:
            raise PlanMismatchError(
                f"plan group {gp.id}: {name!r} has {out_channels(module)} output channels here, "
                f"the plan expects {gp.channels_before}; the plan was made for another model "
                "(or this one is pruned already)"
            )
    remove = gp.remove
    if remove != sorted(set(remove)):
        raise PlanMismatchError(
            f"plan group {gp.id} ({gp.name}): channel indices must be sorted and unique"
        )
    if remove and (remove[0] < 0 or remove[-1] >= gp.channels_before):
        raise PlanMismatchError(
            f"plan group {gp.id} ({gp.name}): channel indices out of range "
            f"[0, {gp.channels_before})"
        )
    if len(remove) >= gp.channels_before:
        raise PlanMismatchError(
            f"plan group {gp.id} ({gp.name}) removes all {gp.channels_before} channels; a layer "
            "must keep at least one"
        )
    if gp.channels_after != gp.channels_before - len(remove):
        raise PlanMismatchError(
            f"plan group {gp.id} ({gp.name}): channels_after {gp.channels_after} does not match "
            f"{gp.channels_before} - {len(remove)} removed"
        )


def _check_coupling(plan: PruningPlan, structures: dict[int, GroupStructure]) -> None:
    """The plan's groups against the coupling torch-pruning finds in the model."""
    owner: dict[str, GroupPlan] = {}
    for gp in plan.groups:
        for name in gp.producers:
            if name in owner:
                raise PlanMismatchError(
                    f"layer {name!r} is a producer of plan groups {owner[name].id} and {gp.id}; "
                    "every layer belongs to one group"
                )
            owner[name] = gp
    for gp in plan.groups:
        if not gp.remove or gp.id not in structures:
            continue
        s = structures[gp.id]
        others = sorted({owner[p].id for p in s.producers if p in owner} - {gp.id})
        if others:
            coupled = [p for p in s.producers if p in owner and owner[p].id != gp.id]
            if plan.coupling == "unknown":
                raise PlanMismatchError(
                    f"plan group {gp.id} ({gp.name}) and plan group(s) {others} ({coupled}) are "
                    "coupled in this model (they must lose the same channels, e.g. through a "
                    "residual add), but the plan prunes them separately because it was made "
                    f"without a manifest; {_REBUILD}"
                )
            raise PlanMismatchError(
                f"plan groups {gp.id} and {others} are one coupled group in this model "
                f"({s.producers}); the plan (or its manifest) was made for another model"
            )
        if s.problems:
            raise PlanMismatchError(
                f"plan group {gp.id} ({gp.name}) cannot be pruned in this model: "
                f"{'; '.join(s.problems)}"
            )
        missing = [p for p in gp.producers if p not in s.producers]
        if missing:
            raise PlanMismatchError(
                f"plan group {gp.id} ({gp.name}) treats {missing} as coupled to {gp.name}, but "
                "they are not in this model; the plan was made for another model"
            )
        if plan.coupling == "manifest" and set(gp.producers) != set(s.producers):
            raise PlanMismatchError(
                f"plan group {gp.id} ({gp.name}) lists producers {gp.producers}, but in this "
                f"model the coupled producers are {s.producers}; the manifest the plan was "
                "made with does not describe this model: build it again from this model"
            )


def _predicted_shapes(
    model: nn.Module, plan: PruningPlan, structures: dict[int, GroupStructure]
) -> tuple[dict[str, list[int]], set[tuple[str, int]]]:
    """Every parameter's shape after the plan, and the (parameter, axis) pairs it shrinks."""
    shapes = {n: list(p.shape) for n, p in model.named_parameters()}
    touched: set[tuple[str, int]] = set()
    for gp in plan.groups:
        if not gp.remove:
            continue
        for pa in structures[gp.id].params if gp.id in structures else gp.params:
            shapes[pa.param][pa.axis] -= len(gp.remove) * pa.per_channel * pa.blocks
            touched.add((pa.param, pa.axis))
    return shapes, touched


def _check_shapes(
    model: nn.Module, plan: PruningPlan, structures: dict[int, GroupStructure]
) -> None:
    current = {n: list(p.shape) for n, p in model.named_parameters()}
    predicted, touched = _predicted_shapes(model, plan, structures)
    for name, expected in plan.expected_shapes.items():
        if name not in predicted:
            raise PlanMismatchError(
                f"the plan expects a parameter {name!r} that this model does not have; the plan "
                "was made for another model"
            )
        if predicted[name] == list(expected):
            continue
        here = current[name]
        foreign = len(here) != len(expected) or any(
            here[a] != expected[a] for a in range(len(here)) if (name, a) not in touched
        )
        if foreign:
            raise PlanMismatchError(
                f"parameter {name!r} has shape {here} here, which the plan does not explain "
                f"(it expects {list(expected)} after pruning other axes or none): the plan was "
                "made for another model"
            )
        raise PlanMismatchError(
            f"pruning would give {name!r} the shape {predicted[name]}, but the plan expects "
            f"{list(expected)}: the plan's coupling does not match this model; {_REBUILD}"
        )


def _prune_fn(module: nn.Module) -> Any:
    return (
        tp.prune_linear_out_channels
        if isinstance(module, nn.Linear)
        else (tp.prune_conv_out_channels)
    )


def apply_plan(
    model: nn.Module,
    plan: PruningPlan | Mapping[str, Any] | str | Path,
    example_inputs: ExampleInputs,
    *,
    checkpoint_sha256: str | None = None,
    compensation: SidecarSource = None,
    recalibrate: Iterable[object] | None = None,
) -> nn.Module:
    """Remove the plan's channels from ``model`` in place and return it.

    Args:
        model: the unpruned model the plan was made for (weights loaded).
        plan: a :class:`graphs.plan.PruningPlan`, its JSON dict, or the path of its JSON file.
        example_inputs: a tensor or sequence of positional input tensors, batch first (e.g.
            ``torch.zeros(1, 3, 32, 32)``); used to trace the coupling and, after pruning, for
            a forward pass.
        checkpoint_sha256: the digest of the loaded checkpoint, checked against the plan's.
        compensation: the sidecar of a plan that carries compensation: its path, bytes or
            arrays (default: ``<plan stem>.fold.safetensors`` next to a plan given as a path).
        recalibrate: batches (tensors or (inputs, labels) pairs) to re-estimate BatchNorm
            running statistics on after pruning.

    Raises:
        PlanMismatchError: the plan does not fit the model; nothing has been changed.
        pydantic.ValidationError: the plan itself is malformed; nothing has been changed.
        PlanError: pruning failed or the pruned shapes differ from the plan (should not happen).
    """
    parsed = load_plan(plan)
    _check_digest(parsed, checkpoint_sha256)
    if parsed.compensation is None and compensation is not None:
        raise PlanMismatchError(
            "a compensation sidecar was given, but the plan carries no compensation; pass the "
            "plan that was written with it"
        )
    modules = dict(model.named_modules())
    traced = trace_model(model, example_inputs)
    ids = [gp.id for gp in parsed.groups]
    if len(set(ids)) != len(ids):
        raise PlanMismatchError("plan group ids must be unique; the plan file is corrupt")
    for gp in parsed.groups:
        if gp.unit == "channels":
            _check_group(gp, modules, traced)
        elif gp.unit == "hidden":
            check_hidden_group(gp, model)
        else:
            check_unit_group(gp, model)
    _, outputs = find_roles(traced)
    for gp in parsed.groups:
        hit = sorted(set(gp.producers) & set(outputs)) if gp.remove else []
        if hit:
            raise PlanMismatchError(
                f"plan group {gp.id} removes output channels of {', '.join(hit)}, which writes "
                "the model's output: the pruned model would change what it returns (e.g. fewer "
                "classes); keep that layer whole (build the plan with a manifest, or --ignore it)"
            )
    structures = {
        gp.id: group_structure(traced, modules[gp.producers[0]])
        for gp in parsed.groups
        if gp.unit == "channels"
    }
    _check_coupling(parsed, structures)
    _check_shapes(model, parsed, structures)
    folds = check_compensation(model, parsed, compensation, given=plan)

    dg = traced.dg
    try:
        apply_folds(model, folds)  # by ORIGINAL indices, before any channel is removed
        for gp in parsed.groups:
            if not gp.remove or gp.unit != "channels":
                continue
            root = modules[gp.producers[0]]
            group = dg.get_pruning_group(root, _prune_fn(root), idxs=list(gp.remove))
            group.prune()
        for gp in parsed.groups:
            if gp.unit == "hidden":
                prune_hidden_group(gp, model)
            elif gp.unit != "channels":
                prune_unit_group(gp, model)
    except Exception as exc:
        raise PlanError(
            f"torch-pruning failed while applying the plan ({exc}); the model is partly pruned: "
            "reload its weights before using it"
        ) from exc

    actual = {n: list(p.shape) for n, p in model.named_parameters()}
    wrong = {
        n: (actual.get(n), list(s)) for n, s in parsed.expected_shapes.items() if actual.get(n) != s
    }
    if wrong:
        raise PlanError(f"pruned shapes differ from the plan (actual, expected): {wrong}")
    with torch.no_grad(), keep_training_flags(model):
        model.eval()
        try:
            model(*as_input_tuple(example_inputs))
        except Exception as exc:
            raise PlanError(
                f"the pruned model's forward pass fails ({exc}); a module may keep a width the "
                "plan changed (e.g. a head count under another attribute name)"
            ) from exc
    if recalibrate is not None:
        recalibrate_batchnorm(model, recalibrate)
    return model
