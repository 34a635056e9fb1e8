"""End-to-end relay rate: hedwigpy against Postfix, both relaying into the same counting sink on loopback.

    python -m bench.relay [--repeat 3] [--messages 3000] [--sessions 20] [--size 4096]
                          [--mode store-and-forward] [--concurrency 10] [--per-connection 100]
                          [--skip-hedwig] [--skip-postfix] [--skip-direct] [--dkim [rsa|ed25519]]

For each repeat and each target, a fresh `bench.count_sink` is started on loopback; the target (a private
Postfix instance with `relayhost` = the sink, or the hedwigpy daemon with a relay route to it) is started in
front of it, and `bench.smtp_load` sends the messages to the target. End-to-end time runs from the start of
the load until the sink has received every accepted message, so it counts the accept, the queue and the
relaying. The sink records when each message's end of data arrived; with the generator's send times that
gives each message's end-to-end latency. It also counts the connections the relaying MTA opened to it
(connection reuse: messages per connection). A "direct" target (the generator straight into the sink) shows
the ceiling of this generator and sink on this machine.

The mode is a parameter so later variants share the benchmark: `store-and-forward` (hedwigpy's
`[delivery] cut_through = false`) and `cut-through` (`cut_through = true`; Postfix has no cut-through, it
stays store-and-forward). Memory and CPU of the target's process tree are read from /proc. Tables of each
run, medians and hedwigpy/Postfix ratios are printed and written as markdown to bench/results/.
"""

from __future__ import annotations

import argparse
import math
import shutil
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path

from .count_sink import CountingSink, SinkStats
from .hedwig_peer import DEFAULT_CMD, HedwigDaemon
from .postfix_peer import (
    PeakMemorySampler,
    PostfixConfig,
    PostfixInstance,
    ensure_postfix_installed,
    pick_port,
    postfix_version,
    tree_cpu_seconds,
    wait_until,
)
from .relay_report import MODES, Options, Row, default_out, render, runs_table
from .report import MIB, loadavg, num, publish, run_interruptibly
from .smtp_load import LoadConfig, LoadResult, percentile, run_load_sync

QUEUE_SETTLE_S = 5.0


def _log(msg: str) -> None:
    print(msg, flush=True)


def _load_config(opts: Options, port: int) -> LoadConfig:
    return LoadConfig(
        host="127.0.0.1",
        port=port,
        sessions=opts.sessions,
        messages=opts.messages,
        size=opts.size,
        per_session=opts.per_session,
        rcpts=opts.rcpts,
        timeout=opts.timeout,
    )


def _latencies_ms(load: LoadResult, arrivals: dict[int, float]) -> list[float]:
    sent = load.sent_at
    out = [
        (at - sent[n]) * 1000.0
        for n, at in arrivals.items()
        if 0 <= n < len(sent) and not math.isnan(sent[n])
    ]
    out.sort()
    return out


def _measure(
    opts: Options,
    repeat: int,
    target: str,
    port: int,
    sink: CountingSink,
    root: Callable[[], int | None],
    backlog: Callable[[], int | None],
) -> Row:
    """One load through a started target into `sink`, waiting until the sink has every accepted message."""
    sink.reset()
    root_pid = root()
    cpu_before = tree_cpu_seconds(root_pid) if root_pid is not None else math.nan
    sink_cpu_before = sink.cpu_seconds()
    with PeakMemorySampler(root) as mem:
        load = run_load_sync(_load_config(opts, port))
        stats, why = sink.wait_for(load.accepted, opts.delivery_timeout, opts.stall_timeout)
    cpu = tree_cpu_seconds(root_pid) - cpu_before if root_pid is not None else math.nan
    sink_cpu = sink.cpu_seconds() - sink_cpu_before
    # The sink counts a message at its end of data, before its 250 reaches the MTA: let the queue settle.
    wait_until(lambda: not backlog(), QUEUE_SETTLE_S, interval=0.05)
    left = backlog()
    latencies = _latencies_ms(load, sink.arrivals())
    row = _row(opts, repeat, target, load, stats, why, latencies, mem, cpu, sink_cpu, left)
    row = replace(row, wait_p50_ms=load.p50_ms, wait_p99_ms=load.p99_ms)
    if opts.probe:
        sink.reset()
        cfg = replace(_load_config(opts, port), sessions=1, messages=opts.probe, per_session=opts.probe)
        probe = run_load_sync(cfg)
        sink.wait_for(probe.accepted, opts.delivery_timeout, opts.stall_timeout)
        _log(f"  {target:8} one-session probe: wait p50={probe.p50_ms:.2f}ms p99={probe.p99_ms:.2f}ms")
        row = replace(row, probe_p50_ms=probe.p50_ms, probe_p99_ms=probe.p99_ms)
    return row


