"""Second-moment statistics in an activations file, checked (issue 14 contract A).

``clients.capture_activations`` writes, per channel-mixing consumer (a conv that is not
depthwise, or a linear layer), a float64 tensor ``gram/<module name>`` holding
S = Σ [x, 1]ᵀ[x, 1] of the consumer's input: shape (c + 1, c + 1), constant last, so
``S[c, c]`` is the number of rows. The file's metadata ``gram_skipped`` (a JSON object) says
which consumers have none and why. Version 3 files may also hold ``holdout/<module name>``: the
S of a held-out part of the same rows (every second batch by default), for cross-fitting.

:func:`read_statistics` checks what the file alone can tell (square, finite, symmetric, a
non-negative diagonal and a positive row count); :func:`read_holdout` checks the held-out
statistics the same way and, against the statistics, that each is a strict part of them;
:func:`check_statistics` checks the names and widths against the checkpoint's layers. The
results, module name -> S, are what the planner takes as ``stats`` and ``holdout_stats``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence

import numpy as np

from graphs.contracts.activations import GRAM_PREFIX, HOLDOUT_PREFIX, gram_key
from graphs.crossfit import split_stats
from graphs.errors import CheckpointError, InvalidInputError
from graphs.layers import LayerWeights

__all__ = ["check_statistics", "read_holdout", "read_statistics", "skipped_statistics"]

_SYMMETRY = 1e-6  # relative to the largest entry
_RECAPTURE = "Capture them again with clients.capture_activations(model, batches).save(path)."
_SAME_MODEL = "Capture the statistics from the model this checkpoint was saved from."
_RECAPTURE_HOLDOUT = (
    "Capture all the data and its held-out part in one go: clients.capture_activations(model, "
    "batches, holdout_every=2).save(path) (or holdout_every=0 for no held-out part)."
)


def read_statistics(tensors: Mapping[str, np.ndarray], display: str) -> dict[str, np.ndarray]:
    """Module name -> S (float64 (c + 1, c + 1)) from the file's ``gram/<module>`` tensors.

    Raises:
        CheckpointError: a Gram that is not square, not finite (NaN, Inf), not symmetric, has a
            negative diagonal or no rows.
    """
    out: dict[str, np.ndarray] = {}
    for key in sorted(k for k in tensors if k.startswith(GRAM_PREFIX)):
        name = key[len(GRAM_PREFIX) :]
        out[name] = _second_moment(tensors[key], f"the statistics of {name!r}", display)
    return out


def read_holdout(
    tensors: Mapping[str, np.ndarray], stats: Mapping[str, np.ndarray], display: str
) -> dict[str, np.ndarray]:
    """Module name -> the held-out S (float64 (c + 1, c + 1)) from the file's
    ``holdout/<module>`` tensors; ``stats``: :func:`read_statistics` of the same file. Empty
    when the file holds none (versions 1 and 2, or captured with ``holdout_every=0``). Each is
    returned as (B + Bᵀ) / 2: exactly symmetric (the same bits when it already is), since the
    check here allows an asymmetry of 1e-6 and the planner's of 1e-9 only.

    Raises:
        CheckpointError: a held-out S checked as :func:`read_statistics` checks S, one without
            statistics of all the data or of another shape than them, one that is not a strict
            part of them (both parts need rows, and ``diag(S − held-out S) >= 0``, the rule of
            :func:`graphs.crossfit.split_stats`), or held-out statistics for only some of the
            consumers with statistics.
    """
    out: dict[str, np.ndarray] = {}
    for key in sorted(k for k in tensors if k.startswith(HOLDOUT_PREFIX)):
        name = key[len(HOLDOUT_PREFIX) :]
        what = f"the held-out statistics of {name!r}"
        held = _second_moment(tensors[key], what, display)
        full = stats.get(name)
        if full is None:
            raise CheckpointError(
                f"{display}: {what} come without statistics of all the data (no tensor "
                f"{gram_key(name)!r})",
                hint=_RECAPTURE_HOLDOUT,
            )
        if held.shape != full.shape:
            raise CheckpointError(
                f"{display}: {what} have shape {list(held.shape)}, its statistics "
                f"{list(full.shape)}: a part of the same rows has the same shape",
                hint=_RECAPTURE_HOLDOUT,
            )
        try:
            split_stats(full, held, repr(name))
        except InvalidInputError as e:
            raise CheckpointError(
                f"{display}: {e.message}: both parts need rows and the rest "
                "(statistics − held-out statistics) a non-negative diagonal",
                hint=_RECAPTURE_HOLDOUT,
            ) from None
        out[name] = (held + held.T) / 2  # the planner's Grams are symmetric to 1e-9 only
    missing = sorted(set(stats) - set(out)) if out else []
    if missing:
        raise CheckpointError(
            f"{display}: held-out statistics for {len(out)} of {len(stats)} consumers; none for "
            + ", ".join(missing[:5])
            + (f" (and {len(missing) - 5} more)" if len(missing) > 5 else "")
            + ": cross-fitting needs them for every consumer or for none",
            hint=_RECAPTURE_HOLDOUT,
        )
    return out


def _second_moment(raw: np.ndarray, what: str, display: str) -> np.ndarray:
    """``raw`` as float64 after checking it is a second-moment matrix; ``what``: how errors name
    it (``the statistics of 'conv1'``)."""
    if raw.ndim != 2 or raw.shape[0] != raw.shape[1] or raw.shape[0] < 2:
        raise CheckpointError(
            f"{display}: {what} have shape {list(raw.shape)}, not (c + 1, c + 1) with c >= 1",
            hint=_RECAPTURE,
        )
    if raw.dtype.kind != "f":
        raise CheckpointError(
            f"{display}: {what} are {raw.dtype}, not floating point", hint=_RECAPTURE
        )
    s = np.array(raw, dtype=np.float64)
    if not np.isfinite(s).all():
        raise CheckpointError(
            f"{display}: {what} contain NaN or Inf",
            hint="Capture them from a model whose forward pass is finite on the batches.",
        )
    scale = float(np.abs(s).max())
    if float(np.abs(s - s.T).max()) > _SYMMETRY * scale:
        raise CheckpointError(
            f"{display}: {what} are not symmetric (a second-moment matrix [x, 1]ᵀ[x, 1] is)",
            hint=_RECAPTURE,
        )
    if float(s[-1, -1]) <= 0 or float(np.diag(s).min()) < 0:
        raise CheckpointError(
            f"{display}: {what} have "
            + ("no rows (S[c, c] <= 0)" if float(s[-1, -1]) <= 0 else "a negative diagonal")
            + ": they are not a second-moment matrix",
            hint=_RECAPTURE,
        )
    return s


def skipped_statistics(meta: Mapping[str, str], display: str) -> dict[str, str]:
    """The file's ``gram_skipped`` metadata: consumer name -> why it has no statistics."""
    text = meta.get("gram_skipped")
    if text is None:
        return {}
    try:
        skipped = json.loads(text)
        if not isinstance(skipped, dict):
            raise ValueError
    except ValueError:
        raise CheckpointError(
            f"{display}: its 'gram_skipped' metadata is not a JSON object", hint=_RECAPTURE
        ) from None
    return {str(k): str(v) for k, v in skipped.items()}


