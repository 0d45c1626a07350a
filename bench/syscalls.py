"""User vs system CPU and syscalls per request, pass-through against billing.

    .venv/bin/python bench/syscalls.py                  # chat 0.5 and 32 KB, c=16 and c=1
    .venv/bin/python bench/syscalls.py --cases chat-stream --prompt-kb 0.5 --concurrency 16

Callgrind (``instructions.py``) counts the gateway's user-space instructions
and nothing the kernel does for it; ``run.py`` reads the process tree's
utime + stime. This splits the second and counts the first's blind spot: it
serves ``run.py``'s targets (``tollway``, ``tollway_billing`` by default, with
the same YAML, Postgres and Redis) in front of the fake provider, and per
case and concurrency:

- **CPU**: ``--repeats`` windows of exactly ``--requests`` requests
  (``loadgen.py --max-requests``), the targets interleaved, each window read
  from ``/proc/<pid>/stat`` (utime and stime of the serving process, all its
  threads; not its children) and ``/proc/<pid>/task/*/status`` (voluntary and
  involuntary context switches); medians per target.
- **Syscalls**: one window per target under ``perf stat --per-thread -e
  raw_syscalls:sys_enter,syscalls:sys_enter_<name>...`` (in-kernel tracepoint
  counters: the process runs at full speed, unlike under ``strace``), less
  the target's idle rate measured the same way for ``--idle-s`` seconds
  (timers: the usage flusher, the journal, the batch poller), split between
  the event loop's thread and the others (the default executor's threads).

With ``--stores``, each CPU window also reads the CPU of the run's
Postgres (the postmaster and its backends) and Redis: what the billing
targets' usage rows, leases and permits cost the machine beside the
gateway's own CPU (the yardstick ``floor_db_batch``'s, for its rows).

With ``--ledger``, each CPU window of a billing target also reads what its
clock-driven billing work did, natively (callgrind stretches those clocks):
the journal's ``o`` lines written per request served (a request noted and
closed within one journal interval is never written), and the ledger's
rows per flush (usage rows inserted by the target's worker, over the
distinct transactions that inserted them: one per flush).

Needs ``perf`` with tracepoint access (root, or ``perf_event_paranoid`` <= -1
and a readable tracefs) for the syscall half; without it only the CPU half
runs. Wall-clock CPU moves with the machine's load (see RESULTS.md): the
counts are the load-independent part. Every process started here is stopped
by PID on the way out.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# bench/'s own modules (the script's directory is on sys.path).
import orjson
import procstat
import run

# The syscalls counted one by one (every other lands in "other"): what a
# request, a usage flush, a journal write or an executor hand-off makes.
NAMED = (
    "read",
    "write",
    "writev",
    "sendto",
    "sendmsg",
    "recvfrom",
    "recvmsg",
    "epoll_wait",
    "epoll_pwait",
    "epoll_ctl",
    "futex",
    "getpid",
    "getrandom",
    "fsync",
    "fdatasync",
    "openat",
    "close",
    "newfstatat",
    "lseek",
    "ioctl",
    "clock_gettime",
    "mmap",
    "munmap",
    "brk",
    "madvise",
    "accept4",
    "setsockopt",
    "getsockname",
    "io_uring_enter",
)
_TICK_US = 1e6 / os.sysconf("SC_CLK_TCK")


@dataclass
class Window:
    user_us: float
    sys_us: float
    voluntary: float
    involuntary: float
    rps: float
    pg_us: float = 0.0  # Postgres's CPU a request (``--stores``)
    redis_us: float = 0.0  # Redis's


# ``--stores``: the run's Postgres postmaster and Redis server, whose CPU
# (with their children's) each window reads too.
STORES: dict[str, int] = {}
# ``--rate``: the load generator's open-loop rate (0: closed loop), set by ``main``.
RATE: list[float] = [0.0]


def _tree_cpu(root: int) -> float:
    """utime + stime of ``root`` and its live descendants, with what its
    reaped children used (a Postgres backend that exited)."""
    return (procstat.cpu_us(procstat.tree(root)) or 0.0) + procstat.reaped_us(root)


def _stores_cpu() -> tuple[float, float]:
    pg, redis = STORES.get("postgres"), STORES.get("redis")
    return (_tree_cpu(pg) if pg else 0.0), (_tree_cpu(redis) if redis else 0.0)


@dataclass
class LedgerWindow:
    """One window's journal and ledger counts (``--ledger``)."""

    requests: int
    opened: int  # ``o`` lines the journal wrote
    rows: int  # usage rows the ledger inserted
    flushes: int  # distinct transactions that inserted them
    compacted: bool = False  # the journal was rewritten meanwhile: ``opened`` is a floor


