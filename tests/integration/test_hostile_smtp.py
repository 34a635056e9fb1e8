"""Every SMTP item of INTERFACE.md's hostile-input list, on the wire, with the exact reply and the spool
checked afterwards: nothing lost, nothing extra."""

from __future__ import annotations

import os
import ssl
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
import trustme

from hedwigpy.auth import hash_password

from .daemon import Daemon, read_message
from .wire import Wire

OPEN = [b"EHLO client.example", b"MAIL FROM:<a@src.example>", b"RCPT TO:<b@dest.example>"]


def begin(w: Wire, *lines: bytes) -> None:
    for line in lines or OPEN:
        assert w.cmd(line)[0] == "2", line


def only_queued(d: Daemon, count: int) -> list[Path]:
    """Exactly `count` messages, all in queued/, nothing torn or elsewhere."""
    spool = d.all_spooled()
    assert len(spool["queued"]) == count, spool
    assert all(not v for k, v in spool.items() if k != "queued"), spool
    return spool["queued"]


# -- SMTP smuggling ----------------------------------------------------------------------------------

SMUGGLE = [
    b"\n.\n",
    b"\n.\r\n",
    b"\r\n.\n",
    b"\r.\r",
    b"\r.\r\n",
    b"\r\n.\r",
    b"\r\n\x00.\r\n",
    b"\r\n.\x00\r\n",
]


@pytest.mark.parametrize("terminator", SMUGGLE, ids=[repr(t) for t in SMUGGLE])
def test_smuggling_stays_one_message(daemon: Daemon, terminator: bytes) -> None:
    with Wire(daemon.port()) as w:
        begin(w)
        assert w.cmd("DATA").startswith("354 ")
        w.send(
            b"Subject: outer\r\n\r\nouter body"
            + terminator
            + b"MAIL FROM:<evil@attacker.example>\r\nRCPT TO:<victim@dest.example>\r\nDATA\r\n"
            + b"Subject: smuggled\r\n\r\nsmuggled\r\n.\r\n"
        )
        assert w.reply().startswith("250 2.0.0 Ok: queued as ")
        assert w.cmd("QUIT") == "221 2.0.0 Bye"
    [path] = only_queued(daemon, 1)
    envelope, content = read_message(path)
    assert envelope["sender"] == "a@src.example"
    assert b"evil@attacker.example" in content  # the smuggled commands are content, not a transaction


# -- STARTTLS ----------------------------------------------------------------------------------------


def starttls_daemon(
    tmp_path: Path, config: dict[str, Any], certfiles: tuple[Path, Path], factory: type[Daemon]
) -> Daemon:
    cert, key = certfiles
    config["listeners"][0].update({"tls": "starttls", "cert": str(cert), "key": str(key)})
    d = factory(tmp_path, config)
    d.start()
    return d


def test_plaintext_pipelined_after_starttls_is_discarded(
    tmp_path: Path,
    config: dict[str, Any],
    certfiles: tuple[Path, Path],
    ca: trustme.CA,
    daemon_factory: type[Daemon],
) -> None:
    d = starttls_daemon(tmp_path, config, certfiles, daemon_factory)
    ctx = ssl.create_default_context()
    ca.configure_trust(ctx)
    with Wire(d.port()) as w:
        w.cmd("EHLO client.example")
        w.send(b"STARTTLS\r\nMAIL FROM:<evil@attacker.example>\r\nRCPT TO:<victim@dest.example>\r\n")
        assert w.reply() == "220 2.0.0 Ready to start TLS"
        w.starttls(ctx)
        # The injected MAIL was never seen: RCPT now has no transaction, and EHLO is required again.
        assert w.cmd("RCPT TO:<victim@dest.example>") == "503 5.5.1 Send EHLO or HELO first"
        assert w.cmd("EHLO client.example").startswith("250-mx.test.example")
        assert w.cmd("RCPT TO:<victim@dest.example>") == "503 5.5.1 Need MAIL command first"
    only_queued(d, 0)


