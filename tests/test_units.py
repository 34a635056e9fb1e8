"""The value parsers behind hedwig.toml: durations, sizes, host:port, domains, networks, host names."""

from __future__ import annotations

import ipaddress

import pytest

from hedwigpy._units import (
    HostPort,
    parse_domain,
    parse_duration,
    parse_hostname,
    parse_hostport,
    parse_network,
    parse_size,
)


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("30s", 30.0),
        ("5m", 300.0),
        ("4h", 14400.0),
        ("5d", 432000.0),
        ("1w", 604800.0),
        ("250ms", 0.25),
        ("1h30m", 5400.0),
        ("1h 30m", 5400.0),
        ("1m30s500ms", 90.5),
        ("1.5h", 5400.0),
        ("0s", 0.0),
        (" 5m ", 300.0),
        ("30", 30.0),
        ("0.5", 0.5),
        (30, 30.0),
        (1.5, 1.5),
        (0, 0.0),
    ],
)
def test_duration_forms(text: str | float, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)
    assert isinstance(parse_duration(text), float)


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("", "empty duration"),
        ("   ", "empty duration"),
        ("-5s", "must not be negative"),
        ("-5", "must not be negative"),
        (-1, "must be a finite number of seconds >= 0"),
        (float("inf"), "must be a finite number of seconds >= 0"),
        (float("nan"), "must be a finite number of seconds >= 0"),
        ("5x", "invalid duration '5x'"),
        ("s", "invalid duration"),
        ("5 s", "invalid duration"),
        ("5M", "invalid duration"),
        ("1e3", "invalid duration"),
        ("1h-30m", "invalid duration"),
        ("ten minutes", "invalid duration"),
        (True, 'expected a duration string like "30s" (got bool)'),
        (None, "(got NoneType)"),
        ([], "(got array)"),
        ({}, "(got table)"),
    ],
)
def test_duration_errors(value: object, message: str) -> None:
    with pytest.raises(ValueError) as info:
        parse_duration(value)  # type: ignore[arg-type]
    assert message in str(info.value)


def test_duration_error_suggests_forms() -> None:
    with pytest.raises(ValueError, match=r'use e\.g\. .*"30s"'):
        parse_duration("soon")


@pytest.mark.parametrize(
    ("value", "size"),
    [
        (0, 0),
        (100, 100),
        ("100", 100),
        ("100B", 100),
        ("100 B", 100),
        ("512KiB", 512 * 1024),
        ("25MiB", 25 * 1024 * 1024),
        ("1GiB", 1024**3),
        ("2TiB", 2 * 1024**4),
        ("1KB", 1000),
        ("10MB", 10_000_000),
        ("1GB", 1_000_000_000),
        ("2TB", 2 * 10**12),
        ("25mib", 25 * 1024 * 1024),
        ("1 kb", 1000),
        ("1.5KiB", 1536),
        ("0.5MB", 500_000),
        (" 7 ", 7),
    ],
)
def test_size_forms(value: int | str, size: int) -> None:
    assert parse_size(value) == size
    assert type(parse_size(value)) is int


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("", "empty size"),
        (-1, "must not be negative (got -1)"),
        ("-1", "must not be negative"),
        ("-1MiB", "must not be negative"),
        ("10XB", "invalid size '10XB'"),
        ("MiB", "invalid size"),
        ("1.2.3MB", "invalid size"),
        ("25 M", "invalid size"),
        ("1.5B", "not a whole number of bytes"),
        ("0.1KiB", "not a whole number of bytes"),
        (True, "(got bool)"),
        (1.5, "(got float)"),
        (None, "(got NoneType)"),
    ],
)
def test_size_errors(value: object, message: str) -> None:
    with pytest.raises(ValueError) as info:
        parse_size(value)  # type: ignore[arg-type]
    assert message in str(info.value)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("127.0.0.1:2525", HostPort("127.0.0.1", 2525)),
        ("[::1]:2525", HostPort("::1", 2525)),
        ("localhost:25", HostPort("localhost", 25)),
        ("smtp.provider1.com:587", HostPort("smtp.provider1.com", 587)),
        ("0.0.0.0:25", HostPort("0.0.0.0", 25)),
        ("[::]:25", HostPort("::", 25)),
        ("[fe80::1%eth0]:25", HostPort("fe80::1%eth0", 25)),
        (" host:1 ", HostPort("host", 1)),
        ("host:65535", HostPort("host", 65535)),
    ],
)
def test_hostport_forms(text: str, expected: HostPort) -> None:
    assert parse_hostport(text) == expected


