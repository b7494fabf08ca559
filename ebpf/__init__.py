"""The eBPF programs blkserve loads with bcc (installed as blkserve.ebpf, so
that an installed package finds them as package data)."""
