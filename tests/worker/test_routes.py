"""Routing: `[[routes]]` matched in order, the implicit mx route, and smarthost ordering strategies
(the built-in ones and an operator's `"module:function"`, loaded from this very module)."""

from __future__ import annotations

import random
from collections.abc import Iterable

import pytest

from hedwigpy._units import HostPort
from hedwigpy.config import RouteConfig
from hedwigpy.storage import Envelope
from hedwigpy.worker.routes import DEFAULT_ROUTE, RouteError, Router, StrategyFailed, domain_of, load_strategy

HERE = __name__
A, B, C = HostPort("a.relay.test", 25), HostPort("b.relay.test", 587), HostPort("c.relay.test", 2525)

# --- strategies the tests load by name -----------------------------------------------------------------

calls: list[tuple[Envelope, list[str]]] = []


def reverse_strategy(envelope: Envelope, hosts: list[str]) -> Iterable[str]:
    calls.append((envelope, list(hosts)))
    return reversed(hosts)


def by_sender_strategy(envelope: Envelope, hosts: list[str]) -> list[str]:
    return ["special.relay.test:465"] if envelope.sender.startswith("vip@") else hosts


def failing_strategy(envelope: Envelope, hosts: list[str]) -> list[str]:
    raise KeyError("no such tenant")


def non_strings_strategy(envelope: Envelope, hosts: list[str]) -> list[object]:
    return [1, 2]


def none_strategy(envelope: Envelope, hosts: list[str]) -> None:
    return None


def one_string_strategy(envelope: Envelope, hosts: list[str]) -> str:
    return "mx"  # a host, not a list of hosts: iterating it gives "m", "x"


def bad_host_strategy(envelope: Envelope, hosts: list[str]) -> list[str]:
    return ["not a host!"]


NOT_CALLABLE = 42


# --- helpers -------------------------------------------------------------------------------------------


def envelope(sender: str = "ann@example.org", *, user: str | None = None, listener: str = "smtp") -> Envelope:
    return Envelope(sender=sender, recipients=("x@example.net",), auth_user=user, listener=listener)


def relay(
    hosts: tuple[HostPort, ...] = (A,), strategy: str = "failover", **criteria: tuple[str, ...]
) -> RouteConfig:
    return RouteConfig(transport="relay", hosts=hosts, strategy=strategy, **criteria)  # type: ignore[arg-type]


# --- matching --------------------------------------------------------------------------------------------


def test_first_match_wins() -> None:
    router = Router(
        [relay(recipient_domains=("example.net",)), relay(), relay(recipient_domains=("example.net",))]
    )
    assert router.route(envelope(), "bob@example.net").index == 0
    assert router.route(envelope(), "bob@sub.example.net").index == 0  # parent domains match subdomains
    assert router.route(envelope(), "bob@example.com").index == 1  # the catch-all
    assert router.route(envelope(), "bob@EXAMPLE.NET").index == 0


def test_no_match_is_the_mx_route() -> None:
    router = Router([relay(recipient_domains=("example.net",))])
    route = router.route(envelope(), "bob@example.com")
    assert route is DEFAULT_ROUTE
    assert route.name == "mx" and route.config.transport == "mx"
    assert Router([]).route(envelope(), "bob@example.com") is DEFAULT_ROUTE


def test_route_names() -> None:
    router = Router([relay(), relay()])
    assert [r.name for r in router.routes] == ["routes[0]", "routes[1]"]


def test_criteria_are_anded_lists_are_ored() -> None:
    route = relay(recipient_domains=("a.test", "b.test"), users=("ann", "bea"))
    router = Router([route])
    assert router.route(envelope(user="ann"), "x@a.test").index == 0
    assert router.route(envelope(user="bea"), "x@b.test").index == 0
    assert router.route(envelope(user="cid"), "x@a.test") is DEFAULT_ROUTE  # user does not match
    assert router.route(envelope(user=None), "x@a.test") is DEFAULT_ROUTE  # not authenticated
    assert router.route(envelope(user="ann"), "x@c.test") is DEFAULT_ROUTE  # domain does not match


def test_listener_criterion() -> None:
    router = Router([relay(listeners=("submission",))])
    assert router.route(envelope(listener="submission"), "x@a.test").index == 0
    assert router.route(envelope(listener="http"), "x@a.test") is DEFAULT_ROUTE


