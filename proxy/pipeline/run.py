"""One LLM request, stage by stage, as DESIGN.md draws it:

    parse → authenticate → route → admit → [stages] → forward → relay → settle

Chat completions, legacy completions and embeddings share this path; only
the shape check in ``parse`` differs. Route comes before admit because
admission needs the public model (tier model rules, token estimate). The
plug-in stages of ``proxy.pipeline.registry`` run their hooks around
forward and relay (a hook may answer the request itself: a cache hit). The
settle step runs in ``finally``, so every request is settled exactly once,
including rejected, failed and disconnected ones; for an answer that got
that far, once the client has it whole (``answer``), so the client never
waits for the access line, the metrics or the billing.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping
from types import TracebackType

from aiohttp import web

from proxy.core import attribution, tokens
from proxy.core.errors import GatewayError, InvalidApiKey
from proxy.core.lifecycle import shutting_down
from proxy.core.metering import StreamMeter, settled_usage
from proxy.core.principal import Principal
from proxy.core.record import UsageRecord
from proxy.core.trace import NO_SPAN
from proxy.pipeline.hold import held
from proxy.pipeline.runtime import CLIENT_IP, PRINCIPAL, REQUEST_ID, TRACE, Runtime
from proxy.pipeline.snapshot import Snapshot
from proxy.providers.base import GENERATIVE, Call, Endpoint, Reply
from proxy.stages import parse, relay
from proxy.stages.admit import budget, key_limits, keyed
from proxy.stages.admit.billing import Admission, tier_of
from proxy.stages.base import Door, Exchange
from proxy.stages.forward.attempts import Forwarded, Native, forward
from proxy.stages.route import RoutePlan, fit
from proxy.stages.settle import access_log

log = logging.getLogger("tollway.pipeline")


def authenticate(request: web.Request, ex: Exchange) -> Principal | None:
    """The principal the web layer's gate found for the key (None: ``auth: none``)."""
    if ex.config.auth == "none":
        return None
    who = request.get(PRINCIPAL)
    if who is None:  # the config turned keys on after the gate let this request in
        raise InvalidApiKey("API keys are required on this gateway.")
    name(ex.record, who)
    return who


def name(record: UsageRecord, who: Principal) -> None:
    """The usage row says whose request it was."""
    record.tenant, record.tenant_id, record.key_id = who.tenant, who.tenant_id, who.key_id
    record.key_prefix = who.key_prefix


async def admit(
    rt: Runtime, ex: Exchange, plan: RoutePlan, taken: keyed.Taken | None = None
) -> None:
    """Quota, then budgets, then the key's windows, awaited where a lease is
    short. ``taken``: how far ``KeyAdmission.take`` got without an await
    (the admission noted already); the rest is awaited from there."""
    if ex.who is None or rt.billing is None:
        return
    billing = rt.billing
    limiter = rt.permits or rt.limiter
    if taken is None:
        # ``KeyAdmission.take`` found the quota lease short: refilled (or
        # refused) here, then budgets and windows from their leases or awaited.
        admission = await billing.admit(ex.config, ex.who, ex.body, ex.endpoint, ex.model)
        keyed.opened(billing, ex, admission)
        ask = None
        if billing.budgets is not None:
            costs = (billing.budgets, ex.who, admission.tier, plan, ex.config.prices, ex.body)
            needs = (ex.endpoint, admission.prompt_tokens, billing.quota.clock())
            admission.budget, ask = budget.take(*costs, *needs)
        done, verdict = False, None
    else:
        admission, ask, done, verdict = taken
    if ask is not None:
        assert billing.budgets is not None
        admission.budget = await budget.reserve(billing.budgets, ask)
    # After the quota: a request refused here settles as a 429 and gets its
    # reservation back, so no limit is consumed by one another limit refused.
    if taken is None or ask is not None:
        done, verdict = key_limits.take(limiter, admission, ex.record.end_user)
    if not done:
        verdict = await key_limits.admit(limiter, ex.config, admission, ex.record.end_user)
    if verdict is not None:
        ex.notes["rate"] = verdict
        if not verdict.admitted:
            raise key_limits.refused(verdict, ex.who.key_prefix, ex.record.end_user)


