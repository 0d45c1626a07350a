"""Failover benchmark: one of three targets fails 30% of requests.

    .venv/bin/python bench/failover.py            # full run, about 2.5 minutes
    .venv/bin/python bench/failover.py --quick    # smoke run, about 20 s

Three fake providers (``fake_provider.py``, run.py's) stand behind one Tollway
process, which serves two public models over the same three targets, equal
weights, the shipped retry and breaker defaults:

- ``steady``: all three targets healthy (the baseline);
- ``flaky``: the third target is the same fake reached as a provider whose
  configured header ``x-fail-rate: 0.3`` makes the fake answer HTTP 500 to a
  random 30% of its requests. With the default breaker (5 failures in a row)
  it is soon ejected, for longer each time, so few requests meet it;
- ``flaky-nobreaker``: the same, with the breaker out of reach (a million
  failures), so that about one request in ten fails over all run long.

Both are measured interleaved with run.py's load generator and process
layout (fakes and load generator on CPU 0, Tollway alone on CPU 1). The
claim under test, from issue 5: on both flaky models the clients see 100%
success, and p99 exceeds ``steady``'s by less than one backoff step (the first
step of the default policy, ``backoff_base_ms`` = 250 ms). The fake counts
the 500s it sent, so the table also shows how many requests needed a
second attempt.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import signal
import statistics
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

# fake_provider and run are bench/'s own modules (the script's directory is on sys.path).
import fake_provider
import orjson
import run as bench
from aiohttp import web
from aiohttp.typedefs import Handler

FAIL_RATE_HEADER = "x-fail-rate"
BACKOFF_STEP_MS = 250.0  # RetryPolicy.backoff_base_ms, the shipped default
MODELS = ("steady", "flaky", "flaky-nobreaker")

CONFIG = """\
server: {{host: 127.0.0.1, port: {port}}}
auth: none
providers:
  a: {{kind: openai, base_url: "http://127.0.0.1:{a}/v1", api_key: sk-bench}}
  b: {{kind: openai, base_url: "http://127.0.0.1:{b}/v1", api_key: sk-bench}}
  c: {{kind: openai, base_url: "http://127.0.0.1:{c}/v1", api_key: sk-bench}}
  c-flaky:
    kind: openai
    base_url: "http://127.0.0.1:{c}/v1"
    api_key: sk-bench
    headers: {{{header}: "{rate}"}}
  c-flaky-nobreaker:
    kind: openai
    base_url: "http://127.0.0.1:{c}/v1"
    api_key: sk-bench
    headers: {{{header}: "{rate}"}}
    breaker: {{failures: 1000000}}
models:
  - name: steady
    targets: [{{provider: a, model: bench-model}}, {{provider: b, model: bench-model}},
              {{provider: c, model: bench-model}}]
  - name: flaky
    targets: [{{provider: a, model: bench-model}}, {{provider: b, model: bench-model}},
              {{provider: c-flaky, model: bench-model}}]
  - name: flaky-nobreaker
    targets: [{{provider: a, model: bench-model}}, {{provider: b, model: bench-model}},
              {{provider: c-flaky-nobreaker, model: bench-model}}]
