"""The sans-IO SMTP core: framing, replies, addresses, and the server/client state machines.

Nothing here imports trio, sockets or storage (DESIGN rule 1); a test enforces it.
"""

from . import events
from .addresses import AddressError, Mailbox, parse_path
from .client import ClientConnection, ClientState, Response, ServerExtensions
from .errors import LocalProtocolError, ProtocolError, RemoteProtocolError
from .framing import (
    BodyEncoder,
    DotReader,
    LineBuffer,
    LineEndingNormalizer,
    dot_stuff,
    normalize_line_endings,
)
from .replies import Reply, ReplyParser
from .server import ServerConnection, State

__all__ = [
    "AddressError",
    "BodyEncoder",
    "ClientConnection",
    "ClientState",
    "DotReader",
    "LineBuffer",
    "LineEndingNormalizer",
    "LocalProtocolError",
    "Mailbox",
    "ProtocolError",
    "RemoteProtocolError",
    "Reply",
    "ReplyParser",
    "Response",
    "ServerConnection",
    "ServerExtensions",
    "State",
    "dot_stuff",
    "events",
    "normalize_line_endings",
    "parse_path",
]
