"""Routes of /v1/volumes/{name}/export: start, show, stop a volume's export."""

from __future__ import annotations

from fastapi import APIRouter, Response

from blkserve.api import models
from blkserve.api.deps import ControllerDep
from blkserve.api.errors import ApiError
from blkserve.api.routes import INVALID, NOT_FOUND, UNREADABLE, err

router = APIRouter()


@router.put("/volumes/{name}/export", response_model=models.Export, tags=["exports"],
            summary="Export a volume on a vhost-user socket",
            responses={**UNREADABLE, **NOT_FOUND, **INVALID,
                       **err(409, "The backing is no longer the file or device the "
                                  "volume was created on, has a symlink in its path, or "
                                  "is not a regular file or block device."),
                       **err(502, "The export worker failed to start (its log tail)."),
                       201: {"model": models.Export,
                             "description": "Export started (200: it was running)."}})
async def put_export(controller: ControllerDep, name: str, response: Response,
                     body: models.ExportRequest | None = None):
    """Start (idempotently) a supervised `blkserve export` worker for the
    volume, for VM configs that attach it at boot (`-chardev
    socket,path=SOCKET,reconnect=1 -device vhost-user-blk-pci,chardev=...`)."""
    async with controller.lock(name):
        exp, created = await controller.ensure_export(name, explicit=True)
    response.status_code = 201 if created else 200
    return exp


@router.get("/volumes/{name}/export", response_model=models.Export, tags=["exports"],
            summary="Show a volume's export", responses={**NOT_FOUND, **INVALID})
async def get_export(controller: ControllerDep, name: str):
    controller.get_volume(name)
    exp = controller.export_view(name)
    if exp is None:
        raise ApiError(404, f"volume '{name}' is not exported")
    return exp


@router.delete("/volumes/{name}/export", status_code=204, response_class=Response,
               tags=["exports"], summary="Stop a volume's export",
               responses={**NOT_FOUND, **INVALID,
                          **err(409, "The volume is attached to a VM.")})
async def delete_export(controller: ControllerDep, name: str):
    """Stop the worker: in-flight I/O drains, the socket is removed."""
    async with controller.lock(name):
        await controller.stop_export(name)
    return Response(status_code=204)
