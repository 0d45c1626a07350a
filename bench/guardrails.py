"""Guardrails' CPU cost, in process (no network): what the local detectors
cost per KB of prompt, and what the output filter adds per stream event.

    .venv/bin/python -m bench.guardrails            # in process, no network
    .venv/bin/python -m bench.guardrails --ratio    # a whole gateway, over sockets

``--ratio`` runs the gateway in this process (so this process's CPU time is
the gateway's) in front of ``bench/fake_provider.py`` and drives it with
``bench/longstream.py`` (both child processes): waves of long streams (200
events 25 ms apart, as a model's tokens come), alternately without and with
an output guardrail policy, and prints the gateway's CPU per upstream event
for each and their ratio (the median of the rounds).

Prompts come from ``bench/prompts.py`` (prose-like chat turns); the stream is
a 200-event answer of the size the long-stream benchmark sends. The second
number is the filter's own CPU per event; the ratio against a whole
gateway's CPU per event is in bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import orjson
import yaml
from aiohttp import web

from bench.prompts import history
from proxy.pipeline.registry import parse_config
from proxy.stages.guardrails.config import parse_guardrails
from proxy.stages.guardrails.scan import Scan
from proxy.stages.guardrails.stream import GuardStream
from proxy.web.app import build_app
from proxy.web.server import make_runner

BENCH = Path(__file__).resolve().parent

SECTION = {
    "policies": [
        {
            "name": "bench",
            "restore": True,
            "detectors": [
                {"use": "pii", "input": "redact", "output": "redact"},
                {"use": "secrets", "input": "redact", "output": "redact"},
                {
                    "name": "terms",
                    "blocklist": {"terms": ["zorblax"]},
                    "input": "block",
                    "output": "block",
                },
            ],
        }
    ]
}


def _policy():  # type: ignore[no-untyped-def]
    settings = parse_guardrails(SECTION)
    assert settings is not None
    return settings.policies[0]


def per_kb(kb: float, rounds: int = 200) -> float:
    policy = _policy()
    texts = [m["content"] for m in history(kb)]
    size = sum(len(t.encode()) for t in texts) / 1024
    started = time.process_time()
    for _ in range(rounds):
        scan = Scan()
        for text in texts:
            scan.apply(text, policy.input, "input")
    return (time.process_time() - started) / rounds / size * 1e6


def per_event(events: int = 200, rounds: int = 50) -> float:
    policy = _policy()
    base = {"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "m"}
    chunk = [
        b"data: "
        + orjson.dumps(
            {
                **base,
                "choices": [
                    {"index": 0, "delta": {"content": f" word{i} is here"}, "finish_reason": None}
                ],
            }
        )
        + b"\n\n"
        for i in range(events)
    ]
    started = time.process_time()
    for _ in range(rounds):
        f = GuardStream(policy, Scan())
        for data in chunk:
            f.feed(data)
    return (time.process_time() - started) / rounds / events * 1e6


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _config(provider_port: int, guarded: bool) -> dict[str, Any]:
    base_url = f"http://127.0.0.1:{provider_port}/v1"
    cfg: dict[str, Any] = {
        "auth": "none",
        "providers": {"fake": {"kind": "openai", "base_url": base_url, "api_key": "sk-bench"}},
        "models": [{"name": "bench-long", "targets": [{"provider": "fake"}]}],
    }
    if guarded:
        cfg["guardrails"] = SECTION
    return cfg


async def _wave(provider_port: int, guarded: bool, streams: int) -> tuple[float, int]:
    """The gateway's CPU µs over one wave of ``streams``, and the events the
    client got. The guarded gateway sends fewer events (none whose text is
    all held back) for the same upstream events, so CPU is compared per
    upstream event: the unguarded count."""
    app = build_app(parse_config(yaml.safe_dump(_config(provider_port, guarded)), {}))
    runner = make_runner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    body = {"model": "bench-long", "stream": True, "messages": [{"role": "user", "content": "hi"}]}
    try:
        started = time.process_time()
        client = await asyncio.create_subprocess_exec(
            sys.executable,
            str(BENCH / "longstream.py"),
            f"http://127.0.0.1:{port}/v1/chat/completions",
            orjson.dumps(body).decode(),
            *("--streams", str(streams), "--ramp", "1", "--timeout", "60"),
            stdout=subprocess.PIPE,
        )
        out, _ = await client.communicate()
        cpu = time.process_time() - started
    finally:
        await runner.cleanup()
    result = orjson.loads(out)
    assert result["errors"] == 0 and result["events"] > 0, result
    return cpu * 1e6, int(result["events"])


async def _ratio(rounds: int, streams: int) -> None:
    provider_port = _free_port()
    fake = subprocess.Popen(  # noqa: ASYNC220 - started once, before the waves
        [sys.executable, str(BENCH / "fake_provider.py"), str(provider_port)]
    )
    try:
        for _ in range(100):  # bounded: ~10 s for the fake to listen
            try:
                socket.create_connection(("127.0.0.1", provider_port), 0.1).close()
                break
            except OSError:
                await asyncio.sleep(0.1)
        plain: list[tuple[float, int]] = []
        guarded: list[tuple[float, int]] = []
        for i in range(rounds):
            # Alternate which goes first, so a drift in the machine's load
            # over a round does not favour one side.
            for guard in (False, True) if i % 2 == 0 else (True, False):
                (guarded if guard else plain).append(await _wave(provider_port, guard, streams))
            events = plain[-1][1]
            print(
                f"round {i + 1}: {plain[-1][0] / events:.1f} vs {guarded[-1][0] / events:.1f} "
                f"µs CPU per upstream event ({events} vs {guarded[-1][1]} events sent)"
            )
        ratios = [g / p for (p, _), (g, _) in zip(plain, guarded, strict=True)]
        per_plain = [c / n for c, n in plain]
        per_guarded = [c / n for (c, _), (_, n) in zip(guarded, plain, strict=True)]
        print(
            f"gateway CPU per upstream event, median of {rounds}: without guardrails "
            f"{statistics.median(per_plain):.1f} µs, with output guardrails "
            f"{statistics.median(per_guarded):.1f} µs, ratio {statistics.median(ratios):.2f} "
            f"(rounds {min(ratios):.2f}-{max(ratios):.2f})"
        )
    finally:
        fake.terminate()
        fake.wait(10)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ratio", action="store_true", help="a whole gateway, with and without")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--streams", type=int, default=50)
    args = p.parse_args()
    if args.ratio:
        asyncio.run(_ratio(args.rounds, args.streams))
        return
    for kb in (0.5, 8, 32):
        print(f"local detectors, {kb} KB prompt: {per_kb(kb):.1f} µs/KB")
    print(f"output filter: {per_event():.1f} µs CPU per stream event")


if __name__ == "__main__":
    main()
