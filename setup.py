"""Only here to build the cffi extension at install time; the metadata lives in pyproject.toml."""

from setuptools import setup

setup(cffi_modules=["postcopy_core/_uffd_build.py:ffibuilder"])
