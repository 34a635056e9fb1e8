"""The loopback test DNS server itself, queried with dnspython's plain (blocking) query functions."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import dns.exception
import dns.flags
import dns.message
import dns.query
import dns.rcode
import dns.rdatatype
import pytest

from tests.dns_server import DnsServer


@pytest.fixture(scope="module")
def server() -> Iterator[DnsServer]:
    with DnsServer(negative_ttl=42) as srv:
        yield srv


@pytest.fixture
def dns_server(server: DnsServer) -> Iterator[DnsServer]:
    server.clear()
    yield server
    server.clear()


def udp(srv: DnsServer, name: str, rdtype: str, *, payload: int | None = None) -> dns.message.QueryMessage:
    if payload is None:
        query = dns.message.make_query(name, rdtype)
    else:
        query = dns.message.make_query(name, rdtype, use_edns=0, payload=payload)
    reply = dns.query.udp(query, "127.0.0.1", port=srv.port, timeout=2)
    assert isinstance(reply, dns.message.QueryMessage)
    return reply


def tcp(srv: DnsServer, name: str, rdtype: str) -> dns.message.QueryMessage:
    reply = dns.query.tcp(dns.message.make_query(name, rdtype), "127.0.0.1", port=srv.port, timeout=2)
    assert isinstance(reply, dns.message.QueryMessage)
    return reply


def test_address(dns_server: DnsServer) -> None:
    assert dns_server.address == f"127.0.0.1:{dns_server.port}"
    assert dns_server.nameserver == ("127.0.0.1", dns_server.port)


def test_answers_over_udp_and_tcp_case_insensitively(dns_server: DnsServer) -> None:
    dns_server.add_mx("Example.Test", [(10, "mx1.example.test"), (20, "mx2.example.test")], ttl=123)
    for reply in (udp(dns_server, "example.TEST", "MX"), tcp(dns_server, "EXAMPLE.test", "MX")):
        assert reply.rcode() == dns.rcode.NOERROR
        assert reply.flags & dns.flags.AA
        (rrset,) = reply.answer
        assert rrset.ttl == 123
        assert sorted((rd.preference, rd.exchange.to_text().lower()) for rd in rrset) == [
            (10, "mx1.example.test."),
            (20, "mx2.example.test."),
        ]
    assert dns_server.queries("example.test", "MX") == 2
    assert dns_server.queries("EXAMPLE.TEST.", dns.rdatatype.MX, transport="tcp") == 1
    assert dns_server.queries("example.test", "A") == 0


def test_nxdomain_and_nodata_carry_an_soa(dns_server: DnsServer) -> None:
    dns_server.add_a("host.example.test", "192.0.2.1")
    nx = udp(dns_server, "missing.example.test", "A")
    nodata = udp(dns_server, "host.example.test", "AAAA")
    assert nx.rcode() == dns.rcode.NXDOMAIN
    assert nodata.rcode() == dns.rcode.NOERROR
    for reply in (nx, nodata):
        assert not reply.answer
        (soa,) = reply.authority
        assert soa.rdtype == dns.rdatatype.SOA
        assert soa.name.to_text() == "test."
        assert soa[0].minimum == 42
        assert reply.resolve_chaining().minimum_ttl == 42


def test_record_types(dns_server: DnsServer) -> None:
    dns_server.add_a("h.test", "192.0.2.1")
    dns_server.add_a("h.test", "192.0.2.2")
    dns_server.add_a("h.test", "192.0.2.2")  # duplicates are ignored
    dns_server.add_aaaa("h.test", "2001:db8::1")
    dns_server.add_txt("h.test", "v=DKIM1; k=ed25519; p=" + "A" * 300)
    dns_server.add_null_mx("h.test")
    assert sorted(rd.address for rd in tcp(dns_server, "h.test", "A").answer[0]) == ["192.0.2.1", "192.0.2.2"]
    assert [rd.address for rd in tcp(dns_server, "h.test", "AAAA").answer[0]] == ["2001:db8::1"]
    (txt,) = tcp(dns_server, "h.test", "TXT").answer[0]
    assert [len(s) for s in txt.strings] == [255, 67]
    assert b"".join(txt.strings).startswith(b"v=DKIM1;")
    ((mx),) = tcp(dns_server, "h.test", "MX").answer[0]
    assert (mx.preference, mx.exchange.to_text()) == (0, ".")


def test_record_in_zone_file_syntax(dns_server: DnsServer) -> None:
    dns_server.add_record("s._domainkey.h.test", "TXT", '"v=DKIM1; k=rsa; " "p=AAAA"')
    (txt,) = tcp(dns_server, "s._domainkey.h.test", "TXT").answer[0]
    assert txt.strings == (b"v=DKIM1; k=rsa; ", b"p=AAAA")


def test_idna_names(dns_server: DnsServer) -> None:
    dns_server.add_a("bücher.test", "192.0.2.1")
    assert udp(dns_server, "xn--bcher-kva.test", "A").answer
    assert dns_server.queries("Bücher.test", "A") == 1


def test_cname_chain(dns_server: DnsServer) -> None:
    dns_server.add_cname("alias.test", "middle.test")
    dns_server.add_cname("middle.test", "real.test")
    dns_server.add_a("real.test", "192.0.2.3")
    reply = udp(dns_server, "alias.test", "A")
    assert [r.rdtype for r in reply.answer] == [dns.rdatatype.CNAME, dns.rdatatype.CNAME, dns.rdatatype.A]
    assert reply.resolve_chaining().canonical_name.to_text() == "real.test."
    assert udp(dns_server, "alias.test", "CNAME").answer[0][0].target.to_text() == "middle.test."
    dns_server.add_cname("dangling.test", "nothing.test")
    assert udp(dns_server, "dangling.test", "A").rcode() == dns.rcode.NXDOMAIN


def test_truncation_and_tcp(dns_server: DnsServer) -> None:
    dns_server.add_mx("big.test", [(i, f"mx{i:02d}.a-long-exchanger-name.big.test") for i in range(40)])
    small = udp(dns_server, "big.test", "MX")
    assert small.flags & dns.flags.TC
    assert not small.answer
    edns = udp(dns_server, "big.test", "MX", payload=4096)
    assert not edns.flags & dns.flags.TC
    assert len(edns.answer[0]) == 40
    full = tcp(dns_server, "big.test", "MX")
    assert not full.flags & dns.flags.TC
    assert len(full.answer[0]) == 40
    assert dns_server.queries("big.test", "MX", transport="udp") == 2


def test_tcp_pipelined_queries_on_one_connection(dns_server: DnsServer) -> None:
    dns_server.add_a("one.test", "192.0.2.1")
    dns_server.add_a("two.test", "192.0.2.2")
    queries = [dns.message.make_query(n, "A") for n in ("one.test", "two.test")]
    with socket.create_connection(dns_server.nameserver, timeout=2) as sock:
        sock.sendall(b"".join(q.to_wire(prepend_length=True) for q in queries))
        stream = b""
        replies: list[dns.message.Message] = []
        while len(replies) < 2:
            chunk = sock.recv(4096)
            assert chunk
            stream += chunk
            while len(stream) >= 2 and len(stream) >= 2 + int.from_bytes(stream[:2], "big"):
                size = int.from_bytes(stream[:2], "big")
                replies.append(dns.message.from_wire(stream[2 : 2 + size]))
                stream = stream[2 + size :]
    first, second = replies
    assert first.id == queries[0].id and second.id == queries[1].id
    assert second.answer[0][0].address == "192.0.2.2"


def test_servfail_drop_restore(dns_server: DnsServer) -> None:
    dns_server.add_a("h.test", "192.0.2.1")
    dns_server.servfail("h.test")
    assert udp(dns_server, "h.test", "A").rcode() == dns.rcode.SERVFAIL
    dns_server.restore("h.test")
    dns_server.drop("h.test")
    query = dns.message.make_query("h.test", "A")
    with pytest.raises(dns.exception.Timeout):
        dns.query.udp(query, "127.0.0.1", port=dns_server.port, timeout=0.3)
    dns_server.restore("h.test")
    assert udp(dns_server, "h.test", "A").answer
    assert dns_server.queries("h.test", "A") == 3


def test_remove_and_clear(dns_server: DnsServer) -> None:
    dns_server.add_a("h.test", "192.0.2.1")
    dns_server.add_txt("h.test", "x")
    dns_server.remove("h.test", "A")
    assert udp(dns_server, "h.test", "A").rcode() == dns.rcode.NOERROR
    dns_server.remove("h.test")
    assert udp(dns_server, "h.test", "TXT").rcode() == dns.rcode.NXDOMAIN
    dns_server.clear()
    assert dns_server.queries("h.test", "A") == 0


def test_garbage_gets_formerr(dns_server: DnsServer) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(2)
        sock.sendto(b"\x12\x34garbage", dns_server.nameserver)
        reply = sock.recv(512)
    assert reply[:2] == b"\x12\x34"
    assert reply[3] & 0x0F == dns.rcode.FORMERR
    assert udp(dns_server, "still.alive.test", "A").rcode() == dns.rcode.NXDOMAIN


def test_restart_gets_a_port_and_stops_cleanly() -> None:
    srv = DnsServer()
    with pytest.raises(RuntimeError):
        _ = srv.port
    with srv:
        port = srv.port
        srv.add_a("h.test", "192.0.2.1")
        assert tcp(srv, "h.test", "A").answer
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe, pytest.raises(OSError):
        probe.settimeout(1)
        probe.connect(("127.0.0.1", port))
