"""Helpers shared by the tests: capability dropping, CLI runners, catalogue builders."""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os

CAP_DAC_OVERRIDE = 1
CAP_DAC_READ_SEARCH = 2
_LINUX_CAPABILITY_VERSION_3 = 0x20080522


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]


def _capabilities(libc, header, data, setting: bool) -> None:
    call = libc.capset if setting else libc.capget
    if call(ctypes.byref(header), data) != 0:
        raise OSError(ctypes.get_errno(), "capget/capset failed")


@contextlib.contextmanager
def obeying_file_permissions():
    """Make this thread subject to file permission bits, even as root.

    As root, mode 000 means nothing; dropping CAP_DAC_OVERRIDE and
    CAP_DAC_READ_SEARCH from the effective set (they stay permitted, so they
    can be raised again) lets a test exercise "unreadable" for real.
    """
    if os.geteuid() != 0:
        yield
        return
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    header = _CapHeader(_LINUX_CAPABILITY_VERSION_3, 0)
    data = (_CapData * 2)()
    _capabilities(libc, header, data, setting=False)
    saved = data[0].effective
    data[0].effective &= ~((1 << CAP_DAC_OVERRIDE) | (1 << CAP_DAC_READ_SEARCH))
    _capabilities(libc, header, data, setting=True)
    try:
        yield
    finally:
        data[0].effective = saved
        _capabilities(libc, header, data, setting=True)
