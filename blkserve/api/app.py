"""The FastAPI application: routes, auth and error mapping."""

from __future__ import annotations

import contextlib
import hmac
import logging
import time

from fastapi import APIRouter, Depends, FastAPI, Query, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse
from fastapi.security import HTTPBearer
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from blkserve import __version__, logs
from blkserve.api import metrics, models
from blkserve.api.service import ApiError, Controller

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
                client=f"{client[0]}:{client[1]}" if client else None)
            # tasks and callbacks started by this request keep a copy of the
            # context: from now on their lines are no longer this request's
            ctx.active = False

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
            running = sum(1 for w in controller.workers.values() if w.pid)
            await controller.close()
            logs.log_event(log, "api.stopped", workers_left_running=running,
                           msg=f"stopped; {running} export worker(s) keep serving and are "
                               "adopted by the next daemon")

    app = FastAPI(title="blkserve", version=__version__, description=DESCRIPTION,
                  lifespan=lifespan)
    expected = token.encode()

    def authorized(header: str) -> bool:
        scheme, _, given = header.strip().partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(
            given.strip().encode(), expected)

    # /metrics and the OpenAPI docs: open or behind the token (config
    # metrics_auth, docs_auth; by default open only on a loopback listener)
    guarded = set()
    settings = controller.settings if controller is not None else None  # None: schema only
    if settings is not None and settings.route_auth("metrics") == "token":
        guarded.add("/metrics")
    if settings is not None and settings.route_auth("docs") == "token":
        guarded.update(p for p in (app.openapi_url, app.docs_url, app.redoc_url,
                                   app.swagger_ui_oauth2_redirect_url) if p)

    @app.middleware("http")
    async def require_token(request: Request, call_next):
        path = request.url.path
        if path == "/v1" or path.startswith("/v1/") or path in guarded:
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

    # Any other exception: a 500 {"detail": "internal error: ..."} from
    # RequestIdMiddleware, logged with its traceback.

    @app.get("/healthz", response_model=models.Health, tags=["service"],
             summary="Liveness (no token needed)")
    async def healthz():
        return {"status": "ok", "version": __version__}

    registry = metrics.registry_for(controller)

    @app.get("/metrics", tags=["service"], summary="Prometheus metrics (token: see the "
                                                   "config's metrics_auth)",
             response_class=PlainTextResponse)
    async def prometheus_metrics():
        return PlainTextResponse(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    v1 = APIRouter(prefix="/v1", dependencies=[Depends(HTTPBearer(auto_error=False))],
                   responses=AUTH)

    @v1.post("/volumes", status_code=201, response_model=models.Volume, tags=["volumes"],
             summary="Create a volume",
             responses={**UNREADABLE,
                        **_err(403, "backing is not in the config's allowed_backings."),
                        **_err(409, "A volume of that name exists, or one on that backing (also "
                                    "through a hard link, another device node, or a "
                                    "partition and its disk)."),
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
                         **_err(409, "Shrinking an exported/attached volume, a block "
                                     "device backing, or a backing replaced since the "
                                     "volume was created."),
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
                       **_err(409, "The backing is no longer the file or device the "
                                   "volume was created on, has a symlink in its path, or "
                                   "is not a regular file or block device."),
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
             tags=["attachments"], summary="Hot-attach a volume to a running QEMU VM, "
                                           "libvirt domain or Xen domain",
             responses={**UNREADABLE, **NOT_FOUND,
                        **_err(403, "qmp_socket is not under the config's qmp_socket_dirs, "
                                    "the libvirt socket not in its libvirt_sockets, or what "
                                    "listens there is not QEMU (a root libvirt daemon)."),
                        **_err(409, "Already attached to that VM, no free hotplug slot, or "
                                    "(libvirt) the domain does not share its memory, is not "
                                    "running, or its QEMU user cannot reach the socket, or "
                                    "(xen) the volume is exported or attached elsewhere, or "
                                    "the domain has that disk already."),
                        **_err(422, "Invalid body, qmp_socket is not a live QMP socket, or "
                                    "no such libvirt or Xen domain."),
                        **_err(501, "libvirt: the libvirt Python bindings are not "
                                    "installed (pip install libvirt-python); xen: the Xen "
                                    "libraries or xenstored are missing (not a Xen dom0)."),
                        **_err(502, "QEMU or libvirt refused or did not answer in time, "
                                    "libvirt is unreachable, the Xen blkif worker failed to "
                                    "start, or the attach failed otherwise (the message is in "
                                    "detail; an export it started is stopped)."),
                        **_err(503, "libvirt: every libvirt call thread is still busy (a "
                                    "libvirt daemon that does not answer); retry later."),
                        **_err(504, "libvirt: the hot-plug got no answer in time; the "
                                    "attachment stays `attaching`, DELETE it to undo.")})
    async def attach(name: str, body: models.AttachmentCreate):
        """Export the volume if needed, then plug it into the VM.

        `qemu`: over QMP `chardev-add` a socket client (reconnect=1) and
        `device_add vhost-user-blk-pci` on a free pcie-root-port (q35), on
        pci.0 (pc), or on `bus`.

        `libvirt`: `attachDeviceFlags(VIR_DOMAIN_AFFECT_LIVE)` of a
        `<disk type='vhostuser'>` on the export's socket (reconnecting) with
        the first free `vdX` target; the socket is given to the user the
        domain's QEMU runs as (its DAC label).

        `xen`: a blkif worker (`blkserve export --xen-domain`) creates the
        vbd in xenstore and serves it; the guest's blkfront connects and the
        disk appears as `vdev`. The daemon must run in dom0."""
        async with controller.lock(name):
            if isinstance(body, models.XenAttachmentCreate):
                return vars(await controller.attach_xen(name, body.domain, body.vdev))
            if isinstance(body, models.LibvirtAttachmentCreate):
                return vars(await controller.attach_libvirt(name, body.domain, body.uri))
            return vars(await controller.attach(name, body.qmp_socket, body.bus))

    @v1.get("/volumes/{name}/libvirt-xml", response_model=models.LibvirtDiskXml,
            tags=["attachments"], summary="libvirt disk XML of a volume (cold attach)",
            responses={**NOT_FOUND, **INVALID})
    async def libvirt_xml(name: str, target: str = Query(
            default="vdb", pattern=r"^vd[a-z]{1,3}$", description=(
                "`<target dev>` to put in the XML; must be free in the domain."))):
        """The `<disk type='vhostuser'>` element that gives a libvirt domain this
        volume from its next start (`virsh attach-device DOMAIN FILE --config`,
        or paste it into `<devices>`). The export must run then: PUT
        .../export (a hot attach does not need this route)."""
        return controller.libvirt_xml(name, target)

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
                          **_err(501, "libvirt: the libvirt Python bindings are not "
                                      "installed."),
                          **_err(403, "libvirt: its socket is no longer allowed, or what "
                                      "listens there is not a root libvirt daemon."),
                          **_err(502, "QEMU or libvirt refused, or libvirt is unreachable "
                                      "(the message is in detail)."),
                          **_err(503, "libvirt: every libvirt call thread is still busy."),
                          **_err(504, "The guest did not release the disk in time; the "
                                      "attachment is left `detaching`, retry.")})
    async def detach(name: str, att_id: str, timeout_s: float | None = Query(
            default=None, gt=0, le=600, description=(
                "How long to wait for the guest to release the disk (default: the "
                "config's detach_timeout_s, 60 s)."))):
        """`device_del`, wait for DEVICE_DELETED, `chardev-remove` (libvirt:
        `detachDeviceAlias`, wait until the disk has left the live domain XML);
        the export stops if it was only there for attachments. A stale
        attachment (VM gone) is just forgotten."""
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
    app.add_middleware(RequestIdMiddleware)  # added last: the outermost

    base_openapi = app.openapi

    def openapi() -> dict:
        if app.openapi_schema is None:
            app.openapi_schema = _integer_bounds(base_openapi())
        return app.openapi_schema

    app.openapi = openapi
    return app


_NUMBER_KEYWORDS = ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum",
                    "multipleOf")


def _integer_bounds(node):
    """FastAPI's OpenAPI model holds bounds as floats (`maximum: 1.15e+18`,
    `multipleOf: 512.0`): give an integer schema's bounds back as integers,
    as pydantic wrote them, so clients and fuzzers generate integers."""
    if isinstance(node, dict):
        if node.get("type") == "integer":
            for k in _NUMBER_KEYWORDS:
                v = node.get(k)
                if isinstance(v, float) and v.is_integer():
                    node[k] = int(v)
        if isinstance(node.get("multipleOf"), float) and node["multipleOf"].is_integer() \
                and any(s.get("type") == "integer" for s in node.get("anyOf", ())):
            node["multipleOf"] = int(node["multipleOf"])  # `int | None` puts it outside
        for v in node.values():
            _integer_bounds(v)
    elif isinstance(node, list):
        for v in node:
            _integer_bounds(v)
    return node