def asked_limit(body: dict[str, object]) -> int:
    """The completion limit the client set (the larger, when both), else 0."""
    return max(
        (v for k in ("max_tokens", "max_completion_tokens") if isinstance(v := body.get(k), int)),
        default=0,
    )


def fit_context(ex: Exchange, plan: RoutePlan, asked: int) -> RoutePlan:
    """Leave out the targets this request is too long for (``route.fit``):
    the prompt estimate plus the limit the client asked for, as capped by its
    tier. A request that set no limit asks only for its prompt to fit: the
    tier's cap is a ceiling, not a demand."""
    if ex.endpoint not in GENERATIVE or all(
        t.context_window is None for g in plan.groups for t in g.targets
    ):
        return plan
    admission = ex.record.admission
    prompt = admission.prompt_tokens if isinstance(admission, Admission) else None
    if prompt is None:  # no admission estimate (auth: none, or a tier without token limits)
        prompt = tokens.estimate_prompt(ex.body, ex.endpoint)  # not tiktoken: O(1) per text
    if asked and isinstance(admission, Admission):
        asked = min(asked, admission.tier.max_tokens)
    return fit(plan, prompt + asked)


def quota_headers(rt: Runtime, ex: Exchange) -> dict[str, str]:
    admission = ex.record.admission
    if not isinstance(admission, Admission) or rt.billing is None:
        return {}
    # The -requests trio is the hourly window; -tokens the minute window if any, else monthly.
    out = key_limits.response_headers(rt.billing.quota, admission, ex.notes.get("rate"))  # type: ignore[arg-type]
    leased = ex.notes.get(keyed.LEASED)  # the -requests trio of a window admitted from a lease
    if leased is not None:
        out.update(leased)  # type: ignore[call-overload]
    return out


def _served_headers(ex: Exchange, done: Forwarded) -> dict[str, str]:
    """Who served the answer, the stages' verdicts, the caller's limits."""
    return {
        **ex.headers,
        "x-tollway-provider": done.target.provider.name,
        "x-tollway-model": done.target.model,
        "x-tollway-attempts": str(done.attempts),
    }


async def run_stages(snapshot: Snapshot, ex: Exchange) -> web.StreamResponse | None:
    for stage, settings in snapshot.hooks.request:
        with ex.trace.child(stage.name):  # a cache hit's span holds its replay
            answer = await stage.on_request(ex, settings)
        if answer is not None:
            return answer
    return None


def settle_stages(snapshot: Snapshot, ex: Exchange) -> None:
    for stage, settings in snapshot.hooks.settle:
        try:
            stage.on_settle(ex, settings)
        except Exception:
            log.exception("stage %s failed to settle request %s", stage.name, ex.record.request_id)


