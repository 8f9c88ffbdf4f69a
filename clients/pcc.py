"""The pixel-level cross-correlation (PCC) loss: pre-training before channel-independence pruning.

From the seed paper of the ``ci`` method, "Adaptive convolutional network pruning through
pixel-level cross-correlation and channel independence" (EAAI 2025), design §4 and §6: trained
with this term, the channels of the chosen layers become decorrelated, so that pruning the least
independent channels afterwards removes less information::

    pcc = PCCLoss(model, ["features.0", "features.3"], weight=1e-2)   # or PCCLoss(model): all convs
    for x, y in loader:
        loss = F.cross_entropy(model(x), y) + pcc()     # pcc(): the term of the last forward pass
        loss.backward()
        ...
    pcc.remove()                                        # or: with PCCLoss(model) as pcc: ...

Definitions. Forward hooks on the chosen layers see each output ``A`` (the feature map):

- the channel axis is dim 1 (PyTorch's conv layout: (N, C, L), (N, C, H, W), (N, C, D, H, W));
  for ``nn.Linear`` layers it is the last dim (``(N, L, C)`` is read as (N, C, L));
- each sample ``n`` is a (C, P) matrix over its P = L, H·W or D·H·W pixel positions; a 2-dim output
  (N, C) has no positions, so the batch is one sample whose "pixels" are the N rows;
- the Pearson correlation of channels i and j of sample n, over its pixels, with a variance floor
  ``eps`` so that a constant channel (a dead ReLU) correlates 0 with everything, never NaN::

      z_i = (a_i − mean(a_i)) / sqrt(P · (var(a_i) + eps)),    r_ij = ⟨z_i, z_j⟩

- the layer's term is averaged over the samples (squared first, so that opposite-sign
  correlations in different samples do not cancel) and over the C·(C−1) off-diagonal pairs::

      decorrelate: mean_n mean_{i≠j} r_ij²          (0: independent, 1: all channels collinear)
      correlate:   mean_n mean_{i≠j} (1 − r_ij)²    (0: all channels equal up to scale and shift)

  ``correlate`` (channels pushed towards redundancy, e.g. to study the graph methods) uses
  (1 − r)² rather than −r² (or 1 − r²): it is non-negative, convex in r, and its gradient does
  not vanish at r = 0, where −r² is flat, so independent channels are pulled together at once;
- the loss is ``weight · mean over the layers`` that ran in the last forward pass of the model
  (a layer called several times in one pass counts with its last call).

The terms are computed inside the hooks, in float32 (float64 stays float64) with autocast off,
on the feature map's device, so an in-place activation after the layer cannot alter them and no
feature map is kept. Batched over the samples, no loop over channels: the C×C covariance from
one batched matmul, or, when a layer has fewer pixels than channels, the sums of r and r² from the
P×P Gram matrix of the standardized rows (Σ_ij r_ij² = ‖Z Zᵀ‖²_F = ‖Zᵀ Z‖²_F).
"""

from __future__ import annotations

import difflib
import math
import numbers
from collections.abc import Iterable
from types import TracebackType
from typing import Any, Literal, Self

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

__all__ = ["PCCLoss", "PCCMode", "pixel_correlation"]

PCCMode = Literal["decorrelate", "correlate"]
_MODES: tuple[str, ...] = ("decorrelate", "correlate")
_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def _check_eps(eps: float) -> float:
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real) or not math.isfinite(eps):
        raise ValueError(f"eps must be a finite number >= 0, not {eps!r}")
    if eps < 0:
        raise ValueError(f"eps must be >= 0 (a variance floor), not {eps}")
    return float(eps)


def _check_mode(mode: str) -> PCCMode:
    if mode == "decorrelate":
        return "decorrelate"
    if mode == "correlate":
        return "correlate"
    raise ValueError(f"unknown PCC mode {mode!r}; use one of {', '.join(_MODES)}")


