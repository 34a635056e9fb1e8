"""The relay benchmark's data and report: options, one row per run, medians, ratios, the markdown page.

Kept apart from `bench.relay` (which runs the targets) so each stays small.
"""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .report import RESULTS, hedwig_version, machine_line, markdown_table, median, num, ratio

TARGETS = ("direct", "postfix", "hedwigpy", "hedwigpy+dkim")  # +dkim: signing every message (--dkim)
# hedwigpy's [delivery] settings per mode; Postfix relays store-and-forward in every mode.
MODES: dict[str, dict[str, Any]] = {
    "store-and-forward": {"cut_through": False},
    "cut-through": {"cut_through": True},
}
POSTFIX_DEFAULT_CONCURRENCY = 20  # default_destination_concurrency_limit
POSTFIX_INITIAL_CONCURRENCY = 5  # initial_destination_concurrency (left at its default)


@dataclass(frozen=True)
class Options:
    repeat: int
    messages: int
    sessions: int
    size: int
    per_session: int
    rcpts: int
    mode: str
    concurrency: int
    per_connection: int
    timeout: float
    delivery_timeout: float
    stall_timeout: float
    postfix_port: int
    sink_port: int
    in_flow_delay: str
    hedwig_cmd: str
    keep: bool
    probe: int = 300  # messages of the one-session latency probe (0 = none)
    dkim: str = ""  # "rsa" or "ed25519": also run hedwigpy signing every message with such a key

    def hedwig_delivery(self) -> dict[str, Any]:
        return {
            **MODES[self.mode],
            "tls": "none",
            "max_connections_per_host": self.concurrency,
            "max_messages_per_connection": self.per_connection,
        }

    def postfix_params(self) -> dict[str, str]:
        return {
            "default_destination_concurrency_limit": str(self.concurrency),
            "smtp_connection_reuse_count_limit": str(self.per_connection),
        }


@dataclass(frozen=True)
class Row:
    repeat: int
    target: str
    accepted: int
    failed: int
    accept_s: float  # the generator's wall time
    accept_msgs_per_s: float  # the generator's: 2xx replies over its wall time
    delivered: int  # distinct bench messages at the sink
    e2e_s: float  # from the start of the load to the last message at the sink; NaN when incomplete
    e2e_msgs_per_s: float
    p50_ms: float  # end-to-end latency per message: MAIL sent → end of data at the sink
    p99_ms: float
    connections: int  # connections opened to the sink
    max_open: int  # most connections to the sink open at once
    peak_rss_mib: float
    peak_pss_mib: float
    processes: int
    cpu_s: float  # CPU time of the target's process tree during the run
    sink_cpu_s: float
    left: int | None  # messages still in the target's queue at the end
    note: str = ""
    wait_p50_ms: float = math.nan  # the sender's wait per message (MAIL → final reply) under the load
    wait_p99_ms: float = math.nan
    probe_p50_ms: float = math.nan  # the same with one session sending one message at a time
    probe_p99_ms: float = math.nan

    @property
    def msgs_per_connection(self) -> float:
        return self.delivered / self.connections if self.connections else math.nan

    @property
    def cpu_ms_per_msg(self) -> float:
        return 1000.0 * self.cpu_s / self.delivered if self.delivered else math.nan


# ----------------------------------------------------------------------------------------------------
# Tables

RUN_HEADER = (
    "run",
    "target",
    "accepted",
    "failed",
    "accept s",
    "accept msg/s",
    "delivered",
    "e2e s",
    "e2e msg/s",
    "p50 ms",
    "p99 ms",
    "upstream conns",
    "msg/conn",
    "max open",
    "peak RSS MiB",
    "peak PSS MiB",
    "procs",
    "CPU s",
    "CPU ms/msg",
    "sink CPU s",
    "left",
    "note",
)


