"""Only the optional C extension lives here; everything else is in setup.cfg.

``optional=True``: without a compiler the build warns and goes on, and
relinker runs its pure-Python fast route (same behaviour, slower re-checks).
"""

import os

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext


class BuildExtOrNone(build_ext):
    """A failed build leaves no extension at all: not one an earlier build left in build/, nor one
    built in place (an editable install's), which would be loaded as if built from these sources."""

    def build_extension(self, ext):
        try:
            super().build_extension(ext)
        except Exception:
            for stale in (self.get_ext_fullpath(ext.name), self._in_place(ext)):
                if os.path.exists(stale):
                    os.remove(stale)
            raise

    def _in_place(self, ext) -> str:
        """Where an in-place build puts the extension, beside its package's sources."""
        fullname = self.get_ext_fullname(ext.name)
        package = ".".join(fullname.split(".")[:-1])
        package_dir = os.path.abspath(self.get_finalized_command("build_py").get_package_dir(package))
        return os.path.join(package_dir, os.path.basename(self.get_ext_filename(fullname)))


setup(ext_modules=[Extension("relinker._speedups", ["relinker/_speedups.c"], optional=True)],
      cmdclass={"build_ext": BuildExtOrNone})