def _as_samples(output: Any, *, where: str, channels_last: bool) -> torch.Tensor:
    """A layer's output as (samples, C, P) in float32/float64, or a clear error naming ``where``."""
    if not isinstance(output, torch.Tensor):
        raise TypeError(
            f"{where} returned a {type(output).__name__}, not a tensor: the PCC loss needs a "
            "feature map (N, C, ...); hook the layer that produces it"
        )
    if not output.is_floating_point():
        raise TypeError(f"{where} returned a {output.dtype} tensor; the PCC loss needs floats")
    if output.dim() < 2:
        raise ValueError(
            f"{where} returned a tensor of shape {tuple(output.shape)}; the PCC loss needs at "
            "least 2 dims (N, C, ...)"
        )
    x = output.movedim(-1, 1) if channels_last else output
    # (N, C): one sample whose pixels are the N rows; else (N, C, positions)
    x = x.t().unsqueeze(0) if x.dim() == 2 else x.reshape(x.shape[0], x.shape[1], -1)
    channels, pixels = x.shape[1], x.shape[2]
    if channels < 2:
        raise ValueError(
            f"{where} has {channels} channel(s) (shape {tuple(output.shape)}): correlations need "
            "at least 2 channels"
        )
    if pixels < 2:
        what = (
            "a batch of at least 2 rows (use drop_last=True in the DataLoader)"
            if output.dim() == 2
            else "at least 2 positions per channel; hook an earlier layer"
        )
        raise ValueError(
            f"{where} produced a feature map of shape {tuple(output.shape)}: a channel "
            f"correlation over pixels needs {what}"
        )
    if x.dtype != torch.float64:
        x = x.float()
    return x


def _center(x: torch.Tensor) -> torch.Tensor:
    """x minus its per-channel mean, the mean detached: the same covariance, with no cancellation.

    The exact centering is finished on the C×C (or C) side, which keeps the gradient exact while
    the full-size feature map sees a single subtraction forward and none backward.
    """
    return x - x.mean(dim=2, keepdim=True).detach()


def _correlation(x: torch.Tensor, eps: float) -> torch.Tensor:
    """(S, C, C) correlations of (S, C, P) samples from their C×C covariance."""
    xc = _center(x)
    m = xc.mean(dim=2)  # ≈ 0; carries the gradient of the exact centering
    cov = xc @ xc.transpose(1, 2) / x.shape[2] - m.unsqueeze(2) * m.unsqueeze(1)
    inv = torch.rsqrt(cov.diagonal(dim1=1, dim2=2).clamp_min(0) + eps)
    return cov * inv.unsqueeze(2) * inv.unsqueeze(1)


def _standardized_rows(x: torch.Tensor, eps: float) -> torch.Tensor:
    """Rows z_i = (a_i − mean) / sqrt(P·(var + eps)) of (S, C, P) samples: r = Z Zᵀ."""
    xc = _center(x)
    xc = xc - xc.mean(dim=2, keepdim=True)
    var = xc.square().mean(dim=2, keepdim=True)
    return xc * torch.rsqrt((var + eps) * x.shape[2])


def _autocast_off(device: torch.device) -> Any:
    return torch.autocast(device_type=device.type, enabled=False)


def pixel_correlation(
    feature_map: torch.Tensor, *, eps: float = 1e-6, channels_last: bool = False
) -> torch.Tensor:
    """Channel × channel Pearson correlation over pixel positions, one matrix per sample.

    ``feature_map`` is (N, C, *positions) -> (N, C, C), or (N, C) -> (1, C, C) (the batch rows
    are the pixels); ``channels_last`` reads the last dim as channels (an ``nn.Linear`` output).
    Differentiable. A channel of variance 0 has r = 0 with every channel (and on the diagonal).
    """
    eps = _check_eps(eps)
    x = _as_samples(feature_map, where="the feature map", channels_last=channels_last)
    with _autocast_off(x.device):
        return _correlation(x, eps)


