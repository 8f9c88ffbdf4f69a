"""Content-addressed file storage with streaming, size-limited multipart uploads.

An upload is parsed from the request stream as it arrives (no spooling elsewhere): the file part
goes in chunks to a temp file in ``data_dir/tmp`` while its sha256 is computed, small fields are
kept in memory, and the upload is aborted with 413 as soon as the whole body passes its limit
(every part counts, not only the file). A validated upload is then moved to
``data_dir/<kind>/<sha256>`` (:meth:`CheckpointStore.place`, called under the blob's lock, see
:mod:`service.store.blobs`); the same bytes are stored once.

A temp file is locked (``flock``) by the process writing it for as long as it exists there, so
:func:`clean_stale` can remove the temp files of crashed or killed processes (at start and every
few minutes) without touching uploads in progress in this or another process.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import tempfile
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import IO

from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header

from service.errors import MissingPartError, NotMultipartError, TooLargeError, UploadError

MULTIPART_SLACK = 64 * 1024
"""bytes allowed around the file part: headers, boundaries and small fields"""
STALE_GRACE_S = 5.0
"""an unlocked temp file younger than this may be one being created: it is left alone"""


@dataclass
class Upload:
    """A received upload: its temp file (locked while this object holds it) and fields.

    Use it as a context manager (or call :meth:`close`): the temp file is removed at the end
    unless :meth:`CheckpointStore.place` moved it to its content address.
    """

    tmp_path: Path
    sha256: str
    size: int
    filename: str
    fields: dict[str, bytes] = field(default_factory=dict)
    fd: int = -1
    moved: bool = False

    def close(self) -> None:
        if not self.moved:
            self.tmp_path.unlink(missing_ok=True)
        if self.fd >= 0:
            os.close(self.fd)  # releases the lock
            self.fd = -1

    def __enter__(self) -> Upload:
        return self

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


UPLOAD_HINT = (
    "Upload a smaller checkpoint (e.g. only the model's state_dict, or safetensors), or "
    "raise PRUNEGRAPH_MAX_UPLOAD_BYTES on the server."
)


def too_large(limit: int, what: str = "the upload", hint: str = UPLOAD_HINT) -> TooLargeError:
    """(The rest of the body is not read: the HTTP layer closes the connection.)"""
    return TooLargeError(f"{what} is larger than the limit of {limit:,} bytes", hint)


class _Parts:
    """Multipart callbacks: the part named ``file_field`` to ``out`` (hashed), the fields named
    in ``keep`` in memory (up to ``field_limit`` bytes each), every other part dropped."""

    def __init__(
        self, out: IO[bytes], file_field: str, limit: int, keep: frozenset[str], field_limit: int
    ) -> None:
        self.out = out
        self.file_field = file_field.encode()
        self.limit = limit
        self.keep = keep
        self.field_limit = field_limit
        self.field_too_large: str | None = None
        self.digest = hashlib.sha256()
        self.size = 0
        self.filename = ""
        self.found = False
        self.too_large = False
        self.fields: dict[str, bytes] = {}
        self._active = False
        self._name: str | None = None
        self._field = b""
        self._value = b""
        self._headers: dict[bytes, bytes] = {}

    def on_part_begin(self) -> None:
        self._headers = {}
        self._active = False
        self._name = None

    def on_header_field(self, data: bytes, start: int, end: int) -> None:
        self._field += data[start:end]

    def on_header_value(self, data: bytes, start: int, end: int) -> None:
        self._value += data[start:end]

    def on_header_end(self) -> None:
        self._headers[self._field.strip().lower()] = self._value.strip()
        self._field = self._value = b""

    def on_headers_finished(self) -> None:
        _, opts = parse_options_header(self._headers.get(b"content-disposition", b""))
        name = opts.get(b"name", b"")
        if name == self.file_field and not self.found:
            self.found = self._active = True
            self.filename = opts.get(b"filename", b"upload").decode("utf-8", "replace")
        elif name.decode("utf-8", "replace") in self.keep:
            self._name = name.decode("utf-8", "replace")
            self.fields.setdefault(self._name, b"")

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        chunk = data[start:end]
        if self._name is not None:
            if len(self.fields[self._name]) + len(chunk) > self.field_limit:
                self.field_too_large = self._name
            else:
                self.fields[self._name] += chunk
            return
        if not self._active or self.too_large:
            return
        self.size += len(chunk)
        if self.size > self.limit:
            self.too_large = True
            return
        self.digest.update(chunk)
        self.out.write(chunk)

    def on_part_end(self) -> None:
        self._active = False
        self._name = None

    def callbacks(self) -> dict[str, object]:
        names = ("part_begin", "header_field", "header_value", "header_end", "headers_finished",
                 "part_data", "part_end")  # fmt: skip
        return {f"on_{n}": getattr(self, f"on_{n}") for n in names}


def not_multipart(file_field: str) -> NotMultipartError:
    return NotMultipartError(
        "the upload is not multipart/form-data",
        f"Send the file as the multipart field '{file_field}', e.g. "
        f"curl -F {file_field}=@model.pt .../v1/checkpoints.",
    )


class CheckpointStore:
    """Files by sha256 under ``data_dir/<kind>`` (checkpoints, activations), temp files apart."""

    def __init__(self, data_dir: Path, kind: str = "checkpoints") -> None:
        self.kind = kind
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
        file_field: str = "file",
        required: bool = True,
        keep: frozenset[str] = frozenset(),
        field_limit: int = 0,
    ) -> Upload:
        """Stream the multipart body: field ``file_field`` into a locked temp file, the fields
        named in ``keep`` into :attr:`Upload.fields`; the caller closes the returned upload.

        ``limit`` bounds the file, ``field_limit`` each kept field; the whole body may be
        :data:`MULTIPART_SLACK` plus the kept fields larger than ``limit``.
        """
        ctype, params = parse_options_header(content_type)
        boundary = params.get(b"boundary")
        if ctype != b"multipart/form-data" or not boundary:
            raise not_multipart(file_field)
        body_limit = limit + MULTIPART_SLACK + len(keep) * field_limit
        if content_length and content_length.isdigit() and int(content_length) > body_limit:
            raise too_large(limit, "the request body")
        fd, name = tempfile.mkstemp(dir=self.tmp, prefix="upload-")
        fcntl.flock(fd, fcntl.LOCK_EX)
        upload = Upload(Path(name), "", 0, "", fd=fd)
        try:
            with os.fdopen(fd, "wb", closefd=False) as out:
                parts = _Parts(out, file_field, limit, keep, field_limit)
                parser = MultipartParser(boundary, parts.callbacks())  # type: ignore[arg-type]
                total = 0
                async for chunk in stream:
                    total += len(chunk)
                    if total > body_limit:
                        raise too_large(limit, "the request body")
                    parser.write(chunk)
                    if parts.too_large:
                        raise too_large(limit)
                    if parts.field_too_large is not None:
                        raise too_large(
                            field_limit,
                            f"the field '{parts.field_too_large}'",
                            "Send the job's JSON under PRUNEGRAPH_MAX_JSON_BYTES: a large "
                            "manifest goes in the file field 'manifest'.",
                        )
                parser.finalize()
            if required and not parts.found:
                raise MissingPartError(
                    f"the upload has no multipart field '{file_field}'",
                    f"Send the file as the multipart field '{file_field}'.",
                )
        except MultipartParseError as e:
            upload.close()
            raise UploadError(
                f"the multipart body is malformed: {e}", "Send a well-formed upload."
            ) from None
        except BaseException:
            upload.close()
            raise
        upload.sha256, upload.size = parts.digest.hexdigest(), parts.size
        upload.filename, upload.fields = parts.filename, parts.fields
        return upload

    def place(self, upload: Upload) -> None:
        """Move an upload to its content address, or drop it when the bytes are there already.

        Call it under the blob's lock (:func:`service.store.blobs.add`): a file being removed
        concurrently is then either gone (and put back here) or still referenced.
        """
        if not self.path(upload.sha256).is_file():
            os.replace(upload.tmp_path, self.path(upload.sha256))
            upload.moved = True

    def delete(self, sha256: str) -> None:
        self.path(sha256).unlink(missing_ok=True)


def clean_stale(tmp: Path, now: float | None = None) -> int:
    """Remove the temp files no process is writing (left by a crash or a kill); their count."""
    now = time.time() if now is None else now
    removed = 0
    for path in tmp.glob("upload-*"):
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            continue  # gone meanwhile
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            continue  # an upload in progress
        try:
            if now - os.fstat(fd).st_mtime >= STALE_GRACE_S:
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
                    removed += 1
        finally:
            os.close(fd)
    return removed
