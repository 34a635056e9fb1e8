"""systemd/hedwigpy.service: the settings the daemon and docs rely on, read from the file everywhere;
`systemd-analyze verify` and `systemd-sysusers --dry-run` where systemd is installed."""

from __future__ import annotations

import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from hedwigpy.cli import build_parser

SYSTEMD = Path(__file__).resolve().parents[1] / "systemd"
UNIT = SYSTEMD / "hedwigpy.service"
INSTALLED_BINARY = "/opt/hedwigpy/.venv/bin/hedwigpy"


def settings(text: str) -> dict[str, dict[str, list[str]]]:
    """Unit file sections → key → values in order (keys may repeat, so no configparser)."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] = {}
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
            continue
        key, sep, value = line.partition("=")
        assert sep, f"not a setting: {raw!r}"
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


def service() -> dict[str, list[str]]:
    return settings(UNIT.read_text())["Service"]


def one(key: str) -> str:
    [value] = service()[key]
    return value


def test_notify_type_and_how_the_daemon_is_run() -> None:
    assert one("Type") == "notify"
    assert one("NotifyAccess") == "main"
    argv = shlex.split(one("ExecStart"))
    assert argv[0] == INSTALLED_BINARY
    assert argv[1:] == ["serve", "-c", "/etc/hedwigpy/hedwig.toml"]
    args = build_parser().parse_args(argv[1:])  # the command line our CLI really accepts
    assert args.command == "serve"
    assert one("ExecReload") == "/bin/kill -HUP $MAINPID"
    assert one("KillSignal") == "SIGTERM"
    assert one("WatchdogSec") == "30s"


def test_stop_timeout_covers_the_drain() -> None:
    timeout = one("TimeoutStopSec")
    assert timeout.endswith("s") and int(timeout[:-1]) > 30  # [server].drain_timeout defaults to 30 s


def test_user_state_and_port_25() -> None:
    assert one("User") == "hedwigpy"
    assert one("StateDirectory") == "hedwigpy"
    assert one("ConfigurationDirectory") == "hedwigpy"
    assert one("AmbientCapabilities") == "CAP_NET_BIND_SERVICE"
    assert one("CapabilityBoundingSet") == "CAP_NET_BIND_SERVICE"
    assert "hedwigpy" in (SYSTEMD / "hedwigpy.sysusers").read_text().split()


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("NoNewPrivileges", "yes"),
        ("ProtectSystem", "strict"),
        ("ProtectHome", "yes"),
        ("PrivateTmp", "yes"),
        ("PrivateDevices", "yes"),
        ("ProtectKernelTunables", "yes"),
        ("ProtectKernelModules", "yes"),
        ("ProtectKernelLogs", "yes"),
        ("ProtectControlGroups", "yes"),
        ("ProtectClock", "yes"),
        ("ProtectHostname", "yes"),
        ("RestrictAddressFamilies", "AF_INET AF_INET6 AF_UNIX"),
        ("RestrictNamespaces", "yes"),
        ("RestrictRealtime", "yes"),
        ("RestrictSUIDSGID", "yes"),
        ("LockPersonality", "yes"),
        ("MemoryDenyWriteExecute", "yes"),
        ("SystemCallFilter", "@system-service"),
        ("SystemCallArchitectures", "native"),
        ("UMask", "0077"),
    ],
)
def test_hardening(key: str, value: str) -> None:
    assert one(key) == value


def test_no_write_access_outside_the_state_directory() -> None:
    # With ProtectSystem=strict only StateDirectory is writable; extra paths would widen that.
    assert "ReadWritePaths" not in service()


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed")
def test_systemd_analyze_verify(tmp_path: Path) -> None:
    # verify checks that ExecStart exists: point it at this checkout's entry point, nothing else changes.
    binary = Path(sys.executable).with_name("hedwigpy")
    assert binary.exists()
    unit = tmp_path / "hedwigpy.service"
    unit.write_text(UNIT.read_text().replace(INSTALLED_BINARY, str(binary)))
    result = subprocess.run(
        ["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr == "", result.stderr  # warnings (unknown keys, bad values) count too


@pytest.mark.skipif(shutil.which("systemd-sysusers") is None, reason="systemd-sysusers not installed")
def test_sysusers_file_parses(tmp_path: Path) -> None:
    conf = tmp_path / "hedwigpy.conf"
    shutil.copy(SYSTEMD / "hedwigpy.sysusers", conf)
    result = subprocess.run(
        ["systemd-sysusers", "--dry-run", str(conf)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert "Creating user 'hedwigpy'" in result.stderr + result.stdout
