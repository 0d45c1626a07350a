"""``bench/nativeprof.py``: its stacks land in the components the table names,
and a short run against real gateways finds billing's own work in the
billing target, a larger share of it than in the pass-through one."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

import nativeprof  # noqa: E402  (bench/ is not a package)

_RUN = (
    "<module> (tollway);main (proxy/cli/commands.py);run (asyncio/runners.py)"
    ";Runner.run (asyncio/runners.py)"
)
_REQUEST = (
    _RUN
    + ";RequestHandler._handle_request (aiohttp/web_protocol.py);front (proxy/web/middleware.py)"
    ";chat_completions (proxy/web/handlers.py);handle (proxy/pipeline/run.py)"
)


def _component(stack: str) -> str:
    return nativeprof.classify(stack.split(";"))


def test_a_billed_requests_steps_are_told_apart() -> None:
    settle = _REQUEST + ";settle_now (proxy/pipeline/run.py);_settled (proxy/pipeline/run.py)"
    settle += ";Settlers.settle (proxy/stages/settle/settlers.py)"
    assert _component(settle + ";Billing.settle (proxy/stages/admit/billing.py)").startswith(
        "settle: Billing.settle"
    )
    assert _component(settle + ";AccessLog.settle (proxy/stages/settle/access_log.py)") == (
        "settle: access line"
    )
    assert _component(settle) == "settle: other"
    take = (
        _REQUEST
        + ";proceed (proxy/pipeline/run.py);KeyAdmission.take (proxy/stages/admit/keyed.py)"
    )
    assert _component(take).startswith("admission: other")
    assert _component(take + ";QuotaBook.take (proxy/stores/quota.py)") == (
        "admission: quota lease (request path)"
    )
    forward = (
        _REQUEST + ";proceed (proxy/pipeline/run.py);forward (proxy/stages/forward/attempts.py)"
    )
    assert _component(forward) == "request: forward/provider"
    # A Redis call on a request is the permits' only from their own code
    # (pass-through's breaker store talks to Redis too).
    redis = ";SharedRedis.call (proxy/stores/redis_client.py);Redis.evalsha (redis/client.py)"
    assert _component(forward + redis) == "request: Redis calls (breaker store, other)"
    assert _component(take + ";PermitLeases.take (proxy/stores/permits.py)" + redis) == (
        "admission: Redis permits (request path)"
    )


def test_background_work_is_not_a_requests() -> None:
    flush = _RUN + ";Ledger.run (proxy/stores/ledger.py);write_batch (proxy/stores/usage_batch.py)"
    assert _component(flush) == "ledger flusher (usage batch)"
    journal = "Thread._bootstrap (threading.py);_worker (concurrent/futures/thread.py)"
    assert _component(journal + ";Journal._write (proxy/stores/journal.py)") == "journal flusher"
    assert _component(_RUN + ";QuotaBook._top_up (proxy/stores/quota.py)") == "quota top-ups"
    assert _component(_RUN + ";_probe (proxy/web/loop_lag.py)") == "lag probe"
    assert _component(_RUN).startswith("event loop turn")


def test_raw_profiles_are_read_whole(tmp_path: Path) -> None:
    raw = tmp_path / "t.spy"
    raw.write_text(
        f"{_RUN};a (proxy/x.py) 3\n{_RUN};a (proxy/x.py) 2\nthread (1): MainThread;b (c.py:1) 4\n"
    )
    counts = nativeprof._raw_counts(raw)
    assert counts[f"{_RUN};a (proxy/x.py)"] == 5 and sum(counts.values()) == 9


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_a_short_run_finds_billing_work_in_the_billing_target(tmp_path: Path) -> None:
    kept = tmp_path / "kept"
    # 6,000 requests: the profiling timer fires per kernel tick (~4 ms of
    # CPU here, whatever --every-ms asks), so 400 requests gave ~27 samples,
    # and a run once found none in admission or settle by chance (billing's
    # own steps are ~5% of the billing target's samples).
    argv = [sys.executable, str(ROOT / "bench" / "nativeprof.py"), "--requests", "6000"]
    argv += ["--warmup", "50", "--repeats", "1", "--concurrency", "4", "--every-ms", "0.5"]
    argv += ["--no-perf", "--keep", str(kept)]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=380)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    cpu = json.loads((kept / "cpu.json").read_text())["cpu"]
    assert cpu["tollway"] > 0 and cpu["tollway_billing"] > 0
    billing = nativeprof.components(nativeprof._raw_counts(kept / "tollway_billing.spy"))
    passing = nativeprof.components(nativeprof._raw_counts(kept / "tollway.spy"))

    def share(counts: Counter[str]) -> float:
        own = sum(n for k, n in counts.items() if k.startswith(("admission", "settle: Billing")))
        return own / sum(counts.values())

    # Pass-through calls Billing.settle too (it returns at once: nothing to
    # bill), so its share is small, not nil (~0.5% against ~5%).
    assert share(billing) > 0, billing
    assert share(billing) > share(passing), (billing, passing)
    assert "| component (sigprof) |" in done.stdout
