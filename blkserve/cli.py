"""blkserve command line."""

from __future__ import annotations

import argparse
import json
import logging
import os
import socket
import sys

from blkserve import __version__, bench, bench_blkif, client, logs, trace
from blkserve import backing as backing_io
from blkserve.api import serve


def _export(args: argparse.Namespace) -> int:
    from blkserve.export import ExportError, ExportOptions, is_path, parse_poll, run_export

    try:
        if args.backing and args.blk_file and args.backing != args.blk_file:
            raise ExportError("give the backing either as BACKING or as --blk-file, not both")
        backing = args.backing or args.blk_file
        if not backing:
            raise ExportError("the backing (BACKING or --blk-file PATH) is required")
        if args.xen_domain is not None:
            if args.fd is not None:
                raise ExportError("--xen-domain serves a Xen domain through blkif: it takes "
                                  "no --fd")
        elif args.xen_devid is not None or args.vdev is not None:
            raise ExportError("--xen-devid and --vdev need --xen-domain")
        elif (args.socket is None) == (args.fd is None):
            raise ExportError("give exactly one of --socket PATH (alias --socket-path), "
                              "--fd FD and --xen-domain DOMAIN")
        identity = None
        if not is_path(backing):
            if args.backing_identity is not None:
                raise ExportError("--backing-identity is for files and block devices")
        elif args.backing_identity is not None:
            try:
                identity = backing_io.parse_identity(args.backing_identity)
            except ValueError as e:
                raise ExportError(f"--backing-identity: {e}") from None
            # a supervisor's real path: no symlink is followed in it
            backing = os.path.abspath(backing)
        else:
            # the path the user named (e.g. /dev/disk/by-id/...), resolved
            # once; the backing is then opened without following symlinks
            backing = os.path.realpath(backing)
        try:
            poll_us, poll_adaptive = parse_poll(args.poll_us)
        except ValueError as e:
            raise ExportError(str(e)) from None
        return run_export(ExportOptions(
            backing=backing, socket=args.socket, fd=args.fd, queues=args.queues,
            read_only=args.read_only, cache=args.cache, serial=args.serial,
            block_size=args.block_size, poll_us=poll_us, poll_adaptive=poll_adaptive,
            io_engine=args.io_engine,
            drain_timeout=args.drain_timeout, stats_file=args.stats_file,
            xen_domain=args.xen_domain, xen_devid=args.xen_devid, vdev=args.vdev,
            backing_identity=identity,
            allow_peer_pids=args.allow_peer_pid, allow_peers_file=args.allow_peers_file,
            qos=args.qos, qos_file=args.qos_file, qos_group_file=args.qos_group_file,
            ceph_conf=args.ceph_conf, ceph_id=args.ceph_id, ceph_keyring=args.ceph_keyring,
            rbd_timeout=args.rbd_timeout,
        ))
    except ExportError as e:
        print(f"blkserve export: error: {e}", file=sys.stderr)
        return 2


