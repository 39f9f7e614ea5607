"""Run relinker as real processes, and find and signal its workers."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import psutil


#: Where relinker processes run: not the checkout, so `-m relinker` imports the
#: installed package (the one the in-process tests use), not the source tree.
NEUTRAL_DIRECTORY = os.path.abspath(os.sep)


def start(argv: list[str], *, ignore_sigint: bool = False, ignore_sighup: bool = False,
          **kwargs) -> subprocess.Popen:
    """`python -m relinker ARGV` in its own process group (so the group can be killed).

    ``ignore_sigint``: started with SIGINT ignored, as a script's background job is;
    ``ignore_sighup``: with SIGHUP ignored, as ``nohup`` starts it.
    """
    kwargs.setdefault("cwd", NEUTRAL_DIRECTORY)
    command = [sys.executable, "-m", "relinker", *argv]
    ignored = " ".join(name for name, wanted in (("INT", ignore_sigint), ("HUP", ignore_sighup)) if wanted)
    if ignored:
        command = ["sh", "-c", f'trap "" {ignored}; exec "$@"', "sh", *command]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True,
                            **kwargs)


def finish(process: subprocess.Popen, timeout: float = 120) -> tuple[int, str, str]:
    """Wait for a process ``start`` started; past ``timeout`` its whole group is killed (never left running)."""
    try:
        out, err = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_group(process)
        process.communicate()
        raise
    return process.returncode, out.decode(), err.decode()


def wait_for(condition, timeout: float = 60, interval: float = 0.01, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out waiting for {what}")


def range_states(conn, run_id: int | None = None) -> dict[str, int]:
    if run_id is None:
        run_id = conn.execute("SELECT max(run_id) FROM relinker_run").fetchone()[0]
        if run_id is None:
            return {}
    return dict(conn.execute("SELECT status, count(*) FROM relinker_range WHERE run_id = %s GROUP BY status",
                             (run_id,)).fetchall())


def running_worker_pids(conn) -> list[int]:
    """PIDs of the worker processes holding running ranges on this host."""
    rows = conn.execute("SELECT worker FROM relinker_range WHERE status = 'running' AND worker IS NOT NULL")
    return [int(w.rsplit(":", 1)[1]) for (w,) in rows]


def kill_group(process: subprocess.Popen, sig=signal.SIGKILL) -> None:
    os.killpg(process.pid, sig)


def children(process: subprocess.Popen) -> list[int]:
    try:
        return [c.pid for c in psutil.Process(process.pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        return []
