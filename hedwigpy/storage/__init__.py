"""The durable spool: the `Storage` protocol and its filesystem and in-memory backends."""

from .base import (
    Envelope,
    InsufficientSpace,
    MessageWriter,
    State,
    Storage,
    StorageError,
    StoredMessage,
    new_message_id,
)
from .filesystem import FilesystemStorage
from .memory import MemoryStorage

__all__ = [
    "Envelope",
    "FilesystemStorage",
    "InsufficientSpace",
    "MemoryStorage",
    "MessageWriter",
    "State",
    "Storage",
    "StorageError",
    "StoredMessage",
    "new_message_id",
]
