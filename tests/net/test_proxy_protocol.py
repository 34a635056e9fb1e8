"""The sans-IO PROXY protocol parser: the spec's examples, every refusal, byte-at-a-time feeding, and
properties (arbitrary bytes never crash it; generated headers round-trip with the bytes after them)."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given
from hypothesis import strategies as st

from hedwigpy.net.proxy_protocol import ProxyError, ProxyHeader, parse
from tests import proxy_headers as ph


def ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    return ipaddress.ip_address(text)


def complete(data: bytes) -> tuple[ProxyHeader, bytes]:
    result = parse(data)
    assert result is not None
    return result


def test_v1_tcp4_and_the_bytes_after_it() -> None:
    header, rest = complete(b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 25\r\nEHLO x\r\n")
    assert header == ProxyHeader(1, (ip("192.168.0.1"), 56324), (ip("192.168.0.11"), 25))
    assert rest == b"EHLO x\r\n"


def test_v1_tcp6_longest_line() -> None:
    six = "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff"
    line = f"PROXY TCP6 {six} {six} 65535 65535\r\n".encode()
    assert len(line) == 104
    header, rest = complete(line)
    assert header.source == (ip(six), 65535) and rest == b""


def test_v1_unknown_ignores_the_rest_of_its_line() -> None:
    assert complete(b"PROXY UNKNOWN\r\n") == (ProxyHeader(1, None, None), b"")
    six = "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff"
    worst = f"PROXY UNKNOWN {six} {six} 65535 65535\r\n".encode()
    assert len(worst) == 107
    assert complete(worst + b"x") == (ProxyHeader(1, None, None), b"x")


@pytest.mark.parametrize(
    "data",
    [
        b"EHLO client.example\r\n",
        b"PROXY\r\n",
        b"PROXYTCP4 1.2.3.4 5.6.7.8 1 2\r\n",
        b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n",  # bare LF
        b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r\r\n",
        b"PROXY TCP4  1.2.3.4 5.6.7.8 1 2\r\n",  # two spaces
        b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 3\r\n",
        b"PROXY TCP4 1.2.3.4 5.6.7.8 1\r\n",
        b"PROXY TCP4 01.2.3.4 5.6.7.8 1 2\r\n",  # leading zero: octal?
        b"PROXY TCP4 1.2.3.256 5.6.7.8 1 2\r\n",
        b"PROXY TCP4 ::1 ::1 1 2\r\n",  # family mismatch
        b"PROXY TCP6 1.2.3.4 5.6.7.8 1 2\r\n",
        b"PROXY TCP6 fe80::1%eth0 ::1 1 2\r\n",
        b"PROXY TCP4 1.2.3.4 5.6.7.8 65536 2\r\n",
        b"PROXY TCP4 1.2.3.4 5.6.7.8 025 2\r\n",
        b"PROXY TCP4 1.2.3.4 5.6.7.8 -1 2\r\n",
        b"PROXY TCP4 1.2.3.4 5.6.7.8 +1 2\r\n",
        b"PROXY UDP4 1.2.3.4 5.6.7.8 1 2\r\n",
        b"PROXY TCP4 1.2.3.\xc3\xa9 5.6.7.8 1 2\r\n",
        b"PROXY TCP4 " + b"1" * 120,  # no CRLF within 107 bytes
        b"PROXY UNKNOWN " + b"x" * 93 + b"\r\n",  # 108 bytes
    ],
)
def test_v1_refusals(data: bytes) -> None:
    with pytest.raises(ProxyError):
        parse(data)


def test_v2_tcp4_tcp6_and_tlvs() -> None:
    data = ph.v2("203.0.113.7", 40000, "198.51.100.1", 25) + b"EHLO"
    assert complete(data) == (ProxyHeader(2, (ip("203.0.113.7"), 40000), (ip("198.51.100.1"), 25)), b"EHLO")
    tlvs = ph.tlv(0x01, b"smtp") + ph.tlv(0x05, b"unique-id-123")
    header, rest = complete(ph.v2("2001:db8::7", 1, "2001:db8::1", 587, tlvs=tlvs) + b"\x16\x03\x01")
    assert header.source == (ip("2001:db8::7"), 1) and header.destination == (ip("2001:db8::1"), 587)
    assert rest == b"\x16\x03\x01"  # a TLS ClientHello after the header stays intact


def test_v2_local_and_unspec_keep_the_real_peer() -> None:
    assert complete(ph.v2_local() + b"rest") == (ProxyHeader(2, None, None), b"rest")
    # LOCAL with an address block: its length is honoured, the addresses (and family) ignored.
    local = ph.v2("1.2.3.4", 1, "5.6.7.8", 2, command=0x0, family=0x77)
    assert complete(local) == (ProxyHeader(2, None, None), b"")
    unspec = ph.v2("1.2.3.4", 1, "5.6.7.8", 2, family=0x00)
    assert complete(unspec) == (ProxyHeader(2, None, None), b"")


@pytest.mark.parametrize(
    "data",
    [
        ph.SIGNATURE + b"\x11\x11\x00\x0c" + bytes(12),  # version 1 in a v2 header
        ph.SIGNATURE + b"\x22\x11\x00\x0c" + bytes(12),  # command 2
        ph.v2("1.2.3.4", 1, "5.6.7.8", 2, family=0x12),  # UDP
        ph.v2("1.2.3.4", 1, "5.6.7.8", 2, family=0x31),  # AF_UNIX
        ph.v2("1.2.3.4", 1, "5.6.7.8", 2, family=0x41),  # no such family
        ph.v2("1.2.3.4", 1, "5.6.7.8", 2, family=0x21),  # says IPv6, carries 12 bytes
        ph.SIGNATURE + b"\x21\x11\x00\x08" + bytes(8),  # block shorter than two IPv4 addresses
        ph.SIGNATURE + b"\x21\x11\xff\xff",  # 64 KiB announced: over the bound, refused at once
        ph.SIGNATURE[:11] + b"X",
    ],
)
def test_v2_refusals(data: bytes) -> None:
    with pytest.raises(ProxyError):
        parse(data)


@pytest.mark.parametrize(
    "header",
    [
        ph.v1("192.0.2.1", 1234, "192.0.2.2", 25),
        ph.v1("2001:db8::1", 1234, "2001:db8::2", 25),
        ph.v2("192.0.2.1", 1234, "192.0.2.2", 25, tlvs=ph.tlv(0x04, b"")),
        ph.v2_local(),
    ],
)
def test_every_proper_prefix_needs_more(header: bytes) -> None:
    for n in range(len(header)):
        assert parse(header[:n]) is None, n
    assert complete(header)[1] == b""


ports = st.integers(0, 65535)
v4 = st.ip_addresses(v=4).map(str)
v6 = st.ip_addresses(v=6).map(str)


@given(
    st.one_of(st.tuples(v4, ports, v4, ports), st.tuples(v6, ports, v6, ports)),
    st.sampled_from(["v1", "v2"]),
    st.binary(max_size=64),
    st.lists(st.tuples(st.integers(0, 255), st.binary(max_size=40)), max_size=4),
)
def test_generated_headers_round_trip(
    addrs: tuple[str, int, str, int], version: str, after: bytes, tlvs: list[tuple[int, bytes]]
) -> None:
    src, sport, dst, dport = addrs
    if version == "v1":
        data = ph.v1(src, sport, dst, dport)
    else:
        data = ph.v2(src, sport, dst, dport, tlvs=b"".join(ph.tlv(k, v) for k, v in tlvs))
    header, rest = complete(data + after)
    assert header.version == (1 if version == "v1" else 2)
    assert header.source == (ip(src), sport) and header.destination == (ip(dst), dport)
    assert rest == after


@given(st.binary(max_size=300))
def test_arbitrary_bytes_never_crash(data: bytes) -> None:
    try:
        result = parse(data)
    except ProxyError:
        return
    if result is not None:
        _, rest = result
        assert data.endswith(rest) and len(rest) < len(data)


@given(st.binary(max_size=120))
def test_arbitrary_bytes_after_a_signature_never_crash(tail: bytes) -> None:
    for start in (ph.SIGNATURE, b"PROXY ", b"PROXY TCP4 ", b"PROXY TCP6 ", ph.SIGNATURE + b"\x21\x11"):
        try:
            parse(start + tail)
        except ProxyError:
            pass
