"""The redundancy dashboard at ``/``: server-rendered HTML and SVG, one small vendored script.

Pages: ``/`` (the caller's checkpoints and jobs), ``/jobs/{id}`` (summary, per-layer redundancy
of each method side by side, the plan), ``/jobs/{id}/layer?name=L`` (the layer's filter graph
coloured by mrp community, hsc cluster sizes), ``/compare?a=J1&b=J2`` (per-layer redundancy
deltas), ``/login`` and ``POST /logout``. JSON: ``GET /v1/jobs/{id}/layers/{layer}/graph``.
Also the API's offline Swagger UI at ``/docs`` (:mod:`service.api.apidocs`).

Auth: with tokens configured, a page needs a login session or a bearer header, else it redirects
to ``/login``. ``POST /login`` checks the token once and sets the ``prunegraph_session`` cookie
(HttpOnly, SameSite=Strict) to a random session id kept in the database, never the token
(:mod:`service.store.logins`: expiring, revocable); ``POST /logout`` (the form on every page)
revokes it. The API accepts the same cookie for GET requests, which is how ``static/dashboard.js``
polls a running job. Nothing is loaded from another origin (a Content-Security-Policy says so), and
every response carries ``X-Content-Type-Options: nosniff`` (:mod:`service.api.headers`).
"""

from __future__ import annotations

import secrets
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import quote, urlsplit

from fastapi import Depends, FastAPI, Form, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from jinja2 import Environment, PackageLoader, StrictUndefined

from service.api import apidocs
from service.api.deps import ANONYMOUS, State, StateDep, UserDep
from service.api.headers import NoSniff
from service.dashboard import pages
from service.dashboard.layer_graph import LayerGraph, find_job, layer_graph
from service.store import logins

