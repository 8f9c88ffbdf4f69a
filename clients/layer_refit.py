"""Sequential refit of a pruned model's channel-mixing layers against the unpruned model.

Compensated plans fold each consumer from the *original* model's second moments; once upstream
groups are pruned too, a consumer's input drifts from what its fold was fitted on, and the
errors compound with depth. :func:`refit` removes that compounding: it visits the pruned
model's consumers (conv with ``groups < in_channels``, or linear) in forward order and, for
each, solves on calibration batches

    [W' b'] = argmin Σ_rows ‖y_orig − W' x_new − b'‖² + λ ‖[W' b'] − [W b]‖²

where ``y_orig`` is the unpruned model's output of the same-named module (its kept output
channels) and ``x_new`` the pruned model's input to it, with the earlier consumers already
refitted. Rows are positions (1×1 convs, linears) or unfolded patches (k×k ``Conv2d``, groups 1).
Only second moments are accumulated (float64, (d+1)² per consumer); the ridge λ = ``ridge`` ×
mean diagonal of the input moments shrinks towards the current (folded) weights. Everything is
deterministic; BatchNorm and the rest stay in eval mode; no gradients.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from clients.errors import PlanMismatchError
from clients.refit_checks import CONVS, out_width, validate
from graphs.plan import PruningPlan

__all__ = ["LayerRefit", "RefitReport", "refit"]


@dataclass(frozen=True)
class LayerRefit:
    """One refitted consumer: calibration rows, inputs per row (patch size, without the
    constant), and the relative output error ‖y_orig − ŷ‖² / ‖y_orig‖² on the calibration rows
    before (current weights) and after the refit."""

    name: str
    rows: int
    inputs: int
    error_before: float
    error_after: float


@dataclass(frozen=True)
class RefitReport:
    """What :func:`refit` did: refitted layers in forward order, skipped ones with the reason."""

    layers: list[LayerRefit] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)


class _Stop(Exception):
    """Raised by a hook to end a forward pass once the wanted tensor is captured."""


def _input(batch: object) -> torch.Tensor:
    if isinstance(batch, torch.Tensor):
        return batch
    if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], torch.Tensor):
        return batch[0]  # (inputs, labels) from a DataLoader
    raise TypeError(
        f"each refit batch must be a tensor or an (inputs, labels) pair; got {type(batch).__name__}"
    )


def _skip_reason(m: nn.Module, max_inputs: int) -> str | None:
    """Why a consumer cannot be refitted, or None."""
    if isinstance(m, CONVS):
        if m.padding_mode != "zeros":
            return f"padding_mode {m.padding_mode!r} (only zero padding is unfolded)"
        if m.groups != 1:
            return f"grouped conv (groups={m.groups}); only groups=1 is refitted"
        if isinstance(m.padding, str):
            return f"padding={m.padding!r} (give explicit padding to refit)"
        pointwise = all(k == 1 for k in m.kernel_size) and all(s == 1 for s in m.stride)
        if not (pointwise and all(p == 0 for p in m.padding)) and not isinstance(m, nn.Conv2d):
            return "k×k or strided Conv1d/Conv3d (only Conv2d patches are unfolded)"
        d = m.in_channels * int(torch.tensor(m.kernel_size).prod())
    else:
        d = m.in_features  # type: ignore[assignment]
    if d > max_inputs:
        return f"{d} inputs per row > max_inputs={max_inputs}"
    return None


def _rows_in(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The consumer input as rows (rows, d) in float64, columns ordered like weight.view(o, -1)."""
    x = x.detach().double()
    if isinstance(m, nn.Linear):
        return x.reshape(-1, x.shape[-1])
    if isinstance(m, nn.Conv2d) and not (
        m.kernel_size == (1, 1) and m.stride == (1, 1) and m.padding == (0, 0)
    ):
        pad = m.padding
        assert not isinstance(pad, str)  # _skip_reason refuses string padding
        p = F.unfold(x, m.kernel_size, dilation=m.dilation, padding=pad, stride=m.stride)
        return p.transpose(1, 2).reshape(-1, p.shape[1])
    return x.movedim(1, -1).reshape(-1, x.shape[1])


def _rows_out(m: nn.Module, y: torch.Tensor, kept: list[int] | None) -> torch.Tensor:
    y = y.detach().double()
    y = y.reshape(-1, y.shape[-1]) if isinstance(m, nn.Linear) else y.movedim(1, -1)
    y = y.reshape(-1, y.shape[-1])
    return y if kept is None else y[:, kept]


