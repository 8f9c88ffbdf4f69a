"""Checkpoint and activations uploads, lists and deletes (the operations behind the routes).

Files are shared by content between users; adding a user's row and removing an unreferenced
file go through :mod:`service.store.blobs`, so a delete racing an upload of the same bytes never
leaves a row without its file.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

from fastapi import Request
from fastapi.concurrency import run_in_threadpool
from sqlalchemy import delete, func, select
from sqlalchemy.orm import Session

from service.api import limits, pagination
from service.api.schemas import (
    ActivationsOut,
    CheckpointOut,
    CheckpointPage,
    CheckpointSummary,
    checkpoint_out,
)
from service.errors import not_found
from service.store import blobs
from service.store.db import ActivationsRow, CheckpointRow, JobRow
from service.store.files import Upload

if TYPE_CHECKING:
    from service.api.deps import State


def own_checkpoint(s: Session, checkpoint_id: str, user: str) -> CheckpointRow:
    row = s.get(CheckpointRow, (checkpoint_id, user))
    if row is None:
        raise not_found("checkpoint", checkpoint_id)
    return row


def _room_left(state: State, user: str) -> None:
    """Refuse an upload before reading it when the user's quota is already used up."""
    with state.sessions() as s:
        limits.check_bytes(s, user, 1, state.settings.quota_bytes)


def _validate_and_store(state: State, upload: Upload, user: str) -> CheckpointOut:
    from service.ingest.checkpoint import read_checkpoint  # torch is imported at first upload only
    from service.ingest.safetensors_file import refuse_index

    with upload:
        refuse_index(upload.tmp_path, upload.filename)  # its shards would be read from tmp/
        parsed = read_checkpoint(upload.tmp_path, name=upload.filename, sha256=upload.sha256)
        row = CheckpointRow(
            id=upload.sha256,
            owner=user,
            format=parsed.info.format,
            size_bytes=upload.size,
            n_layers=len(parsed.layers),
            skipped_json=json.dumps([sk.model_dump(mode="json") for sk in parsed.skipped]),
        )

        def rows(s: Session) -> None:
            if s.get(CheckpointRow, (upload.sha256, user)) is None:
                limits.check_bytes(s, user, upload.size, state.settings.quota_bytes)
                s.add(row)

        blobs.add(state.sessions, state.store.kind, upload.sha256, rows,
                  lambda: state.store.place(upload))  # fmt: skip
    return checkpoint_out(row)


async def upload_checkpoint(state: State, request: Request, user: str) -> CheckpointOut:
    await run_in_threadpool(_room_left, state, user)
    upload = await state.store.receive(
        request.headers.get("content-type"),
        request.headers.get("content-length"),
        request.stream(),
        state.settings.max_upload_bytes,
    )
    return await run_in_threadpool(_validate_and_store, state, upload, user)


def _store_activations(
    state: State, upload: Upload, user: str, checkpoint_id: str
) -> ActivationsOut:
    from service.ingest.activations import check_capture, read_capture
    from service.ingest.checkpoint import read_checkpoint

    with upload:
        with state.sessions() as s:
            own_checkpoint(s, checkpoint_id, user)
        capture = read_capture(upload.tmp_path, name=upload.filename or "the activations")
        parsed = read_checkpoint(
            state.store.path(checkpoint_id),
            name=f"checkpoint {checkpoint_id}",
            sha256=checkpoint_id,
        )
        check_capture(capture, parsed.layers)
        n_samples = capture.n_samples
        row = ActivationsRow(
            id=upload.sha256, owner=user, checkpoint_id=checkpoint_id,
            n_layers=len(capture.maps or capture.statistics), n_samples=n_samples,
            size_bytes=upload.size,
        )  # fmt: skip

        def rows(s: Session) -> None:
            own_checkpoint(s, checkpoint_id, user)  # not deleted meanwhile
            if s.get(ActivationsRow, (upload.sha256, user, checkpoint_id)) is None:
                limits.check_bytes(s, user, upload.size, state.settings.quota_bytes)
                s.add(row)

        blobs.add(state.sessions, state.activations.kind, upload.sha256, rows,
                  lambda: state.activations.place(upload))  # fmt: skip
    return ActivationsOut(
        id=row.id, checkpoint_id=checkpoint_id, n_layers=row.n_layers, n_samples=n_samples
    )


async def upload_activations(
    state: State, request: Request, user: str, checkpoint_id: str
) -> ActivationsOut:
    await run_in_threadpool(_room_left, state, user)
    upload = await state.activations.receive(
        request.headers.get("content-type"),
        request.headers.get("content-length"),
        request.stream(),
        state.settings.max_upload_bytes,
    )
    return await run_in_threadpool(_store_activations, state, upload, user, checkpoint_id)


def delete_checkpoint(state: State, checkpoint_id: str, user: str) -> None:
    """Delete the user's checkpoint, its jobs and activations; then the files nobody uses."""
    with state.sessions.begin() as s:
        s.delete(own_checkpoint(s, checkpoint_id, user))
        s.execute(delete(JobRow).where(JobRow.checkpoint_id == checkpoint_id, JobRow.owner == user))
        acts = s.scalars(
            select(ActivationsRow.id).where(
                ActivationsRow.checkpoint_id == checkpoint_id, ActivationsRow.owner == user
            )
        ).all()
        s.execute(
            delete(ActivationsRow).where(
                ActivationsRow.checkpoint_id == checkpoint_id, ActivationsRow.owner == user
            )
        )
    # the rows are gone (committed): now each file goes if no row refers to it, under its lock
    blobs.release(
        state.sessions,
        state.store.kind,
        checkpoint_id,
        lambda s: bool(s.scalar(select(func.count()).where(CheckpointRow.id == checkpoint_id))),
        lambda: state.store.delete(checkpoint_id),
    )
    for a in sorted(set(acts)):
        _release_activations(state, a)


def _release_activations(state: State, sha256: str) -> None:
    def in_use(s: Session) -> bool:
        return bool(s.scalar(select(func.count()).where(ActivationsRow.id == sha256)))

    blobs.release(
        state.sessions, state.activations.kind, sha256, in_use,
        lambda: state.activations.delete(sha256),
    )  # fmt: skip


def list_checkpoints(
    state: State, user: str, limit: int = pagination.DEFAULT_LIMIT, cursor: str | None = None
) -> CheckpointPage:
    """One page of the user's checkpoints, newest first."""
    c = CheckpointRow
    cols = (c.id, c.format, c.size_bytes, c.n_layers, c.skipped_json, c.created_at)
    query = pagination.page(
        select(*cols).where(CheckpointRow.owner == user),
        CheckpointRow.created_at, CheckpointRow.id, limit, cursor,
    )  # fmt: skip
    with state.sessions() as s:
        rows = s.execute(query).all()
    items = [
        CheckpointSummary(id=i, format=f, size_bytes=b, n_layers=n,
                          n_skipped=len(json.loads(sk)), created_at=c)
        for i, f, b, n, sk, c in rows[:limit]
    ]  # fmt: skip
    last = rows[limit - 1] if len(rows) > limit else None
    return CheckpointPage(
        items=items, next_cursor=pagination.encode(last[5], last[0]) if last else None
    )