def runs_table(rows: Sequence[Row]) -> str:
    return markdown_table(
        RUN_HEADER,
        [
            (
                str(r.repeat),
                r.target,
                str(r.accepted),
                str(r.failed),
                num(r.accept_s, 2),
                num(r.accept_msgs_per_s),
                str(r.delivered),
                num(r.e2e_s, 2),
                num(r.e2e_msgs_per_s),
                num(r.p50_ms, 1),
                num(r.p99_ms, 1),
                str(r.connections),
                num(r.msgs_per_connection),
                str(r.max_open),
                num(r.peak_rss_mib),
                num(r.peak_pss_mib),
                str(r.processes) if r.processes else "—",
                num(r.cpu_s, 2),
                num(r.cpu_ms_per_msg, 2),
                num(r.sink_cpu_s, 2),
                "—" if r.left is None else str(r.left),
                r.note.replace("|", "/")[:200],
            )
            for r in rows
        ],
    )


@dataclass(frozen=True)
class Median:
    target: str
    runs: int
    accept_msgs_per_s: float
    e2e_msgs_per_s: float
    p50_ms: float
    p99_ms: float
    connections: float
    msgs_per_connection: float
    max_open: float
    peak_rss_mib: float
    peak_pss_mib: float
    cpu_ms_per_msg: float
    failed: int
    undelivered: int


def medians(rows: Sequence[Row]) -> list[Median]:
    out = []
    for target in TARGETS:
        sel = [r for r in rows if r.target == target]
        if sel:
            out.append(
                Median(
                    target,
                    len(sel),
                    median([r.accept_msgs_per_s for r in sel]),
                    median([r.e2e_msgs_per_s for r in sel]),
                    median([r.p50_ms for r in sel]),
                    median([r.p99_ms for r in sel]),
                    median([float(r.connections) for r in sel]),
                    median([r.msgs_per_connection for r in sel]),
                    median([float(r.max_open) for r in sel]),
                    median([r.peak_rss_mib for r in sel]),
                    median([r.peak_pss_mib for r in sel]),
                    median([r.cpu_ms_per_msg for r in sel]),
                    sum(r.failed for r in sel),
                    sum(max(0, r.accepted - r.delivered) for r in sel),
                )
            )
    return out


def medians_table(meds: Sequence[Median]) -> str:
    return markdown_table(
        (
            "target",
            "runs",
            "accept msg/s",
            "e2e msg/s",
            "p50 ms",
            "p99 ms",
            "upstream conns",
            "msg/conn",
            "max open",
            "peak RSS MiB",
            "peak PSS MiB",
            "CPU ms/msg",
            "failed",
            "undelivered",
        ),
        [
            (
                m.target,
                str(m.runs),
                num(m.accept_msgs_per_s),
                num(m.e2e_msgs_per_s),
                num(m.p50_ms, 1),
                num(m.p99_ms, 1),
                num(m.connections, 0),
                num(m.msgs_per_connection),
                num(m.max_open, 0),
                num(m.peak_rss_mib),
                num(m.peak_pss_mib),
                num(m.cpu_ms_per_msg, 2),
                str(m.failed),
                str(m.undelivered),
            )
            for m in meds
        ],
    )


def dkim_table(meds: Sequence[Median]) -> str | None:
    """What signing costs: hedwigpy with a DKIM key against hedwigpy without, in the same runs."""
    by = {m.target: m for m in meds}
    on, off = by.get("hedwigpy+dkim"), by.get("hedwigpy")
    if not (on and off):
        return None
    return markdown_table(
        ("accept msg/s", "e2e msg/s", "p50", "p99", "CPU ms/msg", "CPU ms/msg added"),
        [
            (
                ratio(on.accept_msgs_per_s, off.accept_msgs_per_s),
                ratio(on.e2e_msgs_per_s, off.e2e_msgs_per_s),
                ratio(on.p50_ms, off.p50_ms),
                ratio(on.p99_ms, off.p99_ms),
                ratio(on.cpu_ms_per_msg, off.cpu_ms_per_msg),
                num(on.cpu_ms_per_msg - off.cpu_ms_per_msg, 2),
            )
        ],
    )


