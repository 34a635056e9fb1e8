"""PROXY protocol on the wire: the real daemon behind a "load balancer" played by raw sockets on
127.0.0.1. The address in the header is the client that relay policy, per-IP limits and the Received
header see; a bad or missing header closes the connection before any byte of SMTP."""

from __future__ import annotations

import shutil
import socket
import ssl
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trustme

from tests import proxy_headers as ph

from .daemon import Daemon, free_port, read_message
from .wire import Wire

# 127.0.0.1 for LOCAL/UNKNOWN headers, 127.0.0.2 for clients behind the real HAProxy (127.0.0.3 is not).
TRUSTED = ["127.0.0.1/32", "127.0.0.2/32", "192.0.2.0/24", "2001:db8:1::/48"]
RELAY_DENIED = "554 5.7.1 <rcpt@external.example>: Relay access denied"


def proxied(config: dict[str, Any], **listener: Any) -> dict[str, Any]:
    config["listeners"][0].update(proxy_protocol=True, trusted_networks=TRUSTED, **listener)
    return config


@pytest.fixture
def daemon(tmp_path: Path, config: dict[str, Any], daemon_factory: type[Daemon]) -> Daemon:
    d = daemon_factory(tmp_path, proxied(config))
    d.start()
    return d


def behind(d: Daemon, header: bytes) -> Wire:
    """A connection that first sends `header`, as HAProxy does, then reads the banner."""
    w = Wire(d.port(), greet=False)
    w.send(header)
    w.banner = w.reply()
    return w


def relay_attempt(w: Wire) -> str:
    assert w.cmd("EHLO client.example").startswith("250")
    assert w.cmd("MAIL FROM:<sender@src.example>") == "250 2.1.0 Ok"
    return w.cmd("RCPT TO:<rcpt@external.example>")


def send_message(w: Wire) -> str:
    assert relay_attempt(w) == "250 2.1.5 Ok"
    assert w.cmd("DATA").startswith("354")
    return w.cmd(b"Subject: proxied\r\n\r\nhello\r\n.")


def spooled_trace(d: Daemon) -> tuple[dict[str, Any], bytes]:
    [path] = d.spooled()
    envelope, content = read_message(path)
    return envelope, content.split(b";", 1)[0]


V1_AND_V2 = pytest.mark.parametrize("encode", [ph.v1, ph.v2], ids=["v1", "v2"])


@V1_AND_V2
@pytest.mark.parametrize("source", ["203.0.113.5", "2001:db8:9::5"])
def test_an_untrusted_proxied_client_may_not_relay(daemon: Daemon, encode: Any, source: str) -> None:
    # The TCP peer is 127.0.0.1, which is trusted: only the header's address can deny the relay.
    destination = "2001:db8::25" if ":" in source else "198.51.100.25"
    with behind(daemon, encode(source, 40000, destination, 25)) as w:
        assert w.banner == "220 mx.test.example ESMTP hedwigpy"
        assert relay_attempt(w) == RELAY_DENIED
    assert daemon.spooled() == []


@V1_AND_V2
@pytest.mark.parametrize("source", ["192.0.2.7", "2001:db8:1::7"])
def test_a_trusted_proxied_client_relays_and_is_named_in_received(
    daemon: Daemon, encode: Any, source: str
) -> None:
    destination = "2001:db8::25" if ":" in source else "198.51.100.25"
    with behind(daemon, encode(source, 40000, destination, 25)) as w:
        assert send_message(w).startswith("250 2.0.0 Ok: queued as ")
    envelope, trace = spooled_trace(daemon)
    assert trace.startswith(f"Received: from client.example ([{source}])".encode()), trace
    assert envelope["client_addr"] == (f"[{source}]:40000" if ":" in source else f"{source}:40000")


def test_an_ipv4_mapped_source_is_the_ipv4_client(daemon: Daemon) -> None:
    with behind(daemon, ph.v1("::ffff:203.0.113.5", 1, "::ffff:198.51.100.25", 25)) as w:
        assert relay_attempt(w) == RELAY_DENIED
    with behind(daemon, ph.v2("::ffff:192.0.2.9", 1, "::ffff:198.51.100.25", 25)) as w:
        send_message(w)
    envelope, trace = spooled_trace(daemon)
    assert b"([192.0.2.9])" in trace
    assert envelope["client_addr"] == "192.0.2.9:1"


