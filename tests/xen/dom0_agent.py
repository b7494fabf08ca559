"""The Xen testbed's dom0 agent (see tests/xen/testbed.py).

Runs inside dom0, chrooted into the host's / (mounted read-only over 9p), with
the host's Python; standard library only.  Requests arrive as JSON files in
``<ctl>/req`` (written by the host, renamed into place); each is handled in a
thread and answered with ``<ctl>/resp/<id>.json`` (written to a temporary name
first, then renamed).  ``xl`` runs through the wrappers that dom0_init.sh
puts in /run/xen-bin (first on PATH); xenstore is used through dom0's own
libxenstore via ctypes (no process per access: process creation costs ~0.1 s
in a PV guest under TCG, and dom0 shares its one CPU with the domUs).

A command that leaves a background process holding its output open (``cmd &``
without a redirection) keeps ``sh`` from completing: use ``spawn`` for those.

Operations (``op``):
  sh       run ``cmd`` with /bin/sh in the repository, wait (``timeout``)
  spawn    start ``cmd`` in the background (own session), output to ``log``
  create_domu / destroy_domu / domu   PV domU lifecycle and its command relay
  poweroff answer, then exit (dom0_init.sh powers dom0 off)
"""

from __future__ import annotations

import argparse
import base64
import ctypes
import errno
import json
import math
import os
import select
import shutil
import signal
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path

OUTPUT_MAX = 4 << 20  # bytes of combined output returned for a dom0 command
CMD_INLINE = 3500  # base64 characters of a domU script sent inline in data/cmd
CMD_CHUNK = 3500  # base64 characters per data/cmd-chunk/N value otherwise
XEN_BIN = "/run/xen-bin"
DOMU_CFG_DIR = Path("/run/xen-domu")


class AgentError(Exception):
    pass


def _tail_bytes(data: bytes, limit: int) -> bytes:
    if len(data) <= limit:
        return data
    return b"[... %d bytes cut ...]\n" % (len(data) - limit) + data[-limit:]


def _tool(name: str) -> str:
    return os.path.join(XEN_BIN, name)


def run_tool(argv: list[str], timeout: float = 60, check: bool = True) -> str:
    """Run a Xen tool (through its /run/xen-bin wrapper); return its stdout."""
    argv = [_tool(argv[0]), *argv[1:]]
    res = subprocess.run(
        argv,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        timeout=timeout,
    )
    if check and res.returncode != 0:
        raise AgentError(
            f"{' '.join(argv)} failed (exit {res.returncode}): "
            f"{res.stdout.decode(errors='replace')}{res.stderr.decode(errors='replace')}"
        )
    return res.stdout.decode(errors="replace")


XS_LIBDIRS = ("/run/dom0root/usr/lib/x86_64-linux-gnu",)  # dom0's own copies first


