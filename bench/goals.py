"""Issue 12's targets, checked against one run's medians, as one table.

Every check compares rows of the same run (never numbers from another run),
so a noisy machine moves both sides of a ratio together. A check whose rows
the run does not have (a target or size left out) is not listed; one whose
value could not be read (e.g. no CPU time) is listed as "n/a". Rows are
run.py's ``Row`` and longrun's ``LongRow``; read by attribute only.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

SCENARIOS = ("chat", "chat-stream")
Check = dict[str, Any]  # {"target", "measured", "limit", "pass"}


def _check(what: str, value: float | None, limit: float, shown: str, unit: str) -> Check:
    if value is None:
        return {"target": what, "measured": "n/a", "limit": unit, "pass": None}
    return {
        "target": what,
        "measured": format(value, shown) + unit,
        "limit": f"≤ {limit:g}{unit}",
        "pass": value <= limit,
    }


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def _diff(a: float | None, b: float | None) -> float | None:
    return a - b if a is not None and b is not None else None


def _request_checks(rows: Sequence[Any]) -> list[Check]:
    by = {(r.scenario, r.prompt_kb, r.concurrency, r.target): r for r in rows}
    kbs = sorted({r.prompt_kb for r in rows})
    out: list[Check] = []

    def pair(
        s: str, kb: float, c: int, a: str, b: str, get: Callable[[Any], float | None]
    ) -> tuple[float | None, float | None] | None:
        ra, rb = by.get((s, kb, c, a)), by.get((s, kb, c, b))
        return None if ra is None or rb is None else (get(ra), get(rb))

    for s in SCENARIOS:
        for kb in kbs:
            size = f"{s} {kb:g} KB"
            cpu = pair(s, kb, 16, "tollway", "floor_proxy", lambda r: r.cpu_us)
            if cpu:
                what = f"{size}: pass-through CPU/req at c=16, tollway / floor_proxy"
                out.append(_check(what, _ratio(*cpu), 1.5, ".2f", "x"))
            cpu = pair(s, kb, 16, "tollway_billing", "tollway", lambda r: r.cpu_us)
            if cpu:
                what = f"{size}: billing CPU/req at c=16, tollway_billing / tollway"
                out.append(_check(what, _ratio(*cpu), 1.25, ".2f", "x"))
            for target, extra in (("tollway", 0.25), ("tollway_billing", 0.5)):
                added = pair(s, kb, 1, target, "floor_proxy", lambda r: r.added_p50_ms)
                if added:
                    what = f"{size}: {target} added p50 at c=1 minus floor_proxy's"
                    out.append(_check(what, _diff(*added), extra, "+.3f", " ms"))
    if kbs:
        for s in SCENARIOS:
            r = by.get((s, kbs[-1], 16, "tollway_billing"))
            if r is not None:
                what = f"{s} {kbs[-1]:g} KB: tollway_billing event-loop lag p99 at c=16"
                out.append(_check(what, r.lag_p99_ms, 2.0, ".2f", " ms"))
    return out


def _long_checks(longs: Sequence[Any]) -> list[Check]:
    by = {(r.streams, r.target): r for r in longs}
    out: list[Check] = []
    for n in sorted({r.streams for r in longs}):
        tw, floor = by.get((n, "tollway")), by.get((n, "floor_proxy"))
        if tw is not None and floor is not None:
            cpu = _ratio(tw.get("cpu_us_per_event"), floor.get("cpu_us_per_event"))
            what = f"long streams N={n}: CPU/event, tollway / floor_proxy"
            out.append(_check(what, cpu, 1.15, ".2f", "x"))
            ttfb = _diff(tw.get("ttfb_p50_ms"), floor.get("ttfb_p50_ms"))
            what = f"long streams N={n}: TTFB p50, tollway minus floor_proxy"
            out.append(_check(what, ttfb, 5.0, "+.1f", " ms"))
    biggest = max((r.streams for r in longs), default=0)
    for target in ("tollway", "tollway_billing"):
        r = by.get((biggest, target))
        if r is not None:
            what = f"long streams N={biggest}: {target} peak RSS (one worker)"
            if biggest != 1000:
                what += " [the target is at N=1000]"
            out.append(_check(what, r.get("peak_rss_mb"), 150.0, ".0f", " MB"))
    return out


def checks(rows: Sequence[Any], longs: Sequence[Any]) -> list[Check]:
    out = _request_checks(rows) + _long_checks(longs)
    errors = sum(r.errors for r in rows) + sum(r.errors for r in longs)
    out.append({"target": "errors, all points", "measured": str(errors), "limit": "0",
                "pass": errors == 0})  # fmt: skip
    return out


def table(rows: Sequence[Any], longs: Sequence[Any]) -> str:
    lines = ["| target | measured | limit | verdict |", "|---|---:|---:|---|"]
    for c in checks(rows, longs):
        verdict = "n/a" if c["pass"] is None else "PASS" if c["pass"] else "FAIL"
        lines.append(f"| {c['target']} | {c['measured']} | {c['limit']} | {verdict} |")
    return "\n".join(lines)
