"""The documentation's commands still exist: every shell command in README.md and docs/ is checked.

Each fenced block of shell (```sh, ```bash, ```console or an unlabelled block) is split into commands
(``&&``, ``|``, ``;``, ``$(...)``, line continuations) and each command is checked by what it runs:

* ``asyncthink ...``: parsed by the real command-line parser, so a renamed verb or flag fails here;
* ``python -m MODULE ...`` / ``python FILE ...``: the module exists and declares every ``--flag`` used;
* ``celery -A APP ...``: the Celery app's module exists;
* ``curl``: the method and path are a route of the gateway's OpenAPI schema;
* ``mutmut``: a command of mutmut's, which the ``test`` extra installs;
* ``docker compose``: the profiles and services it names exist in compose.yaml (it needs a Docker engine,
  which CI runs separately in ``.ci/compose_stage.sh``); ``docker build -f``, ``kubectl apply -k``,
  ``bash``/``sudo bash`` scripts, ``pytest`` paths: the files exist;
* a few commands anyone may type (``export``, ``openssl``, ``pip``, ``python3 -m venv`` ...) are accepted.

A command of any other program fails the test, so a new kind of command in the docs needs a check here.
Blocks marked ``<!-- doc-test: run -->`` on the line before them are also run, in a temporary directory,
with this checkout's virtualenv on PATH. ``python`` blocks are compiled. The commands of compose.yaml and
the k8s manifests that call ``asyncthink`` are parsed the same way.
"""

from __future__ import annotations

import ast
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SHELL = {"", "sh", "bash", "console", "shell"}
ACCEPTED = {  # programs whose use in the docs needs no check of ours
    "export", "openssl", "cd", "sleep", "echo", "redis-server", "pg_ctlcluster", "pip", "python3", "git",
    "apt-get", "cat",
}  # fmt: skip
_BLOCK = re.compile(r"(?P<marker><!-- doc-test: run -->\s*\n)?```(?P<lang>[A-Za-z]*)\n(?P<body>.*?)```", re.S)


def blocks(path: Path) -> list[tuple[str, str, bool, int]]:
    """(language, body, runnable, line) of every fenced block."""
    text = path.read_text()
    return [
        (m.group("lang"), m.group("body"), bool(m.group("marker")), text[: m.start()].count("\n") + 1)
        for m in _BLOCK.finditer(text)
    ]


def shell_lines(body: str) -> list[str]:
    """The block's command lines: continuations joined, output lines and comments dropped."""
    joined = re.sub(r"\\\n\s*", " ", body)
    out = []
    for line in joined.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("$ "):
            line = line[2:]
        out.append(line)
    return out


def commands(line: str) -> list[list[str]]:
    """The commands of one shell line (command substitutions included), as argument lists."""
    found: list[list[str]] = []
    for inner in re.findall(r"\$\(([^()]*)\)", line):
        found += commands(inner)
    line = re.sub(r"\$\([^()]*\)", "SUBST", line)
    lexer = shlex.shlex(line, posix=True, punctuation_chars=";&|")
    lexer.whitespace_split = True
    lexer.commenters = "#"
    current: list[str] = []
    for token in lexer:
        if token and set(token) <= set(";&|"):
            if current:
                found.append(current)
            current = []
        else:
            current.append(token)
    if current:
        found.append(current)
    return found


def _strip_env(argv: list[str]) -> list[str]:
    while argv and re.fullmatch(r"[A-Z_][A-Z0-9_]*=.*", argv[0]):
        argv = argv[1:]
    return argv


def _program(argv: list[str]) -> tuple[str, list[str]]:
    argv = _strip_env(argv)
    if argv and argv[0] == "sudo":
        argv = argv[1:]
    head = argv[0]
    return head.rsplit("/", 1)[-1] if head.startswith((".venv/", "/")) or "/bin/" in head else head, argv[1:]


# ----------------------------------------------------------------------------------------- the checks
def check_asyncthink(args: list[str]) -> None:
    from cli import build_parser

    args = [a.strip("[]") for a in args if a not in ("[", "]")]
    try:
        build_parser().parse_args(args)
    except SystemExit as exc:
        raise AssertionError(f"`asyncthink {' '.join(args)}` does not parse (exit {exc.code})") from None


def _module_source(name: str) -> str:
    base = ROOT / Path(*name.split("."))
    for candidate in (base.with_suffix(".py"), base / "__main__.py", base / "__init__.py"):
        if candidate.is_file():
            text = candidate.read_text()
            if candidate.name == "__init__.py" and (base / "__main__.py").is_file():
                text += (base / "__main__.py").read_text()
            return text
    raise AssertionError(f"no module {name} in the repository")


