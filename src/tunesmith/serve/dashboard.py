"""The dashboard: one self-contained HTML page at `GET /dashboard`, served by the API's own app.

The page is static and needs no key to load; everything it shows comes from the authenticated /v1 endpoints,
called by the page's script with the key the user types (kept in sessionStorage only: never in a URL or a
cookie). It lists jobs, files and adapters; a selected job shows its details, its live loss curve (drawn as
inline SVG from the job's `metrics` events), its evaluation report (the fine-tuned model against its base on
the validation file, with 95% intervals, read from the job's result file), its events, its checkpoints with
their validation loss, and a Cancel button (only for a key that can write: the page asks
`/dashboard/key` for its scope). No CDN or external asset: the machines it runs on may have no internet.

Safety: text from the API is only ever inserted with textContent (filenames and messages may hold HTML), and
the page is sent with a nonce-based Content-Security-Policy, so even an injected tag could run no script.
"""

from __future__ import annotations

import secrets
from pathlib import Path

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse

router = APIRouter()


PAGE = (Path(__file__).parent / "dashboard.html").read_text(encoding="utf-8")


@router.get("/dashboard", include_in_schema=False)
def dashboard() -> HTMLResponse:
    nonce = secrets.token_urlsafe(18)  # fresh per response: only this page's own <script>/<style> run
    return HTMLResponse(PAGE.replace("__NONCE__", nonce), headers=security_headers(nonce))


@router.get("/dashboard/key", include_in_schema=False)
def key_scope(request: Request) -> dict[str, str]:
    """What the page's key may do, so it offers only the actions the key can take (Cancel needs `write`)."""
    from tunesmith.serve.access import authenticate

    caller = authenticate(request.app.state.service, request.headers.get("authorization"))
    return {"object": "key", "id": caller.key_id, "scope": str(caller.scope)}


def security_headers(nonce: str) -> dict[str, str]:
    policy = (
        f"default-src 'self'; script-src 'nonce-{nonce}'; style-src 'nonce-{nonce}'; img-src 'self' data:; "
        "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    )
    return {
        "Content-Security-Policy": policy,
        "X-Frame-Options": "DENY",
        "X-Content-Type-Options": "nosniff",
        "Referrer-Policy": "no-referrer",
        "Cache-Control": "no-store",
    }
