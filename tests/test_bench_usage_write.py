"""``bench/usage_write.py`` writes real batches through ``tollway_write_usage``
on its own embedded Postgres and reports what they cost, by part (a smoke
test: the numbers are not checked beyond what must hold)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_usage_write_reports_the_cost_per_row_and_by_part() -> None:
    argv = [sys.executable, str(ROOT / "bench" / "usage_write.py"), "--rows", "20"]
    argv += ["--batches", "5"]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=170)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    wall = re.search(r"tollway_write_usage: ([\d.]+) µs a row wall", done.stdout)
    assert wall is not None and float(wall.group(1)) > 0
    # every rollup and the insert are in the plan, each with a time
    for part in ("ins", "agg", "rolled", "rolled_monthly", "rolled_tenant", "rolled_model"):
        assert re.search(rf"\| CTE {part} \| [\d.]+ \| [\d.]+ \|", done.stdout), part
    assert "| execution (all) |" in done.stdout
