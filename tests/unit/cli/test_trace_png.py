"""``asyncthink trace ID --png``: a stored episode's timeline as a PNG."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from cli import main
from services.workers.tools import local_endpoints
from shared.backends.scripted import ScriptedBackend
from shared.engine import Engine, EngineConfig
from shared.store import db, repository
from shared.tasks import get_task


def test_trace_png(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    url = f"sqlite:///{tmp_path / 'cli.db'}"
    db.migrate(url)
    organizer = "<FORK-1>a</FORK-1><FORK-2@python>6*7</FORK-2>go<JOIN-1><JOIN-2><ANSWER>42</ANSWER>"
    engine = Engine(ScriptedBackend({"organizer": organizer, "1": "<RETURN>thinking it over</RETURN>"}),
                    get_task("chat"), EngineConfig(capacity=3), endpoints=local_endpoints())
    result = asyncio.run(engine.run(get_task("chat").problem_from_payload({"prompt": "6*7?"})))
    with db.session_factory(db.make_engine(url))() as s:
        repository.save_episode(s, result=result)
    out = tmp_path / "img" / "trace.png"
    assert main(["trace", result.episode_id, "--db", url, "--png", str(out)]) == 0
    assert f"wrote {out}" in capsys.readouterr().out
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
