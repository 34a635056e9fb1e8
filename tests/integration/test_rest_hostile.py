"""Every REST item of INTERFACE.md's hostile-input list, on the wire with httpx against the real daemon:
the exact status, an `application/problem+json` body naming the fields at fault, nothing left in the
spool and nothing sent to the upstream. One daemon per configuration (open to loopback, with
`[[api_keys]]`, on a nearly full tmpfs spool), shared by the module's tests."""

from __future__ import annotations

import base64
import json
import os
import socket
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from hedwigpy.auth import hash_password

from .daemon import Daemon, base_config
from .outbound import MX1
from .test_hostile_smtp import _mount_tmpfs
from .upstream import UpstreamPool

pytestmark = pytest.mark.timeout(60)

PROBLEM = "application/problem+json"
KEY = "s3cret-api-key"
MIB = 1024 * 1024


@dataclass
class Upstream:
    """The upstream every daemon here relays to, and how many messages the tests meant it to get."""

    pool: UpstreamPool
    expected: int = 0

    def mails(self) -> int:
        return sum(u.count("MAIL") for u in self.pool.upstreams)

    def nothing_new(self) -> None:
        subjects = [t.subject for t in self.pool.transactions]
        assert self.mails() == len(subjects) == self.expected, subjects


@dataclass
class Site:
    """A running daemon, an httpx client for its API and the upstream it relays to."""

    daemon: Daemon
    client: httpx.Client
    upstream: Upstream

    def post(self, body: dict[str, Any], **kwargs: Any) -> httpx.Response:
        return self.client.post("/v1/messages", json=body, **kwargs)

    def refused(self, resp: httpx.Response, status: int, fields: list[str] | None) -> dict[str, Any]:
        """`resp` is a problem document with `status` naming exactly `fields` in its `errors` (None: it
        has no `errors` list), and nothing was kept or delivered."""
        assert resp.status_code == status, resp.text
        assert resp.headers["content-type"].startswith(PROBLEM), resp.headers
        body: dict[str, Any] = resp.json()
        assert body["status"] == status and body["type"] == "about:blank", body
        if fields is None:
            assert "errors" not in body, body
        else:
            assert [e["field"] for e in body["errors"]] == fields, body
            assert all(e["detail"] for e in body["errors"]), body
        self.nothing_kept()
        return body

    def nothing_kept(self) -> None:
        spool = self.daemon.all_spooled()
        assert not any(spool.values()), spool
        self.upstream.nothing_new()

    def delivered(self, resp: httpx.Response, subject: str) -> None:
        """A 200 "delivered" by cut-through: the upstream got it while we waited; nothing kept."""
        assert resp.status_code == 200, resp.text
        assert resp.headers["content-type"].startswith("application/json")
        body = resp.json()
        assert body["status"] == "delivered", body
        assert [(r["address"], r["code"]) for r in body["recipients"]] == [("ann@example.net", 250)]
        self.upstream.expected += 1
        self.nothing_kept()
        assert self.upstream.pool.transactions[-1].subject == subject


@contextmanager
def running(tmp: Path, upstream: Upstream, spool: Path | None = None, **extra: Any) -> Iterator[Site]:
    pool = upstream.pool
    config = base_config(tmp)
    if spool is not None:
        config["server"]["spool_dir"] = str(spool)
    config["delivery"] = {"port": pool.port, "cut_through": True, "connect_timeout": "5s"}
    config["routes"] = [{"transport": "relay", "hosts": [f"{MX1}:{pool.port}"], "tls": "none"}]
    config.update(extra)
    daemon = Daemon(tmp, config)
    try:
        daemon.start()
        with httpx.Client(base_url=f"http://{config['http']['addr']}", timeout=30, trust_env=False) as c:
            yield Site(daemon, c, upstream)
    finally:
        daemon.kill()


@pytest.fixture(scope="module")
def upstream() -> Iterator[Upstream]:
    """An upstream that takes everything; a hostile request must never reach it."""
    pool = UpstreamPool()
    pool.add(MX1, name="mx1.example.net")
    pool.start()
    yield Upstream(pool)
    pool.stop()


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory, upstream: Upstream) -> Iterator[Site]:
    """No `[[api_keys]]`: loopback clients are served without a key."""
    with running(tmp_path_factory.mktemp("rest-open"), upstream) as s:
        yield s


