"""Accept-rate comparison: hedwigpy against Postfix, measured in the same run on the same machine.

    python -m bench.smtp_accept [--repeat 3] [--messages 5000] [--sessions 20] [--size 4096]
                                [--hedwig-cmd ".venv/bin/hedwigpy serve -c {config}"]
                                [--skip-hedwig] [--skip-postfix]

For each repeat and each target (a private Postfix instance, then the hedwigpy daemon), both relaying
to a fresh `smtp-sink` on loopback, two load generators run one after the other: ours (`bench.smtp_load`,
pipelined, per-message latency) and Postfix's `smtp-source` (C, no pipelining, elapsed time only). Between
them the target's queue is left to drain into the sink. Memory is sampled from /proc every 100 ms: the summed
RSS (and PSS) of the target's process tree; for hedwigpy also its lifetime VmHWM. Tables of each run, medians
and hedwigpy/Postfix ratios are printed and written as markdown to bench/results/.
"""

from __future__ import annotations

import argparse
import datetime as dt
import math
import shutil
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from .hedwig_peer import DEFAULT_CMD, HedwigDaemon
from .postfix_peer import (
    PeakMemorySampler,
    PostfixConfig,
    PostfixInstance,
    SmtpSink,
    ensure_postfix_installed,
    pick_port,
    postfix_version,
    run_smtp_source,
    wait_until,
)
from .report import (
    MIB,
    RESULTS,
    hedwig_version,
    loadavg,
    machine_line,
    markdown_table,
    median,
    num,
    publish,
    ratio,
    run_interruptibly,
)
from .smtp_load import LoadConfig, LoadResult, run_load_sync

SMTP_SOURCE_HEADER_BYTES = 143  # From/To/Date/Message-Id that smtp-source adds before its -l payload
TARGETS = ("postfix", "hedwigpy")
TOOLS = ("smtp_load", "smtp-source")


@dataclass(frozen=True)
class Row:
    repeat: int
    target: str
    tool: str
    accepted: int
    failed: int
    elapsed: float
    msgs_per_s: float
    p50_ms: float
    p99_ms: float
    peak_rss_mib: float
    peak_pss_mib: float
    processes: int
    drain_s: float | None
    note: str = ""


@dataclass(frozen=True)
class Options:
    repeat: int
    messages: int
    sessions: int
    size: int
    per_session: int
    rcpts: int
    timeout: float
    drain_timeout: float
    source_reuse: bool
    skip_source: bool
    postfix_port: int
    sink_port: int
    in_flow_delay: str
    hedwig_cmd: str
    keep: bool


def _log(msg: str) -> None:
    print(msg, flush=True)


def _load(opts: Options, port: int) -> LoadResult:
    cfg = LoadConfig(
        host="127.0.0.1",
        port=port,
        sessions=opts.sessions,
        messages=opts.messages,
        size=opts.size,
        per_session=opts.per_session,
        rcpts=opts.rcpts,
        timeout=opts.timeout,
    )
    return run_load_sync(cfg)


def _measure(
    opts: Options,
    repeat: int,
    target: str,
    port: int,
    root: Callable[[], int | None],
    backlog: Callable[[], int | None],
) -> list[Row]:
    """Run both generators against one started target; each followed by waiting for its queue to drain."""

    def drain() -> float | None:
        if backlog() is None:
            return None
        return wait_until(lambda: (backlog() or 0) == 0, opts.drain_timeout, interval=0.1)

    rows: list[Row] = []
    with PeakMemorySampler(root) as mem:
        load = _load(opts, port)
    drain_s = drain()
    rows.append(
        Row(
            repeat,
            target,
            "smtp_load",
            load.accepted,
            load.failed,
            load.elapsed,
            load.msgs_per_s,
            load.p50_ms,
            load.p99_ms,
            mem.peak_rss_kb / MIB,
            mem.peak_pss_kb / MIB,
            mem.peak_processes,
            drain_s,
            "; ".join(load.failure_samples[:3]),
        )
    )
    _log(f"  {target:8} smtp_load   {load.summary()}")
    if opts.skip_source:
        return rows
    with PeakMemorySampler(root) as mem:
        src = run_smtp_source(
            port,
            sessions=opts.sessions,
            messages=opts.messages,
            size=max(1, opts.size - SMTP_SOURCE_HEADER_BYTES),
            reuse=opts.source_reuse,
            rcpts=opts.rcpts,
            timeout=opts.timeout,
        )
    drain_s = drain()
    note = "" if src.ok else f"exit {src.returncode}: {src.stderr[-200:]}"
    rows.append(
        Row(
            repeat,
            target,
            "smtp-source",
            src.accepted,
            src.messages - src.accepted,
            src.elapsed,
            src.msgs_per_s,
            math.nan,
            math.nan,
            mem.peak_rss_kb / MIB,
            mem.peak_pss_kb / MIB,
            mem.peak_processes,
            drain_s,
            note,
        )
    )
    _log(
        f"  {target:8} smtp-source accepted={src.accepted} elapsed={src.elapsed:.2f}s "
        f"rate={src.msgs_per_s:.1f} msg/s {note}"
    )
    return rows


