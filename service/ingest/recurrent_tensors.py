"""Recurrent modules' weights in a ``name -> array`` mapping (:mod:`graphs.recurrent`).

``nn.LSTM``/``nn.GRU``/``nn.RNN`` save ``{m}.weight_ih_l{k}``, ``{m}.weight_hh_l{k}`` (and
``_reverse`` for the second direction), with biases ``bias_ih_l{k}``/``bias_hh_l{k}``; the cells
(``nn.LSTMCell``…) save ``{m}.weight_ih``/``{m}.weight_hh``. Each matrix becomes a
:class:`~graphs.layers.LayerWeights` named by its parameter (kind ``linear``, bias the matching
``bias_*``); a layer whose pair is incomplete, whose shapes are not 1, 3 or 4 gates, that has a
single hidden unit, non-float or non-finite values, or that belongs to an LSTM with ``proj_size``
(``weight_hr``) is skipped with the reason.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from graphs.layers import LayerWeights, release
from graphs.recurrent import PROJ_REASON, gates_of, param_name, parse
from graphs.report import SkippedLayer
from service.ingest.detect import is_float

RecurrentEntry = LayerWeights | SkippedLayer


def recurrent_entries(tensors: Mapping[str, np.ndarray]) -> dict[str, RecurrentEntry]:
    """For every recurrent weight key of ``tensors`` (``weight_ih``/``weight_hh``/``weight_hr``
    with or without ``_l{k}``/``_reverse``): its layer, or why it is skipped."""
    keys = {k: p for k in tensors if (p := parse(k)) is not None and p[1] == "weight"}
    projected = {p[0] for p in keys.values() if p[2] == "hr"}
    out: dict[str, RecurrentEntry] = {}
    for key, (module, _, mat, suffix) in keys.items():
        ih_key = param_name(module, "weight", "ih", suffix)
        hh_key = param_name(module, "weight", "hh", suffix)
        reason: str | None = None
        if module in projected or mat == "hr":
            reason = PROJ_REASON
        elif ih_key not in tensors or hh_key not in tensors:
            other = hh_key if mat == "ih" else ih_key
            reason = f"recurrent weight without its pair {other}: not analysed"
        else:
            reason = _problem(tensors[ih_key], tensors[hh_key])
        if reason is not None:
            out[key] = SkippedLayer(name=key, reason=reason)
            continue
        arr = tensors[key]
        bias = tensors.get(param_name(module, "bias", mat, suffix))
        if bias is not None and (bias.shape != (arr.shape[0],) or not is_float(bias)):
            bias = None
        out[key] = LayerWeights(name=key, kind="linear", weight=arr, bias=bias)
    return out


def _problem(ih: np.ndarray, hh: np.ndarray) -> str | None:
    got = gates_of(ih.shape, hh.shape)
    if isinstance(got, str):
        return got
    if not (is_float(ih) and is_float(hh)):
        return (
            f"has dtype {ih.dtype}/{hh.dtype}: only floating-point weights are analysed "
            "(dequantize first)"
        )
    if got[1] < 2:
        return "has 1 hidden unit: redundancy needs at least 2"
    for arr in (ih, hh):
        ok = bool(np.isfinite(np.asarray(arr, dtype=np.float32)).all())
        release(arr)
        if not ok:
            return (
                "weights contain NaN or Inf values; fix the checkpoint (e.g. re-export from a "
                "healthy step)"
            )
    return None
