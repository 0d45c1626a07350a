"""What holds Tollway's event loop under load: slow callbacks, long loop turns, GC pauses.

    .venv/bin/python bench/loopwatch.py                       # billing, 32 KB chat, c=16
    .venv/bin/python bench/loopwatch.py --target tollway --prompt-kb 0.5 --stream
    .venv/bin/python bench/loopwatch.py --rev db0574e --rate 300   # a commit; open loop

The lag probe (``proxy/web/loop_lag.py``) says *how late* a 1 ms timer wakes;
this says *why*. It serves ``run.py``'s target (``tollway_billing`` by default:
keys, quotas, budgets and usage rows on an embedded Postgres and Redis) in
front of the fake provider, under a bench-only shim (``SHIM``; nothing of it
is in ``proxy/``), sends ``--requests`` requests at ``--concurrency`` with
``loadgen.py``, and prints:

- **turns**: how long each turn of the loop ran (from the poll's return to the
  next poll: the time a timer that fell due during the turn waited at most),
  as a distribution, with the number of callbacks a turn ran;
- **callbacks**: every callback that ran longer than ``--slow-ms``, grouped by
  what it was (a task's coroutine and the line it resumed at and stopped at,
  or the callback's name), with count and total/max time;
- **GC**: the cyclic collector's pauses, by generation (``gc.callbacks``).

The shim runs the standard ``asyncio`` loop, not uvloop (whose callbacks are
C and cannot be timed from Python): the Python code the callbacks run is the
same, the loop's own dispatch is slower, so absolute times are an upper bound
and the distribution's shape is what to read. Timing costs two
``perf_counter`` calls per callback. Every process started here is stopped by
PID on the way out.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

# bench/'s own modules (the script's directory is on sys.path).
import orjson
import run
from prompts import history

# ``python -c SHIM serve ...``: ``python -m proxy`` with timed callbacks, turns
# and collections, the summary written to $LOOPWATCH_OUT every second.
SHIM = r"""
import asyncio, gc, os, sys, threading, time, runpy, types
import orjson
sys.modules["uvloop"] = None  # the standard loop: its callbacks are Python, timeable
from asyncio import base_events, events

OUT = os.environ["LOOPWATCH_OUT"]
SLOW = float(os.environ.get("LOOPWATCH_SLOW_MS", "2")) / 1000
clock, cpu = time.perf_counter, time.thread_time
state = {"turns": [], "slow": {}, "gc": [], "callbacks": 0, "armed": False}
_turn = {"start": None, "cpu": 0.0, "n": 0}


def _name(handle):
    cb = handle._callback
    task = getattr(cb, "__self__", None)
    if type(task) is not asyncio.Task:
        return getattr(cb, "__qualname__", None) or type(cb).__name__
    coro = task.get_coro()
    inner = coro
    # the innermost awaited coroutine: where the step resumes (plain coroutines only)
    while type(inner.cr_await) is types.CoroutineType:
        inner = inner.cr_await
    f = inner.cr_frame if type(inner) is types.CoroutineType else None
    where = ""
    if f is not None:
        code = f.f_code
        where = f"{code.co_qualname} ({os.path.basename(code.co_filename)}:{f.f_lineno})"
    return f"task {getattr(coro, '__qualname__', '?')} @ {where}"


_orig_run = events.Handle._run


def _run(self):
    if not state["armed"]:
        return _orig_run(self)
    before = _name(self)
    t0, c0 = clock(), cpu()
    _orig_run(self)
    dt, dc = clock() - t0, cpu() - c0
    _turn["n"] += 1
    state["callbacks"] += 1
    if dt >= SLOW or dc >= SLOW:
        e = state["slow"].setdefault(before, [0, 0.0, 0.0, 0.0, 0.0])
        e[0] += 1
        e[1] += dt
        e[2] = max(e[2], dt)
        e[3] += dc
        e[4] = max(e[4], dc)


events.Handle._run = _run
_orig_once = base_events.BaseEventLoop._run_once


def _run_once(self):
    sel = self._selector
    if not getattr(sel, "_watched", False):
        orig_select = sel.select

        def select(timeout=None):
            out = orig_select(timeout)
            _turn["start"], _turn["cpu"], _turn["n"] = clock(), cpu(), 0
            return out

        sel.select, sel._watched = select, True
    _orig_once(self)
    if state["armed"] and _turn["start"] is not None:
        state["turns"].append((clock() - _turn["start"], cpu() - _turn["cpu"], _turn["n"]))


