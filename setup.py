"""Only the optional C extension lives here; everything else is in setup.cfg.

``optional=True``: without a compiler the build warns and goes on, and
relinker runs its pure-Python fast route (same behaviour, slower re-checks).
"""

from setuptools import Extension, setup

setup(ext_modules=[Extension("relinker._speedups", ["relinker/_speedups.c"], optional=True)])
