"""The interactive API docs (/docs, /redoc) with their assets served by the gateway itself.

FastAPI's default pages load Swagger UI and ReDoc from a public CDN, so in a cluster without
internet they stay blank. The `fastapi-offline` package ships Swagger UI 5 and ReDoc 2 (Swagger
UI 4, the `swagger-ui-bundle` package, cannot render the OpenAPI 3.1 FastAPI emits); its files
are mounted under ASSETS and the two pages are rebuilt to load them from there.
"""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.staticfiles import StaticFiles
from starlette.responses import HTMLResponse
from starlette.routing import Route

ASSETS = "/docs-assets"
_PACKAGE = ("fastapi_offline", "static")  # swagger-ui-bundle.js, swagger-ui.css, ...


def _root(request: Request) -> str:
    # Behind a proxy that strips a prefix, asset URLs must carry it (as FastAPI's own do).
    root: str = request.scope.get("root_path", "")
    return root.rstrip("/")


def _drop_default_pages(api: FastAPI, paths: set[str]) -> None:
    """Removes FastAPI's CDN pages at `paths`; routes match in order, so left in place they
    would answer first. Fails loudly if FastAPI stops registering them this way."""
    routes = api.router.routes
    kept = [r for r in routes if not (isinstance(r, Route) and r.path in paths)]
    if len(routes) - len(kept) != len(paths):
        raise RuntimeError(f"FastAPI's default docs pages not found at {sorted(paths)}")
    routes[:] = kept


def install_docs(api: FastAPI) -> None:
    """Serves /docs and /redoc (at the app's docs_url and redoc_url) from local assets. The
    OAuth2 redirect page stays FastAPI's: it is inline HTML and script, no assets."""
    openapi_url = api.openapi_url
    if openapi_url is None:
        return  # no schema, no pages: FastAPI registered none
    docs_url, redoc_url = api.docs_url, api.redoc_url
    _drop_default_pages(api, {url for url in (docs_url, redoc_url) if url})
    api.mount(ASSETS, StaticFiles(packages=[_PACKAGE]), name="docs-assets")

    async def swagger_ui(request: Request) -> HTMLResponse:
        root = _root(request)
        redirect = api.swagger_ui_oauth2_redirect_url
        return get_swagger_ui_html(
            openapi_url=root + openapi_url,
            title=f"{api.title} - Swagger UI",
            swagger_js_url=f"{root}{ASSETS}/swagger-ui-bundle.js",
            swagger_css_url=f"{root}{ASSETS}/swagger-ui.css",
            swagger_favicon_url=f"{root}{ASSETS}/favicon.png",
            oauth2_redirect_url=root + redirect if redirect else None,
            init_oauth=api.swagger_ui_init_oauth,
            swagger_ui_parameters=api.swagger_ui_parameters,
        )

    async def redoc(request: Request) -> HTMLResponse:
        root = _root(request)
        return get_redoc_html(
            openapi_url=root + openapi_url,
            title=f"{api.title} - ReDoc",
            redoc_js_url=f"{root}{ASSETS}/redoc.standalone.js",
            redoc_favicon_url=f"{root}{ASSETS}/favicon.png",
            with_google_fonts=False,  # fonts.googleapis.com: another CDN
        )

    if docs_url:
        api.add_route(docs_url, swagger_ui, include_in_schema=False)
    if redoc_url:
        api.add_route(redoc_url, redoc, include_in_schema=False)
