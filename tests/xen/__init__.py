"""A real Xen host (Xen 4.17, PV dom0, PV domUs) emulated under QEMU TCG, for tests.

See ``testbed.py`` for the harness and /work/shared/XEN-TESTBED.md for the
measured facts it is built on.
"""
