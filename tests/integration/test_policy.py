"""Policy on the wire: filters, per-client rate limits, connection limits, AUTH only after TLS for
clients off loopback (a real non-loopback client from a network namespace), and the CLI around it."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trustme

from hedwigpy.auth import hash_password, verify_password

from .daemon import Daemon, free_port
from .wire import Wire


def started(tmp_path: Path, config: dict[str, Any], factory: type[Daemon]) -> Daemon:
    d = factory(tmp_path, config)
    d.start()
    return d


def test_sender_and_recipient_filters(
    tmp_path: Path, config: dict[str, Any], daemon_factory: type[Daemon]
) -> None:
    config["filters"] = [
        {"type": "sender_domain", "domains": ["spammer.example"], "action": "deny"},
        {"type": "recipient_domain", "domains": ["blocked.example"], "action": "deny"},
    ]
    d = started(tmp_path, config, daemon_factory)
    with Wire(d.port()) as w:
        w.cmd("EHLO client.example")
        assert w.cmd("MAIL FROM:<x@mail.spammer.example>") == (
            "550 5.7.1 <x@mail.spammer.example>: Sender address rejected: domain not allowed"
        )
        assert w.cmd("MAIL FROM:<x@fine.example>") == "250 2.1.0 Ok"
        assert w.cmd("RCPT TO:<y@blocked.example>") == (
            "550 5.7.1 <y@blocked.example>: Recipient address rejected: domain not allowed"
        )
        assert w.cmd("RCPT TO:<y@open.example>") == "250 2.1.5 Ok"


def test_per_client_rate_limit(tmp_path: Path, config: dict[str, Any], daemon_factory: type[Daemon]) -> None:
    config["rate_limits"] = {"per_client": 3}
    d = started(tmp_path, config, daemon_factory)
    with Wire(d.port()) as w:
        w.cmd("EHLO client.example")
        for _ in range(3):
            assert w.cmd("MAIL FROM:<a@src.example>") == "250 2.1.0 Ok"
            assert w.cmd("RSET") == "250 2.0.0 Ok"
        assert (
            w.cmd("MAIL FROM:<a@src.example>")
            == "450 4.7.1 Error: too much mail from this client, try again later"
        )


def test_connection_limits(tmp_path: Path, config: dict[str, Any], daemon_factory: type[Daemon]) -> None:
    config["limits"] = {"max_connections_per_ip": 2, "max_connections": 3}
    d = started(tmp_path, config, daemon_factory)
    first, second = Wire(d.port()), Wire(d.port())
    with Wire(d.port(), greet=False) as third:
        assert (
            third.reply()
            == "421 4.7.0 mx.test.example Too many connections from your address, try again later"
        )
        assert third.closed()
    second.close()
    assert second.sock.fileno() == -1
    # A slot is free again once a connection ends; the daemon learns of the close asynchronously.
    deadline = time.monotonic() + 5
    while True:
        with Wire(d.port()) as again:
            if again.banner.startswith("220 ") or time.monotonic() > deadline:
                assert again.banner.startswith("220 ")
                break
        time.sleep(0.05)
    first.close()


# -- AUTH from off loopback -------------------------------------------------------------------------

NS_CLIENT = textwrap.dedent(
    """
    import base64, socket, ssl, sys
    host, port, cafile = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    s = socket.create_connection((host, port), timeout=10)
    f = s.makefile("rb")
    def reply():
        lines = []
        while True:
            line = f.readline().decode().rstrip("\\r\\n")
            lines.append(line)
            if line[3:4] != "-":
                return "\\n".join(lines)
    def cmd(sock, line):
        sock.sendall(line.encode() + b"\\r\\n")
        return reply()
    reply()
    print("EHLO1", "AUTH" in cmd(s, "EHLO far.example"))
    creds = base64.b64encode(b"\\0app\\0right").decode()
    print("AUTH1", cmd(s, "AUTH PLAIN " + creds))
    print("TLS", cmd(s, "STARTTLS"))
    ctx = ssl.create_default_context(cafile=cafile)
    s = ctx.wrap_socket(s, server_hostname="mx.test.example")
    f = s.makefile("rb")
    print("EHLO2", "AUTH PLAIN LOGIN" in cmd(s, "EHLO far.example"))
    print("AUTH2", cmd(s, "AUTH PLAIN " + creds))
    """
)


@pytest.fixture
def netns() -> Iterator[tuple[str, str, str]]:
    """A network namespace 'far away': host side 198.18.x.1, namespace side 198.18.x.2 (RFC 2544 range)."""
    if os.geteuid() != 0:
        pytest.fail("the off-loopback test needs root for a network namespace (CI runs as root)")
    tag = uuid.uuid4().hex[:6]
    name, host_if, ns_if = f"hp{tag}", f"hph{tag}", f"hpn{tag}"
    octet = int(tag[:2], 16) % 250 + 1
    host_ip, ns_ip = f"198.18.{octet}.1", f"198.18.{octet}.2"

    def ip(*args: str) -> None:
        subprocess.run(["ip", *args], check=True, capture_output=True)

    ip("netns", "add", name)
    try:
        ip("link", "add", host_if, "type", "veth", "peer", "name", ns_if)
        ip("link", "set", ns_if, "netns", name)
        ip("addr", "add", f"{host_ip}/30", "dev", host_if)
        ip("link", "set", host_if, "up")
        ip("netns", "exec", name, "ip", "addr", "add", f"{ns_ip}/30", "dev", ns_if)
        ip("netns", "exec", name, "ip", "link", "set", ns_if, "up")
        ip("netns", "exec", name, "ip", "link", "set", "lo", "up")
        yield name, host_ip, ns_ip
    finally:
        subprocess.run(["ip", "link", "del", host_if], check=False, capture_output=True)
        subprocess.run(["ip", "netns", "del", name], check=False, capture_output=True)


def test_auth_needs_tls_off_loopback(
    tmp_path: Path,
    config: dict[str, Any],
    daemon_factory: type[Daemon],
    certfiles: tuple[Path, Path],
    ca: trustme.CA,
    netns: tuple[str, str, str],
) -> None:
    name, host_ip, _ = netns
    cert, key = certfiles
    port = free_port()
    config["users"] = [{"name": "app", "password_hash": hash_password("right", ln=10)}]
    config["listeners"][0].update(
        {
            "addr": f"{host_ip}:{port}",
            "trusted_networks": [],
            "tls": "starttls",
            "cert": str(cert),
            "key": str(key),
        }
    )
    started(tmp_path, config, daemon_factory)
    script, cafile = tmp_path / "client.py", tmp_path / "ca.pem"
    script.write_text(NS_CLIENT)
    ca.cert_pem.write_to_path(str(cafile))
    result = subprocess.run(
        ["ip", "netns", "exec", name, sys.executable, str(script), host_ip, str(port), str(cafile)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 0, result.stderr
    out = result.stdout.splitlines()
    assert out == [
        "EHLO1 False",
        "AUTH1 538 5.7.11 Encryption required for requested authentication mechanism",
        "TLS 220 2.0.0 Ready to start TLS",
        "EHLO2 True",
        "AUTH2 235 2.7.0 Authentication successful",
    ]


# -- CLI ---------------------------------------------------------------------------------------------


def hedwigpy(*args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "hedwigpy", *args], input=stdin, capture_output=True, text=True, timeout=60
    )


def test_passwd_prints_a_verifiable_hash() -> None:
    result = hedwigpy("passwd", stdin="correct horse\n")
    assert result.returncode == 0
    assert verify_password("correct horse", result.stdout.strip())
    assert not verify_password("wrong", result.stdout.strip())


def test_config_check_names_every_bad_key(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text(
        '[server]\nbogus = 1\n[limits]\nmax_recipients = "many"\n'
        '[[listeners]]\nname = "x"\naddr = "127.0.0.1:25"\nrole = "foo"\n'
        '[[users]]\nname = "u"\npassword_hash = "plain-text"\n'
    )
    result = hedwigpy("config", "check", "-c", str(bad))
    assert result.returncode == 1
    errors = result.stderr
    for path in ("server.bogus", "limits.max_recipients", "listeners[0].role"):
        assert f"{bad}: {path}" in errors, errors
    good = tmp_path / "good.toml"
    good.write_text('[[users]]\nname = "u"\npassword_hash = "plain-text"\n')
    result = hedwigpy("config", "check", "-c", str(good))
    assert result.returncode == 1
    assert "users[0].password_hash: not a hash from `hedwigpy passwd`" in result.stderr


def test_config_check_accepts_the_example() -> None:
    result = hedwigpy("config", "check", "-c", str(Path(__file__).resolve().parents[2] / "hedwig.toml"))
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().endswith(": ok")


def test_log_level_override(tmp_path: Path, config: dict[str, Any], daemon_factory: type[Daemon]) -> None:
    import socket
    import time

    import tomli_w

    config["log"] = {"level": "debug", "format": "json"}
    path = tmp_path / "hedwig.toml"
    path.write_text(tomli_w.dumps(config))
    env = dict(os.environ, HEDWIG_LOG_LEVEL="warning")
    log = tmp_path / "override.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "hedwigpy", "serve", "-c", str(path)], stderr=out, env=env
        )
    try:
        port = int(config["listeners"][0]["addr"].rsplit(":", 1)[1])
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.05)
        else:
            pytest.fail("daemon did not listen")
    finally:
        proc.kill()
        proc.wait()
    assert '"ready"' not in log.read_text()  # an info line, silenced by the override