def _wants_capabilities(argv: list[str]) -> bool:
    """`blkserve [-v] export ... --print-capabilities ...`: QEMU's backend
    conventions say every other option and argument is then ignored, so this
    is decided before argparse sees (and perhaps refuses) them."""
    for i, a in enumerate(argv):
        if a in ("-v", "--verbose"):
            continue
        return a == "export" and "--print-capabilities" in argv[i + 1:]
    return False


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="blkserve",
        description="Userspace vhost-user-blk backend for virtual machines.",
    )
    parser.add_argument("--version", action="version", version=f"blkserve {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    ex = sub.add_parser(
        "export",
        help="serve one file or block device as a vhost-user-blk device",
        description=(
            "Serve BACKING as a virtio-blk device over the vhost-user protocol on a "
            "unix socket, in the foreground. One frontend (e.g. QEMU's "
            "vhost-user-blk-pci) is served at a time; after it disconnects the "
            "export keeps listening, so a VM reboot or a QEMU restart reconnects. "
            "SIGINT/SIGTERM drain in-flight I/O, remove the socket and exit 0. "
            "SIGHUP re-reads the backing's size: if it grew, the new capacity is served "
            "and the frontend is told (CONFIG_CHANGE_MSG), so the guest sees it online. "
            "Bad arguments exit with code 2. The options follow QEMU's vhost-user "
            "backend program conventions (--socket-path, --fd, --blk-file, --read-only, "
            "--print-capabilities). With --xen-domain (run in a Xen dom0) BACKING is "
            "served instead to a Xen domain's blkfront through the blkif protocol: the "
            "export creates the vbd in xenstore itself, serves it until SIGINT/SIGTERM, "
            "then detaches it (the guest sees the disk go)."
        ),
    )
    ex.add_argument("backing", metavar="BACKING", nargs="?",
                    help="regular file or block device, or a Ceph RBD image as "
                         "rbd:POOL/IMAGE or rbd:POOL/NAMESPACE/IMAGE (served through "
                         "librbd); its size is the disk's capacity. null:SIZE (e.g. "
                         "null:1G) is no backing at all, for benchmarks: reads return "
                         "zeroes and writes are dropped")
    ex.add_argument("--blk-file", metavar="PATH",
                    help="the same as BACKING (QEMU's vhost-user backend conventions)")
    ex.add_argument("--socket", "--socket-path", dest="socket", metavar="PATH",
                    help="unix socket path to listen on (a stale socket file is replaced, "
                         "and the socket is removed on exit); with --xen-domain, only a "
                         "readiness handle for supervisors: it listens while the disk is "
                         "offered")
    ex.add_argument("--fd", type=int, metavar="FD",
                    help="instead of --socket: serve on FD, an already listening unix "
                         "stream socket inherited from the management layer (e.g. systemd "
                         "socket activation: --fd 3); it is left in place on exit")
    ex.add_argument("--xen-domain", metavar="DOMID|NAME",
                    help="instead of vhost-user: hot-plug BACKING into this running Xen "
                         "domain as a PV disk (blkif; needs dom0's xenstored, "
                         "/dev/xen/gntdev and /dev/xen/evtchn, and Debian's libxenstore4, "
                         "libxengnttab1, libxenevtchn1)")
    ex.add_argument("--vdev", metavar="xvdX",
                    help="with --xen-domain: the guest's disk name (default: xvdb)")
    ex.add_argument("--xen-devid", type=int, metavar="N",
                    help="with --xen-domain: the vbd device number instead of --vdev "
                         "(51728 is xvdb)")
    ex.add_argument("--print-capabilities", action="store_true",
                    help="print the backend's capabilities as JSON (QEMU's vhost-user.json: "
                         "type block and its features) and exit 0; everything else is "
                         "ignored")
    ex.add_argument("--queues", type=int, default=1, metavar="N",
                    help="number of virtqueues offered, each served by its own engine "
                         "thread and io_uring (default: 1)")
    ex.add_argument("--read-only", action="store_true",
                    help="open BACKING read-only, offer VIRTIO_BLK_F_RO and fail writes")
    ex.add_argument("--cache", choices=("none", "writeback"), default="none",
                    help="none (default): O_DIRECT, bypassing the host page cache; "
                         "writeback: through the host page cache (rbd: librbd's cache "
                         "on; with none a write is acknowledged once it is in the cluster)")
    ex.add_argument("--serial", metavar="STR",
                    help="disk serial returned by GET_ID, at most 20 bytes (default: "
                         "derived from the backing's real path)")
    ex.add_argument("--block-size", type=int, choices=(512, 4096), metavar="512|4096",
                    help="logical block size offered to the guest (default: the backing "
                         "device's logical block size; 512 for files)")
    ex.add_argument("--poll-us", default="auto", metavar="auto|auto:N|N",
                    help="after the last request, busy-poll each queue with guest kicks "
                         "suppressed before sleeping. auto (the default): a window that "
                         "follows the queue's wake-ups, up to 50 us (auto:N: up to N): it "
                         "grows while requests or completions come within it and drops "
                         "to 0 while they do not, so an idle or slow guest costs no CPU. "
                         "N: always N us (lowest latency for a CPU core per busy queue); "
                         "0: never poll"),
    ex.add_argument("--drain-timeout", type=float, default=30.0, metavar="SECONDS",
                    help="how long stopping a queue (GET_VRING_BASE, SIGTERM) waits for "
                         "in-flight I/O before cancelling it; what is still in flight then "
                         "is left to the next backend through the inflight region; "
                         "also bounds the backing's fdatasync when the last queue "
                         "stops (default: 30)")
    ex.add_argument("--io-engine", choices=("auto", "io_uring", "sync"), default="auto",
                    help="io_uring: every request is an SQE; sync: plain syscalls in the "
                         "queue thread; auto (default): io_uring, unless the backing cannot "
                         "do non-blocking I/O (tmpfs), where io_uring would hand each "
                         "request to a kernel worker thread")
    ex.add_argument("--stats-file", metavar="PATH",
                    help="keep the engine's counters and latency histograms in PATH, a "
                         "shared stats block other processes can read while I/O runs "
                         "(`blkserve serve` reads it for /metrics); removed on exit")
    ex.add_argument("--qos", metavar="KEY=VALUE[,...]",
                    help="IOPS and bandwidth limits for the whole disk (all its queues): "
                         "iops_total, iops_read, iops_write (requests/s), bps_total, "
                         "bps_read, bps_write (bytes/s; K, M, G are powers of 1024), each "
                         "with an optional burst KEY_max (a higher rate) for KEY_max_length "
                         "seconds (default 1), e.g. iops_total=5000,bps_write=20M. A queue "
                         "out of budget stops taking requests until it is due. DISCARD and "
                         "WRITE_ZEROES count as writes for iops_* only; FLUSH is never held")
    ex.add_argument("--qos-file", metavar="PATH",
                    help="keep the limits in PATH, a shared block (created if missing; "
                         "--qos writes into it) that another process may rewrite while the "
                         "export runs: new limits apply within 20 ms. The block may name "
                         "a group whose block is groups/NAME.qos beside PATH; SIGHUP "
                         "re-reads that name (`blkserve serve` gives each volume one)")
    ex.add_argument("--qos-group-file", metavar="PATH",
                    help="also serve under the limits in PATH, a shared block several "
                         "exports map: its limits hold for all of them together")
    ex.add_argument("--ceph-conf", metavar="FILE",
                    help="rbd: backings: the Ceph client configuration (monitors, keyring; "
                         "default: librbd's search, /etc/ceph/ceph.conf)")
    ex.add_argument("--ceph-id", metavar="NAME",
                    help="rbd: backings: the cephx client id without 'client.' "
                         "(default: admin, or the configuration's)")
    ex.add_argument("--ceph-keyring", metavar="FILE",
                    help="rbd: backings: the keyring (default: the configuration's)")
    ex.add_argument("--rbd-timeout", type=int, default=60, metavar="SECONDS",
                    help="rbd: backings: a request the cluster has not answered in this "
                         "long fails with an I/O error (until then the guest waits, as "
                         "on a stalled disk); 0 waits forever. Also bounds a queue stop, "
                         "which waits for librbd's requests (they cannot be cancelled); "
                         "the connection to the monitors is bounded by the same value, at "
                         "most 30 s (default: 60)")
    ex.add_argument("--allow-peer-pid", type=int, action="append", metavar="PID",
                    help="serve only a frontend whose process (SO_PEERCRED of its "
                         "connection) is PID; repeatable. Others are refused with a log line")
    ex.add_argument("--allow-peers-file", metavar="PATH",
                    help="serve only the processes listed in PATH ('PID UID START_TIME' "
                         "lines, or 'any'), re-read at every connection, so the set can "
                         "change while the export runs; a missing file allows nobody "
                         "(`blkserve serve` gives each export one). Without this and "
                         "--allow-peer-pid: any process the socket's permissions let in")
    ex.add_argument("--backing-identity", metavar="DEV:INO",
                    help="serve BACKING only if it is this inode (st_dev:st_ino, decimal), "
                         "as `blkserve serve` passes the one a volume was created on; "
                         "BACKING must then be a real path: no symlink anywhere in it is "
                         "followed. Without it, BACKING is resolved once, then opened "
                         "without following symlinks. Either way only a regular file or "
                         "a block device is opened (a FIFO, socket or character device is "
                         "refused)")
    logs.add_format_option(ex)
    ex.set_defaults(func=_export)
    bench.add_parser(sub)
    bench_blkif.add_parser(sub)
    client.add_parsers(sub)
    serve.add_parser(sub)
    trace.add_parser(sub)
    return parser


