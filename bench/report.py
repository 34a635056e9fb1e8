"""Shared by the comparisons: markdown tables, medians and ratios, the machine's description, clean Ctrl-C.

`run_interruptibly` runs a benchmark's body so that Ctrl-C or SIGTERM unwinds through the context managers
that stop every process the benchmark started (inside a trio run or outside one), then exits with 130.
"""

from __future__ import annotations

import importlib.metadata
import math
import os
import platform
import signal
import statistics
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from types import FrameType

RESULTS = Path(__file__).resolve().parent / "results"
MIB = 1024.0


def num(value: float | None, digits: int = 1) -> str:
    """A number for a table; "—" for missing or NaN."""
    if value is None or math.isnan(value):
        return "—"
    return f"{value:.{digits}f}"


def ratio(a: float, b: float) -> str:
    """`a / b` as "1.23x"; "—" when either is missing or `b` is zero."""
    if math.isnan(a) or math.isnan(b) or b == 0:
        return "—"
    return f"{a / b:.2f}x"


def median(values: Sequence[float]) -> float:
    """Median of the finite values; NaN when there are none."""
    finite = [v for v in values if not math.isnan(v)]
    return statistics.median(finite) if finite else math.nan


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]
    lines = ["| " + " | ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)) + " |"]
    lines.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    lines += ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |" for r in rows]
    return "\n".join(lines)


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def loadavg() -> str:
    try:
        return " ".join(f"{x:.1f}" for x in os.getloadavg())
    except OSError:
        return "unknown"


def hedwig_version() -> str:
    try:
        return importlib.metadata.version("hedwigpy")
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def machine_line() -> str:
    return (
        f"- machine: {os.cpu_count()} CPUs ({cpu_model()}), Linux {platform.release()}, "
        f"Python {platform.python_version()}; load average {loadavg()} at the end "
        "(other work on the machine skews the figures)"
    )


def _sigterm(signum: int, frame: FrameType | None) -> None:
    # Turn SIGTERM into SIGINT: trio (inside a load run) and Python (outside) both raise KeyboardInterrupt
    # cleanly from it, which unwinds through the context managers that stop every process we started.
    signal.raise_signal(signal.SIGINT)


def run_interruptibly(body: Callable[[], int]) -> int:
    """`body()`, with Ctrl-C and SIGTERM turned into a clean unwind and exit code 130."""
    signal.signal(signal.SIGINT, signal.default_int_handler)  # even when started with SIGINT ignored (`&`)
    signal.signal(signal.SIGTERM, _sigterm)
    try:
        return body()
    except KeyboardInterrupt:
        pass
    except BaseExceptionGroup as group:  # from inside a trio nursery
        if group.subgroup(KeyboardInterrupt) is None:
            raise
    print("interrupted; every started process was stopped", file=sys.stderr)
    return 130


def publish(report: str, out: str | Path, errors: Sequence[str] = ()) -> None:
    """Print the report (with the first line of each error appended) and write it to `out`."""
    if errors:
        report += "\nErrors:\n\n" + "\n".join(f"- {e.splitlines()[0]}" for e in errors) + "\n"
    print()
    print(report)
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(report)
    print(f"written to {path}")