@dataclass
class Counts:
    """Syscalls per request, by name, on the loop's thread and on the others."""

    main: dict[str, float] = field(default_factory=dict)
    threads: dict[str, float] = field(default_factory=dict)


def _cpu(pid: int) -> tuple[float, float]:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) * _TICK_US, int(fields[12]) * _TICK_US


def _switches(pid: int) -> tuple[int, int]:
    vol = invol = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            text = (task / "status").read_text()
        except OSError:
            continue
        for line in text.splitlines():
            if line.startswith("voluntary_ctxt_switches"):
                vol += int(line.split()[1])
            elif line.startswith("nonvoluntary_ctxt_switches"):
                invol += int(line.split()[1])
    return vol, invol


def _load(port: int, scenario: run.Scenario, c: int, n: int, key: str) -> dict[str, Any]:
    argv = [run.PY, str(run.LOADGEN), f"http://127.0.0.1:{port}{scenario.path}"]
    argv += [orjson.dumps(scenario.body).decode(), f"--concurrency={c}", "--duration=900"]
    argv += ["--warmup=0", f"--max-requests={n}", f"--api-key={key}"]
    argv += ["--stream"] if scenario.stream else []
    argv += [f"--rate={RATE[0]:g}"] if RATE[0] else []
    done = subprocess.run(argv, capture_output=True, check=True, timeout=1200)
    out: dict[str, Any] = orjson.loads(done.stdout)
    if out["errors"] or out["ok"] != n:
        raise RuntimeError(f"syscalls: {out['ok']} of {n} answered: {out['first_error']}")
    return out


def cpu_window(pid: int, port: int, scenario: run.Scenario, c: int, n: int, key: str) -> Window:
    u0, s0 = _cpu(pid)
    v0, i0 = _switches(pid)
    pg0, r0 = _stores_cpu()
    t0 = time.perf_counter()
    _load(port, scenario, c, n, key)
    elapsed = time.perf_counter() - t0
    u1, s1 = _cpu(pid)
    v1, i1 = _switches(pid)
    pg1, r1 = _stores_cpu()
    switches = (v1 - v0) / n, (i1 - i0) / n
    return Window(
        (u1 - u0) / n, (s1 - s0) / n, *switches, n / elapsed, (pg1 - pg0) / n, (r1 - r0) / n
    )


def _journal(data: Path) -> tuple[str, int, int]:
    """The worker id, the ``o`` lines and the size of a target's journal."""
    paths = sorted(data.glob("journal-*.jsonl"))
    if not paths:
        return "", 0, 0
    text = paths[0].read_bytes()
    return paths[0].stem.removeprefix("journal-"), text.count(b'{"o":'), len(text)


def _inserted(dsn: str, worker: str) -> tuple[int, int]:
    """Usage rows of ``worker`` and the distinct transactions (``xmin``) that
    inserted them: a flush is one transaction."""
    import asyncio

    import asyncpg

    async def count() -> tuple[int, int]:
        conn = await asyncpg.connect(dsn)
        try:
            r = await conn.fetchrow(
                "SELECT count(*) AS n, count(DISTINCT xmin::text) AS x"
                " FROM usage_events WHERE worker_id = $1",
                worker,
            )
            assert r is not None
            return int(r["n"]), int(r["x"])
        finally:
            await conn.close()

    return asyncio.run(count())


def ledger_window(
    pid: int, port: int, scenario: run.Scenario, c: int, n: int, key: str, data: Path, dsn: str
) -> tuple[Window, LedgerWindow]:
    """``cpu_window``, and what the journal and the ledger wrote meanwhile
    (read once the last flushes are in: both run on timers of <= 0.2 s)."""
    worker, o0, size0 = _journal(data)
    rows0, x0 = _inserted(dsn, worker) if worker else (0, 0)
    w = cpu_window(pid, port, scenario, c, n, key)
    worker, o1, size1, rows1, x1 = _settled(data, dsn, rows0 + n)
    return w, LedgerWindow(n, o1 - o0, rows1 - rows0, x1 - x0, size1 < size0)


