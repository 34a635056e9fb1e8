"""Helpers shared by the spool tests."""

from __future__ import annotations

from pathlib import Path

from hedwigpy.storage import Envelope, FilesystemStorage, MemoryStorage, StoredMessage

AnyStorage = FilesystemStorage | MemoryStorage


def envelope(*recipients: str, sender: str = "alice@example.org") -> Envelope:
    return Envelope(
        sender=sender,
        recipients=recipients or ("bob@example.com", "chloé@exemple.fr"),
        body_type="8BITMIME",
        smtputf8=True,
        received_at=1_700_000_000.25,
        client_addr="192.0.2.7:40123",
        helo="client.example.org",
        listener="submission",
        auth_user="alice",
    )


async def store(
    storage: AnyStorage, content: bytes, env: Envelope | None = None, chunk: int = 7
) -> StoredMessage:
    """Commit `content` through a writer, in `chunk`-sized writes."""
    writer = storage.writer(env or envelope())
    for start in range(0, len(content), chunk):
        await writer.write(content[start : start + chunk])
    return await writer.commit()


async def read_all(storage: AnyStorage, message_id: str) -> bytes:
    return b"".join([chunk async for chunk in storage.read_content(message_id)])


def files(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())
