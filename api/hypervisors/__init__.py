"""Hypervisor adapters, one module each, behind one interface (base.py).

Adding a hypervisor: write its module (a `base.Hypervisor` subclass with its
request model) and add it to ADAPTERS; the REST body of POST
.../attachments, the attachment's `hypervisor` values and the controller
pick it up from here."""

from __future__ import annotations

from blkserve.api.hypervisors.base import DetachTimeout, Hypervisor, Target
from blkserve.api.hypervisors.libvirt import Libvirt
from blkserve.api.hypervisors.qemu import Qemu
from blkserve.api.hypervisors.xen import Xen

# name -> adapter class; the order is the order of the request body's variants
ADAPTERS: dict[str, type[Hypervisor]] = {a.name: a for a in (Qemu, Libvirt, Xen)}

__all__ = ["ADAPTERS", "DetachTimeout", "Hypervisor", "Target"]
