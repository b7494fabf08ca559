"""The one error the control plane raises to answer a request (an HTTP
status and a `detail` sentence), and how every error becomes the JSON body
`{"detail": "..."}`."""

from __future__ import annotations

import logging

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger("blkserve.api")


class ApiError(Exception):
    def __init__(self, status: int, detail: str):
        super().__init__(detail)
        self.status = status
        self.detail = detail


async def api_error(request: Request, exc: ApiError):
    if exc.status >= 500:
        log.warning("%s %s -> %d: %s", request.method, request.url.path, exc.status,
                    exc.detail)
    return JSONResponse({"detail": exc.detail}, status_code=exc.status)


async def validation_error(request: Request, exc: RequestValidationError):
    parts = []
    for e in exc.errors():
        loc = ".".join(str(x) for x in e.get("loc", ()) if x != "body")
        msg = e.get("msg", "invalid").removeprefix("Value error, ")
        if loc == "name" and e.get("type") == "string_pattern_mismatch":
            msg = ("must be 1 to 63 of a-z, 0-9, '.', '_', '-', starting with a "
                   "letter or digit")
        parts.append(f"{loc}: {msg}" if loc else msg)
    return JSONResponse({"detail": "; ".join(parts) or "invalid request"},
                        status_code=422)


async def http_error(request: Request, exc: StarletteHTTPException):
    return JSONResponse({"detail": str(exc.detail)}, status_code=exc.status_code,
                        headers=getattr(exc, "headers", None))


# Any other exception: a 500 {"detail": "internal error: ..."} from
# middleware.RequestIdMiddleware, logged with its traceback.
HANDLERS = {ApiError: api_error, RequestValidationError: validation_error,
            StarletteHTTPException: http_error}
