"""What the routes depend on: the controller (and the metrics registry) of
the app, and the bearer token that guards /v1 (and, by configuration,
/metrics and the docs)."""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import Depends, Request
from fastapi.responses import JSONResponse
from fastapi.security import HTTPBearer
from prometheus_client import CollectorRegistry

from blkserve.api.controller import Controller

# Documents the bearer scheme in the OpenAPI (the check is require_token's).
bearer = Depends(HTTPBearer(auto_error=False))


def get_controller(request: Request) -> Controller:
    return request.app.state.controller


def get_registry(request: Request) -> CollectorRegistry:
    return request.app.state.registry


ControllerDep = Annotated[Controller, Depends(get_controller)]
RegistryDep = Annotated[CollectorRegistry, Depends(get_registry)]


def token_guard(token: str, guarded: set[str]):
    """The HTTP middleware that answers 401 to a request for /v1 (or a path
    in GUARDED) without `Authorization: Bearer TOKEN`."""
    expected = token.encode()

    def authorized(header: str) -> bool:
        scheme, _, given = header.strip().partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(
            given.strip().encode(), expected)

    async def require_token(request: Request, call_next):
        path = request.url.path
        if path == "/v1" or path.startswith("/v1/") or path in guarded:
            if not authorized(request.headers.get("authorization", "")):
                return JSONResponse(
                    {"detail": "missing or wrong bearer token (Authorization: Bearer ...)"},
                    status_code=401, headers={"WWW-Authenticate": "Bearer"})
        return await call_next(request)

    return require_token
