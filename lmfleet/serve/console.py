"""GET /ui: the web console (a chat playground and a live dashboard), three static files shipped in
the package and served by `lmfleet serve` and by the cluster endpoint alike. The page itself holds
no secret and is served without a key; everything it shows comes from the API, behind the key."""

from __future__ import annotations

from functools import cache
from importlib import resources

from starlette.responses import JSONResponse, Response

from lmfleet.serve.frontend import APIError

FILES = {"index.html": "text/html; charset=utf-8", "console.js": "text/javascript; charset=utf-8",
         "console.css": "text/css; charset=utf-8"}
# Only this server's own files and API: no inline script, no other origin, no framing.
HEADERS = {"Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
                                      "img-src 'self' data:; base-uri 'none'; form-action 'none'; "
                                      "frame-ancestors 'none'",
           "X-Frame-Options": "DENY", "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer",
           "Cache-Control": "no-cache"}


@cache
def _read(name: str) -> bytes:
    return resources.files("lmfleet.serve").joinpath("ui", name).read_bytes()


def console_response(path: str, key_required: bool) -> Response:
    """The file `path` names (/ui and /ui/ are the page; /ui/console.json tells the page whether
    to ask for an API key before its first request); APIError 404 for any other name."""
    name = path.removeprefix("/ui").lstrip("/") or "index.html"
    if name == "console.json":
        return JSONResponse({"api_key_required": key_required}, headers=HEADERS)
    if name not in FILES:
        raise APIError(404, f"the console has only {', '.join(sorted(FILES))} and console.json under /ui/",
                       code="not_found")
    return Response(_read(name), media_type=FILES[name], headers=HEADERS)
