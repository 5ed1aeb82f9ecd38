"""The one rule for missing tools (``tests/missing.py`` + ``tests/conftest.py``): a skip that names how to
install the tool, a failure when ``CI`` is set, and no failure for a ``gpu`` test, CI or not.

Each case runs pytest in a subprocess on a small test file under ``tests/`` (so this conftest applies),
with and without ``CI``.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

PROBE = '''
import pytest

from tests.missing import missing, require_module, require_tool


def test_a_tool() -> None:
    require_tool("no-such-tool-asyncthink", "apt-get install no-such-tool")


def test_a_package() -> None:
    require_module("no_such_package_asyncthink", "pip install no-such-package")


@pytest.mark.gpu
def test_on_a_gpu() -> None:
    missing("no CUDA device", "run it on a machine with an NVIDIA GPU")


def test_a_plain_skip() -> None:
    pytest.skip("not a missing requirement: never a failure")


def test_a_tool_that_is_here() -> None:
    assert require_tool("sh", "apt-get install dash").endswith("/sh")
'''


@pytest.fixture(scope="module")
def probe() -> Path:
    path = ROOT / "tests" / "unit" / f"test_zz_missing_probe_{os.getpid()}.py"
    path.write_text(PROBE)
    yield path
    path.unlink()


def run(probe: Path, ci: str | None) -> tuple[dict[str, str], str]:
    """``({test name: PASSED/FAILED/SKIPPED}, output)`` of pytest on the probe, ``CI`` set to ``ci`` (None: unset)."""
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    if ci is not None:
        env["CI"] = ci
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-rA", "-p", "no:cacheprovider", str(probe)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    outcomes: dict[str, str] = {}
    for line in proc.stdout.splitlines():  # "PASSED path::name", "FAILED path::name - why", "SKIPPED [1] path:line: why"
        word, _, rest = line.partition(" ")
        if word in ("PASSED", "FAILED") and "::" in rest:
            outcomes[rest.split("::")[1].split(" ")[0]] = word
    return outcomes, proc.stdout


def test_without_ci_a_missing_tool_is_a_skip_that_says_how_to_install_it(probe: Path) -> None:
    outcomes, output = run(probe, None)
    assert outcomes == {"test_a_tool_that_is_here": "PASSED"}, output
    assert output.rstrip().splitlines()[-1].startswith("1 passed, 4 skipped"), output
    assert "no-such-tool-asyncthink is not on PATH; to run this test: apt-get install no-such-tool" in output
    assert "no_such_package_asyncthink is not installed; to run this test: pip install no-such-package" in output


def test_with_ci_a_missing_tool_fails_except_in_a_gpu_test(probe: Path) -> None:
    outcomes, output = run(probe, "true")
    assert outcomes == {"test_a_tool": "FAILED", "test_a_package": "FAILED", "test_a_tool_that_is_here": "PASSED"}
    # skipped still: the gpu test's missing device, and a plain skip (not a missing requirement)
    assert output.rstrip().splitlines()[-1].startswith("2 failed, 1 passed, 2 skipped"), output
    assert "CI is set, so a missing requirement fails the test" in output
    assert "apt-get install no-such-tool" in output  # the failure still says how to fix it
