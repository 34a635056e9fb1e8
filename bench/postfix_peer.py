"""Postfix as a benchmark peer: a private Postfix instance relaying to `smtp-sink`, both on loopback.

Nothing here touches the system's Postfix configuration: the instance lives in its own directory (config,
queue and data directories, `postfix -c DIR`), listens only on 127.0.0.1:<port>, relays everything to
`smtp-sink` on 127.0.0.1:<sink port>, and does no DNS and no local delivery. Stopping waits for every process
it started, so repeated runs leave nothing behind.

Also here: reading the memory of a process tree from /proc (`tree_memory`, `PeakMemorySampler`) and running
Postfix's own load generator, `smtp-source` (`run_smtp_source`).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

SBIN = Path("/usr/sbin")
POSTFIX = SBIN / "postfix"
POSTCONF = SBIN / "postconf"
SMTP_SINK = SBIN / "smtp-sink"
SMTP_SOURCE = SBIN / "smtp-source"
SYSTEM_MASTER_PID = Path("/var/spool/postfix/pid/master.pid")
LOOPBACK = "127.0.0.1"
QUEUE_SUBDIRS = ("maildrop", "incoming", "active", "deferred", "hold")


# ----------------------------------------------------------------------------------------------------
# Installation and small helpers


def tool(name: str) -> str:
    """Absolute path of a Postfix tool (they live in /usr/sbin, which may not be on PATH)."""
    found = shutil.which(name) or shutil.which(name, path=str(SBIN))
    if found is None:
        raise FileNotFoundError(f"{name} not found; is the postfix package installed?")
    return found


def _system_master_running() -> bool:
    try:
        pid = int(SYSTEM_MASTER_PID.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return False
    return pid_alive(pid)


def ensure_postfix_installed(log: Callable[[str], None] = print) -> None:
    """Install Debian's postfix package when missing (root only); leave no system instance running."""
    if all(p.exists() for p in (POSTFIX, POSTCONF, SMTP_SINK, SMTP_SOURCE)):
        return
    if os.geteuid() != 0:
        raise RuntimeError("postfix is not installed and we are not root: apt-get install postfix")
    was_running = _system_master_running()
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    log("installing postfix: apt-get update && apt-get install -y postfix")
    subprocess.run(["apt-get", "update"], check=True, env=env, timeout=600)
    subprocess.run(["apt-get", "install", "-y", "postfix"], check=True, env=env, timeout=900)
    if not was_running and _system_master_running():
        log("stopping the system postfix instance the install started")
        subprocess.run([str(POSTFIX), "stop"], check=False, timeout=60)


def postfix_version() -> str:
    out = subprocess.run(
        [tool("postconf"), "-d", "-h", "mail_version"], capture_output=True, text=True, check=True, timeout=30
    )
    return out.stdout.strip()


def _default_parameters() -> set[str]:
    out = subprocess.run([tool("postconf"), "-d"], capture_output=True, text=True, check=True, timeout=30)
    return {line.split("=", 1)[0].strip() for line in out.stdout.splitlines() if "=" in line}


def port_is_free(port: int, host: str = LOOPBACK) -> bool:
    with socket.socket() as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def free_port(host: str = LOOPBACK) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        port: int = s.getsockname()[1]
        return port


def pick_port(preferred: int, avoid: Iterable[int] = (), host: str = LOOPBACK) -> int:
    """`preferred` when it is free (and not in `avoid`), else any free port."""
    avoid = set(avoid)
    if preferred and preferred not in avoid and port_is_free(preferred, host):
        return preferred
    for _ in range(100):
        port = free_port(host)
        if port not in avoid:
            return port
    raise RuntimeError("no free port")


