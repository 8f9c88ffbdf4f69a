"""Content-addressed checkpoint storage with streaming, size-limited multipart uploads.

An upload is parsed from the request stream as it arrives (no spooling elsewhere): the ``file``
part goes in chunks to a temp file in ``data_dir/tmp`` while its sha256 is computed, and the
upload is aborted with 413 as soon as it passes the size limit. A validated upload is then moved
to ``data_dir/checkpoints/<sha256>``; the same bytes are stored once.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header

from service.errors import ApiError

MULTIPART_SLACK = 64 * 1024  # headers and boundaries around the file part


@dataclass(frozen=True)
class Upload:
    tmp_path: Path
    sha256: str
    size: int
    filename: str


def too_large(limit: int) -> ApiError:
    return ApiError(
        413,
        f"the upload is larger than the limit of {limit:,} bytes",
        "Upload a smaller checkpoint (e.g. only the model's state_dict, or safetensors), or "
        "raise PRUNEGRAPH_MAX_UPLOAD_BYTES on the server.",
    )


class _FilePart:
    """Multipart callbacks that write the ``file`` part to ``out`` and hash it."""

    def __init__(self, out: IO[bytes], limit: int) -> None:
        self.out = out
        self.limit = limit
        self.digest = hashlib.sha256()
        self.size = 0
        self.filename = ""
        self.found = False
        self.too_large = False
        self._active = False
        self._field = b""
        self._value = b""
        self._headers: dict[bytes, bytes] = {}

    def on_part_begin(self) -> None:
        self._headers = {}
        self._active = False

    def on_header_field(self, data: bytes, start: int, end: int) -> None:
        self._field += data[start:end]

    def on_header_value(self, data: bytes, start: int, end: int) -> None:
        self._value += data[start:end]

    def on_header_end(self) -> None:
        self._headers[self._field.strip().lower()] = self._value.strip()
        self._field = self._value = b""

    def on_headers_finished(self) -> None:
        _, opts = parse_options_header(self._headers.get(b"content-disposition", b""))
        if opts.get(b"name") == b"file" and not self.found:
            self.found = self._active = True
            self.filename = opts.get(b"filename", b"upload").decode("utf-8", "replace")

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        if not self._active or self.too_large:
            return
        chunk = data[start:end]
        self.size += len(chunk)
        if self.size > self.limit:
            self.too_large = True
            return
        self.digest.update(chunk)
        self.out.write(chunk)

    def on_part_end(self) -> None:
        self._active = False


class CheckpointStore:
    """Files by sha256 under ``data_dir/<kind>`` (checkpoints, activations), temp files apart."""

    def __init__(self, data_dir: Path, kind: str = "checkpoints") -> None:
        self.root = data_dir / kind
        self.tmp = data_dir / "tmp"
        self.root.mkdir(parents=True, exist_ok=True)
        self.tmp.mkdir(parents=True, exist_ok=True)

    def path(self, sha256: str) -> Path:
        return self.root / sha256

    def exists(self, sha256: str) -> bool:
        return self.path(sha256).is_file()

    async def receive(
        self,
        content_type: str | None,
        content_length: str | None,
        stream: AsyncIterator[bytes],
        limit: int,
    ) -> Upload:
        """Stream the multipart field ``file`` into a temp file; the caller owns the temp file."""
        ctype, params = parse_options_header(content_type)
        boundary = params.get(b"boundary")
        if ctype != b"multipart/form-data" or not boundary:
            raise ApiError(
                415,
                "the upload is not multipart/form-data",
                "Send the checkpoint as the multipart field 'file', e.g. "
                "curl -F file=@model.pt .../v1/checkpoints.",
            )
        if (
            content_length
            and content_length.isdigit()
            and int(content_length) > limit + (MULTIPART_SLACK)
        ):
            raise too_large(limit)
        fd, name = tempfile.mkstemp(dir=self.tmp, prefix="upload-")
        tmp_path = Path(name)
        try:
            with os.fdopen(fd, "wb") as out:
                part = _FilePart(out, limit)
                parser = MultipartParser(
                    boundary,
                    {
                        "on_part_begin": part.on_part_begin,
                        "on_header_field": part.on_header_field,
                        "on_header_value": part.on_header_value,
                        "on_header_end": part.on_header_end,
                        "on_headers_finished": part.on_headers_finished,
                        "on_part_data": part.on_part_data,
                        "on_part_end": part.on_part_end,
                    },
                )
                async for chunk in stream:
                    parser.write(chunk)
                    if part.too_large:
                        raise too_large(limit)
                parser.finalize()
            if not part.found:
                raise ApiError(
                    422,
                    "the upload has no multipart field 'file'",
                    "Send the checkpoint as the multipart field 'file'.",
                )
        except MultipartParseError as e:
            tmp_path.unlink(missing_ok=True)
            raise ApiError(
                400, f"the multipart body is malformed: {e}", "Send a well-formed upload."
            ) from None
        except BaseException:
            tmp_path.unlink(missing_ok=True)
            raise
        return Upload(tmp_path, part.digest.hexdigest(), part.size, part.filename)

    def commit(self, upload: Upload) -> Path:
        """Move a validated upload to its content address (dropping it if already stored)."""
        final = self.path(upload.sha256)
        if final.is_file():
            upload.tmp_path.unlink(missing_ok=True)
        else:
            os.replace(upload.tmp_path, final)
        return final

    def delete(self, sha256: str) -> None:
        self.path(sha256).unlink(missing_ok=True)
