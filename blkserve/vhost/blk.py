"""The virtio-blk device model as the vhost-user frontend sees it: offered
features and the device configuration space."""

from __future__ import annotations

import struct
from dataclasses import dataclass

from blkserve.vhost.protocol import Feature, ProtocolFeature, bits

SECTOR = 512
# Data segments per request.  The engine's per-request iovec array is sized
# for this plus header, status and region splits (native/internal.h).
SEG_MAX = 126
# struct virtio_blk_config up to and including the zoned fields (virtio 1.2):
# frontends may read any part of it.
CONFIG_SIZE = 96
OFF_WCE = 32


@dataclass(frozen=True)
class BlkDeviceModel:
    capacity: int      # bytes
    num_queues: int
    read_only: bool
    blk_size: int = SECTOR

    @property
    def features(self) -> int:
        f = bits(
            Feature.VERSION_1,
            Feature.PROTOCOL_FEATURES,
            Feature.RING_EVENT_IDX,
            Feature.RING_INDIRECT_DESC,
            Feature.BLK_SEG_MAX,
            Feature.BLK_BLK_SIZE,
            Feature.BLK_FLUSH,
            Feature.BLK_MQ,
        )
        if self.read_only:
            f |= bits(Feature.BLK_RO)
        return f

    @property
    def protocol_features(self) -> int:
        return bits(ProtocolFeature.MQ, ProtocolFeature.REPLY_ACK, ProtocolFeature.CONFIG)

    def config(self) -> bytes:
        cfg = bytearray(CONFIG_SIZE)
        struct.pack_into("<Q", cfg, 0, self.capacity // SECTOR)
        struct.pack_into("<I", cfg, 12, SEG_MAX)
        struct.pack_into("<I", cfg, 20, self.blk_size)
        struct.pack_into("<H", cfg, 34, self.num_queues)
        return bytes(cfg)