def _widths(layer: LayerWeights) -> set[int]:
    """Input widths the layer may have: in/groups · groups; a conv whose groups nobody knows
    (``groups_source == "default"``) may be grouped: any divisor of its outputs."""
    per_group = int(layer.weight.shape[1])
    if layer.kind == "linear":
        return {per_group}
    if layer.groups_source != "default":
        return {per_group * layer.groups}
    out = layer.n_filters
    return {per_group * g for g in range(1, out + 1) if out % g == 0}


def check_statistics(stats: Mapping[str, np.ndarray], layers: Sequence[LayerWeights]) -> None:
    """Refuse statistics that do not belong to the checkpoint: unknown layers or other widths.

    Raises:
        InvalidInputError: naming the first mismatches and what to do.
    """
    by_name = {layer.name: layer for layer in layers}
    unknown = sorted(set(stats) - set(by_name))
    if unknown:
        raise InvalidInputError(
            "the statistics name layers the checkpoint does not have as conv/linear layers: "
            + ", ".join(unknown[:5])
            + (f" (and {len(unknown) - 5} more)" if len(unknown) > 5 else ""),
            hint=_SAME_MODEL,
        )
    wrong = []
    for name, s in sorted(stats.items()):
        layer = by_name[name]
        c = s.shape[0] - 1
        widths = _widths(layer)
        if c not in widths:
            expected = (
                f"{min(widths)}" if len(widths) == 1 else f"{layer.weight.shape[1]} per conv group"
            )
            wrong.append(f"{name} has {c} inputs in the statistics, {expected} in the checkpoint")
    if wrong:
        raise InvalidInputError(
            f"the statistics do not fit the checkpoint: {'; '.join(wrong[:3])}", hint=_SAME_MODEL
        )
