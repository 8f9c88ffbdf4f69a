"""Feature maps as the data-aware view of a group (design §4: ci, data-aware graphs).

A layer's captured feature maps have shape (samples, channels, pixels) (see
``clients.capture_activations``). A group's maps concatenate its members' maps along the pixel
axis, each member scaled to unit RMS (as :meth:`graphs.layers.LayerGroup.vectors` does for
weights), so every coupled layer's view of the shared channels counts by its size.

For the graph methods a channel's vector is its centred response over all samples and pixels,
so the cosine of two channels is their Pearson correlation. Those vectors are samples·pixels long;
:func:`activation_vectors` returns an exact c-dimensional embedding of them instead (the same
inner products, from the c × c Gram matrix), so wide captures cost no more than c × c memory.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from graphs.errors import InvalidInputError
from graphs.layers import LayerGroup

Activations = Mapping[str, np.ndarray]
"""Layer name -> feature maps (samples, channels, pixels)."""


def group_maps(group: LayerGroup, activations: Activations) -> dict[str, np.ndarray]:
    """The captured arrays :func:`group_features` reads for ``group`` (member name -> maps),
    checked, not converted: what a task needs to build the group's maps elsewhere.

    Raises:
        InvalidInputError: attention heads, a member has no maps, or maps of another width.
    """
    if group.unit in ("heads", "hidden"):
        what = "attention heads" if group.unit == "heads" else "recurrent hidden units"
        raise InvalidInputError(
            f"feature maps of {what} are not supported (group {group.name})",
            hint="Use the weight-based methods (mrp, srr, hsc, l1, fpgm) for transformers and "
            "recurrent layers.",
        )
    members = group.producers  # an FFN's neurons are the channels of up (and gate)
    missing = [m.name for m in members if m.name not in activations]
    if missing:
        raise InvalidInputError(
            f"no feature maps for layer {missing[0]} (group {group.name})",
            hint="Capture activations of every prunable layer (clients.capture_activations "
            "with layers=None) from the model this checkpoint belongs to.",
        )
    for m in members:
        maps = activations[m.name]
        if maps.ndim != 3 or maps.shape[1] != group.n_filters:
            raise InvalidInputError(
                f"feature maps of {m.name} have shape {tuple(maps.shape)}, the layer "
                f"{group.n_filters} channels",
                hint="Capture the activations from the model this checkpoint belongs to.",
            )
    return {m.name: activations[m.name] for m in members}


def group_features(group: LayerGroup, activations: Activations) -> np.ndarray:
    """The group's maps, shape (samples, n_filters, total pixels), float64.

    Members that read the same captured array (e.g. the convs whose outputs one residual add
    sums) contribute it once.

    Raises:
        InvalidInputError: a member has no maps, or maps of another width or sample count.
    """
    parts: list[np.ndarray] = []
    seen: set[int] = set()
    for maps in group_maps(group, activations).values():
        if id(maps) in seen:
            continue
        seen.add(id(maps))
        f = np.asarray(maps, dtype=np.float64)
        rms = float(np.sqrt(np.mean(f * f))) if f.size else 0.0
        parts.append(f / rms if rms > 0 else f)
    if len({p.shape[0] for p in parts}) > 1:  # e.g. a linear member: one sample over the batch
        parts = [p.transpose(1, 0, 2).reshape(1, group.n_filters, -1) for p in parts]
    return parts[0] if len(parts) == 1 else np.concatenate(parts, axis=2)


def activation_vectors(F: np.ndarray) -> np.ndarray:
    """Centred channel responses as vectors, shape (c, c): row i·row j is the inner product of
    channels i and j over all samples and pixels after removing each channel's mean.

    Args:
        F: maps, shape (samples, c, pixels).
    """
    n, c, p = F.shape
    mean = F.mean(axis=(0, 2))
    G = np.zeros((c, c))
    step = max(1, (2**26) // max(c * p, 1))  # ≈ 512 MiB of float64 per chunk at most
    for start in range(0, n, step):
        A = F[start : start + step] - mean[None, :, None]
        G += np.einsum("scp,sdp->cd", A, A, optimize=True)
    G = (G + G.T) / 2
    lam, Q = np.linalg.eigh(G)
    V: np.ndarray = Q * np.sqrt(np.clip(lam, 0.0, None))[None, :]
    # A channel that never varies is dead: an exact zero row, as for all-zero weight filters.
    V[np.diag(G) <= 1e-12 * max(float(np.trace(G)), 1e-300) / c] = 0.0
    return V
