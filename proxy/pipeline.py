"""One LLM request, stage by stage, as DESIGN.md draws it:

    parse → authenticate → route → admit → forward → relay → settle

Chat completions, legacy completions and embeddings share this path; only
the shape check in ``parse`` differs. Route comes before admit because
admission needs the public model (tier model rules, token estimate). The
settle stage runs in ``finally``, so every request is settled exactly once,
including rejected, failed and disconnected ones.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from aiohttp import web

from proxy import access_log, cache_replay, key_limits, lifecycle, parse, relay
from proxy.auth import Principal
from proxy.billing import Admission, check_model, ratelimit_headers, tier_of
from proxy.cache import Lookup
from proxy.errors import GatewayError, InvalidApiKey
from proxy.forward import Forwarded, forward
from proxy.metering import StreamMeter
from proxy.providers.base import Call, Endpoint, Reply
from proxy.settle import UsageRecord
from proxy.snapshot import Snapshot
from proxy.state import BILLING, CACHE, CONFIG, LIMITER, RATE, REQUEST_ID, SETTLER, UPSTREAMS


async def authenticate(
    request: web.Request, snapshot: Snapshot, record: UsageRecord
) -> Principal | None:
    if snapshot.config.auth == "none":
        return None
    billing = request.app.get(BILLING)
    if billing is None:  # refused at start; kept as a guard
        raise InvalidApiKey("API keys are required but no key store is configured.")
    who = await billing.auth.authenticate(request.headers.get("Authorization"))
    record.tenant, record.tenant_id, record.key_id = who.tenant, who.tenant_id, who.key_id
    record.key_prefix = who.key_prefix
    return who


async def admit(
    request: web.Request,
    snapshot: Snapshot,
    who: Principal | None,
    body: dict[str, Any],
    endpoint: Endpoint,
    record: UsageRecord,
) -> None:
    if who is None:
        return
    billing = request.app[BILLING]
    assert record.public_model is not None
    record.admission = admission = await billing.admit(
        snapshot.config, who, body, endpoint, record.public_model
    )
    # After the quota: a request refused here settles as a 429 and gets its
    # reservation back, so no limit is consumed by one another limit refused.
    verdict = await key_limits.admit(request.app[LIMITER], snapshot.config, admission)
    if verdict is not None:
        request[RATE] = verdict
        if not verdict.admitted:
            raise key_limits.refused(verdict, who.key_prefix)


async def lookup(
    request: web.Request,
    snapshot: Snapshot,
    who: Principal | None,
    body: dict[str, Any],
    endpoint: Endpoint,
    model: str,
) -> Lookup:
    scope = f"t{who.tenant_id}" if who is not None else "gw"
    policy = snapshot.config.cache
    return await request.app[CACHE].lookup(policy, request.headers, body, endpoint, model, scope)


def quota_headers(request: web.Request, record: UsageRecord) -> dict[str, str]:
    admission = record.admission
    if not isinstance(admission, Admission):
        return {}
    book = request.app[BILLING].quota
    monthly = ratelimit_headers(book.standing(admission.principal.tenant_id, admission.tier))
    # The -requests trio is the hourly window; -tokens the minute window if any, else monthly.
    hourly = key_limits.headers(request.get(RATE))
    return {**{k: v for k, v in monthly.items() if not k.endswith("-requests")}, **hourly}


def _served_headers(
    request: web.Request, record: UsageRecord, done: Forwarded, cache: dict[str, str]
) -> dict[str, str]:
    """Who served the answer, the cache's verdict, the caller's limits."""
    return {
        "x-request-id": record.request_id,
        "x-tollway-provider": done.target.provider.name,
        "x-tollway-model": done.target.model,
        "x-tollway-attempts": str(done.attempts),
        **cache,
        **quota_headers(request, record),
    }


async def handle(request: web.Request, endpoint: Endpoint) -> web.StreamResponse:
    started = time.perf_counter()
    snapshot = request.app[CONFIG].current  # one snapshot for the whole request
    record = UsageRecord(request[REQUEST_ID], endpoint, config=snapshot.config)
    meter: StreamMeter | None = None
    answer: Reply | None = None
    body: dict[str, Any] = {}
    try:
        body = await parse.read_json(request, snapshot.config.server.max_body_bytes)
        record.public_model = parse.validate(body, endpoint)
        who = await authenticate(request, snapshot, record)
        plan = snapshot.router.plan(
            record.public_model,
            request.headers,
            tenant=who.tenant if who else None,
            tier=who.tier if who else None,
            allowed=None
            if who is None
            else lambda m: check_model(tier_of(snapshot.config, who), m),
        )
        record.public_model = plan.public_model
        await admit(request, snapshot, who, body, endpoint, record)
        record.stream = parse.wants_stream(body, endpoint)
        found = await lookup(request, snapshot, who, body, endpoint, plan.public_model)
        record.cache = found.status
        if found.entry is not None:  # a hit skips forward and relay, and still settles
            hit_headers = {"x-request-id": record.request_id, **quota_headers(request, record)}
            usage_chunk = parse.wants_usage(body)
            return await cache_replay.serve_hit(
                request, found, record, hit_headers, usage_chunk, started
            )
        call = Call(endpoint, body, plan.public_model, record.stream, record.request_id)
        done = await forward(request.app[UPSTREAMS], snapshot, plan, call, record)
        record.provider, record.provider_model = done.target.provider.name, done.target.model
        record.attempts = done.attempts
        headers = _served_headers(request, record, done, found.headers())
        if done.stream is not None:
            meter = StreamMeter(client_wants_usage=parse.wants_usage(body))
            resp = await relay.stream(request, done.stream, meter, headers, record, started)
            whole = record.status == 200 and not record.client_disconnected
            found.keep_stream(meter, body, endpoint, done.target.model, whole)
            return resp
        assert done.reply is not None
        answer = done.reply
        reply = relay.reply(done.reply, headers, record, body, done.target.model)
        found.keep_reply(done.reply.body, record.usage, record.status)
        return reply
    except GatewayError as exc:
        record.fail(exc)
        exc.headers.update(quota_headers(request, record))
        raise
    except asyncio.CancelledError:  # the client left, or the shutdown aborted the request
        if lifecycle.was_aborted(request):
            record.fail(lifecycle.shutting_down())
        elif record.status < 400:
            record.status, record.client_disconnected = 499, True
        raise
    finally:
        if meter is not None and record.provider_model is not None:
            record.usage = meter.result(body, endpoint, record.provider_model)
        access_log.keep_bodies(record, body, meter, answer)
        record.latency_ms = (time.perf_counter() - started) * 1000
        request.app[SETTLER].settle(record)