def _order(model: nn.Module, mods: Mapping[str, nn.Module], x: torch.Tensor) -> dict[str, int]:
    """Consumer name → number of calls in one forward, in first-call order."""
    calls: dict[str, int] = {}
    hooks = [
        m.register_forward_pre_hook(lambda *_, n=n: calls.__setitem__(n, calls.get(n, 0) + 1))
        for n, m in mods.items()
    ]
    try:
        model(x)
    finally:
        for h in hooks:
            h.remove()
    return calls


def _capture(model: nn.Module, m: nn.Module, x: torch.Tensor, *, output: bool) -> torch.Tensor:
    got: list[torch.Tensor] = []

    def pre(_: nn.Module, args: tuple[Any, ...]) -> None:
        got.append(args[0])
        raise _Stop

    def post(_: nn.Module, __: object, out: torch.Tensor) -> None:
        got.append(out)
        raise _Stop

    h = m.register_forward_hook(post) if output else m.register_forward_pre_hook(pre)
    try:
        model(x)
    except _Stop:
        pass
    finally:
        h.remove()
    if not got:
        raise PlanMismatchError("refit: a consumer was not called in the forward pass")
    return got[0]


def _params(m: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    weight, bias = m.weight, m.bias
    assert isinstance(weight, torch.Tensor) and (bias is None or isinstance(bias, torch.Tensor))
    return weight, bias


def _weights(m: nn.Module) -> torch.Tensor:
    """[W.view(o, -1), b] in float64, shape (o, d+1)."""
    weight, b = _params(m)
    w = weight.detach().double().reshape(out_width(m), -1)
    bias = (
        torch.zeros(w.shape[0], dtype=w.dtype, device=w.device)
        if b is None
        else b.detach().double()
    )
    return torch.cat([w, bias.reshape(-1, 1)], dim=1)


def _error(w: torch.Tensor, c_nn: torch.Tensor, c_yn: torch.Tensor, yy: float) -> float:
    e = yy - 2 * float((w * c_yn).sum()) + float(((w @ c_nn) * w).sum())
    return max(e, 0.0) / yy if yy > 0 else 0.0


def _refit_one(
    name: str,
    p: nn.Module,
    o: nn.Module,
    pruned: nn.Module,
    original: nn.Module,
    xs: list[torch.Tensor],
    kept: list[int] | None,
    ridge: float,
    min_rows_per_input: float,
    weights: bool,
) -> LayerRefit | str:
    """Accumulate the moments over the batches and rewrite ``p`` in place; a reason if not."""
    c_nn: torch.Tensor | None = None
    c_yn: torch.Tensor | None = None
    yy, rows = 0.0, 0
    for x in xs:
        xin = _rows_in(p, _capture(pruned, p, x, output=False))
        y = _rows_out(o, _capture(original, o, x, output=True), kept)
        if xin.shape[0] != y.shape[0]:
            return f"{xin.shape[0]} input rows but {y.shape[0]} output rows"
        one = torch.ones(xin.shape[0], 1, dtype=xin.dtype, device=xin.device)
        xa = torch.cat([xin, one], dim=1)
        c_nn = xa.T @ xa if c_nn is None else c_nn + xa.T @ xa
        c_yn = y.T @ xa if c_yn is None else c_yn + y.T @ xa
        yy += float(y.pow(2).sum())
        rows += xin.shape[0]
    assert c_nn is not None and c_yn is not None
    d = c_nn.shape[0] - 1
    w0 = _weights(p)
    if not weights:  # bias correction: b' = mean(y_orig) − W mean(x_new)
        w = w0.clone()
        w[:, d] = (c_yn[:, d] - w0[:, :d] @ c_nn[:d, d]) / rows
        return _write(p, name, rows, d, w0, w, (c_nn, c_yn, yy))
    if rows < min_rows_per_input * (d + 1):
        return f"{rows} calibration rows for {d + 1} unknowns per output (< {min_rows_per_input}×)"
    scale = float(torch.diagonal(c_nn)[:d].mean()) if d else 1.0
    lam = ridge * (scale if scale > 0 else 1.0)
    a = c_nn + lam * torch.eye(d + 1, dtype=c_nn.dtype, device=c_nn.device)
    # W = W0 + Δ with Δ (C_nn + λI) = C_yn − W0 C_nn; minimum-norm Δ where C_nn is singular
    # (dead or duplicate inputs): those directions keep the current weights.
    delta = torch.linalg.lstsq(a, (c_yn - w0 @ c_nn).T, driver="gelsd").solution.T
    return _write(p, name, rows, d, w0, w0 + delta, (c_nn, c_yn, yy))


def _write(
    p: nn.Module,
    name: str,
    rows: int,
    d: int,
    w0: torch.Tensor,
    w: torch.Tensor,
    moments: tuple[torch.Tensor, torch.Tensor, float],
) -> LayerRefit:
    """Write [W' b'] into ``p`` (a bias is created when it has none)."""
    before, after = _error(w0, *moments), _error(w, *moments)
    weight, old = _params(p)
    weight.copy_(w[:, :d].reshape(weight.shape).to(weight.dtype))
    bias = w[:, d].to(device=weight.device, dtype=weight.dtype)
    if old is None:
        p.bias = nn.Parameter(bias, requires_grad=weight.requires_grad)
    else:
        old.copy_(bias)
    return LayerRefit(name, rows, d, before, after)


@torch.no_grad()
def refit(
    pruned: nn.Module,
    original: nn.Module,
    batches: Iterable[object],
    *,
    plan: PruningPlan | Mapping[str, Any] | str | Path | None = None,
    ridge: float = 1.0,
    layers: Iterable[str] | None = None,
    max_inputs: int = 4096,
    min_rows_per_input: float = 2.0,
    weights: bool = True,
) -> RefitReport:
    """Refit ``pruned``'s conv/linear consumers in place, in forward order, so that each
    reproduces the same-named module of ``original`` on the calibration ``batches``.

    Args:
        pruned: the pruned model (e.g. from :func:`clients.apply_plan` on a copy), module names
            kept; changed in place.
        original: the unpruned model it was made from; not changed (its train/eval flags are
            restored).
        batches: calibration batches, tensors (N, ...) or (inputs, labels) pairs; kept in
            memory and forwarded once per consumer through both models (up to that consumer).
        plan: the applied plan (object, JSON dict or path); needed when consumers lost output
            channels (it says which original outputs they kept).
        ridge: λ relative to the mean diagonal of the input moments, shrinking towards the
            current weights (≥ 0). Default 1: chosen on a calibration-only split of
            MobileNetV2's crops (benchmarks/refit_probe.py --holdout-ridges; 1e-3 and 0.1
            overfitted ~100 calibration crops); use ~1e-5 with plenty of calibration data.
        layers: names of the consumers to refit (default all); the others are left as they are.
        max_inputs: consumers with more inputs per row (patch size, linear width) are skipped.
        weights: False refits only the biases (bias correction: each output's calibration
            mean is restored, b' = mean(y_orig) − W mean(x_new)); few unknowns, little data.
        min_rows_per_input: consumers with fewer calibration rows than this × (inputs + 1) are
            skipped (their fit would interpolate the calibration data).

    Returns:
        :class:`RefitReport`: per refitted layer the calibration error before and after, and
        the skipped layers with their reason (grouped convs, too wide, too few rows, ...).

    Raises:
        PlanMismatchError: the models do not correspond (module names, kinds, conv geometry,
            widths, or output channels without the plan); raised before any weight changes.
        ValueError: no batches or a negative ridge.
    """
    from clients.apply import load_plan

    if ridge < 0 or min_rows_per_input < 0:
        raise ValueError("refit: ridge and min_rows_per_input must be >= 0")
    xs = [_input(b) for b in batches]
    if not xs:
        raise ValueError("refit: no calibration batches given; pass at least one")
    parsed = load_plan(plan) if plan is not None else None
    pm, om, kept, wanted = validate(pruned, original, parsed, layers)
    modes = {m: m.training for m in (*pruned.modules(), *original.modules())}
    pruned.eval()
    original.eval()
    try:
        calls = _order(pruned, pm, xs[0])
        calls_o = _order(original, om, xs[0])
        report = RefitReport()
        for name in calls:
            if name not in wanted:
                continue
            reason = _skip_reason(pm[name], max_inputs)
            if reason is None and (calls[name] != 1 or calls_o.get(name) != 1):
                reason = "called more than once per forward (shared weights)"
            if reason is None:
                out = _refit_one(
                    name, pm[name], om[name], pruned, original, xs, kept.get(name)
                    if out_width(pm[name]) != out_width(om[name]) else None,
                    ridge, min_rows_per_input, weights,
                )  # fmt: skip
                if isinstance(out, LayerRefit):
                    report.layers.append(out)
                    continue
                reason = out
            report.skipped[name] = reason
        for name in sorted(wanted - set(calls)):
            report.skipped[name] = "not called in the forward pass"
        return report
    finally:
        for m, t in modes.items():
            m.training = t
