"""Billing's round trips per 1,000 requests, by kind, in a native gateway.

What a billed request costs in the background depends on how often the
billing process goes to Postgres or Redis for it: the Redis permit refills
(a request's own, awaited) and top-ups (background), the quota and budget
lease calls (refills and top-ups), the ledger's batches and heartbeats.
This starts ``run.py``'s ``tollway_billing`` target (the same Postgres,
Redis and fake provider) with a counting shim, sends ``--warmup`` and then
``--requests`` requests at ``--concurrency``, and prints each counter's
change over the measured requests, per 1,000::

    .venv/bin/python bench/refills.py [--requests 5000] [--concurrency 16]

``--src`` runs another checkout's ``proxy`` (e.g. a ``git archive`` of a
revision) with this script's shim.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import run
import syscalls

# ``python -c SHIM serve ...``: ``tollway serve`` with counters on the
# billing stores' round trips, written as JSON to $REFILLS_OUT when
# $REFILLS_OUT.dump appears.
SHIM = r"""
import collections, functools, json, os, runpy, sys, threading, time
# ``-c`` puts the working directory first: the ``proxy`` measured is the
# one on PYTHONPATH (run.py's: the tree, or ``--src``), not the cwd's.
sys.path[:] = [p for p in sys.path if p not in ("", ".")]
OUT = os.environ["REFILLS_OUT"]
counts = collections.Counter()
books = []


def counted(cls, name, kind=None):
    fn = getattr(cls, name)
    if hasattr(fn, "__code__") and fn.__code__.co_flags & 0x80:  # a coroutine function
        @functools.wraps(fn)
        async def wrapper(*args, **kwargs):
            counts[kind or name] += 1
            return await fn(*args, **kwargs)
    else:
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            counts[kind or name] += 1
            return fn(*args, **kwargs)
    setattr(cls, name, wrapper)


def kept(cls):
    init = cls.__init__

    def __init__(self, *args, **kwargs):
        init(self, *args, **kwargs)
        books.append(self)

    cls.__init__ = __init__


from proxy.stores import budgets, ledger, permits, quota, ratelimit, usage_batch
counted(ratelimit.RateLimiter, "check_leasing", "redis permit script")
counted(permits.PermitLeases, "_top_up", "permit top-up (background)")
counted(quota.QuotaBook, "_take_lease", "quota lease call")
counted(quota.QuotaBook, "_top_up", "quota top-up (background)")
counted(quota.QuotaBook, "take_from", "quota take_from")
counted(quota.QuotaBook, "admit", "quota admit (awaited)")
counted(budgets.BudgetBook, "_refill", "budget refill")
counted(ledger.Ledger, "_flush", "ledger flush")
counted(ledger.Ledger, "_write", "ledger batch written")
counted(ledger.Ledger, "_heartbeat_and_sweep", "lease heartbeat and sweep")
counted(usage_batch, "write_isolating", "usage batch round trip")
from proxy.stages.forward import breaker
counted(breaker.Breakers, "health_now", "breaker health_now")
counted(breaker, "health", "breaker health_now slow branch (a state per key)")
counted(breaker.Breakers, "record", "breaker record")
for cls in (quota.QuotaBook, budgets.BudgetBook, permits.PermitLeases, ledger.Ledger):
    kept(cls)


take_lease = quota.QuotaBook._take_lease


async def _granted(self, *args, **kwargs):
    row = await take_lease(self, *args, **kwargs)
    counts["quota requests granted"] += row["got_requests"]
    counts["quota tokens granted (k)"] += row["got_tokens"] // 1000
    return row


quota.QuotaBook._take_lease = _granted


def _snapshot():
    out = dict(counts)
    for book in books:
        for attr in ("lease_calls", "top_ups", "local_admits", "written"):
            if hasattr(book, attr):
                out[f"{type(book).__name__}.{attr}"] = (
                    out.get(f"{type(book).__name__}.{attr}", 0) + getattr(book, attr)
                )
    return out


def _control():
    while True:
        time.sleep(0.05)
        if os.path.exists(OUT + ".dump"):
            os.remove(OUT + ".dump")
            with open(OUT + ".tmp", "w") as fh:
                json.dump(_snapshot(), fh)
            os.replace(OUT + ".tmp", OUT)


threading.Thread(target=_control, daemon=True).start()
runpy.run_module("proxy", run_name="__main__", alter_sys=True)
"""


def _snapshot(out: Path) -> dict[str, int]:
    out.unlink(missing_ok=True)
    Path(f"{out}.dump").touch()
    for _ in range(200):
        if out.exists():
            return dict(json.loads(out.read_text()))
        time.sleep(0.05)
    raise RuntimeError("refills: the shim wrote nothing")


def _shimmed(argv: list[str], out: Path) -> list[str]:
    """``env K=V ... tollway serve ...`` -> ``env K=V ... python -c SHIM serve ...``"""
    i = argv.index(str(Path(run.PY).parent / "tollway"))
    return [*argv[:i], f"REFILLS_OUT={out}", run.PY, "-c", SHIM, *argv[i + 1 :]]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--case", default="chat")
    p.add_argument("--prompt-kb", type=float, default=0.5)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--requests", type=int, default=5000)
    p.add_argument("--warmup", type=int, default=500)
    p.add_argument("--src", type=Path, help="the checkout whose proxy/ runs (default: this one)")
    args = p.parse_args(argv)
    scenario = run.sized(next(s for s in run.SCENARIOS if s.name == args.case), args.prompt_kb)
    name = "tollway_billing"
    with tempfile.TemporaryDirectory(prefix="tollway-refills-", ignore_cleanup_errors=True) as tmp:
        workdir = Path(tmp)
        procs = run.Processes(False, workdir)
        stores = run.Datastores(workdir, argparse.Namespace(targets=name, dsn=None))
        try:
            src = args.src.resolve() if args.src is not None else None
            env = run.Env(run._free_port(), workdir, stores.dsn, src, stores.redis_url)
            fake = [run.PY, str(run.BENCH / "fake_provider.py"), str(env.provider_port)]
            procs.start("fake_provider", fake, "0", env.provider_port)
            target = next(t for t in run.TARGETS if t.name == name)
            assert target.command is not None
            port = run._free_port()
            out = workdir / "refills.json"
            procs.start(name, _shimmed(target.command(env, port), out), run.PROXY_CPU, port)
            key = env.api_keys[name]
            syscalls._load(port, scenario, args.concurrency, args.warmup, key)
            before = _snapshot(out)
            t0 = time.perf_counter()
            syscalls._load(port, scenario, args.concurrency, args.requests, key)
            elapsed = time.perf_counter() - t0
            after = _snapshot(out)
        finally:
            procs.stop_all()
            stores.stop()
            run._stop_embedded_postgres(workdir)
    n = args.requests
    print(
        f"{args.case} {args.prompt_kb:g} KB, c={args.concurrency}, {n} requests "
        f"({n / elapsed:,.0f} rps)\n"
    )
    print("| counter | per 1,000 requests |\n|---|---:|")
    for k in sorted(after):
        print(f"| {k} | {(after[k] - before.get(k, 0)) * 1000 / n:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
