"""Routes of /v1/volumes/{name}/attachments (and the libvirt cold-attach XML):
hot-attach to a VM through its hypervisor's adapter, list, show, detach."""

from __future__ import annotations

from fastapi import APIRouter, Query, Response

from blkserve.api import models
from blkserve.api.deps import ControllerDep
from blkserve.api.routes import INVALID, NOT_FOUND, UNREADABLE, err

router = APIRouter()


@router.post("/volumes/{name}/attachments", status_code=201, response_model=models.Attachment,
             tags=["attachments"], summary="Hot-attach a volume to a running QEMU VM, "
                                           "libvirt domain or Xen domain",
             responses={**UNREADABLE, **NOT_FOUND,
                        **err(403, "qmp_socket is not under the config's qmp_socket_dirs, "
                                   "the libvirt socket not in its libvirt_sockets, or what "
                                   "listens there is not QEMU (a root libvirt daemon)."),
                        **err(409, "Already attached to that VM, no free hotplug slot, or "
                                   "(libvirt) the domain does not share its memory, is not "
                                   "running, or its QEMU user cannot reach the socket, or "
                                   "(xen) the volume is exported or attached elsewhere, or "
                                   "the domain has that disk already, or (migrate_from) "
                                   "that attachment is not an attached QEMU one, its VM is "
                                   "gone, or the volume is already migrating."),
                        **err(422, "Invalid body, qmp_socket is not a live QMP socket, "
                                   "no such libvirt or Xen domain, or bus given with "
                                   "migrate_from."),
                        **err(501, "libvirt: the libvirt Python bindings are not "
                                   "installed (pip install libvirt-python); xen: the Xen "
                                   "libraries or xenstored are missing (not a Xen dom0)."),
                        **err(502, "QEMU or libvirt refused or did not answer in time, "
                                   "libvirt is unreachable, the Xen blkif worker failed to "
                                   "start, or the attach failed otherwise (the message is in "
                                   "detail; an export it started is stopped)."),
                        **err(503, "libvirt: every libvirt call thread is still busy (a "
                                   "libvirt daemon that does not answer); retry later."),
                        **err(504, "libvirt: the hot-plug got no answer in time; the "
                                   "attachment stays `attaching`, DELETE it to undo.")})
async def attach(controller: ControllerDep, name: str, body: models.AttachmentCreate):
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
    disk appears as `vdev`. The daemon must run in dom0.

    `qemu` with `migrate_from`: a live migration's destination QEMU
    (`-incoming`) gets the disk where the source VM has it, from a second
    export of the volume; the attachment is `incoming` until the
    destination has received the VM, then replaces the source's (whose
    export stops). DELETE it to cancel."""
    async with controller.lock(name):
        return vars(await controller.attach(name, body))


@router.get("/volumes/{name}/libvirt-xml", response_model=models.LibvirtDiskXml,
            tags=["attachments"], summary="libvirt disk XML of a volume (cold attach)",
            responses={**NOT_FOUND, **INVALID})
async def libvirt_xml(controller: ControllerDep, name: str, target: str = Query(
        default="vdb", pattern=r"^vd[a-z]{1,3}$", description=(
            "`<target dev>` to put in the XML; must be free in the domain."))):
    """The `<disk type='vhostuser'>` element that gives a libvirt domain this
    volume from its next start (`virsh attach-device DOMAIN FILE --config`,
    or paste it into `<devices>`). The export must run then: PUT
    .../export (a hot attach does not need this route)."""
    return controller.hypervisor("libvirt").disk_xml(name, target)


@router.get("/volumes/{name}/attachments", response_model=list[models.Attachment],
            tags=["attachments"], summary="List a volume's attachments",
            responses={**NOT_FOUND, **INVALID})
async def list_attachments(controller: ControllerDep, name: str):
    controller.get_volume(name)
    return [vars(a) for a in controller.state.attachments(name)]


@router.get("/volumes/{name}/attachments/{att_id}", response_model=models.Attachment,
            tags=["attachments"], summary="Show an attachment",
            responses={**NOT_FOUND, **INVALID})
async def get_attachment(controller: ControllerDep, name: str, att_id: str):
    return vars(controller.get_attachment(name, att_id))


@router.delete("/volumes/{name}/attachments/{att_id}", status_code=204,
               response_class=Response, tags=["attachments"], summary="Detach a volume",
               responses={**NOT_FOUND, **INVALID,
                          **err(501, "libvirt: the libvirt Python bindings are not "
                                     "installed."),
                          **err(403, "libvirt: its socket is no longer allowed, or what "
                                     "listens there is not a root libvirt daemon."),
                          **err(409, "The attachment is the source of a live migration "
                                     "(an `incoming` attachment names it): DELETE that "
                                     "one to cancel, or let the migration complete."),
                          **err(502, "QEMU or libvirt refused, or libvirt is unreachable "
                                     "(the message is in detail)."),
                          **err(503, "libvirt: every libvirt call thread is still busy."),
                          **err(504, "The guest did not release the disk in time; the "
                                     "attachment is left `detaching`, retry.")})
async def detach(controller: ControllerDep, name: str, att_id: str,
                 timeout_s: float | None = Query(default=None, gt=0, le=600, description=(
                     "How long to wait for the guest to release the disk (default: the "
                     "config's detach_timeout_s, 60 s)."))):
    """`device_del`, wait for DEVICE_DELETED, `chardev-remove` (libvirt:
    `detachDeviceAlias`, wait until the disk has left the live domain XML);
    the export stops if it was only there for attachments. A stale
    attachment (VM gone) is just forgotten. An `incoming` one (a cancelled
    migration) has its own export stopped; the destination QEMU is left
    as it is."""
    async with controller.lock(name):
        await controller.detach(name, att_id, timeout_s)
    return Response(status_code=204)
