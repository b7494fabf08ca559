"""Route of /v1/tracing: latency histograms of the exports from eBPF."""

from __future__ import annotations

from fastapi import APIRouter

from blkserve.api import models
from blkserve.api.deps import ControllerDep
from blkserve.api.routes import NOT_FOUND, UNREADABLE, err

router = APIRouter()


@router.post("/tracing", tags=["tracing"], summary="Trace exports with eBPF",
             responses={**UNREADABLE, **NOT_FOUND,
                        **err(409, "A trace is already running, or nothing is exported."),
                        **err(422, "Bad duration or volume name."),
                        **err(501, "Tracing is not available on this host (the reason).")})
async def tracing(controller: ControllerDep, body: models.TraceRequest) -> dict:
    """Load the bcc programs of ebpf/ for `duration_s` seconds and return, per
    volume and op, log2 latency histograms (descriptor pop to used-ring
    entry, microseconds), with `breakdown` the per-stage histograms, and for
    block-device backings the block-layer time. One trace at a time."""
    return await controller.trace(body.volume, body.duration_s, body.breakdown)
