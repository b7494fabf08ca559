"""The FastAPI application: routes, auth and error mapping."""

from __future__ import annotations

import contextlib
import hmac
import logging

from fastapi import APIRouter, Depends, FastAPI, Query, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse
from fastapi.security import HTTPBearer
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from blkserve import __version__
from blkserve.api import metrics, models
from blkserve.api.service import ApiError, Controller

log = logging.getLogger("blkserve.api")

DESCRIPTION = """\
Control plane of blkserve, a vhost-user-blk storage backend.

A **volume** is a sparse file under the state dir (or an allow-listed file or
block device). An **export** serves it on a vhost-user unix socket through a
supervised `blkserve export` worker process. An **attachment** plugs the
export into a running QEMU VM over QMP (hot-plug; the guest sees a new
virtio disk whose serial is the volume name, truncated to 20 bytes).

Every `/v1` route needs `Authorization: Bearer <token>` (env
`BLKSERVE_API_TOKEN` of the daemon, else the file `STATE_DIR/api-token`).
Errors are JSON `{"detail": "..."}`.
"""


def _err(status: int, description: str) -> dict:
    return {status: {"model": models.Error, "description": description}}


AUTH = _err(401, "Missing or wrong bearer token.")
NOT_FOUND = _err(404, "No such volume (or attachment).")
# FastAPI documents its own 422 body (a list of errors) for every route with
# parameters; this app answers {"detail": "..."} like every other error.
INVALID = _err(422, "Invalid path, query or body; the detail names the field.")
# A body that is not even JSON text (e.g. not UTF-8) is refused by FastAPI
# with 400 before validation.
UNREADABLE = _err(400, "The body is not readable as JSON text (e.g. not UTF-8).")


