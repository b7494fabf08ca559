"""Request and response bodies of the REST API (pydantic)."""

from __future__ import annotations

import functools
import operator
from typing import Annotated, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    field_validator,
    model_serializer,
    model_validator,
)

from blkserve import qos as qos_mod
from blkserve.api.hypervisors import ADAPTERS

NAME_PATTERN = r"^[a-z0-9][a-z0-9._-]{0,62}$"
MAX_SIZE = 1 << 60  # 1 EiB: beyond any real backing, and safe for off_t arithmetic
MAX_QUEUES = 64


# in the OpenAPI schema too (the check itself is _check_size, for its message)
SECTORS = {"multipleOf": 512}


def _check_size(v: int) -> int:
    if v % 512:
        raise ValueError("must be a multiple of 512 (the virtio-blk sector)")
    return v


class Error(BaseModel):
    detail: str = Field(description="What went wrong, in one line.",
                        examples=["volume 'db1' already exists"])


def _rate(what: str, unit: str):
    return Field(default=None, gt=0, le=qos_mod.MAX_RATE, description=f"{what} ({unit}).")


def _burst(kind: str):
    return Field(default=None, gt=0, le=qos_mod.MAX_RATE, description=(
        f"Burst: up to this rate (above `{kind}`) for `{kind}_max_length` seconds after "
        "running below the rate."))


def _burst_len(kind: str):
    return Field(default=None, ge=0.001, le=qos_mod.MAX_BURST_SECONDS, description=(
        f"Seconds a `{kind}_max` burst may last (default 1)."))


class QosLimits(BaseModel):
    """IOPS and bandwidth limits for a volume (all its queues together) or a
    group of volumes (all of them together). Any subset; leave a key out for
    no limit of that kind."""
    model_config = ConfigDict(extra="forbid", strict=True, json_schema_extra={"examples": [
        {"iops_total": 5000, "bps_write": 20971520},
        {"iops_total": 1000, "iops_total_max": 4000, "iops_total_max_length": 2},
    ]})

    iops_total: int | None = _rate("Requests per second, reads and writes", "IOPS")
    iops_total_max: int | None = _burst("iops_total")
    iops_total_max_length: float | None = _burst_len("iops_total")
    iops_read: int | None = _rate("Reads per second", "IOPS")
    iops_read_max: int | None = _burst("iops_read")
    iops_read_max_length: float | None = _burst_len("iops_read")
    iops_write: int | None = _rate("Writes per second (DISCARD and WRITE_ZEROES count)",
                                   "IOPS")
    iops_write_max: int | None = _burst("iops_write")
    iops_write_max_length: float | None = _burst_len("iops_write")
    bps_total: int | None = _rate("Data bytes per second, read and written", "bytes/s")
    bps_total_max: int | None = _burst("bps_total")
    bps_total_max_length: float | None = _burst_len("bps_total")
    bps_read: int | None = _rate("Bytes read per second", "bytes/s")
    bps_read_max: int | None = _burst("bps_read")
    bps_read_max_length: float | None = _burst_len("bps_read")
    bps_write: int | None = _rate("Bytes written per second (DISCARD and WRITE_ZEROES "
                                  "do not count)", "bytes/s")
    bps_write_max: int | None = _burst("bps_write")
    bps_write_max_length: float | None = _burst_len("bps_write")

    @model_validator(mode="after")
    def _consistent(self):
        qos_mod.from_flat(self.flat())   # QosError is a ValueError: a 422
        return self

    @model_serializer(mode="wrap")
    def _only_set(self, handler):
        # the limits in force only (a missing key: no limit of that kind)
        return {k: v for k, v in handler(self).items() if v is not None}

    def flat(self) -> dict:
        return self.model_dump(exclude_none=True)


QOS_DESCRIPTION = (
    "QoS limits of the volume as a whole (all its queues), applied to a running export "
    "within 20 ms without restarting it; `null`: none. A queue out of budget stops "
    "taking requests until the budget is due (the guest sees back-pressure). Without a "
    "burst a volume may run 100 ms worth of a rate ahead of it. FLUSH is never held.")
QOS_GROUP_DESCRIPTION = (
    "A QoS group (`/v1/qos-groups`) whose limits this volume shares with the group's "
    "other volumes (held in sum across their export workers); `null`: none.")


