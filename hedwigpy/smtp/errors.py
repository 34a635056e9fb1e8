"""Protocol errors, h11-style: `Local` when our caller misuses the state machine, `Remote` when the peer
breaks the protocol in a way that cannot be answered with a reply (the connection must close)."""


class ProtocolError(Exception):
    """Base of the protocol errors."""


class LocalProtocolError(ProtocolError):
    """Our own code did something illegal, e.g. replied when no command was waiting for a reply."""


class RemoteProtocolError(ProtocolError):
    """The peer sent something unrecoverable (garbled reply, reply line without end)."""
