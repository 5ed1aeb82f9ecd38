"""Schemathesis over the gateway's own OpenAPI schema (positive and negative cases), bounded in time.

The gateway runs for real on loopback (embedded, scripted backend, keys required, the admin key sent with
every case); see ``bench/fuzz_gateway.py``, which runs the same with a larger budget and prints its table.
No answer may be a 5xx, and no refused request may write a row.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.fuzz_gateway import fuzz, serve_gateway

pytestmark = pytest.mark.slow


def test_schemathesis_finds_no_5xx_and_no_row_written_by_a_refusal(tmp_path: Path) -> None:
    with serve_gateway(tmp_path) as (base_url, rows):
        report = fuzz(base_url, rows, seconds=50, examples=100)
    print(report.table())
    assert report.findings == [], "\n".join(f"{f.operation} [{f.mode}] {f.what}\n  {f.curl}" for f in report.findings)
    assert report.server_errors == 0
    assert report.requests >= 800, report.table()  # the budget was spent on requests, not lost
    operations = {op for op, _ in report.counts}
    assert {"POST /v1/problems", "POST /v1/chat/completions", "GET /v1/episodes"} <= operations
