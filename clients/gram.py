"""Second moments of the inputs of channel-mixing consumers (design §8, issue 14 contract A).

Compensated pruning needs, for every conv/linear that mixes channels, the Gram matrix of its
input with a constant column appended::

    S = Σ over rows of [x, 1]ᵀ [x, 1]      shape (c + 1, c + 1), float64, constant LAST

where a row is one position of one sample: a conv input (N, C, *spatial) gives N·prod(spatial)
rows of C values, a linear input (..., F) gives prod(...) rows of F values. So ``S[c, c]`` is the
number of rows and ``S[:c, c]`` the sum of the inputs. S is exact and takes (c + 1)² memory
whatever the data size: forward pre-hooks fold each batch in with a float64 matmul as the model
runs; no map is kept.

A consumer is any ``nn.Conv1d/2d/3d`` with ``groups < in_channels`` (not depthwise) or any
``nn.Linear``, subclasses included. Linear layers with more than ``max_linear_inputs`` inputs are
skipped (their Gram would be large), and so is, in module order, every consumer whose Gram would
take the total beyond ``max_bytes`` (a transformer's many wide linear layers would otherwise
take tens of GB); each is reported in ``skipped`` with the reason, like consumers that did not
run.

With ``holdout=True`` it also keeps, per consumer, the S of a held-out part of the rows: the
batches run while :attr:`GramAccumulator.held_out` is True are folded into both S and the
held-out S (each with the same float64 update, so S is bit for bit what it is without a
held-out part, and ``S − held-out S`` is the S of the other batches up to rounding). The budget
then counts both copies.

This module also holds the byte encoder of the activations file (float32 maps, float64 Grams;
the file's names and metadata are in :mod:`graphs.contracts.activations`).
"""

from __future__ import annotations

import json
from collections.abc import Mapping

import torch
from torch import nn

__all__ = [
    "MAX_BYTES",
    "MAX_LINEAR_INPUTS",
    "GramAccumulator",
    "input_width",
    "is_mixing_consumer",
    "safetensors_bytes",
]

MAX_LINEAR_INPUTS = 4096
MAX_BYTES = 256 * 2**20
"""Default budget of all Grams of one capture (ResNet-50's 54 consumers take 184 MiB)."""
_CHUNK_VALUES = 1 << 23  # float64 values converted at a time (64 MiB)
_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def is_mixing_consumer(module: nn.Module) -> bool:
    """A conv that is not depthwise (``groups < in_channels``) or a linear layer."""
    if isinstance(module, _CONVS):
        return module.groups < module.in_channels
    return isinstance(module, nn.Linear)


def input_width(module: nn.Module) -> int:
    """The number of input channels (conv) or features (linear) of a consumer."""
    if isinstance(module, _CONVS):
        return int(module.in_channels)
    if isinstance(module, nn.Linear):
        return int(module.in_features)
    raise TypeError(f"not a conv or linear layer: {type(module).__name__}")


