"""Run the real daemon (`python -m hedwigpy serve -c FILE`) as a subprocess on loopback ports."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomli_w

REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


_blackhole: socket.socket | None = None


def blackhole_port() -> int:
    """A loopback port that accepts TCP connections (the kernel completes the handshake) and never says a
    word: an upstream that hangs. Receive tests relay everything there so the spool they inspect stays
    put while the daemon waits for a banner."""
    global _blackhole
    if _blackhole is None:
        _blackhole = socket.socket()
        _blackhole.bind(("127.0.0.1", 0))
        _blackhole.listen(1024)
    port: int = _blackhole.getsockname()[1]
    return port


def base_config(tmp: Path) -> dict[str, Any]:
    return {
        # A short drain: test upstreams often hang on purpose, and a stop waits for attempts in flight.
        "server": {"hostname": "mx.test.example", "spool_dir": str(tmp / "spool"), "drain_timeout": "2s"},
        "log": {"level": "info", "format": "json"},
        "listeners": [
            {
                "name": "relay",
                "addr": f"127.0.0.1:{free_port()}",
                "role": "submission",
                "tls": "none",
                "trusted_networks": ["127.0.0.0/8", "::1/128"],
            }
        ],
        "http": {"addr": f"127.0.0.1:{free_port()}"},
        "delivery": {"port": free_port(), "cut_through": False},
        "routes": [{"transport": "relay", "hosts": [f"127.0.0.1:{blackhole_port()}"], "tls": "none"}],
    }


@dataclass
class Daemon:
    """A daemon process and what tests need to reach it."""

    tmp: Path
    config: dict[str, Any]
    proc: subprocess.Popen[bytes] | None = None
    log_path: Path = field(init=False)
    starts: int = 0

    def __post_init__(self) -> None:
        self.log_path = self.tmp / "daemon.log"
        self.config_path = self.tmp / "hedwig.toml"

    @property
    def spool(self) -> Path:
        return Path(self.config["server"]["spool_dir"])

    def port(self, listener: str | None = None) -> int:
        for lst in self.config["listeners"]:
            if listener is None or lst["name"] == listener:
                return int(lst["addr"].rsplit(":", 1)[1])
        raise KeyError(listener)

    def spawn(self, **env: str) -> int:
        """Start the process with `env` added to ours, without waiting; the log offset of its lines."""
        self.write_config()
        environment = dict(os.environ, PYTHONUNBUFFERED="1", **env)
        offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "hedwigpy", "serve", "-c", str(self.config_path)],
                cwd=self.tmp,
                stdout=log,
                stderr=log,
                env=environment,
            )
        self.starts += 1
        return offset

    def start(self, timeout: float = 20.0) -> None:
        offset = self.spawn()
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"daemon exited {self.proc.returncode}:\n{self.log_text()[-4000:]}")
            if any(e.get("event") == "ready" for e in self.log_events(offset)):
                return
            time.sleep(0.02)
        raise RuntimeError(f"daemon not ready in {timeout}s:\n{self.log_text()[-4000:]}")

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def log_events(self, offset: int = 0) -> list[dict[str, Any]]:
        events = []
        with self.log_path.open("rb") as f:
            f.seek(offset)
            for line in f.read().splitlines():
                try:
                    events.append(json.loads(line))
                except ValueError:
                    continue
        return events

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def signal(self, sig: signal.Signals) -> None:
        assert self.proc is not None and self.proc.poll() is None, "the daemon is not running"
        self.proc.send_signal(sig)

    def wait_exit(self, timeout: float) -> int:
        """The daemon's exit status; fails the test when it is still running after `timeout` seconds."""
        assert self.proc is not None
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(
                f"daemon still running after {timeout}s:\n{self.log_text()[-3000:]}"
            ) from None

    def write_config(self) -> None:
        """Write `config` to the file the daemon reads (then `signal(SIGHUP)` to reload it)."""
        self.config_path.write_text(tomli_w.dumps(self.config))

    def wait_log(self, event: str, offset: int = 0, timeout: float = 10.0) -> dict[str, Any]:
        """The first log event named `event` after byte `offset` of the log, waiting for it."""
        deadline = time.monotonic() + timeout
        while True:
            found = [e for e in self.log_events(offset) if e.get("event") == event]
            if found:
                return found[0]
            if time.monotonic() > deadline:
                raise AssertionError(f"no {event!r} in the log after {timeout}s:\n{self.log_text()[-3000:]}")
            time.sleep(0.02)

    def log_size(self) -> int:
        return self.log_path.stat().st_size

    def stop(self, timeout: float = 15.0) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        return self.proc.returncode

    def spooled(self, state: str = "queued") -> list[Path]:
        d = self.spool / state
        return sorted(d.glob("*.msg")) if d.exists() else []

    def all_spooled(self) -> dict[str, list[Path]]:
        return {s: self.spooled(s) for s in ("tmp", "queued", "deferred", "held", "bounced", "corrupt")}


def read_message(path: Path) -> tuple[dict[str, Any], bytes]:
    """Envelope JSON and content of a spool file (the spool's on-disk format)."""
    raw = path.read_bytes()
    head, _, content = raw.partition(b"\n")
    envelope: dict[str, Any] = json.loads(head)
    return envelope, content
