"""`make run`: export a sparse demo image and print how to attach a guest."""

from __future__ import annotations

import argparse
import os
import sys

from blkserve.cli import main as cli_main

QEMU_TEMPLATE = """\
blkserve demo: exporting {image} ({size} GiB, sparse) on {sock}

Attach a QEMU guest to it (guest RAM must be shareable with the backend):

  qemu-system-x86_64 -machine q35 -accel kvm:tcg -m 1G -smp 2 \\
    -object memory-backend-memfd,id=mem,size=1G,share=on -numa node,memdev=mem \\
    -chardev socket,id=blk0,path={sock},reconnect=1 \\
    -device vhost-user-blk-pci,chardev=blk0,num-queues=2 \\
    ...your usual -kernel/-drive/-nic options...

The guest sees the disk as /dev/vda. Stop the export with Ctrl-C.
"""


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--state-dir", default="var")
    ap.add_argument("--size-gib", type=int, default=1)
    args = ap.parse_args(argv)
    os.makedirs(args.state_dir, exist_ok=True)
    image = os.path.abspath(os.path.join(args.state_dir, "demo.img"))
    sock = os.path.abspath(os.path.join(args.state_dir, "demo.sock"))
    if not os.path.exists(image):
        with open(image, "wb") as f:
            f.truncate(args.size_gib << 30)
    print(QEMU_TEMPLATE.format(image=image, size=args.size_gib, sock=sock), flush=True)
    return cli_main(["export", image, "--socket", sock, "--queues", "2"])


if __name__ == "__main__":
    sys.exit(main())
