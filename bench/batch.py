"""Batch API throughput, and what a running batch costs interactive traffic.

One ``tollway serve --workers 1`` (one HTTP worker, and ``--batch-workers``
batch processes at ``--nice``: ``batches.workers``/``batches.nice``; its own
embedded Postgres and Redis under a temporary data dir, ``--demo`` for the
key) in front of ``bench/fake_provider.py`` (no artificial delay):

1. ``lines/s``: a batch of ``--lines`` chat lines, alone, from creation to
   ``completed`` (polled every 50 ms), through the one batch process (or,
   with ``--batch-workers 0``, the HTTP worker).
2. ``--rounds`` rounds, alternating: interactive p50/p99 of non-stream chat
   requests (``--concurrency`` closed-loop clients for ``--seconds``) with no
   batch running; then the same load while a batch of ``--big-lines`` runs
   (checked to still be running when the load ends, so the whole window
   overlaps it), which is then cancelled before the next round.

    .venv/bin/python bench/batch.py --lines 3000 --big-lines 10000 --seconds 15 --rounds 3

The batch limits are the shipped defaults (``worker_concurrency: 8``) unless
``--worker-concurrency`` says otherwise.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import orjson

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
TOLLWAY = str(Path(PY).parent / "tollway")

CONFIG = """\
server: {{host: 127.0.0.1, port: {port}}}
auth: keys
providers:
  fake:
    kind: openai
    base_url: http://127.0.0.1:{provider_port}/v1
    api_key: sk-bench-provider
models:
  - name: bench-model
    targets: [{{provider: fake}}]
tiers:
  pro: {{requests_per_hour: 1000000000, monthly_requests: 1000000000,
        monthly_tokens: 1000000000000, max_tokens: 4096}}
prices:
  bench-model: {{prompt: 1.0, completion: 2.0}}
batches: {{worker_concurrency: {worker_concurrency}, poll_interval_s: 0.2,
           workers: {batch_workers}, nice: {nice}, busy_lines_per_s: {busy_rate},
           idle_priority: {idle}}}
