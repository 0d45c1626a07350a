"""``tollway migrate | tenants | keys | webhooks | cache purge``: admin commands on the database.

They use the same operations as the ``/admin/`` API (``proxy.stores.accounts``),
audited with the actor ``cli:<user>``.
"""

from __future__ import annotations

import argparse
import asyncio
import getpass
import os
from dataclasses import dataclass
from typing import Any

import asyncpg
import orjson

from proxy.config.model import Config
from proxy.stores import accounts, apikeys, migrate, pgdsn, semantic_cache, webhooks
from proxy.stores import embedded as datastores
from proxy.stores.events import WEBHOOK_TYPES
from proxy.web.admin import rate_limit

DEMO_TENANT = "demo"
_NOTHING_YET = {
    ("tenants", "list"): "no tenants yet; create one with: tollway tenants create NAME --tier free",
    ("keys", "list"): "no keys yet; create one with: tollway keys create --tenant NAME",
    (
        "webhooks",
        "list",
    ): "no webhooks yet; add one with: tollway webhooks add --tenant NAME --url URL",
    ("webhooks", "deliveries"): "no deliveries yet",
}


def add_commands(sub: Any) -> None:
    sub.add_parser("migrate", help="apply sql/ migrations to DATABASE_URL (or the embedded DB)")
    _tenant_commands(_group(sub, "tenants", "manage tenants"))
    _key_commands(_group(sub, "keys", "manage API keys"))
    _cache_commands(_group(sub, "cache", "manage the semantic cache"))
    _webhook_commands(_group(sub, "webhooks", "manage a tenant's event webhooks"))


def _group(sub: Any, name: str, about: str) -> Any:
    return sub.add_parser(name, help=about).add_subparsers(dest="action", required=True)


def _with_config(about: str, *parsers: argparse.ArgumentParser) -> None:
    for p in parsers:
        p.add_argument("--config", help=about)


_FOR_TIERS = "YAML config (for tier names)"


def _tenant_commands(tenants: Any) -> None:
    c = tenants.add_parser("create", help="create a tenant")
    c.add_argument("name")
    c.add_argument("--tier", default="free")
    st = tenants.add_parser("set-tier", help="change a tenant's tier")
    st.add_argument("name")
    st.add_argument("tier")
    ls = tenants.add_parser("list", help="list tenants")
    sb = tenants.add_parser("set-budget", help="set or clear a tenant's own USD budgets")
    sb.add_argument("name")
    _budget_options(sb)
    _with_config(_FOR_TIERS, c, st, ls, sb)


def _key_commands(keys: Any) -> None:
    kc = keys.add_parser("create", help="create a key (shown only once)")
    kc.add_argument("--tenant", required=True)
    kc.add_argument("--name", default="")
    kc.add_argument("--expires-in-days", type=int)
    kc.add_argument("--tier", help="override the tenant's tier for this key")
    kc.add_argument("--json", action="store_true", help="print JSON")
    kl = keys.add_parser("list", help="list keys")
    kl.add_argument("--tenant")
    by_id = [keys.add_parser(action, help=f"{action} a key") for action in ("revoke", "rotate")]
    for p in by_id:
        p.add_argument("key_id")
    kb = keys.add_parser("set-budget", help="set or clear a key's own USD budgets")
    kb.add_argument("key_id")
    _budget_options(kb)
    _with_config(_FOR_TIERS, kc, kl, *by_id, kb)


def _cache_commands(cache: Any) -> None:
    cp = cache.add_parser("purge", help="delete a tenant's semantic-cache entries")
    cp.add_argument("--tenant", required=True)
    cp.add_argument("--model", help="only this public model's entries")
    _with_config(_FOR_TIERS, cp)


def _webhook_commands(hooks: Any) -> None:
    wa = hooks.add_parser("add", help="add an endpoint (its secret is shown only once)")
    wa.add_argument("--tenant", required=True)
    wa.add_argument("--url", required=True)
    wa.add_argument(
        "--events",
        help=f"comma-separated event types (default: all of {', '.join(WEBHOOK_TYPES)})",
    )
    wa.add_argument("--secret", help="whsec_<base64> to use (default: a new random one)")
    wa.add_argument("--json", action="store_true", help="print JSON")
    wl = hooks.add_parser("list", help="list a tenant's endpoints")
    wl.add_argument("--tenant", required=True)
    wl.add_argument("--json", action="store_true", help="print JSON")
    wr = hooks.add_parser("remove", help="remove an endpoint (its pending deliveries go too)")
    wr.add_argument("endpoint_id")
    wd = hooks.add_parser("deliveries", help="an endpoint's latest deliveries and attempts")
    wd.add_argument("endpoint_id")
    _with_config("YAML config", wa, wl, wr, wd)


def _budget_options(parser: argparse.ArgumentParser) -> None:
    for span in ("monthly", "daily"):
        parser.add_argument(
            f"--{span}-usd",
            metavar="USD",
            help=f"{span} budget in USD, or 'none' for no budget (other budgets stay)",
        )
    parser.add_argument(
        "--clear", action="store_true", help="drop every override: the tier's budgets apply"
    )
    parser.add_argument("--json", action="store_true", help="print JSON")


def budget_changes(args: argparse.Namespace) -> dict[str, float | None] | None:
    """The options as the admin API's ``budgets`` value (validated there)."""
    given = {
        name: value
        for name, value in (("monthly_usd", args.monthly_usd), ("daily_usd", args.daily_usd))
        if value is not None
    }
    if args.clear:
        if given:
            raise accounts.AccountError("--clear cannot be combined with --monthly-usd/--daily-usd")
        return None
    if not given:
        raise accounts.AccountError("give --monthly-usd and/or --daily-usd, or --clear")
    raw = {k: None if v.strip().lower() == "none" else v for k, v in given.items()}
    return accounts.budget_changes(raw)