def run_postfix(opts: Options, repeat: int) -> list[Row]:
    sink_port = pick_port(opts.sink_port)
    cfg = PostfixConfig(
        smtpd_port=pick_port(opts.postfix_port, avoid=[sink_port]),
        sink_port=sink_port,
        message_size_limit=max(50 * 1024 * 1024, 2 * opts.size + 1024 * 1024),
        in_flow_delay=opts.in_flow_delay,
    )
    base = Path(tempfile.mkdtemp(prefix="hedwig-bench-postfix-"))
    try:
        with SmtpSink(cfg.sink_port), PostfixInstance(base, cfg) as pf:
            rows = _measure(opts, repeat, "postfix", cfg.smtpd_port, pf.master_pid, pf.queue_size)
            pf.snapshot()
            return rows
    finally:
        if not opts.keep:
            shutil.rmtree(base, ignore_errors=True)


def run_hedwig(opts: Options, repeat: int) -> list[Row]:
    sink_port = pick_port(opts.sink_port)
    with (
        SmtpSink(sink_port),
        HedwigDaemon(
            sink_port=sink_port,
            cmd_template=opts.hedwig_cmd,
            max_message_size=2 * opts.size + 1024 * 1024,
            max_connections_per_ip=2 * opts.sessions,
            keep=opts.keep,
        ) as daemon,
    ):
        rows = _measure(opts, repeat, "hedwigpy", daemon.smtp_port, lambda: daemon.pid, daemon.queued)
        deferred = daemon.deferred()
        code = daemon.stop()
    hwm = daemon.peak_hwm_kb / MIB
    extra = f"VmHWM {hwm:.1f} MiB; exit {code}" + (f"; {deferred} deferred" if deferred else "")
    _log(f"  hedwigpy {extra}")
    return [Row(**{**r.__dict__, "note": "; ".join(x for x in (r.note, extra) if x)}) for r in rows]


# ----------------------------------------------------------------------------------------------------
# Tables


RUN_HEADER = (
    "run",
    "target",
    "generator",
    "accepted",
    "failed",
    "msg/s",
    "p50 ms",
    "p99 ms",
    "peak RSS MiB",
    "peak PSS MiB",
    "procs",
    "drain s",
    "note",
)


def runs_table(rows: Sequence[Row]) -> str:
    return markdown_table(
        RUN_HEADER,
        [
            (
                str(r.repeat),
                r.target,
                r.tool,
                str(r.accepted),
                str(r.failed),
                num(r.msgs_per_s),
                num(r.p50_ms, 2),
                num(r.p99_ms, 2),
                num(r.peak_rss_mib),
                num(r.peak_pss_mib),
                str(r.processes),
                num(r.drain_s, 2),
                r.note.replace("|", "/")[:160],
            )
            for r in rows
        ],
    )


@dataclass(frozen=True)
class Median:
    target: str
    tool: str
    runs: int
    msgs_per_s: float
    p50_ms: float
    p99_ms: float
    peak_rss_mib: float
    peak_pss_mib: float
    failed: int


