"""QoS of the control plane: a volume's limits and group, and the groups.

Each volume has a QoS block (blkserve.qos.QosBlock) at STATE_DIR/qos/NAME.qos
that its export worker maps (`--qos-file`): the daemon writes the limits
there, so a PATCH applies to the running export at once, without a restart.
The block also names the volume's group; a group's block is
STATE_DIR/qos/groups/GROUP.qos, mapped by every member's worker, which
re-reads the name on SIGHUP.  The database holds the same limits (JSON, the
flat form) so the blocks can be rewritten at any daemon start."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal

from blkserve import qos as qos_mod
from blkserve.api.errors import ApiError
from blkserve.api.state import VolumeRow
from blkserve.logs import log_event

log = logging.getLogger("blkserve.api")


class QosControl:
    """Mixed into the Controller (settings, state, workers, incoming, and
    qos_blocks: the blocks the daemon has mapped, by path)."""

    def qos_path(self, volume: str) -> str:
        return os.path.join(self.settings.qos_dir, f"{volume}.qos")

    def qos_group_path(self, group: str) -> str:
        return qos_mod.group_path(self.settings.qos_dir, group)

    def _block(self, path: str) -> qos_mod.QosBlock:
        cache = self.qos_blocks
        b = cache.get(path)
        if b is None:
            os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
            b = cache[path] = qos_mod.QosBlock(path)
        return b

    def _forget_block(self, path: str) -> None:
        b = self.qos_blocks.pop(path, None)
        if b is not None:
            b.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)

    def sync_qos_block(self, v: VolumeRow) -> str:
        """Write the volume's limits and group into its block (before its
        worker starts, and at daemon start); the block's path."""
        path = self.qos_path(v.name)
        b = self._block(path)
        b.apply(qos_mod.from_flat(json.loads(v.qos)) if v.qos else {})
        if v.qos_group:
            g = self.state.qos_group(v.qos_group)
            if g is not None:
                self._block(self.qos_group_path(v.qos_group)).apply(
                    qos_mod.from_flat(json.loads(g["qos"])))
        b.group = v.qos_group
        return path

    def qos_view(self, v: VolumeRow) -> dict:
        return {"qos": json.loads(v.qos) if v.qos else None, "qos_group": v.qos_group}

    def check_qos_group(self, group: str | None) -> None:
        if group is not None and self.state.qos_group(group) is None:
            raise ApiError(422, f"qos_group: no QoS group {group!r} (create it under "
                                "/v1/qos-groups first)")

    def set_volume_qos(self, name: str, fields: dict) -> None:
        """PATCH's qos / qos_group (only the keys present in FIELDS change)."""
        v = self.get_volume(name)
        qos = v.qos
        group = v.qos_group
        if "qos" in fields:
            qos = None if fields["qos"] is None else json.dumps(fields["qos"], sort_keys=True)
        if "qos_group" in fields:
            group = fields["qos_group"]
            self.check_qos_group(group)
        if (qos, group) == (v.qos, v.qos_group):
            return
        self.state.set_volume_qos(name, qos, group)
        v.qos, old_group, v.qos_group = qos, v.qos_group, group
        self.sync_qos_block(v)
        log_event(log, "volume.qos", volume=name, qos=qos or "none", qos_group=group or "none")
        if group != old_group:
            # the worker maps the new group's block (or drops the old one)
            incoming = [self.incoming.get(a.id) for a in self.state.attachments(name)
                        if a.state == "incoming"]
            for w in [self.workers.get(name), *incoming]:
                if w is not None and w.pid is not None:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(w.pid, signal.SIGHUP)

    def drop_volume_qos(self, name: str) -> None:
        self._forget_block(self.qos_path(name))

    # -- groups ------------------------------------------------------------

    def qos_group_view(self, row) -> dict:
        return {"name": row["name"], "qos": json.loads(row["qos"]),
                "members": self.state.qos_group_members(row["name"]),
                "created_at": row["created_at"]}

    def get_qos_group(self, name: str):
        row = self.state.qos_group(name)
        if row is None:
            raise ApiError(404, f"no QoS group {name!r}")
        return row

    def create_qos_group(self, name: str, flat: dict):
        if self.state.qos_group(name) is not None:
            raise ApiError(409, f"QoS group {name!r} exists")
        self._block(self.qos_group_path(name)).apply(qos_mod.from_flat(flat))
        self.state.add_qos_group(name, json.dumps(flat, sort_keys=True))
        log_event(log, "qos_group.created", group=name, qos=json.dumps(flat, sort_keys=True))
        return self.get_qos_group(name)

    def set_qos_group(self, name: str, flat: dict):
        self.get_qos_group(name)
        self._block(self.qos_group_path(name)).apply(qos_mod.from_flat(flat))
        self.state.set_qos_group(name, json.dumps(flat, sort_keys=True))
        log_event(log, "qos_group.changed", group=name, qos=json.dumps(flat, sort_keys=True))
        return self.get_qos_group(name)

    def delete_qos_group(self, name: str) -> None:
        self.get_qos_group(name)
        members = self.state.qos_group_members(name)
        if members:
            raise ApiError(409, f"QoS group {name!r} has volumes ({', '.join(members)}); "
                                "take them out first (PATCH a volume with "
                                '{"qos_group": null})')
        self.state.delete_qos_group(name)
        self._forget_block(self.qos_group_path(name))
        log_event(log, "qos_group.deleted", group=name)

    def qos_metrics(self) -> tuple[list, list]:
        """[(volume, limits, block)], [(group, limits, block)] for /metrics."""
        vols = []
        for v in self.state.volumes():
            path = self.qos_path(v.name)
            if v.qos or os.path.exists(path):
                vols.append((v.name, qos_mod.from_flat(json.loads(v.qos)) if v.qos else {},
                             self._block(path)))
        groups = [(g["name"], qos_mod.from_flat(json.loads(g["qos"])),
                   self._block(self.qos_group_path(g["name"])))
                  for g in self.state.qos_groups()]
        return vols, groups
