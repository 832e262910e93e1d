"""The status page (mlbench_daemon/web/): public, same-origin only, no inline code."""

from __future__ import annotations

import functools
import importlib.resources

import bottle

from mlbench_daemon.api.common import Deps
from mlbench_daemon.api.plugin import register
from mlbench_daemon.openapi import Answer, Auth, Route, error

PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; "
    "img-src 'self'; connect-src 'self'; base-uri 'none'; form-action 'none'; "
    "frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    "Cache-Control": "no-cache",  # revalidated each time: a new daemon version is seen at once
}
PAGE_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".svg": "image/svg+xml",
}


# Third-party files kept as their project ships them (web/vendor/, its licence beside
# them), served under /static/vendor/ so that no name of ours can shadow one of theirs.
VENDOR = "vendor"


@functools.cache
def page_files() -> dict[str, bytes]:
    """{name: bytes} of the status page's static files (package data); the vendored
    ones as ``vendor/<name>``."""
    web = importlib.resources.files("mlbench_daemon") / "web"
    files = {}
    for prefix, folder in (("", web), (VENDOR + "/", web / VENDOR)):
        for f in folder.iterdir():
            if f.is_file() and "." + f.name.rpartition(".")[2] in PAGE_TYPES:
                files[prefix + f.name] = f.read_bytes()
    return files


def _page_file(name: str) -> bytes:
    files = page_files()
    if name not in files:
        raise bottle.HTTPError(404)
    for k, v in PAGE_HEADERS.items():
        bottle.response.set_header(k, v)
    bottle.response.content_type = PAGE_TYPES["." + name.rpartition(".")[2]]
    return files[name]


def page(deps: Deps) -> bytes:
    return _page_file("index.html")


def static(deps: Deps, name: str) -> bytes:
    return _page_file(name)


def vendor(deps: Deps, name: str) -> bytes:
    return _page_file(f"{VENDOR}/{name}")


_TEXT = {"schema": {"type": "string"}}

ROUTES = [
    Route(
        "GET",
        "/",
        page,
        "statusPage",
        "The status page (public; it asks for the token when the API needs one)",
        "page",
        {
            200: Answer(
                "The page's HTML, with a strict Content-Security-Policy.", {"text/html": _TEXT}
            )
        },
        auth=Auth.PUBLIC,
    ),
    Route(
        "GET",
        "/static/{name}",
        static,
        "statusPageFile",
        "One of the status page's files (its HTML, ES modules, CSS, icon)",
        "page",
        {
            200: Answer(
                "The file.",
                {
                    "text/html": _TEXT,
                    "text/javascript": _TEXT,
                    "text/css": _TEXT,
                    "image/svg+xml": _TEXT,
                },
            ),
            404: error("No such file."),
        },
        auth=Auth.PUBLIC,
    ),
    Route(
        "GET",
        "/static/vendor/{name}",
        vendor,
        "statusPageVendorFile",
        "A third-party file of the status page, as its project ships it (uPlot, the charts)",
        "page",
        {
            200: Answer("The file.", {"text/javascript": _TEXT, "text/css": _TEXT}),
            404: error("No such file."),
        },
        auth=Auth.PUBLIC,
    ),
]


def install(app: bottle.Bottle, deps: Deps) -> None:
    register(app, ROUTES, deps)
