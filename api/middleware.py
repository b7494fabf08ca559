"""The outermost layer of the app: request ids and the access log."""

from __future__ import annotations

import logging
import time

from fastapi.responses import JSONResponse

from blkserve import logs

log = logging.getLogger("blkserve.api")
access_log = logging.getLogger("blkserve.access")
# Polled routes: their successful requests are access-logged at debug level.
QUIET_PATHS = ("/healthz", "/metrics")


class RequestIdMiddleware:
    """The outermost layer: every request gets an id (the client's
    X-Request-ID if it is a sane token, else a new one), returned in the
    X-Request-ID response header and put as request_id= on every log line
    emitted while the request is handled; then one access line per request
    with method, path, status and duration."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        given = None
        for k, v in scope.get("headers", ()):
            if k == b"x-request-id":
                given = v.decode("latin-1").strip()
                break
        rid = logs.new_request_id(given)
        ctx = logs.begin_request(rid)
        status = 500
        started = False
        start = time.monotonic()

        async def send_with_id(message):
            nonlocal status, started
            if message["type"] == "http.response.start":
                status, started = message["status"], True
                headers = [(k, v) for k, v in message.get("headers", ())
                           if k.lower() != b"x-request-id"]
                headers.append((b"x-request-id", rid.encode()))
                message = {**message, "headers": headers}
            await send(message)
            if message["type"] == "http.response.body" and not message.get("more_body"):
                # answered: the client may act on it at once (kill a worker,
                # say), so callbacks this request started stop naming it
                # before the loop can run them
                ctx.active = False

        try:
            await self.app(scope, receive, send_with_id)
        except Exception as exc:
            # answered here rather than by Starlette's outermost error layer,
            # so the 500 carries the request id too
            log.exception("%s %s failed", scope.get("method"), scope.get("path"))
            if started:
                raise
            await JSONResponse({"detail": f"internal error: {type(exc).__name__}: {exc}"},
                               status_code=500)(scope, receive, send_with_id)
        finally:
            path = scope.get("path", "")
            ms = (time.monotonic() - start) * 1000
            quiet = status < 400 and path in QUIET_PATHS
            client = scope.get("client")
            logs.log_event(
                access_log, "http.request", level=logging.DEBUG if quiet else logging.INFO,
                msg=f"{scope.get('method')} {path} {status}", method=scope.get("method"),
                path=path, status=status, duration_ms=round(ms, 3),
                client=f"{client[0]}:{client[1]}" if client else None, request_id=rid)
            # tasks and callbacks started by this request keep a copy of the
            # context: from now on their lines are no longer this request's
            ctx.active = False
