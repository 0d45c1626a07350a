"""Where a native gateway's CPU goes, by component: pass-through against billing.

    .venv/bin/python bench/nativeprof.py                      # chat 0.5 KB, c=16
    .venv/bin/python bench/nativeprof.py --prompt-kb 32 --keep DIR
    .venv/bin/python bench/nativeprof.py --profiler py-spy --py-spy PATH
    .venv/bin/python bench/nativeprof.py --from DIR           # re-table a --keep

Callgrind (``instructions.py``) stretches clock-driven work (the 20 ms usage
flush runs about once a second under it, the journal's 0.2 s every 10 s) and
cProfile (``pyprofile.py``) inflates every Python call about fourfold, so
neither says where a *native* gateway's wall-clock CPU goes. This serves
``run.py``'s targets (``tollway`` and ``tollway_billing`` by default, the same
YAML, Postgres, Redis, fake provider and lag probe) and, per target:

- **CPU per request**: ``--repeats`` windows of exactly ``--requests``
  requests with no profiler armed (``syscalls.cpu_window``: utime and stime
  of the serving process from ``/proc``), medians; and the time its threads
  waited runnable for a CPU (``/proc/<pid>/task/*/schedstat``);
- **by component**: one window of the same load under a sampler, every
  sampled stack put in a component (``classify``: ``REQUEST_RULES`` when a
  frame is the request's, else ``BACKGROUND_RULES``; the first rule matching
  a frame's ``function (file)`` names it); a component's share of the
  samples times the CPU per request is its µs per request. The sampler is
  ``SHIM`` (default): SIGPROF on the process's CPU time, inside the gateway,
  uvloop kept, never sampling a thread that waits for a CPU; or py-spy from
  outside (``--profiler py-spy``), which does sample such a thread. The
  shim also times the cyclic GC's collections (``gc.callbacks``);
- **by shared object**: one window under ``perf record -e cpu-clock`` (no
  call graph: this VM has no PMU and CPython is built without frame
  pointers), its samples by DSO (the kernel, libpython, uvloop, asyncpg,
  hiredis, libc...), each share times the CPU per request.

The table's last column, billing minus pass-through, is billing's extra CPU
per request by component. Every process started here is stopped by PID.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

# bench/'s own modules (the script's directory is on sys.path).
import run
import syscalls

# A stack is a request's when one of its frames is the request's coroutine or
# aiohttp's server protocol; else it is background work (a flusher, a lease
# refill, a timer) or a connection's callback. Each kind has its rules, in
# order: the first rule whose pattern matches any frame ("function (file)")
# names the stack's component.
REQUEST = re.compile(
    r"\((proxy/pipeline/run|proxy/web/(handlers|gate|middleware|http_guard))\.py|\(aiohttp/"
)
# The loop's own turn: py-spy sees no Python frame past ``Runner.run`` while
# uvloop's C code runs (polling, reading and writing sockets, the kernel's
# share of them, and callbacks written in C).
IN_LOOP = re.compile(r"^(Runner\.run|run_until_complete|run_forever) \(")
REQUEST_RULES: list[tuple[str, str]] = [
    ("GC", r"^(gc_collect|collect_with_callback|_PyGC_Collect|gc_collect_main)"),
    (
        "settle: Billing.settle (row, price, refunds, ledger add)",
        r"^(Billing\.(settle|_refund|_row)|_details) \(",
    ),
    (
        "settle: access line",
        r"\(proxy/stages/settle/(access_log|line_writer)\.py|\(proxy/core/redact\.py",
    ),
    ("settle: metrics", r"\(proxy/stages/settle/metric"),
    ("settle: other", r"^(settle|settle_now|_settled|settle_stages|Settlers\.settle) \(proxy/"),
    ("admission: journal note", r"\(proxy/stores/journal\.py"),
    (
        "admission: Redis permits (request path)",
        r"\(proxy/stores/(permits|ratelimit)\.py",
    ),
    ("admission: quota lease (request path)", r"\(proxy/stores/quota\.py"),
    ("admission: budget lease (request path)", r"\(proxy/stores/budgets\.py"),
    (
        "admission: other (estimate, headers, objects)",
        r"\(proxy/stages/admit/|^admit \(proxy/pipeline/run",
    ),
    ("request: Redis calls (breaker store, other)", r"\(proxy/stores/redis_client\.py|\(redis/"),
    ("auth: key lookup", r"\(proxy/(stages/auth|stores/apikeys)\.py"),
    ("request: forward/provider", r"\(proxy/(stages/forward|providers)/"),
    ("request: parse/route/pipeline/web (rest)", r"\(proxy/"),
    ("request: aiohttp server (HTTP parse/write)", r"aiohttp"),
]
BACKGROUND_RULES: list[tuple[str, str]] = [
    ("GC", r"^(gc_collect|collect_with_callback|_PyGC_Collect|gc_collect_main)"),
    ("lag probe", r"\(proxy/web/loop_lag\.py"),
    ("journal flusher", r"\(proxy/stores/journal\.py"),
    ("ledger flusher (usage batch)", r"\(proxy/stores/(ledger|usage_batch|spool)\.py"),
    ("Redis permit refills (background)", r"\(proxy/stores/(permits|ratelimit)\.py"),
    ("quota top-ups", r"\(proxy/stores/quota\.py"),
    ("budget leases (background)", r"\(proxy/stores/budgets\.py"),
    ("key cache refresh", r"\(proxy/(stores/apikeys|stages/auth)\.py"),
    ("access log writer (LineWriter.flush)", r"\(proxy/stages/settle/line_writer\.py"),
    ("batch worker poll", r"\(proxy/pipeline/batch_worker\.py"),
    ("config reload watcher", r"^Reloader\.watch \("),
    ("Redis breaker sync", r"\(proxy/stages/forward/breaker_redis\.py"),
    ("upstream client callbacks (providers/h1)", r"\(proxy/providers/"),
    ("other proxy background", r"\(proxy/"),
    ("asyncpg protocol (no proxy frame)", r"asyncpg"),
    ("redis client (no proxy frame)", r"\(redis/|hiredis"),
    ("executor threads (no proxy frame)", r"\((threading|concurrent/futures/thread)\.py"),
    ("event loop (uvloop/asyncio)", r"uvloop|asyncio"),
]
_REQ = [(n, re.compile(p)) for n, p in REQUEST_RULES]
_BG = [(n, re.compile(p)) for n, p in BACKGROUND_RULES]
OTHER = "other"


def classify(frames: list[str]) -> str:
    """The component of one stack (frames outermost first)."""
    if frames and IN_LOOP.search(frames[-1]):
        return "event loop turn, no Python frame (uvloop C, socket I/O)"
    rules = _REQ if any(REQUEST.search(f) for f in frames) else _BG
    for name, pattern in rules:
        for frame in frames:
            if pattern.search(frame):
                return name
    return OTHER


# ``python -c SHIM serve ...``: ``tollway serve`` (uvloop and all) with a
# CPU-time sampler: SIGPROF every NATIVEPROF_MS of the process's CPU (user +
# system, ``setitimer(ITIMER_PROF)``), the main thread's Python stack counted
# while $NATIVEPROF_OUT.arm exists, written as py-spy's raw format to
# $NATIVEPROF_OUT when $NATIVEPROF_OUT.dump appears. Unlike py-spy, a thread
# waiting for a CPU is never sampled; C work between two Python frames (the
# loop's polling, a socket read) lands on the next Python frame to run, and an
# executor thread's CPU on whatever the main thread runs then.
SHIM = r"""
import collections, gc, json, os, runpy, signal, sys, threading, time
OUT = os.environ["NATIVEPROF_OUT"]
EVERY = float(os.environ.get("NATIVEPROF_MS", "2")) / 1000
counts = collections.Counter()
armed = [False]
names = {}
collected = {"n": 0, "cpu_s": 0.0, "start": 0.0}


