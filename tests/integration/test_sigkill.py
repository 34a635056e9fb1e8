"""Durability proven by SIGKILL: clients send while the daemon is killed and restarted; every message
that got a 250 is in the spool exactly once, and no torn file is ever visible in queued/."""

from __future__ import annotations

import random
import smtplib
import threading
import time
from collections import Counter

from .daemon import Daemon, read_message


def _sender(
    port: int, worker: int, stop: threading.Event, acked: dict[str, str], lock: threading.Lock
) -> None:
    n = 0
    while not stop.is_set():
        try:
            with smtplib.SMTP("127.0.0.1", port, timeout=5) as client:
                client.ehlo("killer.example")
                while not stop.is_set():
                    token = f"w{worker}-m{n}"
                    n += 1
                    body = (
                        f"Subject: {token}\r\n\r\n".encode()
                        + b"payload line\r\n" * random.randint(1, 400)
                        + f"END-{token}\r\n".encode()
                    )
                    client.mail("a@src.example")
                    client.rcpt("b@dest.example")
                    code, text = client.data(body)
                    if code == 250:
                        with lock:
                            acked[token] = text.decode().rsplit(" ", 1)[-1]
        except (OSError, smtplib.SMTPException):
            time.sleep(0.02)  # daemon down or killed mid-session: reconnect


def test_sigkill_during_traffic_loses_nothing(daemon: Daemon) -> None:
    stop = threading.Event()
    lock = threading.Lock()
    acked: dict[str, str] = {}
    threads = [
        threading.Thread(target=_sender, args=(daemon.port(), i, stop, acked, lock), daemon=True)
        for i in range(4)
    ]
    for t in threads:
        t.start()
    try:
        for _ in range(6):
            time.sleep(random.uniform(0.4, 1.0))
            daemon.kill()
            # A killed daemon's spool: whatever is in queued/ must already be whole.
            for path in daemon.spooled():
                _, content = read_message(path)
                token = content.split(b"Subject: ", 1)[1].split(b"\r\n", 1)[0].decode()
                assert content.endswith(f"END-{token}\r\n".encode()), path
            daemon.start()
        time.sleep(0.5)
    finally:
        stop.set()
        for t in threads:
            t.join(10)
    daemon.stop()
    daemon.start()  # a clean start sweeps tmp/ of torn writes
    assert daemon.spooled("tmp") == []
    assert daemon.spooled("corrupt") == []

    seen: Counter[str] = Counter()
    ids: dict[str, str] = {}
    for path in daemon.spooled():
        _, content = read_message(path)
        token = content.split(b"Subject: ", 1)[1].split(b"\r\n", 1)[0].decode()
        assert content.endswith(f"END-{token}\r\n".encode()), f"torn file {path}"
        seen[token] += 1
        ids[token] = path.stem
    assert len(acked) > 50, "the clients barely got through; the test proved little"
    for token, message_id in acked.items():
        assert seen[token] == 1, f"acknowledged {token} is in the spool {seen[token]} times"
        assert ids[token] == message_id
    assert max(seen.values()) == 1  # unacknowledged ones are there at most once
