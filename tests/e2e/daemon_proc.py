"""Start a real ``hekitrace daemon`` process for e2e tests, the way systemd would.

The daemon runs as a child process with its own temporary runtime dir, state dir,
control socket and free loopback port; a test-owned ``NOTIFY_SOCKET`` collects its
sd_notify messages; ``WATCHDOG_USEC`` is set so watchdog pings flow. Like the unit file,
the process is restricted to the unit's ``CapabilityBoundingSet`` (read from
packaging/systemd/hekitrace.service with setpriv), so a test passing here also shows
those capabilities are enough.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
UNIT = ROOT / "packaging" / "systemd" / "hekitrace.service"
HEKITRACE = [sys.executable, "-m", "hekitrace.cli"]
BPF_PROG_GET_FD_BY_ID = 13  # include/uapi/linux/bpf.h enum bpf_cmd


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def unit_capabilities() -> list[str]:
    for line in UNIT.read_text().splitlines():
        if line.startswith("CapabilityBoundingSet="):
            return [c.strip().lower().removeprefix("cap_") for c in line.split("=", 1)[1].split()]
    raise AssertionError("the unit file has no CapabilityBoundingSet")


class DaemonProcess:
    """One daemon; ``start()`` returns when READY=1 arrived (or raises with its stderr)."""

    def __init__(self, extra_config: str = "", watchdog_usec: int = 2_000_000,
                 metrics_config: str = "", client_tls: ssl.SSLContext | None = None) -> None:
        """``metrics_config`` is YAML added under ``metrics:`` (indented two spaces, e.g.
        a ``tls:`` block); ``client_tls`` is the context :meth:`http` then scrapes with."""
        self.dir = Path(tempfile.mkdtemp(prefix="hekitrace-e2e-"))
        os.chmod(self.dir, 0o755)  # a uid-65534 child must reach the socket to be refused
        self.port = free_port()
        self.socket_path = str(self.dir / "run" / "control.sock")
        self.config_path = self.dir / "hekitrace.yaml"
        self.base_config = (
            f"metrics:\n  listen: \"127.0.0.1:{self.port}\"\n{metrics_config}"
            f"control:\n  socket: {self.socket_path}\n"
            f"journal:\n  enabled: false\n  directory: {self.dir / 'state'}\n"
            "daemon:\n  status_interval_seconds: 1\n" + extra_config)
        self.config_path.write_text(self.base_config)
        self.notify_path = str(self.dir / "notify")
        self.notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.notify.bind(self.notify_path)
        self.notify.settimeout(0.2)
        self.messages: list[str] = []
        self._lock = threading.Lock()
        self._reader: threading.Thread | None = None
        self._closing = False
        self._pending: list[str] = []
        self.watchdog_usec = watchdog_usec
        self.proc: subprocess.Popen | None = None
        self.client_tls = client_tls
        self.stderr_path = self.dir / "stderr.log"

    def start(self, timeout: float = 60.0) -> DaemonProcess:
        env = dict(os.environ, NOTIFY_SOCKET=self.notify_path,
                   WATCHDOG_USEC=str(self.watchdog_usec), PYTHONUNBUFFERED="1")
        env.pop("WATCHDOG_PID", None)
        caps = ",".join("+" + c for c in unit_capabilities())
        cmd = ["setpriv", f"--bounding-set=-all,{caps}", "--inh-caps=-all", "--",
               *HEKITRACE, "daemon", "--config", str(self.config_path),
               "--foreground-status"]
        self._stderr = open(self.stderr_path, "wb")
        self.proc = subprocess.Popen(cmd, env=env, cwd=str(ROOT), stdout=subprocess.DEVNULL,
                                     stderr=self._stderr)
        # Read notifications continuously, like systemd: an unread queue would make
        # the daemon's sends fail (they never block), and we want every message.
        self._reader = threading.Thread(target=self._read_notify, daemon=True)
        self._reader.start()
        self.wait_message(lambda m: m.startswith("READY=1"), timeout, since=0)
        return self

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def _read_notify(self) -> None:
        while not self._closing:
            try:
                msg = self.notify.recv(65536).decode()
            except (TimeoutError, BlockingIOError):
                continue
            except OSError:
                return
            with self._lock:
                self._pending.append(msg)

    def collect(self) -> None:
        """Move the notifications received so far into ``messages``."""
        time.sleep(0.05)
        with self._lock:
            self.messages.extend(self._pending)
            self._pending.clear()

    def wait_message(self, predicate, timeout: float = 30.0, since: int | None = None) -> str:
        """First message from index ``since`` (default: messages not yet received) on
        that satisfies ``predicate``."""
        deadline = time.monotonic() + timeout
        self.collect()
        seen = len(self.messages) if since is None else since
        while time.monotonic() < deadline:
            self.collect()
            for msg in self.messages[seen:]:
                if predicate(msg):
                    return msg
            seen = len(self.messages)
            if self.proc is not None and self.proc.poll() is not None:
                raise AssertionError(f"daemon exited {self.proc.returncode}:\n{self.stderr()}")
        raise AssertionError(f"no matching sd_notify message in {timeout} s; got "
                             f"{self.messages}\nstderr:\n{self.stderr()}")

    @property
    def url(self) -> str:
        return f"{'https' if self.client_tls else 'http'}://127.0.0.1:{self.port}"

    def http(self, path: str) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(self.url + path, timeout=10,
                                        context=self.client_tls) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as error:
            return error.code, error.read().decode()

    def metrics(self) -> str:
        status, body = self.http("/metrics")
        assert status == 200, body
        return body

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def stop(self, timeout: float = 30.0) -> int:
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            rc = self.proc.wait(10)
        self._stderr.close()
        self.collect()
        return rc

    def close(self) -> None:
        self.stop()
        self._closing = True
        if self._reader is not None:
            self._reader.join(5)
        self.notify.close()


def wait_for(predicate, what: str, daemon: DaemonProcess, timeout: float = 60.0):
    """Poll ``predicate`` until it returns something truthy (and return that); on timeout
    fail naming ``what``, the last value and the daemon's stderr."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what} (last: {last})\n{daemon.stderr()}")


