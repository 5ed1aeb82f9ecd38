"""The CI mutation stage (``.ci/mutation_changed.py``): which files it mutates, how it narrows the config,
how it scores, and where ``.ci/run`` calls it. The mutation run itself is CI's (``.ci/run``), not this test's.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import tomllib
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / ".ci" / "mutation_changed.py"

PYPROJECT = """[project]
name = "demo"

[tool.mutmut]
source_paths = ["shared"]
only_mutate = ["shared/core.py", "shared/tasks/*.py"]
also_copy = ["cli"]
"""


def load_script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("mutation_changed", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


mc = load_script()


def git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True, text=True).stdout


def commit(repo: Path, files: dict[str, str | None], message: str) -> None:
    """Write (or, for None, delete) the files and commit them."""
    for name, text in files.items():
        path = repo / name
        if text is None:
            path.unlink()
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
    git(repo, "add", "-A")
    git(repo, "-c", "user.name=t", "-c", "user.email=t@example.invalid", "commit", "-q", "-m", message)


@pytest.fixture()
def repo(tmp_path: Path) -> Path:
    git(tmp_path, "init", "-q", "-b", "main")
    commit(tmp_path, {"pyproject.toml": PYPROJECT, "shared/core.py": "A = 1\n", "shared/other.py": "B = 1\n",
                      "shared/tasks/count.py": "C = 1\n", "README.md": "demo\n"}, "root")
    return tmp_path


def selected(repo: Path, base: str | None = None) -> list[str]:
    return mc.select(mc.changed_files(repo, base), mc.core_patterns(repo))


def test_a_root_commit_changes_every_file(repo: Path) -> None:
    # no parent: HEAD is compared with the empty tree, so both core files (one through a glob) count
    assert mc.core_patterns(repo) == ["shared/core.py", "shared/tasks/*.py"]
    assert selected(repo) == ["shared/core.py", "shared/tasks/count.py"]


def test_only_the_core_files_of_the_last_commit(repo: Path) -> None:
    commit(repo, {"shared/other.py": "B = 2\n", "README.md": "more\n"}, "not core")
    assert mc.changed_files(repo) == ["README.md", "shared/other.py"]
    assert selected(repo) == []
    commit(repo, {"shared/tasks/count.py": "C = 2\n", "shared/other.py": "B = 3\n"}, "one core file")
    assert selected(repo) == ["shared/tasks/count.py"]


def test_a_deleted_core_file_has_nothing_to_mutate(repo: Path) -> None:
    commit(repo, {"shared/core.py": None, "shared/tasks/count.py": "C = 3\n"}, "delete one, change one")
    assert selected(repo) == ["shared/tasks/count.py"]


def test_base_takes_everything_a_branch_changed_since_its_merge_base(repo: Path) -> None:
    git(repo, "checkout", "-q", "-b", "topic")
    commit(repo, {"shared/core.py": "A = 2\n"}, "first")
    commit(repo, {"README.md": "x\n"}, "second")
    git(repo, "checkout", "-q", "main")
    commit(repo, {"shared/tasks/count.py": "C = 9\n"}, "main moves on")  # not the branch's change
    git(repo, "checkout", "-q", "topic")
    assert selected(repo) == []  # the last commit alone touched no core file
    assert selected(repo, base="main") == ["shared/core.py"]


def test_a_shallow_clone_without_the_parent_is_skipped(repo: Path, tmp_path_factory: pytest.TempPathFactory,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    commit(repo, {"shared/core.py": "A = 5\n"}, "second")
    clone = tmp_path_factory.mktemp("shallow") / "c"
    subprocess.run(["git", "clone", "-q", "--depth", "1", f"file://{repo}", str(clone)], check=True, capture_output=True)
    assert mc.main(["--repo", str(clone)]) == 0  # not every core file as if it were a root commit
    assert capsys.readouterr().out == (
        "mutation testing: skipped, HEAD's parent is not in this shallow clone (fetch more history, or pass --base)\n"
    )


def test_no_core_file_changed_exits_0_without_running_mutmut(repo: Path, capsys: pytest.CaptureFixture[str]) -> None:
    commit(repo, {"README.md": "docs only\n"}, "docs")
    assert mc.main(["--repo", str(repo)]) == 0
    assert capsys.readouterr().out == "mutation testing: no core file changed\n"


def test_the_narrowed_config_and_the_scratch_checkout(repo: Path) -> None:
    text = mc.narrowed_pyproject(PYPROJECT, ["shared/core.py"])
    config = tomllib.loads(text)["tool"]["mutmut"]
    assert config["only_mutate"] == ["shared/core.py"]
    assert config["also_copy"] == ["cli"] and text.replace('["shared/core.py"]', "X") == PYPROJECT.replace(
        '["shared/core.py", "shared/tasks/*.py"]', "X"
    )  # nothing else changes
    with pytest.raises(SystemExit, match="only_mutate"):
        mc.narrowed_pyproject("[tool.mutmut]\n", ["a.py"])
    scratch = mc.scratch_checkout(repo, ["shared/core.py"])
    try:
        assert (scratch / "shared").resolve() == (repo / "shared").resolve()
        assert not (scratch / "pyproject.toml").is_symlink() and not (scratch / ".git").exists()
        assert tomllib.loads((scratch / "pyproject.toml").read_text())["tool"]["mutmut"]["only_mutate"] == [
            "shared/core.py"
        ]
        assert (repo / "pyproject.toml").read_text() == PYPROJECT  # the checkout's file is untouched
    finally:
        import shutil

        shutil.rmtree(scratch)


def test_scores_count_no_tests_as_survivors_and_leave_out_the_untested(tmp_path: Path) -> None:
    codes = {
        "m1": 1, "m2": 3, "m3": 36, "m4": 37,  # killed, pytest internal error, timeout, type check: 4 caught
        "m5": 0, "m6": 33, "m7": -11,  # survived, no tests, segfault: 3 survivors
        "m8": 34,  # skipped: not counted
        "m9": None,  # not checked when the time limit ended the run: named, not counted
    }  # fmt: skip
    s = mc.score_of("shared/core.py", codes)
    assert (s.killed, s.total, s.survivors, s.untested) == (4, 7, ("m5", "m6", "m7"), ("m9",))
    assert s.percent == pytest.approx(100 * 4 / 7)  # 57.1 %
    (tmp_path / "shared").mkdir()
    (tmp_path / "shared" / "core.py.meta").write_text(json.dumps({"exit_code_by_key": {"a": 1, "b": 1, "c": 0}}))
    [core, missing] = mc.read_scores(tmp_path, ["shared/core.py", "shared/none.py"])
    assert (core.killed, core.total, round(core.percent, 1)) == (2, 3, 66.7)  # 2 / 3
    assert (missing.total, missing.percent) == (0, 100.0)  # a file without mutants cannot fail


def test_ci_runs_it_after_the_test_command_and_before_the_compose_stage() -> None:
    lines = (ROOT / ".ci" / "run").read_text().splitlines()
    [readme_line] = [i for i, line in enumerate(lines) if line.startswith("python3 -m venv .venv")]
    [mutation_line] = [i for i, line in enumerate(lines) if "mutation_changed.py" in line]
    [compose_line] = [i for i, line in enumerate(lines) if "compose_stage.sh" in line and "timeout" in line]
    assert readme_line + 2 < mutation_line < compose_line  # after the test command and its status check
    assert lines[mutation_line] == ".venv/bin/python .ci/mutation_changed.py"


def test_the_core_list_is_the_mutmut_config_of_this_repository() -> None:
    core = mc.core_patterns(ROOT)
    assert core == [
        "shared/protocol.py",
        "shared/metrics.py",
        "shared/rewards.py",
        "shared/tasks/countdown.py",
        "shared/tasks/expr.py",
        "shared/engine.py",
        "services/organizer/service.py",
    ]
    assert all((ROOT / path).is_file() for path in core)
    # narrowing the real file changes only_mutate and nothing else
    text = (ROOT / "pyproject.toml").read_text()
    narrowed = tomllib.loads(mc.narrowed_pyproject(text, ["shared/rewards.py"]))
    original = tomllib.loads(text)
    assert narrowed["tool"]["mutmut"].pop("only_mutate") == ["shared/rewards.py"]
    original["tool"]["mutmut"].pop("only_mutate")
    assert narrowed == original


def test_named_files_replace_the_changed_ones(repo: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert mc.main(["--repo", str(repo), "README.md", "shared/other.py"]) == 0
    assert capsys.readouterr().out == "mutation testing: none of these is a core file\n"