STATIC = Path(__file__).parent / "static"
HEADERS = {
    "Content-Security-Policy": "default-src 'self'; script-src 'self'; style-src 'self'; "
    "img-src 'self' data:; object-src 'none'; base-uri 'none'; form-action 'self'; "
    "frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}

TEMPLATES = Environment(
    loader=PackageLoader("service.dashboard", "templates"),
    autoescape=True,
    undefined=StrictUndefined,
)
TEMPLATES.filters["when"] = pages.when


class LoginRequired(Exception):
    def __init__(self, next_path: str) -> None:
        super().__init__(next_path)
        self.next_path = next_path


def token_user(state: State, token: str) -> str | None:
    """The user of ``token``, or None; compares every known token in constant time."""
    user = None
    for known, name in state.tokens.items():
        if token and secrets.compare_digest(known.encode(), token.strip().encode()):
            user = name
    return user


def page_user(request: Request, state: StateDep) -> str:
    if not state.tokens:
        return ANONYMOUS
    scheme, _, bearer = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() == "bearer":
        user = token_user(state, bearer)
    else:
        cookie = request.cookies.get(logins.SESSION_COOKIE, "")
        user = logins.user_of(state.sessions, cookie, set(state.tokens.values()))
    if user is None:
        query = f"?{request.url.query}" if request.url.query else ""
        raise LoginRequired(request.url.path + query)
    return user


PageUser = Annotated[str, Depends(page_user)]


def _api_user(user: UserDep) -> str:
    """An API caller's user (401 without a known token or login), for ``/openapi.json``."""
    return user


def _base(request: Request) -> str:
    return str(request.scope.get("root_path", "")).rstrip("/")


def _safe_next(path: str) -> str:
    """Only a path on this site (no scheme, host or protocol-relative //) to go back to."""
    parts = urlsplit(path)
    if not path.startswith("/") or path.startswith("//") or "\\" in path or parts.netloc:
        return "/"
    return path


def render(request: Request, state: State, user: str | None, page: pages.Page) -> HTMLResponse:
    context = {"base": _base(request), "user": user, "auth": bool(state.tokens), **page.context}
    html = TEMPLATES.get_template(page.template).render(context)
    return HTMLResponse(html, status_code=page.status, headers=HEADERS)


def _redirect(url: str) -> RedirectResponse:
    return RedirectResponse(url, status_code=303, headers={"Cache-Control": "no-store"})


def login_page(
    request: Request, state: State, next_path: str, error: str | None = None, status: int = 200
) -> Response:
    if not state.tokens:
        return _redirect(_base(request) + _safe_next(next_path))
    context = {"next": _safe_next(next_path), "error": error}
    return render(request, state, None, pages.Page("login.html", context, status))


def _cross_site(request: Request) -> bool:
    origin = request.headers.get("origin")
    return bool(origin) and urlsplit(origin).netloc != request.headers.get("host", "")


def login(request: Request, state: State, token: str, next_path: str) -> Response:
    """Check the token; on success start a session, put its id in the cookie, go to ``next``."""
    if _cross_site(request):
        return login_page(request, state, next_path, "Log in from this site's form.", 403)
    address = request.client.host if request.client is not None else ""
    wait = state.auth_failures.blocked(address) if state.tokens else None
    if wait is not None:  # too many wrong tokens from this address (PRUNEGRAPH_AUTH_FAILURE_LIMIT)
        page = login_page(request, state, next_path, f"Too many failed logins: wait {wait} s.", 429)
        page.headers["Retry-After"] = str(wait)
        return page
    user = token_user(state, token) if state.tokens else None
    if state.tokens and user is None:
        if token.strip():
            state.auth_failures.take(address)
        return login_page(request, state, next_path, "That token is not known to this server.", 401)
    response = _redirect(_base(request) + _safe_next(next_path))
    if user is not None:
        ttl = state.settings.session_ttl_s
        response.set_cookie(
            logins.SESSION_COOKIE,
            logins.start(state.sessions, user, ttl),
            max_age=int(ttl),
            path="/",
            httponly=True,
            samesite="strict",
            secure=request.url.scheme == "https",
        )
    return response


def logout(request: Request, state: State) -> Response:
    """Revoke the session (its row goes: the cookie is worthless even if kept) and clear it."""
    if _cross_site(request):
        return _redirect(_base(request) + "/")
    logins.end(state.sessions, request.cookies.get(logins.SESSION_COOKIE, ""))
    response = _redirect(_base(request) + ("/login" if state.tokens else "/"))
    response.delete_cookie(logins.SESSION_COOKIE, path="/", httponly=True, samesite="strict")
    return response


def graph_json(state: State, job_id: str, user: str, layer: str) -> LayerGraph:
    row = find_job(state.sessions, job_id, user)
    path = state.store.path(row.checkpoint_id) if row is not None else Path()
    return layer_graph(
        state.sessions, job_id, user, layer, path, state.activations.root,
        state.settings.cache_dir(),
    )  # fmt: skip


def install(app: FastAPI) -> None:
    """Add the dashboard's pages, its static files and the layer-graph JSON route to ``app``."""
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    app.add_middleware(NoSniff)
    apidocs.install(app, page_user, _api_user)

    async def to_login(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, LoginRequired)
        return _redirect(f"{_base(request)}/login?next={quote(exc.next_path)}")

    app.add_exception_handler(LoginRequired, to_login)
    page: dict[str, Any] = {"response_class": HTMLResponse, "include_in_schema": False}

    @app.get("/", **page)
    def index(request: Request, state: StateDep, user: PageUser) -> Response:
        return render(request, state, user, pages.index_page(state, user))

    @app.get("/jobs/{job_id}", **page)
    def job(job_id: str, request: Request, state: StateDep, user: PageUser) -> Response:
        return render(request, state, user, pages.job_page(state, user, job_id, _base(request)))

    @app.get("/jobs/{job_id}/part", **page)
    def job_part(job_id: str, request: Request, state: StateDep, user: PageUser) -> Response:
        part = pages.job_page(state, user, job_id, _base(request), part=True)
        return render(request, state, user, part)

    @app.get("/jobs/{job_id}/layer", **page)
    def layer(
        job_id: str, request: Request, state: StateDep, user: PageUser, name: str = ""
    ) -> Response:
        view = pages.layer_page(state, user, job_id, name, _base(request))
        return render(request, state, user, view)

    @app.get("/compare", **page)
    def compare(
        request: Request, state: StateDep, user: PageUser, a: str = "", b: str = ""
    ) -> Response:
        return render(request, state, user, pages.compare_page(state, user, a, b, _base(request)))

    @app.get("/login", **page)
    def get_login(request: Request, state: StateDep, next: str = "/") -> Response:
        return login_page(request, state, next)

    @app.post("/login", **page)
    def post_login(
        request: Request,
        state: StateDep,
        token: Annotated[str, Form()] = "",
        next: Annotated[str, Form()] = "/",
    ) -> Response:
        return login(request, state, token, next)

    @app.post("/logout", **page)
    def post_logout(request: Request, state: StateDep) -> Response:
        return logout(request, state)

    @app.get("/v1/jobs/{job_id}/layers/{layer:path}/graph")
    def get_layer_graph(job_id: str, layer: str, state: StateDep, user: UserDep) -> LayerGraph:
        """A layer's filter similarity graph with a seeded 2-D layout, its nodes carrying the
        report's mrp community and hsc cluster (drawing capped at 400 filters, 5000 edges)."""
        return graph_json(state, job_id, user, layer)