def _row(
    opts: Options,
    repeat: int,
    target: str,
    load: LoadResult,
    stats: SinkStats,
    why: str,
    latencies: list[float],
    mem: PeakMemorySampler,
    cpu: float,
    sink_cpu: float,
    left: int | None,
) -> Row:
    complete = not why and stats.last is not None
    e2e = (stats.last or math.nan) - load.started_at if complete else math.nan
    notes = list(load.failure_samples[:3])
    if why:
        notes.append(f"incomplete: {stats.unique}/{load.accepted} at the sink, {why}")
    if stats.duplicates:
        notes.append(f"{stats.duplicates} delivered twice")
    if stats.untagged:
        notes.append(f"{stats.untagged} other messages at the sink")
    row = Row(
        repeat=repeat,
        target=target,
        accepted=load.accepted,
        failed=load.failed,
        accept_s=load.elapsed,
        accept_msgs_per_s=load.msgs_per_s,
        delivered=stats.unique,
        e2e_s=e2e,
        e2e_msgs_per_s=stats.unique / e2e if e2e > 0 else math.nan,
        p50_ms=percentile(latencies, 50),
        p99_ms=percentile(latencies, 99),
        connections=stats.connections,
        max_open=stats.max_active,
        peak_rss_mib=mem.peak_rss_kb / MIB if mem.samples else math.nan,
        peak_pss_mib=mem.peak_pss_kb / MIB if mem.samples else math.nan,
        processes=mem.peak_processes,
        cpu_s=cpu,
        sink_cpu_s=sink_cpu,
        left=left,
        note="; ".join(notes),
    )
    _log(
        f"  {target:8} accepted={row.accepted} failed={row.failed} accept={num(row.accept_msgs_per_s)} msg/s "
        f"delivered={row.delivered} e2e={num(row.e2e_s, 2)}s ({num(row.e2e_msgs_per_s)} msg/s) "
        f"p50={num(row.p50_ms, 1)}ms p99={num(row.p99_ms, 1)}ms connections={row.connections} "
        f"({num(row.msgs_per_connection)} msg/conn, {row.max_open} at once) cpu={num(row.cpu_s, 2)}s "
        f"sink cpu={num(row.sink_cpu_s, 2)}s"
        + (f" left={left}" if left else "")
        + (f" [{row.note}]" if notes else "")
    )
    return row


def run_direct(opts: Options, repeat: int) -> Row:
    with CountingSink(pick_port(opts.sink_port)) as sink:
        return _measure(opts, repeat, "direct", sink.port, sink, lambda: None, lambda: None)


def run_hedwig_dkim(opts: Options, repeat: int) -> Row:
    return run_hedwig(opts, repeat, dkim=True)


def run_postfix(opts: Options, repeat: int) -> Row:
    sink_port = pick_port(opts.sink_port)
    cfg = PostfixConfig(
        smtpd_port=pick_port(opts.postfix_port, avoid=[sink_port]),
        sink_port=sink_port,
        message_size_limit=max(50 * 1024 * 1024, 2 * opts.size + 1024 * 1024),
        in_flow_delay=opts.in_flow_delay,
        extra=opts.postfix_params(),
    )
    base = Path(tempfile.mkdtemp(prefix="hedwig-bench-postfix-"))
    try:
        with CountingSink(sink_port) as sink, PostfixInstance(base, cfg) as pf:
            row = _measure(opts, repeat, "postfix", cfg.smtpd_port, sink, pf.master_pid, pf.queue_size)
            pf.snapshot()
            return row
    finally:
        if not opts.keep:
            shutil.rmtree(base, ignore_errors=True)


def run_hedwig(opts: Options, repeat: int, *, dkim: bool = False) -> Row:
    """hedwigpy relaying into a fresh sink; with `dkim`, signing every message with a key of type
    `opts.dkim` (target "hedwigpy+dkim")."""
    target = "hedwigpy+dkim" if dkim else "hedwigpy"
    sink_port = pick_port(opts.sink_port)
    with (
        CountingSink(sink_port) as sink,
        HedwigDaemon(
            sink_port=sink_port,
            cmd_template=opts.hedwig_cmd,
            max_message_size=2 * opts.size + 1024 * 1024,
            max_connections_per_ip=2 * opts.sessions,
            delivery=opts.hedwig_delivery(),
            keep=opts.keep,
            dkim_domain="example.com" if dkim else None,  # smtp_load's From: bench@example.com
            dkim_type=opts.dkim or "rsa",
        ) as daemon,
    ):

        def backlog() -> int | None:
            queued = daemon.queued()
            return None if queued is None else queued + daemon.deferred()

        row = _measure(opts, repeat, target, daemon.smtp_port, sink, lambda: daemon.pid, backlog)
        code = daemon.stop()
        if code not in (0, None):
            _log(f"  {target} exit {code}; log tail:\n{daemon.log_tail(1500)}")
    hwm = daemon.peak_hwm_kb / MIB
    extra = f"VmHWM {hwm:.1f} MiB; exit {code}"
    return replace(row, note="; ".join(x for x in (row.note, extra) if x))