def _gc(phase, info):
    if not armed[0]:
        return
    if phase == "start":
        if os.environ.get("NATIVEPROF_GC_TYPES") and not collected.get("types"):
            young = collections.Counter(type(o).__qualname__ for o in gc.get_objects(0))
            collected["types"] = young.most_common(25)
        collected["start"] = time.thread_time()
    else:
        spent = time.thread_time() - collected["start"]
        collected["n"] += 1
        collected["cpu_s"] += spent
        each = [info["generation"], round(spent * 1000, 2), info["collected"]]
        collected.setdefault("each", []).append(each)


def _short(path):
    name = names.get(path)
    if name is None:
        name = path
        for cut in ("/site-packages/", "/lib/python3.11/", "/lib/python3.12/"):
            if cut in path:
                name = path.split(cut, 1)[1]
                break
        else:
            if "/proxy/" in path:
                name = "proxy/" + path.rsplit("/proxy/", 1)[1]
        names[path] = name
    return name


def _sample(signum, frame):
    if not armed[0]:
        return
    stack = []
    while frame is not None:
        code = frame.f_code
        stack.append(f"{code.co_qualname} ({_short(code.co_filename)})")
        frame = frame.f_back
    stack.reverse()
    counts[";".join(stack)] += 1


def _control():
    while True:
        time.sleep(0.05)
        armed[0] = os.path.exists(OUT + ".arm")
        if os.path.exists(OUT + ".dump"):
            os.remove(OUT + ".dump")
            snap = dict(counts)
            counts.clear()
            with open(OUT + ".gc", "w") as fh:
                json.dump({"n": collected["n"], "cpu_s": collected["cpu_s"],
                           "each": collected.pop("each", []),
                           "types": collected.pop("types", [])}, fh)
            collected["n"], collected["cpu_s"] = 0, 0.0
            with open(OUT + ".tmp", "w") as fh:
                fh.writelines(f"{k} {v}\n" for k, v in snap.items())
            os.replace(OUT + ".tmp", OUT)


