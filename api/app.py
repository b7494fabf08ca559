"""The FastAPI application: create_app assembles the routes (routes/, one
module per resource), the auth and controller dependencies (deps.py), the
error mapping (errors.py) and the request-id middleware (middleware.py)."""

from __future__ import annotations

import contextlib
import logging

from fastapi import APIRouter, FastAPI
from fastapi_offline import FastAPIOffline

from blkserve import __version__, logs
from blkserve.api import deps, errors, metrics, openapi
from blkserve.api.controller import Controller
from blkserve.api.middleware import RequestIdMiddleware
from blkserve.api.routes import AUTH, attachments, exports, qos_groups, service, tracing, volumes

log = logging.getLogger("blkserve.api")

DOCS_URL, REDOC_URL = "/docs", "/redoc"
STATIC_URL = "/docs-assets"  # the docs pages' scripts, styles and icon (public files)

DESCRIPTION = """\
Control plane of blkserve, a vhost-user-blk storage backend.

A **volume** is a sparse file under the state dir (or an allow-listed file or
block device). An **export** serves it on a vhost-user unix socket through a
supervised `blkserve export` worker process. An **attachment** plugs the
export into a running QEMU VM over QMP, or into a running libvirt domain
(hot-plug; the guest sees a new virtio disk whose serial is the volume name,
truncated to 20 bytes).

Every `/v1` route needs `Authorization: Bearer <token>` (env
`BLKSERVE_API_TOKEN` of the daemon, else the file `STATE_DIR/api-token`).
Errors are JSON `{"detail": "..."}`.
"""


# The docs pages may load only from this daemon: ReDoc's footer, for one,
# links an image on a CDN.  (Swagger UI starts from an inline script.)
DOCS_CSP = ("default-src 'self'; script-src 'self' 'unsafe-inline'; "
            "style-src 'self' 'unsafe-inline'; img-src 'self' data:; font-src 'self' data:; "
            "worker-src 'self' blob:; connect-src 'self'")


async def _docs_stay_on_this_host(request, call_next):
    response = await call_next(request)
    if request.url.path in (DOCS_URL, REDOC_URL):
        response.headers["Content-Security-Policy"] = DOCS_CSP
    return response


def create_app(controller: Controller | None, token: str) -> FastAPI:
    """The app serving CONTROLLER (None: only for its OpenAPI document)."""
    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        await controller.start()
        try:
            yield
        finally:
            running = sum(1 for w in controller.workers.values() if w.pid)
            await controller.close()
            logs.log_event(log, "api.stopped", workers_left_running=running,
                           msg=f"stopped; {running} export worker(s) keep serving and are "
                               "adopted by the next daemon")

    # Swagger UI (/docs) and ReDoc (/redoc) with their scripts and styles from
    # the fastapi-offline package (under STATIC_URL), never from a CDN: a
    # hypervisor host usually has no internet access
    app: FastAPI = FastAPIOffline(docs_url=DOCS_URL, redoc_url=REDOC_URL, static_url=STATIC_URL,
                                  title="blkserve", version=__version__,
                                  description=DESCRIPTION, lifespan=lifespan)
    app.state.controller = controller
    app.state.registry = metrics.registry_for(controller)

    # /metrics and the OpenAPI docs: open or behind the token (config
    # metrics_auth, docs_auth; by default open only on a loopback listener)
    guarded = set()
    settings = controller.settings if controller is not None else None
    if settings is not None and settings.route_auth("metrics") == "token":
        guarded.add("/metrics")
    if settings is not None and settings.route_auth("docs") == "token":
        guarded.update((app.openapi_url, DOCS_URL, REDOC_URL, app.swagger_ui_oauth2_redirect_url))
    app.middleware("http")(deps.token_guard(token, guarded))
    app.middleware("http")(_docs_stay_on_this_host)
    for exc, handler in errors.HANDLERS.items():
        app.add_exception_handler(exc, handler)

    app.include_router(service.router)
    v1 = APIRouter(prefix="/v1", dependencies=[deps.bearer], responses=AUTH)
    for resource in (volumes, qos_groups, exports, attachments, tracing):
        v1.include_router(resource.router)
    app.include_router(v1)
    app.add_middleware(RequestIdMiddleware)  # added last: the outermost

    base_openapi = app.openapi

    def document() -> dict:
        if app.openapi_schema is None:
            app.openapi_schema = openapi.integer_bounds(base_openapi())
        return app.openapi_schema

    app.openapi = document
    return app