def _flags(args: list[str]) -> list[str]:
    return [a.split("=", 1)[0] for a in args if a.startswith("--") and len(a) > 2]


def check_python(args: list[str]) -> None:
    if args[:2] == ["-m", "venv"]:
        return
    if args[0] == "-m":
        module, rest = args[1], args[2:]
        if module in ("pip", "pytest"):
            return
        source = _module_source(module)
    else:
        path = ROOT / args[0]
        assert path.is_file(), f"no file {args[0]}"
        source, rest = path.read_text(), args[1:]
        module = args[0]
    for flag in _flags(rest):
        if flag in ("--help",):
            continue
        assert f'"{flag}"' in source or f"'{flag}'" in source, f"{module} has no option {flag}"


def _routes() -> list[tuple[str, re.Pattern[str]]]:
    import tempfile

    from services.gateway.app import create_app
    from shared.config import Settings

    with tempfile.TemporaryDirectory() as home:
        app = create_app(Settings(database_url=f"sqlite:///{home}/docs.db"))
        schema = app.openapi()
    routes = []
    for path, item in schema["paths"].items():
        pattern = re.compile("^" + re.sub(r"\\\{[^}]+\\\}", "[^/]+", re.escape(path)) + "$")
        routes += [(method.upper(), pattern) for method in item]
    return routes


def check_curl(args: list[str], routes: list[tuple[str, re.Pattern[str]]]) -> None:
    method = "GET"
    url = None
    k = 0
    while k < len(args):
        a = args[k]
        if a in ("-X", "--request"):
            method = args[k + 1].upper()
            k += 2
            continue
        if a in ("-d", "--data", "--data-raw") and method == "GET":
            method = "POST"
        if a in ("-H", "-d", "--data", "--data-raw", "-o", "-w", "-m", "--max-time"):
            k += 2
            continue
        if not a.startswith("-") and ("localhost" in a or "127.0.0.1" in a or a.startswith("http")):
            url = a
        k += 1
    assert url is not None, f"curl without a URL: {args}"
    path = "/" + re.sub(r"^(https?://)?[^/]+/?", "", url).split("?")[0]
    assert any(m == method and p.match(path) for m, p in routes), f"no route {method} {path} (from {url})"


def check_docker(args: list[str]) -> None:
    if args and args[0] == "compose":
        compose = yaml.safe_load((ROOT / "compose.yaml").read_text())
        services = compose["services"]
        profiles = {p for s in services.values() for p in s.get("profiles", [])}
        for k, a in enumerate(args):
            if a == "--profile":
                assert args[k + 1] in profiles, f"compose has no profile {args[k + 1]}"
            if a == "exec":
                assert args[k + 1] in services, f"compose has no service {args[k + 1]}"
        return
    if args and args[0] == "build":
        assert "-f" in args, "docker build: name the Dockerfile with -f"
        assert (ROOT / args[args.index("-f") + 1]).is_file()
        return
    raise AssertionError(f"unchecked docker command: docker {' '.join(args)}")


def check_one(argv: list[str], routes: list[tuple[str, re.Pattern[str]]]) -> None:
    program, args = _program(argv)
    if program == "asyncthink":
        check_asyncthink(args)
    elif program in ("python", "python3"):
        check_python(args)
    elif program == "celery":
        assert "-A" in args and _module_source(args[args.index("-A") + 1])
    elif program == "curl":
        check_curl(args, routes)
    elif program == "docker":
        check_docker(args)
    elif program == "kubectl":
        if "-k" in args:
            assert (ROOT / args[args.index("-k") + 1]).is_dir(), f"no kustomization {args}"
    elif program == "bash":
        assert (ROOT / args[0]).is_file(), f"no script {args[0]}"
    elif program == "mutmut":
        assert args and args[0] in ("run", "results", "show", "browse"), f"no mutmut command {args[:1]}"
        assert "mutmut==" in (ROOT / "pyproject.toml").read_text(), "mutmut is not in the test extra"
    elif program in ("pytest", "ruff", "mypy"):
        for a in args:
            if a.startswith("tests/"):
                assert (ROOT / a.split("::")[0]).exists(), f"no test path {a}"
    elif program in ACCEPTED:
        if program == "pip" and "install" in args:
            for a in args:
                extra = re.match(r"^-e\s*\.?\[(.*)\]$|^\.\[(.*)\]$", a.strip("'\""))
                if extra:
                    names = (extra.group(1) or extra.group(2)).split(",")
                    pyproject = (ROOT / "pyproject.toml").read_text()
                    for name in names:
                        assert re.search(rf"^{name} = \[", pyproject, re.M), f"no extra [{name}]"
    else:
        raise AssertionError(f"a command of {program!r} in the docs has no check: {' '.join(argv)}")


