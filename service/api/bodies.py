"""Bounded request bodies: an ASGI middleware in front of the whole app.

* A body that is not a streamed upload (a job's JSON, a login form, anything else) is read here,
  up to ``max_json_bytes`` (413 beyond, at once when ``Content-Length`` says so), and then handed
  to the app; the app never reads an unbounded body.
* A streamed upload (multipart ``POST /v1/checkpoints``, ``.../activations``, ``/v1/jobs``) is
  passed through: :meth:`service.store.files.CheckpointStore.receive` bounds the whole body itself.
* Any body that sends nothing for ``idle_s`` seconds is closed (408); an upload's temp file is
  then removed by the code that was reading it.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from starlette.responses import JSONResponse

from service.api.errors import ApiError, body

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

STREAMED = re.compile(r"^/v1/(checkpoints(/[^/]+/activations)?|jobs)/?$")
"""paths whose multipart POST bodies are streamed to disk instead of read here"""


def stalled(idle_s: float) -> ApiError:
    return ApiError(
        408,
        f"the request body stalled: nothing arrived for {idle_s:g} s",
        "Send the body without long pauses (the server's limit is PRUNEGRAPH_UPLOAD_IDLE_S).",
        headers={"Connection": "close"},
    )


def json_too_large(limit: int) -> ApiError:
    return ApiError(
        413,
        f"the request body is larger than the limit of {limit:,} bytes",
        "Send a large manifest as a file: a multipart POST /v1/jobs with the job's JSON in the "
        "field 'request' and the manifest in the file field 'manifest' "
        "(curl -F request=@job.json -F manifest=@manifest.json .../v1/jobs), or raise "
        "PRUNEGRAPH_MAX_JSON_BYTES on the server.",
        headers={"Connection": "close"},
    )


class BodyLimits:
    """ASGI middleware bounding request bodies in size and in idle time."""

    def __init__(self, app: ASGIApp, max_json_bytes: int, idle_s: float) -> None:
        self.app = app
        self.max_json_bytes = max_json_bytes
        self.idle_s = idle_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.lower(): v for k, v in scope.get("headers", [])}
        ctype = headers.get(b"content-type", b"").split(b";")[0].strip().lower()
        path = str(scope.get("path", ""))
        root = str(scope.get("root_path", ""))
        if root and path.startswith(root):
            path = path[len(root) :]
        if scope["method"] == "POST" and ctype == b"multipart/form-data" and STREAMED.match(path):
            await self.app(scope, self._idle_limited(receive), send)
            return
        length = headers.get(b"content-length", b"")
        if length.isdigit() and int(length) > self.max_json_bytes:
            await _respond(json_too_large(self.max_json_bytes), scope, receive, send)
            return
        try:
            replay = await self._read(receive)
        except ApiError as e:
            await _respond(e, scope, receive, send)
            return
        await self.app(scope, replay, send)

    def _idle_limited(self, receive: Receive) -> Receive:
        """``receive`` raising 408 when the body stalls (and unchanged once it is complete)."""
        done = False

        async def wrapped() -> Message:
            nonlocal done
            if done:
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), self.idle_s)
            except TimeoutError:
                raise stalled(self.idle_s) from None
            done = message["type"] != "http.request" or not message.get("more_body", False)
            return message

        return wrapped

    async def _read(self, receive: Receive) -> Receive:
        """Read the whole body (bounded, idle-limited); a ``receive`` that replays it."""
        idle = self._idle_limited(receive)
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await idle()
            if message["type"] != "http.request":  # the client went away: let the app see it
                first: Message | None = message
                break
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_json_bytes:
                raise json_too_large(self.max_json_bytes)
            chunks.append(chunk)
            if not message.get("more_body", False):
                first = {"type": "http.request", "body": b"".join(chunks), "more_body": False}
                break

        async def replay() -> Message:
            nonlocal first
            if first is not None:
                out, first = first, None
                return out
            return await receive()

        return replay


async def _respond(error: ApiError, scope: Scope, receive: Receive, send: Send) -> None:
    response = JSONResponse(
        body(error.message, error.hint), status_code=error.status, headers=error.headers
    )
    await response(scope, receive, send)
