"""PROXY protocol headers as a load balancer writes them, built here with `struct` and f-strings from the
spec (independently of `hedwigpy.net.proxy_protocol`), for the parser's tests and the wire tests."""

from __future__ import annotations

import ipaddress
import struct

SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"


def v1(source: str, source_port: int, destination: str, destination_port: int) -> bytes:
    family = "TCP6" if ":" in source else "TCP4"
    return f"PROXY {family} {source} {destination} {source_port} {destination_port}\r\n".encode()


def v2(
    source: str,
    source_port: int,
    destination: str,
    destination_port: int,
    *,
    tlvs: bytes = b"",
    command: int = 0x1,
    family: int | None = None,
) -> bytes:
    src, dst = ipaddress.ip_address(source), ipaddress.ip_address(destination)
    if family is None:
        family = 0x11 if src.version == 4 else 0x21
    block = src.packed + dst.packed + struct.pack("!HH", source_port, destination_port) + tlvs
    return SIGNATURE + bytes([0x20 | command, family]) + struct.pack("!H", len(block)) + block


def v2_local() -> bytes:
    """What HAProxy sends on its health checks: LOCAL, no addresses."""
    return SIGNATURE + b"\x20\x00\x00\x00"


def tlv(kind: int, value: bytes) -> bytes:
    return struct.pack("!BH", kind, len(value)) + value
