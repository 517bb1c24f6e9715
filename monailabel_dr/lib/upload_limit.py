"""Refuse request bodies over ``--conf max_upload_mb`` (HTTP 413) before anything is written.

Uploads reach MONAI Label through its own FastAPI endpoints (``PUT /datastore/image``,
``PUT /datastore/label``, ``POST /infer/{model}`` with a file, ``PUT /session/``...), which
copy the whole multipart body to a temporary file before the app sees it. The limit is
therefore an ASGI middleware around MONAI Label's FastAPI application:

- a request whose ``Content-Length`` is over the limit is answered 413 without handing
  it to MONAI Label: nothing is parsed, spooled or written;
- a body without ``Content-Length`` (chunked) is counted while it streams in and the
  request fails with 413 as soon as it passes the limit (an ``HTTPException`` raised
  from ``receive``, so FastAPI's own handler answers it).

Before answering, the rest of the body is read and thrown away (up to ``DRAIN_BYTES``):
a server that answers and closes while the client is still sending makes the client's
TCP stack see a reset instead of the 413 (Slicer's http.client, ``requests``). A client
that sent ``Expect: 100-continue`` (curl, for large bodies) is answered at once and never
sends the body.

MONAI Label builds its FastAPI ``app`` at import time and creates the app instance
(this package's ``MONAILabelDRApp``) inside the server's lifespan, when Starlette has
already built its middleware stack (``add_middleware`` is refused then). :func:`install`
therefore wraps the built stack (``app.middleware_stack``), or registers the middleware
normally when the application has not started yet. It is installed once per FastAPI
application; the limit itself is read from ``app.state`` on every request, so a new app
instance (tests, ``/reload``) changes it in place.
"""

from __future__ import annotations

import json
import logging
from fastapi import HTTPException

logger = logging.getLogger(__name__)

DRAIN_BYTES = 256 * 2**20   # at most this much of a refused body is read (and discarded) before the 413
_STATE_KEY = "mldr_max_upload_bytes"
_INSTALLED_KEY = "mldr_upload_limit_installed"


class UploadTooLarge(HTTPException):
    def __init__(self, limit: int, size: int | None = None):
        got = f"{size} bytes" if size is not None else f"more than {limit} bytes"
        super().__init__(
            status_code=413,
            detail=f"request body is {got}; the server accepts at most {limit} bytes "
                   f"({limit / 2**20:.4g} MB, --conf max_upload_mb)",
        )


def _header(scope, name: bytes) -> bytes | None:
    for k, v in scope.get("headers") or ():
        if k.lower() == name:
            return v
    return None


def _content_length(scope) -> int | None:
    v = _header(scope, b"content-length")
    try:
        return int(v) if v is not None else None
    except ValueError:
        return None


async def _drain(receive, budget: int) -> None:
    """Read and discard the rest of a request body (at most ``budget`` bytes)."""
    while budget > 0:
        message = await receive()
        if message.get("type") != "http.request":
            return
        budget -= len(message.get("body", b""))
        if not message.get("more_body", False):
            return


class UploadLimitMiddleware:
    """ASGI middleware: 413 for HTTP request bodies over the limit in ``fastapi_app.state``."""

    def __init__(self, app, fastapi_app):
        self.app = app
        self.fastapi_app = fastapi_app

    @property
    def max_bytes(self) -> int:
        return int(getattr(self.fastapi_app.state, _STATE_KEY, 0) or 0)

    async def __call__(self, scope, receive, send):
        limit = self.max_bytes
        if scope.get("type") != "http" or limit <= 0:
            return await self.app(scope, receive, send)
        length = _content_length(scope)
        if length is not None and length > limit:
            logger.warning(f"refused {scope.get('method')} {scope.get('path')}: body of {length} bytes > {limit}")
            if (_header(scope, b"expect") or b"").lower() != b"100-continue":
                await _drain(receive, DRAIN_BYTES)
            return await _send_413(send, UploadTooLarge(limit, length))

        received = 0
        started = False

        async def limited_receive():
            nonlocal received
            message = await receive()
            if message.get("type") == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    logger.warning(f"refused {scope.get('method')} {scope.get('path')}: streamed body > {limit} bytes")
                    if message.get("more_body", False):
                        await _drain(receive, DRAIN_BYTES)
                    raise UploadTooLarge(limit)
            return message

        async def tracking_send(message):
            nonlocal started
            if message.get("type") == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except UploadTooLarge as e:  # raised outside FastAPI's handlers (e.g. by another middleware)
            if started:
                raise
            await _send_413(send, e)


async def _send_413(send, exc: UploadTooLarge) -> None:
    body = json.dumps({"detail": exc.detail}).encode()
    await send({
        "type": "http.response.start",
        "status": 413,
        "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                    (b"connection", b"close")],
    })
    await send({"type": "http.response.body", "body": body})


def install(fastapi_app, max_bytes: int) -> None:
    """Limit request bodies of ``fastapi_app`` (MONAI Label's ``monailabel.app.app``) to ``max_bytes``."""
    setattr(fastapi_app.state, _STATE_KEY, int(max_bytes))
    if getattr(fastapi_app.state, _INSTALLED_KEY, False):
        return
    if getattr(fastapi_app, "middleware_stack", None) is None:
        fastapi_app.add_middleware(UploadLimitMiddleware, fastapi_app=fastapi_app)
    else:  # already serving: put the limit in front of the built stack
        fastapi_app.middleware_stack = UploadLimitMiddleware(fastapi_app.middleware_stack, fastapi_app)
    setattr(fastapi_app.state, _INSTALLED_KEY, True)
    logger.info(f"request bodies limited to {max_bytes} bytes (--conf max_upload_mb)")


def server_fastapi_app():
    """MONAI Label's FastAPI application when this process is the server (``monailabel.app`` imported), else None."""
    import sys

    module = sys.modules.get("monailabel.app")
    return getattr(module, "app", None) if module is not None else None


def install_in_server(max_bytes: int) -> bool:
    """Install on MONAI Label's FastAPI app when this process is the server (``monailabel.app`` imported)."""
    fastapi_app = server_fastapi_app()
    if fastapi_app is None:
        return False
    install(fastapi_app, max_bytes)
    return True
