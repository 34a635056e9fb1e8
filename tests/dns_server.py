"""A loopback DNS server for tests, speaking the real DNS wire format (dnspython).

It runs in a background thread, so it serves trio tests in the same process as well as the daemon run as a
subprocess (point `[dns].nameservers` at `server.address`). UDP and TCP listen on the same port of
127.0.0.1; a UDP answer larger than 512 bytes (or the client's EDNS payload size) is truncated with TC set,
so clients fall back to TCP (2-byte length prefix).

    with DnsServer() as dns:
        dns.add_mx("example.test", [(10, "mx1.example.test"), (20, "mx2.example.test")])
        dns.add_a("mx1.example.test", "127.0.0.1")
        ...
        assert dns.queries("example.test", "MX") == 1

The zone is a flat set of names: a name with no records → NXDOMAIN; a name with records but none of the
asked type → NOERROR/NODATA with an SOA (minimum = `negative_ttl`) in the authority section, so negative
answers have a TTL. Names are case-insensitive and may be given in UTF-8 (they are IDNA-encoded).
"""

from __future__ import annotations

import contextlib
import selectors
import socket
import threading
from collections import Counter
from collections.abc import Iterable
from types import TracebackType
from typing import Literal

import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.opcode
import dns.rcode
import dns.rdata
import dns.rdataclass
import dns.rdatatype
import dns.rdtypes.ANY.CNAME
import dns.rdtypes.ANY.TXT
import dns.rrset

__all__ = ["DnsServer"]

HOST = "127.0.0.1"
_UDP_DEFAULT_SIZE = 512
_MAX_CNAME_CHAIN = 8
_TCP_IO_TIMEOUT = 5.0
_IDNA = dns.name.IDNA_2008_Practical if dns.name.have_idna_2008 else dns.name.IDNA_2003

Transport = Literal["udp", "tcp"]
_RRsetData = tuple[int, list[dns.rdata.Rdata]]  # (ttl, rdatas)


def _name(text: str | dns.name.Name) -> dns.name.Name:
    name = text if isinstance(text, dns.name.Name) else dns.name.from_text(text, idna_codec=_IDNA)
    return name.canonicalize()


def _rd(rdtype: dns.rdatatype.RdataType, text: str) -> dns.rdata.Rdata:
    return dns.rdata.from_text(dns.rdataclass.IN, rdtype, text)


def _key(name: dns.name.Name) -> str:
    return name.to_text(omit_final_dot=True).lower() if name != dns.name.root else "."


def _rdtype(rdtype: str | int) -> dns.rdatatype.RdataType:
    if isinstance(rdtype, str):
        return dns.rdatatype.from_text(rdtype)
    return dns.rdatatype.RdataType.make(rdtype)


