"""CPU per request of the work Tollway does in proportion to the prompt,
at 0.5, 8 and 32 KB chat histories (``prompts.history``), one process, no I/O.

    .venv/bin/python bench/per_kb.py

Each row is the median of 5 runs of a timed loop (µs per call), and the
slope between 8 and 32 KB in µs per KB. ``tiktoken count`` is what
admission ran on the event loop before the size-based estimate; it is still
what settle runs (in a thread) when a provider reports no usage.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import orjson
from prompts import history

from proxy.core import redact, tokens
from proxy.stages import parse
from proxy.stages.cache.store import fingerprint

SIZES = (0.5, 8.0, 32.0)


def _time(fn: Callable[[], Any], budget: float = 0.2) -> float:
    n, runs = 1, []
    while True:  # calibrate: enough calls for ~budget/5 seconds
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        if time.perf_counter() - t0 > budget / 5 or n > 1_000_000:
            break
        n *= 2
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        runs.append((time.perf_counter() - t0) / n * 1e6)
    return statistics.median(runs)


def main() -> None:
    tokens.warm_up()
    rows: dict[str, list[float]] = {}
    for kb in SIZES:
        body = {"model": "bench-model", "messages": history(kb), "max_tokens": 100}
        raw = orjson.dumps(body)
        text = raw.decode()
        work: dict[str, Callable[[], Any]] = {
            "body parse (orjson.loads)": lambda raw=raw: orjson.loads(raw),
            "validation (parse.validate)": lambda b=body: parse.validate(b, "chat"),
            "admission estimate (estimate_prompt)": lambda b=body: tokens.estimate_prompt(
                b, "chat"
            ),
            "tiktoken count (count_prompt)": lambda b=body: tokens.count_prompt(
                b, "chat", "gpt-4o-mini"
            ),
            "forward body (orjson.dumps)": lambda b=body: orjson.dumps(b),
            "cache fingerprint (sort + sha256)": lambda b=body: fingerprint(
                "chat", "bench-model", b
            ),
            "redaction of the body text (scrub)": lambda t=text: redact.scrub(t),
        }
        for name, fn in work.items():
            rows.setdefault(name, []).append(_time(fn))
    print("| work | " + " | ".join(f"{kb:g} KB µs" for kb in SIZES) + " | µs per KB |")
    print("|---|" + "---:|" * (len(SIZES) + 1))
    for name, values in rows.items():
        slope = (values[2] - values[1]) / (SIZES[2] - SIZES[1])
        cells = " | ".join(f"{v:,.1f}" for v in values)
        print(f"| {name} | {cells} | {slope:.2f} |")


if __name__ == "__main__":
    main()