def ratios_table(meds: Sequence[Median]) -> str | None:
    by = {m.target: m for m in meds}
    h, p = by.get("hedwigpy"), by.get("postfix")
    if not (h and p):
        return None
    return markdown_table(
        ("accept msg/s", "e2e msg/s", "p50", "p99", "msg/conn", "peak RSS", "peak PSS", "CPU ms/msg"),
        [
            (
                ratio(h.accept_msgs_per_s, p.accept_msgs_per_s),
                ratio(h.e2e_msgs_per_s, p.e2e_msgs_per_s),
                ratio(h.p50_ms, p.p50_ms),
                ratio(h.p99_ms, p.p99_ms),
                ratio(h.msgs_per_connection, p.msgs_per_connection),
                ratio(h.peak_rss_mib, p.peak_rss_mib),
                ratio(h.peak_pss_mib, p.peak_pss_mib),
                ratio(h.cpu_ms_per_msg, p.cpu_ms_per_msg),
            )
        ],
    )


# ----------------------------------------------------------------------------------------------------
# Report


def waits_table(rows: Sequence[Row]) -> str:
    """The sender's wait, and what the target adds to the upstream's own time (the direct row's wait)."""
    by = {t: [r for r in rows if r.target == t] for t in TARGETS}
    direct = median([r.probe_p50_ms for r in by["direct"]]) if by["direct"] else math.nan
    direct99 = median([r.probe_p99_ms for r in by["direct"]]) if by["direct"] else math.nan
    lines = []
    for target, sel in by.items():
        if not sel:
            continue
        p50 = median([r.probe_p50_ms for r in sel])
        p99 = median([r.probe_p99_ms for r in sel])
        lines.append(
            (
                target,
                num(median([r.wait_p50_ms for r in sel]), 2),
                num(median([r.wait_p99_ms for r in sel]), 2),
                num(p50, 2),
                num(p99, 2),
                "—" if target == "direct" else num(p50 - direct, 2),
                "—" if target == "direct" else num(p99 - direct99, 2),
            )
        )
    return markdown_table(
        (
            "target",
            "wait p50 ms (load)",
            "wait p99 ms (load)",
            "wait p50 ms (1 session)",
            "wait p99 ms (1 session)",
            "added p50 ms",
            "added p99 ms",
        ),
        lines,
    )


WAITS_NOTE = (
    "The sender's wait is the generator's time per message from MAIL to the reply after the end of data: "
    'under the full load, and in a probe of one session sending one message at a time after it. "added" '
    "is the probe's wait minus the direct row's (the sink's own time): what the target adds while the "
    "sender waits. In cut-through mode that wait includes the upstream's answer; Postfix (and "
    "store-and-forward) answers after its own fsync without waiting for the upstream."
)