def test_sender_domains() -> None:
    router = Router([relay(sender_domains=("example.org",))])
    assert router.route(envelope("ann@example.org"), "x@a.test").index == 0
    assert router.route(envelope("ann@mail.example.org"), "x@a.test").index == 0
    assert router.route(envelope("ann@example.com"), "x@a.test") is DEFAULT_ROUTE
    assert router.route(envelope(""), "x@a.test") is DEFAULT_ROUTE  # the null sender has no domain


def test_catch_all_takes_the_null_sender() -> None:
    assert Router([relay()]).route(envelope(""), "x@a.test").index == 0


def test_domain_of() -> None:
    assert domain_of("Bob@Example.NET") == "example.net"
    assert domain_of('"a@b"@example.net') == "example.net"
    assert domain_of("postmaster") == ""


# --- built-in strategies -------------------------------------------------------------------------------


def test_failover_keeps_the_written_order() -> None:
    router = Router([relay((A, B, C))])
    route = router.routes[0]
    assert router.relay_hosts(route, envelope()) == [A, B, C]
    assert router.relay_hosts(route, envelope()) == [A, B, C]


def test_round_robin_rotates_per_route() -> None:
    router = Router([relay((A, B, C), "round_robin"), relay((A, B), "round_robin")])
    first, second = router.routes
    orders = [router.relay_hosts(first, envelope()) for _ in range(4)]
    assert orders == [[A, B, C], [B, C, A], [C, A, B], [A, B, C]]
    assert router.relay_hosts(second, envelope()) == [A, B]  # its own turn counter


def test_random_uses_the_rng() -> None:
    router = Router([relay((A, B, C), "random")], rng=random.Random(7))
    expected_rng = random.Random(7)
    for _ in range(5):
        expected = [A, B, C]
        expected_rng.shuffle(expected)
        assert router.relay_hosts(router.routes[0], envelope()) == expected
    seen = {tuple(router.relay_hosts(router.routes[0], envelope())) for _ in range(50)}
    assert len(seen) == 6


# --- custom strategies -----------------------------------------------------------------------------------


def test_custom_strategy_orders_the_hosts() -> None:
    calls.clear()
    router = Router([relay((A, B, C), f"{HERE}:reverse_strategy")])
    env = envelope()
    assert router.relay_hosts(router.routes[0], env) == [C, B, A]
    assert calls == [(env, ["a.relay.test:25", "b.relay.test:587", "c.relay.test:2525"])]


def test_custom_strategy_may_name_other_hosts() -> None:
    router = Router([relay((A,), f"{HERE}:by_sender_strategy")])
    assert router.relay_hosts(router.routes[0], envelope("vip@example.org")) == [
        HostPort("special.relay.test", 465)
    ]
    assert router.relay_hosts(router.routes[0], envelope()) == [A]


@pytest.mark.parametrize(
    "name",
    ["failing_strategy", "non_strings_strategy", "none_strategy", "one_string_strategy", "bad_host_strategy"],
)
def test_broken_custom_strategy_is_a_strategy_failure(name: str) -> None:
    router = Router([relay((A, B), f"{HERE}:{name}")])
    with pytest.raises(StrategyFailed) as info:
        router.relay_hosts(router.routes[0], envelope())
    assert "routes[0]" in str(info.value) and name in str(info.value)


def test_strategy_on_a_later_route_names_its_index() -> None:
    router = Router([relay(recipient_domains=("a.test",)), relay((A,), f"{HERE}:failing_strategy")])
    with pytest.raises(StrategyFailed, match=r"routes\[1\]"):
        router.relay_hosts(router.routes[1], envelope())


@pytest.mark.parametrize(
    ("spec", "problem"),
    [
        ("no_such_module_hedwig:f", "ModuleNotFoundError"),
        (f"{HERE}:no_such_function", "AttributeError"),
        (f"{HERE}:NOT_CALLABLE", "is not callable"),
    ],
)
def test_strategy_that_does_not_load(spec: str, problem: str) -> None:
    with pytest.raises(RouteError) as info:
        Router([relay(), relay((A,), spec)])
    message = str(info.value)
    assert message.startswith("routes[1].strategy: ")
    assert problem in message and spec in message
    with pytest.raises(RouteError, match=r"^x\.y: "):
        load_strategy(spec, where="x.y")


def test_load_strategy() -> None:
    assert load_strategy(f"{HERE}:reverse_strategy", where="routes[0].strategy") is reverse_strategy