# -- AUTH --------------------------------------------------------------------------------------------


def auth_daemon(tmp_path: Path, config: dict[str, Any], factory: type[Daemon]) -> Daemon:
    config["users"] = [{"name": "app", "password_hash": hash_password("right", ln=10)}]
    config["limits"] = {"auth_failure_delay": "0s", "max_errors": 10}
    config["listeners"][0]["trusted_networks"] = []
    d = factory(tmp_path, config)
    d.start()
    return d


def test_auth_brute_force_is_cut_off(
    tmp_path: Path, config: dict[str, Any], daemon_factory: type[Daemon]
) -> None:
    import base64

    d = auth_daemon(tmp_path, config, daemon_factory)
    wrong = base64.b64encode(b"\0app\0wrong").decode()
    with Wire(d.port()) as w:
        w.cmd("EHLO client.example")
        for _ in range(9):
            assert w.cmd(f"AUTH PLAIN {wrong}") == "535 5.7.8 Authentication credentials invalid"
        w.send(f"AUTH PLAIN {wrong}\r\n".encode())
        assert w.reply() == "535 5.7.8 Authentication credentials invalid"
        assert w.reply() == "421 4.7.0 mx.test.example Error: too many errors"
        assert w.closed()


def test_relay_refused_without_auth_or_trust(
    tmp_path: Path, config: dict[str, Any], daemon_factory: type[Daemon]
) -> None:
    d = auth_daemon(tmp_path, config, daemon_factory)
    with Wire(d.port()) as w:
        begin(w, b"EHLO client.example", b"MAIL FROM:<a@src.example>")
        assert w.cmd("RCPT TO:<b@dest.example>") == "554 5.7.1 <b@dest.example>: Relay access denied"
    only_queued(d, 0)


# -- open relay tricks -------------------------------------------------------------------------------

RELAY_TRICKS = [
    (
        "<a%ext.example@local.example>",
        "554 5.7.1 <a%ext.example@local.example>: Relay access denied (routing syntax in local part)",
    ),
    (
        '<"a@ext.example"@local.example>',
        '554 5.7.1 <"a@ext.example"@local.example>: Relay access denied (routing syntax in local part)',
    ),
    (
        "<a!ext.example@local.example>",
        "554 5.7.1 <a!ext.example@local.example>: Relay access denied (routing syntax in local part)",
    ),
    ("<@local.example:a@ext.example>", "554 5.7.1 <a@ext.example>: Relay access denied"),
    ("<a@ext.example@local.example>", "501 5.1.3 Syntax error in mailbox address"),
    ("<a@[127.0.0.1]>", "554 5.7.1 <a@[127.0.0.1]>: Relay access denied"),
    ("<a@[IPv6:::1]>", "554 5.7.1 <a@[ipv6:::1]>: Relay access denied"),
    ("<a@ext.example>", "554 5.7.1 <a@ext.example>: Relay access denied"),
    ("<a@local.example.ext.example>", "554 5.7.1 <a@local.example.ext.example>: Relay access denied"),
]


@pytest.fixture
def ingress(tmp_path: Path, config: dict[str, Any], daemon_factory: type[Daemon]) -> Daemon:
    config["listeners"][0].update(
        {"role": "ingress", "trusted_networks": [], "local_domains": ["local.example"]}
    )
    d = daemon_factory(tmp_path, config)
    d.start()
    return d


@pytest.mark.parametrize(("rcpt", "reply"), RELAY_TRICKS)
def test_open_relay_tricks(ingress: Daemon, rcpt: str, reply: str) -> None:
    with Wire(ingress.port()) as w:
        begin(w, b"EHLO client.example", b"MAIL FROM:<a@src.example>")
        assert w.cmd(f"RCPT TO:{rcpt}") == reply
        assert w.cmd("DATA") == "554 5.5.1 No valid recipients"
    only_queued(ingress, 0)