@pytest.mark.parametrize("header", [ph.v2_local(), b"PROXY UNKNOWN\r\n"], ids=["v2-local", "v1-unknown"])
def test_local_and_unknown_keep_the_real_peer(daemon: Daemon, header: bytes) -> None:
    # A balancer's health check: the connection is the balancer's own, here 127.0.0.1 (trusted).
    with behind(daemon, header) as w:
        assert send_message(w).startswith("250 ")
    _, trace = spooled_trace(daemon)
    assert b"([127.0.0.1])" in trace


def test_bytes_after_the_header_reach_smtp(daemon: Daemon) -> None:
    # Header and the first commands in one segment: nothing read past the header may be lost.
    header = ph.v2("192.0.2.7", 1, "198.51.100.25", 25, tlvs=ph.tlv(0x05, b"id-1"))
    with behind(daemon, header + b"EHLO client.example\r\nNOOP\r\n") as w:
        assert w.banner.startswith("220 ")
        assert w.reply().startswith("250-mx.test.example greets client.example")
        assert w.reply() == "250 2.0.0 Ok"


def assert_closed_silently(d: Daemon, data: bytes, *, then_close: bool = False) -> None:
    """Sends `data`; the daemon must close the connection without sending a single byte."""
    with socket.create_connection(("127.0.0.1", d.port()), timeout=15) as s:
        s.sendall(data)
        if then_close:
            s.shutdown(socket.SHUT_WR)
        received = b""
        try:
            while chunk := s.recv(4096):
                received += chunk
        except ConnectionResetError:
            pass
    assert received == b"", received


@pytest.mark.parametrize(
    "data",
    [
        b"EHLO client.example\r\n",
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(32),  # TLS without the header
        b"GARBAGE\r\n",
        b"PROXY TCP4 203.0.113.5 198.51.100.25 40000 25" + b" " * 80 + b"\r\n",
        b"PROXY TCP4 203.0.113.5 198.51.100.25 40000 25\n",
        b"PROXY TCP4 2001:db8::5 198.51.100.25 40000 25\r\n",
        ph.v2("203.0.113.5", 1, "198.51.100.25", 25, family=0x41),
        ph.v2("203.0.113.5", 1, "198.51.100.25", 25, family=0x12),
        ph.SIGNATURE + b"\x21\x11\xff\xff",
    ],
    ids=[
        "plain-ehlo",
        "tls",
        "garbage",
        "v1-too-long",
        "v1-bare-lf",
        "v1-family",
        "v2-family",
        "v2-udp",
        "v2-long",
    ],
)
def test_a_malformed_or_missing_header_closes_without_a_banner(daemon: Daemon, data: bytes) -> None:
    assert_closed_silently(daemon, data)
    assert daemon.all_spooled()["queued"] == []
    refusals = [e for e in daemon.log_events() if e.get("event") == "proxy header refused"]
    assert refusals and refusals[-1]["peer"].startswith("127.0.0.1:")


@pytest.mark.parametrize(
    "data", [b"PROXY TCP4 203.0.1", ph.v2("192.0.2.7", 1, "198.51.100.25", 25)[:20], b""]
)
def test_a_truncated_header_then_close_is_refused(daemon: Daemon, data: bytes) -> None:
    assert_closed_silently(daemon, data, then_close=True)
    assert "connection closed after" in daemon.log_events()[-1]["error"]


def test_a_header_that_never_comes_times_out(
    tmp_path: Path, config: dict[str, Any], daemon_factory: type[Daemon]
) -> None:
    config["limits"] = {"command_timeout": "1s"}  # the header waits min(command_timeout, 10 s)
    d = daemon_factory(tmp_path, proxied(config))
    d.start()
    with socket.create_connection(("127.0.0.1", d.port()), timeout=8) as s:
        s.sendall(b"PROXY TCP4 ")
        assert s.recv(4096) == b""
    assert "in time" in d.log_events()[-1]["error"]


def test_connections_waiting_for_their_header_are_bounded(
    tmp_path: Path, config: dict[str, Any], daemon_factory: type[Daemon]
) -> None:
    """max_connections holds before the header: silent connections cannot pile up past it (each would
    hold a file descriptor for the header timeout)."""
    config["limits"] = {"max_connections": 2}
    d = daemon_factory(tmp_path, proxied(config))
    d.start()
    silent = [socket.create_connection(("127.0.0.1", d.port()), timeout=8) for _ in range(2)]
    try:
        time.sleep(0.3)  # both accepted and waiting for their header
        with socket.create_connection(("127.0.0.1", d.port()), timeout=8) as third:
            assert third.recv(4096) == b""  # closed at once, long before the 10 s header timeout
        refused = [e for e in d.log_events() if e.get("event") == "connection refused"]
        assert refused and refused[-1]["reason"] == "too many connections"
    finally:
        for s in silent:
            s.close()


