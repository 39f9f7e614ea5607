"""Only the optional C extension lives here; everything else is in setup.cfg.

``optional=True``: without a compiler the build warns and goes on, and
relinker runs its pure-Python fast route (same behaviour, slower re-checks).
"""

import os

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext


class BuildExtOrNone(build_ext):
    """A failed build leaves no extension at all: not one an earlier build left in build/ (or in place),
    which would be installed as if built from these sources."""

    def build_extension(self, ext):
        try:
            super().build_extension(ext)
        except Exception:
            stale = self.get_ext_fullpath(ext.name)
            if os.path.exists(stale):
                os.remove(stale)
            raise


setup(ext_modules=[Extension("relinker._speedups", ["relinker/_speedups.c"], optional=True)],
      cmdclass={"build_ext": BuildExtOrNone})
