"""blkserve command line."""

from __future__ import annotations

import argparse
import logging
import sys

from blkserve import __version__, bench, client, trace
from blkserve.api import serve


def _export(args: argparse.Namespace) -> int:
    from blkserve.export import ExportError, ExportOptions, run_export

    try:
        return run_export(ExportOptions(
            backing=args.backing, socket=args.socket, queues=args.queues,
            read_only=args.read_only, cache=args.cache, serial=args.serial,
            block_size=args.block_size, poll_us=args.poll_us, io_engine=args.io_engine,
            stats_file=args.stats_file,
        ))
    except ExportError as e:
        print(f"blkserve export: error: {e}", file=sys.stderr)
        return 2


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
            "Bad arguments exit with code 2."
        ),
    )
    ex.add_argument("backing", metavar="BACKING",
                    help="regular file or block device; its size is the disk's capacity")
    ex.add_argument("--socket", required=True, metavar="PATH",
                    help="unix socket path to listen on (a stale socket file is replaced)")
    ex.add_argument("--queues", type=int, default=1, metavar="N",
                    help="number of virtqueues offered, each served by its own engine "
                         "thread and io_uring (default: 1)")
    ex.add_argument("--read-only", action="store_true",
                    help="open BACKING read-only, offer VIRTIO_BLK_F_RO and fail writes")
    ex.add_argument("--cache", choices=("none", "writeback"), default="none",
                    help="none (default): O_DIRECT, bypassing the host page cache; "
                         "writeback: through the host page cache")
    ex.add_argument("--serial", metavar="STR",
                    help="disk serial returned by GET_ID, at most 20 bytes (default: "
                         "derived from the backing's real path)")
    ex.add_argument("--block-size", type=int, choices=(512, 4096), metavar="512|4096",
                    help="logical block size offered to the guest (default: the backing "
                         "device's logical block size; 512 for files)")
    ex.add_argument("--poll-us", type=int, default=0, metavar="N",
                    help="after the last request, busy-poll each queue for N microseconds "
                         "with guest kicks suppressed before sleeping: lower latency for "
                         "a CPU core per busy queue (default: 0, sleep at once)")
    ex.add_argument("--io-engine", choices=("auto", "io_uring", "sync"), default="auto",
                    help="io_uring: every request is an SQE; sync: plain syscalls in the "
                         "queue thread; auto (default): io_uring, unless the backing cannot "
                         "do non-blocking I/O (tmpfs), where io_uring would hand each "
                         "request to a kernel worker thread")
    ex.add_argument("--stats-file", metavar="PATH",
                    help="keep the engine's counters and latency histograms in PATH, a "
                         "shared stats block other processes can read while I/O runs "
                         "(`blkserve serve` reads it for /metrics); removed on exit")
    ex.set_defaults(func=_export)
    bench.add_parser(sub)
    client.add_parsers(sub)
    serve.add_parser(sub)
    trace.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s blkserve %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
