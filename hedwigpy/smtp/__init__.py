"""The sans-IO SMTP core: framing, replies, addresses, and the server/client state machines.

Nothing here imports trio, sockets or storage (DESIGN rule 1); a test enforces it.
"""

from . import events
from .addresses import AddressError, Mailbox, parse_path
from .errors import LocalProtocolError, ProtocolError, RemoteProtocolError
from .framing import DotReader, LineBuffer, dot_stuff, normalize_line_endings
from .replies import Reply, ReplyParser
from .server import ServerConnection, State

__all__ = [
    "AddressError",
    "DotReader",
    "LineBuffer",
    "LocalProtocolError",
    "Mailbox",
    "ProtocolError",
    "RemoteProtocolError",
    "Reply",
    "ReplyParser",
    "ServerConnection",
    "State",
    "dot_stuff",
    "events",
    "normalize_line_endings",
    "parse_path",
]