class DnsServer:
    """Authoritative-for-everything DNS server on 127.0.0.1 (UDP + TCP, one random free port)."""

    def __init__(self, *, negative_ttl: int = 60) -> None:
        self.negative_ttl = negative_ttl
        self._lock = threading.Lock()
        self._zone: dict[dns.name.Name, dict[dns.rdatatype.RdataType, _RRsetData]] = {}
        self._servfail: set[dns.name.Name] = set()
        self._drop: set[dns.name.Name] = set()
        self._counts: Counter[tuple[str, int, Transport]] = Counter()
        self._udp: socket.socket | None = None
        self._tcp: socket.socket | None = None
        self._wake_r: socket.socket | None = None
        self._wake_w: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self._port = 0

    # ---- lifecycle -------------------------------------------------------------------------------------

    @property
    def port(self) -> int:
        if not self._port:
            raise RuntimeError("DnsServer is not started")
        return self._port

    @property
    def address(self) -> str:
        """ "127.0.0.1:PORT", the form `[dns].nameservers` takes."""
        return f"{HOST}:{self.port}"

    @property
    def nameserver(self) -> tuple[str, int]:
        """("127.0.0.1", PORT), the form `MxResolver(nameservers=...)` takes."""
        return (HOST, self.port)

    def start(self) -> DnsServer:
        if self._thread is not None:
            raise RuntimeError("DnsServer already started")
        self._udp, self._tcp = self._bind()
        self._port = self._udp.getsockname()[1]
        self._wake_r, self._wake_w = socket.socketpair()
        self._stopping.clear()
        self._thread = threading.Thread(target=self._serve, name=f"dns-server-{self._port}", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        thread = self._thread
        if thread is None:
            return
        self._stopping.set()
        assert self._wake_w is not None
        with contextlib.suppress(OSError):
            self._wake_w.send(b"x")
        thread.join(timeout=10)
        self._thread = None
        for sock in (self._udp, self._tcp, self._wake_r, self._wake_w):
            if sock is not None:
                sock.close()
        self._udp = self._tcp = self._wake_r = self._wake_w = None

    def __enter__(self) -> DnsServer:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    @staticmethod
    def _bind() -> tuple[socket.socket, socket.socket]:
        """A UDP and a TCP socket on the same free port (retrying if the TCP side is taken)."""
        last: OSError | None = None
        for _ in range(50):
            udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            udp.bind((HOST, 0))
            port = udp.getsockname()[1]
            tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            try:
                tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                tcp.bind((HOST, port))
                tcp.listen(64)
            except OSError as exc:
                last = exc
                udp.close()
                tcp.close()
                continue
            udp.setblocking(False)
            tcp.setblocking(False)
            return udp, tcp
        raise RuntimeError(f"no free port with both UDP and TCP available: {last}")

    # ---- zone API --------------------------------------------------------------------------------------

    def add_mx(self, domain: str, mxs: Iterable[tuple[int, str]], ttl: int = 300) -> None:
        rdatas = [_rd(dns.rdatatype.MX, f"{int(pref)} {_name(host).to_text()}") for pref, host in mxs]
        self._add(domain, dns.rdatatype.MX, rdatas, ttl)

    def add_null_mx(self, domain: str, ttl: int = 300) -> None:
        """RFC 7505: the single record `MX 0 .` (replaces any MX records of `domain`)."""
        with self._lock:
            self._zone.get(_name(domain), {}).pop(dns.rdatatype.MX, None)
        self.add_mx(domain, [(0, ".")], ttl)

    def add_a(self, name: str, ip: str, ttl: int = 300) -> None:
        self._add(name, dns.rdatatype.A, [_rd(dns.rdatatype.A, ip)], ttl)

    def add_aaaa(self, name: str, ip: str, ttl: int = 300) -> None:
        self._add(name, dns.rdatatype.AAAA, [_rd(dns.rdatatype.AAAA, ip)], ttl)

    def add_txt(self, name: str, text: str | bytes, ttl: int = 300) -> None:
        """One TXT record; text longer than 255 bytes is split into several character-strings."""
        raw = text.encode() if isinstance(text, str) else text
        chunks = [raw[i : i + 255] for i in range(0, len(raw), 255)] or [b""]
        rdata = dns.rdtypes.ANY.TXT.TXT(dns.rdataclass.IN, dns.rdatatype.TXT, chunks)
        self._add(name, dns.rdatatype.TXT, [rdata], ttl)

    def add_record(self, name: str, rdtype: str, rdata: str, ttl: int = 300) -> None:
        """A record given as in a zone file (`add_record(n, "TXT", '"part one" "part two"')`), parsed by
        dnspython's zone-file reader."""
        code = _rdtype(rdtype)
        self._add(name, code, [_rd(code, rdata)], ttl)

    def add_cname(self, name: str, target: str, ttl: int = 300) -> None:
        """`name` is an alias of `target`; the server follows the chain inside its zone."""
        with self._lock:
            self._zone.setdefault(_name(name), {})[dns.rdatatype.CNAME] = (
                ttl,
                [_rd(dns.rdatatype.CNAME, _name(target).to_text())],
            )

    def servfail(self, name: str) -> None:
        """Every query for `name` (any type) gets SERVFAIL."""
        with self._lock:
            self._servfail.add(_name(name))

    def drop(self, name: str) -> None:
        """Queries for `name` (any type) are never answered, so the client times out."""
        with self._lock:
            self._drop.add(_name(name))

    def restore(self, name: str) -> None:
        """Undo `servfail`/`drop` for `name`: answer from the zone again."""
        with self._lock:
            self._servfail.discard(_name(name))
            self._drop.discard(_name(name))

    def remove(self, name: str, rdtype: str | int | None = None) -> None:
        """Delete the records of one type of `name`, or the whole name (→ NXDOMAIN)."""
        with self._lock:
            if rdtype is None:
                self._zone.pop(_name(name), None)
            else:
                self._zone.get(_name(name), {}).pop(_rdtype(rdtype), None)

    def clear(self) -> None:
        """Forget every record, failure mode and query count."""
        with self._lock:
            self._zone.clear()
            self._servfail.clear()
            self._drop.clear()
            self._counts.clear()

    def queries(self, name: str, rdtype: str | int, *, transport: Transport | None = None) -> int:
        """How many queries for (`name`, `rdtype`) arrived (over `transport`, or both)."""
        key = _key(_name(name))
        code = int(_rdtype(rdtype))
        with self._lock:
            if transport is not None:
                return self._counts[(key, code, transport)]
            return self._counts[(key, code, "udp")] + self._counts[(key, code, "tcp")]

    def _add(
        self, name: str, rdtype: dns.rdatatype.RdataType, rdatas: list[dns.rdata.Rdata], ttl: int
    ) -> None:
        with self._lock:
            node = self._zone.setdefault(_name(name), {})
            _, existing = node.get(rdtype, (ttl, []))
            node[rdtype] = (ttl, existing + [r for r in rdatas if r not in existing])

    # ---- answering -------------------------------------------------------------------------------------

    def _answer(self, wire: bytes, transport: Transport) -> bytes | None:
        """The reply to one query in wire form, or None to stay silent."""
        try:
            query = dns.message.from_wire(wire)
        except dns.exception.DNSException:
            return _formerr(wire)
        response = dns.message.make_response(query)
        response.flags |= dns.flags.AA | dns.flags.RA
        if query.opcode() != dns.opcode.QUERY:
            response.set_rcode(dns.rcode.NOTIMP)
            return self._render(query, response, transport)
        if len(query.question) != 1:
            response.set_rcode(dns.rcode.FORMERR)
            return self._render(query, response, transport)
        question = query.question[0]
        qname = question.name.canonicalize()
        qtype = question.rdtype
        with self._lock:
            self._counts[(_key(qname), int(qtype), transport)] += 1
            if qname in self._drop:
                return None
            if qname in self._servfail:
                response.set_rcode(dns.rcode.SERVFAIL)
            elif question.rdclass != dns.rdataclass.IN:
                response.set_rcode(dns.rcode.REFUSED)
            else:
                self._fill(response, qname, qtype)
        return self._render(query, response, transport)

    def _fill(
        self, response: dns.message.Message, qname: dns.name.Name, qtype: dns.rdatatype.RdataType
    ) -> None:
        name = qname
        for _ in range(_MAX_CNAME_CHAIN):
            node = self._zone.get(name)
            if node is None:
                response.set_rcode(dns.rcode.NXDOMAIN)
                break
            if qtype in node:
                response.answer.append(_rrset(name, qtype, node[qtype]))
                return
            cname = node.get(dns.rdatatype.CNAME)
            if cname is None or qtype == dns.rdatatype.CNAME:
                break  # NODATA
            response.answer.append(_rrset(name, dns.rdatatype.CNAME, cname))
            target = cname[1][0]
            assert isinstance(target, dns.rdtypes.ANY.CNAME.CNAME)
            name = target.target.canonicalize()
        response.authority.append(self._soa(name))

    def _soa(self, name: dns.name.Name) -> dns.rrset.RRset:
        """An SOA owned by the top-level label of `name` (an ancestor, as negative caching requires)."""
        apex = dns.name.Name(name.labels[-2:]) if len(name.labels) >= 2 else dns.name.root
        rdata = _rd(
            dns.rdatatype.SOA, f"ns.hedwig.test. hostmaster.hedwig.test. 1 3600 600 86400 {self.negative_ttl}"
        )
        return _rrset(apex, dns.rdatatype.SOA, (self.negative_ttl, [rdata]))

    @staticmethod
    def _render(query: dns.message.Message, response: dns.message.Message, transport: Transport) -> bytes:
        if transport == "udp":
            limit = max(_UDP_DEFAULT_SIZE, query.payload) if query.edns >= 0 else _UDP_DEFAULT_SIZE
        else:
            limit = 65535
        try:
            return response.to_wire(max_size=limit)
        except dns.exception.TooBig:
            # Truncate: drop the records rather than sending a partial RRset; TC tells the client to use TCP.
            response.answer.clear()
            response.authority.clear()
            response.additional.clear()
            response.flags |= dns.flags.TC
            return response.to_wire(max_size=limit)

    # ---- I/O thread ------------------------------------------------------------------------------------

    def _serve(self) -> None:
        assert self._udp is not None and self._tcp is not None and self._wake_r is not None
        sel = selectors.DefaultSelector()
        sel.register(self._udp, selectors.EVENT_READ, "udp")
        sel.register(self._tcp, selectors.EVENT_READ, "listen")
        sel.register(self._wake_r, selectors.EVENT_READ, "wake")
        buffers: dict[socket.socket, bytearray] = {}
        try:
            while not self._stopping.is_set():
                for key, _ in sel.select(timeout=1.0):
                    sock = key.fileobj
                    assert isinstance(sock, socket.socket)
                    if key.data == "wake":
                        continue
                    if key.data == "udp":
                        self._on_udp(sock)
                    elif key.data == "listen":
                        with contextlib.suppress(BlockingIOError, OSError):
                            conn, _addr = sock.accept()
                            conn.settimeout(_TCP_IO_TIMEOUT)
                            buffers[conn] = bytearray()
                            sel.register(conn, selectors.EVENT_READ, "conn")
                    elif not self._on_tcp(sock, buffers[sock]):
                        sel.unregister(sock)
                        del buffers[sock]
                        sock.close()
        finally:
            for conn in buffers:
                conn.close()
            sel.close()

    def _on_udp(self, sock: socket.socket) -> None:
        try:
            wire, peer = sock.recvfrom(65535)
        except (BlockingIOError, OSError):
            return
        reply = self._safe_answer(wire, "udp")
        if reply is not None:
            with contextlib.suppress(OSError):
                sock.sendto(reply, peer)

    def _on_tcp(self, conn: socket.socket, buf: bytearray) -> bool:
        """Read what is there and answer every complete query; False when the connection is done."""
        try:
            data = conn.recv(65537)
        except OSError:
            return False
        if not data:
            return False
        buf += data
        while len(buf) >= 2:
            size = int.from_bytes(buf[:2], "big")
            if len(buf) < 2 + size:
                break
            wire = bytes(buf[2 : 2 + size])
            del buf[: 2 + size]
            reply = self._safe_answer(wire, "tcp")
            if reply is not None:
                try:
                    conn.sendall(len(reply).to_bytes(2, "big") + reply)
                except OSError:
                    return False
        return True

    def _safe_answer(self, wire: bytes, transport: Transport) -> bytes | None:
        try:
            return self._answer(wire, transport)
        except Exception:  # a bug here must not kill the server thread; answer SERVFAIL instead
            return _error_reply(wire, dns.rcode.SERVFAIL)


def _rrset(name: dns.name.Name, rdtype: dns.rdatatype.RdataType, data: _RRsetData) -> dns.rrset.RRset:
    ttl, rdatas = data
    rrset = dns.rrset.RRset(name, dns.rdataclass.IN, rdtype)
    for rdata in rdatas:
        rrset.add(rdata, ttl)
    return rrset


def _error_reply(wire: bytes, rcode: dns.rcode.Rcode) -> bytes | None:
    """A bare header reply (no question) for input we cannot parse."""
    if len(wire) < 2:
        return None
    flags = dns.flags.QR | int(rcode)
    return wire[:2] + flags.to_bytes(2, "big") + bytes(8)


def _formerr(wire: bytes) -> bytes | None:
    return _error_reply(wire, dns.rcode.FORMERR)
