"""The REST routes, one module per resource; app.create_app assembles them.
Shared here: the documented error responses."""

from __future__ import annotations

from blkserve.api import models


def err(status: int, description: str) -> dict:
    return {status: {"model": models.Error, "description": description}}


AUTH = err(401, "Missing or wrong bearer token.")
NOT_FOUND = err(404, "No such volume (or attachment).")
# FastAPI documents its own 422 body (a list of errors) for every route with
# parameters; this app answers {"detail": "..."} like every other error.
INVALID = err(422, "Invalid path, query or body; the detail names the field.")
# A body that is not even JSON text (e.g. not UTF-8) is refused by FastAPI
# with 400 before validation.
UNREADABLE = err(400, "The body is not readable as JSON text (e.g. not UTF-8).")