def test_hostport_default_port() -> None:
    assert parse_hostport("mx.example.com", 25) == HostPort("mx.example.com", 25)
    assert parse_hostport("[2001:db8::1]", 53) == HostPort("2001:db8::1", 53)
    assert parse_hostport("mx.example.com:2525", 25) == HostPort("mx.example.com", 2525)


def test_hostport_port_zero_only_when_allowed() -> None:
    with pytest.raises(ValueError, match="port must be 1-65535"):
        parse_hostport("127.0.0.1:0")
    assert parse_hostport("127.0.0.1:0", allow_port_zero=True) == HostPort("127.0.0.1", 0)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("localhost", "missing port"),
        ("::1:25", "IPv6 addresses need brackets"),
        ("[::1", "missing ']'"),
        ("[::1]25", "expected ':port' after ']'"),
        ("[mail.example]:25", "is not an IPv6 address"),
        ("host:abc", "invalid port 'abc'"),
        ("host:", "invalid port ''"),
        ("host:-1", "invalid port"),
        ("host:70000", "port must be 1-65535"),
        (":25", "invalid host ''"),
        ("", "invalid host"),
        ("bad host:25", "invalid host 'bad host'"),
        ("host:\uff12\uff15", "invalid port"),  # fullwidth digits
    ],
)
def test_hostport_errors(text: str, message: str) -> None:
    with pytest.raises(ValueError) as info:
        parse_hostport(text)
    assert message in str(info.value)


def test_hostport_rejects_non_strings() -> None:
    with pytest.raises(ValueError, match=r"expected a string like .* \(got int\)"):
        parse_hostport(2525)  # type: ignore[arg-type]


@pytest.mark.parametrize("text", ["127.0.0.1:25", "[::1]:2525", "mx.example.com:587"])
def test_hostport_str_round_trips(text: str) -> None:
    assert str(parse_hostport(text)) == text


def test_domain() -> None:
    assert parse_domain("Example.COM") == "example.com"
    assert parse_domain("example.com.") == "example.com"
    assert parse_domain("bücher.example") == "bücher.example"
    for bad in ["", ".", "a b.com", "user@example.com", "a..b", "[127.0.0.1]"]:
        with pytest.raises(ValueError, match="not a domain name"):
            parse_domain(bad)
    with pytest.raises(ValueError, match="without a leading dot"):
        parse_domain(".example.com")
    with pytest.raises(ValueError, match=r"expected a string \(got int\)"):
        parse_domain(5)


def test_network() -> None:
    assert parse_network("10.1.2.3/8") == ipaddress.ip_network("10.0.0.0/8")
    assert parse_network("::1/128") == ipaddress.ip_network("::1/128")
    assert parse_network("192.0.2.7") == ipaddress.ip_network("192.0.2.7/32")
    with pytest.raises(ValueError, match="not an IP network"):
        parse_network("10.0.0.0/33")
    with pytest.raises(ValueError, match="not an IP network"):
        parse_network("localhost")
    with pytest.raises(ValueError, match=r"expected a string \(got array\)"):
        parse_network([])


def test_hostname() -> None:
    for good in ["localhost", "mail.example.com", "mail.example.com.", "a-b.c0"]:
        assert parse_hostname(good) == good
    for bad in ["", "bad host", "-a.com", "a_b.com", "a..b", "x" * 64 + ".com", "ex@mple.com"]:
        with pytest.raises(ValueError, match="not a valid host name"):
            parse_hostname(bad)
    with pytest.raises(ValueError, match=r"expected a string \(got int\)"):
        parse_hostname(1)