class VolumeCreate(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, json_schema_extra={"examples": [
        {"name": "db1", "size_bytes": 10737418240, "queues": 2},
        {"name": "scratch", "backing": "/dev/disk/by-id/nvme-example", "read_only": True},
    ]})

    name: str = Field(pattern=NAME_PATTERN, description=(
        "Volume name: lowercase letters, digits, '.', '_' and '-', starting with a letter "
        "or digit, at most 63 characters."), examples=["db1"])
    size_bytes: int | None = Field(default=None, gt=0, le=MAX_SIZE, json_schema_extra=SECTORS,
                                   description=(
        "Capacity in bytes, a multiple of 512. Required unless `backing` names an "
        "existing file, block device or RBD image (then its size is used, and a given "
        "size must match it)."),
        examples=[10737418240])
    read_only: bool = Field(default=False, description="Export the volume read-only "
                            "(VIRTIO_BLK_F_RO; the guest's writes fail).")
    queues: int = Field(default=1, ge=1, le=MAX_QUEUES, description=(
        "Virtqueues offered to the guest, each served by its own engine thread."))
    backing: str | None = Field(default=None, description=(
        "Absolute path of an existing block device or file (or a file to create) outside "
        "the state dir, or a Ceph RBD image rbd:POOL/[NAMESPACE/]IMAGE (existing, or "
        "created with size_bytes), or null:SIZE (no storage: reads return zeroes, writes "
        "are dropped; for benchmarks). Allowed only if it matches the daemon config's "
        "`allowed_backings` (null: only with a null: pattern there, e.g. \"null:*\"). "
        "Deleting the volume does not delete an external backing. "
        "Without it the volume is created where the config's [storage] backend says: a "
        "sparse file under STATE_DIR/volumes/, or an image in the RBD pool."),
        examples=["/dev/disk/by-id/nvme-example"])
    qos: QosLimits | None = Field(default=None, description=QOS_DESCRIPTION)
    qos_group: str | None = Field(default=None, pattern=NAME_PATTERN,
                                  description=QOS_GROUP_DESCRIPTION)

    _size = field_validator("size_bytes")(lambda cls, v: v if v is None else _check_size(v))


class VolumePatch(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, json_schema_extra={"examples": [
        {"size_bytes": 21474836480}, {"qos": {"iops_total": 5000}}, {"qos": None},
        {"qos_group": "tenant-a"}]})

    # absent, never null: the schema says integer
    size_bytes: int = Field(default=None, gt=0, le=MAX_SIZE, json_schema_extra=SECTORS,
                            description=(
        "New capacity in bytes, a multiple of 512. Growing extends the file (sparse) and "
        "a running export serves the new size at once and tells an attached guest, which "
        "sees the new capacity without a reboot; shrinking is refused while the volume is "
        "exported or attached."))
    qos: QosLimits | None = Field(default=None, description=(
        "New limits (replacing all of the old ones), or `null` to remove them. " +
        QOS_DESCRIPTION))
    qos_group: str | None = Field(default=None, pattern=NAME_PATTERN, description=(
        "Join this QoS group (leaving another), or `null` to leave it; a running export "
        "switches within a second."))

    _size = field_validator("size_bytes")(lambda cls, v: v if v is None else _check_size(v))

    @model_validator(mode="after")
    def _something(self):
        if not self.model_fields_set:
            raise ValueError("give size_bytes, qos or qos_group")
        return self


class QosGroupCreate(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, json_schema_extra={"examples": [
        {"name": "tenant-a", "qos": {"iops_total": 20000, "bps_total": 209715200}}]})

    name: str = Field(pattern=NAME_PATTERN, description="Group name (as a volume name).")
    qos: QosLimits = Field(description="Limits all member volumes share.")


class QosGroupPatch(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, json_schema_extra={"examples": [
        {"qos": {"iops_total": 30000}}]})

    qos: QosLimits = Field(description="New limits (replacing the old ones), applied to "
                           "the members' running exports within 20 ms.")


class QosGroup(BaseModel):
    name: str
    qos: QosLimits
    members: list[str] = Field(description="Volumes in the group.")
    created_at: str


class ExportRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, json_schema_extra={"examples": [{}]})


class Export(BaseModel):
    volume: str
    socket: str = Field(description="Absolute path of the vhost-user unix socket to give "
                        "QEMU (`-chardev socket,path=...,reconnect=1`).",
                        examples=["/var/lib/blkserve/sockets/db1.sock"])
    state: Literal["starting", "running", "backoff", "stopping", "stopped"] = Field(
        description="Worker state: `backoff` means it died and is about to be restarted.")
    pid: int | None = Field(description="Process id of the `blkserve export` worker.")
    restarts: int = Field(description="How many times the supervisor restarted the worker.")
    explicit: bool = Field(description="Exported by PUT .../export (kept when the last "
                           "attachment goes), rather than only for attachments.")
    started_at: str | None = Field(description="When the current worker started (UTC).")