@pytest.fixture(scope="module")
def keyed_site(tmp_path_factory: pytest.TempPathFactory, upstream: Upstream) -> Iterator[Site]:
    keys = [{"name": "billing", "key_hash": hash_password(KEY, ln=10)}]
    with running(tmp_path_factory.mktemp("rest-keyed"), upstream, api_keys=keys) as s:
        yield s


# -- what a good request gets (so the refusals below are about the injected byte alone) -------------------


def structured(**fields: Any) -> dict[str, Any]:
    return {
        "from": "App <app@src.example>",
        "to": ["Ann <ann@example.net>"],
        "subject": "hello",
        "text": "Hi Ann.",
        "headers": {"X-Tag": "t1"},
        "attachments": [{"filename": "a.txt", "content_type": "text/plain", "content": "aGk="}],
    } | fields


def raw(**fields: Any) -> dict[str, Any]:
    message = b"From: app@src.example\r\nTo: ann@example.net\r\nSubject: raw\r\n\r\nHi.\r\n"
    return {
        "envelope_from": "app@src.example",
        "recipients": ["ann@example.net"],
        "raw": base64.b64encode(message).decode(),
    } | fields


@pytest.mark.parametrize(
    ("body", "subject"), [(structured(), "hello"), (raw(), "raw")], ids=["structured", "raw"]
)
def test_clean_request_is_delivered(site: Site, body: dict[str, Any], subject: str) -> None:
    site.nothing_kept()
    site.delivered(site.post(body), subject)


# -- CR, LF and NUL wherever a value becomes a header or an envelope address --------------------------------

BYTES = {"CR": "\r", "LF": "\n", "NUL": "\0"}


def _injected(where: str, c: str) -> tuple[dict[str, Any], list[str]]:
    """A request with `c` injected at `where`, and the fields the answer must name."""
    evil = f"{c}Bcc: victim@evil.example"
    name = f"X-Tag{c}Bcc"
    cases: dict[str, tuple[dict[str, Any], list[str]]] = {
        "subject": (structured(subject=f"hello{evil}"), ["subject"]),
        "to": (structured(to=["Ann <ann@example.net>", f"ann@example.net{evil}"]), ["to[1]"]),
        "cc": (structured(cc=[f"Bob{c} <bob@example.net>"]), ["cc[0]"]),
        "reply_to": (structured(reply_to=f"r@src.example{evil}"), ["reply_to[0]"]),
        "from display name": (structured(**{"from": f"App{evil} <app@src.example>"}), ["from"]),
        "header name": (structured(headers={name: "v"}), [f"headers[{name!r}]"]),
        "header value": (structured(headers={"X-Tag": f"v{evil}"}), ["headers.X-Tag"]),
        "attachment filename": (
            structured(attachments=[{"filename": f"a{c}.txt", "content": "aGk="}]),
            ["attachments[0].filename"],
        ),
        "envelope_from": (
            raw(envelope_from=f"app@src.example{c}RCPT TO:<v@evil.example>"),
            ["envelope_from"],
        ),
        "recipients": (
            raw(recipients=["ann@example.net", f"ann@example.net{c}RCPT TO:<v@evil.example>"]),
            ["recipients[1]"],
        ),
        "envelope display name": (raw(envelope_from=f"App{c} <app@src.example>"), ["envelope_from"]),
    }
    return cases[where]


WHERE = [
    "subject",
    "to",
    "cc",
    "reply_to",
    "from display name",
    "header name",
    "header value",
    "attachment filename",
    "envelope_from",
    "recipients",
    "envelope display name",
]


@pytest.mark.parametrize("byte", BYTES)
@pytest.mark.parametrize("where", WHERE)
def test_control_characters_are_refused(site: Site, where: str, byte: str) -> None:
    body, fields = _injected(where, BYTES[byte])
    problem = site.refused(site.post(body), 400, fields)
    assert problem["title"] == "Bad Request"
    assert problem["detail"].startswith(f"invalid request: {fields[0]}: ")


