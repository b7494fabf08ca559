"""Service routes outside /v1: liveness and Prometheus metrics."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import PlainTextResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from blkserve import __version__
from blkserve.api import models
from blkserve.api.deps import RegistryDep

router = APIRouter()


@router.get("/healthz", response_model=models.Health, tags=["service"],
            summary="Liveness (no token needed)")
async def healthz():
    return {"status": "ok", "version": __version__}


@router.get("/metrics", tags=["service"], summary="Prometheus metrics (token: see the "
                                                  "config's metrics_auth)",
            response_class=PlainTextResponse)
async def prometheus_metrics(registry: RegistryDep):
    return PlainTextResponse(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)
