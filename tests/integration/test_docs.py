"""The API docs pages load nothing from outside the gateway: their scripts, styles and icon are
served by the gateway itself (an air-gapped cluster has no CDN)."""

from __future__ import annotations

import re
from html.parser import HTMLParser

import pytest

# What a browser accepts for each kind of asset (JavaScript has two registered types; browsers
# run a script of either).
CONTENT_TYPES = {
    ".js": ("text/javascript", "application/javascript"),
    ".css": ("text/css",),
    ".png": ("image/png",),
}


class AssetURLs(HTMLParser):
    """Every `src` and `href` on the page: what a browser fetches while loading it."""

    def __init__(self) -> None:
        super().__init__()
        self.urls: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.urls += [value for name, value in attrs if name in ("src", "href") and value]


def asset_urls(html: str) -> list[str]:
    parser = AssetURLs()
    parser.feed(html)
    return parser.urls


def media_type(content_type: str) -> str:
    return content_type.split(";")[0].strip().lower()


@pytest.mark.parametrize(
    ("page", "expected"),
    [
        ("/docs", {".js", ".css", ".png"}),  # Swagger UI's bundle, its stylesheet, the icon
        ("/redoc", {".js", ".png"}),  # ReDoc's standalone bundle, the icon
    ],
)
def test_docs_pages_load_only_same_origin_assets(gateway, page, expected):
    with gateway() as (client, _):
        r = client.get(page)
        assert r.status_code == 200 and media_type(r.headers["content-type"]) == "text/html"
        urls = asset_urls(r.text)
        # A path on this origin: no scheme, and not "//host/..." (scheme-relative).
        assert urls and all(u.startswith("/") and not u.startswith("//") for u in urls), urls
        assert "http://" not in r.text and "https://" not in r.text
        assert {u[u.rindex(".") :] for u in urls} == expected
        for url in urls:
            asset = client.get(url)
            assert asset.status_code == 200, url
            suffix = url[url.rindex(".") :]
            assert media_type(asset.headers["content-type"]) in CONTENT_TYPES[suffix], url
            assert asset.content, url


def test_swagger_ui_loads_the_gateway_schema_and_its_oauth2_redirect(gateway):
    with gateway() as (client, _):
        page = client.get("/docs").text
        assert "url: '/openapi.json'" in page
        assert "oauth2RedirectUrl: window.location.origin + '/docs/oauth2-redirect'" in page
        redirect = client.get("/docs/oauth2-redirect")
        assert redirect.status_code == 200 and asset_urls(redirect.text) == []
        assert client.get("/openapi.json").json()["openapi"].startswith("3.1")


def test_swagger_ui_is_version_5_or_later_which_renders_openapi_3_1(gateway):
    with gateway() as (client, _):
        (bundle,) = [u for u in asset_urls(client.get("/docs").text) if u.endswith(".js")]
        # Swagger UI 4 shows "Unable to render this definition" for an OpenAPI 3.1 document.
        found = re.search(r'PACKAGE_VERSION:"(\d+)\.', client.get(bundle).text)
        assert found and int(found.group(1)) >= 5
