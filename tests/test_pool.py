"""The process pool's own mechanics (runs, resumes and signals are tested end to end elsewhere)."""

import gc
import os

import pytest

from conftest import _speedups
from relinker.pool import _collector_paused, _stop_fork_server, _worker_context


@pytest.fixture
def collector_on():
    was = gc.isenabled()
    gc.enable()
    yield
    if not was:
        gc.disable()


def test_the_collector_is_off_while_a_range_is_worked_and_back_on_after(collector_on):
    with _collector_paused():
        assert not gc.isenabled()
    assert gc.isenabled()


def test_the_collector_is_back_on_after_a_range_that_failed(collector_on):
    with pytest.raises(RuntimeError), _collector_paused():
        raise RuntimeError("range failed")
    assert gc.isenabled()


def test_a_collector_switched_off_by_the_caller_stays_off(collector_on):
    gc.disable()
    with _collector_paused():
        pass
    assert not gc.isenabled()


def _report_route(pipe):
    from relinker import linker

    pipe.send((os.environ.get("RELINKER_PURE_PYTHON"), linker.fast_route is linker._fast_route_python))


def test_each_pool_forks_its_workers_with_the_environment_of_its_start(monkeypatch):
    """Workers come from a fork server started for their pool: a setting changed since the last pool reaches them."""
    seen = []
    for setting in ("1", None, "1"):
        if setting is None:
            monkeypatch.delenv("RELINKER_PURE_PYTHON", raising=False)
        else:
            monkeypatch.setenv("RELINKER_PURE_PYTHON", setting)
        context = _worker_context()
        reader, writer = context.Pipe(duplex=False)
        process = context.Process(target=_report_route, args=(writer,))
        process.start()
        writer.close()
        seen.append(reader.recv())
        process.join()
    _stop_fork_server()
    assert seen == [("1", True), (None, _speedups is None), ("1", True)]
