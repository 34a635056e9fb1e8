"""An in-memory `QueueControl` for the admin API and CLI tests, and a thread running `serve_http` for
tests that talk to a real socket from blocking code."""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from dataclasses import replace

import trio

from hedwigpy._units import HostPort
from hedwigpy.api import serve_http
from hedwigpy.config import ApiKeyConfig, Config, HttpConfig, ServerConfig
from hedwigpy.storage import Attempt, DeliveryStatus, Envelope, RecipientStatus, State, StoredMessage

T0 = 1_700_000_000.25  # 2023-11-14T22:13:20.250Z

ID_QUEUED = "0000018bcfe5680000000001"
ID_DEFERRED = "0000018bcfe5680000000002"
ID_HELD = "0000018bcfe5680000000003"
ID_BOUNCED = "0000018bcfe5680000000004"
ID_CORRUPT = "0000018bcfe5680000000005"
UNKNOWN = "ffffffffffffffffffffffff"

LAST_451 = Attempt(
    at=T0 + 60, code=451, enhanced="4.7.1", text="Greylisted, try later", host="mx.example.com"
)


class FakeQueue:
    """The QueueControl contract over a dict; `calls` records what the API asked for."""

    def __init__(self) -> None:
        self.messages: dict[str, tuple[StoredMessage, DeliveryStatus]] = {}
        self.calls: list[tuple[str, str]] = []
        self.fail: Exception | None = None  # raised by every call when set

    def add(
        self,
        message_id: str,
        state: State,
        *recipients: str,
        sender: str = "alice@example.org",
        size: int = 2048,
    ) -> StoredMessage:
        env = Envelope(
            sender=sender,
            recipients=recipients or ("bob@example.com",),
            received_at=T0,
            client_addr="127.0.0.1:40000",
            listener="relay",
            auth_user="app",
        )
        message = StoredMessage(message_id, state, env, size)
        self.messages[message_id] = (message, DeliveryStatus.initial(env))
        return message

    def set_status(self, message_id: str, status: DeliveryStatus) -> None:
        self.messages[message_id] = (self.messages[message_id][0], status)

    def state(self, message_id: str) -> State | None:
        entry = self.messages.get(message_id)
        return None if entry is None else entry[0].state

    def _move(self, message_id: str, to: State) -> None:
        message, status = self.messages[message_id]
        self.messages[message_id] = (replace(message, state=to), status)

    def _check(self, name: str, arg: str = "") -> None:
        self.calls.append((name, arg))
        if self.fail is not None:
            raise self.fail

    async def list(self, state: State | None = None) -> list[StoredMessage]:
        self._check("list", "" if state is None else state.value)
        found = [
            m for m, _ in self.messages.values() if (m.state == state if state else m.state != State.CORRUPT)
        ]
        return sorted(found, key=lambda m: m.id)

    async def show(self, message_id: str) -> tuple[StoredMessage, DeliveryStatus] | None:
        self._check("show", message_id)
        return self.messages.get(message_id)

    def stats(self) -> dict[str, int]:
        self._check("stats")
        counts = {s.value: 0 for s in State}
        for message, _ in self.messages.values():
            counts[message.state.value] += 1
        return counts | {"scheduled": counts["queued"] + counts["deferred"], "in_flight": 0}

    async def flush(self) -> int:
        self._check("flush")
        deferred = [mid for mid, (m, _) in self.messages.items() if m.state == State.DEFERRED]
        for mid in deferred:
            self.set_status(mid, replace(self.messages[mid][1], next_attempt=time.time()))
        return len(deferred)

    async def retry(self, message_id: str) -> bool:
        self._check("retry", message_id)
        return self.state(message_id) in (State.QUEUED, State.DEFERRED)

    async def hold(self, message_id: str) -> bool:
        self._check("hold", message_id)
        if self.state(message_id) not in (State.QUEUED, State.DEFERRED):
            return False
        self._move(message_id, State.HELD)
        return True

    async def release(self, message_id: str) -> bool:
        self._check("release", message_id)
        if self.state(message_id) != State.HELD:
            return False
        self._move(message_id, State.DEFERRED)
        return True

    async def delete(self, message_id: str) -> bool:
        self._check("delete", message_id)
        return self.messages.pop(message_id, None) is not None


def sample_queue() -> FakeQueue:
    """One message in each state; the deferred one has a 451 for one recipient and a delivery for the
    other."""
    q = FakeQueue()
    q.add(ID_QUEUED, State.QUEUED, "carol@example.net", size=512)
    q.add(ID_DEFERRED, State.DEFERRED, "bob@example.com", "dan@example.org", size=4096)
    q.set_status(
        ID_DEFERRED,
        DeliveryStatus(
            recipients=(
                RecipientStatus("bob@example.com", "pending", 2, LAST_451),
                RecipientStatus(
                    "dan@example.org", "delivered", 1, Attempt(T0 + 30, 250, "2.0.0", "Ok", "mx.example.org")
                ),
            ),
            attempts=2,
            next_attempt=T0 + 600,
        ),
    )
    q.add(ID_HELD, State.HELD, "erin@example.com", sender="")
    q.add(ID_BOUNCED, State.BOUNCED, "frank@example.com")
    q.add(ID_CORRUPT, State.CORRUPT)
    return q


def make_config(addr: HostPort, api_keys: Sequence[ApiKeyConfig] = ()) -> Config:
    return Config(
        server=ServerConfig(hostname="mx.test.example"), http=HttpConfig(addr=addr), api_keys=tuple(api_keys)
    )


class ServerThread:
    """`serve_http` on 127.0.0.1 (a port the OS picks) in its own thread and trio run."""

    def __init__(self, queue: FakeQueue, api_keys: Sequence[ApiKeyConfig] = ()) -> None:
        self.queue = queue
        self.config = make_config(HostPort("127.0.0.1", 0), api_keys)
        self.addr: HostPort | None = None
        self._started = threading.Event()
        self._thread = threading.Thread(target=trio.run, args=(self._main,), daemon=True)
        self._token: trio.lowlevel.TrioToken | None = None
        self._cancel: trio.CancelScope | None = None

    async def _main(self) -> None:
        async with trio.open_nursery() as nursery:
            self._token = trio.lowlevel.current_trio_token()
            self._cancel = nursery.cancel_scope
            self.addr = await nursery.start(serve_http, self.config, self.queue, lambda: True)
            self._started.set()

    def __enter__(self) -> ServerThread:
        self._thread.start()
        if not self._started.wait(10):
            raise RuntimeError("serve_http did not start")
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._token is not None and self._cancel is not None
        self._token.run_sync_soon(self._cancel.cancel)
        self._thread.join(10)

    @property
    def url(self) -> str:
        return f"http://{self.addr}"