def _settled(
    data: Path, dsn: str, rows: int, bound_s: float = 30.0
) -> tuple[str, int, int, int, int]:
    """The journal and the ledger once the window's last flushes are in:
    every request's row inserted (one a billed request), then the journal
    unchanged over two of its 0.2 s intervals (its ``x`` line of the last
    batch written). Polled, within ``bound_s``: under a loaded machine the
    flushers' timers run late, which a fixed wait would miss."""
    deadline = time.monotonic() + bound_s
    last: tuple[str, int, int] | None = None
    while True:
        worker, opened, size = _journal(data)
        got, xacts = _inserted(dsn, worker) if worker else (0, 0)
        if got >= rows and (worker, opened, size) == last:
            return worker, opened, size, got, xacts
        if time.monotonic() > deadline:
            raise RuntimeError(
                f"the ledger or journal did not settle in {bound_s:g} s ({got}/{rows} rows)"
            )
        last = (worker, opened, size) if got >= rows else None
        time.sleep(0.4)  # a poll interval (two journal intervals), not a synchronisation


def ledger_report(rows: list[tuple[str, float, int, str, list[LedgerWindow]]]) -> str:
    lines = [
        "| scenario | KB | c | target | journal `o` lines / request | usage rows / flush "
        "| flushes / 1000 requests | windows |",
        "|---|---:|---:|---|---:|---:|---:|---|",
    ]
    for name, kb, c, target, ws in rows:
        o = statistics.median(w.opened / w.requests for w in ws)
        per = statistics.median(w.rows / w.flushes for w in ws if w.flushes)
        fl = statistics.median(1000 * w.flushes / w.requests for w in ws)
        each = ", ".join(
            f"{w.opened}/{w.requests} o, {w.rows}/{w.flushes}"
            + (" (compacted)" if w.compacted else "")
            for w in ws
        )
        lines.append(
            f"| {name} | {kb:g} | {c} | {target} | {o:.3f} | {per:.1f} | {fl:.1f} | {each} |"
        )
    return "\n".join(lines)


def perf_works() -> bool:
    """``perf`` is installed and may count syscall tracepoints here."""
    if shutil.which("perf") is None:
        return False
    argv = ["perf", "stat", "-x", ",", "-e", "raw_syscalls:sys_enter", "--", "true"]
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return done.returncode == 0 and "raw_syscalls:sys_enter" in done.stderr


def _perf_events() -> str:
    return ",".join(["raw_syscalls:sys_enter", *(f"syscalls:sys_enter_{s}" for s in NAMED)])


def _perf_counts(pid: int, out: Path, during: Any) -> tuple[dict[tuple[bool, str], int], float]:
    """Counts by (loop thread?, syscall) over ``during()``, and the window's seconds."""
    argv = ["perf", "stat", "--per-thread", "-x", ",", "-o", str(out), "-e", _perf_events()]
    perf = subprocess.Popen([*argv, "-p", str(pid)], stderr=subprocess.DEVNULL)
    t0 = time.perf_counter()
    try:
        time.sleep(1.5)  # attached to every thread by then
        during()
    finally:
        perf.send_signal(signal.SIGINT)
        perf.wait(timeout=60)
    window = time.perf_counter() - t0
    counts: dict[tuple[bool, str], int] = {}
    for line in out.read_text().splitlines():
        parts = line.split(",")
        if len(parts) < 4 or line.startswith("#") or not parts[1].strip().isdigit():
            continue
        tid = int(parts[0].rsplit("-", 1)[1])
        event = parts[3].split(":", 1)[1].removeprefix("sys_enter_")
        name = "all" if event == "sys_enter" else event
        key = (tid == pid, name)
        counts[key] = counts.get(key, 0) + int(parts[1])
    return counts, window


