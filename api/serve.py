"""`blkserve serve`: run the REST control plane on uvicorn."""

from __future__ import annotations

import argparse
import logging
import os
import secrets
import sys

from blkserve import logs
from blkserve.api import config

log = logging.getLogger("blkserve.serve")


def load_token(settings: config.Settings) -> tuple[str, str]:
    """The API token and where it came from: env BLKSERVE_API_TOKEN, else
    STATE_DIR/api-token (created with mode 0600 on first start)."""
    env = os.environ.get("BLKSERVE_API_TOKEN", "").strip()
    if env:
        return env, "env BLKSERVE_API_TOKEN"
    path = settings.token_path
    try:
        with open(path) as f:
            token = f.read().strip()
        if token:
            return token, path
    except FileNotFoundError:
        pass
    token = secrets.token_urlsafe(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(token + "\n")
    os.chmod(path, 0o600)
    return token, path


def add_parser(sub) -> None:
    p = sub.add_parser(
        "serve",
        help="run the REST control plane (volumes, exports, hot-attach)",
        description=(
            "Run the blkserve REST API on uvicorn. State (SQLite blkserve.db, volume "
            "files, export sockets, worker logs, api-token) lives in the state dir. "
            "Each export runs as its own supervised `blkserve export` worker that keeps "
            "serving guests when this daemon stops and is adopted when it starts again. "
            "Every /v1 route needs 'Authorization: Bearer TOKEN': env BLKSERVE_API_TOKEN, "
            "else STATE_DIR/api-token (generated on first start, mode 0600). "
            "OpenAPI docs at /docs. Logs go to stderr, one line per event (--log-format), "
            "with an access line per request carrying its request id (X-Request-ID, "
            "taken from the request or generated, and returned)."),
    )
    p.add_argument("--listen", metavar="HOST:PORT",
                   help=f"address to bind (default: {config.DEFAULT_LISTEN}, loopback only)")
    p.add_argument("--state-dir", metavar="DIR",
                   help="where state lives (default: env BLKSERVE_STATE_DIR, else "
                        f"{config.DEFAULT_STATE_DIR})")
    p.add_argument("--config", metavar="FILE",
                   help="TOML config file (see deploy/blkserve.toml); flags override it")
    logs.add_format_option(p)
    p.add_argument("--worker-logs", choices=("auto", "file", "journal"),
                   default=os.environ.get("BLKSERVE_WORKER_LOGS") or "auto",
                   help="where export workers log: file: STATE_DIR/logs/VOLUME.log; "
                        "journal: the systemd journal (each worker opens its own stream, "
                        "so its lines outlive a restart of this daemon), keeping only a "
                        "bounded tail in that file for error messages; auto (default; env "
                        "BLKSERVE_WORKER_LOGS): journal when this daemon's stderr is the "
                        "journal (JOURNAL_STREAM), else file")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import uvicorn

    from blkserve.api.app import create_app
    from blkserve.api.controller import Controller

    try:
        settings = config.load(
            args.config, listen=args.listen,
            state_dir=args.state_dir or os.environ.get("BLKSERVE_STATE_DIR"))
        os.makedirs(settings.state_dir, exist_ok=True)
        token, source = load_token(settings)
        host, port = settings.host_port
    except (config.ConfigError, OSError) as e:
        print(f"blkserve serve: error: {e}", file=sys.stderr)
        return 2
    worker_logs = args.worker_logs
    if worker_logs == "auto":
        worker_logs = "journal" if logs.stderr_is_journal() else "file"
    os.environ["BLKSERVE_WORKER_LOGS"] = worker_logs  # inherited by the workers
    controller = Controller(settings)
    app = create_app(controller, token)
    url = f"http://{host if ':' not in host else f'[{host}]'}:{port}"
    logs.log_event(log, "api.starting", state_dir=settings.state_dir, listen=url,
                   token_source=source, worker_logs=worker_logs,
                   msg=f"state in {settings.state_dir}; listening on {url} "
                       f"(OpenAPI docs: {url}/docs)")
    header = ('"Authorization: Bearer $BLKSERVE_API_TOKEN"' if source.startswith("env")
              else f'"Authorization: Bearer $(cat {source})"')
    log.info("API token: %s. Try: curl -H %s %s/v1/volumes", source, header, url)
    log.info("create a volume: curl -H %s -H 'Content-Type: application/json' -d "
             "'{\"name\": \"vol1\", \"size_bytes\": 1073741824}' %s/v1/volumes", header, url)
    # log_config=None: uvicorn's own records go through the root logger too
    # SIGTERM waits at most 5 s for requests in progress (a hypervisor call
    # that hangs must not keep the daemon from stopping; its thread is a
    # daemon thread, see api/calls.py)
    uvicorn.run(app, host=host, port=port, log_level="warning", access_log=False,
                log_config=None, timeout_graceful_shutdown=5)
    return 0