def test_per_ip_limits_count_the_proxied_client(
    tmp_path: Path, config: dict[str, Any], daemon_factory: type[Daemon]
) -> None:
    config["limits"] = {"max_connections_per_ip": 1}
    d = daemon_factory(tmp_path, proxied(config))
    d.start()
    # Every connection comes from 127.0.0.1 (the "balancer"); only the proxied sources differ.
    with behind(d, ph.v1("192.0.2.1", 1, "198.51.100.25", 25)) as first:
        assert first.banner.startswith("220 ")
        with behind(d, ph.v2("192.0.2.2", 1, "198.51.100.25", 25)) as other:
            assert other.banner.startswith("220 ")
        with behind(d, ph.v2("192.0.2.1", 2, "198.51.100.25", 25)) as same:
            assert same.banner == (
                "421 4.7.0 mx.test.example Too many connections from your address, try again later"
            )
            assert same.closed()


def test_implicit_tls_after_the_header(
    tmp_path: Path,
    config: dict[str, Any],
    daemon_factory: type[Daemon],
    ca: trustme.CA,
    certfiles: tuple[Path, Path],
) -> None:
    cert, key = certfiles
    d = daemon_factory(tmp_path, proxied(config, tls="implicit", cert=str(cert), key=str(key)))
    d.start()
    context = ssl.create_default_context()
    ca.configure_trust(context)
    w = Wire(d.port(), greet=False)
    w.send(ph.v2("2001:db8:1::7", 1, "2001:db8::25", 465))  # plaintext, before the handshake
    w.starttls(context)
    with w:
        assert w.reply().startswith("220 ")
        assert send_message(w).startswith("250 ")
    _, trace = spooled_trace(d)
    assert trace.startswith(b"Received: from client.example ([2001:db8:1::7])")
    assert b"with ESMTPS" in trace


# ---- behind a real HAProxy (Debian's `haproxy` package; skipped where it is not installed) ---------------


HAPROXY_CONFIG = """\
global
    maxconn 100
defaults
    mode tcp
    timeout connect 5s
    timeout client 30s
    timeout server 30s
frontend smtp_v1
    bind 127.0.0.1:{v1}
    default_backend nodes_v1
backend nodes_v1
    server node1 127.0.0.1:{node} send-proxy
frontend smtp_v2
    bind 127.0.0.1:{v2}
    default_backend nodes_v2
backend nodes_v2
    option smtpchk HELO lb.test.example
    server node1 127.0.0.1:{node} send-proxy-v2 check check-send-proxy inter 200ms fall 2
"""


@pytest.fixture
def haproxy(tmp_path: Path, daemon: Daemon) -> Iterator[dict[str, int]]:
    binary = shutil.which("haproxy")
    if binary is None:
        pytest.skip("haproxy not installed (Debian package haproxy)")
    ports = {"v1": free_port(), "v2": free_port()}
    cfg = tmp_path / "haproxy.cfg"
    cfg.write_text(HAPROXY_CONFIG.format(node=daemon.port(), **ports))
    proc = subprocess.Popen(
        [binary, "-db", "-f", str(cfg)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", ports["v2"]), timeout=1).close()
                break
            except OSError:
                assert proc.poll() is None, proc.communicate()[1]
                assert time.monotonic() < deadline, "haproxy did not start"
                time.sleep(0.05)
        yield ports
    finally:
        proc.terminate()
        proc.wait(10)


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_behind_haproxy_policy_sees_the_client(
    tmp_path: Path, daemon: Daemon, haproxy: dict[str, int], version: str
) -> None:
    # The daemon's TCP peer is always HAProxy on 127.0.0.1; only 127.0.0.2 is trusted to relay.
    time.sleep(1.0)  # several LOCAL health checks (v2) have run: a refused one would mark the node down
    with Wire(haproxy[version], source="127.0.0.3") as w:  # any 127/8 address is local
        assert w.banner == "220 mx.test.example ESMTP hedwigpy"
        assert relay_attempt(w) == RELAY_DENIED
    with Wire(haproxy[version], source="127.0.0.2") as w:
        assert send_message(w).startswith("250 2.0.0 Ok: queued as ")
    _, trace = spooled_trace(daemon)
    assert trace.startswith(b"Received: from client.example ([127.0.0.2])")
    assert not [e for e in daemon.log_events() if e.get("event") == "proxy header refused"]