# ----------------------------------------------------------------------------------------------------
# Command line


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.relay", description=__doc__.split("\n\n")[0])
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--messages", type=int, default=3000)
    p.add_argument("--sessions", type=int, default=20)
    p.add_argument("--size", type=int, default=4096, help="message size in bytes, headers included")
    p.add_argument("--per-session", type=int, default=50, help="messages per generator connection")
    p.add_argument("--rcpts", type=int, default=1)
    p.add_argument("--mode", choices=sorted(MODES), default="store-and-forward")
    p.add_argument(
        "--concurrency",
        type=int,
        default=10,
        help="connections to the sink: hedwigpy max_connections_per_host, Postfix "
        "default_destination_concurrency_limit (default 10)",
    )
    p.add_argument(
        "--per-connection",
        type=int,
        default=100,
        help="messages per connection to the sink: hedwigpy max_messages_per_connection, Postfix "
        "smtp_connection_reuse_count_limit (default 100)",
    )
    p.add_argument("--timeout", type=float, default=120.0, help="limit for each generator run (s)")
    p.add_argument(
        "--delivery-timeout", type=float, default=180.0, help="limit for the sink to get everything (s)"
    )
    p.add_argument(
        "--stall-timeout", type=float, default=30.0, help="give up when no message arrives for this long (s)"
    )
    p.add_argument("--hedwig-cmd", default=DEFAULT_CMD, help="{config} is replaced; run from the repo root")
    p.add_argument("--skip-hedwig", action="store_true")
    p.add_argument("--skip-postfix", action="store_true")
    p.add_argument("--skip-direct", action="store_true", help="no generator-into-sink baseline")
    p.add_argument(
        "--dkim",
        nargs="?",
        const="rsa",
        default="",
        choices=("rsa", "ed25519"),
        help="also run hedwigpy signing every message with a DKIM key, RSA-2048 (default) or Ed25519 "
        "(target hedwigpy+dkim; default output relay[_MODE]_dkim[_ed25519].md)",
    )
    p.add_argument("--postfix-port", type=int, default=10025, help="preferred; a free one is used if taken")
    p.add_argument("--sink-port", type=int, default=10026, help="preferred; a free one is used if taken")
    p.add_argument("--postfix-in-flow-delay", default="1s", help="Postfix's inbound throttle (default 1s)")
    p.add_argument(
        "--out", type=Path, help="markdown output (default bench/results/relay[_MODE][_SIZE B].md)"
    )
    p.add_argument("--keep", action="store_true", help="keep temporary directories (logs, spools)")
    p.add_argument(
        "--probe", type=int, default=300, help="messages of the one-session latency probe (0 = none)"
    )
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if min(args.repeat, args.messages, args.sessions, args.concurrency, args.per_connection) < 1:
        print(
            "repeat, messages, sessions, concurrency and per-connection must be at least 1", file=sys.stderr
        )
        return 2
    opts = Options(
        repeat=args.repeat,
        messages=args.messages,
        sessions=args.sessions,
        size=args.size,
        per_session=args.per_session,
        rcpts=args.rcpts,
        mode=args.mode,
        concurrency=args.concurrency,
        per_connection=args.per_connection,
        timeout=args.timeout,
        delivery_timeout=args.delivery_timeout,
        stall_timeout=args.stall_timeout,
        postfix_port=args.postfix_port,
        sink_port=args.sink_port,
        in_flow_delay=args.postfix_in_flow_delay,
        hedwig_cmd=args.hedwig_cmd,
        keep=args.keep,
        probe=args.probe,
        dkim=args.dkim,
    )
    return run_interruptibly(lambda: _main(opts, args))


def _main(opts: Options, args: argparse.Namespace) -> int:
    if not args.skip_postfix:
        ensure_postfix_installed(_log)
    pf_version = None if args.skip_postfix else postfix_version()
    runners: list[tuple[str, Callable[[Options, int], Row]]] = []
    if not args.skip_direct:
        runners.append(("direct", run_direct))
    if not args.skip_postfix:
        runners.append(("postfix", run_postfix))
    if not args.skip_hedwig:
        runners.append(("hedwigpy", run_hedwig))
    if args.dkim:
        runners.append(("hedwigpy+dkim", run_hedwig_dkim))
    rows: list[Row] = []
    errors: list[str] = []
    for repeat in range(1, opts.repeat + 1):
        _log(f"run {repeat}/{opts.repeat} (load average {loadavg()})")
        for name, runner in runners:
            try:
                rows.append(runner(opts, repeat))
            except (RuntimeError, TimeoutError, OSError) as exc:
                errors.append(f"run {repeat}: {name}: {exc}")
                _log(f"  {name} FAILED: {exc}")
        if rows:
            print(runs_table([r for r in rows if r.repeat == repeat]), flush=True)
    if not rows:
        print("nothing measured", file=sys.stderr)
        return 1
    publish(render(opts, rows, pf_version), args.out or default_out(opts.mode, opts.size, opts.dkim), errors)
    incomplete = any(r.failed or r.delivered < r.accepted for r in rows)
    return 1 if errors or incomplete else 0


if __name__ == "__main__":
    sys.exit(main())