base_events.BaseEventLoop._run_once = _run_once
_gc_t0 = {}


def _gc(phase, info):
    if not state["armed"]:
        return
    if phase == "start":
        _gc_t0["t"] = clock()
    elif "t" in _gc_t0:
        pause = clock() - _gc_t0.pop("t")
        state["gc"].append((info["generation"], pause, info.get("collected", 0)))


gc.callbacks.append(_gc)


def _dump():
    while True:
        time.sleep(1.0)
        if os.path.exists(OUT + ".arm"):
            state["armed"] = True
        snap = {"turns": list(state["turns"]), "slow": dict(state["slow"]),
                "gc": list(state["gc"]), "callbacks": state["callbacks"]}
        tmp = OUT + ".tmp"
        with open(tmp, "wb") as fh:
            fh.write(orjson.dumps(snap))
        os.replace(tmp, OUT)


def _arm_watch():
    # armed as soon as the driver creates OUT.arm (after the warm-up); polled
    # every 50 ms so the window starts with the measured requests.
    while not state["armed"]:
        if os.path.exists(OUT + ".arm"):
            state["armed"] = True
        time.sleep(0.05)


threading.Thread(target=_dump, daemon=True).start()
threading.Thread(target=_arm_watch, daemon=True).start()
runpy.run_module("proxy", run_name="__main__", alter_sys=True)
"""


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def report(data: dict[str, Any], requests: int, slow_ms: float) -> str:
    walls = [w for w, _, _ in data["turns"]]
    cpus = [c for _, c, _ in data["turns"]]
    counts = [n for _, _, n in data["turns"]]
    n = max(1, len(walls))

    def row(name: str, xs: list[float]) -> str:
        return (
            f"| {name} | {_pct(xs, 0.5) * 1e3:.2f} | {_pct(xs, 0.9) * 1e3:.2f} "
            f"| {_pct(xs, 0.99) * 1e3:.2f} | {max(xs, default=0) * 1e3:.2f} "
            f"| {sum(x > 0.002 for x in xs) / n:.1%} |"
        )

    lines = [
        f"{requests} requests; {data['callbacks']:,} callbacks "
        f"({data['callbacks'] / requests:.1f} per request) in {len(walls):,} loop turns "
        f"(callbacks per turn p50 {_pct(counts, 0.5):.0f}, p99 {_pct(counts, 0.99):.0f})",
        "",
        "| loop turn, ms | p50 | p90 | p99 | max | turns > 2 ms |",
        "|---|---:|---:|---:|---:|---:|",
        row("wall clock", walls),
        row("CPU time of the loop's thread", cpus),
        "",
        f"Callbacks over {slow_ms:g} ms of wall clock or CPU time:",
        "",
        "| callback (a task: its coroutine @ where the step resumed) | count "
        "| wall total / max ms | CPU total / max ms |",
        "|---|---:|---:|---:|",
    ]
    slow = sorted(data["slow"].items(), key=lambda kv: -kv[1][3])
    for name, (k, wall, wmax, cpu_, cmax) in slow[:25]:
        lines.append(
            f"| `{name[:140]}` | {k} | {wall * 1e3:.1f} / {wmax * 1e3:.2f} "
            f"| {cpu_ * 1e3:.1f} / {cmax * 1e3:.2f} |"
        )
    lines += [
        "",
        "| GC generation | collections | median ms | max ms | total ms |",
        "|---|---:|---:|---:|---:|",
    ]
    for gen in (0, 1, 2):
        pauses = [d for g, d, _ in data["gc"] if g == gen]
        if pauses:
            lines.append(
                f"| {gen} | {len(pauses)} | {statistics.median(pauses) * 1e3:.2f} "
                f"| {max(pauses) * 1e3:.2f} | {sum(pauses) * 1e3:.1f} |"
            )
    if not data["gc"]:
        lines.append("| (none in the window) | 0 | | | |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--target", default="tollway_billing", help="a Tollway target of run.py")
    p.add_argument("--prompt-kb", type=float, default=32.0)
    p.add_argument("--stream", action="store_true")
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--rate", type=float, default=0.0, help="open loop: requests/s (loadgen.py)")
    p.add_argument("--rev", help="serve proxy/ at this git revision (default: the tree)")
    p.add_argument("--requests", type=int, default=3000)
    p.add_argument("--warmup", type=int, default=500)
    p.add_argument("--slow-ms", type=float, default=2.0)
    p.add_argument("--extra-yaml", default="", help="appended to the target's YAML")
    p.add_argument("--json", type=Path, help="also write the raw summary here")
    args = p.parse_args(argv)
    target = next((t for t in run.TARGETS if t.name == args.target and t.tollway), None)
    if target is None or target.command is None:
        raise SystemExit(f"loopwatch: {args.target} is not a Tollway target of run.py")
    with tempfile.TemporaryDirectory(
        prefix="tollway-loopwatch-", ignore_cleanup_errors=True
    ) as tmp:
        workdir = Path(tmp)
        out = workdir / "loopwatch.json"
        src = run.export_revision(args.rev, workdir / "src") if args.rev else None
        procs = run.Processes(False, workdir)
        stores = run.Datastores(workdir, argparse.Namespace(targets=args.target, dsn=None))
        try:
            env = run.Env(
                run._free_port(), workdir, stores.dsn, src, stores.redis_url, loop_lag_ms=0.0
            )
            fake = [run.PY, str(run.BENCH / "fake_provider.py"), str(env.provider_port)]
            procs.start("fake_provider", fake, "0", env.provider_port)
            port = run._free_port()
            argv_ = target.command(env, port)
            if args.extra_yaml:
                config = Path(argv_[argv_.index("--config") + 1])
                config.write_text(config.read_text() + args.extra_yaml)
            # ``env K=V ... tollway serve ...`` -> ``env K=V ... python -c SHIM serve ...``
            i = argv_.index(str(Path(run.PY).parent / "tollway"))  # not an env value's path
            argv_[i : i + 1] = [f"LOOPWATCH_OUT={out}", f"LOOPWATCH_SLOW_MS={args.slow_ms}"]
            argv_[i + 2 : i + 2] = [run.PY, "-c", SHIM]
            procs.start(args.target, argv_, "1", port)
            key = env.api_keys.get(args.target, "sk-bench")
            body = {"model": "bench-model", "messages": history(args.prompt_kb)}
            if args.stream:
                body |= {"stream": True, "stream_options": {"include_usage": True}}

            def load(n: int) -> dict[str, Any]:
                cmd = [run.PY, str(run.LOADGEN), f"http://127.0.0.1:{port}/v1/chat/completions"]
                cmd += [orjson.dumps(body).decode(), f"--concurrency={args.concurrency}"]
                cmd += ["--duration=600", "--warmup=0", f"--max-requests={n}", f"--api-key={key}"]
                cmd += ["--stream"] if args.stream else []
                cmd += [f"--rate={args.rate:g}"] if args.rate else []
                done = subprocess.run(cmd, capture_output=True, check=True, timeout=900)
                result: dict[str, Any] = orjson.loads(done.stdout)
                if result["errors"]:
                    raise RuntimeError(f"loopwatch: errors: {result['first_error']}")
                return result

            load(args.warmup)
            Path(f"{out}.arm").touch()
            time.sleep(0.3)
            result = load(args.requests)
            time.sleep(2.5)  # the shim writes its summary every second
            data = orjson.loads(out.read_bytes())
        except Exception:
            log = workdir / f"{args.target}.log"
            text = log.read_text(errors="replace") if log.exists() else ""
            print(
                "\n".join(x for x in text.splitlines() if '"type":"access"' not in x)[-5000:],
                file=sys.stderr,
            )
            raise
        finally:
            procs.stop_all()
            stores.stop()
            run._stop_embedded_postgres(workdir)
    print(
        f"loopwatch: {args.target}, {args.prompt_kb:g} KB "
        f"{'stream' if args.stream else 'chat'}, c={args.concurrency}, "
        f"{f'open loop at {args.rate:g}/s, ' if args.rate else ''}"
        f"{result['ok']} requests, proxy/ at {run.tollway_version(args.rev)}, "
        "standard asyncio loop\n"
    )
    print(report(data, result["ok"], args.slow_ms))
    if args.json:
        args.json.write_bytes(orjson.dumps(data))
    return 0


if __name__ == "__main__":
    sys.exit(main())