CAPABILITIES = {"type": "block", "features": ["read-only", "blk-file"]}


def _socket_name(fd: int) -> str:
    """The path a socket passed as --fd is bound to ('' if none)."""
    try:
        with socket.socket(fileno=os.dup(fd)) as s:
            name = s.getsockname()
    except OSError:
        return ""
    return name if isinstance(name, str) else ""


def _setup_logging(args: argparse.Namespace) -> None:
    level = logging.DEBUG if args.verbose else logging.INFO
    fmt = getattr(args, "log_format", None)
    if fmt is None:  # the client, bench and trace commands: the human format
        logs.setup("text", level, journal=False)
        return
    if args.command == "serve":
        # the export workers it starts inherit the format
        os.environ["BLKSERVE_LOG_FORMAT"] = fmt
        logs.setup(fmt, level)
        return
    sock = args.socket or (_socket_name(args.fd) if args.fd is not None else "")
    static = {"volume": os.path.basename(sock).removesuffix(".sock")} if sock else None
    if os.environ.get("BLKSERVE_WORKER_LOGS") == "journal":
        why = logs.worker_to_journal(fmt, level, static)
        if why is None:
            return
        logs.setup(fmt, level, static)
        logging.getLogger("blkserve.export").warning(
            "journal mode: %s; logging to stderr", why)
        return
    logs.setup(fmt, level, static)


def main(argv: list[str] | None = None) -> int:
    if _wants_capabilities(sys.argv[1:] if argv is None else argv):
        print(json.dumps(CAPABILITIES, indent=2))
        return 0
    parser = build_parser()
    args = parser.parse_args(argv)
    _setup_logging(args)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