async def handle(
    request: web.Request,
    endpoint: Endpoint,
    rt: Runtime,
    door: Callable[[str], Door] | None = None,
    refuse: Callable[[GatewayError, web.Request], web.Response] | None = None,
) -> web.StreamResponse:
    """``door``: opens the front door the client came through (given the
    request id), for an API other than ``endpoint``'s own. ``refuse``: the
    web layer's rendering of a refusal, sent before the request settles as
    an answer is (None: the refusal is raised, and sent after settling)."""
    started = time.perf_counter()
    snapshot = rt.config.current  # one snapshot for the whole request
    record = UsageRecord(request[REQUEST_ID], endpoint, config=snapshot.config)
    record.client_ip = request.get(CLIENT_IP)
    ex = Exchange(request, record, snapshot.config, endpoint, {}, started)
    ex.trace = request.get(TRACE, NO_SPAN)
    record.trace_id = ex.trace.trace_id
    if door is not None:
        ex.door = door(record.request_id)
        record.door = ex.door.name
    # ``Settling``'s work without its ``async with`` (two coroutines fewer
    # per request): classified on the way out, settled in ``finally``, after
    # the answer went out whole (``answer``): the client does not wait for
    # the access line, the metrics or the billing.
    readied = False  # ``ready`` ran, before the answer's end
    try:
        ex.body = await parse.read_json(request, snapshot.config.server.max_body_bytes)
        if ex.door is not None:
            ex.body = ex.door.to_chat(ex.body)
        accept(ex, request.headers)
        ex.who = authenticate(request, ex)
        if ex.door is not None:
            await ex.door.prepare(ex)  # a stored conversation's history, once the tenant is known
        resp = await proceed(rt, snapshot, ex, request.headers)
        if ex.meter is not None or ex.door is not None:
            readied = True
            await ready(ex)
        await answer(request, resp, rt, ex)
        return resp
    except GatewayError as exc:
        ended(rt, ex, exc)
        if refuse is None:
            raise
        resp = refuse(exc, request)
        await answer(request, resp, rt, ex)
        return resp
    except BaseException as exc:
        ended(rt, ex, exc)
        raise
    finally:
        if readied or (ex.meter is None and ex.door is None):
            settle_now(rt, snapshot, ex)  # nothing to await
        else:
            await settle(rt, snapshot, ex)


async def answer(request: web.Request, resp: web.StreamResponse, rt: Runtime, ex: Exchange) -> None:
    """The answer to the client, to its end (a stream's last chunk too),
    before the request settles: what aiohttp would do once the handler
    returned (its ``finish_response`` then finds the response sent and does
    nothing), plus what the ``front`` middleware does to a response it
    sends. A client gone before it had the whole answer is a 499, like a
    client gone during a stream; the provider's usage is still billed."""
    try:
        if not resp.prepared:
            if rt.lifecycle.draining:
                resp.force_close()  # keep-alive clients move to another instance
            resp.headers["x-request-id"] = ex.record.request_id
            await resp.prepare(request)
        await resp.write_eof()
    except ConnectionError:
        record = ex.record
        record.client_disconnected = True
        if record.status < 400:
            record.status = 499  # as ``ended`` says of a client gone
    except asyncio.CancelledError as exc:
        if not rt.lifecycle.aborting:
            ended(rt, ex, exc)  # the client left while its answer was written: 499
            raise
        # The shutdown's abort while a slow client reads: the answer is whole
        # in the connection's buffer (aiohttp waits for it to drain), and
        # goes out as the connection closes; no 503 can replace it now.
        task = asyncio.current_task()
        if task is not None:
            task.uncancel()
        if request.transport is not None:
            request.transport.close()


async def ready(ex: Exchange) -> None:
    """What settling awaits, done before the answer's end: a stream's usage
    (the provider's, else counted off the loop), and the door's ``finish``,
    so what the door keeps (a stored response) exists before the client
    sees the end of the answer and a follow-up request finds it. What is
    left to settle is synchronous (``settle_now``)."""
    record = ex.record
    if ex.meter is not None and record.provider_model is not None:
        record.usage = await settled_usage(ex.meter, ex.body, ex.endpoint, record.provider_model)
    if ex.door is not None:
        try:
            await ex.door.finish(ex)
        except Exception:
            log.exception("door %s failed to finish request %s", record.door, record.request_id)


def accept(ex: Exchange, headers: Mapping[str, str]) -> None:
    """The body's shape, and what the usage row keeps of it."""
    record = ex.record
    record.public_model = ex.model = parse.validate(ex.body, ex.endpoint)  # routed next
    record.end_user = attribution.end_user(ex.body)
    record.tags = attribution.tags(ex.body, headers)


