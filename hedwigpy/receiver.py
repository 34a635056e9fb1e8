"""`Receiver`: the policy half of an inbound SMTP connection. It answers each protocol event with a
`Reply` — who may relay, which filters apply, limits, AUTH — and drives `IncomingMessage` into the
spool. The protocol state machine (`smtp.ServerConnection`) and the socket loop live elsewhere."""

from __future__ import annotations

import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import structlog
import trio

from . import auth
from .config import Config, ListenerConfig
from .inbound import IncomingMessage, received_header
from .policy import (
    IPAddress,
    RateLimiter,
    domain_matches,
    filter_allows,
    has_routing_syntax,
    in_networks,
    is_loopback,
)
from .smtp import Mailbox, Reply
from .smtp import events as ev
from .storage import Envelope, InsufficientSpace, Storage, StorageError, new_message_id
from .submit import SubmitFn, Submitted

log = structlog.get_logger("hedwigpy.smtp")


@dataclass
class ReceiverContext:
    """What every connection of one listener shares."""

    config: Config
    listener: ListenerConfig
    storage: Storage
    client_rate: RateLimiter
    submit: SubmitFn  # cut-through or spool
    users: dict[str, str] = field(default_factory=dict)  # name -> password hash
    tls_available: bool = False

    @property
    def hostname(self) -> str:
        return self.config.server.hostname


@dataclass
class _Transaction:
    sender: Mailbox
    body: str
    smtputf8: bool
    message_id: str
    recipients: list[str] = field(default_factory=list)
    message: IncomingMessage | None = None