def _term(x: torch.Tensor, eps: float, mode: str) -> torch.Tensor:
    """The layer's decorrelate/correlate term of (S, C, P) samples: a scalar with autograd."""
    _, channels, pixels = x.shape
    if channels <= pixels:
        r = _correlation(x, eps)
        diag = r.diagonal(dim1=1, dim2=2)  # var / (var + eps): 1, or 0 for a constant channel
        sum_sq = r.square().sum(dim=(1, 2)) - diag.square().sum(dim=1)  # Σ_{i≠j} r_ij²
        sum_r = r.sum(dim=(1, 2)) - diag.sum(dim=1)  # Σ_{i≠j} r_ij
    else:  # the P×P Gram matrix: Σ_ij r_ij² = ‖Z Zᵀ‖²_F = ‖Zᵀ Z‖²_F
        z = _standardized_rows(x, eps)
        diag = z.square().sum(dim=2)
        sum_sq = (z.transpose(1, 2) @ z).square().sum(dim=(1, 2)) - diag.square().sum(dim=1)
        sum_r = z.sum(dim=1).square().sum(dim=1) - diag.sum(dim=1)
    pairs = channels * (channels - 1)
    if mode == "decorrelate":
        return (sum_sq / pairs).mean()
    return ((pairs - 2 * sum_r + sum_sq) / pairs).mean()


