"""Instructions of the billing path's admission side alone, in one process,
at git revisions: a cached key's check, the admission (quota, USD budget and
rate-limit permit leases with room) and the ``x-ratelimit-*`` headers, for
the bench tier of ``run.py`` (budgets on) and a 0.5 KB chat history.

The end-to-end callgrind point (``instructions.py``) moves 3-6% run to run
(its idle timers are subtracted by wall time); a change of ~50k
instructions in a 1M-instruction request hides in that. Here nothing but
the admission code runs: each revision's tree (``git archive``) is imported
in a child process under callgrind, twice, with N and 3N admissions, and
the difference divided by 2N is the count per admission (start-up and
set-up cancel out). Revisions without ``proxy.stages.admit.keyed`` run the
per-request code of ``pipeline.run.admit`` at that revision; revisions with
it, ``KeyAdmission``. Each admission's reservation and hold are released
(both paths alike), so the leases never run short.

    .venv/bin/python bench/admission.py --revs 4b7b70a,HEAD
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import revisions


def _child(tree: str, n: int) -> None:
    """Set up the stores' leases by hand (no database, no Redis) and admit ``n`` requests."""
    sys.path[:0] = [tree, f"{tree}/bench"]
    import instructions  # the tree's own config writer
    import prompts
    from multidict import CIMultiDict, CIMultiDictProxy

    from proxy.config.tiers import BillingPolicy
    from proxy.core.principal import Principal
    from proxy.core.record import UsageRecord
    from proxy.pipeline.registry import parse_config
    from proxy.stages.admit import budget, key_limits
    from proxy.stages.admit.billing import Billing, tier_of
    from proxy.stages.auth import Authenticator, KeyCache
    from proxy.stages.base import Exchange
    from proxy.stages.route import Router
    from proxy.stores import apikeys
    from proxy.stores.budgets import BudgetBook
    from proxy.stores.budgets import _Lease as BudgetLease
    from proxy.stores.permits import PermitLeases
    from proxy.stores.permits import _Lease as PermitLease
    from proxy.stores.quota import QuotaBook
    from proxy.stores.quota import _Lease as QuotaLease
    from proxy.web.auth_guard import credential

    try:
        from proxy.stages.admit import keyed  # type: ignore[attr-defined,unused-ignore]
    except ImportError:
        keyed = None

    with tempfile.TemporaryDirectory() as tmp:
        path = instructions.write_config(Path(tmp) / "admission.yaml", 1, 2, True, True)
        config = parse_config(path.read_text())
    who = Principal("key_bench", "tw-bench", 7, "bench", "bench", None)
    tier = tier_of(config, who)
    quota = QuotaBook(None, "w", BillingPolicy())  # type: ignore[arg-type]
    book = BudgetBook(None, "w", 1000, 2.0)  # type: ignore[arg-type]
    hasher = apikeys.KeyHasher(b"s" * 32)
    cache = KeyCache(3600.0)
    auth = Authenticator(None, hasher, cache)  # type: ignore[arg-type]
    key = apikeys.generate()
    cache.put(hasher.digest(key), who)
    billing = Billing(auth, quota, None, config.prices, None, book)  # type: ignore[arg-type]
    permits = PermitLeases(None)  # type: ignore[arg-type]
    big = 10**15
    quota._leases[(7, quota._month()[0])] = QuotaLease(big, big, big, big)
    for limit in budget.limits_for(who, tier, quota.clock()):
        book._leases[limit.key] = BudgetLease(micros=big)
    now = time.monotonic()
    for lim in key_limits.request_limits(who, tier, 0):
        permits._leases[lim.key] = PermitLease(0, now + 10**6, big, 0, 3_600_000, 0, now, 64)
    headers = CIMultiDictProxy(CIMultiDict({"Authorization": f"Bearer {key}"}))
    messages = prompts.history(0.5)
    plan = Router(config).plan("bench-model", {}, tenant=who.tenant, tier=who.tier, access=tier)

    def per_request() -> dict[str, str]:
        """``pipeline.run.admit`` and ``quota_headers`` before ``keyed``."""
        principal = auth.cached(credential(headers))
        assert principal is not None
        tier_of(config, principal)  # proceed's, for the router
        body = {"model": "bench-model", "messages": messages}
        record = UsageRecord("r", "chat", config=config)
        # the revisions before ``keyed`` (only they run this) have ``Billing.take``
        admission = billing.take(config, principal, body, "chat", "bench-model")  # type: ignore[attr-defined]
        assert admission is not None
        record.admission = admission
        billing.journal_open(record, body)
        clock = quota.clock()
        costs = (book, principal, admission.tier, plan, config.prices, body, "chat")
        admission.budget, _ = budget.take(*costs, admission.prompt_tokens, clock)
        _, verdict = key_limits.take(permits, admission, None)
        out = {"x-request-id": "r", **key_limits.response_headers(quota, admission, verdict)}
        quota.release(admission.reservation, False, 0)
        assert admission.budget is not None
        book.release(admission.budget, 0)
        return out

    def one_call() -> dict[str, str]:
        principal = auth.cached(credential(headers))
        assert principal is not None
        kept = keyed.of(billing, config, principal, permits)
        body = {"model": "bench-model", "messages": messages}
        record = UsageRecord("r", "chat", config=config)
        ex = Exchange(None, record, config, "chat", body, 0.0, who=principal, model="bench-model")
        taken = kept.take(ex, plan)
        assert taken is not None and taken[2]
        admission = taken[0]
        out: dict[str, str] = kept.headers("r", admission, taken[3], ex.notes.get(keyed.LEASED))
        quota.release(admission.reservation, False, 0)
        book.release(admission.budget, 0)
        return out

    admit: Any = per_request if keyed is None else one_call
    for _ in range(n):
        admit()


def _instructions(tree: Path, n: int) -> int:
    return revisions.instructions([sys.executable, __file__, "--child", str(tree), "--n", str(n)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--revs", default="HEAD", help="comma-separated git revisions")
    parser.add_argument("--n", type=int, default=1000, help="admissions in the shorter run")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        _child(args.child, args.n)
        return
    print(f"- command: bench/admission.py --revs {args.revs} --n {args.n}")
    print("\n| rev | instructions per admission |\n|---|---:|")
    with tempfile.TemporaryDirectory() as tmp:
        for rev in args.revs.split(","):
            tree = revisions.export(rev, Path(tmp) / rev.replace("/", "_"), ("proxy", "bench"))
            short, long = (_instructions(tree, k * args.n) for k in (1, 3))
            print(f"| {rev} | {(long - short) / (2 * args.n):,.0f} |", flush=True)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONHASHSEED", "0")
    main()