class XenStore:
    """A small libxenstore client (ctypes): no process per xenstore access,
    which matters on a single emulated CPU shared with the domUs."""

    _lib = None
    _libc = None
    _load_lock = threading.Lock()

    @classmethod
    def _load(cls):
        with cls._load_lock:
            if cls._lib is None:
                for libdir in (*XS_LIBDIRS, ""):
                    try:
                        # libxenstore needs libxentoolcore: load it first, globally.
                        ctypes.CDLL(os.path.join(libdir, "libxentoolcore.so.1"), ctypes.RTLD_GLOBAL)
                        lib = ctypes.CDLL(os.path.join(libdir, "libxenstore.so.4"), use_errno=True)
                        break
                    except OSError:
                        continue
                else:
                    raise AgentError("cannot load libxenstore.so.4")
                vp, cp, u32 = ctypes.c_void_p, ctypes.c_char_p, ctypes.c_uint32
                lib.xs_open.restype, lib.xs_open.argtypes = vp, [ctypes.c_ulong]
                lib.xs_close.argtypes = [vp]
                lib.xs_read.restype = vp
                lib.xs_read.argtypes = [vp, u32, cp, ctypes.POINTER(ctypes.c_uint)]
                lib.xs_write.restype = ctypes.c_bool
                lib.xs_write.argtypes = [vp, u32, cp, cp, ctypes.c_uint]
                lib.xs_rm.restype, lib.xs_rm.argtypes = ctypes.c_bool, [vp, u32, cp]
                lib.xs_transaction_start.restype, lib.xs_transaction_start.argtypes = u32, [vp]
                lib.xs_transaction_end.restype = ctypes.c_bool
                lib.xs_transaction_end.argtypes = [vp, u32, ctypes.c_bool]
                lib.xs_watch.restype, lib.xs_watch.argtypes = ctypes.c_bool, [vp, cp, cp]
                lib.xs_unwatch.restype, lib.xs_unwatch.argtypes = ctypes.c_bool, [vp, cp, cp]
                lib.xs_fileno.restype, lib.xs_fileno.argtypes = ctypes.c_int, [vp]
                lib.xs_check_watch.restype, lib.xs_check_watch.argtypes = vp, [vp]
                cls._libc = ctypes.CDLL(None)
                cls._libc.free.argtypes = [vp]
                cls._lib = lib
        return cls._lib

    def __init__(self):
        self.lib = self._load()
        self.h = self.lib.xs_open(0)
        if not self.h:
            raise AgentError(f"xs_open failed: {os.strerror(ctypes.get_errno())}")

    def close(self) -> None:
        if self.h:
            self.lib.xs_close(self.h)
            self.h = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def read(self, path: str, t: int = 0) -> bytes | None:
        n = ctypes.c_uint()
        p = self.lib.xs_read(self.h, t, path.encode(), ctypes.byref(n))
        if not p:
            return None
        try:
            return ctypes.string_at(p, n.value)
        finally:
            self._libc.free(p)

    def read_str(self, path: str) -> str:
        v = self.read(path)
        return "" if v is None else v.decode(errors="replace")

    def write_many(self, pairs: dict[str, str | bytes | int], remove: tuple[str, ...] = ()) -> None:
        """Remove REMOVE, then write PAIRS, in one transaction."""
        for _attempt in range(20):
            t = self.lib.xs_transaction_start(self.h)
            if not t:
                raise AgentError(f"xs_transaction_start: {os.strerror(ctypes.get_errno())}")
            ok = True
            for path in remove:
                self.lib.xs_rm(self.h, t, path.encode())  # ENOENT is fine
            for path, value in pairs.items():
                data = value if isinstance(value, bytes) else str(value).encode()
                if not self.lib.xs_write(self.h, t, path.encode(), data, len(data)):
                    ok = False
                    err = ctypes.get_errno()
                    break
            if not ok:
                self.lib.xs_transaction_end(self.h, t, True)
                raise AgentError(f"xs_write {path}: {os.strerror(err)}")
            if self.lib.xs_transaction_end(self.h, t, False):
                return
            if ctypes.get_errno() != errno.EAGAIN:
                raise AgentError(f"xs_transaction_end: {os.strerror(ctypes.get_errno())}")
        raise AgentError("xenstore transaction kept failing with EAGAIN")

    def wait_for(self, path: str, pred, timeout: float, poll=None) -> str | None:
        """Wait until PRED(value of PATH) is true (a watch wakes us up on
        changes); returns the value, or None on timeout.  POLL, if given, is
        called about once a second and may raise to stop waiting."""
        token = f"agent-{threading.get_ident()}".encode()
        if not self.lib.xs_watch(self.h, path.encode(), token):
            raise AgentError(f"xs_watch {path}: {os.strerror(ctypes.get_errno())}")
        fd = self.lib.xs_fileno(self.h)
        deadline = time.monotonic() + timeout
        next_poll = time.monotonic() + 1.0
        try:
            while True:
                value = self.read_str(path)
                if pred(value):
                    return value
                now = time.monotonic()
                if now > deadline:
                    return None
                if poll is not None and now >= next_poll:
                    poll()
                    next_poll = time.monotonic() + 1.0
                select.select([fd], [], [], min(deadline - now, 1.0))
                while True:  # drain pending events
                    ev = self.lib.xs_check_watch(self.h)
                    if not ev:
                        break
                    self._libc.free(ev)
        finally:
            self.lib.xs_unwatch(self.h, path.encode(), token)