def create_app(controller: Controller, token: str) -> FastAPI:
    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        await controller.start()
        try:
            yield
        finally:
            await controller.close()

    app = FastAPI(title="blkserve", version=__version__, description=DESCRIPTION,
                  lifespan=lifespan)
    expected = token.encode()

    def authorized(header: str) -> bool:
        scheme, _, given = header.strip().partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(
            given.strip().encode(), expected)

    @app.middleware("http")
    async def require_token(request: Request, call_next):
        path = request.url.path
        if path == "/v1" or path.startswith("/v1/"):
            if not authorized(request.headers.get("authorization", "")):
                return JSONResponse(
                    {"detail": "missing or wrong bearer token (Authorization: Bearer ...)"},
                    status_code=401, headers={"WWW-Authenticate": "Bearer"})
        return await call_next(request)

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError):
        if exc.status >= 500:
            log.warning("%s %s -> %d: %s", request.method, request.url.path, exc.status,
                        exc.detail)
        return JSONResponse({"detail": exc.detail}, status_code=exc.status)

    @app.exception_handler(RequestValidationError)
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

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        return JSONResponse({"detail": str(exc.detail)}, status_code=exc.status_code,
                            headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception):
        log.exception("%s %s failed", request.method, request.url.path)
        return JSONResponse({"detail": f"internal error: {type(exc).__name__}: {exc}"},
                            status_code=500)

    @app.get("/healthz", response_model=models.Health, tags=["service"],
             summary="Liveness (no token needed)")
    async def healthz():
        return {"status": "ok", "version": __version__}

    registry = metrics.registry_for(controller)

    @app.get("/metrics", tags=["service"], summary="Prometheus metrics (no token needed)",
             response_class=PlainTextResponse)
    async def prometheus_metrics():
        return PlainTextResponse(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    v1 = APIRouter(prefix="/v1", dependencies=[Depends(HTTPBearer(auto_error=False))],
                   responses=AUTH)

    @v1.post("/volumes", status_code=201, response_model=models.Volume, tags=["volumes"],
             summary="Create a volume",
             responses={**UNREADABLE,
                        **_err(403, "backing is not in the config's allowed_backings."),
                        **_err(409, "A volume of that name (or on that backing) exists."),
                        **_err(422, "Invalid name, size or backing."),
                        **_err(507, "Not enough free space for the volume.")})
    async def create_volume(body: models.VolumeCreate):
        """Create a sparse volume file under STATE_DIR/volumes/ (or register an
        allow-listed external file or block device)."""
        async with controller.lock(body.name):
            row = controller.create_volume(body.name, body.size_bytes, body.read_only,
                                           body.queues, body.backing)
            return controller.volume_view(row)

    @v1.get("/volumes", response_model=list[models.Volume], tags=["volumes"],
            summary="List volumes")
    async def list_volumes():
        return [controller.volume_view(v) for v in controller.state.volumes()]

    @v1.get("/volumes/{name}", response_model=models.Volume, tags=["volumes"],
            summary="Show a volume, its export and attachments",
            responses={**NOT_FOUND, **INVALID})
    async def get_volume(name: str):
        return controller.volume_view(controller.get_volume(name))

    @v1.patch("/volumes/{name}", response_model=models.Volume, tags=["volumes"],
              summary="Resize a volume",
              responses={**UNREADABLE, **NOT_FOUND, **INVALID,
                         **_err(409, "Shrinking an exported/attached volume, or a block "
                                     "device backing."),
                         **_err(507, "Not enough free space to grow.")})
    async def resize_volume(name: str, body: models.VolumeResize):
        """Grow (or, when not exported, shrink) the volume's file. A running
        export serves the new capacity at once and a connected QEMU is told
        (vhost-user CONFIG_CHANGE_MSG), so the guest sees the resize online."""
        async with controller.lock(name):
            return controller.volume_view(controller.resize_volume(name, body.size_bytes))

    @v1.delete("/volumes/{name}", status_code=204, response_class=Response,
               tags=["volumes"], summary="Delete a volume",
               responses={**NOT_FOUND, **INVALID,
                          **_err(409, "The volume is exported or attached.")})
    async def delete_volume(name: str):
        """Delete the volume; a file under the state dir is deleted with it, an
        external backing is left alone."""
        async with controller.lock(name):
            controller.delete_volume(name)
        return Response(status_code=204)

    @v1.put("/volumes/{name}/export", response_model=models.Export, tags=["exports"],
            summary="Export a volume on a vhost-user socket",
            responses={**UNREADABLE, **NOT_FOUND, **INVALID,
                       **_err(502, "The export worker failed to start (its log tail)."),
                       201: {"model": models.Export,
                             "description": "Export started (200: it was running)."}})
    async def put_export(name: str, response: Response,
                         body: models.ExportRequest | None = None):
        """Start (idempotently) a supervised `blkserve export` worker for the
        volume, for VM configs that attach it at boot (`-chardev
        socket,path=SOCKET,reconnect=1 -device vhost-user-blk-pci,chardev=...`)."""
        async with controller.lock(name):
            exp, created = await controller.ensure_export(name, explicit=True)
        response.status_code = 201 if created else 200
        return exp

    @v1.get("/volumes/{name}/export", response_model=models.Export, tags=["exports"],
            summary="Show a volume's export", responses={**NOT_FOUND, **INVALID})
    async def get_export(name: str):
        controller.get_volume(name)
        exp = controller.export_view(name)
        if exp is None:
            raise ApiError(404, f"volume '{name}' is not exported")
        return exp

    @v1.delete("/volumes/{name}/export", status_code=204, response_class=Response,
               tags=["exports"], summary="Stop a volume's export",
               responses={**NOT_FOUND, **INVALID,
                          **_err(409, "The volume is attached to a VM.")})
    async def delete_export(name: str):
        """Stop the worker: in-flight I/O drains, the socket is removed."""
        async with controller.lock(name):
            await controller.stop_export(name)
        return Response(status_code=204)

    @v1.post("/volumes/{name}/attachments", status_code=201, response_model=models.Attachment,
             tags=["attachments"], summary="Hot-attach a volume to a running QEMU VM",
             responses={**UNREADABLE, **NOT_FOUND,
                        **_err(409, "Already attached to that VM, or no free hotplug slot."),
                        **_err(422, "Invalid body, or qmp_socket is not a live QMP socket."),
                        **_err(502, "QEMU refused (its message is in detail).")})
    async def attach(name: str, body: models.AttachmentCreate):
        """Export the volume if needed, then over QMP `chardev-add` a socket
        client (reconnect=1) and `device_add vhost-user-blk-pci` on a free
        pcie-root-port (q35), on pci.0 (pc), or on `bus`."""
        async with controller.lock(name):
            return vars(await controller.attach(name, body.qmp_socket, body.bus))

    @v1.get("/volumes/{name}/attachments", response_model=list[models.Attachment],
            tags=["attachments"], summary="List a volume's attachments",
            responses={**NOT_FOUND, **INVALID})
    async def list_attachments(name: str):
        controller.get_volume(name)
        return [vars(a) for a in controller.state.attachments(name)]

    @v1.get("/volumes/{name}/attachments/{att_id}", response_model=models.Attachment,
            tags=["attachments"], summary="Show an attachment",
            responses={**NOT_FOUND, **INVALID})
    async def get_attachment(name: str, att_id: str):
        return vars(controller.get_attachment(name, att_id))

    @v1.delete("/volumes/{name}/attachments/{att_id}", status_code=204,
               response_class=Response, tags=["attachments"], summary="Detach a volume",
               responses={**NOT_FOUND, **INVALID,
                          **_err(502, "QEMU refused (its message is in detail)."),
                          **_err(504, "The guest did not release the disk in time; the "
                                      "attachment is left `detaching`, retry.")})
    async def detach(name: str, att_id: str, timeout_s: float | None = Query(
            default=None, gt=0, le=600, description=(
                "How long to wait for the guest to release the disk (default: the "
                "config's detach_timeout_s, 60 s)."))):
        """`device_del`, wait for DEVICE_DELETED, `chardev-remove`; the export
        stops if it was only there for attachments. A stale attachment (VM
        gone) is just forgotten."""
        async with controller.lock(name):
            await controller.detach(name, att_id, timeout_s)
        return Response(status_code=204)

    @v1.post("/tracing", tags=["tracing"], summary="Trace exports with eBPF",
             responses={**UNREADABLE, **NOT_FOUND,
                        **_err(409, "A trace is already running, or nothing is exported."),
                        **_err(422, "Bad duration or volume name."),
                        **_err(501, "Tracing is not available on this host (the reason).")})
    async def tracing(body: models.TraceRequest) -> dict:
        """Load the bcc programs of ebpf/ for `duration_s` seconds and return, per
        volume and op, log2 latency histograms (descriptor pop to used-ring
        entry, microseconds), with `breakdown` the per-stage histograms, and for
        block-device backings the block-layer time. One trace at a time."""
        return await controller.trace(body.volume, body.duration_s, body.breakdown)

    app.include_router(v1)
    return app
