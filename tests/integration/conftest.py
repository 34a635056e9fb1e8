from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import trustme

from tests.dns_server import DnsServer

from .daemon import Daemon, base_config
from .upstream import UpstreamPool


@pytest.fixture
def daemon_factory(tmp_path: Path) -> Iterator[type[Daemon]]:
    started: list[Daemon] = []

    class _Factory(Daemon):
        def start(self, timeout: float = 20.0) -> None:
            started.append(self)
            super().start(timeout)

    yield _Factory
    for d in started:
        d.kill()


@pytest.fixture
def config(tmp_path: Path) -> dict[str, object]:
    return base_config(tmp_path)


@pytest.fixture
def daemon(tmp_path: Path, config: dict[str, object], daemon_factory: type[Daemon]) -> Daemon:
    d = daemon_factory(tmp_path, config)
    d.start()
    return d


@pytest.fixture(scope="session")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def certfiles(ca: trustme.CA, tmp_path: Path) -> tuple[Path, Path]:
    cert = ca.issue_cert("localhost", "127.0.0.1", "mx.test.example")
    cert_path, key_path = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert.private_key_and_cert_chain_pem.write_to_path(str(cert_path))
    cert.private_key_pem.write_to_path(str(key_path))
    return cert_path, key_path


# ---- outbound delivery (test_delivery.py, test_routes.py) ------------------------------------------------


@pytest.fixture
def dns() -> Iterator[DnsServer]:
    """A loopback DNS server for the daemon's `[dns].nameservers` (see outbound.configure)."""
    with DnsServer() as server:
        yield server


@pytest.fixture
def upstreams() -> Iterator[UpstreamPool]:
    """Test upstream servers on 127.0.0.N sharing one port; add them, then `start()` the pool."""
    pool = UpstreamPool()
    yield pool
    pool.stop()
