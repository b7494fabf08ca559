"""`blkserve serve`: the REST control plane (volumes, exports, attachments)."""
