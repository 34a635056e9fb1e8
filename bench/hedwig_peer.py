"""hedwigpy as a benchmark target: a temporary config, the daemon as a subprocess, a clean stop.

The daemon is started from a command template (default `.venv/bin/hedwigpy serve -c {config}`, run from the
repository root), listens on loopback ports only, relays everything to an `smtp-sink` and keeps its spool in a
temporary directory that is removed afterwards.
"""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import Any

import tomli_w

from .postfix_peer import LOOPBACK, free_port, vm_hwm_kb

REPO = Path(__file__).resolve().parent.parent
DEFAULT_CMD = ".venv/bin/hedwigpy serve -c {config}"
DEFAULT_MAX_MESSAGE_SIZE = 25 * 1024 * 1024  # INTERFACE.md default: raised only for larger bench messages


def bench_config(
    base: Path,
    *,
    smtp_port: int,
    http_port: int,
    sink_port: int,
    max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE,
    max_connections_per_ip: int = 50,
    rcpt_domains: tuple[str, ...] = ("example.net",),
    delivery: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The daemon's config for a bench run (keys from INTERFACE.md's Config section).

    A relay route sends the bench's recipient domains to the sink (no DNS); `delivery.port` points at the
    sink too, for anything that still goes the MX way. `delivery` adds to or overrides `[delivery]` keys
    (e.g. `cut_through`, `max_connections_per_host`).
    """
    return {
        "server": {"hostname": "bench.local", "spool_dir": str(base / "spool")},
        "log": {"level": "warning"},
        "listeners": [
            {
                "name": "bench",
                "addr": f"{LOOPBACK}:{smtp_port}",
                "role": "submission",
                "tls": "none",
                "trusted_networks": ["127.0.0.0/8"],
            }
        ],
        "http": {"addr": f"{LOOPBACK}:{http_port}"},
        "limits": {
            "max_message_size": max(max_message_size, DEFAULT_MAX_MESSAGE_SIZE),
            "max_connections_per_ip": max(max_connections_per_ip, 50),
        },
        "delivery": {"port": sink_port, "cut_through": False, "tls": "none", **(delivery or {})},
        "routes": [
            {
                "recipient_domains": list(rcpt_domains),
                "transport": "relay",
                "hosts": [f"{LOOPBACK}:{sink_port}"],
                "tls": "none",
            }
        ],
    }


def dkim_key(base: Path, domain: str, kind: str = "rsa") -> dict[str, str]:
    """A fresh key for `domain` in `base` (mode 0600; "rsa": RSA-2048, or "ed25519"), as a
    `[[dkim.keys]]` entry: every bench message (From: bench@example.com) is then signed."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

    key = (
        ed25519.Ed25519PrivateKey.generate()
        if kind == "ed25519"
        else rsa.generate_private_key(public_exponent=65537, key_size=2048)
    )
    path = base / f"dkim-{domain}.pem"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(
            key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        )
    return {"domain": domain, "selector": "bench", "private_key": str(path)}


def _smtp_banner(port: int, timeout: float = 2.0) -> bytes:
    """Connect, read the banner, say QUIT: proves the listener is up without leaving a broken session."""
    with socket.create_connection((LOOPBACK, port), timeout=timeout) as s:
        banner = s.recv(4096)
        if banner.startswith(b"220"):
            s.sendall(b"QUIT\r\n")
            try:
                s.recv(4096)
            except OSError:
                pass
        return banner


class HedwigDaemon:
    """The hedwigpy daemon in a temporary directory; a context manager that always stops it."""

    def __init__(
        self,
        *,
        sink_port: int,
        cmd_template: str = DEFAULT_CMD,
        max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE,
        max_connections_per_ip: int = 50,
        delivery: Mapping[str, Any] | None = None,
        keep: bool = False,
        dkim_domain: str | None = None,
        dkim_type: str = "rsa",
    ) -> None:
        self.base = Path(tempfile.mkdtemp(prefix="hedwig-bench-daemon-"))
        self.keep = keep
        self.sink_port = sink_port
        self.smtp_port = free_port()
        self.http_port = free_port()
        while self.http_port == self.smtp_port:
            self.http_port = free_port()
        self.config_path = self.base / "hedwig.toml"
        self.log_path = self.base / "daemon.log"
        self.config = bench_config(
            self.base,
            smtp_port=self.smtp_port,
            http_port=self.http_port,
            sink_port=sink_port,
            max_message_size=max_message_size,
            max_connections_per_ip=max_connections_per_ip,
            delivery=delivery,
        )
        if dkim_domain is not None:
            self.config["dkim"] = {"keys": [dkim_key(self.base, dkim_domain, dkim_type)]}
        self.argv = [a.format(config=str(self.config_path)) for a in shlex.split(cmd_template)]
        self.proc: subprocess.Popen[bytes] | None = None
        self.peak_hwm_kb = 0
        self.returncode: int | None = None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None and self.proc.poll() is None else None

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def start(self, timeout: float = 30.0) -> None:
        self.config_path.write_text(tomli_w.dumps(self.config))
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        env.pop("HEDWIG_LOG_LEVEL", None)  # the config's level ("warning") applies
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                self.argv,
                cwd=REPO,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,  # a Ctrl-C meant for the bench reaches the daemon only through stop()
            )
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"hedwigpy exited with {self.proc.returncode} before listening "
                    f"({' '.join(self.argv)}):\n{self.log_tail()}"
                )
            try:
                if _smtp_banner(self.smtp_port).startswith(b"220"):
                    return
            except OSError:
                pass
            if time.monotonic() >= deadline:
                raise TimeoutError(
                    f"hedwigpy not listening on {self.smtp_port} after {timeout:g}s:\n{self.log_tail()}"
                )
            time.sleep(0.1)

    def queued(self) -> int | None:
        """Messages waiting for delivery (files in spool/queued); None when there is no such directory."""
        queued = self.base / "spool" / "queued"
        if not queued.is_dir():
            return None
        return sum(1 for entry in os.scandir(queued) if entry.is_file())

    def deferred(self) -> int:
        deferred = self.base / "spool" / "deferred"
        return sum(1 for entry in os.scandir(deferred) if entry.is_file()) if deferred.is_dir() else 0

    def stop(self, grace: float = 10.0) -> int | None:
        """SIGTERM, then SIGKILL after `grace` seconds; records the lifetime peak RSS (VmHWM) first."""
        proc, self.proc = self.proc, None
        if proc is None:
            return self.returncode
        if proc.poll() is None:
            self.peak_hwm_kb = max(self.peak_hwm_kb, vm_hwm_kb(proc.pid))
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(grace)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
        self.returncode = proc.returncode
        return self.returncode

    def cleanup(self) -> None:
        if not self.keep:
            shutil.rmtree(self.base, ignore_errors=True)

    def __enter__(self) -> HedwigDaemon:
        try:
            self.start()
        except BaseException:
            self.stop()
            self.cleanup()
            raise
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
        self.cleanup()
