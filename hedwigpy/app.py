"""The root nursery: open the spool, start every listener, run until a signal says stop.

Each service is `async def serve_x(..., *, task_status)` started with `await nursery.start(...)`, so
"ready" means every listener is bound and the spool is open (DESIGN rule 2).
"""

from __future__ import annotations

import signal
import ssl
from dataclasses import dataclass, field
from functools import partial

import structlog
import trio

from .api import serve_http
from .config import Config
from .dkim import Signer
from .events import EventBus
from .metrics import MetricsCollector, Sources
from .net.smtp_listener import ConnectionLimits, serve_smtp
from .net.tls import server_context
from .policy import RateLimiter
from .receiver import ReceiverContext
from .storage import FilesystemStorage, Storage
from .submit import Submitter
from .webhooks import DIRECTORY as WEBHOOKS_DIR
from .webhooks import WebhookService
from .worker.delivery import Deliverer
from .worker.mx import MxResolver
from .worker.pool import ConnectionPool
from .worker.routes import Router
from .worker.scheduler import Scheduler

log = structlog.get_logger("hedwigpy")


@dataclass
class Daemon:
    """The running process's shared state; built from a `Config`."""

    config: Config
    storage: Storage
    limits: ConnectionLimits
    client_rate: RateLimiter
    pool: ConnectionPool
    scheduler: Scheduler
    submitter: Submitter
    events: EventBus
    ready: trio.Event = field(default_factory=trio.Event)
    metrics: MetricsCollector = field(init=False)

    def __post_init__(self) -> None:
        self.metrics = MetricsCollector(
            Sources(self.scheduler.stats, self.pool.statistics, lambda: self.limits.total)
        )

    @classmethod
    def from_config(cls, config: Config) -> Daemon:
        """Raises `RouteError` when a route's strategy does not load, `DkimKeyError` for a bad DKIM key."""
        storage = FilesystemStorage(config.server.spool_dir, reserve_bytes=config.limits.queue_minfree)
        delivery = config.delivery
        pool = ConnectionPool(
            max_per_host=delivery.max_connections_per_host,
            max_messages=delivery.max_messages_per_connection,
            idle_timeout=delivery.idle_timeout,
        )
        resolver = MxResolver([(ns.host, ns.port) for ns in config.dns.nameservers])
        deliverer = Deliverer(config, storage, resolver, pool, Router(config.routes))
        events = EventBus()
        scheduler = Scheduler(storage, deliverer, config, events=events)
        return cls(
            config=config,
            storage=storage,
            limits=ConnectionLimits(config.limits.max_connections, config.limits.max_connections_per_ip),
            client_rate=RateLimiter(config.rate_limits.per_client),
            pool=pool,
            scheduler=scheduler,
            submitter=Submitter(
                config, storage, deliverer, scheduler, events=events, signer=Signer.from_config(config.dkim)
            ),
            events=events,
        )

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        cfg = self.config
        await self.storage.open()
        users = {u.name: u.password_hash for u in cfg.users}
        try:
            async with trio.open_nursery() as nursery:
                await nursery.start(self.metrics.serve, self.events)  # before anything publishes
                webhooks = WebhookService(cfg.webhooks, cfg.server.spool_dir / WEBHOOKS_DIR, self.events)
                await nursery.start(webhooks.serve)  # subscribed before anything publishes
                for listener in cfg.listeners:
                    ssl_ctx: ssl.SSLContext | None = None
                    if listener.tls != "none":
                        assert listener.cert is not None and listener.key is not None
                        ssl_ctx = server_context(listener.cert, listener.key)
                    ctx = ReceiverContext(
                        config=cfg,
                        listener=listener,
                        storage=self.storage,
                        client_rate=self.client_rate,
                        users=users,
                        tls_available=listener.tls == "starttls",
                        submit=self.submitter.submit,
                    )
                    await nursery.start(serve_smtp, ctx, self.limits, ssl_ctx)
                await nursery.start(self.pool.serve)
                await nursery.start(self.scheduler.serve)
                http = partial(
                    serve_http,
                    storage=self.storage,
                    submit=self.submitter.submit,
                    client_rate=self.client_rate,
                    events=self.events,
                    metrics=self.metrics,
                )
                await nursery.start(http, cfg, self.scheduler, self.ready.is_set)
                self.ready.set()
                log.info(
                    "ready", listeners=[lst.name for lst in cfg.listeners], spool=str(cfg.server.spool_dir)
                )
                task_status.started()
        finally:
            await self.storage.close()


async def run(config: Config) -> None:
    """Run the daemon until SIGTERM or SIGINT; exit cleanly."""
    daemon = Daemon.from_config(config)
    async with trio.open_nursery() as nursery:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            await nursery.start(daemon.serve)
            async for signum in signals:
                log.info("stopping", signal=signal.Signals(signum).name)
                nursery.cancel_scope.cancel()
                break
