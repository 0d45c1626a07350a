"""``bench/run.py --quick``: every benchmark scenario runs, against every default
target, with zero errors (a smoke test; the numbers are not checked)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import orjson
import pytest

ROOT = Path(__file__).resolve().parent.parent
YARDSTICKS = [ROOT / "bench" / "floor_proxy.py", ROOT / "bench" / "floor_proxy_db.py"]


@pytest.mark.slow
@pytest.mark.skipif(
    not all(p.exists() for p in YARDSTICKS),
    reason="bench/floor_proxy.py and bench/floor_proxy_db.py are not in this tree yet",
)
@pytest.mark.timeout(240)
def test_quick_bench_runs_every_scenario_without_errors(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "run.py"), "--quick", "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=220,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    doc = orjson.loads(out.read_bytes())
    targets = {"direct", "floor_proxy", "floor_db_batch", "tollway", "tollway_billing"}
    seen = {(r["scenario"], r["prompt_kb"], r["target"]) for r in doc["rows"]}
    for scenario in ("chat", "chat-stream"):
        for kb in (0.5, 32):
            assert {(scenario, kb, t) for t in targets} <= seen
    assert {r["target"] for r in doc["long_streams"]} == targets
    assert all(r["errors"] == 0 for r in doc["rows"] + doc["long_streams"])
    tollway = [r for r in doc["rows"] if r["target"].startswith("tollway")]
    assert all(r["lag_p99_ms"] is not None for r in tollway), "no event-loop lag read"
    assert all(r["cpu_us"] for r in doc["rows"]), "a point without CPU time"