def test_every_field_at_fault_is_named(site: Site) -> None:
    body = structured(subject="a\r\nb", to=["x@example.net\n"], headers={"X-A": "\0", "X-B\r": "v"}, bogus=1)
    site.refused(site.post(body), 400, ["bogus", "to[0]", "subject", "headers.X-A", "headers['X-B\\r']"])


# -- malformed requests ----------------------------------------------------------------------------------

MALFORMED: dict[str, tuple[dict[str, Any], list[str]]] = {
    "raw not base64": (raw(raw="not base64!"), ["raw"]),
    "raw without padding": (raw(raw="aGk"), ["raw"]),
    "raw not a string": (raw(raw=123), ["raw"]),
    "raw empty": (raw(raw=""), ["raw"]),
    "attachment not base64": (
        structured(attachments=[{"filename": "a.bin", "content": "%%%%"}]),
        ["attachments[0].content"],
    ),
    "attachment non-ASCII base64": (
        structured(attachments=[{"filename": "a.bin", "content": "aGk=é"}]),
        ["attachments[0].content"],
    ),
    "raw no recipients": (raw(recipients=[]), ["recipients"]),
    "raw recipients missing": ({"envelope_from": "a@src.example", "raw": raw()["raw"]}, ["recipients"]),
    "structured no recipients": (structured(to=[]), ["to"]),
    "structured unknown field": (structured(bogus=1), ["bogus"]),
    "raw unknown field": (raw(bogus=1), ["bogus"]),
    "raw with a structured field": (raw(subject="s"), ["subject"]),
    "reserved header": (structured(headers={"Bcc": "victim@evil.example"}), ["headers.Bcc"]),
    "header name with a colon": (structured(headers={"X-A: b": "v"}), ["headers['X-A: b']"]),
}


@pytest.mark.parametrize(("body", "fields"), MALFORMED.values(), ids=MALFORMED.keys())
def test_malformed_request_is_refused(site: Site, body: dict[str, Any], fields: list[str]) -> None:
    site.refused(site.post(body), 400, fields)


NOT_JSON = {
    "garbage": b"{not json",
    "truncated": b'{"envelope_from": "a@src.example", "recipients": [',
    "invalid UTF-8": b'{"subject": "\xff"}',
    "an array": b'["envelope_from"]',
    "a duplicate key": b'{"to": ["a@example.net"], "to": ["b@example.net"]}',
    "empty": b"",
}
NOT_JSON_FIELD = {"a duplicate key": "to"}


@pytest.mark.parametrize("name", NOT_JSON)
def test_not_json_is_refused(site: Site, name: str) -> None:
    resp = site.client.post(
        "/v1/messages", content=NOT_JSON[name], headers={"Content-Type": "application/json"}
    )
    site.refused(resp, 400, [NOT_JSON_FIELD.get(name, "(body)")])


def test_not_json_content_type_is_refused(site: Site) -> None:
    resp = site.client.post("/v1/messages", data={"from": "a@src.example", "to": "b@example.net"})
    site.refused(resp, 415, ["Content-Type"])


# -- too large -------------------------------------------------------------------------------------------