def _rows(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The consumer's input as (rows, c): channels last, every position of every sample a row."""
    if isinstance(module, _CONVS):
        spatial = len(module.kernel_size)
        if x.dim() == spatial + 1:  # an unbatched input (C, *spatial)
            x = x.unsqueeze(0)
        return x.movedim(1, -1).reshape(-1, x.shape[1])
    return x.reshape(-1, x.shape[-1])


class GramAccumulator:
    """Accumulates S for every mixing consumer of ``model`` while hooks are registered.

    Usage: ``acc = GramAccumulator(model)``; per batch, set ``acc.n_take`` (samples of the batch
    to use, batch first; None: all), run the model inside ``with acc:``; ``acc.grams()`` gives
    module name -> S (CPU float64), ``acc.skipped`` module name -> why it has none. With
    ``holdout=True``, set ``acc.held_out`` per batch too (True: the batch is also part of the
    held-out S); after :meth:`grams`, :meth:`held_out_grams` gives the held-out S.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        max_linear_inputs: int = MAX_LINEAR_INPUTS,
        max_bytes: int = MAX_BYTES,
        holdout: bool = False,
    ) -> None:
        if max_linear_inputs < 1 or max_bytes < 0:
            raise ValueError("max_linear_inputs must be at least 1 and max_bytes at least 0")
        copies = 2 if holdout else 1
        self.consumers: dict[str, nn.Module] = {}
        self.skipped: dict[str, str] = {}
        total = 0
        for name, module in model.named_modules():
            if not is_mixing_consumer(module):
                continue
            width = input_width(module)
            size = (width + 1) ** 2 * 8 * copies
            if isinstance(module, nn.Linear) and width > max_linear_inputs:
                self.skipped[name] = (
                    f"linear layer with {width} inputs (more than max_linear_inputs="
                    f"{max_linear_inputs}): its Gram would hold {(width + 1) ** 2} values"
                )
            elif total + size > max_bytes:
                self.skipped[name] = (
                    f"the Grams of the consumers before it take {total} bytes; with its "
                    f"{size} they would exceed max_statistics_bytes={max_bytes} (raise it"
                    + (
                        ", or capture with holdout_every=0: the held-out copy counts)"
                        if holdout
                        else ")"
                    )
                )
            else:
                self.consumers[name] = module
                total += size
        self.n_take: int | None = None
        self.holdout = holdout
        self.held_out = False
        self._sums: dict[str, torch.Tensor] = {}
        self._held: dict[str, torch.Tensor] = {}
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def __enter__(self) -> GramAccumulator:
        for name, module in self.consumers.items():
            self._handles.append(module.register_forward_pre_hook(self._hook(name)))
        return self

    def __exit__(self, *_: object) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def _hook(self, name: str):  # type: ignore[no-untyped-def]
        def pre(module: nn.Module, args: tuple[object, ...]) -> None:
            if args and isinstance(args[0], torch.Tensor):
                self.add(name, module, args[0])

        return pre

    @torch.no_grad()
    def add(self, name: str, module: nn.Module, x: torch.Tensor) -> None:
        """Fold one input of consumer ``name`` into its S."""
        if self.n_take is not None and x.dim() > 1 and x.shape[0] > self.n_take:
            x = x[: self.n_take]
        rows = _rows(module, x.detach())
        c = rows.shape[1]
        device = rows.device if rows.device.type in ("cpu", "cuda") else torch.device("cpu")
        total = self._sums.get(name)
        if total is None:
            total = torch.zeros(c + 1, c + 1, dtype=torch.float64, device=device)
            self._sums[name] = total
        if total.shape[0] != c + 1:
            raise ValueError(
                f"{name} was called with inputs of {c} and {total.shape[0] - 1} channels in one "
                "capture; capture models whose layers always see the same width"
            )
        targets = [total]
        if self.holdout and self.held_out:
            held = self._held.get(name)
            if held is None:
                held = self._held[name] = torch.zeros_like(total)
            targets.append(held)
        step = max(1, _CHUNK_VALUES // max(c, 1))
        for start in range(0, rows.shape[0], step):
            chunk = rows[start : start + step].to(device=device, dtype=torch.float64)
            sums = chunk.sum(dim=0)
            for t in targets:  # the same update in each: S stays what it is without a holdout
                t[:c, :c].addmm_(chunk.T, chunk)
                t[:c, c] += sums
                t[c, c] += chunk.shape[0]

    def grams(self) -> dict[str, torch.Tensor]:
        """Module name -> S, symmetric (c + 1, c + 1) float64 on the CPU; consumers that never
        ran are added to :attr:`skipped`."""
        out: dict[str, torch.Tensor] = {}
        for name in self.consumers:
            total = self._sums.get(name)
            if total is None or float(total[-1, -1]) == 0:
                self.skipped[name] = "did not run in the forward pass on the calibration batches"
                continue
            out[name] = _symmetric(total)
        return out

    def held_out_grams(self, grams: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Module name -> the held-out S, as :meth:`grams` gives S, for every consumer of
        ``grams`` (its result); empty when the held-out part of some consumer has no rows or all
        of its rows (it is not a strict part: nothing to cross-fit) or without ``holdout``."""
        out: dict[str, torch.Tensor] = {}
        for name, s in grams.items():
            held = self._held.get(name)
            rows = float(held[-1, -1]) if held is not None else 0.0
            if held is None or rows <= 0 or rows >= float(s[-1, -1]):
                return {}
            out[name] = _symmetric(held)
        return out


def _symmetric(total: torch.Tensor) -> torch.Tensor:
    """The accumulated S on the CPU, its constant row copied from its column, exactly symmetric."""
    c = total.shape[0] - 1
    s = total.cpu().clone()
    s[c, :c] = s[:c, c]
    return (s + s.T) / 2


def safetensors_bytes(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> bytes:
    """The safetensors encoding of ``tensors`` (float64 stays F64, anything else becomes F32),
    header keys sorted: the bytes are a function of the content alone."""
    header: dict[str, object] = {"__metadata__": dict(sorted(metadata.items()))}
    blobs: list[bytes] = []
    offset = 0
    for name in sorted(tensors):
        t = tensors[name].detach().to("cpu")
        wide = t.dtype == torch.float64
        array = t.to(torch.float64 if wide else torch.float32).contiguous().numpy()
        data = array.astype("<f8" if wide else "<f4", copy=False).tobytes()
        end = offset + len(data)
        header[name] = {
            "dtype": "F64" if wide else "F32",
            "shape": list(array.shape),
            "data_offsets": [offset, end],
        }
        blobs.append(data)
        offset += len(data)
    head = json.dumps(header, separators=(",", ":"), sort_keys=False).encode()
    head += b" " * (-len(head) % 8)  # the data section starts 8-byte aligned
    return len(head).to_bytes(8, "little") + head + b"".join(blobs)