def medians(rows: Sequence[Row]) -> list[Median]:
    out = []
    for target in TARGETS:
        for tool in TOOLS:
            sel = [r for r in rows if r.target == target and r.tool == tool]
            if sel:
                out.append(
                    Median(
                        target,
                        tool,
                        len(sel),
                        median([r.msgs_per_s for r in sel]),
                        median([r.p50_ms for r in sel]),
                        median([r.p99_ms for r in sel]),
                        median([r.peak_rss_mib for r in sel]),
                        median([r.peak_pss_mib for r in sel]),
                        sum(r.failed for r in sel),
                    )
                )
    return out


def medians_table(meds: Sequence[Median]) -> str:
    return markdown_table(
        (
            "target",
            "generator",
            "runs",
            "msg/s",
            "p50 ms",
            "p99 ms",
            "peak RSS MiB",
            "peak PSS MiB",
            "failed",
        ),
        [
            (
                m.target,
                m.tool,
                str(m.runs),
                num(m.msgs_per_s),
                num(m.p50_ms, 2),
                num(m.p99_ms, 2),
                num(m.peak_rss_mib),
                num(m.peak_pss_mib),
                str(m.failed),
            )
            for m in meds
        ],
    )


def ratios_table(meds: Sequence[Median]) -> str | None:
    by = {(m.target, m.tool): m for m in meds}
    rows = []
    for tool in TOOLS:
        h, p = by.get(("hedwigpy", tool)), by.get(("postfix", tool))
        if h and p:
            rows.append(
                (
                    tool,
                    ratio(h.msgs_per_s, p.msgs_per_s),
                    ratio(h.p50_ms, p.p50_ms),
                    ratio(h.p99_ms, p.p99_ms),
                    ratio(h.peak_rss_mib, p.peak_rss_mib),
                    ratio(h.peak_pss_mib, p.peak_pss_mib),
                )
            )
    if not rows:
        return None
    return markdown_table(("generator", "msg/s", "p50", "p99", "peak RSS", "peak PSS"), rows)


# ----------------------------------------------------------------------------------------------------
# Report


def environment(opts: Options, pf_version: str | None, hedwig_measured: bool) -> list[str]:
    source_len = max(1, opts.size - SMTP_SOURCE_HEADER_BYTES)
    return [
        f"- date: {dt.datetime.now(dt.UTC).strftime('%Y-%m-%d %H:%M UTC')}",
        machine_line(),
        f"- Postfix {pf_version or 'not measured'}; hedwigpy "
        + (f"{hedwig_version()} (`{opts.hedwig_cmd}`)" if hedwig_measured else "not measured"),
        f"- load: {opts.messages} messages of {opts.size} bytes, {opts.sessions} concurrent sessions, "
        f"{opts.per_session} messages per connection (smtp_load), {opts.rcpts} recipient(s), "
        f"{opts.repeat} repeat(s)",
        f"- smtp-source: `-s {opts.sessions} -m {opts.messages} -l {source_len}"
        f"{' -d' if opts.source_reuse else ''}` (payload + ~{SMTP_SOURCE_HEADER_BYTES} header bytes; "
        f"{'one connection per session' if opts.source_reuse else 'one connection per message'})",
        f"- Postfix: private instance, `in_flow_delay = {opts.in_flow_delay}`, default_process_limit 100, "
        "no chroot, relayhost = smtp-sink; hedwigpy: `cut_through = false`, relay route to smtp-sink",
    ]


NOTES = """\
Notes: msg/s counts messages answered 2xx divided by the generator's wall time. p50/p99 are per-message
latencies from MAIL to the reply after the end of data (smtp_load only; smtp-source reports no latencies).
Peak RSS is the largest sum of VmRSS over the target's process tree seen while that generator ran (sampled
every 100 ms); Postfix runs many processes sharing libraries, so PSS (shared pages split among users) is also
shown.
"drain s" is how long the queue took to empty into smtp-sink after the generator finished. The target, the
generator and smtp-sink share the same CPUs."""


