"""blkserve: a userspace vhost-user-blk backend for virtual machines."""

__version__ = "0.1.0"
