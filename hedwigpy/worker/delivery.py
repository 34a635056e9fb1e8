"""Delivery: one attempt to hand a message to the next hop, with a result for every recipient.

The queue worker and (later) the cut-through path call the same `Deliverer.deliver`. Recipients are grouped
into transactions: per (route, recipient domain) for MX delivery, per route for a relay (a smarthost takes
every domain in one transaction). Groups go out concurrently. Within a group the hosts are tried in order
— MX preference, or the route's strategy — moving on when a connection cannot be set up (refused, timed
out, banner or EHLO refused, 421, TLS failure); once a host answers the transaction, its replies decide.
"""

from __future__ import annotations

import math
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, replace

import structlog
import trio

from ..config import Config
from ..net.smtp_client import Outgoing, SessionFailure, SessionOptions, TransactionReplies, host_label
from ..net.tls import client_context
from ..policy import RateLimiter
from ..smtp.errors import LocalProtocolError
from ..smtp.replies import Reply
from ..storage import Storage, StoredMessage
from .mx import DnsFailure, MxResolver
from .pool import ConnectionPool, PoolKey
from .results import Result, TransientFailure, result_for
from .routes import Route, Router, StrategyFailed, domain_of

log = structlog.get_logger("hedwigpy.delivery")

# Postfix's smtp_mx_address_limit: addresses tried per attempt, so a domain with many dead MX hosts
# cannot hold a delivery slot for hours of connect timeouts.
MAX_ADDRESSES_PER_ATTEMPT = 5
STALE_RETRIES = 2


@dataclass(frozen=True, slots=True)
class _Target:
    name: str
    address: str
    port: int
    options: SessionOptions


