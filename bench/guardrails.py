"""Guardrails' CPU cost, in process (no network): what the local detectors
cost per KB of prompt, and what the output filter adds per stream event.

    .venv/bin/python bench/guardrails.py

Prompts come from ``bench/prompts.py`` (prose-like chat turns); the stream is
a 200-event answer of the size the long-stream benchmark sends. The second
number is the filter's own CPU per event; the ratio against a whole
gateway's CPU per event is in bench/RESULTS.md.
"""

from __future__ import annotations

import time

import orjson

from bench.prompts import history
from proxy.stages.guardrails.config import parse_guardrails
from proxy.stages.guardrails.scan import Scan
from proxy.stages.guardrails.stream import GuardStream

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


if __name__ == "__main__":
    for kb in (0.5, 8, 32):
        print(f"local detectors, {kb} KB prompt: {per_kb(kb):.1f} µs/KB")
    print(f"output filter: {per_event():.1f} µs CPU per stream event")
