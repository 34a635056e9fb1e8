"""The PROXY protocol (HAProxy's proxy-protocol.txt, versions 1 and 2), sans-IO: bytes in, a parsed
header out. A TCP load balancer sends it first on each connection so that we see the real client.

`parse(data)` returns None while `data` could still become a valid header, the header and the bytes
after it once it is complete, and raises `ProxyError` as soon as `data` cannot begin a valid header:
the spec asks the receiver to abort at once on anything that does not match exactly (section 2.1), and
never to guess whether a header is present (section 2). Memory is bounded: a v1 line ends within 107
bytes, a v2 header is refused when it announces more than `MAX_V2_LENGTH` bytes.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

V1_PREFIX = b"PROXY "
V1_MAX_LENGTH = 107  # "PROXY UNKNOWN <ipv6> <ipv6> 65535 65535\r\n", the spec's worst case
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
V2_FIXED = 16  # signature, version/command, family/transport, length
# The spec allows 16 + 65535 bytes, mostly TLVs we skip. HAProxy, AWS NLB and GCP send at most a few
# hundred bytes of TLVs; 4 KiB keeps a connection's buffer small while accepting all of them.
MAX_V2_LENGTH = 4096 - V2_FIXED

_V2_LOCAL, _V2_PROXY = 0x0, 0x1
_V2_UNSPEC = 0x00
_V2_FAMILIES = {0x11: (4, 12), 0x21: (16, 36)}  # TCP over IPv4 / IPv6: address size, block size
_PORT = re.compile(r"0|[1-9][0-9]{0,4}")  # decimal without leading zeroes (spec 2.1)
_IPV6_CHARS = frozenset("0123456789abcdefABCDEF:.")


class ProxyError(ValueError):
    """The bytes are not a valid PROXY protocol header: the connection must be closed."""


@dataclass(frozen=True)
class ProxyHeader:
    """A complete header. `source` and `destination` are None for v1 UNKNOWN, v2 LOCAL and v2 UNSPEC:
    then the connection's real endpoints apply (a balancer's health check, or no address to tell)."""

    version: int
    source: tuple[IPAddress, int] | None
    destination: tuple[IPAddress, int] | None


def parse(data: bytes | bytearray) -> tuple[ProxyHeader, bytes] | None:
    """The header at the start of `data` and the bytes that follow it, or None when more are needed."""
    data = bytes(data)
    if data.startswith(V2_SIGNATURE):
        return _parse_v2(data)
    if data.startswith(V1_PREFIX):
        return _parse_v1(data)
    if V2_SIGNATURE.startswith(data[: len(V2_SIGNATURE)]) or V1_PREFIX.startswith(data[: len(V1_PREFIX)]):
        return None
    raise ProxyError("not a PROXY protocol header")


def _parse_v1(data: bytes) -> tuple[ProxyHeader, bytes] | None:
    end = data.find(b"\n", 0, V1_MAX_LENGTH)
    if end < 0:
        if len(data) >= V1_MAX_LENGTH:
            raise ProxyError(f"PROXY v1 line longer than {V1_MAX_LENGTH} bytes")
        return None
    if data[end - 1 : end] != b"\r":
        raise ProxyError("PROXY v1 line not ended by CRLF")
    line, rest = data[: end - 1], data[end + 1 :]
    try:
        text = line.decode("ascii")
    except UnicodeDecodeError:
        raise ProxyError("PROXY v1 line is not ASCII") from None
    fields = text.split(" ")
    if fields[1] == "UNKNOWN":  # the rest of the line must be ignored (spec 2.1)
        return ProxyHeader(1, None, None), rest
    if len(fields) != 6:
        raise ProxyError("PROXY v1 line does not have 6 single-space separated fields")
    family, src, dst, sport, dport = fields[1:]
    if family == "TCP4":
        source = _v1_address(src, 4), _v1_port(sport)
        destination = _v1_address(dst, 4), _v1_port(dport)
    elif family == "TCP6":
        source = _v1_address(src, 6), _v1_port(sport)
        destination = _v1_address(dst, 6), _v1_port(dport)
    else:
        raise ProxyError(f"PROXY v1 protocol {family[:8]!r} is not TCP4, TCP6 or UNKNOWN")
    return ProxyHeader(1, source, destination), rest


def _v1_address(text: str, version: int) -> IPAddress:
    # ipaddress alone is too lenient for v6: it accepts a "%scope" suffix, which is no address.
    if version == 6 and not (text and _IPV6_CHARS.issuperset(text)):
        raise ProxyError("PROXY v1 address is not an IPv6 address")
    try:
        # IPv4Address refuses leading zeroes, as the spec does (they could be read as octal).
        return ipaddress.IPv4Address(text) if version == 4 else ipaddress.IPv6Address(text)
    except ValueError:
        raise ProxyError(f"PROXY v1 address is not an IPv{version} address") from None


def _v1_port(text: str) -> int:
    if not _PORT.fullmatch(text) or int(text) > 65535:
        raise ProxyError("PROXY v1 port is not a decimal number in 0..65535")
    return int(text)


def _parse_v2(data: bytes) -> tuple[ProxyHeader, bytes] | None:
    if len(data) < V2_FIXED:
        return None
    version, command = data[12] >> 4, data[12] & 0x0F
    if version != 2:
        raise ProxyError(f"PROXY v2 header with version {version}")
    if command not in (_V2_LOCAL, _V2_PROXY):
        raise ProxyError(f"PROXY v2 header with unknown command {command}")
    family = data[13]
    length = int.from_bytes(data[14:16], "big")
    if length > MAX_V2_LENGTH:
        raise ProxyError(f"PROXY v2 header longer than {V2_FIXED + MAX_V2_LENGTH} bytes")
    if command == _V2_PROXY and family != _V2_UNSPEC and family not in _V2_FAMILIES:
        # UDP and AF_UNIX make no sense for an SMTP session; refuse them as Postfix does.
        raise ProxyError(f"PROXY v2 address family/transport {family:#04x} is not TCP over IPv4 or IPv6")
    if len(data) < V2_FIXED + length:
        return None
    block, rest = data[V2_FIXED : V2_FIXED + length], data[V2_FIXED + length :]
    if command == _V2_LOCAL or family == _V2_UNSPEC:  # the spec: use the real endpoints, skip the block
        return ProxyHeader(2, None, None), rest
    size, needed = _V2_FAMILIES[family]
    if length < needed:
        raise ProxyError(f"PROXY v2 address block of {length} bytes, {needed} needed")
    cls = ipaddress.IPv4Address if size == 4 else ipaddress.IPv6Address
    source_ip, destination_ip = cls(block[:size]), cls(block[size : 2 * size])
    ports = block[2 * size : needed]
    source_port, destination_port = int.from_bytes(ports[:2], "big"), int.from_bytes(ports[2:], "big")
    # Whatever follows the addresses within `length` is TLVs (ALPN, unique id, SSL...): skipped.
    return ProxyHeader(2, (source_ip, source_port), (destination_ip, destination_port)), rest
