"""`hedwigpy queue ...` against a real admin API (serve_http over an in-memory queue, in a thread), and
`hedwigpy send` against a stub SMTP server (aiosmtpd): output, JSON, exit codes."""

from __future__ import annotations

import json
import socket
import ssl
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog
import trustme
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, Envelope, Session

from hedwigpy import cli
from hedwigpy._units import HostPort
from hedwigpy.cli_queue import connect_addr, format_queue
from hedwigpy.storage import State

from .api.fake_queue import (
    ID_BOUNCED,
    ID_CORRUPT,
    ID_DEFERRED,
    ID_HELD,
    ID_QUEUED,
    UNKNOWN,
    FakeQueue,
    ServerThread,
    sample_queue,
)
from .api.test_admin import KEY, KEYS

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def write_config(
    path: Path, http: str, listener: str | None = None, tls: str = "none", cert: Any = None
) -> Path:
    lines = ['[server]\nhostname = "mx.test.example"\n', f'[http]\naddr = "{http}"\n']
    if listener is not None:
        lines.append(f'[[listeners]]\nname = "relay"\naddr = "{listener}"\ntls = "{tls}"\n')
        if cert is not None:
            lines.append(f'cert = "{cert[0]}"\nkey = "{cert[1]}"\n')
    path.write_text("\n".join(lines))
    return path


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exit_info:
        cli.main(list(argv))
    out, err = capsys.readouterr()
    code = exit_info.value.code
    assert isinstance(code, int)
    return code, out, err


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("HEDWIG_API_KEY", "HEDWIG_CONFIG", "HEDWIG_PASSWORD", "http_proxy", "HTTP_PROXY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("http_proxy", "http://127.0.0.1:9")  # must be ignored: the daemon is local


@pytest.fixture(autouse=True)
def quiet_logs() -> Iterator[None]:
    """The server thread logs through structlog, by default to stdout: keep that out of the CLI's output."""
    saved = structlog.get_config()
    structlog.configure(logger_factory=structlog.ReturnLoggerFactory())
    yield
    structlog.configure(**saved)


@pytest.fixture
def queue() -> FakeQueue:
    return sample_queue()


@pytest.fixture
def server(queue: FakeQueue) -> Iterator[ServerThread]:
    with ServerThread(queue) as srv:
        yield srv


@pytest.fixture
def config(server: ServerThread, tmp_path: Path) -> str:
    return str(write_config(tmp_path / "hedwig.toml", str(server.addr)))


# --- queue list ---------------------------------------------------------------------------------------------


def test_list_table(capsys: pytest.CaptureFixture[str], config: str) -> None:
    code, out, err = run(capsys, "queue", "list", "-c", config)
    assert (code, err) == (0, "")
    lines = out.splitlines()
    assert lines[0].split() == [
        "-Queue",
        "ID-",
        "--Size--",
        "----Arrival",
        "Time----",
        "-Sender/Recipient-------",
    ]
    entry = lines[lines.index(next(line for line in lines if line.startswith(ID_DEFERRED))) :][:4]
    fields = entry[0].split()
    assert fields[0] == ID_DEFERRED and fields[1] == "4096" and fields[-1] == "alice@example.org"
    assert entry[1].strip() == "(host mx.example.com said: 451 4.7.1 Greylisted, try later)"
    assert entry[2].strip() == "bob@example.com"
    assert entry[3] == ""  # dan@example.org was delivered: not listed
    assert "dan@example.org" not in out
    held = next(line for line in lines if line.startswith(ID_HELD))
    assert held.split()[0] == f"{ID_HELD}!" and held.split()[-1] == "MAILER-DAEMON"
    assert any(line.startswith(f"{ID_BOUNCED}#") for line in lines)
    assert ID_CORRUPT not in out
    assert "-- 9 Kbytes in 4 Requests." in lines
    assert lines[-1].strip() == "(! held, # bounced)"


def test_list_one_state_and_empty(capsys: pytest.CaptureFixture[str], config: str, queue: FakeQueue) -> None:
    code, out, _ = run(capsys, "queue", "list", "--state", "queued", "-c", config)
    assert code == 0 and ID_QUEUED in out and ID_DEFERRED not in out
    assert "-- 1 Kbytes in 1 Request." in out and "carol@example.net" in out
    assert ("list", "queued") in queue.calls
    queue.messages.clear()
    assert run(capsys, "queue", "list", "-c", config)[:2] == (0, "Mail queue is empty\n")


def test_list_json(capsys: pytest.CaptureFixture[str], config: str) -> None:
    code, out, _ = run(capsys, "queue", "list", "--json", "--state", "deferred", "-c", config)
    assert code == 0
    doc = json.loads(out)
    assert doc["state"] == "deferred" and doc["count"] == 1
    (message,) = doc["messages"]
    assert message["id"] == ID_DEFERRED and message["status"]["recipients"][0]["last"]["code"] == 451


def test_list_without_status_shows_envelope_recipients() -> None:
    listing = {
        "messages": [{"id": "x" * 24, "state": "queued", "from": "a@b", "recipients": ["c@d"], "size": 1}]
    }
    text = format_queue(listing)
    assert text.splitlines()[1].split()[:2] == ["x" * 24, "1"] and "c@d" in text.splitlines()[2]


# --- show, stats --------------------------------------------------------------------------------------------


def test_show(capsys: pytest.CaptureFixture[str], config: str) -> None:
    code, out, _ = run(capsys, "queue", "show", ID_DEFERRED, "-c", config)
    assert code == 0
    assert f"id:           {ID_DEFERRED}" in out
    assert "state:        deferred" in out and "from:         <alice@example.org>" in out
    assert "via relay from 127.0.0.1:40000 as app" in out and "size:         4096 bytes" in out
    assert "attempts:     2" in out
    assert "  bob@example.com  pending, 2 attempts" in out
    assert "(host mx.example.com said: 451 4.7.1 Greylisted, try later)" in out
    assert "  dan@example.org  delivered, 1 attempt" in out


def test_show_json(capsys: pytest.CaptureFixture[str], config: str) -> None:
    code, out, _ = run(capsys, "queue", "show", ID_QUEUED, "--json", "-c", config)
    assert code == 0
    doc = json.loads(out)
    assert doc["id"] == ID_QUEUED and doc["status"]["recipients"][0]["address"] == "carol@example.net"


def test_show_unknown(capsys: pytest.CaptureFixture[str], config: str) -> None:
    code, out, err = run(capsys, "queue", "show", UNKNOWN, "-c", config)
    assert (code, out) == (1, "")
    assert err == f"hedwigpy: no message {UNKNOWN} in the queue (HTTP 404)\n"


def test_stats(capsys: pytest.CaptureFixture[str], config: str) -> None:
    code, out, _ = run(capsys, "queue", "stats", "-c", config)
    assert code == 0
    rows = dict(line.split() for line in out.splitlines())
    assert rows == {
        "queued": "1",
        "deferred": "1",
        "held": "1",
        "bounced": "1",
        "corrupt": "1",
        "scheduled": "2",
        "in_flight": "0",
    }
    code, out, _ = run(capsys, "queue", "stats", "--json", "-c", config)
    assert code == 0 and json.loads(out)["held"] == 1


# --- actions ------------------------------------------------------------------------------------------------


def test_flush(capsys: pytest.CaptureFixture[str], config: str) -> None:
    assert run(capsys, "queue", "flush", "-c", config) == (0, "flushed: 1 message due now\n", "")


@pytest.mark.parametrize(
    ("action", "message_id", "said", "after"),
    [
        ("retry", ID_DEFERRED, "due now", State.DEFERRED),
        ("hold", ID_QUEUED, "held", State.HELD),
        ("release", ID_HELD, "released", State.DEFERRED),
        ("delete", ID_BOUNCED, "deleted", None),
    ],
)
def test_actions(
    capsys: pytest.CaptureFixture[str],
    config: str,
    queue: FakeQueue,
    action: str,
    message_id: str,
    said: str,
    after: State | None,
) -> None:
    assert run(capsys, "queue", action, message_id, "-c", config) == (0, f"{message_id}: {said}\n", "")
    assert queue.state(message_id) == after
    assert (action, message_id) in queue.calls


@pytest.mark.parametrize("action", ["retry", "hold", "release", "delete"])
def test_action_unknown_id(capsys: pytest.CaptureFixture[str], config: str, action: str) -> None:
    code, out, err = run(capsys, "queue", action, UNKNOWN, "-c", config)
    assert (code, out) == (1, "")
    assert err == f"hedwigpy: no message {UNKNOWN} in the queue (HTTP 404)\n"


def test_action_wrong_state(capsys: pytest.CaptureFixture[str], config: str) -> None:
    code, _, err = run(capsys, "queue", "release", ID_QUEUED, "-c", config)
    assert code == 1
    assert err == f"hedwigpy: message {ID_QUEUED} is queued; release needs a held message (HTTP 409)\n"


# --- finding the daemon -------------------------------------------------------------------------------------


@pytest.mark.parametrize("argv", [["list"], ["show", ID_QUEUED], ["stats"], ["flush"], ["hold", ID_QUEUED]])
def test_daemon_not_running(capsys: pytest.CaptureFixture[str], tmp_path: Path, argv: list[str]) -> None:
    port = free_port()
    config = write_config(tmp_path / "hedwig.toml", f"127.0.0.1:{port}")
    code, out, err = run(capsys, "queue", *argv, "-c", str(config))
    assert (code, out) == (2, "")
    assert err == f"hedwigpy: no hedwigpy daemon answers at http://127.0.0.1:{port} (is it running?)\n"


def test_unreadable_config(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code, _, err = run(capsys, "queue", "stats", "-c", str(tmp_path / "missing.toml"))
    assert code == 2 and "missing.toml: cannot read config file" in err


def test_config_found_in_cwd_and_env(
    capsys: pytest.CaptureFixture[str], config: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # ./hedwig.toml
    assert run(capsys, "queue", "stats")[0] == 0
    monkeypatch.chdir(tmp_path.parent)
    monkeypatch.setenv("HEDWIG_CONFIG", config)
    assert run(capsys, "queue", "stats")[0] == 0


def test_wildcard_bind_means_loopback() -> None:
    assert connect_addr(HostPort("0.0.0.0", 8025)) == HostPort("127.0.0.1", 8025)
    assert connect_addr(HostPort("::", 8025)) == HostPort("::1", 8025)
    assert connect_addr(HostPort("192.0.2.1", 25)) == HostPort("192.0.2.1", 25)


def test_api_key_from_environment(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with ServerThread(sample_queue(), KEYS) as srv:
        config = str(write_config(tmp_path / "hedwig.toml", str(srv.addr)))
        code, _, err = run(capsys, "queue", "stats", "-c", config)
        assert code == 1 and "an API key is required" in err and "(HTTP 401)" in err
        monkeypatch.setenv("HEDWIG_API_KEY", "wrong")
        code, _, err = run(capsys, "queue", "stats", "-c", config)
        assert code == 1 and "not valid" in err
        monkeypatch.setenv("HEDWIG_API_KEY", KEY)
        assert run(capsys, "queue", "stats", "-c", config)[0] == 0


def test_entry_point_subprocess(config: str) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "hedwigpy", "queue", "stats", "--json", "-c", config],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=30,
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["queued"] == 1


# --- send ---------------------------------------------------------------------------------------------------


class StubSmtp:
    """aiosmtpd handler: accepts mail, refuses recipients at refused.example, records what it got."""

    def __init__(self) -> None:
        self.received: list[Envelope] = []

    async def handle_RCPT(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        if address.endswith("@refused.example"):
            return "550 5.1.1 No such user"
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 Ok"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        self.received.append(envelope)
        return "250 2.0.0 Ok: queued as STUB0001"


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    cert = trustme.CA().issue_cert("localhost", "127.0.0.1")
    base = tmp_path_factory.mktemp("tls")
    cert.private_key_and_cert_chain_pem.write_to_path(str(base / "cert.pem"))
    cert.private_key_pem.write_to_path(str(base / "key.pem"))
    return base / "cert.pem", base / "key.pem"


def _server_context(files: tuple[Path, Path]) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(*files)
    return ctx


@pytest.mark.parametrize("tls", ["none", "starttls", "implicit"])
def test_send(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, tls_files: tuple[Path, Path], tls: str
) -> None:
    handler = StubSmtp()
    port = free_port()
    kwargs: dict[str, Any] = {}
    if tls == "starttls":
        kwargs = {"tls_context": _server_context(tls_files), "require_starttls": True}
    elif tls == "implicit":
        kwargs = {"ssl_context": _server_context(tls_files)}
    controller = Controller(handler, hostname="127.0.0.1", port=port, **kwargs)
    controller.start()
    try:
        config = write_config(
            tmp_path / "hedwig.toml", f"127.0.0.1:{free_port()}", f"0.0.0.0:{port}", tls, tls_files
        )
        argv = [
            "send",
            "--to",
            "bob@example.com",
            "--to",
            "x@refused.example",
            "--subject",
            "Hi",
            "-c",
            str(config),
        ]
        code, out, err = run(capsys, *argv)
    finally:
        controller.stop()
    assert (code, out) == (0, "250 2.0.0 Ok: queued as STUB0001\n")
    assert err == "<x@refused.example>: 550 5.1.1 No such user\n"
    (envelope,) = handler.received
    assert envelope.mail_from == "hedwigpy@mx.test.example" and envelope.rcpt_tos == ["bob@example.com"]
    content = envelope.content
    assert isinstance(content, bytes)
    assert b"Subject: Hi\r\n" in content and b"To: bob@example.com, x@refused.example\r\n" in content
    assert b"A test message sent by `hedwigpy send`" in content


def test_send_every_recipient_refused(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    port = free_port()
    controller = Controller(StubSmtp(), hostname="127.0.0.1", port=port)
    controller.start()
    try:
        config = write_config(tmp_path / "hedwig.toml", "127.0.0.1:8025", f"127.0.0.1:{port}")
        argv = [
            "send",
            "--to",
            "x@refused.example",
            "--from",
            "me@example.org",
            "--body",
            "hello",
            "-c",
            str(config),
        ]
        code, out, err = run(capsys, *argv)
    finally:
        controller.stop()
    assert (code, out) == (1, "")
    assert err.splitlines() == [
        "<x@refused.example>: 550 5.1.1 No such user",
        "hedwigpy: no recipient was accepted",
    ]


def test_send_daemon_not_running(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    port = free_port()
    config = write_config(tmp_path / "hedwig.toml", "127.0.0.1:8025", f"127.0.0.1:{port}")
    code, _, err = run(capsys, "send", "--to", "bob@example.com", "-c", str(config))
    assert code == 2
    assert err == f"hedwigpy: no hedwigpy daemon answers at smtp://127.0.0.1:{port} (is it running?)\n"
