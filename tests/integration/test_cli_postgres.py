"""``asyncthink eval`` stores every episode in PostgreSQL, in each mode (the SQLite twin is in tests/unit/cli)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text

from cli import main

pytestmark = pytest.mark.integration


def test_eval_writes_every_episode_and_segment_to_postgres(
    postgres_url: str, tiny_model_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(["eval", "--task", "countdown", "-n", "3", "--mode", "asyncthink", "--mode", "sequential",
                 "--mode", "parallel", "--parallel-k", "2", "--model", str(tiny_model_dir),
                 "--organizer-budget", "24", "--worker-budget", "16", "--db", postgres_url, "--json"])
    assert code == 0
    data = json.loads(capsys.readouterr().out)
    ids = [i for mode in ("asyncthink", "sequential", "parallel") for i in data["episode_ids"][mode]]
    assert len(ids) == 9
    engine = create_engine(postgres_url)
    with engine.connect() as conn:
        rows = conn.execute(text("SELECT mode, count(*) FROM episodes GROUP BY mode")).all()
        assert dict(rows) == {"asyncthink": 3, "sequential": 3, "parallel": 3}
        segs = conn.execute(text("SELECT count(*) FROM segments WHERE episode_id = ANY(:ids)"), {"ids": ids}).scalar()
        assert segs is not None and segs >= 9  # an organizer (or k traces) per episode, plus any workers
        tokens = conn.execute(text("SELECT completion_ids, completion_mask FROM segments LIMIT 1")).one()
        assert len(tokens[0]) == len(tokens[1]) > 0
    engine.dispose()
    assert main(["trace", ids[0], "--db", postgres_url]) == 0