class PCCLoss(nn.Module):
    """The PCC regularizer over chosen layers of ``model``; ``pcc()`` is its term (see module doc).

    Args:
        model: the network being trained. Its own parameters are not part of this module.
        layers: names (as in ``model.named_modules()``) or submodules of ``model``; default: every
            Conv1d/2d/3d with at least 2 output channels.
        weight: λ >= 0, the factor of the term (changeable later: ``pcc.weight = ...``).
        mode: ``"decorrelate"`` (mean r², the paper's) or ``"correlate"`` (mean (1 − r)²).
        eps: variance floor of the correlation (same units as the feature maps' variance).

    Raises:
        ValueError: an unknown layer name, a module that is not part of ``model``, no layer to
            hook, a negative or non-finite weight or eps, an unknown mode.

    The hooks raise ``TypeError``/``ValueError`` during the forward pass when a hooked layer
    returns no floating tensor, fewer than 2 dims or channels, or fewer than 2 pixels.
    """

    def __init__(
        self,
        model: nn.Module,
        layers: Iterable[str | nn.Module] | str | nn.Module | None = None,
        *,
        weight: float = 1e-3,
        mode: PCCMode = "decorrelate",
        eps: float = 1e-6,
    ) -> None:
        super().__init__()
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch nn.Module, not {type(model).__name__}")
        self._mode = _check_mode(mode)
        self.eps = _check_eps(eps)
        self._weight = 0.0
        self.weight = weight
        chosen = _resolve_layers(model, layers)
        self.layer_names: tuple[str, ...] = tuple(name for name, _ in chosen)
        self._terms: dict[str, torch.Tensor] = {}
        self._handles: list[RemovableHandle] = [model.register_forward_pre_hook(self._new_pass)]
        for name, module in chosen:
            hook = self._make_hook(name, channels_last=isinstance(module, nn.Linear))
            self._handles.append(module.register_forward_hook(hook))

    # ---- options ----------------------------------------------------------------------------

    @property
    def weight(self) -> float:
        """λ, the factor of the term; ``pcc.weight = 0.0`` switches the term off (value 0)."""
        return self._weight

    @weight.setter
    def weight(self, value: float) -> None:
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise TypeError(f"weight must be a number, not {type(value).__name__}")
        if not math.isfinite(value) or value < 0:
            raise ValueError(f"weight (λ) must be a finite number >= 0, not {value}")
        self._weight = float(value)

    @property
    def mode(self) -> PCCMode:
        """``"decorrelate"`` or ``"correlate"``; may be changed between passes."""
        return self._mode

    @mode.setter
    def mode(self, value: PCCMode) -> None:
        self._mode = _check_mode(value)

    @property
    def hooked(self) -> bool:
        """False once :meth:`remove` has run."""
        return bool(self._handles)

    # ---- hooks ------------------------------------------------------------------------------

    def _new_pass(self, module: nn.Module, args: Any) -> None:
        self._terms.clear()

    def _make_hook(self, name: str, *, channels_last: bool) -> Any:
        where = f"layer {name!r}" if name else "the model (layer '')"

        def hook(module: nn.Module, args: Any, output: Any) -> None:
            x = _as_samples(output, where=where, channels_last=channels_last)
            with _autocast_off(x.device):
                self._terms[name] = _term(x, self.eps, self.mode)

        return hook

    # ---- the loss ---------------------------------------------------------------------------

    def penalties(self) -> dict[str, torch.Tensor]:
        """The unweighted term of each hooked layer that ran in the last forward pass (autograd)."""
        return dict(self._terms)

    def forward(self) -> torch.Tensor:
        """``weight`` × the mean term of the hooked layers in the last forward pass (a scalar).

        Raises:
            RuntimeError: the hooks were removed, or no hooked layer ran in the last forward pass.
        """
        if not self._handles:
            raise RuntimeError("this PCCLoss was removed; create a new one to hook the model again")
        if not self._terms:
            raise RuntimeError(
                "no hooked layer ran in the last forward pass (or the model has not run yet): "
                f"run the model on a batch before taking the PCC loss; hooked: {self.layer_names}"
            )
        terms = list(self._terms.values())
        device = terms[0].device
        total = torch.stack([t.to(device) for t in terms]).mean()
        return total * self._weight

    def loss(self) -> torch.Tensor:
        """The same as ``pcc()``."""
        return self.forward()

    # ---- unhooking --------------------------------------------------------------------------

    def remove(self) -> None:
        """Unhook the model and drop the stored terms (idempotent)."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._terms.clear()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.remove()

    def extra_repr(self) -> str:
        return (
            f"layers={list(self.layer_names)}, weight={self._weight:g}, mode={self.mode!r}, "
            f"eps={self.eps:g}, hooked={self.hooked}"
        )


def _resolve_layers(
    model: nn.Module, layers: Iterable[str | nn.Module] | str | nn.Module | None
) -> list[tuple[str, nn.Module]]:
    """(name, module) of the chosen layers, in the given order, without duplicates."""
    named = dict(model.named_modules())
    chosen: list[tuple[str, nn.Module]]
    if layers is None:
        chosen = [(n, m) for n, m in named.items() if isinstance(m, _CONVS) and m.out_channels >= 2]
        if not chosen:
            raise ValueError(
                f"{type(model).__name__} has no Conv1d/2d/3d layer with 2 or more output "
                "channels; name the layers to hook (layers=[...])"
            )
        return chosen
    items: list[str | nn.Module] = [layers] if isinstance(layers, str | nn.Module) else list(layers)
    if not items:
        raise ValueError("layers is empty; name at least one layer (or pass None: all convs)")
    name_of = {id(m): n for n, m in named.items()}
    chosen = []
    seen: set[str] = set()
    for item in items:
        if isinstance(item, str):
            if item not in named:
                close = difflib.get_close_matches(item, list(named), n=3)
                hint = f"; did you mean {', '.join(map(repr, close))}?" if close else ""
                raise ValueError(
                    f"{type(model).__name__} has no layer named {item!r}{hint} (names as in "
                    "model.named_modules())"
                )
            name, module = item, named[item]
        elif isinstance(item, nn.Module):
            if id(item) not in name_of:
                raise ValueError(
                    f"the {type(item).__name__} passed in layers is not a submodule of this "
                    f"{type(model).__name__}; pass the model's own layers or their names"
                )
            name, module = name_of[id(item)], item
        else:
            raise TypeError(
                f"layers holds layer names or modules, not {type(item).__name__} ({item!r})"
            )
        if name not in seen:
            seen.add(name)
            chosen.append((name, module))
    return chosen