def render(opts: Options, rows: Sequence[Row], pf_version: str | None) -> str:
    meds = medians(rows)
    parts = [
        f"# SMTP accept rate: hedwigpy vs Postfix ({opts.size} B messages)",
        "",
        *environment(opts, pf_version, any(r.target == "hedwigpy" for r in rows)),
        "",
        "## Medians",
        "",
        medians_table(meds),
    ]
    ratios = ratios_table(meds)
    if ratios:
        parts += ["", "## hedwigpy / Postfix (medians)", "", ratios]
    parts += ["", "## Runs", "", runs_table(rows), "", NOTES, ""]
    return "\n".join(parts)


def default_out(size: int) -> Path:
    name = "smtp_accept.md" if size == 4096 else f"smtp_accept_{size}B.md"
    return RESULTS / name


# ----------------------------------------------------------------------------------------------------
# Command line


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.smtp_accept", description=__doc__.split("\n\n")[0])
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--messages", type=int, default=5000)
    p.add_argument("--sessions", type=int, default=20)
    p.add_argument("--size", type=int, default=4096, help="message size in bytes, headers included")
    p.add_argument("--per-session", type=int, default=50, help="messages per connection (smtp_load)")
    p.add_argument("--rcpts", type=int, default=1)
    p.add_argument("--timeout", type=float, default=300.0, help="limit for each generator run (s)")
    p.add_argument("--drain-timeout", type=float, default=120.0, help="limit for each queue drain wait (s)")
    p.add_argument("--hedwig-cmd", default=DEFAULT_CMD, help="{config} is replaced; run from the repo root")
    p.add_argument("--skip-hedwig", action="store_true")
    p.add_argument("--skip-postfix", action="store_true")
    p.add_argument("--skip-smtp-source", action="store_true")
    p.add_argument(
        "--source-new-connection",
        action="store_true",
        help="smtp-source without -d: a new connection for every message",
    )
    p.add_argument("--postfix-port", type=int, default=10025, help="preferred; a free one is used if taken")
    p.add_argument("--sink-port", type=int, default=10026, help="preferred; a free one is used if taken")
    p.add_argument("--postfix-in-flow-delay", default="1s", help="Postfix's inbound throttle (default 1s)")
    p.add_argument("--out", type=Path, help="markdown output (default bench/results/smtp_accept[_SIZE B].md)")
    p.add_argument("--keep", action="store_true", help="keep temporary directories (logs, spools)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.repeat < 1 or args.messages < 1 or args.sessions < 1:
        print("repeat, messages and sessions must be at least 1", file=sys.stderr)
        return 2
    opts = Options(
        repeat=args.repeat,
        messages=args.messages,
        sessions=args.sessions,
        size=args.size,
        per_session=args.per_session,
        rcpts=args.rcpts,
        timeout=args.timeout,
        drain_timeout=args.drain_timeout,
        source_reuse=not args.source_new_connection,
        skip_source=args.skip_smtp_source,
        postfix_port=args.postfix_port,
        sink_port=args.sink_port,
        in_flow_delay=args.postfix_in_flow_delay,
        hedwig_cmd=args.hedwig_cmd,
        keep=args.keep,
    )
    return run_interruptibly(lambda: _main(opts, args))


def _main(opts: Options, args: argparse.Namespace) -> int:
    ensure_postfix_installed(_log)  # smtp-sink and smtp-source are needed for hedwigpy's runs too
    pf_version = None if args.skip_postfix else postfix_version()
    rows: list[Row] = []
    errors: list[str] = []
    for repeat in range(1, opts.repeat + 1):
        _log(f"run {repeat}/{opts.repeat} (load average {loadavg()})")
        if not args.skip_postfix:
            rows += run_postfix(opts, repeat)
        if not args.skip_hedwig:
            try:
                rows += run_hedwig(opts, repeat)
            except (RuntimeError, TimeoutError, OSError) as exc:
                errors.append(f"run {repeat}: hedwigpy: {exc}")
                _log(f"  hedwigpy FAILED: {exc}")
        if rows:
            print(runs_table([r for r in rows if r.repeat == repeat]), flush=True)
    if not rows:
        print("nothing measured", file=sys.stderr)
        return 1
    publish(render(opts, rows, pf_version), args.out or default_out(opts.size), errors)
    return 1 if errors or any(r.failed for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