def syscall_window(
    pid: int,
    port: int,
    scenario: run.Scenario,
    c: int,
    n: int,
    api_key: str,
    idle: tuple[dict[tuple[bool, str], int], float],
    scratch: Path,
) -> Counts:
    loaded: list[float] = []

    def during() -> None:
        t0 = time.perf_counter()
        _load(port, scenario, c, n, api_key)
        loaded.append(time.perf_counter() - t0)

    counts, window = _perf_counts(pid, scratch / "perf-load.csv", during)
    idle_counts, idle_s = idle
    quiet = max(0.0, window - loaded[0])  # the window's seconds without load
    out = Counts()
    for (main, name), k in counts.items():
        k_idle = idle_counts.get((main, name), 0) / idle_s * quiet
        (out.main if main else out.threads)[name] = max(0.0, k - k_idle) / n
    return out


def idle_counts(
    pid: int, seconds: float, scratch: Path
) -> tuple[dict[tuple[bool, str], int], float]:
    counts, window = _perf_counts(pid, scratch / "perf-idle.csv", lambda: time.sleep(seconds))
    return counts, window


def _cases(args: argparse.Namespace) -> list[run.Scenario]:
    kbs = [float(k) for k in args.prompt_kb.split(",")]
    wanted = args.cases.split(",")
    return [run.sized(s, kb) for s in run.SCENARIOS if s.name in wanted for kb in kbs]


def report(
    results: list[tuple[str, float, int, str, Window, Counts | None]], args: argparse.Namespace
) -> str:
    lines = [
        "| scenario | KB | c | target | user µs/req | sys µs/req "
        "| ctx switches vol / invol per req | syscalls/req (loop thread + others) "
        "| on the loop's thread, per request | other threads, per request |",
        "|---|---:|---:|---|---:|---:|---:|---:|---|---|",
    ]
    if args.stores:
        lines[0] = lines[0].replace("| sys µs/req ", "| sys µs/req | Postgres / Redis µs/req ")
        lines[1] = "|---|---:|---:|---|---:|---:|---:|---:|---:|---|---|"
    for name, kb, c, target, w, counts in results:
        if counts is None:
            total, main_s, thr_s = "—", "—", "—"
        else:
            total = (
                f"{counts.main.get('all', 0) + counts.threads.get('all', 0):.2f} "
                f"({counts.main.get('all', 0):.2f} + {counts.threads.get('all', 0):.2f})"
            )
            main_s, thr_s = _top(counts.main), _top(counts.threads)
        stores = f"| {w.pg_us:.0f} / {w.redis_us:.0f} " if args.stores else ""
        lines.append(
            f"| {name} | {kb:g} | {c} | {target} | {w.user_us:.0f} | {w.sys_us:.0f} {stores}"
            f"| {w.voluntary:.2f} / {w.involuntary:.2f} | {total} | {main_s} | {thr_s} |"
        )
    return "\n".join(lines)


