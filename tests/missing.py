"""The one way a test says that something it needs is not here: a tool, a package, a server.

``missing(what, install)`` skips the test with a message that says how to get ``what``, except where the
environment variable ``CI`` is set: there ``tests/conftest.py`` turns that skip into a failure, because CI
must provide everything the suite uses (``.ci/run`` installs the tools; the test extras the packages).
Tests marked ``gpu`` are exempt: CI never has a GPU, so they skip there as anywhere.

Imports nothing but pytest, so any test (the GPU ones included) can use it on a machine that has only
the packages that test needs.
"""

from __future__ import annotations

import importlib.util
import shutil
from typing import NoReturn

import pytest


class Missing(pytest.skip.Exception):  # type: ignore[misc,name-defined]
    """A skip for want of a tool, package or server (a failure under ``CI``, unless the test is ``gpu``)."""


def missing(what: str, install: str) -> NoReturn:
    """Skip (or, under ``CI``, fail) the calling test: ``what`` is not here; ``install`` says how to get it."""
    raise Missing(f"{what}; to run this test: {install} (with CI set this is a failure)", _use_item_location=True)


def require_tool(name: str, install: str) -> str:
    """The path of the executable ``name`` on PATH, or :func:`missing`."""
    path = shutil.which(name)
    if path is None:
        missing(f"{name} is not on PATH", install)
    return path


def require_module(name: str, install: str) -> None:
    """:func:`missing` unless the Python package ``name`` can be imported (it is not imported here)."""
    if importlib.util.find_spec(name) is None:
        missing(f"the Python package {name} is not installed", install)