"""
BODY = {"model": "bench-model", "messages": [{"role": "user", "content": "Say hello"}]}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _jsonl(n: int, tag: str) -> bytes:
    return b"".join(
        orjson.dumps(
            {
                "custom_id": f"{tag}-{i}",
                "method": "POST",
                "url": "/v1/chat/completions",
                "body": BODY,
            }
        )
        + b"\n"
        for i in range(n)
    )


async def _create_batch(s: aiohttp.ClientSession, base: str, lines: int, tag: str) -> str:
    form = aiohttp.FormData()
    form.add_field("purpose", "batch")
    form.add_field("file", _jsonl(lines, tag), filename=f"{tag}.jsonl")
    async with s.post(base + "/v1/files", data=form) as r:
        file_id = (await r.json())["id"]
    body = {
        "input_file_id": file_id,
        "endpoint": "/v1/chat/completions",
        "completion_window": "24h",
    }
    async with s.post(base + "/v1/batches", json=body) as r:
        made = await r.json()
        assert made["status"] == "in_progress", made
        return str(made["id"])


async def _status(s: aiohttp.ClientSession, base: str, batch_id: str) -> dict[str, object]:
    async with s.get(f"{base}/v1/batches/{batch_id}") as r:
        return dict(await r.json())


async def _until_done(s: aiohttp.ClientSession, base: str, batch_id: str, limit: float) -> dict:
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        b = await _status(s, base, batch_id)
        if b["status"] in ("completed", "failed", "expired", "cancelled"):
            return b
        await asyncio.sleep(0.05)  # polling, as a client would
    raise TimeoutError(f"batch {batch_id} not done within {limit}s")


async def _cancel(s: aiohttp.ClientSession, base: str, batch_id: str) -> None:
    """Cancel, retried while the gateway answers 503 (a loaded Postgres past
    its command timeout): an uncancelled batch would run all its lines at
    full speed before the next round, with no interactive load to yield to."""
    for _ in range(20):
        async with s.post(f"{base}/v1/batches/{batch_id}/cancel") as r:
            await r.read()
            if r.status in (200, 409):
                return
        await asyncio.sleep(0.5)  # a retry's back-off
    raise RuntimeError(f"batch {batch_id} could not be cancelled")


async def _interactive(
    s: aiohttp.ClientSession, base: str, concurrency: int, seconds: float
) -> tuple[list[float], int]:
    """Closed-loop non-stream chat for ``seconds``: latencies (ms) and errors."""
    latencies: list[float] = []
    errors = 0
    end = time.monotonic() + seconds

    async def client() -> None:
        nonlocal errors
        while time.monotonic() < end:
            t0 = time.perf_counter()
            async with s.post(base + "/v1/chat/completions", json=BODY) as r:
                await r.read()
                if r.status != 200:
                    errors += 1
            latencies.append((time.perf_counter() - t0) * 1000)

    await asyncio.gather(*(client() for _ in range(concurrency)))
    return latencies, errors


async def _open_loop(
    s: aiohttp.ClientSession, base: str, rate: float, seconds: float
) -> tuple[list[float], int]:
    """``rate`` non-stream chat requests a second for ``seconds``, each sent at
    its own time whether or not the earlier ones have finished (as users'
    requests arrive): latencies (ms, from each request's scheduled start, so a
    stalled gateway's queue counts) and errors."""
    loop = asyncio.get_running_loop()
    latencies: list[float] = []
    errors = 0
    start = loop.time()

    async def one(at: float) -> None:
        nonlocal errors
        try:
            async with s.post(base + "/v1/chat/completions", json=BODY) as r:
                await r.read()
                errors += r.status != 200
        except (aiohttp.ClientError, TimeoutError):
            errors += 1
        latencies.append((loop.time() - at) * 1000)

    sent: list[asyncio.Task[None]] = []
    for i in range(int(rate * seconds)):
        at = start + i / rate
        if (wait := at - loop.time()) > 0:
            await asyncio.sleep(wait)  # the arrival schedule, not synchronisation
        sent.append(loop.create_task(one(at)))  # all awaited below
    await asyncio.wait_for(asyncio.gather(*sent), timeout=60)
    return latencies, errors


async def _load(args: argparse.Namespace, s: aiohttp.ClientSession) -> tuple[list[float], int]:
    if args.rate:
        return await _open_loop(s, args.base, args.rate, args.seconds)
    return await _interactive(s, args.base, args.concurrency, args.seconds)


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _start(args: argparse.Namespace, work: Path) -> tuple[subprocess.Popen[bytes], ...]:
    provider_port, port = _free_port(), _free_port()
    provider = subprocess.Popen(
        [PY, str(ROOT / "bench" / "fake_provider.py"), str(provider_port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    config = work / "tollway.yaml"
    config.write_text(
        CONFIG.format(
            port=port,
            provider_port=provider_port,
            worker_concurrency=args.worker_concurrency,
            batch_workers=args.batch_workers,
            nice=args.nice,
            busy_rate=args.busy_lines_per_s,
            idle="true" if args.idle else "false",
        )
    )
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "REDIS_URL")}
    env["TOLLWAY_DATA_DIR"] = str(work / "data")
    log = (work / "serve.log").open("wb")
    serve = subprocess.Popen(
        [TOLLWAY, "serve", "--migrate", "--demo", "--workers", "1", "--config", str(config)],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    deadline = time.monotonic() + 120
    while "listening on" not in (text := (work / "serve.log").read_text()):
        if serve.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"tollway serve did not start:\n{text}")
        time.sleep(0.2)  # start-up of a subprocess: polled, as bench/run.py does
    key = re.search(r"export TOLLWAY_KEY=(tw-\S+)", text)
    assert key is not None, text
    args.base, args.key = f"http://127.0.0.1:{port}", key.group(1)
    return provider, serve


async def _measure(args: argparse.Namespace) -> dict[str, object]:
    headers = {"Authorization": f"Bearer {args.key}"}
    connector = aiohttp.TCPConnector(limit=0)
    rounds: list[dict[str, float]] = []
    async with aiohttp.ClientSession(headers=headers, connector=connector) as s:
        base = args.base
        await _interactive(s, base, args.concurrency, 2.0)  # warm-up
        t0 = time.monotonic()
        alone = await _create_batch(s, base, args.lines, "alone")
        done = await _until_done(s, base, alone, 600)
        elapsed = time.monotonic() - t0
        counts = done["request_counts"]
        assert isinstance(counts, dict) and counts["completed"] == args.lines, done
        for n in range(args.rounds):
            quiet, quiet_err = await _load(args, s)
            big = await _create_batch(s, base, args.big_lines, f"big{n}")
            busy, busy_err = await _load(args, s)
            during = await _status(s, base, big)
            await _cancel(s, base, big)
            await _until_done(s, base, big, 600)
            r = {
                "quiet_p50": _pct(quiet, 0.5),
                "quiet_p99": _pct(quiet, 0.99),
                "quiet_rps": len(quiet) / args.seconds,
                "quiet_errors": quiet_err,
                "busy_p50": _pct(busy, 0.5),
                "busy_p99": _pct(busy, 0.99),
                "busy_rps": len(busy) / args.seconds,
                "busy_errors": busy_err,
                "still": float(during["status"] == "in_progress"),
                "ran": float(during["request_counts"]["completed"]),  # type: ignore[index]
            }
            rounds.append(r)
            _print_round(n + 1, r)
    return {"lines_per_s": args.lines / elapsed, "rounds": rounds}


def _print_round(n: int, r: dict[str, float]) -> None:
    print(
        f"round {n}: no batch p50 {r['quiet_p50']:.1f} p99 {r['quiet_p99']:.1f} ms"
        f" {r['quiet_rps']:.0f} req/s err {r['quiet_errors']:.0f} | with batch"
        f" p50 {r['busy_p50']:.1f} p99 {r['busy_p99']:.1f} ms {r['busy_rps']:.0f} req/s"
        f" err {r['busy_errors']:.0f}, batch lines meanwhile {r['ran']:.0f}"
        f" (still running: {bool(r['still'])}) | p99 ratio {r['busy_p99'] / r['quiet_p99']:.2f}x",
        flush=True,
    )


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lines", type=int, default=2000, help="the batch measured alone")
    p.add_argument("--big-lines", type=int, default=10000, help="the batch run beside the load")
    p.add_argument("--seconds", type=float, default=15.0, help="each interactive load window")
    p.add_argument("--concurrency", type=int, default=8, help="interactive clients")
    p.add_argument(
        "--rate",
        type=float,
        default=0.0,
        help="open-loop interactive load: requests/s sent on a fixed schedule"
        " (instead of --concurrency closed-loop clients)",
    )
    p.add_argument("--worker-concurrency", type=int, default=8, help="batches.worker_concurrency")
    p.add_argument("--batch-workers", type=int, default=1, help="batches.workers")
    p.add_argument("--nice", type=int, default=10, help="batches.nice")
    p.add_argument("--busy-lines-per-s", type=float, default=10.0, help="batches.busy_lines_per_s")
    p.add_argument("--idle", action="store_true", help="batches.idle_priority: true")
    p.add_argument("--log", help="keep tollway's output in this file")
    p.add_argument("--rounds", type=int, default=3, help="alternated no-batch/batch rounds")
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="tollway-bench-batch-") as tmp:
        procs = _start(args, Path(tmp))
        try:
            r = asyncio.run(_measure(args))
        finally:
            provider, serve = procs
            os.killpg(serve.pid, signal.SIGTERM)  # serve and the embedded servers it started
            serve.wait(120)
            provider.terminate()
            provider.wait(10)
            if args.log:
                shutil.copy(Path(tmp) / "serve.log", args.log)
    rounds = r["rounds"]
    assert isinstance(rounds, list)
    med = {k: statistics.median(x[k] for x in rounds) for k in rounds[0]}
    print(f"batch alone: {args.lines} lines: {r['lines_per_s']:.0f} lines/s")
    print(
        f"median of {len(rounds)}: no batch p50 {med['quiet_p50']:.1f} p99 {med['quiet_p99']:.1f}"
        f" ms | with batch p50 {med['busy_p50']:.1f} p99 {med['busy_p99']:.1f} ms"
        f" | p99 ratio of medians {med['busy_p99'] / med['quiet_p99']:.2f}x (target <= 1.10x);"
        " per-round ratios " + ", ".join(f"{x['busy_p99'] / x['quiet_p99']:.2f}x" for x in rounds)
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
