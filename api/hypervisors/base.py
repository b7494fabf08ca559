"""The interface every hypervisor adapter implements (as Nova's ComputeDriver
or os-brick's connectors): the controller never asks "which hypervisor is
this?", it asks the adapter of the attachment.

An adapter owns its connection handling (QMP sockets, libvirt connections,
xenstore) and maps its own errors to ApiError; the controller owns the
volume/export/attachment state machine, the locks and the supervision:

    prepare   check the request, find the VM and who may connect (Target)
    plug      make the disk appear in the VM (hot-plug)
    unplug    ask the VM to release it and wait (DetachTimeout when it does not)
    present   after a daemon restart: did an interrupted attach make it?
    stale_reasons   which attachments lost their VM, and why

An adapter whose attachments share the volume's vhost-user export (QEMU,
libvirt) lets the controller start the export, allow the VM's QEMU on it and
undo all of it on failure; one with `own_worker` (Xen) is served by a worker
of its own that `plug` starts."""

from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

from pydantic import BaseModel

from blkserve.api.errors import ApiError
from blkserve.api.state import AttachmentRow, VolumeRow

if TYPE_CHECKING:
    from blkserve.api.controller import Controller


class DetachTimeout(Exception):
    """The guest did not release the disk in time; the unplug request stays
    pending (the controller leaves the attachment `detaching`, 504)."""


@dataclass
class Target:
    """What `prepare` found out: the attachment to record (state `attaching`,
    its id chosen), the VM as messages name it, and who may connect."""
    row: AttachmentRow
    where: str  # "the VM at /run/vm1/qmp.sock", "libvirt domain 'vm1'"
    peer_pid: int | None = None  # the QEMU process the export will serve
    peer_gone: ApiError | None = None  # the answer when that process is gone
    socket_owner: tuple[int, int] | None = None  # (uid, gid) the export socket goes to
    socket: str | None = None  # own_worker: the socket of the attachment's worker
    fields: dict | None = None  # attachment.created log fields (default: the bus)
    placement: dict | None = None  # incoming: where the source VM has the disk


class Hypervisor(abc.ABC):
    """One hypervisor, bound to the controller that uses it."""

    name: ClassVar[str]  # the request's and the attachment's `hypervisor`
    label: ClassVar[str]  # how messages name it ("QEMU", "libvirt", "Xen")
    request_model: ClassVar[type[BaseModel]]  # the body of POST .../attachments
    own_worker: ClassVar[bool] = False  # served by a worker of its own, not the export

    def __init__(self, controller: Controller) -> None:
        self.controller = controller
        self.settings = controller.settings
        self.state = controller.state

    # -- attach and detach ---------------------------------------------------

    @abc.abstractmethod
    async def prepare(self, v: VolumeRow, request: BaseModel) -> Target:
        """Check REQUEST for volume V (already attached there? the VM there and
        allowed?) and describe the attachment to make; nothing changed yet."""

    @abc.abstractmethod
    async def plug(self, target: Target, v: VolumeRow, socket: str) -> None:
        """Make the disk of TARGET (prepared) appear in the VM: the export on
        SOCKET (own_worker: start the worker serving SOCKET). Sets
        target.row.bus / .target when known."""

    @abc.abstractmethod
    async def unplug(self, att: AttachmentRow, timeout: float) -> None:
        """Take the disk out of the VM, waiting up to TIMEOUT s for the guest;
        DetachTimeout if it does not release it. A VM that is gone is not an
        error (log it and return)."""

    def vm_key(self, att: AttachmentRow) -> str:
        """The VM the attachment is in: one conversation with it at a time."""
        return f"{self.name}:{att.domain}"

    # -- supervision ---------------------------------------------------------

    @abc.abstractmethod
    async def present(self, att: AttachmentRow) -> bool:
        """A previous daemon died during this attach: is the disk in the VM?
        ApiError when it cannot tell (the attachment is kept, with the error)."""

    @abc.abstractmethod
    async def stale_reasons(self, atts: list[AttachmentRow]) -> dict[str, str]:
        """Of this hypervisor's attachments ATTS, the ids of those whose VM is
        gone (or has lost the disk), each with why; those it cannot check now
        are left out."""

    def log_fields(self, att: AttachmentRow) -> dict:
        """What names the VM in the attachment's log lines."""
        return {}

    def worker_spec(self, att: AttachmentRow) -> dict:
        """own_worker: the WorkerSpec fields that make the worker serve ATT."""
        return {}

    # -- who may connect -----------------------------------------------------

    def default_socket_owner(self) -> tuple[int, int] | None:
        """(uid, gid) every export socket is given to on this host, so that
        this hypervisor's QEMU reaches it even when the disk is in a VM's
        config rather than hot-plugged; None: the socket stays root's."""
        return None

    # -- live migration (an `incoming` attachment: the destination VM) --------

    async def placement(self, att: AttachmentRow) -> dict:
        """Where ATT's disk sits in its VM, as the destination must repeat it
        (QEMU: the PCI address); ApiError when the VM cannot tell."""
        raise ApiError(501, f"live migration of {self.label} attachments is not supported")

    async def incoming_done(self, att: AttachmentRow) -> bool | None:
        """Has the destination VM of the incoming ATT finished receiving the
        migration?  None when it cannot tell now (it is gone or busy)."""
        return None

    async def migrated_away(self, att: AttachmentRow) -> bool:
        """Has ATT's VM been migrated to another host (it runs there now)?"""
        return False