async def proceed(
    rt: Runtime, snapshot: Snapshot, ex: Exchange, headers: Mapping[str, str]
) -> web.StreamResponse:
    """route → admit → stages → forward → relay, for a parsed body and its
    principal: shared by the HTTP requests and the batch lines
    (``proxy.pipeline.batch_line``), which have no ``web.Request``."""
    record, trace, who, billing = ex.record, ex.trace, ex.who, rt.billing
    key = (
        None
        if who is None or billing is None
        else keyed.of(billing, ex.config, who, rt.permits or rt.limiter)
    )
    tier = key.tier if key is not None else None if who is None else tier_of(ex.config, who)
    plan = snapshot.router.plan(
        ex.model,
        headers,
        tenant=who.tenant if who else None,
        tier=who.tier if who else None,
        access=tier,
    )
    record.public_model = ex.model = plan.public_model
    asked = asked_limit(ex.body)
    with trace.child("admission"):
        if key is not None:  # else nothing to admit: no coroutine
            assert billing is not None
            # One call admits from the leases (nearly every request); a
            # short lease is awaited from where it stopped.
            taken = key.take(ex, plan)  # the admission noted on the record, if any
            if taken is None:  # the quota lease is short: all of it awaited
                await admit(rt, ex, plan)
            else:
                _, ask, decided, verdict = taken
                if ask is not None or not decided:  # a budget or a window to await
                    await admit(rt, ex, plan, taken)
                elif verdict is not None:
                    ex.notes["rate"] = verdict  # a lease's verdict: admitted
    plan = fit_context(ex, plan, asked)
    record.stream = parse.wants_stream(ex.body, ex.endpoint)
    admission = record.admission
    if key is not None and isinstance(admission, Admission):
        rate, leased = ex.notes.get("rate"), ex.notes.get(keyed.LEASED)
        ex.headers = key.headers(record.request_id, admission, rate, leased)  # type: ignore[arg-type]
    elif admission is None:
        ex.headers = {"x-request-id": record.request_id}
    else:
        ex.headers = {"x-request-id": record.request_id, **quota_headers(rt, ex)}
    trace.stamp(ex.headers)
    if snapshot.hooks.request:
        answered = await run_stages(snapshot, ex)
        if answered is not None:
            return answered
    return await forward_and_relay(rt, snapshot, ex, plan)


class Settling:
    """``async with Settling(...)``: however the request ends, it is settled
    once, and a refusal says why. A class, not a generator-based context
    manager: it runs on every request, and this is the cheaper of the two."""

    __slots__ = ("ex", "rt", "snapshot")

    def __init__(self, rt: Runtime, snapshot: Snapshot, ex: Exchange) -> None:
        self.rt, self.snapshot, self.ex = rt, snapshot, ex

    async def __aenter__(self) -> None:
        return None

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:  # None: the exception, if any, goes on
        try:
            if exc is not None:
                ended(self.rt, self.ex, exc)
        finally:
            await settle(self.rt, self.snapshot, self.ex)


def ended(rt: Runtime, ex: Exchange, exc: BaseException) -> None:
    """What an exception leaving the pipeline says of the request: a refusal
    (its status, and the caller's limits in its headers), or a client gone."""
    record = ex.record
    if isinstance(exc, GatewayError):
        record.fail(exc)
        exc.headers.update(quota_headers(rt, ex))
        ex.trace.stamp(exc.headers)
    elif isinstance(exc, asyncio.CancelledError):
        # the client left, or the shutdown aborted the request
        if rt.lifecycle.aborting:
            record.fail(shutting_down())
        elif record.status < 400:
            record.status, record.client_disconnected = 499, True


def native(ex: Exchange) -> Native | None:
    """The request as the door's client sent it, for attempts to a provider
    that speaks the door's API: unless a stage changed it or must see the
    answer in chat (``Exchange.passthrough``). Its completion limit is the
    chat body's as admission capped it."""
    door = ex.door
    if door is None or not ex.passthrough:
        return None
    limits = [
        v for k in ("max_tokens", "max_completion_tokens") if isinstance(v := ex.body.get(k), int)
    ]
    limit = min(limits) if limits else None
    headers = door.native_headers(ex.inbound)
    return Native(door.name, lambda model: door.native_body(model, limit), headers or None)