gc.callbacks.append(_gc)
signal.signal(signal.SIGPROF, _sample)
signal.setitimer(signal.ITIMER_PROF, EVERY, EVERY)
threading.Thread(target=_control, daemon=True).start()
runpy.run_module("proxy", run_name="__main__", alter_sys=True)
"""


def _shimmed(argv: list[str], out: Path, every_ms: float) -> list[str]:
    """``env K=V ... tollway serve ...`` -> ``env K=V ... python -c SHIM serve ...``"""
    i = argv.index(str(Path(run.PY).parent / "tollway"))  # not an env value's path
    argv = list(argv)
    # NATIVEPROF_GC_TYPES=1 (from our environment): the young generation's
    # types at the window's first collection, for what survives requests.
    types = os.environ.get("NATIVEPROF_GC_TYPES", "")
    shim = [run.PY, "-c", SHIM]
    argv[i : i + 1] = [f"NATIVEPROF_OUT={out}", f"NATIVEPROF_MS={every_ms:g}"]
    argv[i + 2 : i + 2] = [f"NATIVEPROF_GC_TYPES={types}", *shim]
    return argv


def gc_window(out: Path) -> tuple[int, float, list[list[float]]]:
    """The cyclic GC's collections in the last window: how many, their CPU
    seconds, and each one's (generation, CPU ms) (the sampler's
    ``gc.callbacks``; its samples hold this time too)."""
    try:
        data = json.loads(Path(f"{out}.gc").read_text())
    except (OSError, ValueError):
        return 0, 0.0, []
    return int(data["n"]), float(data["cpu_s"]), list(data.get("each", []))


def sigprof_window(out: Path, load: Callable[[], object]) -> Counter[str]:
    out.unlink(missing_ok=True)
    Path(f"{out}.arm").touch()
    time.sleep(0.2)
    try:
        load()
    finally:
        Path(f"{out}.arm").unlink()
        time.sleep(0.2)
        Path(f"{out}.dump").touch()
    for _ in range(200):
        if out.exists():
            return _raw_counts(out)
        time.sleep(0.05)
    raise RuntimeError("nativeprof: the sampler wrote nothing")


def _raw_counts(path: Path) -> Counter[str]:
    """py-spy's raw (collapsed) output: ``frame;frame;... count`` per line."""
    out: Counter[str] = Counter()
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if stack and count.isdigit():
            out[stack] += int(count)
    return out


