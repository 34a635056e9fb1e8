"""`Idempotency-Key` on `POST /v1/messages` (INTERFACE.md: honoured for 24 h).

A client that did not see our answer (a timeout, a dropped connection) may send the same request again
with the same `Idempotency-Key` header; it gets the first answer back — the same status code and body —
and nothing is sent again, even across a daemon restart. Keys are per principal: the API key's name when
keys are configured, else the client's IP address, so two clients cannot see each other's answers.

Answers
    - a key seen before with the same body: the recorded answer, with `Idempotent-Replayed: true`
    - the same key while its first request is still being served: 409 "request in progress"
    - the same key with a different body (SHA-256 compared): 422
    - an empty key or one longer than `MAX_KEY_LENGTH` characters: 400
Only answers that accepted the message (200, 202) are recorded: after an error nothing was sent, so
sending the request again is safe and may succeed.

On disk: `<spool>/idempotency/<sha256(principal NUL key)>.json`, one JSON object
`{"version": 1, "principal", "request_sha256", "created" (unix time), "status", "body"}`, written to a
`.tmp` name, fsynced, renamed and the directory fsynced before the answer is returned — after a
cut-through 200 the upstream already has the message, so the record must survive a crash. Records older
than `TTL` are ignored when looked up and removed by a sweep at start and every `SWEEP_INTERVAL`.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog
import trio

from .._offload import run_sync
from ..storage._dirsync import fsync_dir, replace_file_sync
from ._request import FieldError, RequestProblem

log = structlog.get_logger("hedwigpy.http")

HEADER = "Idempotency-Key"
REPLAYED_HEADER = "Idempotent-Replayed"
DIRECTORY = "idempotency"  # under the spool directory
MAX_KEY_LENGTH = 255
TTL = 24 * 3600.0
SWEEP_INTERVAL = 3600.0
VERSION = 1
RECORDED = frozenset({200, 202})


@dataclass(slots=True)
class Claim:
    """One request's hold on its key. `answer` is the recorded (status, body) when this is a replay;
    `record()` keeps the answer of a request that was served."""

    store: IdempotencyStore | None
    name: str  # the record's file name stem; "" without a key
    principal: str
    request_sha256: str
    answer: tuple[int, Any] | None = None
    replayed: bool = False

    async def record(self, status: int, body: Any) -> None:
        self.answer = (status, body)
        if self.store is None or status not in RECORDED:
            return
        with trio.CancelScope(shield=True):  # the message went out: its record must be written
            await self.store.save(self, status, body)


class IdempotencyStore:
    """The recorded answers under `directory`, and the keys being served right now."""

    def __init__(self, directory: Path, *, ttl: float = TTL) -> None:
        self.directory = directory
        self.ttl = ttl
        self._in_flight: set[str] = set()

    async def open(self) -> None:
        await run_sync(self._open_sync)

    def _open_sync(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        self._sweep_sync()

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Open the directory (sweeping it), then sweep every `SWEEP_INTERVAL` until cancelled."""
        await self.open()
        task_status.started()
        while True:
            await trio.sleep(SWEEP_INTERVAL)
            await self.sweep()

    async def sweep(self) -> int:
        return await run_sync(self._sweep_sync)

    def _sweep_sync(self) -> int:
        """Remove expired records and leftover temporary files; the number removed."""
        removed = 0
        cutoff = time.time() - self.ttl
        try:
            entries = list(os.scandir(self.directory))
        except OSError as exc:
            log.warning("idempotency sweep failed", error=str(exc))
            return 0
        for entry in entries:
            try:
                stale = entry.name.endswith(".tmp") or entry.stat().st_mtime < cutoff
                if stale and entry.name.removesuffix(".tmp").removesuffix(".json") not in self._in_flight:
                    os.unlink(entry.path)
                    removed += 1
            except OSError:
                continue
        if removed:
            log.info("idempotency records expired", removed=removed)
        return removed

    @asynccontextmanager
    async def claim(self, key: str, principal: str, body: bytes) -> AsyncIterator[Claim]:
        """Hold `key` for `principal` while the request is served; raises RequestProblem 400, 409, 422."""
        if not key.strip() or len(key) > MAX_KEY_LENGTH:
            detail = f"must be 1 to {MAX_KEY_LENGTH} characters"
            raise RequestProblem(400, f"invalid {HEADER}: {detail}", [FieldError(HEADER, detail)])
        name = hashlib.sha256(f"{principal}\0{key}".encode()).hexdigest()
        digest = hashlib.sha256(body).hexdigest()
        if name in self._in_flight:
            raise RequestProblem(
                409,
                f"request in progress: a request with this {HEADER} is still being served; "
                "retry once it has been answered",
                [FieldError(HEADER, "request in progress")],
                headers={"Retry-After": "1"},
            )
        self._in_flight.add(name)
        try:
            claim = Claim(self, name, principal, digest)
            found = await run_sync(self._load_sync, name)
            if found is not None:
                if found.get("request_sha256") != digest:
                    detail = "was used with a different request body"
                    raise RequestProblem(
                        422, f"this {HEADER} {detail} in the last 24 hours", [FieldError(HEADER, detail)]
                    )
                claim.answer = (int(found["status"]), found["body"])
                claim.replayed = True
            yield claim
        finally:
            self._in_flight.discard(name)

    def _path(self, name: str) -> Path:
        return self.directory / f"{name}.json"

    def _load_sync(self, name: str) -> dict[str, Any] | None:
        path = self._path(name)
        try:
            data = json.loads(path.read_bytes())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:  # torn or unreadable: the request is served afresh
            log.warning("idempotency record unreadable", path=str(path), error=str(exc))
            return None
        if not isinstance(data, dict) or data.get("version") != VERSION:
            return None
        created = data.get("created")
        if not isinstance(created, int | float) or created < time.time() - self.ttl:
            return None
        return data

    async def save(self, claim: Claim, status: int, body: Any) -> None:
        record = {
            "version": VERSION,
            "principal": claim.principal,
            "request_sha256": claim.request_sha256,
            "created": time.time(),
            "status": status,
            "body": body,
        }
        data = json.dumps(record, ensure_ascii=False, separators=(",", ":")).encode()
        try:
            await run_sync(self._write_sync, claim.name, data)
        except OSError as exc:  # the answer stands; a retry with this key would send again
            log.error("idempotency record not written", error=str(exc))

    def _write_sync(self, name: str, data: bytes) -> None:
        final = self._path(name)
        replace_file_sync(final.with_suffix(".tmp"), final, data)
        fsync_dir(self.directory)


@asynccontextmanager
async def idempotent(
    store: IdempotencyStore | None, key: str | None, principal: str, body: bytes
) -> AsyncIterator[Claim]:
    """A claim on `key`; without a key (or a store) one that records nothing and never replays."""
    if key is None or store is None:
        yield Claim(None, "", principal, "")
        return
    async with store.claim(key, principal, body) as claim:
        yield claim