async def forward_and_relay(
    rt: Runtime, snapshot: Snapshot, ex: Exchange, plan: RoutePlan
) -> web.StreamResponse:
    """forward → relay: the provider's answer, streamed or whole, to the client."""
    record, trace = ex.record, ex.trace
    call = Call(ex.endpoint, ex.body, plan.public_model, record.stream, record.request_id)
    forwarding = forward(rt.upstreams, snapshot, plan, call, record, trace, native(ex))
    done = await (held(ex, forwarding) if ex.checks else forwarding)
    record.provider, record.provider_model = done.target.provider.name, done.target.model
    record.served_model = done.target.public
    record.attempts = done.attempts
    headers = _served_headers(ex, done)
    if done.native and ex.door is not None:
        return await _relay_native(rt, ex, ex.door, done, headers)
    if done.stream is not None:
        ex.meter = StreamMeter(parse.wants_usage(ex.body), parse.choices(ex.body))
        record.progress = ex.meter  # the crash journal checkpoints what it delivered
        filters = [f for s, cfg in snapshot.hooks.stream if (f := s.on_stream(ex, cfg))]
        translate = ex.door.stream() if ex.door is not None else None
        return await relay.stream(
            ex.client(),
            done.stream,
            ex.meter,
            headers,
            record,
            ex.started,
            rt.lifecycle,
            filters,
            translate,
        )
    assert done.reply is not None
    reply = done.reply
    for stage, settings in snapshot.hooks.answer:
        reply = await stage.on_answer(ex, settings, reply)
    for stage, settings in snapshot.hooks.reply:
        reply = stage.on_reply(ex, settings, reply)
    ex.reply = reply
    return await relay.reply(reply, headers, record, ex.body, done.target.model, ex.door)


async def _relay_native(
    rt: Runtime, ex: Exchange, door: Door, done: Forwarded, headers: dict[str, str]
) -> web.StreamResponse:
    """The answer in the door's own API, as the provider sent it: no stage
    hook sees it (``passthrough`` said none needs to), the door's meter
    bills it."""
    record = ex.record
    if done.stream is not None:
        ex.meter = record.progress = door.native_meter()
        return await relay.stream(
            ex.client(),
            done.stream,
            ex.meter,
            headers,
            record,
            ex.started,
            rt.lifecycle,
            (),
            door.native_stream(),
        )
    assert done.reply is not None
    got = done.reply
    ex.reply = reply = Reply(door.native_reply(got.body), got.usage, got.status, got.headers)
    return await relay.reply(reply, headers, record, ex.body, done.target.model)


async def settle(rt: Runtime, snapshot: Snapshot, ex: Exchange) -> None:
    """Every request ends here once, however it ended: usage, stages, settlers."""
    record, trace = ex.record, ex.trace
    with trace.child("settle"):
        await ready(ex)
        _settled(rt, snapshot, ex)
    trace.finish(record)


def settle_now(rt: Runtime, snapshot: Snapshot, ex: Exchange) -> None:
    """``settle`` for a request with no stream meter and no door: nothing
    to await, so no coroutine."""
    with ex.trace.child("settle"):
        _settled(rt, snapshot, ex)
    ex.trace.finish(ex.record)


def _settled(rt: Runtime, snapshot: Snapshot, ex: Exchange) -> None:
    record = ex.record
    access_log.keep_bodies(record, ex.body, ex.meter, ex.reply)
    # From the request's start to its settling: for an HTTP request, until
    # its answer was handed to the client's connection whole.
    record.latency_ms = (time.perf_counter() - ex.started) * 1000
    settle_stages(snapshot, ex)
    rt.settler.settle(record)
