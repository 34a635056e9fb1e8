"""Serving the admin API: hypercorn's trio worker inside the caller's nursery (DESIGN rule 2).

hypercorn's own logging is replaced by a logger that forwards to structlog: no banner on stdout, no
access log unless the level is debug, server errors as `error` events.
"""

from __future__ import annotations

import socket
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any

import structlog
import trio
from hypercorn.config import Config as HyperConfig
from hypercorn.logging import Logger as HyperLogger
from hypercorn.trio import serve
from hypercorn.typing import ResponseSummary, WWWScope
from quart_trio import QuartTrio

from ..config import Config, HostPort
from ..events import EventBus
from ..metrics import MetricsCollector
from ..policy import RateLimiter
from ..storage import Storage
from ..submit import SubmitFn
from ..worker.control import QueueControl
from ._auth import ApiAuth
from ._idempotency import DIRECTORY as IDEMPOTENCY_DIR
from ._idempotency import IdempotencyStore
from ._intake import MessageIntake
from .app import create_app

log = structlog.get_logger("hedwigpy.http")

BACKLOG = 100
GRACEFUL_TIMEOUT = 5.0  # seconds in-flight requests get once the server is cancelled


class StructlogLogger(HyperLogger):
    """hypercorn's logger interface, writing to structlog. Its chatter ("Running on ...") goes to debug."""

    def __init__(self, config: HyperConfig) -> None:  # no stdlib handlers: skip the base set-up
        self.access_log_format = config.access_log_format
        self.access_logger = None
        self.error_logger = None

    async def access(self, request: WWWScope, response: ResponseSummary, request_time: float) -> None:
        if response is None:  # the client left before an answer; nothing to report
            return
        client = request.get("client")
        log.debug(
            "http request",
            method=request.get("method", "GET"),
            path=request["path"],
            status=response["status"],
            ms=round(request_time * 1000, 1),
            client=None if client is None else client[0],
        )

    async def critical(self, message: str, *args: Any, **kwargs: Any) -> None:
        log.critical("hypercorn", message=_format(message, args), **_exc(kwargs))

    async def error(self, message: str, *args: Any, **kwargs: Any) -> None:
        log.error("hypercorn", message=_format(message, args), **_exc(kwargs))

    async def exception(self, message: str, *args: Any, **kwargs: Any) -> None:
        log.error("hypercorn", message=_format(message, args), exc_info=True)

    async def warning(self, message: str, *args: Any, **kwargs: Any) -> None:
        log.warning("hypercorn", message=_format(message, args))

    async def info(self, message: str, *args: Any, **kwargs: Any) -> None:
        log.debug("hypercorn", message=_format(message, args))

    async def debug(self, message: str, *args: Any, **kwargs: Any) -> None:
        log.debug("hypercorn", message=_format(message, args))

    async def log(self, level: int, message: str, *args: Any, **kwargs: Any) -> None:
        if level >= 40:
            await self.error(message, *args, **kwargs)
        elif level >= 30:
            await self.warning(message, *args, **kwargs)
        else:
            await self.debug(message, *args, **kwargs)


def _format(message: str, args: tuple[Any, ...]) -> str:
    try:
        return message % args if args else message
    except (TypeError, ValueError):
        return f"{message} {args!r}"


def _exc(kwargs: dict[str, Any]) -> dict[str, Any]:
    return {"exc_info": kwargs["exc_info"]} if kwargs.get("exc_info") else {}


def hypercorn_config(fd: int) -> HyperConfig:
    """hypercorn's settings for serving on the listening socket `fd` (which it takes over)."""
    hconfig = HyperConfig()
    hconfig.bind = [f"fd://{fd}"]
    hconfig.accesslog = None
    hconfig.errorlog = None
    hconfig.logger_class = StructlogLogger
    hconfig.include_server_header = False
    hconfig.graceful_timeout = GRACEFUL_TIMEOUT
    return hconfig


async def bind_socket(addr: HostPort) -> socket.socket:
    """A listening TCP socket on `addr`; raises OSError (address in use, not ours) before anything
    else starts, so the daemon fails with that error and not deep inside hypercorn."""
    infos = await trio.socket.getaddrinfo(
        addr.host or None, addr.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )
    family, type_, proto, _, sockaddr = infos[0]
    sock = socket.socket(family, type_, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(sockaddr)
        sock.listen(BACKLOG)
    except BaseException:
        sock.close()
        raise
    return sock


async def serve_http(
    config: Config,
    queue: QueueControl,
    ready: Callable[[], bool],
    *,
    storage: Storage | None = None,
    submit: SubmitFn | None = None,
    client_rate: RateLimiter | None = None,
    events: EventBus | None = None,
    metrics: MetricsCollector | None = None,
    shutdown: Callable[[], Awaitable[float]] | None = None,
    reloads: list[Callable[[Config], None]] | None = None,
    task_status: trio.TaskStatus[HostPort] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve the admin API on `[http].addr` until cancelled. Started once the socket listens, with the
    bound address (useful when the configured port is 0). With `storage` and `submit` (the daemon's
    `Submitter.submit`), `POST /v1/messages` accepts mail; `client_rate` is the per-client limit SMTP
    shares. With `events`, `WS /v1/events` streams them.

    `shutdown` returns when the server should stop accepting, with the seconds in-flight requests still
    get (hypercorn's graceful shutdown); then this returns. A function applying a reloaded config (API
    keys, limits, filters) is appended to `reloads`."""
    intake = None
    idempotency = IdempotencyStore(config.server.spool_dir / IDEMPOTENCY_DIR)
    if storage is not None and submit is not None:
        intake = MessageIntake(config, storage, submit, client_rate, idempotency)
    auth = ApiAuth(config.api_keys)
    stopping = trio.Event()  # the event streams close once set
    app = create_app(
        queue, ready, intake=intake, events=events, metrics=metrics, auth=auth, stopping=stopping.wait
    )
    if reloads is not None:
        reloads.append(partial(_reload, app, auth, intake))
    sock = await bind_socket(config.http.addr)
    host, port = sock.getsockname()[:2]
    bound = HostPort(host, port)
    hconfig = hypercorn_config(sock.detach())  # hypercorn owns the descriptor from here on

    async def trigger() -> None:
        assert shutdown is not None
        hconfig.graceful_timeout = await shutdown()  # hypercorn reads it once the trigger returns
        stopping.set()
        log.info("http stopping", graceful_timeout=round(hconfig.graceful_timeout, 1))

    async def run_server(*, task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED) -> None:
        stop = trigger if shutdown is not None else None
        await serve(app, hconfig, shutdown_trigger=stop, task_status=task_status)
        nursery.cancel_scope.cancel()  # stopped: the idempotency sweeper goes too

    async with trio.open_nursery() as nursery:
        if intake is not None:  # Idempotency-Key records: swept at start and hourly
            await nursery.start(idempotency.serve)
        await nursery.start(run_server)
        log.info("listening", service="http", addr=str(bound), api_keys=len(config.api_keys))
        task_status.started(bound)


def _reload(app: QuartTrio, auth: ApiAuth, intake: MessageIntake | None, config: Config) -> None:
    auth.reconfigure(config.api_keys)
    if intake is not None:
        intake.reconfigure(config)
        app.config["MAX_CONTENT_LENGTH"] = intake.max_body