"""


# --- the fake that fails on request ------------------------------------------

STATS = web.AppKey("stats", dict)


def flaky_app(chunks: int, seed: int) -> web.Application:
    """run.py's fake provider, plus: a request carrying ``x-fail-rate: p`` gets an
    OpenAI-shaped 500 with probability p; ``GET /stats`` counts them."""
    app = fake_provider.build_app(chunks=chunks)
    rng = random.Random(seed)
    app[STATS] = {"flaky_requests": 0, "failed": 0}

    @web.middleware
    async def fail_some(request: web.Request, handler: Handler) -> web.StreamResponse:
        rate = request.headers.get(FAIL_RATE_HEADER)
        if rate is None:
            return await handler(request)
        request.app[STATS]["flaky_requests"] += 1
        if rng.random() >= float(rate):
            return await handler(request)
        request.app[STATS]["failed"] += 1
        await request.read()
        err = {"message": "injected failure", "type": "server_error", "param": None, "code": None}
        return web.json_response({"error": err}, status=500)

    async def stats(request: web.Request) -> web.Response:
        return web.json_response(request.app[STATS])

    app.middlewares.append(fail_some)
    app.router.add_get("/stats", stats)
    return app


def _stats(port: int) -> dict[str, int]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/stats", timeout=5) as r:
        return orjson.loads(r.read())  # type: ignore[no-any-return]


# --- the run --------------------------------------------------------------------


@dataclass
class Row:
    scenario: str
    concurrency: int
    model: str
    rps: float
    p50_ms: float
    p99_ms: float
    ok: int
    errors: int
    retried: int  # requests that needed a second attempt (the fake's 500s)
    first_error: str = ""

    @property
    def success(self) -> float:
        total = self.ok + self.errors
        return self.ok / total if total else float("nan")


def _scenario(base: bench.Scenario, model: str) -> bench.Scenario:
    return bench.Scenario(
        f"{base.name}:{model}", base.path, {**base.body, "model": model}, base.stream
    )


def measure_all(
    args: argparse.Namespace, procs: bench.Processes, port: int, c_port: int
) -> list[Row]:
    points: dict[tuple[str, int, str], list[tuple[bench.Point, int]]] = {}
    for rep in range(args.repeats):
        for base in bench.SCENARIOS:
            for c in args.levels:
                for model in MODELS:
                    before = _stats(c_port)["failed"]
                    p = bench.measure(procs, port, _scenario(base, model), c, args)
                    retried = _stats(c_port)["failed"] - before
                    points.setdefault((base.name, c, model), []).append((p, retried))
                    print(
                        f"  [{rep + 1}/{args.repeats}] {base.name:<11} c={c:<3} {model:<15}"
                        f"{p.rps:>8,.0f} rps  p99 {p.p99_ms:7.3f} ms  errors {p.errors}"
                        f"  retried {retried}",
                        file=sys.stderr,
                    )
    return [_row(key, pts) for key, pts in points.items()]


def _row(key: tuple[str, int, str], pts: list[tuple[bench.Point, int]]) -> Row:
    scenario, c, model = key
    return Row(
        scenario=scenario,
        concurrency=c,
        model=model,
        rps=statistics.median(p.rps for p, _ in pts),
        p50_ms=statistics.median(p.p50_ms for p, _ in pts),
        p99_ms=statistics.median(p.p99_ms for p, _ in pts),
        ok=sum(p.requests for p, _ in pts),
        errors=sum(p.errors for p, _ in pts),
        retried=sum(r for _, r in pts),
        first_error=next((p.first_error for p, _ in pts if p.first_error), ""),
    )


def table(rows: list[Row]) -> str:
    lines = [
        "| scenario | c | model | rps | p50 ms | p99 ms | client success | requests retried |",
        "|---|---:|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        share = r.retried / r.ok if r.ok else 0.0
        lines.append(
            f"| {r.scenario} | {r.concurrency} | {r.model} | {r.rps:,.0f} | {r.p50_ms:.3f} "
            f"| {r.p99_ms:.3f} | {r.success:.2%} ({r.ok:,} ok, {r.errors} failed) "
            f"| {r.retried:,} ({share:.1%}) |"
        )
    return "\n".join(lines)


def verdicts(rows: list[Row]) -> list[str]:
    by = {(r.scenario, r.concurrency, r.model): r for r in rows}
    out = []
    for (s, c, m), flaky in by.items():
        if m == "steady":
            continue
        steady = by[(s, c, "steady")]
        added = flaky.p99_ms - steady.p99_ms
        ok = flaky.errors == 0 and added < BACKOFF_STEP_MS
        out.append(
            f"{'PASS' if ok else 'FAIL'} {s} c={c} {m}: client success {flaky.success:.2%}, "
            f"added p99 {added:+.3f} ms (target 100% and < {BACKOFF_STEP_MS:g} ms)"
        )
    return out


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--concurrency", default="1,16", help="comma-separated levels")
    p.add_argument("--duration", type=float, default=3.0, help="measured seconds per point")
    p.add_argument("--warmup", type=float, default=0.5)
    p.add_argument("--repeats", type=int, default=3, help="the table shows their medians")
    p.add_argument("--fail-rate", type=float, default=0.3)
    p.add_argument("--seed", type=int, default=1, help="seeds the fake's failures")
    p.add_argument("--chunks", type=int, default=20, help="content chunks per fake stream")
    p.add_argument("--no-pin", action="store_true")
    p.add_argument("--quick", action="store_true", help="1 s points, one repeat")
    p.add_argument("--serve-flaky", type=int, metavar="PORT", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.duration, args.warmup, args.repeats = 1.0, 0.3, 1
    args.levels = [int(c) for c in args.concurrency.split(",")]
    args.max_requests, args.loadgen_procs = 2_000_000, 1  # what bench.measure reads
    return args


def _start(args: argparse.Namespace, procs: bench.Processes, workdir: Path) -> tuple[int, int]:
    """Start the three fakes and Tollway; return Tollway's port and the flaky fake's."""
    me = [bench.PY, str(Path(__file__).resolve())]
    ports = [bench._free_port() for _ in range(3)]
    for name, port in zip("ab", ports, strict=False):
        fake = [bench.PY, str(bench.ROOT / "bench" / "fake_provider.py"), str(port)]
        procs.start(f"fake_{name}", [*fake, f"--chunks={args.chunks}"], bench.LOADGEN_CPU, port)
    flaky = [*me, f"--serve-flaky={ports[2]}", f"--seed={args.seed}", f"--chunks={args.chunks}"]
    procs.start("fake_c", flaky, bench.LOADGEN_CPU, ports[2])
    port = bench._free_port()
    config = workdir / "tollway.yaml"
    text = CONFIG.format(
        port=port, a=ports[0], b=ports[1], c=ports[2], header=FAIL_RATE_HEADER, rate=args.fail_rate
    )
    config.write_text(text)
    tollway = str(Path(bench.PY).parent / "tollway")
    # serve keeps its ledger in an embedded Postgres; this run's lives in the scratch dir.
    data = f"TOLLWAY_DATA_DIR={workdir / 'data'}"
    argv = ["env", data, tollway, "serve", "--migrate", "--config", str(config)]
    procs.start("tollway", argv, bench.PROXY_CPU, port)
    return port, ports[2]


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    if args.serve_flaky:
        web.run_app(
            flaky_app(args.chunks, args.seed),
            host="127.0.0.1",
            port=args.serve_flaky,
            access_log=None,
            print=None,
        )
        return 0
    pin = not args.no_pin and shutil.which("taskset") is not None and (os.cpu_count() or 1) >= 2
    if pin:
        os.sched_setaffinity(0, {int(bench.LOADGEN_CPU)})
    signal.signal(signal.SIGINT, bench._interrupt)
    signal.signal(signal.SIGTERM, bench._interrupt)
    started = f"{datetime.now(UTC):%Y-%m-%d %H:%M:%S} UTC"
    with tempfile.TemporaryDirectory(prefix="tollway-failover-") as tmp:
        procs = bench.Processes(pin, Path(tmp))
        try:
            port, c_port = _start(args, procs, Path(tmp))
            t0 = time.monotonic()
            rows = measure_all(args, procs, port, c_port)
            spent = time.monotonic() - t0
        except KeyboardInterrupt:
            print("failover: interrupted; stopping children", file=sys.stderr)
            return 130
        finally:
            procs.stop_all()
    print(f"\n- started: {started}\n- machine: {bench.machine_notes(pin)}")
    print(f"- tollway: {bench.tollway_version(None)}")
    print(
        f"- method: {args.duration:g} s per point after {args.warmup:g} s warm-up, medians of "
        f"{args.repeats} repeat(s), models interleaved, fail rate {args.fail_rate:g}, "
        f"{spent:.0f} s in all\n"
    )
    print(table(rows))
    print("\n" + "\n".join(verdicts(rows)))
    for r in rows:
        if r.first_error:
            print(f"errors in {r.scenario} c={r.concurrency} {r.model}: {r.first_error}")
    return 0 if all(r.errors == 0 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