def components(stacks: Counter[str]) -> Counter[str]:
    by: Counter[str] = Counter()
    for stack, n in stacks.items():
        # The thread's own name leads the stack: keep only the frames.
        frames = [f for f in stack.split(";") if not f.startswith(("process ", "thread "))]
        by[classify(frames)] += n
    return by


def _while_loaded(
    argv: list[str], stop: Callable[[subprocess.Popen[bytes]], None], load: Callable[[], object]
) -> None:
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        time.sleep(1.0)  # attached by then
        load()
    finally:
        stop(proc)
        _, err = proc.communicate(timeout=120)
        if proc.returncode not in (0, -signal.SIGINT, 130):
            sys.stderr.write(err.decode(errors="replace")[-2000:])


def _sigint(proc: subprocess.Popen[bytes]) -> None:
    proc.send_signal(signal.SIGINT)


def _run_delay_ns(pid: int) -> int:
    """Nanoseconds the process's threads waited runnable for a CPU (schedstat)."""
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            total += int((task / "schedstat").read_text().split()[1])
        except (OSError, IndexError, ValueError):
            continue
    return total


def spy_window(
    py_spy: str, pid: int, out: Path, rate: int, native: bool, load: Callable[[], object]
) -> Counter[str]:
    argv = [py_spy, "record", "--pid", str(pid), "--rate", str(rate), "--format", "raw"]
    argv += ["--output", str(out), "--threads"]
    argv += ["--native"] if native else ["--nonblocking"]
    _while_loaded(argv, _sigint, load)
    return _raw_counts(out)