def actor() -> str:
    try:
        return f"cli:{getpass.getuser()}"
    except (KeyError, OSError):
        return "cli"


async def _with_pool(fn: Any) -> Any:
    pool = await asyncpg.create_pool(
        **pgdsn.options(datastores.database_url()), min_size=1, max_size=2
    )
    assert pool is not None
    try:
        await migrate.check(pool)
        return await fn(pool)
    finally:
        await pool.close()


def run(args: argparse.Namespace, config: Config) -> int:
    if args.command == "migrate":
        applied = asyncio.run(migrate.migrate(datastores.database_url()))
        print(f"applied: {', '.join(applied)}" if applied else "database is up to date")
        return 0
    hasher = apikeys.KeyHasher(apikeys.load_secret(datastores.data_dir()))
    result = asyncio.run(_with_pool(lambda pool: _dispatch(args, config, pool, hasher)))
    _print(args, result)
    return 0


async def _dispatch(
    args: argparse.Namespace, config: Config, pool: asyncpg.Pool, hasher: apikeys.KeyHasher
) -> Any:
    tiers, who = config.tiers, actor()
    match (args.command, args.action):
        case ("tenants", "create"):
            return await accounts.create_tenant(pool, args.name, args.tier, tiers, who)
        case ("tenants", "set-tier"):
            return await accounts.set_tier(pool, args.name, args.tier, tiers, who)
        case ("tenants", "list"):
            return await accounts.list_tenants(pool)
        case ("tenants", "set-budget"):
            return await accounts.set_tenant_budgets(pool, args.name, budget_changes(args), who)
        case ("keys", "create"):
            row = await accounts.create_key(
                pool, hasher, args.tenant, args.name, args.expires_in_days, args.tier, tiers, who
            )
            return {**row, "rate_limit": rate_limit(tiers.get(row["tier"]))}
        case ("keys", "list"):
            return await accounts.list_keys(pool, args.tenant)
        case ("keys", "revoke"):
            return await accounts.revoke_key(pool, args.key_id, who)
        case ("keys", "rotate"):
            return await accounts.rotate_key(pool, hasher, args.key_id, who)
        case ("keys", "set-budget"):
            return await accounts.set_key_budgets(pool, args.key_id, budget_changes(args), who)
        case ("webhooks", "add"):
            types = (
                [t.strip() for t in args.events.split(",") if t.strip()] if args.events else None
            )
            return await webhooks.add_endpoint(pool, args.tenant, args.url, types, args.secret, who)
        case ("webhooks", "list"):
            return await webhooks.list_endpoints(pool, args.tenant)
        case ("webhooks", "remove"):
            return await webhooks.remove_endpoint(pool, args.endpoint_id, who)
        case ("webhooks", "deliveries"):
            return await webhooks.deliveries(pool, args.endpoint_id)
        case ("cache", "purge"):
            return await _purge(pool, args.tenant, args.model)
    raise AssertionError(args)


async def _purge(pool: asyncpg.Pool, tenant: str, model: str | None) -> Any:
    """The entries live in ``SEMANTIC_CACHE_DATABASE_URL`` when set, else here."""
    own = os.environ.get("SEMANTIC_CACHE_DATABASE_URL")
    if not own:
        return await semantic_cache.purge_tenant(pool, pool, tenant, model)
    conn = await asyncpg.connect(**pgdsn.options(own), timeout=5)
    try:
        return await semantic_cache.purge_tenant(pool, conn, tenant, model)
    finally:
        await conn.close()


def _print(args: argparse.Namespace, result: Any) -> None:
    if result == [] and not getattr(args, "json", False):
        print(_NOTHING_YET.get((args.command, args.action), "none"))
        return
    if getattr(args, "json", False) or not isinstance(result, dict | list):
        print(orjson.dumps(result, option=orjson.OPT_INDENT_2).decode())
        return
    rows = result if isinstance(result, list) else [result]
    for row in rows:
        print("  ".join(f"{k}={v}" for k, v in row.items() if v is not None))
    if isinstance(result, dict) and "api_key" in result:
        print("This is the only time the key is shown: store it now.")
    if isinstance(result, dict) and "secret" in result:
        print("This is the only time the webhook secret is shown: store it now.")


@dataclass(frozen=True)
class Demo:
    """The demo tenant's tier (None: there is none) and its key when just made."""

    tier: str | None
    key: str | None = None


async def ensure_demo(dsn: str, config: Config, hasher: apikeys.KeyHasher) -> Demo:
    """On an empty database, create the demo tenant and one demo key."""
    pool = await asyncpg.create_pool(**pgdsn.options(dsn), min_size=1, max_size=1)
    assert pool is not None
    try:
        if await pool.fetchval("SELECT count(*) FROM tenants"):
            tier = await pool.fetchval("SELECT tier FROM tenants WHERE name = $1", DEMO_TENANT)
            return Demo(tier)
        tier = "pro" if "pro" in config.tiers else next(iter(config.tiers))
        await accounts.create_tenant(pool, DEMO_TENANT, tier, config.tiers, "quickstart")
        row = await accounts.create_key(
            pool, hasher, DEMO_TENANT, "demo", None, None, config.tiers, "quickstart"
        )
        return Demo(tier, str(row["api_key"]))
    finally:
        await pool.close()