def wait_for_port(host: str, port: int, timeout: float, alive: Callable[[], bool] = lambda: True) -> None:
    """Poll until a TCP connect to host:port succeeds; fail early when `alive()` turns false."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((host, port), timeout=1.0):
                return
        except OSError:
            pass
        if not alive():
            raise RuntimeError(f"process serving {host}:{port} exited before it listened")
        if time.monotonic() >= deadline:
            raise TimeoutError(f"nothing listens on {host}:{port} after {timeout:g}s")
        time.sleep(0.05)


# ----------------------------------------------------------------------------------------------------
# Processes and their memory, from /proc


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _stat_fields(pid: int) -> list[str] | None:
    """Fields of /proc/PID/stat after the command name (state is index 0, ppid 1, starttime 19)."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return None
    return raw[raw.rfind(b")") + 2 :].decode().split()


def start_time(pid: int) -> int | None:
    fields = _stat_fields(pid)
    return int(fields[19]) if fields else None


def process_tree(root: int) -> list[int]:
    """`root` and all its live descendants."""
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        fields = _stat_fields(int(entry.name))
        if fields:
            children.setdefault(int(fields[1]), []).append(int(entry.name))
    if not pid_alive(root):
        return []
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo.extend(children.get(pid, ()))
    return tree


def _status_kb(pid: int, key: str) -> int:
    try:
        with open(f"/proc/{pid}/status", "rb") as f:
            for line in f:
                if line.startswith(key.encode() + b":"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return 0


def _pss_kb(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/smaps_rollup", "rb") as f:
            for line in f:
                if line.startswith(b"Pss:"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return 0


def vm_hwm_kb(pid: int) -> int:
    """Peak resident set size of one process over its life (VmHWM), in KiB; 0 when unknown."""
    return _status_kb(pid, "VmHWM")


@dataclass(frozen=True)
class MemorySample:
    rss_kb: int = 0  # sum of VmRSS: counts shared pages once per process
    pss_kb: int = 0  # sum of Pss: shared pages divided among their users
    processes: int = 0


def tree_memory(root: int) -> MemorySample:
    pids = process_tree(root)
    return MemorySample(
        rss_kb=sum(_status_kb(p, "VmRSS") for p in pids),
        pss_kb=sum(_pss_kb(p) for p in pids),
        processes=len(pids),
    )


_CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def tree_cpu_seconds(root: int) -> float:
    """CPU time (user + system) of `root`'s tree so far: its live processes plus the children it reaped.

    Take the difference of two readings. Exact for trees whose processes are children of `root` (Postfix's
    master, a single daemon); 0.0 when `root` is gone.
    """
    fields = _stat_fields(root)
    if not fields:
        return 0.0
    ticks = int(fields[13]) + int(fields[14])  # cutime + cstime: reaped children (and theirs)
    for pid in process_tree(root):
        f = _stat_fields(pid)
        if f:
            ticks += int(f[11]) + int(f[12])  # utime + stime
    return ticks / _CLK_TCK


class PeakMemorySampler:
    """Samples the memory of a process tree in a background thread; keeps the peaks.

    `root` is called before each sample so the tree can be found late (e.g. a master pid file); returning None
    skips the sample. Use as a context manager around the measured work.
    """

    def __init__(self, root: Callable[[], int | None], interval: float = 0.1) -> None:
        self._root = root
        self._interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="rss-sampler", daemon=True)
        self.peak_rss_kb = 0
        self.peak_pss_kb = 0
        self.peak_processes = 0
        self.samples = 0

    def sample(self) -> None:
        root = self._root()
        if root is None:
            return
        mem = tree_memory(root)
        self.peak_rss_kb = max(self.peak_rss_kb, mem.rss_kb)
        self.peak_pss_kb = max(self.peak_pss_kb, mem.pss_kb)
        self.peak_processes = max(self.peak_processes, mem.processes)
        self.samples += 1

    def _loop(self) -> None:
        while True:
            self.sample()
            if self._stop.wait(self._interval):
                return

    def __enter__(self) -> PeakMemorySampler:
        self._thread.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        self.sample()


def _terminate(snapshot: Iterable[tuple[int, int | None]], timeout: float) -> None:
    """SIGKILL the processes of `snapshot` (pid, start time) still alive after `timeout`; pid-reuse safe."""
    deadline = time.monotonic() + timeout
    pending = [(pid, st) for pid, st in snapshot if st is not None]
    while pending:
        pending = [(pid, st) for pid, st in pending if start_time(pid) == st]
        if not pending or time.monotonic() >= deadline:
            break
        time.sleep(0.05)
    for pid, _ in pending:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


# ----------------------------------------------------------------------------------------------------
# smtp-sink


class SmtpSink:
    """`smtp-sink` on 127.0.0.1:<port>: accepts and discards every message (the upstream of both MTAs)."""

    def __init__(
        self, port: int, *, backlog: int = 1024, max_concurrency: int = 1024, user: str = "postfix"
    ) -> None:
        self.port = port
        self.backlog = backlog
        self.max_concurrency = max_concurrency
        self.user = user
        self.proc: subprocess.Popen[bytes] | None = None

    def command(self) -> list[str]:
        cmd = [tool("smtp-sink"), "-4", "-m", str(self.max_concurrency)]
        if os.geteuid() == 0:
            cmd += ["-u", self.user]  # required when started as root
        return [*cmd, f"{LOOPBACK}:{self.port}", str(self.backlog)]

    def start(self, timeout: float = 10.0) -> None:
        self.proc = subprocess.Popen(
            self.command(), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        proc = self.proc
        try:
            wait_for_port(LOOPBACK, self.port, timeout, alive=lambda: proc.poll() is None)
        except BaseException:
            err = self.stop()
            raise RuntimeError(f"smtp-sink did not start: {err}") from None

    def stop(self) -> str:
        """Stop the sink; returns what it wrote on stderr."""
        proc, self.proc = self.proc, None
        if proc is None:
            return ""
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
        if proc.stderr:
            proc.stderr.close()
        return err.strip()

    def __enter__(self) -> SmtpSink:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


# ----------------------------------------------------------------------------------------------------
# A private Postfix instance

# (service, type, private, unpriv, chroot, wakeup, maxproc, command): Postfix 3.x defaults, never chrooted
# (a chroot would need copies of /etc files inside the temporary queue directory).
_MASTER_SERVICES = """\
pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
tlsmgr    unix  -       -       n       1000?   1       tlsmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
proxywrite unix -       -       n       -       1       proxymap
smtp      unix  -       -       n       -       -       smtp
relay     unix  -       -       n       -       -       smtp
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
local     unix  -       n       n       -       -       local
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
"""


@dataclass
class PostfixConfig:
    smtpd_port: int = 10025
    sink_port: int = 10026
    process_limit: int = 100
    message_size_limit: int = 50 * 1024 * 1024
    in_flow_delay: str = "1s"  # Postfix's default; "0s" turns off its inbound throttle
    maillog: bool = True  # log to <base>/maillog through postlogd (there may be no syslog here)
    extra: dict[str, str] = field(default_factory=dict)

    def main_cf(self, base: Path, known: set[str]) -> dict[str, str]:
        params = {
            "compatibility_level": "3.6",
            "queue_directory": str(base / "queue"),
            "data_directory": str(base / "data"),
            "mail_owner": "postfix",
            "syslog_name": "postfix-hedwig-bench",
            "myhostname": "postfix-bench.local",
            "mydomain": "bench.local",
            "myorigin": "$myhostname",
            "inet_interfaces": "loopback-only",
            "inet_protocols": "ipv4",
            "mynetworks": "127.0.0.0/8",
            "mydestination": "",
            "relay_domains": "",
            "local_recipient_maps": "",
            "local_transport": "error:5.1.1 local delivery is disabled",
            "alias_maps": "",
            "alias_database": "",
            "smtpd_relay_restrictions": "permit_mynetworks, reject_unauth_destination",
            "smtpd_recipient_restrictions": "",
            "relayhost": f"[{LOOPBACK}]:{self.sink_port}",
            "default_transport": "smtp",
            "smtp_host_lookup": "native",
            "smtp_dns_support_level": "disabled",
            "disable_dns_lookups": "yes",
            "smtp_tls_security_level": "none",
            "smtpd_tls_security_level": "none",
            "smtpd_client_connection_count_limit": "10000",
            "smtpd_client_connection_rate_limit": "0",
            "smtpd_client_message_rate_limit": "0",
            "default_process_limit": str(self.process_limit),
            "message_size_limit": str(self.message_size_limit),
            "mailbox_size_limit": "0",
            "in_flow_delay": self.in_flow_delay,
            "biff": "no",
            "maillog_file": str(base / "maillog") if self.maillog else "",
            "maillog_file_prefixes": str(base),
            **self.extra,
        }
        return {k: v for k, v in params.items() if k in known}


class PostfixInstance:
    """One private Postfix instance under `base` (etc/, queue/, data/); start/stop are idempotent."""

    def __init__(self, base: Path, config: PostfixConfig) -> None:
        self.base = base
        self.config = config
        self.config_dir = base / "etc"
        self.queue_dir = base / "queue"
        self.data_dir = base / "data"
        self._snapshot: list[tuple[int, int | None]] = []

    def _postfix(
        self, *args: str, check: bool = True, timeout: float = 60
    ) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(
            [tool("postfix"), "-c", str(self.config_dir), *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if check and proc.returncode != 0:
            raise RuntimeError(f"postfix {' '.join(args)} failed ({proc.returncode}): {proc.stderr.strip()}")
        return proc

    def write_config(self) -> None:
        for d in (self.config_dir, self.queue_dir, self.data_dir):
            d.mkdir(parents=True, exist_ok=True)
        self.base.chmod(0o755)  # postfix daemons (user postfix) must reach the queue directory
        self.config_dir.chmod(0o755)
        (self.config_dir / "main.cf").write_text("")
        master = f"{LOOPBACK}:{self.config.smtpd_port} inet n - n - - smtpd\n" + _MASTER_SERVICES
        (self.config_dir / "master.cf").write_text(master)
        params = self.config.main_cf(self.base, _default_parameters())
        subprocess.run(
            [tool("postconf"), "-c", str(self.config_dir), "-e", *(f"{k}={v}" for k, v in params.items())],
            check=True,
            capture_output=True,
            timeout=30,
        )
        # Creates the queue's subdirectories with Postfix's own owners and modes.
        self._postfix("set-permissions", timeout=120)

    def master_pid(self) -> int | None:
        try:
            pid = int((self.queue_dir / "pid" / "master.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None
        return pid if pid_alive(pid) else None

    def start(self, timeout: float = 30.0) -> None:
        self.write_config()
        self._postfix("start", timeout=timeout)
        deadline = time.monotonic() + timeout
        while self.master_pid() is None:
            if time.monotonic() >= deadline:
                raise TimeoutError(f"postfix master did not start; see {self.base / 'maillog'}")
            time.sleep(0.05)
        wait_for_port(LOOPBACK, self.config.smtpd_port, timeout, alive=lambda: self.master_pid() is not None)

    def snapshot(self) -> None:
        """Remember the instance's processes, so `stop` can make sure all of them are gone."""
        master = self.master_pid()
        if master is not None:
            seen = {pid for pid, _ in self._snapshot}
            self._snapshot += [(p, start_time(p)) for p in process_tree(master) if p not in seen]

    def stop(self, timeout: float = 20.0) -> None:
        self.snapshot()
        if self.master_pid() is not None:
            self._postfix("stop", check=False, timeout=timeout)
            deadline = time.monotonic() + timeout
            while self.master_pid() is not None and time.monotonic() < deadline:
                time.sleep(0.05)
            if self.master_pid() is not None:
                self._postfix("abort", check=False, timeout=timeout)
        _terminate(self._snapshot, timeout=5.0)
        self._snapshot = []

    def queue_size(self) -> int:
        """Messages not yet delivered (files in maildrop, incoming, active, deferred, hold)."""
        total = 0
        for sub in QUEUE_SUBDIRS:
            for _root, _dirs, files in os.walk(self.queue_dir / sub):
                total += len(files)
        return total

    def __enter__(self) -> PostfixInstance:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


@dataclass
class PostfixPeer:
    sink: SmtpSink
    postfix: PostfixInstance

    @property
    def smtpd_port(self) -> int:
        return self.postfix.config.smtpd_port

    @property
    def sink_port(self) -> int:
        return self.sink.port


@contextlib.contextmanager
def postfix_peer(
    config: PostfixConfig | None = None, base: Path | None = None, keep: bool = False
) -> Iterator[PostfixPeer]:
    """Start smtp-sink and a private Postfix relaying to it; stop both (and remove `base`) on exit.

    Ports that are taken are replaced by free ones (see `PostfixPeer.smtpd_port` / `.sink_port`).
    """
    ensure_postfix_installed()
    cfg = config or PostfixConfig()
    cfg.sink_port = pick_port(cfg.sink_port)
    cfg.smtpd_port = pick_port(cfg.smtpd_port, avoid=[cfg.sink_port])
    own_base = base is None
    work = Path(tempfile.mkdtemp(prefix="hedwig-bench-postfix-")) if base is None else base
    try:
        with SmtpSink(cfg.sink_port) as sink, PostfixInstance(work, cfg) as postfix:
            yield PostfixPeer(sink, postfix)
    finally:
        if own_base and not keep:
            shutil.rmtree(work, ignore_errors=True)


def wait_until(predicate: Callable[[], bool], timeout: float, interval: float = 0.05) -> float | None:
    """Seconds until `predicate()` held, or None when `timeout` passed first."""
    started = time.monotonic()
    while True:
        if predicate():
            return time.monotonic() - started
        if time.monotonic() - started >= timeout:
            return None
        time.sleep(interval)


# ----------------------------------------------------------------------------------------------------
# smtp-source


@dataclass(frozen=True)
class SourceResult:
    messages: int
    sessions: int
    elapsed: float
    returncode: int
    completed: int | None  # DATA commands completed, from the -c counter; None when unreadable
    stderr: str

    @property
    def ok(self) -> bool:
        return self.returncode == 0

    @property
    def accepted(self) -> int:
        if self.ok:
            return self.messages
        return self.completed or 0

    @property
    def msgs_per_s(self) -> float:
        return self.accepted / self.elapsed if self.elapsed > 0 else 0.0


def run_smtp_source(
    port: int,
    *,
    sessions: int,
    messages: int,
    size: int,
    host: str = LOOPBACK,
    reuse: bool = True,
    rcpts: int = 1,
    timeout: float = 600.0,
) -> SourceResult:
    """Run Postfix's `smtp-source` against host:port and time it with `time.perf_counter`.

    `size` is the payload after smtp-source's own few headers. `reuse` (-d) keeps each session's connection
    for all its messages, like our generator; without it every message opens a new connection.
    """
    cmd = [tool("smtp-source"), "-4", "-c", "-s", str(sessions), "-m", str(messages), "-l", str(size)]
    cmd += ["-M", "loadgen.example.com", "-f", "from@example.com", "-t", "to@example.net"]
    if reuse:
        cmd.append("-d")
    if rcpts > 1:
        cmd += ["-r", str(rcpts)]
    cmd.append(f"{host}:{port}")
    started = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, timeout=timeout, check=False)
        returncode, out, err = proc.returncode, proc.stdout, proc.stderr
    except subprocess.TimeoutExpired as exc:
        returncode = -1
        out = exc.stdout or b""
        err = (exc.stderr or b"") + f"\ntimeout after {timeout:g}s".encode()
    elapsed = time.perf_counter() - started
    counts = [int(t) for t in out.replace(b"\r", b"\n").split() if t.isdigit()]
    return SourceResult(
        messages=messages,
        sessions=sessions,
        elapsed=elapsed,
        returncode=returncode,
        completed=counts[-1] if counts else None,
        stderr=err.decode(errors="replace").strip(),
    )
