"""The API description (``/openapi.json``) and its Swagger UI (``/docs``), working offline.

The Swagger UI's script, style and icon are served by this server from the ``fastapi-offline``
package (Swagger UI 5, which reads OpenAPI 3.1): no CDN is contacted, and a
Content-Security-Policy on the page says so to the browser (its one inline script is allowed by
its hash; the spec validator badge, an outside request, is off).

Both follow the auth setting. Without tokens they are public, like the rest of the API. With
tokens they need a caller the API would accept: ``/openapi.json`` the bearer header or the
dashboard's login cookie (else 401, as for any API route), and ``/docs``, a page for browsers,
the login cookie (else it redirects to ``/login`` and back). The description of a private API
is not given to strangers; a client with a token can still fetch it.
"""

from __future__ import annotations

import base64
import hashlib
import re
from importlib.resources import files
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles

ASSETS_URL = "/docs-assets"
ASSETS = Path(str(files("fastapi_offline") / "static"))


def _csp(html: str) -> str:
    hashes = " ".join(
        "'sha256-" + base64.b64encode(hashlib.sha256(code.encode()).digest()).decode() + "'"
        for code in re.findall(r"<script>(.*?)</script>", html, re.S)
    )
    return (
        f"default-src 'self'; script-src 'self' {hashes}; style-src 'self' 'unsafe-inline'; "
        "img-src 'self' data:; connect-src 'self'; object-src 'none'; base-uri 'none'; "
        "frame-ancestors 'none'"
    )


def docs_page(request: Request, title: str) -> HTMLResponse:
    """The Swagger UI page, its assets and the API description all from this server."""
    base = str(request.scope.get("root_path", "")).rstrip("/")
    page = get_swagger_ui_html(
        openapi_url=f"{base}/openapi.json",
        title=f"{title} - API",
        swagger_js_url=f"{base}{ASSETS_URL}/swagger-ui-bundle.js",
        swagger_css_url=f"{base}{ASSETS_URL}/swagger-ui.css",
        swagger_favicon_url=f"{base}{ASSETS_URL}/favicon.png",
        swagger_ui_parameters={"validatorUrl": None},
    )
    html = bytes(page.body).decode()
    headers = {"Content-Security-Policy": _csp(html), "Cache-Control": "no-store"}
    return HTMLResponse(html, headers=headers)


def install(app: FastAPI, page_user: Any, api_user: Any) -> None:
    """Add ``/openapi.json``, ``/docs`` and the Swagger UI assets to ``app`` (made with
    ``docs_url=None, redoc_url=None, openapi_url=None``).

    Args:
        page_user: the dependency that gives a page's user (redirects to the login form).
        api_user: the dependency that gives an API caller's user (401 otherwise).
    """
    from fastapi import Depends

    app.mount(ASSETS_URL, StaticFiles(directory=ASSETS), name="docs-assets")

    @app.get("/openapi.json", include_in_schema=False)
    def openapi(_: str = Depends(api_user)) -> Response:
        return JSONResponse(app.openapi())

    @app.get("/docs", include_in_schema=False, response_class=HTMLResponse)
    def docs(request: Request, _: str = Depends(page_user)) -> Response:
        return docs_page(request, app.title)
