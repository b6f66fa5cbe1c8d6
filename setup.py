"""Builds the cffi extension at install time and ships the C reference; the metadata lives in pyproject.toml."""

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

REFERENCE = Path("bench") / "uffd_ref.c"  # kept in bench/ with the benchmarks that run it


class BuildPyWithReference(build_py):
    """Also copy bench/uffd_ref.c into the package (harness/data/), so that `loadtest --reference`
    and bench/compare_ref.py find it in a plain install; an editable one reads bench/ directly."""

    def run(self) -> None:
        super().run()
        if REFERENCE.is_file() and not getattr(self, "editable_mode", False):
            target = Path(self.build_lib) / "harness" / "data" / REFERENCE.name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(REFERENCE, target)


setup(cffi_modules=["postcopy_core/_cffi_src/build.py:ffibuilder"], cmdclass={"build_py": BuildPyWithReference})
