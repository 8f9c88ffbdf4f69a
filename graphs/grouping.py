"""Which layers are scored together (design §2 Manifest, §4 filter vectors).

Without a manifest every layer is its own group with coupling ``unknown``, except depthwise
convs: they have no channel count of their own (their width is fixed by their input), so they
are scored inside the group of their producer (coupling ``inferred``), and never alone from their
9- or 25-value kernels. The producer is ``LayerWeights.producer`` when the reader names it; a
depthwise conv whose reader could not tell (``groups_source`` inferred, onnx or manifest, producer
None) is skipped with the reason; only hand-built layers (``groups_source`` default) fall back to
the nearest preceding non-depthwise layer of the same width.

Transformer blocks found by name (:mod:`graphs.transformer`) become one group each: an FFN's
neurons, an attention block's heads (or k/v head groups); attention projections whose heads are
unknown are skipped with the reason. With a manifest, its channel groups of a block are merged
into the block's group first (:func:`graphs.transformer.adapt_manifest`).

Recurrent layers (LSTM/GRU/RNN and cells, :mod:`graphs.recurrent`) become one group of hidden
units per layer and direction; with a manifest, its ``hidden`` groups decide.
"""

from __future__ import annotations

from collections.abc import Sequence

from graphs.layers import LayerGroup, LayerWeights
from graphs.manifest import Manifest
from graphs.recurrent import manifest_groups as recurrent_manifest_groups
from graphs.recurrent import recurrent_groups
from graphs.report import SkippedLayer
from graphs.transformer import (
    adapt_manifest,
    block_group,
    find_blocks,
    manifest_block_groups,
)


def build_groups(
    layers: Sequence[LayerWeights], manifest: Manifest | None = None
) -> tuple[list[LayerGroup], list[SkippedLayer]]:
    """Group layers for scoring.

    Args:
        layers: prunable layers in checkpoint (data-flow) order.
        manifest: when given, its channel groups decide (coupling ``manifest``): each group's
            producers are scored together; layers it does not mention are grouped as without one.

    Returns:
        ``(groups, skipped)``: groups in the order of their producers; depthwise convs with no
        producer are skipped with the reason.
    """
    if manifest is not None:
        return _manifest_groups(layers, manifest)
    members: dict[str, list[LayerWeights]] = {}
    order: list[str] = []
    skipped: list[SkippedLayer] = []
    last_producer: LayerWeights | None = None
    blocks: dict[str, LayerGroup] = {}  # by its first member (q or up)
    in_block: set[str] = set()
    for b in find_blocks(layers):
        made = block_group(b)
        if made is None:
            continue
        in_block.update(m.name for m in b.members)
        if isinstance(made, str):
            skipped += [SkippedLayer(name=m.name, reason=made) for m in b.members]
        else:
            blocks[made.name] = made
    recurrent, in_recurrent = recurrent_groups(layers)
    blocks |= recurrent
    in_block |= in_recurrent
    for layer in layers:
        if layer.name in in_block:
            if layer.name in blocks:
                members[layer.name] = [layer]
                order.append(layer.name)
            continue
        if not layer.is_depthwise:
            members[layer.name] = [layer]
            order.append(layer.name)
            last_producer = layer
            continue
        if layer.producer is not None:
            head = members.get(layer.producer)
            if head is not None and head[0].n_filters == layer.n_filters:
                head.append(layer)
            else:
                skipped.append(
                    SkippedLayer(
                        name=layer.name,
                        reason=(
                            f"depthwise conv whose producer {layer.producer!r} was not analysed "
                            "(skipped or of another width); it is never scored alone"
                        ),
                    )
                )
        elif layer.groups_source in ("inferred", "onnx", "manifest"):
            # a reader looked for the producer and could not tell: never guess from file order
            skipped.append(
                SkippedLayer(
                    name=layer.name,
                    reason=(
                        "depthwise conv whose producer could not be determined from the "
                        "checkpoint; it is never scored alone: pass a manifest that names it"
                    ),
                )
            )
        elif last_producer is not None and last_producer.n_filters == layer.n_filters:
            members[last_producer.name].append(layer)
        else:
            skipped.append(
                SkippedLayer(
                    name=layer.name,
                    reason=(
                        "depthwise conv with no preceding layer of "
                        f"{layer.n_filters} channels to be scored with; pass a manifest that "
                        "names its producer"
                    ),
                )
            )
    groups = [
        blocks.get(name)
        or LayerGroup(
            name=name,
            members=tuple(members[name]),
            coupling="inferred" if len(members[name]) > 1 else "unknown",
        )
        for name in order
    ]
    return groups, skipped


def _manifest_groups(
    layers: Sequence[LayerWeights], manifest: Manifest
) -> tuple[list[LayerGroup], list[SkippedLayer]]:
    manifest = adapt_manifest(layers, manifest)
    blocks, skipped, covered, axes = manifest_block_groups(layers, manifest)
    hidden, hidden_skipped, hidden_names = recurrent_manifest_groups(layers, manifest)
    blocks |= hidden
    skipped += hidden_skipped
    covered |= hidden_names
    by_name = {layer.name: layer for layer in layers}
    groups: list[LayerGroup] = []
    for g in manifest.groups:
        if g.unit == "hidden":
            if g.id in blocks:
                groups.append(blocks[g.id])
            continue
        covered.update(g.producers)
        if g.id in blocks:
            groups.append(blocks[g.id])
            continue
        if any((pa.param, pa.axis) in axes for pa in g.params):
            continue  # channels of a block that cannot be analysed as one
        missing = [p for p in g.producers if p not in by_name]
        if missing:
            skipped.append(
                SkippedLayer(
                    name=g.producers[0],
                    reason=(
                        f"the manifest's group {g.id} needs {', '.join(missing)}, which the "
                        "checkpoint does not hold (skipped, NaN or another model): rebuild the "
                        "manifest from this model"
                    ),
                )
            )
            continue
        members = tuple(by_name[p] for p in g.producers)
        if any(m.n_filters != g.channels for m in members):
            skipped.append(
                SkippedLayer(
                    name=g.producers[0],
                    reason=f"the manifest says {g.channels} channels, the checkpoint differs",
                )
            )
            continue
        groups.append(
            LayerGroup(name=g.producers[0], members=members, coupling="manifest", group_id=g.id)
        )
    rest, rest_skipped = build_groups([layer for layer in layers if layer.name not in covered])
    return groups + rest, skipped + rest_skipped