def metric_value(text: str, series: str) -> float | None:
    """Value of one exact series line (``name{labels}``) in an exposition, or None."""
    for line in text.splitlines():
        if line.startswith(series + " "):
            return float(line.rsplit(" ", 1)[1])
    return None


def bpf_prog_ids_of(pid: int) -> set[int]:
    """IDs of the BPF programs process ``pid`` holds open (from /proc/PID/fdinfo)."""
    ids = set()
    fd_dir = Path(f"/proc/{pid}/fd")
    for fd in os.listdir(fd_dir):
        try:
            if os.readlink(fd_dir / fd) != "anon_inode:bpf-prog":
                continue
            for line in Path(f"/proc/{pid}/fdinfo/{fd}").read_text().splitlines():
                if line.startswith("prog_id:"):
                    ids.add(int(line.split()[1]))
        except (FileNotFoundError, ProcessLookupError):
            continue
    return ids


def bpf_progs() -> dict[int, str]:
    """Every loaded BPF program on the host: id -> name (bpftool)."""
    out = subprocess.run(["bpftool", "-j", "prog", "list"], capture_output=True, text=True,
                         check=True, timeout=60).stdout
    return {p["id"]: p.get("name", "") for p in json.loads(out)}


def prog_fd_by_id(prog_id: int) -> int:
    """bpf(BPF_PROG_GET_FD_BY_ID): our own fd on the daemon's loaded program."""
    libc = ctypes.CDLL(None, use_errno=True)
    attr = (ctypes.c_uint32 * 32)()   # union bpf_attr, zeroed; prog_id is its first u32
    attr[0] = prog_id
    fd = libc.syscall(321, BPF_PROG_GET_FD_BY_ID, ctypes.byref(attr), ctypes.sizeof(attr))
    if fd < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"BPF_PROG_GET_FD_BY_ID {prog_id}: {os.strerror(err)}")
    return fd
