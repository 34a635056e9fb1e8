"""A deep queue: how long hedwigpy takes to be ready with N deferred messages in its spool, and how much CPU
it burns idling with them (nothing is due for an hour, so an ideal daemon does nothing at all).

    python -m bench.queue_scale                 # 100,000 deferred messages, 3 restarts, 60 s idle each

The spool is written directly in hedwigpy's on-disk format (data file + status file per message, the
data file's mtime = next attempt), without fsync, which is how a spool looks after a long outage.
"Ready" is the daemon's `ready` log event: every listener bound and the schedule rebuilt. Idle CPU is the
daemon's user + system time over the idle window (from /proc), scaled to a minute.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import tomli_w

from hedwigpy.storage import DeliveryStatus, Envelope, new_message_id
from hedwigpy.storage._format import encode_envelope
from hedwigpy.storage._status import encode_status

from .hedwig_peer import REPO, bench_config
from .postfix_peer import free_port, vm_hwm_kb
from .report import machine_line, markdown_table, median, num, run_interruptibly

RESULTS = REPO / "bench" / "results" / "queue_scale.md"
CLK_TCK = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class Run:
    ready_s: float
    rebuild_s: float | None
    idle_cpu_s_per_min: float
    hwm_mib: float
    scheduled: int | None


def populate(spool: Path, count: int, size: int, due_in: float) -> None:
    """`count` deferred messages of about `size` bytes, each with a status saying one attempt failed."""
    for name in ("tmp", "queued", "deferred", "held", "bounced", "corrupt", "status"):
        (spool / name).mkdir(parents=True, exist_ok=True)
    body = b"Subject: deep queue\r\nFrom: <a@example.org>\r\n\r\n" + b"x" * max(size - 60, 0) + b"\r\n"
    now = time.time()
    due = now + due_in
    start_ns = time.time_ns() - count * 1000
    for i in range(count):
        message_id = new_message_id(start_ns + i * 1000)
        envelope = Envelope(sender="a@example.org", recipients=(f"r{i}@example.net",), received_at=now - 60)
        path = spool / "deferred" / f"{message_id}.msg"
        path.write_bytes(encode_envelope(envelope) + body)
        os.utime(path, (due, due))
        status = DeliveryStatus.initial(envelope)
        (spool / "status" / f"{message_id}.json").write_bytes(encode_status(status))


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime, stime


def one_run(base: Path, idle: float, timeout: float) -> Run:
    config = bench_config(base, smtp_port=free_port(), http_port=free_port(), sink_port=free_port())
    config["log"] = {"level": "info", "format": "json"}
    config_path = base / "hedwig.toml"
    config_path.write_text(tomli_w.dumps(config))
    log_path = base / "daemon.log"
    log_path.unlink(missing_ok=True)
    started = time.monotonic()
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "hedwigpy", "serve", "-c", str(config_path)],
            cwd=REPO,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        ready_s, events = wait_ready(proc, log_path, started, timeout)
        rebuild = next((e for e in events if e.get("event") == "schedule rebuilt"), {})
        time.sleep(2)  # let start-up work finish before the idle window
        cpu0, t0 = cpu_seconds(proc.pid), time.monotonic()
        time.sleep(idle)
        cpu1, t1 = cpu_seconds(proc.pid), time.monotonic()
        hwm = vm_hwm_kb(proc.pid) / 1024
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return Run(
        ready_s=ready_s,
        rebuild_s=float(str(rebuild["seconds"])) if "seconds" in rebuild else None,
        idle_cpu_s_per_min=(cpu1 - cpu0) * 60 / (t1 - t0),
        hwm_mib=hwm,
        scheduled=int(str(rebuild["messages"])) if "messages" in rebuild else None,
    )


def wait_ready(
    proc: subprocess.Popen[bytes], log_path: Path, started: float, timeout: float
) -> tuple[float, list[dict[str, object]]]:
    while time.monotonic() - started < timeout:
        if proc.poll() is not None:
            raise RuntimeError(f"hedwigpy exited with {proc.returncode}:\n{log_path.read_text()[-3000:]}")
        events = []
        for line in log_path.read_bytes().splitlines():
            try:
                events.append(json.loads(line))
            except ValueError:
                continue
        if any(e.get("event") == "ready" for e in events):
            return time.monotonic() - started, events
        time.sleep(0.02)
    raise TimeoutError(f"not ready after {timeout}s:\n{log_path.read_text()[-3000:]}")


def render(opts: argparse.Namespace, runs: Sequence[Run], populate_s: float) -> str:
    rows = [
        [
            str(i + 1),
            num(r.ready_s, 2),
            num(r.rebuild_s, 2),
            str(r.scheduled),
            num(r.idle_cpu_s_per_min, 3),
            num(r.hwm_mib),
        ]
        for i, r in enumerate(runs)
    ]
    header = ["run", "ready s", "schedule rebuild s", "scheduled", "idle CPU s/min", "peak RSS MiB"]
    return "\n".join(
        [
            f"# Deep queue: restart time and idle CPU with {opts.messages:,} deferred messages",
            "",
            f"- date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
            machine_line(),
            f"- spool: {opts.messages:,} messages of ~{opts.size} B in deferred/, each with a status file, "
            f"due in {opts.due_in:g} s (written directly in the spool format in {populate_s:.1f} s)",
            f"- per run: start `python -m hedwigpy serve`, wait for the `ready` log event, "
            f"then {opts.idle:g} s idle",
            "",
            "## Medians",
            "",
            markdown_table(
                ["ready s", "idle CPU s/min", "peak RSS MiB"],
                [
                    [
                        num(median([r.ready_s for r in runs]), 2),
                        num(median([r.idle_cpu_s_per_min for r in runs]), 3),
                        num(median([r.hwm_mib for r in runs])),
                    ]
                ],
            ),
            "",
            "## Runs",
            "",
            markdown_table(header, rows),
            "",
            "Target (issue 4): ready in under 10 s; idle CPU near zero, because nothing rescans the spool: "
            'the worker sleeps until the earliest due time. "ready s" runs from process start (interpreter '
            'and imports included) to the `ready` event; "schedule rebuild s" is the scheduler\'s own part.',
            "",
        ]
    )


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.queue_scale", description=__doc__.split("\n\n")[0])
    p.add_argument("--messages", type=int, default=100_000)
    p.add_argument("--size", type=int, default=2048, help="bytes per message")
    p.add_argument("--repeat", type=int, default=3, help="restarts measured")
    p.add_argument("--idle", type=float, default=60.0, help="idle window per run (s)")
    p.add_argument("--due-in", type=float, default=3600.0, help="when the messages are due (s from now)")
    p.add_argument("--timeout", type=float, default=300.0, help="limit for each start (s)")
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--keep", action="store_true")
    opts = p.parse_args(argv)

    def body() -> int:
        base = Path(tempfile.mkdtemp(prefix="hedwig-queue-scale-"))
        try:
            t = time.monotonic()
            populate(base / "spool", opts.messages, opts.size, opts.due_in)
            populate_s = time.monotonic() - t
            print(f"populated {opts.messages} messages in {populate_s:.1f}s", flush=True)
            runs = []
            for i in range(opts.repeat):
                run = one_run(base, opts.idle, opts.timeout)
                print(f"run {i + 1}: {run}", flush=True)
                runs.append(run)
            opts.out.write_text(render(opts, runs, populate_s))
            print(f"written to {opts.out}")
        finally:
            if not opts.keep:
                shutil.rmtree(base, ignore_errors=True)
        return 0

    return run_interruptibly(body)


if __name__ == "__main__":
    sys.exit(main())
