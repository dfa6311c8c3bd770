"""`GET /`: the dashboard page. It holds no data: its script fetches /api with the token the
user gives it, and follows /api/events for live updates. Every asset is koubou's own."""

from __future__ import annotations

from importlib import resources

from starlette.requests import Request
from starlette.responses import HTMLResponse

# Nothing but koubou's own script and style: no inline code, no other origin.
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
       "img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")


async def page(request: Request) -> HTMLResponse:
    """The dashboard's HTML."""
    html = resources.files("koubou_spool.serve").joinpath("templates/dashboard.html").read_text(
        encoding="utf-8")
    return HTMLResponse(html, headers={"content-security-policy": CSP,
                                       "x-content-type-options": "nosniff",
                                       "referrer-policy": "no-referrer"})