class Agent:
    def __init__(self, ctl: Path, repo: Path):
        self.ctl = ctl
        self.repo = repo
        self.req_dir = ctl / "req"
        self.resp_dir = ctl / "resp"
        self.stop = threading.Event()
        self.domus: dict[str, dict] = {}  # name -> {"domid", "seq", "lock"}
        self.domus_lock = threading.Lock()
        self.children: dict[int, subprocess.Popen] = {}
        self.staged: dict[Path, str] = {}  # file in dom0's tmpfs -> host file
        self.stage_lock = threading.Lock()
        self.env = dict(os.environ)

    # -- plumbing ------------------------------------------------------------

    def _write_json(self, path: Path, obj: dict) -> None:
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(json.dumps(obj))
        os.replace(tmp, path)

    def serve(self) -> None:
        self.req_dir.mkdir(exist_ok=True)
        self.resp_dir.mkdir(exist_ok=True)
        self._write_json(
            self.ctl / "ready.json",
            {
                "python": sys.version,
                "executable": sys.executable,
                "uname": os.uname().release,
                "pid": os.getpid(),
                "repo": str(self.repo),
            },
        )
        idle = 0
        while not self.stop.is_set():
            try:
                names = sorted(n for n in os.listdir(self.req_dir) if n.endswith(".json"))
            except OSError as e:
                print(f"agent: cannot list {self.req_dir}: {e}", flush=True)
                names = []
            for name in names:
                path = self.req_dir / name
                try:
                    req = json.loads(path.read_text())
                    path.unlink()
                except (OSError, ValueError) as e:
                    print(f"agent: bad request {name}: {e}", flush=True)
                    continue
                threading.Thread(target=self._handle, args=(req,), daemon=True).start()
            idle = 0 if names else idle + 1
            # Poll fast while busy, slower when idle (every listdir costs
            # 9p round trips under TCG).
            time.sleep(0.03 if idle < 20 else 0.1)
        time.sleep(0.5)  # let the last responses land

    def _handle(self, req: dict) -> None:
        rid = req.get("id", "unknown")
        t0 = time.monotonic()
        try:
            op = req["op"]
            result = getattr(self, "op_" + op)(req)
            resp = {"ok": True, **result}
        except Exception as e:  # noqa: BLE001 - every failure goes back to the host
            resp = {
                "ok": False,
                "error": f"{type(e).__name__}: {e}",
                "traceback": traceback.format_exc(),
            }
        resp["id"] = rid
        resp["elapsed"] = time.monotonic() - t0
        try:
            self._write_json(self.resp_dir / f"{rid}.json", resp)
        except OSError as e:
            print(f"agent: cannot answer {rid}: {e}", flush=True)

    # -- dom0 commands -------------------------------------------------------

    def op_ping(self, req: dict) -> dict:
        return {"pong": True}

    def op_sh(self, req: dict) -> dict:
        proc = subprocess.Popen(
            ["/bin/sh", "-c", req["cmd"]],
            cwd=req.get("cwd") or self.repo,
            env=self.env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        timed_out = False
        try:
            out, _ = proc.communicate(timeout=req.get("timeout", 120))
        except subprocess.TimeoutExpired:
            timed_out = True
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            try:
                out, _ = proc.communicate(timeout=10)
            except subprocess.TimeoutExpired:  # a grandchild still holds the pipe
                proc.kill()
                out = b""
        return {
            "rc": proc.returncode,
            "timed_out": timed_out,
            "output": _tail_bytes(out, OUTPUT_MAX).decode(errors="replace"),
        }

    def op_spawn(self, req: dict) -> dict:
        log = Path(req["log"])
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "ab") as f:
            proc = subprocess.Popen(
                ["/bin/sh", "-c", req["cmd"]],
                cwd=req.get("cwd") or self.repo,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=f,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.children[proc.pid] = proc
        # Reap it when it ends, so that `kill -0 PID` stops succeeding.
        threading.Thread(target=proc.wait, daemon=True).start()
        return {"pid": proc.pid}

    def op_poweroff(self, req: dict) -> dict:
        for proc in self.children.values():
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        self.stop.set()
        return {}

    # -- domUs ---------------------------------------------------------------

    def _domu(self, name: str) -> dict:
        with self.domus_lock:
            if name not in self.domus:
                raise AgentError(f"no domU named {name!r} was created by this agent")
            return self.domus[name]

    def op_create_domu(self, req: dict) -> dict:
        name = req["name"]
        DOMU_CFG_DIR.mkdir(parents=True, exist_ok=True)
        cfg = DOMU_CFG_DIR / f"{name}.cfg"
        lines = {
            "name": name,
            "type": "pv",
            "kernel": self._stage(req["kernel"]),
            "ramdisk": self._stage(req["ramdisk"]),
            "cmdline": req["cmdline"],
            "memory": int(req["mem_mb"]),
            "maxmem": int(req["mem_mb"]),
            "vcpus": int(req.get("vcpus", 1)),
            "on_poweroff": "destroy",
            "on_reboot": "destroy",
            "on_crash": "preserve",
        }
        text = "".join(
            f"{k} = {json.dumps(v) if isinstance(v, str) else v}\n" for k, v in lines.items()
        )
        text += "".join(f"{line}\n" for line in req.get("extra_config", []))
        cfg.write_text(text)
        timeout = req.get("timeout", 180)
        t0 = time.monotonic()
        out = run_tool(["xl", "create", str(cfg)], timeout=timeout)
        t_created = time.monotonic()
        domid = int(run_tool(["xl", "domid", name]).strip())
        home = f"/local/domain/{domid}"
        # The domU owns its data/ directory (its command channel); dom0 may
        # always read and write.  libxl creates data/ already, be explicit.
        run_tool(["xenstore-chmod", f"{home}/data", f"n{domid}"])
        info = {"domid": domid, "seq": 0, "lock": threading.Lock(), "home": home}
        with self.domus_lock:
            self.domus[name] = info
        last_check = [time.monotonic()]

        def check_state():
            if time.monotonic() - last_check[0] < 5:  # `xl list` is not free
                return
            last_check[0] = time.monotonic()
            state = self._domu_state(name)
            if "c" in state or "s" in state:
                raise AgentError(
                    f"domU {name} (domid {domid}) stopped before it was ready "
                    f"(xl state {state!r})\n{self._xl_list()}"
                )

        with XenStore() as xs:
            ready = xs.wait_for(f"{home}/data/ready", bool, timeout, poll=check_state)
        if ready is None:
            raise AgentError(
                f"domU {name} (domid {domid}) did not report ready within "
                f"{timeout}s\n{self._xl_list()}"
            )
        return {
            "domid": domid,
            "kernel_release": ready,
            "xl_output": out,
            "xl_create_seconds": t_created - t0,
            "boot_seconds": time.monotonic() - t_created,
        }

    def _stage(self, src: str) -> str:
        """Copy a host file (kernel, initramfs) to dom0's tmpfs, once per boot.

        libxenguest mmaps the images; page faults on an uncached 9p file
        cost it ~25 s for 150 MB under TCG, a plain copy ~3 s."""
        with self.stage_lock:
            dst = DOMU_CFG_DIR / "images" / Path(src).name
            if self.staged.get(dst) != src:
                dst.parent.mkdir(parents=True, exist_ok=True)
                tmp = dst.with_name(dst.name + ".tmp")
                shutil.copyfile(src, tmp)
                os.replace(tmp, dst)
                self.staged[dst] = src
            return str(dst)

    def _domu_state(self, name: str) -> str:
        out = run_tool(["xl", "list", name], check=False).splitlines()
        return out[-1].split()[4] if len(out) >= 2 and len(out[-1].split()) >= 5 else ""

    def _xl_list(self) -> str:
        try:
            return run_tool(["xl", "list"], check=False)
        except Exception as e:  # noqa: BLE001
            return f"<xl list failed: {e}>"

    def op_adopt_domu(self, req: dict) -> dict:
        """The domU NAME has a new domid (``xl restore`` made it): talk to it
        there.  Its command channel is its own data/ directory, which the
        restored guest's xenstore watch follows (relative paths)."""
        name = req["name"]
        info = self._domu(name)
        domid = int(run_tool(["xl", "domid", name]).strip())
        home = f"/local/domain/{domid}"
        run_tool(["xenstore-chmod", f"{home}/data", f"n{domid}"])
        with info["lock"]:
            info["domid"], info["home"] = domid, home
        return {"domid": domid}

    def op_destroy_domu(self, req: dict) -> dict:
        name = req["name"]
        out = run_tool(["xl", "destroy", name], check=False)
        with self.domus_lock:
            self.domus.pop(name, None)
        return {"output": out}

    def op_domu(self, req: dict) -> dict:
        info = self._domu(req["name"])
        timeout = max(1, math.ceil(float(req.get("timeout", 120))))
        grace = float(req.get("grace", 30))
        home = info["home"]
        with info["lock"]:
            info["seq"] += 1
            seq = str(info["seq"])
            b64 = base64.b64encode(req["cmd"].encode()).decode()
            d = f"{home}/data"
            if len(b64) <= CMD_INLINE:
                pairs = {f"{d}/cmd": f"{seq} {timeout} 0 {b64}"}
            else:
                chunks = [b64[i : i + CMD_CHUNK] for i in range(0, len(b64), CMD_CHUNK)]
                pairs = {f"{d}/cmd-chunk/{i}": c for i, c in enumerate(chunks)}
                pairs[f"{d}/cmd"] = f"{seq} {timeout} {len(chunks)}"
            with XenStore() as xs:
                xs.write_many(pairs, remove=(f"{d}/cmd-chunk",))
                res = xs.wait_for(f"{d}/res", lambda v: v.split(" ", 1)[0] == seq, timeout + grace)
                if res is None:
                    return {
                        "rc": None,
                        "timed_out": True,
                        "relay_timeout": True,
                        "output": "",
                        "detail": f"domU {req['name']} did not answer command {seq} within "
                        f"{timeout + grace:.0f}s (it may be hung)\n{self._xl_list()}",
                    }
                _, rc, timed_out, size, n = res.split()
                b64out = "".join(xs.read_str(f"{d}/out/{i}") for i in range(int(n)))
            data = base64.b64decode(b64out)
            if int(size) > len(data):
                data = b"[... %d bytes cut ...]\n" % (int(size) - len(data)) + data
        return {
            "rc": int(rc),
            "timed_out": timed_out == "1",
            "output": data.decode(errors="replace"),
        }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ctl", required=True, type=Path)
    ap.add_argument("--repo", required=True, type=Path)
    args = ap.parse_args()
    print(
        f"agent: pid {os.getpid()}, python {sys.version.split()[0]}, repo {args.repo}", flush=True
    )
    Agent(args.ctl, args.repo).serve()
    print("agent: power-off requested", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