def environment(opts: Options, pf_version: str | None, measured: set[str]) -> list[str]:
    delivery = ", ".join(f"{k} = {_toml(v)}" for k, v in opts.hedwig_delivery().items())
    pf_concurrency = (
        f"`default_destination_concurrency_limit = {opts.concurrency}` "
        f"(default {POSTFIX_DEFAULT_CONCURRENCY}; slow start from "
        f"`initial_destination_concurrency = {POSTFIX_INITIAL_CONCURRENCY}`)"
    )
    return [
        f"- date: {dt.datetime.now(dt.UTC).strftime('%Y-%m-%d %H:%M UTC')}",
        machine_line(),
        f"- Postfix {pf_version if 'postfix' in measured and pf_version else 'not measured'}; hedwigpy "
        + (f"{hedwig_version()} (`{opts.hedwig_cmd}`)" if "hedwigpy" in measured else "not measured"),
        f"- mode: {opts.mode} (hedwigpy `cut_through = {_toml(MODES[opts.mode]['cut_through'])}`; "
        "Postfix always stores and forwards)",
        f"- load: {opts.messages} messages of {opts.size} bytes from `bench.smtp_load`, {opts.sessions} "
        f"concurrent sessions, {opts.per_session} messages per connection, {opts.rcpts} recipient(s), "
        f"{opts.repeat} repeat(s)",
        "- upstream: `bench.count_sink` (trio, one process) on loopback, a fresh one for every run and "
        "the same implementation for every target; it advertises PIPELINING",
        f"- Postfix: private instance, `relayhost = [127.0.0.1]:<sink>`, {pf_concurrency}, "
        f"`smtp_connection_reuse_count_limit = {opts.per_connection}` (default 0 = no limit), "
        "`smtp_connection_cache_on_demand = yes`, `smtp_connection_cache_time_limit = 2s` (defaults), "
        f"`in_flow_delay = {opts.in_flow_delay}`, default_process_limit 100, no chroot",
        f'- hedwigpy: `[[routes]] transport = "relay", hosts = ["127.0.0.1:<sink>"], tls = "none"`; '
        f"`[delivery] {delivery}` (other keys at their defaults)",
        f"- comparable settings: at most {opts.concurrency} connections to the sink and "
        f"{opts.per_connection} messages per connection for both",
    ] + (
        [
            "- hedwigpy+dkim: the same daemon with `[[dkim.keys]]` holding "
            + ("an Ed25519" if opts.dkim == "ed25519" else "an RSA-2048")
            + " key for the generator's From domain (example.com), so every message is signed "
            "(relaxed/relaxed, sha256)"
        ]
        if opts.dkim
        else []
    )


def _toml(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return f'"{value}"'
    return str(value)


NOTES = """\
Notes: "accept msg/s" counts messages answered 2xx divided by the generator's wall time ("accept s"). "e2e"
runs from the start of the generator until the sink has received the last accepted message ("e2e msg/s" =
distinct messages at the sink / e2e s); a run that does not complete within its time limits has no e2e
figure. p50/p99 are end-to-end latencies per message, from the generator sending MAIL to the sink seeing the
end of its data (CLOCK_MONOTONIC in both processes). "upstream conns" are the connections the target opened
to the sink, "msg/conn" the delivered messages per connection (reuse), "max open" the most open at once.
Peak RSS is the largest sum of VmRSS over the target's process tree seen during the run (sampled every
100 ms); Postfix runs many processes sharing libraries, so PSS (shared pages split among users) is also
shown. "CPU s" is the user + system time of the target's process tree during the run (Postfix: every process
under its master, including those that exited); "sink CPU s" the sink's. "left" is what was still in the
target's queue at the end. The "direct" row is the generator straight into the sink: the ceiling of the
generator and sink on this machine. Targets, generator and sink share the same CPUs."""


def render(opts: Options, rows: Sequence[Row], pf_version: str | None) -> str:
    meds = medians(rows)
    parts = [
        f"# SMTP relay, end to end: hedwigpy vs Postfix ({opts.mode}, {opts.size} B messages)",
        "",
        *environment(opts, pf_version, {r.target for r in rows}),
        "",
        "## Medians",
        "",
        medians_table(meds),
    ]
    ratios = ratios_table(meds)
    if ratios:
        parts += ["", "## hedwigpy / Postfix (medians)", "", ratios]
    signing = dkim_table(meds)
    if signing:
        parts += ["", "## DKIM signing on / off (hedwigpy+dkim / hedwigpy, medians)", "", signing]
    if opts.probe:
        parts += ["", "## The sender's wait (medians)", "", waits_table(rows), "", WAITS_NOTE]
    parts += ["", "## Runs", "", runs_table(rows), "", NOTES, ""]
    return "\n".join(parts)


def default_out(mode: str, size: int, dkim: str = "") -> Path:
    name = "relay" if mode == "store-and-forward" else f"relay_{mode.replace('-', '_')}"
    name += {"": "", "rsa": "_dkim"}.get(dkim, f"_dkim_{dkim}")
    return RESULTS / (f"{name}.md" if size == 4096 else f"{name}_{size}B.md")