class Receiver:
    """Answers the events of one SMTP connection."""

    def __init__(self, ctx: ReceiverContext, client_ip: IPAddress | None, client_addr: str, *, tls: bool):
        self.ctx = ctx
        self.client_ip = client_ip
        self.client_addr = client_addr
        self.tls_active = tls
        self.helo = ""
        self.extended = False
        self.user: str | None = None
        self.errors = 0
        self._txn: _Transaction | None = None
        self._auth_mechanism: str | None = None
        self._auth_username: str | None = None
        self._trusted = in_networks(client_ip, ctx.listener.trusted_networks)

    @property
    def may_relay(self) -> bool:
        return self._trusted or self.user is not None

    @property
    def in_transaction(self) -> bool:
        """Between MAIL and the reply to the end of its data (or RSET): what a drain lets finish."""
        return self._txn is not None

    @property
    def auth_offered(self) -> bool:
        return bool(self.ctx.users) and (self.tls_active or is_loopback(self.client_ip))

    def greeting(self, talked_early: bool) -> Reply:
        if talked_early:
            log.warning("client talked before the greeting", client=self.client_addr)
            return Reply(554, "5.5.0", "SMTP protocol synchronization error (input sent before greeting)")
        return Reply(220, "", f"{self.ctx.hostname} ESMTP hedwigpy")

    def count(self, reply: Reply) -> bool:
        """Count an error reply; True when the client has now made too many (→ 421 and close)."""
        if reply.code >= 400:
            self.errors += 1
        return self.errors >= self.ctx.config.limits.max_errors

    async def handle(self, event: ev.Event) -> Reply | None:
        """The reply to `event`, or None for events that take none."""
        if isinstance(event, ev.MessageData):
            if self._txn is not None and self._txn.message is not None:
                await self._txn.message.write(event.data)
            return None
        if isinstance(event, ev.BdatCommand):
            if self._txn is not None and self._txn.message is None:
                self._start_message(self._txn)
            return None
        handler = _HANDLERS.get(type(event))
        if handler is None:
            return None
        return await handler(self, event)

    async def close(self) -> None:
        """The connection is going away: drop any half-received message."""
        await self._abort()

    # -- commands ------------------------------------------------------------------------------------

    async def _hello(self, event: ev.Hello) -> Reply:
        await self._abort()
        self.helo, self.extended = event.name, event.extended
        if not event.extended:
            return Reply(250, "", self.ctx.hostname)
        lines = [
            f"{self.ctx.hostname} greets {event.name}",
            "PIPELINING",
            f"SIZE {self.ctx.config.limits.max_message_size}",
            "8BITMIME",
            "SMTPUTF8",
            "ENHANCEDSTATUSCODES",
        ]
        if self.ctx.tls_available and not self.tls_active:
            lines.append("STARTTLS")
        if self.auth_offered and self.user is None:
            lines.append("AUTH PLAIN LOGIN")
        lines.append("CHUNKING")
        return Reply(250, "", "\n".join(lines))

    async def _mail(self, event: ev.MailFrom) -> Reply:
        cfg = self.ctx.config
        if self.ctx.listener.require_auth and self.user is None:
            return Reply(530, "5.7.0", "Authentication required")
        if event.size is not None and event.size > cfg.limits.max_message_size:
            return Reply(552, "5.3.4", "Message size exceeds fixed maximum message size")
        try:
            self.ctx.storage.check_space(math.ceil(cfg.limits.max_message_size * 1.5))
        except InsufficientSpace:
            return Reply(452, "4.3.1", "Insufficient system storage")
        if not event.sender.is_null and not filter_allows(event.sender.domain, "sender_domain", cfg.filters):
            return Reply(550, "5.7.1", f"<{event.sender}>: Sender address rejected: domain not allowed")
        if not self.ctx.client_rate.allow(self.user or str(self.client_ip)):
            return Reply(450, "4.7.1", "Error: too much mail from this client, try again later")
        self._txn = _Transaction(event.sender, event.body, event.smtputf8, new_message_id())
        return Reply(250, "2.1.0", "Ok")

    async def _rcpt(self, event: ev.RcptTo) -> Reply:
        txn = self._txn
        assert txn is not None
        cfg = self.ctx.config
        rcpt = event.recipient
        if len(txn.recipients) >= cfg.limits.max_recipients:
            return Reply(452, "4.5.3", "Error: too many recipients")
        local_domains = self.ctx.listener.local_domains
        if not rcpt.domain:  # <postmaster> (RFC 5321 4.5.1) is ours to accept
            if not local_domains:
                return Reply(550, "5.1.1", "<postmaster>: no local postmaster here")
            rcpt = Mailbox("postmaster", local_domains[0])
        is_local = not rcpt.is_literal and domain_matches(rcpt.domain, local_domains)
        if not self.may_relay:
            if not is_local:
                return Reply(554, "5.7.1", f"<{rcpt}>: Relay access denied")
            if has_routing_syntax(rcpt):
                return Reply(554, "5.7.1", f"<{rcpt}>: Relay access denied (routing syntax in local part)")
        if not rcpt.is_literal and not filter_allows(rcpt.domain, "recipient_domain", cfg.filters):
            return Reply(550, "5.7.1", f"<{rcpt}>: Recipient address rejected: domain not allowed")
        txn.recipients.append(str(rcpt))
        return Reply(250, "2.1.5", "Ok")

    async def _data(self, event: ev.DataCommand) -> Reply:
        assert self._txn is not None
        self._start_message(self._txn)
        return Reply(354, "", "End data with <CR><LF>.<CR><LF>")

    def _start_message(self, txn: _Transaction) -> None:
        cfg = self.ctx.config
        envelope = Envelope(
            sender=str(txn.sender),
            recipients=tuple(txn.recipients),
            body_type=txn.body,
            smtputf8=txn.smtputf8,
            received_at=time.time(),
            client_addr=self.client_addr,
            helo=self.helo,
            listener=self.ctx.listener.name,
            auth_user=self.user,
        )
        protocol = ("ESMTP" if self.extended else "SMTP") + ("S" if self.tls_active else "")
        if self.user is not None:
            protocol += "A"
        trace = received_header(
            helo=self.helo,
            client_ip=str(self.client_ip),
            hostname=self.ctx.hostname,
            protocol=protocol,
            message_id=txn.message_id,
            recipients=txn.recipients,
        )
        writer = self.ctx.storage.writer(envelope, txn.message_id)
        txn.message = IncomingMessage(
            writer,
            trace=trace,
            max_size=cfg.limits.max_message_size,
            max_hops=cfg.limits.max_hops,
            hostname=self.ctx.hostname,
        )

    async def _message_end(self, event: ev.MessageEnd | ev.ChunkEnd) -> Reply:
        txn = self._txn
        if isinstance(event, ev.ChunkEnd) and not event.last:
            assert txn is not None and txn.message is not None
            if txn.message.too_big or txn.message.failure is not None:
                reply = txn.message.verdict(False)
                assert reply is not None
                await self._abort()
                return reply
            return Reply(250, "2.0.0", f"{event.size} octets received")
        self._txn = None
        assert txn is not None and txn.message is not None
        message = txn.message
        await message.finish()
        reply = message.verdict(event.line_too_long)
        if reply is not None:
            await message.abort()
            log.info("rejected", id=txn.message_id, reply=str(reply), client=self.client_addr)
            return reply
        submitted: Submitted | None = None
        try:
            submitted = await self.ctx.submit(
                message.writer, message.stored_size, self.ctx.listener.role, sign=self.may_relay
            )
        except InsufficientSpace:
            return Reply(452, "4.3.1", "Insufficient system storage")
        except StorageError as exc:
            log.error("spool write failed", id=txn.message_id, error=str(exc))
            return Reply(451, "4.3.0", "Error: queue file write error")
        finally:
            if submitted is None:  # refused, failed, or cancelled (a drain's end): keep nothing in tmp/
                with trio.CancelScope(shield=True):
                    await message.abort()
        if submitted.reply.is_positive:
            self.errors = 0  # Postfix counts errors "without delivering mail"
        log.info(
            "received",
            id=submitted.message_id,
            sender=str(txn.sender),
            recipients=len(txn.recipients),
            size=message.stored_size,
            client=self.client_addr,
            listener=self.ctx.listener.name,
            path=submitted.path,
            reply=str(submitted.reply),
        )
        return submitted.reply

    async def _reset(self, event: ev.Reset) -> Reply:
        await self._abort()
        return Reply(250, "2.0.0", "Ok")

    async def _abort(self) -> None:
        txn, self._txn = self._txn, None
        if txn is not None and txn.message is not None:
            await txn.message.abort()

    async def _starttls(self, event: ev.StartTls) -> Reply:
        if self.tls_active:
            return Reply(503, "5.5.1", "TLS already active")
        if not self.ctx.tls_available:
            return Reply(502, "5.5.1", "STARTTLS not available")
        await self._abort()
        return Reply(220, "2.0.0", "Ready to start TLS")

    # -- AUTH ----------------------------------------------------------------------------------------

    async def _auth_start(self, event: ev.AuthStart) -> Reply:
        if not self.ctx.users:
            return Reply(502, "5.5.1", "AUTH not available")
        if not self.auth_offered:
            return Reply(538, "5.7.11", "Encryption required for requested authentication mechanism")
        self._auth_mechanism = event.mechanism
        self._auth_username = None
        if event.mechanism == "PLAIN":
            if event.initial is None:
                return Reply(334, "", "")
            return await self._auth_plain(event.initial)
        if event.mechanism == "LOGIN":
            if event.initial is None:
                return Reply(334, "", auth.LOGIN_USERNAME)
            return self._login_username(event.initial)
        self._auth_mechanism = None
        return Reply(504, "5.5.4", "Unrecognized authentication type")

    async def _auth_response(self, event: ev.AuthResponse) -> Reply:
        if event.cancelled:
            self._auth_mechanism = None
            return Reply(501, "5.7.0", "Authentication cancelled")
        if self._auth_mechanism == "PLAIN":
            return await self._auth_plain(event.data)
        if self._auth_username is None:
            return self._login_username(event.data)
        try:
            password = auth.decode_text(event.data)
        except auth.SaslError as exc:
            return Reply(501, "5.5.2", str(exc))
        return await self._check_password(self._auth_username, password)

    def _login_username(self, data: str) -> Reply:
        try:
            self._auth_username = auth.decode_text(data)
        except auth.SaslError as exc:
            return Reply(501, "5.5.2", str(exc))
        return Reply(334, "", auth.LOGIN_PASSWORD)

    async def _auth_plain(self, data: str) -> Reply:
        try:
            username, password = auth.parse_plain(data)
        except auth.SaslError as exc:
            return Reply(501, "5.5.2", str(exc))
        return await self._check_password(username, password)

    async def _check_password(self, username: str, password: str) -> Reply:
        self._auth_mechanism = None
        stored = self.ctx.users.get(username)
        # Hash even for unknown users so timing does not reveal which names exist.
        ok = await trio.to_thread.run_sync(auth.verify_password, password, stored or _DUMMY_HASH)
        if ok and stored is not None:
            self.user = username
            log.info("authenticated", user=username, client=self.client_addr)
            return Reply(235, "2.7.0", "Authentication successful")
        log.warning("authentication failed", user=username[:64], client=self.client_addr)
        await trio.sleep(self.ctx.config.limits.auth_failure_delay)
        return Reply(535, "5.7.8", "Authentication credentials invalid")

    # -- small commands ------------------------------------------------------------------------------

    async def _noop(self, event: ev.Noop) -> Reply:
        return Reply(250, "2.0.0", "Ok")

    async def _vrfy(self, event: ev.Verify) -> Reply:
        return Reply(252, "2.0.0", "Cannot VRFY user, but will accept message and attempt delivery")

    async def _help(self, event: ev.Help) -> Reply:
        return Reply(
            214, "2.0.0", "Commands: EHLO HELO MAIL RCPT DATA BDAT RSET NOOP VRFY STARTTLS AUTH QUIT"
        )

    async def _quit(self, event: ev.Quit) -> Reply:
        await self._abort()
        return Reply(221, "2.0.0", "Bye")

    async def _command_error(self, event: ev.CommandError) -> Reply:
        return event.reply


_DUMMY_HASH = auth.hash_password("not a real password", ln=14)

_HANDLERS: dict[type[ev.Event], Callable[[Receiver, Any], Awaitable[Reply]]] = {
    ev.Hello: Receiver._hello,
    ev.MailFrom: Receiver._mail,
    ev.RcptTo: Receiver._rcpt,
    ev.DataCommand: Receiver._data,
    ev.MessageEnd: Receiver._message_end,
    ev.ChunkEnd: Receiver._message_end,
    ev.Reset: Receiver._reset,
    ev.StartTls: Receiver._starttls,
    ev.AuthStart: Receiver._auth_start,
    ev.AuthResponse: Receiver._auth_response,
    ev.Noop: Receiver._noop,
    ev.Verify: Receiver._vrfy,
    ev.Help: Receiver._help,
    ev.Quit: Receiver._quit,
    ev.CommandError: Receiver._command_error,
}
