"""``asyncthink keys create | list | revoke``: the key is printed once, stored hashed, and revocable."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from cli import main
from shared.auth import hash_key, key_id_of
from shared.store import db


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(["keys", *args])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def url(tmp_path: Path) -> str:
    url = f"sqlite:///{tmp_path / 'keys.db'}"
    db.migrate(url)
    return url


def test_create_list_revoke(capsys: pytest.CaptureFixture[str], url: str, tmp_path: Path) -> None:
    code, out, err = run(
        capsys, "create", "--name", "ci", "--scope", "submit", "--scope", "read", "--rate-limit", "120", "--db", url
    )
    assert code == 0, err
    key = out.strip()
    key_id = key_id_of(key)
    assert key.startswith("atk_") and key_id is not None  # stdout is the key alone: scripts capture it
    assert "shown only once" in err and key_id in err and "submit, read" in err
    code, out, _ = run(capsys, "create", "--name", "ops", "--scope", "admin", "--db", url)
    assert code == 0

    with sqlite3.connect(tmp_path / "keys.db") as conn:
        dump = "\n".join(conn.iterdump())
    assert key not in dump and key.split("_", 2)[2] not in dump  # never the key or its secret
    assert hash_key(key) in dump

    code, out, _ = run(capsys, "list", "--db", url)
    assert code == 0
    assert key_id in out and "ci" in out and "submit, read" in out and "120/min" in out and "ops" in out
    assert "atk_" not in out

    code, out, _ = run(capsys, "revoke", key_id, "--db", url)
    assert code == 0 and "revoked" in out
    code, out, _ = run(capsys, "list", "--db", url)
    assert key_id not in out
    code, out, _ = run(capsys, "list", "--all", "--db", url)
    assert key_id in out and "revoked" in out
    code, _, err = run(capsys, "revoke", key_id, "--db", url)
    assert code == 2 and "no live key" in err


def test_bad_scope_and_missing_table(capsys: pytest.CaptureFixture[str], url: str, tmp_path: Path) -> None:
    with pytest.raises(SystemExit):
        main(["keys", "create", "--name", "x", "--scope", "root", "--db", url])
    assert "invalid choice" in capsys.readouterr().err
    code, _, err = run(capsys, "create", "--name", "x", "--scope", "read", "--rate-limit", "-1", "--db", url)
    assert code == 2 and "rate" in err
    empty = f"sqlite:///{tmp_path / 'empty.db'}"
    code, _, err = run(capsys, "list", "--db", empty)
    assert code == 2 and "asyncthink db upgrade" in err


def test_keys_is_listed_in_help(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "keys" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("env", "host", "says"),
    [
        ({"ASYNCTHINK_AUTH": "off"}, "0.0.0.0", "--host 127.0.0.1"),
        ({"ASYNCTHINK_AUTH": "off", "ASYNCTHINK_ENVIRONMENT": "production"}, "127.0.0.1", "not allowed in production"),
        ({"ASYNCTHINK_ADMIN_KEY": "short"}, "127.0.0.1", "at least 32 characters"),
    ],
)
def test_serve_refuses_to_run_open_with_the_fix_in_the_message(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, env: dict[str, str], host: str, says: str
) -> None:
    from shared.config import get_settings

    for name, value in env.items():
        monkeypatch.setenv(name, value)
    get_settings.cache_clear()
    try:
        code = main(["serve", "gateway", "--host", host])
    finally:
        get_settings.cache_clear()
    err = capsys.readouterr().err
    assert code == 2 and says in err and "Traceback" not in err
