"""Sizes as people type them on the command line (the CLI client, bench)."""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation

_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?|\.\d+)\s*(?:([KMGT])(?:I?B)?|B)?\s*$", re.IGNORECASE)


def parse_size(text: str) -> int:
    """Bytes from '1048576', '512K', '4k', '10G', '10GiB', '10GB', '1.5T' (binary
    units: 10G = 10 * 1024**3). Raises ValueError for anything else, for zero, and
    for a fraction that is not a whole number of bytes."""
    m = _SIZE_RE.match(text)
    if not m:
        raise ValueError(f"invalid size {text!r} (use bytes or a K, M, G or T suffix, "
                         "e.g. 10G)")
    try:
        value = Decimal(m.group(1)) * _UNITS[(m.group(2) or "").upper()]
    except InvalidOperation:  # pragma: no cover - the regex only lets numbers through
        raise ValueError(f"invalid size {text!r}") from None
    if value != value.to_integral_value():
        raise ValueError(f"size {text!r} is not a whole number of bytes")
    if value <= 0:
        raise ValueError(f"size {text!r} must be greater than zero")
    return int(value)