def _top(by_name: dict[str, float]) -> str:
    named = sorted(((k, v) for k, v in by_name.items() if k != "all"), key=lambda kv: -kv[1])
    other = by_name.get("all", 0) - sum(v for _, v in named)
    shown = [f"{k} {v:.2f}" for k, v in named if v >= 0.005][:9]
    if other >= 0.005:
        shown.append(f"other {other:.2f}")
    return ", ".join(shown) or "—"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--targets", default="tollway,tollway_billing")
    p.add_argument("--cases", default="chat", help="chat, chat-stream (comma-separated)")
    p.add_argument("--prompt-kb", default="0.5,32")
    p.add_argument("--concurrency", default="16,1")
    p.add_argument("--requests", type=int, default=2000, help="requests per measured window")
    p.add_argument("--warmup", type=int, default=500)
    p.add_argument("--repeats", type=int, default=5, help="CPU windows per target (medians)")
    p.add_argument("--idle-s", type=float, default=4.0, help="idle window for the timers' rate")
    p.add_argument("--no-perf", action="store_true", help="CPU only, no syscall counts")
    p.add_argument("--json", type=Path, help="also write the results here")
    p.add_argument(
        "--ledger",
        action="store_true",
        help="billing targets: journal o lines per request and usage rows per flush too",
    )
    p.add_argument("--src", type=Path, help="the checkout whose proxy/ runs (default: this one)")
    p.add_argument(
        "--rate",
        type=float,
        default=0.0,
        help="open loop: this many requests/s on c connections (loadgen.py --rate): the"
        " costs per request below capacity, where the timers' share shows",
    )
    p.add_argument(
        "--stores",
        action="store_true",
        help="also the CPU a request of Postgres and Redis (the run's, with their children)",
    )
    args = p.parse_args(argv)
    RATE[0] = args.rate
    use_perf = not args.no_perf and perf_works()
    if not use_perf and not args.no_perf:
        print("syscalls: perf cannot count syscalls here; CPU only", file=sys.stderr)
    names = args.targets.split(",")
    results: list[tuple[str, float, int, str, Window, Counts | None]] = []
    ledgers: list[tuple[str, float, int, str, list[LedgerWindow]]] = []
    with tempfile.TemporaryDirectory(prefix="tollway-syscalls-", ignore_cleanup_errors=True) as tmp:
        workdir = Path(tmp)
        procs = run.Processes(False, workdir)
        stores = run.Datastores(workdir, argparse.Namespace(targets=args.targets, dsn=None))
        try:
            src = args.src.resolve() if args.src is not None else None
            env = run.Env(
                run._free_port(), workdir, stores.dsn, src, stores.redis_url, loop_lag_ms=0.0
            )
            fake = [run.PY, str(run.BENCH / "fake_provider.py"), str(env.provider_port)]
            procs.start("fake_provider", fake, "0", env.provider_port)
            ports = run._start_targets(argparse.Namespace(targets=args.targets), procs, env)
            if args.stores:
                STORES.update(stores.pids())
            pids = {t: procs.pid(t) for t in names}
            keys = {t: env.api_keys.get(t, "sk-bench") for t in names}
            idle = {}
            if use_perf:
                for t in names:
                    idle[t] = idle_counts(pids[t], args.idle_s, workdir)
            for scenario in _cases(args):
                for c in (int(x) for x in args.concurrency.split(",")):
                    for t in names:
                        _load(ports[t], scenario, c, args.warmup, keys[t])
                    windows: dict[str, list[Window]] = {t: [] for t in names}
                    books: dict[str, list[LedgerWindow]] = {t: [] for t in names}
                    for _ in range(args.repeats):
                        for t in names:
                            data = workdir / f"{t}-data"
                            if args.ledger and "billing" in t:
                                assert stores.dsn is not None
                                w, book = ledger_window(
                                    pids[t],
                                    ports[t],
                                    scenario,
                                    c,
                                    args.requests,
                                    keys[t],
                                    data,
                                    stores.dsn,
                                )
                                books[t].append(book)
                            else:
                                w = cpu_window(
                                    pids[t], ports[t], scenario, c, args.requests, keys[t]
                                )
                            windows[t].append(w)
                    for t in names:
                        if books[t]:
                            ledgers.append((scenario.name, scenario.prompt_kb, c, t, books[t]))
                    for t in names:
                        counts = None
                        if use_perf:
                            counts = syscall_window(
                                pids[t],
                                ports[t],
                                scenario,
                                c,
                                args.requests,
                                keys[t],
                                idle[t],
                                workdir,
                            )
                        ws = windows[t]
                        med = Window(
                            statistics.median(w.user_us for w in ws),
                            statistics.median(w.sys_us for w in ws),
                            statistics.median(w.voluntary for w in ws),
                            statistics.median(w.involuntary for w in ws),
                            statistics.median(w.rps for w in ws),
                            statistics.median(w.pg_us for w in ws),
                            statistics.median(w.redis_us for w in ws),
                        )
                        results.append((scenario.name, scenario.prompt_kb, c, t, med, counts))
                        print(
                            f"  {scenario.name} {scenario.prompt_kb:g} KB c={c} {t}: user "
                            f"{med.user_us:.0f} sys {med.sys_us:.0f} µs/req "
                            f"(users {[round(w.user_us) for w in ws]})",
                            file=sys.stderr,
                        )
        finally:
            procs.stop_all()
            stores.stop()
            run._stop_embedded_postgres(workdir)
    print(report(results, args))
    if ledgers:
        print()
        print(ledger_report(ledgers))
    if args.json:
        args.json.write_bytes(
            orjson.dumps(
                [
                    {"scenario": s, "kb": kb, "c": c, "target": t, "cpu": w.__dict__}
                    | ({"main": k.main, "threads": k.threads} if k else {})
                    for s, kb, c, t, w, k in results
                ]
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
