"""Routes of /v1/qos-groups: limits several volumes share."""

from __future__ import annotations

from fastapi import APIRouter, Response

from blkserve.api import models
from blkserve.api.deps import ControllerDep
from blkserve.api.routes import INVALID, UNREADABLE, err

router = APIRouter()
GROUP_NOT_FOUND = err(404, "No such QoS group.")


@router.post("/qos-groups", status_code=201, response_model=models.QosGroup,
             tags=["qos"], summary="Create a QoS group",
             responses={**UNREADABLE, **INVALID, **err(409, "The group exists.")})
async def create_qos_group(controller: ControllerDep, body: models.QosGroupCreate):
    """A group's limits hold for its member volumes together (each volume's
    export worker takes its requests' cost from the group's shared token
    buckets). Volumes join with `PATCH /v1/volumes/NAME {"qos_group": ...}`."""
    async with controller.lock(f"qos-group/{body.name}"):
        return controller.qos_group_view(controller.create_qos_group(body.name,
                                                                     body.qos.flat()))


@router.get("/qos-groups", response_model=list[models.QosGroup], tags=["qos"],
            summary="List QoS groups")
async def list_qos_groups(controller: ControllerDep):
    return [controller.qos_group_view(g) for g in controller.state.qos_groups()]


@router.get("/qos-groups/{name}", response_model=models.QosGroup, tags=["qos"],
            summary="Show a QoS group and its members",
            responses={**GROUP_NOT_FOUND, **INVALID})
async def get_qos_group(controller: ControllerDep, name: str):
    return controller.qos_group_view(controller.get_qos_group(name))


@router.patch("/qos-groups/{name}", response_model=models.QosGroup, tags=["qos"],
              summary="Change a QoS group's limits",
              responses={**UNREADABLE, **GROUP_NOT_FOUND, **INVALID})
async def patch_qos_group(controller: ControllerDep, name: str, body: models.QosGroupPatch):
    """The members' running exports use the new limits within 20 ms."""
    async with controller.lock(f"qos-group/{name}"):
        return controller.qos_group_view(controller.set_qos_group(name, body.qos.flat()))


@router.delete("/qos-groups/{name}", status_code=204, response_class=Response, tags=["qos"],
               summary="Delete a QoS group",
               responses={**GROUP_NOT_FOUND, **INVALID,
                          **err(409, "The group still has member volumes.")})
async def delete_qos_group(controller: ControllerDep, name: str):
    async with controller.lock(f"qos-group/{name}"):
        controller.delete_qos_group(name)
    return Response(status_code=204)
