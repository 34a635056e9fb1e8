"""The durable spool: the `Storage` protocol and its filesystem and in-memory backends."""

from .base import (
    Attempt,
    DeliveryStatus,
    Envelope,
    InsufficientSpace,
    MessageWriter,
    RecipientStatus,
    State,
    Storage,
    StorageError,
    StoredMessage,
    new_message_id,
)
from .filesystem import FilesystemStorage
from .memory import MemoryStorage

__all__ = [
    "Attempt",
    "DeliveryStatus",
    "Envelope",
    "FilesystemStorage",
    "InsufficientSpace",
    "MemoryStorage",
    "MessageWriter",
    "RecipientStatus",
    "State",
    "Storage",
    "StorageError",
    "StoredMessage",
    "new_message_id",
]
