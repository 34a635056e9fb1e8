"""The root nursery: open the spool, start every listener, run until a signal says stop.

Each service is `async def serve_x(..., *, task_status)` started with `await nursery.start(...)`, so
"ready" means every listener is bound and the spool is open (DESIGN rule 2).

Signals: SIGTERM or SIGINT drains (`hedwigpy.lifecycle`): stop accepting, let what is in flight finish
within `[server].drain_timeout`, cancel the rest, exit 0; a second SIGTERM/SIGINT cancels at once.
SIGHUP reloads hedwig.toml (`hedwigpy.reload`); a file that does not load is refused and the running
config stays.
"""

from __future__ import annotations

import signal
import ssl
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial

import structlog
import trio

from .api import serve_http
from .config import Config, ConfigError, ListenerConfig, load_config
from .config_check import check_files
from .dkim import DkimKeyError, Signer
from .events import EventBus
from .lifecycle import Drain
from .metrics import MetricsCollector, Sources
from .net.smtp_listener import ConnectionLimits, ListenerSetup, serve_smtp
from .net.tls import server_context
from .policy import RateLimiter
from .receiver import ReceiverContext
from .reload import effective, restart_needed
from .sd_notify import notify, serve_watchdog
from .storage import FilesystemStorage, Storage
from .submit import Submitter
from .webhooks import DIRECTORY as WEBHOOKS_DIR
from .webhooks import WebhookService
from .worker.delivery import Deliverer
from .worker.mx import MxResolver
from .worker.pool import ConnectionPool
from .worker.routes import RouteError, Router
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
    deliverer: Deliverer
    scheduler: Scheduler
    submitter: Submitter
    events: EventBus
    drain: Drain
    ready: trio.Event = field(default_factory=trio.Event)
    metrics: MetricsCollector = field(init=False)
    _setups: dict[str, ListenerSetup] = field(default_factory=dict)  # by listener name, swapped on reload
    _reloads: list[Callable[[Config], None]] = field(default_factory=list)  # the HTTP API's
    _grace: trio.CancelScope = field(default_factory=trio.CancelScope)  # gets its deadline on drain
    _core_done: trio.Event = field(default_factory=trio.Event)  # SMTP and the queue worker have stopped

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
        drain = Drain()
        scheduler = Scheduler(storage, deliverer, config, events=events)
        return cls(
            config=config,
            storage=storage,
            limits=ConnectionLimits(config.limits.max_connections, config.limits.max_connections_per_ip),
            client_rate=RateLimiter(config.rate_limits.per_client),
            pool=pool,
            deliverer=deliverer,
            scheduler=scheduler,
            submitter=Submitter(
                config,
                storage,
                deliverer,
                scheduler,
                events=events,
                drain=drain,
                signer=Signer.from_config(config.dkim),
            ),
            events=events,
            drain=drain,
        )

    def is_ready(self) -> bool:
        """/readyz: started and not draining."""
        return self.ready.is_set() and not self.drain.draining

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run every service until the drain is over. Three rings: background services (metrics,
        webhooks, the outbound pool) outlive the HTTP API, which outlives SMTP and the queue worker, so
        /readyz can say 503 while those drain, and in-flight deliveries keep their pooled sessions."""
        cfg = self.config
        await self.storage.open()
        try:
            async with trio.open_nursery() as background:
                await background.start(self.metrics.serve, self.events)  # before anything publishes
                webhooks = WebhookService(cfg.webhooks, cfg.server.spool_dir / WEBHOOKS_DIR, self.events)
                await background.start(webhooks.serve)  # subscribed before anything publishes
                await background.start(self.pool.serve)
                with self._grace:
                    async with trio.open_nursery() as front:
                        async with trio.open_nursery() as core:
                            await self._start_core(core, front)
                            self.ready.set()
                            log.info(
                                "ready",
                                listeners=[lst.name for lst in cfg.listeners],
                                spool=str(cfg.server.spool_dir),
                            )
                            # systemd (Type=notify): every listener is bound and the spool is open.
                            smtp = ", ".join(str(lst.addr) for lst in cfg.listeners)
                            notify("READY=1", f"STATUS=Accepting mail: SMTP {smtp}, HTTP {cfg.http.addr}")
                            background.start_soon(serve_watchdog)
                            task_status.started()
                            await self.drain.wait()
                            grace = self.config.server.drain_timeout
                            self._grace.deadline = trio.current_time() + grace
                            log.info("draining", drain_timeout=grace)
                        self._core_done.set()  # the HTTP API may stop now
                if self._grace.cancelled_caught:
                    log.warning("drain timeout: unfinished work was cancelled")
                background.cancel_scope.cancel()
        finally:
            await self.storage.close()
        log.info("stopped")

    async def _start_core(self, core: trio.Nursery, front: trio.Nursery) -> None:
        cfg = self.config
        users = _users(cfg)
        for listener in cfg.listeners:
            setup = ListenerSetup(self._receiver_context(cfg, listener, users), _ssl_context(listener))
            self._setups[listener.name] = setup
            await core.start(serve_smtp, setup, self.limits, self.drain)
        await core.start(self.scheduler.serve, self.drain)
        http = partial(
            serve_http,
            storage=self.storage,
            submit=self.submitter.submit,
            client_rate=self.client_rate,
            events=self.events,
            metrics=self.metrics,
            shutdown=self._http_shutdown,
            reloads=self._reloads,
        )
        await front.start(http, cfg, self.scheduler, self.is_ready)

    async def _http_shutdown(self) -> float:
        """The HTTP API stops once SMTP and the queue worker have; in-flight requests get the rest of
        the grace period."""
        await self._core_done.wait()
        return max(self._grace.deadline - trio.current_time(), 0.0)

    def _receiver_context(
        self, cfg: Config, listener: ListenerConfig, users: dict[str, str]
    ) -> ReceiverContext:
        return ReceiverContext(
            config=cfg,
            listener=listener,
            storage=self.storage,
            client_rate=self.client_rate,
            users=users,
            tls_available=listener.tls == "starttls",
            submit=self.submitter.submit,
        )

    def stop(self) -> None:
        """Start draining (SIGTERM); a second call cancels whatever is still running."""
        if self.drain.draining:
            log.warning("stopping now: cancelling what is still in flight")
            self._grace.cancel()
            return
        notify("STOPPING=1")
        self.drain.start()

    async def reload(self) -> None:
        """Re-read the config file (SIGHUP). On any error, log it and keep running as before; else swap
        in the new config for new SMTP sessions, new HTTP requests and delivery attempts from now on."""
        path = self.config.source_path
        if path is None:
            log.error("reload refused: the config was not read from a file")
            return
        try:
            loaded = await trio.to_thread.run_sync(load_config, path)
        except ConfigError as exc:
            log.error("reload refused; keeping the running config", config=str(path), errors=exc.errors)
            return
        problems = await trio.to_thread.run_sync(check_files, loaded)  # what `config check` finds
        restart = restart_needed(self.config, loaded)
        new = effective(self.config, loaded)
        if not problems:
            try:  # build everything that can still fail before anything is swapped
                router = Router(new.routes)
                contexts = {lst.name: _ssl_context(lst) for lst in new.listeners}
                signer = Signer.from_config(new.dkim)  # a key that no longer loads refuses the reload
            except DkimKeyError as exc:
                problems.extend(exc.problems)
            except (RouteError, ssl.SSLError, OSError, ValueError) as exc:
                problems.append(str(exc))
        if problems:
            log.error("reload refused; keeping the running config", config=str(path), errors=problems)
            return
        self._apply(new, router, contexts, signer)
        log.info("reloaded", config=str(path), routes=len(new.routes), users=len(new.users))
        if restart:
            log.warning("reload: these keys need a restart and keep their old values", keys=restart)

    def _apply(
        self, new: Config, router: Router, contexts: dict[str, ssl.SSLContext | None], signer: Signer
    ) -> None:
        """Swap in a validated config. No await: nothing sees half of the old and half of the new."""
        self.config = new
        users = _users(new)
        for listener in new.listeners:
            setup = self._setups[listener.name]
            setup.ctx = self._receiver_context(new, listener, users)
            setup.ssl_context = contexts[listener.name]
        self.limits.max_total = new.limits.max_connections
        self.limits.max_per_ip = new.limits.max_connections_per_ip
        self.client_rate.limit = new.rate_limits.per_client
        if isinstance(self.storage, FilesystemStorage):
            self.storage.reserve_bytes = new.limits.queue_minfree
        self.deliverer.reconfigure(new, router)
        self.scheduler.reconfigure(new)
        self.submitter.reconfigure(new)
        self.submitter.signer = signer
        for apply in self._reloads:
            apply(new)


def _users(config: Config) -> dict[str, str]:
    return {u.name: u.password_hash for u in config.users}


def _ssl_context(listener: ListenerConfig) -> ssl.SSLContext | None:
    if listener.tls == "none":
        return None
    assert listener.cert is not None and listener.key is not None
    return server_context(listener.cert, listener.key)


async def run(config: Config) -> None:
    """Run the daemon until it has drained after SIGTERM or SIGINT; SIGHUP reloads the config."""
    daemon = Daemon.from_config(config)
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
        async with trio.open_nursery() as nursery:

            async def serve(*, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
                await daemon.serve(task_status=task_status)
                nursery.cancel_scope.cancel()  # drained: stop waiting for signals

            await nursery.start(serve)
            async for signum in signals:
                if signum == signal.SIGHUP:
                    log.info("reloading", signal="SIGHUP")
                    await daemon.reload()
                    continue
                log.info("stopping", signal=signal.Signals(signum).name)
                daemon.stop()