# ----------------------------------------------------------------------------------------------- tests
def _shell_commands() -> list[Any]:
    out = []
    for doc in DOCS:
        for lang, body, _, line in blocks(doc):
            if lang not in SHELL:
                continue
            for text in shell_lines(body):
                try:
                    found = commands(text)
                except ValueError as exc:  # not shell at all (an output block without a language?)
                    found = [["<unparsable>", f"{exc}: {text}"]]
                for argv in found:
                    if argv:
                        out.append(pytest.param(argv, id=f"{doc.relative_to(ROOT)}:{line}:{argv[0]}"))
    return out


@pytest.fixture(scope="module")
def routes() -> list[tuple[str, re.Pattern[str]]]:
    return _routes()


@pytest.mark.parametrize("argv", _shell_commands())
def test_documented_command_exists(argv: list[str], routes: list[tuple[str, re.Pattern[str]]]) -> None:
    check_one(argv, routes)


@pytest.mark.parametrize(
    ("doc", "body", "line"),
    [
        pytest.param(doc, body, line, id=f"{doc.relative_to(ROOT)}:{line}")
        for doc in DOCS
        for lang, body, _, line in blocks(doc)
        if lang == "python"
    ],
)
def test_documented_python_compiles(doc: Path, body: str, line: int) -> None:
    ast.parse(body, filename=f"{doc}:{line}")


def _runnable() -> list[Any]:
    return [
        pytest.param(body, id=f"{doc.relative_to(ROOT)}:{line}")
        for doc in DOCS
        for lang, body, run, line in blocks(doc)
        if run and lang in SHELL
    ]


@pytest.mark.parametrize("body", _runnable())
def test_runnable_blocks_run(body: str, tmp_path: Path) -> None:
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    for line in shell_lines(body):
        line = line.replace(".venv/bin/", "")
        proc = subprocess.run(line, shell=True, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, f"`{line}` exited {proc.returncode}:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}"


def _deploy_commands() -> list[Any]:
    out = []
    compose = yaml.safe_load((ROOT / "compose.yaml").read_text())
    for name, service in compose["services"].items():
        cmd = service.get("command")
        if isinstance(cmd, list) and cmd and cmd[0] == "asyncthink":
            out.append(pytest.param(cmd[1:], id=f"compose:{name}"))
        elif isinstance(cmd, list) and cmd[:2] == ["sh", "-c"]:
            text = re.sub(r"\$\$\{[^}]*\}", "", cmd[2]).replace("exec ", "")
            if text.strip().startswith("asyncthink "):
                out.append(pytest.param(shlex.split(text)[1:], id=f"compose:{name}"))
    for manifest in sorted((ROOT / "k8s").rglob("*.yaml")):
        for doc in yaml.safe_load_all(manifest.read_text()):
            for cmd in _commands_in(doc):
                out.append(pytest.param(cmd[1:], id=f"{manifest.relative_to(ROOT)}:{cmd[1]}"))
    return out


def _commands_in(node: Any) -> list[list[str]]:
    found: list[list[str]] = []
    if isinstance(node, dict):
        for key, value in node.items():
            if key in ("command", "value") and isinstance(value, list) and value and value[0] == "asyncthink":
                found.append([str(v) for v in value])
            else:
                found += _commands_in(value)
    elif isinstance(node, list):
        for item in node:
            found += _commands_in(item)
    return found


@pytest.mark.parametrize("args", _deploy_commands())
def test_deploy_commands_parse(args: list[str]) -> None:
    check_asyncthink(args)


def test_the_checks_catch_a_renamed_flag(routes: list[tuple[str, re.Pattern[str]]]) -> None:
    with pytest.raises(AssertionError, match="does not parse"):
        check_one(["asyncthink", "eval", "--no-such-flag"], routes)
    with pytest.raises(AssertionError, match="no route"):
        check_one(["curl", "-s", "localhost:8000/v1/nowhere"], routes)
    with pytest.raises(AssertionError, match="has no option"):
        check_one(["python", "-m", "bench.orchestration", "--no-such-flag"], routes)
    with pytest.raises(AssertionError, match="has no check"):
        check_one(["frobnicate", "--now"], routes)
    with pytest.raises(AssertionError, match="no mutmut command"):
        check_one([".venv/bin/mutmut", "frobnicate"], routes)
    assert commands("export KEY=$(asyncthink keys create --name me) && curl -s localhost:8000/readyz") == [
        ["asyncthink", "keys", "create", "--name", "me"], ["export", "KEY=SUBST"], ["curl", "-s", "localhost:8000/readyz"],
    ]