def test_ingress_accepts_local_domain_and_postmaster(ingress: Daemon) -> None:
    with Wire(ingress.port()) as w:
        begin(w, b"EHLO client.example", b"MAIL FROM:<a@src.example>")
        assert w.cmd("RCPT TO:<user@local.example>") == "250 2.1.5 Ok"
        assert w.cmd("RCPT TO:<Postmaster>") == "250 2.1.5 Ok"
        assert w.cmd("DATA").startswith("354")
        assert w.cmd(b"Subject: x\r\n\r\nhi\r\n.").startswith("250 2.0.0 Ok: queued as")
    [path] = only_queued(ingress, 1)
    envelope, _ = read_message(path)
    assert envelope["recipients"] == ["user@local.example", "postmaster@local.example"]


# -- lengths -----------------------------------------------------------------------------------------


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def test_overlong_command_is_refused_with_bounded_memory(daemon: Daemon) -> None:
    assert daemon.proc is not None
    before = rss_kib(daemon.proc.pid)
    with Wire(daemon.port()) as w:
        assert w.cmd(b"NOOP " + b"x" * 600) == "500 5.5.2 Line too long"
        w.send(b"EHLO " + b"y" * (32 * 1024 * 1024))  # 32 MiB without a line end
        assert w.reply() == "500 5.5.2 Line too long"
        w.send(b"yyy\r\n")  # ends the overlong line, which was dropped without another reply
        assert w.cmd("NOOP") == "250 2.0.0 Ok"
    assert rss_kib(daemon.proc.pid) - before < 16 * 1024


def test_overlong_text_line_is_refused(daemon: Daemon) -> None:
    with Wire(daemon.port()) as w:
        begin(w)
        w.cmd("DATA")
        w.send(b"Subject: x\r\n\r\n" + b"z" * 999 + b"\r\n.\r\n")
        assert w.reply() == "554 5.6.0 Message rejected: a line is longer than 998 octets (RFC 5322)"
        begin(w, *OPEN[1:])
        w.cmd("DATA")
        assert w.cmd(b"Subject: x\r\n\r\n" + b"z" * 998 + b"\r\n.").startswith("250 ")
    only_queued(daemon, 1)


def test_overlong_path(daemon: Daemon) -> None:
    with Wire(daemon.port()) as w:
        begin(w, *OPEN[:2])
        assert w.cmd("RCPT TO:<" + "a" * 64 + "@" + "b" * 200 + ".example>") == "501 5.1.3 Path too long"
        assert w.cmd("RCPT TO:<" + "a" * 65 + "@dest.example>") == "501 5.1.3 Local part too long"


def test_1001_recipients(daemon: Daemon) -> None:
    with Wire(daemon.port()) as w:
        begin(w, *OPEN[:2])
        w.send(b"".join(b"RCPT TO:<r%d@dest.example>\r\n" % i for i in range(1001)))
        replies = [w.reply() for _ in range(1001)]
        assert replies[:1000] == ["250 2.1.5 Ok"] * 1000
        assert replies[1000] == "452 4.5.3 Error: too many recipients"
        w.cmd("DATA")
        assert w.cmd(b"Subject: many\r\n\r\nx\r\n.").startswith("250 ")
    [path] = only_queued(daemon, 1)
    assert len(read_message(path)[0]["recipients"]) == 1000


# -- SIZE --------------------------------------------------------------------------------------------


@pytest.fixture
def small(tmp_path: Path, config: dict[str, Any], daemon_factory: type[Daemon]) -> Daemon:
    config["limits"] = {"max_message_size": 10_000}
    d = daemon_factory(tmp_path, config)
    d.start()
    return d


