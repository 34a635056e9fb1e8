"""An in-memory `Storage` for unit tests of the layers above the spool."""

from __future__ import annotations

from collections.abc import AsyncGenerator

from .base import (
    DeliveryStatus,
    DueTimes,
    Envelope,
    InsufficientSpace,
    State,
    StorageError,
    StoredMessage,
    new_message_id,
)


class MemoryWriter:
    def __init__(self, storage: MemoryStorage, envelope: Envelope, message_id: str) -> None:
        self.message_id = message_id
        self.envelope = envelope
        self._storage = storage
        self._chunks: list[bytes] = []
        self._done = False

    async def write(self, data: bytes) -> None:
        if self._done:
            raise StorageError("writer already finished")
        if self._storage.fail_writes:
            raise StorageError("simulated write failure")
        self._chunks.append(data)

    async def prepend(self, data: bytes) -> None:
        if self._done:
            raise StorageError("writer already finished")
        self._chunks.insert(0, data)

    async def content(self) -> AsyncGenerator[bytes, None]:
        yield b"".join(self._chunks)

    async def commit(self, status: DeliveryStatus | None = None) -> StoredMessage:
        if self._done:
            raise StorageError("writer already finished")
        if self._storage.fail_writes:
            raise StorageError("simulated write failure")
        self._done = True
        content = b"".join(self._chunks)
        message = StoredMessage(self.message_id, State.QUEUED, self.envelope, len(content))
        self._storage.messages[self.message_id] = (message, content)
        if status is not None:
            self._storage.statuses[self.message_id] = status
        return message

    async def abort(self) -> None:
        self._done = True
        self._chunks.clear()


class MemoryStorage:
    def __init__(self, *, free_bytes: int = 1 << 40) -> None:
        self.free_bytes = free_bytes
        self.fail_writes = False
        self.messages: dict[str, tuple[StoredMessage, bytes]] = {}
        self.statuses: dict[str, DeliveryStatus] = {}
        self.due: dict[str, float] = {}

    async def open(self) -> None:
        return None

    async def close(self) -> None:
        return None

    def check_space(self, needed: int) -> None:
        if needed > self.free_bytes:
            raise InsufficientSpace(f"{self.free_bytes} bytes free, {needed} needed")

    def writer(self, envelope: Envelope, message_id: str | None = None) -> MemoryWriter:
        return MemoryWriter(self, envelope, message_id or new_message_id())

    async def get(self, message_id: str) -> StoredMessage | None:
        entry = self.messages.get(message_id)
        return entry[0] if entry else None

    async def read_content(self, message_id: str) -> AsyncGenerator[bytes, None]:
        entry = self.messages.get(message_id)
        if entry is None:
            raise StorageError(f"no message {message_id}")
        yield entry[1]

    async def list(self, state: State) -> list[StoredMessage]:
        return sorted((m for m, _ in self.messages.values() if m.state is state), key=lambda m: m.id)

    async def move(self, message_id: str, to: State) -> None:
        entry = self.messages.get(message_id)
        if entry is None:
            raise StorageError(f"no message {message_id}")
        message, content = entry
        self.messages[message_id] = (StoredMessage(message.id, to, message.envelope, message.size), content)

    async def delete(self, message_id: str) -> None:
        self.messages.pop(message_id, None)
        self.statuses.pop(message_id, None)
        self.due.pop(message_id, None)

    async def set_due(self, message_id: str, when: float) -> None:
        if message_id not in self.messages:
            raise StorageError(f"no message {message_id}")
        self.due[message_id] = when

    async def due_times(self, state: State) -> DueTimes:
        return [(m.id, self.due.get(m.id, m.envelope.received_at)) for m in await self.list(state)]

    async def load_status(self, message_id: str) -> DeliveryStatus:
        entry = self.messages.get(message_id)
        if entry is None:
            raise StorageError(f"no message {message_id}")
        status = self.statuses.get(message_id)
        return DeliveryStatus.initial(entry[0].envelope) if status is None else status

    async def save_status(self, message_id: str, status: DeliveryStatus) -> None:
        if message_id not in self.messages:
            raise StorageError(f"no message {message_id}")
        if self.fail_writes:
            raise StorageError("simulated write failure")
        self.statuses[message_id] = status

    def statistics(self) -> dict[str, int]:
        counts = dict.fromkeys((s.value for s in State), 0)
        for message, _ in self.messages.values():
            counts[message.state.value] += 1
        return counts