class Deliverer:
    """Everything delivery needs, built once per daemon."""

    def __init__(
        self,
        config: Config,
        storage: Storage,
        resolver: MxResolver,
        pool: ConnectionPool,
        router: Router,
        *,
        rate_limiter: RateLimiter | None = None,
    ) -> None:
        self._config = config
        self._storage = storage
        self._resolver = resolver
        self._pool = pool
        self._router = router
        limits = config.rate_limits
        self._rate = rate_limiter or RateLimiter(limits.per_domain, overrides=dict(limits.domains))
        # One context each, so pooled sessions with equal options compare equal.
        self._mx_tls = client_context(verify=False)
        self._relay_tls = client_context(verify=True)

    def reconfigure(self, config: Config, router: Router) -> None:
        """A reloaded config: attempts starting from now on use its routes, delivery settings and rate
        limits (the counts so far are kept). Attempts under way finish with what they started with."""
        self._config = config
        self._router = router
        self._rate.limit = config.rate_limits.per_domain
        self._rate.overrides = dict(config.rate_limits.domains)

    async def deliver(
        self,
        message: StoredMessage,
        recipients: Sequence[str],
        *,
        content: Callable[[], AsyncIterator[bytes]] | None = None,
        deadline: float | None = None,
    ) -> list[Result]:
        """Try every recipient once; results come back in the order of `recipients`.

        `content` reads the message when it is not (yet) in the spool: cut-through delivers from the
        writer. At `deadline` (trio time) groups still waiting for an answer give up with a transient
        451 4.4.2; the upstream may or may not have taken those.
        """
        groups: dict[tuple[int, str], tuple[Route, list[str]]] = {}
        for rcpt in dict.fromkeys(recipients):
            route = self._router.route(message.envelope, rcpt)
            domain = domain_of(rcpt) if route.config.transport == "mx" else ""
            groups.setdefault((route.index, domain), (route, []))[1].append(rcpt)
        by_recipient: dict[str, Result] = {}

        async def one(route: Route, domain: str, rcpts: list[str]) -> None:
            with trio.move_on_at(math.inf if deadline is None else deadline):
                for result in await self._deliver_group(message, route, domain, rcpts, content):
                    by_recipient[result.recipient] = result
                return
            reply = Reply(451, "4.4.2", "no answer from the upstream within the time allowed")
            for rcpt in rcpts:
                by_recipient[rcpt] = TransientFailure(rcpt, reply, "")

        async with trio.open_nursery() as nursery:
            for (_, domain), (route, rcpts) in groups.items():
                nursery.start_soon(one, route, domain, rcpts)
        return [by_recipient[r] for r in dict.fromkeys(recipients)]

    async def _deliver_group(
        self,
        message: StoredMessage,
        route: Route,
        domain: str,
        rcpts: list[str],
        content: Callable[[], AsyncIterator[bytes]] | None = None,
    ) -> list[Result]:
        rcpts, limited = self._apply_rate_limits(rcpts)
        if not rcpts:
            return limited
        try:
            targets = await self._targets(message, route, domain)
        except DnsFailure as exc:
            return limited + [result_for(r, exc.reply, "") for r in rcpts]
        except StrategyFailed as exc:
            reply = Reply(451, "4.3.5", str(exc))
            return limited + [TransientFailure(r, reply, "") for r in rcpts]
        env = message.envelope
        outgoing = Outgoing(
            sender=env.sender,
            recipients=rcpts,
            size=message.size,
            body_type=env.body_type,
            smtputf8=env.smtputf8,
            content=content or (lambda: self._storage.read_content(message.id)),
        )
        decided = limited
        failure: SessionFailure | None = None
        for target in targets:
            try:
                replies = await self._send(target, replace(outgoing, recipients=rcpts))
            except SessionFailure as exc:
                log.info("host failed", id=message.id, host=exc.host, reply=str(exc.reply))
                # RCPT refusals that came before the session broke are that host's final word on them.
                decided = decided + [result_for(r, reply, exc.host) for r, reply in exc.refused.items()]
                rcpts = [r for r in rcpts if r not in exc.refused]
                failure = exc
                if exc.after_data or not rcpts:  # the upstream may have it: no other host now
                    break
                continue
            return decided + _results(rcpts, replies, target)
        assert failure is not None, "targets is never empty"
        return decided + [TransientFailure(r, failure.reply, failure.host) for r in rcpts]

    def _apply_rate_limits(self, rcpts: list[str]) -> tuple[list[str], list[Result]]:
        """Recipients whose domain is over its outbound rate are rescheduled, not attempted."""
        allowed: list[str] = []
        limited: list[Result] = []
        verdicts: dict[str, float] = {}  # domain -> 0 if allowed, else seconds to wait
        for rcpt in rcpts:
            domain = domain_of(rcpt)
            if domain not in verdicts:
                verdicts[domain] = 0.0 if self._rate.allow(domain) else max(self._rate.wait_time(domain), 1.0)
            wait = verdicts[domain]
            if not wait:
                allowed.append(rcpt)
                continue
            reply = Reply(451, "4.4.5", f"outbound rate limit for {domain} reached; rescheduled")
            limited.append(TransientFailure(rcpt, reply, "", not_before=time.time() + wait))
        return allowed, limited

    async def _targets(self, message: StoredMessage, route: Route, domain: str) -> list[_Target]:
        """The addresses to try, in order (at most MAX_ADDRESSES_PER_ATTEMPT). Raises DnsFailure."""
        delivery = self._config.delivery
        helo = self._config.effective_helo
        targets: list[_Target] = []
        if route.config.transport == "mx":
            options = SessionOptions(
                helo=helo,
                tls=route.config.tls or delivery.tls,
                tls_context=self._mx_tls,
                connect_timeout=delivery.connect_timeout,
            )
            for host in await self._resolver.resolve(domain):
                targets += [_Target(host.name, a, delivery.port, options) for a in host.addresses]
        else:
            cfg = route.config
            auth = (
                (cfg.username, cfg.password)
                if cfg.username is not None and cfg.password is not None
                else None
            )
            last_dns: DnsFailure | None = None
            for hostport in self._router.relay_hosts(route, message.envelope):
                try:
                    host = await self._resolver.resolve_host(hostport.host)
                except DnsFailure as exc:  # one smarthost's name not resolving is no reason to skip the rest
                    last_dns = exc
                    continue
                options = SessionOptions(
                    helo=helo,
                    tls=cfg.tls or delivery.tls,
                    tls_context=self._relay_tls,
                    server_name=hostport.host,
                    auth=auth,
                    connect_timeout=delivery.connect_timeout,
                )
                targets += [_Target(hostport.host, a, hostport.port, options) for a in host.addresses]
            if not targets:
                # Smarthosts that do not resolve are the operator's to fix: defer, as Postfix does for a
                # "relayhost configuration problem", instead of bouncing everything with a 5xx.
                reason = f": {last_dns.reply.text}" if last_dns is not None else ""
                raise DnsFailure(Reply(451, "4.3.5", f"{route.name}: no smarthost to relay to{reason}"))
        return targets[:MAX_ADDRESSES_PER_ATTEMPT]

    async def _send(self, target: _Target, outgoing: Outgoing) -> TransactionReplies:
        """One transaction through the pool. A pooled session that the upstream closed while it idled
        (only a reused one is ever `stale`) is replaced; a few times, as several may have idled out."""
        key = PoolKey(target.name, target.address, target.port, target.options)
        try:
            for _ in range(STALE_RETRIES):
                try:
                    async with self._pool.session(key) as session:
                        return await session.send(outgoing)
                except SessionFailure as exc:
                    if not exc.stale:
                        raise
            async with self._pool.session(key) as session:
                return await session.send(outgoing)
        except LocalProtocolError as exc:  # our side could not express something: never fatal to the daemon
            log.error("client protocol error", host=target.name, error=str(exc))
            label = host_label(target.name, target.address, target.port)
            raise SessionFailure(
                Reply(451, "4.3.0", f"internal error talking to {label}: {exc}"), label
            ) from exc


def _results(rcpts: list[str], replies: TransactionReplies, target: _Target) -> list[Result]:
    """Per-recipient results: MAIL refused decides for all, else each RCPT refusal, else the final reply."""
    host = host_label(target.name, target.address, target.port)
    if not replies.mail.is_positive:
        return [result_for(r, replies.mail, host) for r in rcpts]
    results: list[Result] = []
    for rcpt, rcpt_reply in zip(rcpts, replies.rcpt, strict=True):
        final = replies.data if rcpt_reply.is_positive else rcpt_reply
        assert final is not None, "an accepted recipient always has a final reply"
        results.append(result_for(rcpt, final, host))
    return results