def test_size_declared_and_actual(small: Daemon) -> None:
    with Wire(small.port()) as w:
        assert "SIZE 10000" in w.cmd("EHLO client.example")
        assert (
            w.cmd("MAIL FROM:<a@src.example> SIZE=10001")
            == "552 5.3.4 Message size exceeds fixed maximum message size"
        )
        begin(w, b"MAIL FROM:<a@src.example> SIZE=500", b"RCPT TO:<b@dest.example>")
        w.cmd("DATA")
        w.send(b"Subject: big\r\n\r\n" + (b"x" * 70 + b"\r\n") * 200 + b".\r\n")
        assert w.reply() == "552 5.3.4 Message size exceeds fixed maximum message size"
        begin(w, *OPEN[1:])
        w.send(b"BDAT 20000 LAST\r\n" + b"y" * 20000)
        assert w.reply() == "552 5.3.4 Message size exceeds fixed maximum message size"
        begin(w, *OPEN[1:])
        w.cmd("DATA")
        assert w.cmd(b"Subject: small\r\n\r\nfits\r\n.").startswith("250 ")
    [path] = only_queued(small, 1)
    assert read_message(path)[1].endswith(b"fits\r\n")


# -- time --------------------------------------------------------------------------------------------


@pytest.fixture
def impatient(tmp_path: Path, config: dict[str, Any], daemon_factory: type[Daemon]) -> Daemon:
    config["limits"] = {"command_timeout": "1s", "data_timeout": "2s"}
    config["listeners"][0]["greet_pause"] = "300ms"
    d = daemon_factory(tmp_path, config)
    d.start()
    return d


def test_idle_client_is_dropped(impatient: Daemon) -> None:
    with Wire(impatient.port()) as w:
        w.cmd("EHLO client.example")
        assert w.reply() == "421 4.4.2 mx.test.example Error: timeout exceeded"
        assert w.closed()


def test_slow_trickle_command_is_dropped(impatient: Daemon) -> None:
    with Wire(impatient.port()) as w:
        started = time.monotonic()
        for byte in b"EHLO slow.example":
            try:
                w.send(bytes([byte]))
            except OSError:
                break  # the server already hung up
            time.sleep(0.1)
            if time.monotonic() - started > 1.5:
                break
        assert w.reply() == "421 4.4.2 mx.test.example Error: timeout exceeded"


def test_slow_trickle_data_is_dropped_and_not_spooled(impatient: Daemon) -> None:
    with Wire(impatient.port()) as w:
        begin(w)
        w.cmd("DATA")
        started = time.monotonic()
        while time.monotonic() - started < 3:
            try:
                w.send(b"x\r\n")
            except OSError:
                break
            time.sleep(0.2)
        assert w.reply() == "421 4.4.2 mx.test.example Error: timeout exceeded"
    only_queued(impatient, 0)


def test_commands_before_the_banner(impatient: Daemon) -> None:
    with Wire(impatient.port(), greet=False) as w:
        w.send(b"EHLO eager.example\r\nMAIL FROM:<a@src.example>\r\n")
        assert w.reply() == "554 5.5.0 SMTP protocol synchronization error (input sent before greeting)"
        assert w.closed()
    only_queued(impatient, 0)


# -- bytes -------------------------------------------------------------------------------------------


def test_nul_and_invalid_utf8(daemon: Daemon) -> None:
    with Wire(daemon.port()) as w:
        w.cmd("EHLO client.example")
        assert w.cmd(b"MAIL FROM:<a\x00@src.example>") == "500 5.5.2 NUL character not allowed"
        assert w.cmd(b"MAIL FROM:<\xff\xfe@src.example>") == "500 5.5.2 Invalid UTF-8 in command"
        assert w.cmd("MAIL FROM:<ü@src.example>") == "553 5.6.7 Non-ASCII address requires SMTPUTF8"
        begin(w, *OPEN[1:])
        w.cmd("DATA")
        body = b"Subject: bytes\r\n\r\nnul \x00 here, latin1 \xe9, broken utf8 \xc3\x28\r\n"
        assert w.cmd(body + b".").startswith("250 ")
    [path] = only_queued(daemon, 1)
    assert read_message(path)[1].endswith(body[len(b"Subject: bytes\r\n") :])


