"""The virtio-blk device model as the vhost-user frontend sees it: offered
features and the device configuration space."""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

from blkserve.native import Limits, limits
from blkserve.vhost.protocol import Feature, ProtocolFeature, bits

SECTOR = 512
# struct virtio_blk_config up to and including the zoned fields (virtio 1.2):
# frontends may read any part of it.
CONFIG_SIZE = 96
OFF_WCE = 32


@dataclass(frozen=True)
class Topology:
    """What the backing tells about its geometry, in bytes."""

    physical_block: int = 4096
    alignment_offset: int = 0
    io_min: int = 0
    io_opt: int = 0
    discard_granularity: int = 4096


@dataclass
class BlkDeviceModel:
    capacity: int      # bytes; grows at run time (online resize)
    num_queues: int
    read_only: bool
    blk_size: int = SECTOR
    topology: Topology = field(default_factory=Topology)
    default_writeback: bool = True
    limits: Limits = field(default_factory=limits)

    @property
    def features(self) -> int:
        f = bits(
            Feature.VERSION_1,
            Feature.PROTOCOL_FEATURES,
            Feature.RING_EVENT_IDX,
            Feature.RING_INDIRECT_DESC,
            Feature.BLK_SIZE_MAX,
            Feature.BLK_SEG_MAX,
            Feature.BLK_BLK_SIZE,
            Feature.BLK_TOPOLOGY,
            Feature.BLK_FLUSH,
            Feature.BLK_CONFIG_WCE,
            Feature.BLK_MQ,
            Feature.RING_PACKED,
            Feature.LOG_ALL,
        )
        if self.read_only:
            f |= bits(Feature.BLK_RO)
        else:
            f |= bits(Feature.BLK_DISCARD, Feature.BLK_WRITE_ZEROES)
        return f

    @property
    def protocol_features(self) -> int:
        return bits(ProtocolFeature.MQ, ProtocolFeature.REPLY_ACK, ProtocolFeature.CONFIG,
                    ProtocolFeature.CONFIGURE_MEM_SLOTS, ProtocolFeature.BACKEND_REQ,
                    ProtocolFeature.RESET_DEVICE, ProtocolFeature.INFLIGHT_SHMFD,
                    ProtocolFeature.LOG_SHMFD)

    def config(self, writeback: bool | None = None) -> bytes:
        if writeback is None:
            writeback = self.default_writeback
        lim, topo, lbs = self.limits, self.topology, self.blk_size
        phys = max(topo.physical_block, lbs)
        cfg = bytearray(CONFIG_SIZE)
        struct.pack_into("<QII", cfg, 0, self.capacity // SECTOR, lim.size_max, lim.seg_max)
        struct.pack_into("<I", cfg, 20, lbs)
        struct.pack_into(
            "<BBHI", cfg, 24,
            (phys // lbs).bit_length() - 1,              # physical_block_exp
            (topo.alignment_offset // lbs) & 0xFF,       # in logical blocks
            min(max(topo.io_min // lbs, 1), 0xFFFF),     # min_io_size, blocks
            topo.io_opt // lbs,                          # opt_io_size, blocks
        )
        struct.pack_into("<BxH", cfg, OFF_WCE, int(writeback), self.num_queues)
        if not self.read_only:
            granularity = max(topo.discard_granularity, lbs) // SECTOR
            struct.pack_into(
                "<IIIIIB", cfg, 36,
                lim.max_discard_sectors, lim.max_discard_seg, granularity,
                lim.max_write_zeroes_sectors, lim.max_write_zeroes_seg,
                1,                                       # write_zeroes_may_unmap
            )
        return bytes(cfg)
