"""The process pool's own mechanics (runs, resumes and signals are tested end to end elsewhere)."""

import gc

import pytest

from relinker.pool import _collector_paused


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