def test_malformed_mime_is_stored_untouched(daemon: Daemon) -> None:
    junk = (
        b"Content-Type: multipart/mixed; boundary=\r\nMIME-Version: 9.9\r\n"
        b"Content-Transfer-Encoding: base64\r\n\r\n--\r\n====\r\n--x--\r\n\xff\xfe"
    )
    with Wire(daemon.port()) as w:
        begin(w)
        w.cmd("DATA")
        assert w.cmd(junk + b"\r\n.").startswith("250 ")
    [path] = only_queued(daemon, 1)
    content = read_message(path)[1]
    head, body = junk.split(b"\r\n\r\n", 1)
    assert head + b"\r\nMessage-ID: <" in content  # only a Message-ID was added
    assert content.endswith(b"\r\n\r\n" + body + b"\r\n")


def test_null_sender_is_accepted(daemon: Daemon) -> None:
    with Wire(daemon.port()) as w:
        begin(w, b"EHLO client.example", b"MAIL FROM:<>", b"RCPT TO:<b@dest.example>")
        w.cmd("DATA")
        assert w.cmd(b"Subject: bounce\r\n\r\nx\r\n.").startswith("250 ")
    [path] = only_queued(daemon, 1)
    assert read_message(path)[0]["sender"] == ""


@pytest.mark.parametrize(("hops", "accepted"), [(50, True), (51, False)])
def test_received_headers_loop_detection(daemon: Daemon, hops: int, accepted: bool) -> None:
    headers = b"".join(
        b"Received: from h%d.example by h%d.example; Thu, 1 Jan 2026 00:00:00 +0000\r\n" % (i, i)
        for i in range(hops)
    )
    with Wire(daemon.port()) as w:
        begin(w)
        w.cmd("DATA")
        reply = w.cmd(headers + b"Subject: loop\r\n\r\nx\r\n.")
    if accepted:
        assert reply.startswith("250 ")
        only_queued(daemon, 1)
    else:
        assert reply == "554 5.4.6 Too many hops (51 Received headers): mail loop?"
        only_queued(daemon, 0)


# -- disk --------------------------------------------------------------------------------------------


def _mount_tmpfs(path: Path, size: str) -> bool:
    if os.geteuid() != 0:
        return False
    path.mkdir(parents=True, exist_ok=True)
    return (
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], check=False
        ).returncode
        == 0
    )


@pytest.fixture
def tiny_disk(tmp_path: Path) -> Any:
    mnt = tmp_path / "tiny"
    if not _mount_tmpfs(mnt, "4m"):
        pytest.fail("disk-full tests need root to mount a tmpfs (CI runs as root)")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_disk_full(
    tiny_disk: Path, tmp_path: Path, config: dict[str, Any], daemon_factory: type[Daemon]
) -> None:
    config["server"]["spool_dir"] = str(tiny_disk / "spool")
    config["limits"] = {"max_message_size": "1MiB"}
    d = daemon_factory(tmp_path, config)
    d.start()
    with Wire(d.port()) as w:
        begin(w)  # 4 MiB free ≥ 1.5 MiB needed
        w.cmd("DATA")
        assert w.cmd(b"Subject: fits\r\n\r\nx\r\n.").startswith("250 ")
        filler = tiny_disk / "filler"
        with filler.open("wb") as f:  # leave about 1 MiB free: below the 1.5 MiB MAIL needs
            f.write(b"\0" * (3 * 1024 * 1024 - 64 * 1024))
        w.cmd("EHLO client.example")
        assert w.cmd("MAIL FROM:<a@src.example>") == "452 4.3.1 Insufficient system storage"
        filler.unlink()
        begin(w, *OPEN[1:])
        w.cmd("DATA")
        with filler.open("wb") as f:  # the disk fills up while the message streams in
            f.write(b"\0" * (4 * 1024 * 1024 - 300 * 1024))
        w.send(b"Subject: big\r\n\r\n" + (b"y" * 998 + b"\r\n") * 900 + b".\r\n")
        assert w.reply() in (
            "452 4.3.1 Insufficient system storage",
            "451 4.3.0 Error: queue file write error",
        )
    only_queued(d, 1)
