"""The safetensors header as prunegraph reads it, for checkpoints and activations files alike.

A safetensors file is an 8-byte little-endian header length, a JSON header, the tensor bytes.
The header comes from the user (an upload): decoding it must fail with a clear error, never with
a crash, whatever its bytes (too deep, not UTF-8, not an object). Standard library only.
"""

from __future__ import annotations

import json

from graphs.errors import corrupt

__all__ = ["decode_header"]


def decode_header(raw: bytes, *, display: str) -> dict[str, object]:
    """The JSON object of a safetensors header (its bytes after the 8-byte length).

    Raises:
        CheckpointError: not valid JSON (nested too deeply included), or not a JSON object.
    """
    try:
        header = json.loads(raw)
    except (ValueError, RecursionError, MemoryError) as e:  # JSONDecodeError, UnicodeDecodeError
        what = "nested too deeply" if isinstance(e, RecursionError) else str(e)[:200]
        raise corrupt(display, f"its safetensors header is not valid JSON ({what})") from None
    if not isinstance(header, dict):
        raise corrupt(display, "its safetensors header is not a JSON object")
    return header