# The body of POST .../attachments: one variant per hypervisor adapter (its
# request_model), told apart by `hypervisor`.
AttachmentCreate = Annotated[functools.reduce(operator.or_, (
    a.request_model for a in ADAPTERS.values())), Field(discriminator="hypervisor")]
HypervisorName = Literal[tuple(ADAPTERS)]


class Attachment(BaseModel):
    id: str = Field(examples=["a1b2c3d4"])
    volume: str
    hypervisor: HypervisorName
    qmp_socket: str | None = Field(description="QMP socket of the VM (`qemu`).")
    bus: str | None = Field(description="Bus the disk sits on: the QEMU bus id (`qemu`), "
                            "or the alias of the libvirt PCI controller (`libvirt`).")
    device_id: str = Field(description="QEMU device id (device_add id), for `libvirt` "
                           "the disk's alias (`ua-blkserve-ID`), for `xen` `vbd-N` (the "
                           "xenstore device number).")
    chardev_id: str = Field(description="QEMU chardev id (for `libvirt`, the one libvirt "
                            "made for the disk; empty for `xen`).")
    uri: str | None = Field(default=None, description="libvirt connection URI (`libvirt`).")
    domain: str | None = Field(default=None, description="libvirt domain name (`libvirt`), "
                               "Xen domain name (`xen`).")
    target: str | None = Field(default=None, description=(
        "libvirt `<target dev>` of the disk (`libvirt`; the guest names its disks in "
        "probe order, not after it), or the Xen guest's disk name (`xen`)."),
        examples=["vdb"])
    state: Literal["attaching", "attached", "detaching", "incoming", "stale"] = Field(
        description=(
            "`attaching`: the hypervisor is being asked to plug the disk; `detaching`: an "
            "unplug timed out and is still pending in the guest; `incoming`: the disk is "
            "plugged into a live migration's destination QEMU (served by an export of its "
            "own) and takes over from `migrate_from` once the migration completes; "
            "`stale`: the VM is gone (its QMP socket does not answer, the libvirt domain "
            "is no longer running or no longer has the disk, or the Xen domain is gone); "
            "delete it."))
    migrate_from: str | None = Field(default=None, description=(
        "`incoming` only: the attachment (the migrating VM's source QEMU) this one "
        "replaces when the migration completes."))
    created_at: str
    error: str | None = Field(description="Last error seen for this attachment.")


class LibvirtDiskXml(BaseModel):
    volume: str
    socket: str = Field(description="The export's vhost-user socket the XML points at.",
                        examples=["/var/lib/blkserve/sockets/db1.sock"])
    exported: bool = Field(description="The export runs now. Without one, a domain "
                           "started with this disk fails to start (PUT .../export first).")
    target: str = Field(description="The `<target dev>` used.", examples=["vdb"])
    xml: str = Field(description=(
        "A `<disk type='vhostuser'>` element for `virsh attach-device --config` or the "
        "domain XML."), examples=[
        "<disk type='vhostuser' device='disk'>...</disk>"])


class Volume(BaseModel):
    name: str
    size_bytes: int
    read_only: bool
    queues: int
    backing: str = Field(description="Path of the file or block device holding the data, "
                         "or the Ceph RBD image as rbd:POOL/[NAMESPACE/]IMAGE.")
    backing_kind: str = Field(description="file, block (a block device), rbd (a Ceph "
                              "RBD image, served through librbd) or null (no storage: "
                              "null:SIZE, for benchmarks).", examples=["file"])
    managed: bool = Field(description="The backing was created by blkserve (a file under "
                          "the state dir, or an image in the [storage] pool) and is deleted "
                          "with the volume.")
    created_at: str
    qos: QosLimits | None = Field(description="The volume's own limits in force, or null.")
    qos_group: str | None = Field(description="Its QoS group, or null.")
    export: Export | None
    attachments: list[Attachment]


class Health(BaseModel):
    status: str = Field(examples=["ok"])
    version: str


class TraceRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, json_schema_extra={"examples": [
        {"volume": "db1", "duration_s": 5, "breakdown": True}]})

    volume: str | None = Field(default=None, pattern=NAME_PATTERN, description=(
        "Trace only this exported volume (default: every export)."))
    duration_s: float = Field(gt=0, le=300, description="Seconds to trace (at most 300).",
                              examples=[5])
    breakdown: bool = Field(default=False, description=(
        "Also time each stage of a request: kick->pop, pop->submit, submit->complete "
        "(io_uring tracepoints), complete->used, used->notify."))
