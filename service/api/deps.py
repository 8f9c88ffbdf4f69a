"""The request context: the service's :class:`State` (settings, database sessions, stores, the
job runner, rate limiters) and the caller's identity (bearer token, or the dashboard's login
cookie for reads). Routes of the API and the dashboard take them as ``StateDep`` and ``UserDep``.
"""

from __future__ import annotations

import secrets
import time
from typing import Annotated

from fastapi import Depends, Request

from service.api import limits
from service.api.errors import ApiError
from service.jobs.worker import JobRunner
from service.settings import Settings
from service.store import logins
from service.store.db import init_db
from service.store.files import CheckpointStore

__all__ = ["ANONYMOUS", "State", "StateDep", "UserDep", "current_user", "state_of"]

ANONYMOUS = "anonymous"


class State:
    """Everything a request needs; built in the lifespan, stored on ``app.state.pg``."""

    def __init__(self, settings: Settings, clock: limits.Clock = time.monotonic) -> None:
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        self.settings = settings
        self.tokens = settings.token_users()
        self.rate = limits.RateLimiter(settings.rate_limit, clock)
        self.auth_failures = limits.RateLimiter(settings.auth_failure_limit, clock)
        self.store = CheckpointStore(settings.data_dir)
        self.activations = CheckpointStore(settings.data_dir, "activations")
        self.sidecars = CheckpointStore(settings.data_dir, "sidecars")  # compensated plans' folds
        self.engine, self.sessions = init_db(settings.db_url())
        self.runner = JobRunner(
            settings.db_url(),
            self.sessions,
            settings.workers,
            settings.cache_dir(),
            settings.job_lease_s,
            self.store.path,
            self.activations.root,
            settings.dask_scheduler,
            sidecar_dir=self.sidecars.root,
        )


def state_of(request: Request) -> State:
    """The app's :class:`State` (a dependency)."""
    state: State = request.app.state.pg
    return state


def current_user(request: Request, state: Annotated[State, Depends(state_of)]) -> str:
    """The caller's user name; 401 without a known token, 429 past the rate limits."""
    user = _authenticated(request, state)
    wait = state.rate.take(user)
    if wait is not None:
        raise limits.rate_limited(wait)
    return user


def _authenticated(request: Request, state: State) -> str:
    if not state.tokens:
        return ANONYMOUS
    address = request.client.host if request.client is not None else ""
    wait = state.auth_failures.blocked(address)
    if wait is not None:
        raise limits.auth_blocked(wait)
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    user = None
    if scheme.lower() != "bearer" and request.method in ("GET", "HEAD"):
        # the dashboard's browser sends its login's session cookie (service.store.logins); only
        # for reads, so that another site cannot make a logged-in browser change anything (no CSRF)
        cookie = request.cookies.get(logins.SESSION_COOKIE, "")
        user = logins.user_of(state.sessions, cookie, set(state.tokens.values()))
        token = ""
    elif scheme.lower() != "bearer":
        token = ""
    for known, name in state.tokens.items():
        if token and secrets.compare_digest(known.encode(), token.strip().encode()):
            user = name
    if user is None:
        if token:  # a wrong token (a guess): a missing or expired login session is not
            state.auth_failures.take(address)
        raise ApiError(
            401,
            "missing or invalid bearer token",
            "Send the header 'Authorization: Bearer <token>' with a token the server knows.",
            headers={"WWW-Authenticate": "Bearer"},
        )
    return user


StateDep = Annotated[State, Depends(state_of)]
UserDep = Annotated[str, Depends(current_user)]