def perf_window(pid: int, out: Path, load: Callable[[], object]) -> Counter[str]:
    """Samples by shared object (``perf record -e cpu-clock``, no call graph)."""
    argv = ["perf", "record", "-e", "cpu-clock", "-F", "999", "-p", str(pid), "-o", str(out)]
    _while_loaded(argv, _sigint, load)
    done = subprocess.run(
        ["perf", "report", "-i", str(out), "--stdio", "--sort", "dso", "-F", "sample,dso"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    by: Counter[str] = Counter()
    for line in done.stdout.splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[0].isdigit():
            by[_dso(" ".join(parts[1:]))] += int(parts[0])
    return by


# perf names a DSO by its file's base name: an extension module by its own
# (uvloop's ``loop.cpython-311-...so``, asyncpg's ``protocol.cpython-...so``).
_DSOS = (
    ("kernel", "kernel"),
    ("libpython", "libpython"),
    ("loop.cpython", "uvloop"),
    ("protocol.cpython", "asyncpg protocol"),
    ("pgproto", "asyncpg pgproto"),
    ("hiredis", "hiredis"),
    ("_http_parser", "aiohttp http parser (C)"),
    ("_http_writer", "aiohttp http writer (C)"),
    ("orjson", "orjson"),
    ("_multidict", "multidict"),
    ("_quoting", "yarl"),
    ("libc", "libc"),
    ("ld-linux", "libc"),
)


def _dso(name: str) -> str:
    for needle, short in _DSOS:
        if needle in name:
            return short
    return f"other native ({name})"


def _table(title: str, names: list[str], by: dict[str, Counter[str]], cpu: dict[str, float]) -> str:
    keys = sorted({k for c in by.values() for k in c}, key=lambda k: -sum(by[t][k] for t in names))
    head = f"| {title} | " + " | ".join(f"{t} µs/req (share)" for t in names)
    lines = [head + (" | extra µs/req |" if len(names) == 2 else " |")]
    lines.append("|---|" + "---:|" * (len(names) + (len(names) == 2)))
    per = {t: {k: by[t][k] / max(1, sum(by[t].values())) * cpu[t] for k in keys} for t in names}
    for k in keys:
        cells = [f"{per[t][k]:.0f} ({by[t][k] / max(1, sum(by[t].values())):.1%})" for t in names]
        extra = [f"{per[names[1]][k] - per[names[0]][k]:+.0f}"] if len(names) == 2 else []
        lines.append(f"| {k} | " + " | ".join(cells + extra) + " |")
    total = [f"{cpu[t]:.0f}" for t in names]
    extra = [f"{cpu[names[1]] - cpu[names[0]]:+.0f}"] if len(names) == 2 else []
    lines.append("| **all (CPU µs/req, unprofiled windows)** | " + " | ".join(total + extra) + " |")
    return "\n".join(lines)


def replay(source: Path) -> int:
    """The tables again from a ``--keep`` directory (the rules may have changed)."""
    kept = json.loads((source / "cpu.json").read_text())
    names, cpu = kept["names"], kept["cpu"]
    comp = {t: components(_raw_counts(source / f"{t}.spy")) for t in names}
    print(_table("component (py-spy)", names, comp, cpu))
    dso = {t: Counter(kept["dso"].get(t, {})) for t in names}
    if any(dso.values()):
        print()
        print(_table("shared object (perf cpu-clock)", names, dso, cpu))
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--targets", default="tollway,tollway_billing")
    p.add_argument("--case", default="chat", help="chat or chat-stream")
    p.add_argument("--prompt-kb", type=float, default=0.5)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--requests", type=int, default=3000, help="requests per window")
    p.add_argument("--warmup", type=int, default=500)
    p.add_argument("--repeats", type=int, default=3, help="unprofiled CPU windows (medians)")
    p.add_argument("--loop-lag-ms", type=float, default=1.0, help="as run.py; 0: probe off")
    p.add_argument(
        "--profiler",
        choices=("sigprof", "py-spy"),
        default="sigprof",
        help="sigprof: the in-process CPU-time sampler (SHIM); py-spy: from outside",
    )
    p.add_argument("--every-ms", type=float, default=2.0, help="sigprof: ms of CPU a sample")
    p.add_argument("--py-spy", default=shutil.which("py-spy"), help="py-spy's path")
    p.add_argument("--rate", type=int, default=200, help="py-spy samples a second")
    p.add_argument("--native", action="store_true", help="py-spy --native (pauses per sample)")
    p.add_argument("--no-perf", action="store_true", help="no perf record window")
    p.add_argument("--keep", type=Path, help="copy the raw profiles and CPU figures here")
    p.add_argument("--from", dest="source", type=Path, help="tables from a --keep directory")
    args = p.parse_args(argv)
    if args.source is not None:
        return replay(args.source)
    if args.profiler == "py-spy" and not args.py_spy:
        raise SystemExit("nativeprof: py-spy not found (pip install py-spy; --py-spy PATH)")
    names = args.targets.split(",")
    scenario = run.sized(next(s for s in run.SCENARIOS if s.name == args.case), args.prompt_kb)
    cpu: dict[str, float] = {}
    sys_us: dict[str, float] = {}
    runq: dict[str, float] = {}
    gcs: dict[str, tuple[int, float, list[list[float]]]] = {}
    spy: dict[str, Counter[str]] = {}
    spy_comp: dict[str, Counter[str]] = {}
    dso: dict[str, Counter[str]] = {}
    with tempfile.TemporaryDirectory(
        prefix="tollway-nativeprof-", ignore_cleanup_errors=True
    ) as tmp:
        workdir = Path(tmp)
        procs = run.Processes(False, workdir)
        stores = run.Datastores(workdir, argparse.Namespace(targets=args.targets, dsn=None))
        try:
            env = run.Env(
                run._free_port(),
                workdir,
                stores.dsn,
                None,
                stores.redis_url,
                loop_lag_ms=args.loop_lag_ms,
            )
            fake = [run.PY, str(run.BENCH / "fake_provider.py"), str(env.provider_port)]
            procs.start("fake_provider", fake, "0", env.provider_port)
            ports = {}
            for target in (t for t in run.TARGETS if t.name in names):
                if not target.tollway or target.command is None or target.unavailable(env):
                    raise SystemExit(f"nativeprof: {target.name} is not a Tollway target here")
                ports[target.name] = run._free_port()
                argv_ = target.command(env, ports[target.name])
                if args.profiler == "sigprof":
                    argv_ = _shimmed(argv_, workdir / f"{target.name}.spy", args.every_ms)
                procs.start(target.name, argv_, run.PROXY_CPU, ports[target.name])
            pids = {t: procs.pid(t) for t in names}
            keys = {t: env.api_keys.get(t, "sk-bench") for t in names}
            c, n = args.concurrency, args.requests

            def loader(t: str) -> Callable[[], object]:
                return lambda: syscalls._load(ports[t], scenario, c, n, keys[t])

            for t in names:
                syscalls._load(ports[t], scenario, c, args.warmup, keys[t])
            windows: dict[str, list[syscalls.Window]] = {t: [] for t in names}
            waits: dict[str, list[float]] = {t: [] for t in names}
            for _ in range(args.repeats):
                for t in names:
                    d0 = _run_delay_ns(pids[t])
                    windows[t].append(
                        syscalls.cpu_window(pids[t], ports[t], scenario, c, n, keys[t])
                    )
                    waits[t].append((_run_delay_ns(pids[t]) - d0) / 1000 / n)
            for t in names:
                cpu[t] = statistics.median(w.user_us + w.sys_us for w in windows[t])
                sys_us[t] = statistics.median(w.sys_us for w in windows[t])
                runq[t] = statistics.median(waits[t])
                print(
                    f"  {t}: CPU {[round(w.user_us + w.sys_us) for w in windows[t]]} µs/req",
                    file=sys.stderr,
                )
            for t in names:
                out = workdir / f"{t}.spy"
                if args.profiler == "sigprof":
                    spy[t] = sigprof_window(out, loader(t))
                    gcs[t] = gc_window(out)
                else:
                    spy[t] = spy_window(
                        args.py_spy, pids[t], out, args.rate, args.native, loader(t)
                    )
                spy_comp[t] = components(spy[t])
                if not args.no_perf and shutil.which("perf"):
                    dso[t] = perf_window(pids[t], workdir / f"{t}.perf", loader(t))
            if args.keep:
                args.keep.mkdir(parents=True, exist_ok=True)
                for t in names:
                    shutil.copy(workdir / f"{t}.spy", args.keep / f"{t}.spy")
                    if Path(f"{workdir / t}.spy.gc").exists():
                        shutil.copy(f"{workdir / t}.spy.gc", args.keep / f"{t}.gc.json")
                kept = {"names": names, "cpu": cpu, "sys": sys_us, "runq": runq, "dso": dso}
                kept["gc"] = gcs
                (args.keep / "cpu.json").write_text(json.dumps(kept))
        finally:
            procs.stop_all()
            stores.stop()
            run._stop_embedded_postgres(workdir)
    print(
        f"{args.case} {args.prompt_kb:g} KB, c={args.concurrency}, "
        f"{args.requests} requests a window, profiler {args.profiler}"
    )
    print()
    print(_table(f"component ({args.profiler})", names, spy_comp, cpu))
    print()
    print("system time (/proc stime): " + ", ".join(f"{t} {sys_us[t]:.0f} µs/req" for t in names))
    print(
        "waiting runnable for a CPU (schedstat; py-spy samples it, sigprof does not): "
        + ", ".join(f"{t} {runq[t]:.0f} µs/req" for t in names)
    )
    if gcs:
        print(
            "cyclic GC in the profiled window (gc.callbacks): "
            + ", ".join(
                f"{t} {gcs[t][0]} collections, {gcs[t][1] * 1e6 / args.requests:.1f} µs/req "
                f"(generation, CPU ms: {gcs[t][2]})"
                for t in names
            )
        )
    if dso:
        print()
        print(_table("shared object (perf cpu-clock)", names, dso, cpu))
    return 0


if __name__ == "__main__":
    sys.exit(main())
