"""Routes of /v1/volumes: create, list, show, resize, delete."""

from __future__ import annotations

from fastapi import APIRouter, Response

from blkserve.api import models
from blkserve.api.deps import ControllerDep
from blkserve.api.rbd import is_rbd
from blkserve.api.routes import INVALID, NOT_FOUND, UNREADABLE, err

router = APIRouter()


@router.post("/volumes", status_code=201, response_model=models.Volume, tags=["volumes"],
             summary="Create a volume",
             responses={**UNREADABLE,
                        **err(403, "backing is not in the config's allowed_backings."),
                        **err(409, "A volume of that name exists, or one on that backing (also "
                                   "through a hard link, another device node, or a "
                                   "partition and its disk)."),
                        **err(422, "Invalid name, size, backing or QoS limits, or no such "
                                   "QoS group."),
                        **err(502, "An RBD volume's Ceph cluster did not answer, or refused "
                                   "the client (its [storage] settings)."),
                        **err(507, "Not enough free space for the volume.")})
async def create_volume(controller: ControllerDep, body: models.VolumeCreate):
    """Create a sparse volume file under STATE_DIR/volumes/, or an image in
    the RBD pool when the config's [storage] backend is rbd (or register an
    allow-listed external file, block device or rbd:POOL/IMAGE), with
    optional QoS limits and group."""
    async with controller.lock(body.name):
        controller.check_qos_group(body.qos_group)
        if controller.wants_rbd(body.backing):
            row = await controller.create_rbd_volume(body.name, body.size_bytes,
                                                     body.read_only, body.queues, body.backing)
        else:
            row = controller.create_volume(body.name, body.size_bytes, body.read_only,
                                           body.queues, body.backing)
        if body.qos is not None or body.qos_group is not None:
            controller.set_volume_qos(body.name, {
                "qos": body.qos.flat() if body.qos is not None else None,
                "qos_group": body.qos_group})
            row = controller.get_volume(body.name)
        return controller.volume_view(row)


@router.get("/volumes", response_model=list[models.Volume], tags=["volumes"],
            summary="List volumes")
async def list_volumes(controller: ControllerDep):
    return [controller.volume_view(v) for v in controller.state.volumes()]


@router.get("/volumes/{name}", response_model=models.Volume, tags=["volumes"],
            summary="Show a volume, its export and attachments",
            responses={**NOT_FOUND, **INVALID})
async def get_volume(controller: ControllerDep, name: str):
    return controller.volume_view(controller.get_volume(name))


@router.patch("/volumes/{name}", response_model=models.Volume, tags=["volumes"],
              summary="Resize a volume, or change its QoS limits or group",
              responses={**UNREADABLE, **NOT_FOUND, **INVALID,
                         **err(409, "Shrinking an exported/attached volume, a block "
                                    "device backing, or a backing replaced since the "
                                    "volume was created."),
                         **err(502, "An RBD volume's Ceph cluster did not answer."),
                         **err(507, "Not enough free space to grow.")})
async def patch_volume(controller: ControllerDep, name: str, body: models.VolumePatch):
    """`size_bytes`: grow (or, when not exported, shrink) the volume's file.
    A running export serves the new capacity at once and a connected QEMU is
    told (vhost-user CONFIG_CHANGE_MSG), so the guest sees the resize online.
    `qos` / `qos_group`: new limits or group, applied to a running export
    within a second without restarting it or disturbing the guest."""
    async with controller.lock(name):
        v = controller.get_volume(name)
        if "qos_group" in body.model_fields_set:
            controller.check_qos_group(body.qos_group)
        if body.size_bytes is not None:
            if is_rbd(v.backing):
                await controller.resize_rbd(name, body.size_bytes)
            else:
                controller.resize_volume(name, body.size_bytes)
        fields = {}
        if "qos" in body.model_fields_set:
            fields["qos"] = body.qos.flat() if body.qos is not None else None
        if "qos_group" in body.model_fields_set:
            fields["qos_group"] = body.qos_group
        if fields:
            controller.set_volume_qos(name, fields)
        return controller.volume_view(controller.get_volume(name))


@router.delete("/volumes/{name}", status_code=204, response_class=Response,
               tags=["volumes"], summary="Delete a volume",
               responses={**NOT_FOUND, **INVALID,
                          **err(409, "The volume is exported or attached."),
                          **err(502, "An RBD volume's Ceph cluster did not answer.")})
async def delete_volume(controller: ControllerDep, name: str):
    """Delete the volume; a file under the state dir is deleted with it, an
    external backing is left alone."""
    async with controller.lock(name):
        if is_rbd(controller.get_volume(name).backing):
            await controller.delete_rbd_volume(name)
        else:
            controller.delete_volume(name)
    return Response(status_code=204)
