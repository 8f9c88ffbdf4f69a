"""Checkpoint ingestion: any supported file -> prunable layers (design §2, §5).

:func:`read_checkpoint` detects the format from the file's content (:mod:`service.ingest.detect`),
reads its tensors (:mod:`service.ingest.torch_file`, :mod:`service.ingest.detect` for safetensors,
:mod:`service.ingest.onnx_file`), and :func:`~service.ingest.layers.extract_layers` turns the
``name -> array`` mapping into :class:`~graphs.layers.LayerWeights` (conv1d/2d/3d and linear) plus
a reason for every layer-like tensor that cannot be analysed. How conv ``groups``, depthwise
producers and BatchNorm pairs are found, with and without checkpoint order, is described in
:mod:`service.ingest.layers` and :mod:`service.ingest.name_order`.

For ONNX, :func:`derived_manifest` derives the manifest from the graph
(:mod:`service.ingest.onnx_manifest`) when shapes allow, else says in a note why there is none.

A folder is read as a sharded safetensors checkpoint (``model.safetensors.index.json`` and its
shards; the index file may also be given itself) or, without an index, as the single
``.safetensors`` file it holds. safetensors tensors are memory-mapped and read layer by layer
(:mod:`service.ingest.safetensors_file`). A ``config.json`` next to the checkpoint gives the
attention heads of transformer blocks (:mod:`service.ingest.model_config`,
:mod:`graphs.transformer`).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from graphs.errors import CheckpointError, InvalidInputError, NoPrunableLayersError
from graphs.layers import LayerWeights
from graphs.manifest import Manifest
from graphs.report import CheckpointInfo, SkippedLayer
from service.ingest import detect, onnx_file, torch_file
from service.ingest.detect import CHUNK, RawCheckpoint
from service.ingest.layers import extract_layers
from service.ingest.model_config import with_config_heads
from service.ingest.safetensors_file import find_index, read_safetensors, read_sharded

__all__ = ["ParsedCheckpoint", "derived_manifest", "read_checkpoint", "sha256_file"]


@dataclass(frozen=True)
class ParsedCheckpoint:
    """A checkpoint read from disk.

    Attributes:
        info: sha256 of the file bytes, format, size, number of tensors and parameters.
        layers: prunable layers in checkpoint order (state-dict order, ONNX graph order; natural
            name order for safetensors, whose writers sort tensors by name).
        skipped: every layer-like weight that is not analysed, with a reason a user understands.
    """

    info: CheckpointInfo
    layers: tuple[LayerWeights, ...]
    skipped: tuple[SkippedLayer, ...]


def read_checkpoint(
    path: str | os.PathLike[str],
    *,
    groups: Mapping[str, int] | None = None,
    name: str | None = None,
    sha256: str | None = None,
) -> ParsedCheckpoint:
    """Read a PyTorch, safetensors or ONNX checkpoint (format detected from content).

    Args:
        path: the file; or a folder with ``model.safetensors.index.json`` and its shards (or
            the index file itself), or a folder holding a single ``.safetensors`` file. The
            digest of a sharded checkpoint covers its shards: sha256 of one line
            ``name<TAB>size<TAB>sha256`` per shard, in name order.
        groups: layer name -> conv groups (from a user manifest); wins over ONNX and inference.
        name: how the file is called in error messages (default: ``path``), e.g. an upload's name.
        sha256: the file's sha256 when the caller knows it (hashed while uploading, or the
            name in the content-addressed store): the file is then not hashed again.

    Raises:
        CheckpointError: missing, unreadable, truncated or corrupt file.
        UnsupportedFormatError: empty file or not one of the three formats.
        UnsafeCheckpointError: a pickle that would run code (refused, never executed).
        NoPrunableLayersError: no conv or linear layer can be analysed.
        InvalidInputError: ``groups`` gives a value that does not fit a layer.
    """
    p = Path(path)
    display = name or os.fspath(path)
    if not p.exists():
        raise CheckpointError(
            f"{display} does not exist.", hint="Check the path of the checkpoint."
        )
    try:
        p, index = _locate(p, display)
        if index is not None:
            raw, shards = read_sharded(index, display)
            size, digest = _shards_digest(shards)
            fmt: detect.Format = "safetensors"
        else:
            size, digest = sha256_file(p) if sha256 is None else (p.stat().st_size, sha256)
            fmt = detect.detect_format(p, display, size)
            raw = _read_file(fmt, p, display)
        layers, skipped = extract_layers(
            raw.tensors,
            groups=groups,
            known_groups=raw.groups,
            known_producers=raw.producers,
            ordered=raw.ordered,
        )
        layers = with_config_heads(layers, (index or p).parent)
    except OSError as e:
        raise CheckpointError(f"{display} cannot be read: {e.strerror or e}.") from e
    except MemoryError:
        raise CheckpointError(
            f"{display} needs more memory to read than this server has.",
            hint="Upload a smaller checkpoint, e.g. only the model's state_dict of dense tensors.",
        ) from None
    skipped = [*raw.skipped, *skipped]
    if raw.n_tensors == 0:
        keys = ", ".join(torch_file.STATE_DICT_KEYS[:4])
        where = (
            f" (it looks at the top level and in entries such as {keys}, up to "
            f"{torch_file.MAX_NESTING} levels deep)"
            if fmt == "pytorch"
            else ""
        )
        raise NoPrunableLayersError(f"{display} holds no tensors prunegraph could find{where}.")
    if not layers:
        why = "; ".join(f"{s.name}: {s.reason}" for s in skipped[:5])
        more = f" (skipped: {why}{'; ...' if len(skipped) > 5 else ''})" if skipped else ""
        raise NoPrunableLayersError(
            f"{display} holds no conv or linear layer that can be analysed{more}."
        )
    info = CheckpointInfo(
        sha256=digest,
        format=fmt,
        size_bytes=size,
        n_tensors=raw.n_tensors,
        n_params=raw.n_params,
    )
    return ParsedCheckpoint(info=info, layers=tuple(layers), skipped=tuple(skipped))


def derived_manifest(
    path: str | os.PathLike[str],
    parsed: ParsedCheckpoint,
    *,
    input_shapes: Sequence[Sequence[int]] | None = None,
) -> tuple[Manifest | None, list[str]]:
    """The manifest an ONNX checkpoint's graph gives, or None and a note saying why not.

    FLOPs and the manifest need every layer's output size; the analysis needs only weights. So
    for a model exported with symbolic dims (or a graph shape inference cannot follow), this
    returns no manifest and a note for the report and the user, unless ``input_shapes`` (one
    concrete shape per graph input) makes the shapes known. Other formats carry no graph: no
    manifest, no note.

    Args:
        path: the checkpoint ``parsed`` was read from.
        parsed: what :func:`read_checkpoint` returned for it.
        input_shapes: the model's input shapes (ONNX only), e.g. ``[[1, 3, 64, 256]]``.

    Raises:
        InvalidInputError: ``input_shapes`` for a checkpoint that is not ONNX, or shapes the
            model's inputs do not take (the message shows the inputs).
    """
    if parsed.info.format != "onnx":
        if input_shapes is not None:
            raise InvalidInputError(
                f"an input shape applies to ONNX models only, not to a {parsed.info.format} "
                "checkpoint",
                hint="Drop the input shape; for FLOPs of a PyTorch model pass a manifest "
                "(`prunegraph manifest --model pkg.module:factory --input-shape ...`).",
            )
        return None, []
    from service.ingest.onnx_manifest import manifest_from_onnx
    from service.ingest.onnx_shapes import ShapesUnknownError

    try:
        return manifest_from_onnx(path, input_shapes=input_shapes, name="the model"), []
    except ShapesUnknownError as e:
        why = e.reason
    except (CheckpointError, InvalidInputError) as e:
        if input_shapes is not None:
            raise
        why = e.message.removeprefix("the model").strip(" :.")
    head = "no manifest (FLOPs unknown, coupling inferred from the weights)"
    if input_shapes is not None:
        return None, [f"{head} even with the given input shape: {why}"]
    return None, [
        f"{head}: {why}. Give the model's input shape (--input-shape, or input_shape in a job "
        "request) to get FLOPs and a manifest; the redundancy analysis needs only the weights"
    ]


def _locate(p: Path, display: str) -> tuple[Path, Path | None]:
    """(the file to read, the sharded checkpoint's index or None)."""
    if p.is_dir():
        index = find_index(p)
        if index is not None:
            return index, index
        single = sorted(p.glob("*.safetensors"))
        if len(single) != 1:
            raise CheckpointError(
                f"{display} is not a regular file, nor a folder with "
                "model.safetensors.index.json or a single .safetensors file.",
                hint="Pass the checkpoint file, or the folder of a sharded safetensors model.",
            )
        return single[0], None
    if not p.is_file():
        raise CheckpointError(f"{display} is not a regular file.")
    return p, find_index(p)


def _read_file(fmt: detect.Format, p: Path, display: str) -> RawCheckpoint:
    reader = {
        "pytorch": torch_file.read_torch,
        "safetensors": read_safetensors,
        "onnx": onnx_file.read_onnx,
    }[fmt]
    return reader(p, display)


def _shards_digest(shards: list[Path]) -> tuple[int, str]:
    """(total size, sha256 of ``name\tsize\tsha256`` lines of the shards in order)."""
    h = hashlib.sha256()
    total = 0
    for shard in shards:
        size, digest = sha256_file(shard)
        total += size
        h.update(f"{shard.name}\t{size}\t{digest}\n".encode())
    return total, h.hexdigest()


def sha256_file(path: Path) -> tuple[int, str]:
    """(size in bytes, hex sha256) of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
            size += len(chunk)
    return size, h.hexdigest()
