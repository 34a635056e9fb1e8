"""[[webhooks]] in hedwig.toml: defaults, conversions and every error with its key path."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from hedwigpy.config import WEBHOOK_EVENTS, ConfigError, WebhookConfig, load_config, parse_config

REPO = Path(__file__).resolve().parents[1]
HOOK = {"url": "http://127.0.0.1:8080/hook", "secret": "s3cret"}


def errors_of(data: dict[str, Any]) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_config(data, Path("/etc/hedwig"), {})
    return info.value.errors


def test_no_webhooks_by_default() -> None:
    assert parse_config({}, Path("/x"), {}).webhooks == ()


def test_defaults_and_conversions() -> None:
    data = {
        "webhooks": [
            HOOK,
            {
                "url": "https://hooks.example.com:8443/a?b=c",
                "secret": "x",
                "events": ["bounced", "delivered", "bounced"],
                "timeout": "3s",
            },
        ]
    }
    first, second = parse_config(data, Path("/x"), {}).webhooks
    assert first == WebhookConfig(url=HOOK["url"], secret="s3cret", events=WEBHOOK_EVENTS, timeout=10.0)
    assert WebhookConfig(url="http://h/", secret="s") == WebhookConfig("http://h/", "s", WEBHOOK_EVENTS, 10.0)
    assert second.url == "https://hooks.example.com:8443/a?b=c"
    assert (second.events, second.timeout) == (("bounced", "delivered"), 3.0)
    assert set(WEBHOOK_EVENTS) == {
        "received",
        "delivered",
        "deferred",
        "bounced",
        "held",
        "released",
        "deleted",
    }


ERROR_CASES: list[tuple[dict[str, Any], str]] = [
    ({"webhooks": {"url": "http://h/"}}, "webhooks: expected an array of tables (got table)"),
    ({"webhooks": [{"secret": "s"}]}, "webhooks[0].url: missing required key"),
    ({"webhooks": [{"url": "http://h/"}]}, "webhooks[0].secret: missing required key"),
    ({"webhooks": [{**HOOK, "secret": " "}]}, "webhooks[0].secret: must not be empty"),
    (
        {"webhooks": [{**HOOK, "url": "ftp://h/x"}]},
        "webhooks[0].url: must be an http:// or https:// URL with a host (got 'ftp://h/x')",
    ),
    ({"webhooks": [{**HOOK, "url": "http:///x"}]}, "webhooks[0].url: must be an http:// or https:// URL"),
    ({"webhooks": [{**HOOK, "url": "hooks.example.com"}]}, "webhooks[0].url: must be an http:// or https://"),
    ({"webhooks": [{**HOOK, "url": "http://h:99999/"}]}, "webhooks[0].url: not a valid URL"),
    ({"webhooks": [{**HOOK, "url": "http://u:p@h/"}]}, "webhooks[0].url: must not carry credentials"),
    ({"webhooks": [{**HOOK, "url": "http://h/a b"}]}, "webhooks[0].url: must not contain spaces"),
    ({"webhooks": [{**HOOK, "url": 5}]}, "webhooks[0].url: expected a string (got int)"),
    (
        {"webhooks": [HOOK, {**HOOK, "events": ["delivered", "sent"]}]},
        "webhooks[1].events[1]: must be one of received, delivered, deferred, bounced, held, released, "
        "deleted (got 'sent')",
    ),
    ({"webhooks": [{**HOOK, "events": []}]}, "webhooks[0].events: must not be empty"),
    ({"webhooks": [{**HOOK, "events": "delivered"}]}, "webhooks[0].events: expected an array (got str)"),
    ({"webhooks": [{**HOOK, "timeout": "0s"}]}, "webhooks[0].timeout:"),
    ({"webhooks": [{**HOOK, "bogus": 1}]}, "webhooks[0].bogus: unknown key"),
]


@pytest.mark.parametrize(("data", "expected"), ERROR_CASES, ids=[e for _, e in ERROR_CASES])
def test_error_names_the_key_path(data: dict[str, Any], expected: str) -> None:
    errors = errors_of(data)
    assert any(e.startswith(expected) for e in errors), errors


def test_every_webhook_error_at_once() -> None:
    errors = errors_of({"webhooks": [{"url": "gopher://h/", "events": ["x"]}, {**HOOK, "timeout": True}]})
    assert [e.split(":")[0] for e in errors] == [
        "webhooks[0].url",
        "webhooks[0].secret",
        "webhooks[0].events[0]",
        "webhooks[1].timeout",
    ]


def test_the_commented_example_in_hedwig_toml(tmp_path: Path) -> None:
    lines = (REPO / "hedwig.toml").read_text().splitlines()
    start = lines.index("# [[webhooks]]")
    block = [line.removeprefix("# ") for line in lines[start:] if line.startswith("# ")]
    path = tmp_path / "hedwig.toml"
    path.write_text("\n".join(block) + "\n")
    [hook] = load_config(path, environ={}).webhooks
    assert hook.url == "https://hooks.example.com/hedwig" and hook.events == ("delivered", "bounced")