def test_26_mib_raw_is_413(site: Site) -> None:
    """A message of 26.7 MiB (base64, ~35 MB of JSON, streamed: never whole in this process) against the
    default 25 MiB limit."""
    head = b'{"envelope_from": "app@src.example", "recipients": ["ann@example.net"], "raw": "'
    tail = b'"}'
    chunk = base64.b64encode(b"x" * 57 * 16384)  # 4/3 of 912 KiB, no padding
    count = -(-26 * MIB // (57 * 16384))
    length = len(head) + len(chunk) * count + len(tail)

    def body() -> Iterator[bytes]:
        yield head
        for _ in range(count):
            yield chunk
        yield tail

    resp = site.client.post(
        "/v1/messages",
        content=body(),
        headers={"Content-Type": "application/json", "Content-Length": str(length)},
    )
    problem = site.refused(resp, 413, ["raw"])
    assert problem["detail"].endswith("; the limit is 26214400 ([limits].max_message_size)")


def test_body_over_the_limit_is_413_before_it_is_read(site: Site) -> None:
    """Only the headers (and one byte) of a 64 MiB body are sent: the 413 comes without waiting for the
    rest, and says the connection cannot carry another request."""
    host, port = site.daemon.config["http"]["addr"].rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(
            b"POST /v1/messages HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n{" % (64 * MIB)
        )
        data = b""
        while b"\r\n\r\n" not in data:
            data += sock.recv(65536)
        head, _, body = data.partition(b"\r\n\r\n")
        status, *lines = head.decode().split("\r\n")
        headers = dict(line.lower().split(": ", 1) for line in lines)
        while len(body) < int(headers["content-length"]):
            body += sock.recv(65536)
    assert status.startswith("HTTP/1.1 413"), data
    assert headers["content-type"].startswith(PROBLEM) and headers["connection"] == "close", headers
    assert [e["field"] for e in json.loads(body)["errors"]] == ["(body)"], body
    site.nothing_kept()


# -- API keys --------------------------------------------------------------------------------------------

AUTH = {
    "missing": ({}, 'Bearer realm="hedwigpy"'),
    "not bearer": ({"Authorization": f"Basic {KEY}"}, 'Bearer realm="hedwigpy"'),
    "empty bearer": ({"Authorization": "Bearer"}, 'Bearer realm="hedwigpy"'),
    "wrong": ({"Authorization": "Bearer wrong-key"}, 'Bearer realm="hedwigpy", error="invalid_token"'),
    "right key, wrong case": (
        {"Authorization": f"Bearer {KEY.upper()}"},
        'Bearer realm="hedwigpy", error="invalid_token"',
    ),
}


@pytest.mark.parametrize("case", AUTH)
def test_missing_or_wrong_key_is_401(keyed_site: Site, case: str) -> None:
    headers, challenge = AUTH[case]
    resp = keyed_site.post(raw(), headers=headers)
    keyed_site.refused(resp, 401, ["Authorization"])  # INTERFACE.md: the fields at fault, here the header
    assert resp.headers["www-authenticate"] == challenge


def test_right_key_is_served(keyed_site: Site) -> None:
    resp = keyed_site.post(raw(), headers={"Authorization": f"Bearer {KEY}"})
    keyed_site.delivered(resp, "raw")
    shown = keyed_site.client.get(f"/v1/messages/{resp.json()['id']}")
    assert shown.status_code == 401  # the key is needed for every request, not only the first


# -- disk full -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_site(tmp_path_factory: pytest.TempPathFactory, upstream: Upstream) -> Iterator[Site]:
    if os.geteuid() != 0:
        pytest.skip("the disk-full test mounts a tmpfs, which needs root (CI runs as root)")
    tmp = tmp_path_factory.mktemp("rest-tiny")
    mnt = tmp / "tiny"
    if not _mount_tmpfs(mnt, "4m"):
        pytest.fail(f"could not mount a tmpfs on {mnt}")
    try:
        with running(tmp, upstream, spool=mnt / "spool") as s:
            yield s
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_disk_full_is_503(tiny_site: Site) -> None:
    spool = tiny_site.daemon.spool
    message = b"From: app@src.example\r\nSubject: big\r\n\r\n" + (b"y" * 76 + b"\r\n") * 2000  # 156 KiB
    body = raw(raw=base64.b64encode(message).decode())
    filler = spool.parent / "filler"
    st = os.statvfs(spool)
    with filler.open("wb") as f:  # leave 100 KiB: less than the 1.5 times the message the spool asks for
        f.write(b"\0" * (st.f_bavail * st.f_frsize - 100 * 1024))
    try:
        resp = tiny_site.post(body)
        problem = tiny_site.refused(resp, 503, [])
        assert resp.headers["retry-after"] == "60"
        assert "nothing was queued" in problem["detail"]
    finally:
        filler.unlink()
    tiny_site.delivered(tiny_site.post(body), "big")  # room again: the same request goes through
