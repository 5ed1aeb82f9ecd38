"""The CI compose stage (``.ci/compose_stage.sh``) as files: where CI runs it, what the override publishes,
which images the stand-ins replace, and that a stage that cannot run says SKIP (or fails when required).

The stage itself (a Docker engine, image builds, a whole stack) is run by ``.ci/run``, not here.
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.missing import require_tool

ROOT = Path(__file__).resolve().parents[2]
STAGE = ROOT / ".ci" / "compose_stage.sh"


class ComposeLoader(yaml.SafeLoader):
    """Reads Compose v2's merge tags (!override, !reset) as plain values."""


ComposeLoader.add_constructor("!override", lambda loader, node: loader.construct_sequence(node))  # type: ignore[arg-type]
ComposeLoader.add_constructor("!reset", lambda loader, node: loader.construct_sequence(node))  # type: ignore[arg-type]


def readme_test_command() -> str:
    blocks = re.findall(r"```\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)
    commands = [b.strip() for b in blocks if b.strip().startswith("python3 -m venv")]
    assert len(commands) >= 2, "the README's run and test commands"
    return commands[1]


def test_ci_runs_the_readme_test_command_verbatim_then_the_stage() -> None:
    lines = (ROOT / ".ci" / "run").read_text().splitlines()
    command = readme_test_command()
    assert command in lines, "the README's test command must stay a line of .ci/run, unchanged"
    at = lines.index(command)
    after = "\n".join(lines[at + 1 :])
    assert "bash .ci/compose_stage.sh" in after
    # a failure anywhere in the test command stops CI before the stage (set -e alone misses all but its last step)
    assert lines[at + 1 : at + 3] == ['tests_status=$?', '[ "$tests_status" = 0 ] || exit "$tests_status"']
    assert "timeout" in after and "77" in after


def test_the_stage_parses() -> None:
    subprocess.run(["bash", "-n", str(STAGE)], check=True, timeout=30)


def test_the_override_publishes_only_loopback() -> None:
    override: dict[str, Any] = yaml.load((ROOT / ".ci" / "compose.ci.yaml").read_text(), Loader=ComposeLoader)
    services = override["services"]
    [gateway_port] = services["gateway"]["ports"]
    assert gateway_port.startswith("127.0.0.1:${ASYNCTHINK_CI_GATEWAY_PORT") and gateway_port.endswith(":8000")
    assert services["flower"]["ports"] == []
    base = yaml.safe_load((ROOT / "compose.yaml").read_text())["services"]
    published = {name for name, svc in base.items() if svc.get("ports")}
    assert published - {"sglang"} <= set(services), "every port the cpu profile publishes is overridden"
    for name in ("postgres", "redis"):  # the host's own servers own 5432 and 6379
        assert not base[name].get("ports") and not services.get(name, {}).get("ports")


def test_the_stand_ins_carry_the_names_the_stack_uses() -> None:
    text = STAGE.read_text()
    built = dict(re.findall(r"-t (\S+) -f \.ci/standins/(\w+)\.Dockerfile", text))
    assert set(built.values()) == {"base", "python", "postgres", "redis"}
    compose = yaml.safe_load((ROOT / "compose.yaml").read_text())["services"]
    dockerfile_from = re.search(r"^FROM (\S+)", (ROOT / "docker" / "Dockerfile").read_text(), flags=re.M)
    assert dockerfile_from and dockerfile_from.group(1) in built
    assert compose["postgres"]["image"] in built and compose["redis"]["image"] in built
    for name in ("python", "postgres", "redis"):  # each says it is a stand-in, and what differs
        head = (ROOT / ".ci" / "standins" / f"{name}.Dockerfile").read_text().split("\nFROM", 1)[0]
        assert "Stand-in for" in head and "Debian" in head
    assert "PostgreSQL **15**" in (ROOT / ".ci" / "standins" / "postgres.Dockerfile").read_text()


def unprivileged() -> list[str]:
    if os.geteuid() != 0:
        return []
    setpriv = require_tool("setpriv", "running as root, the stage runs unprivileged through setpriv: apt-get install util-linux")
    return [setpriv, "--reuid=65534", "--regid=65534", "--clear-groups"]


@pytest.mark.parametrize("required", [False, True])
def test_a_stage_that_cannot_run_says_skip_and_fails_when_required(required: bool) -> None:
    """Not root: nothing is started or changed, and the outcome is a loud SKIP, never a silent pass."""
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin")}
    if required:
        env["ASYNCTHINK_REQUIRE_COMPOSE"] = "1"
    proc = subprocess.run(  # the script on stdin: readable whoever runs it
        [*unprivileged(), "bash", "-s"], input=STAGE.read_text(), capture_output=True, text=True,
        timeout=60, env=env, cwd="/",
    )  # fmt: skip
    out = proc.stdout + proc.stderr
    assert "SKIP compose stage: needs root" in out, out
    assert "PASS" not in out
    if required:
        assert proc.returncode == 1 and "FAIL compose stage" in out, out
    else:
        assert proc.returncode == 77, out
