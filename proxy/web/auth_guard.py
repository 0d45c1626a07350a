"""Around the authenticate stage: one credential per request, and a limit on
failed authentications per client address.

A request with two ``Authorization`` (or two ``x-api-key``) headers is a
400 whatever their order: which one a proxy on the way would pick is
anyone's guess. Each failed authentication (a 401) counts against the
client's address in a rolling window (``ratelimit.auth_failures``), in Redis
when it is there so every worker and instance share it, per process
without it. Once over the limit the address gets a 429 with
``retry-after`` for every request, valid key or not, until the window has
room again: guessing keys costs the guesser time, not the gateway work.
Refusing a blocked address costs a dict look-up per request; only failures
reach Redis.

The address is the TCP peer's, or, when the peer is one of
``server.trusted_proxies``, the right-most address of ``X-Forwarded-For``
that is not itself a trusted proxy.
"""

from __future__ import annotations

import ipaddress
import math
import time
from collections import OrderedDict
from collections.abc import Sequence

from aiohttp import web
from multidict import CIMultiDictProxy

from proxy.config.model import Config
from proxy.config.ratelimit import AuthFailurePolicy, RateLimitPolicy
from proxy.core.errors import AuthThrottled, InvalidApiKey, InvalidRequest
from proxy.core.principal import Principal
from proxy.pipeline.runtime import CLIENT_IP
from proxy.stages.auth import Authenticator
from proxy.stores.ratelimit import RateLimiter
from proxy.stores.windows import SLOTS, Limit

_MAX_BLOCKED = 100_000
Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def credential(headers: CIMultiDictProxy[str]) -> str | None:
    """The one ``Authorization`` header, or a 400 when a credential header
    repeats. Anthropic's clients send the key as ``x-api-key``: taken as the
    bearer when no ``Authorization`` header came."""
    given = headers.getall("Authorization", ())
    if len(given) == 1 and "x-api-key" not in headers:
        return given[0]  # nearly every request: one Authorization header
    keys = headers.getall("x-api-key", ())
    if len(given) > 1 or len(keys) > 1:
        name = "Authorization" if len(given) > 1 else "x-api-key"
        raise InvalidRequest(
            f"The request has more than one {name} header; send exactly one credential."
        )
    if given:
        return given[0]
    return f"Bearer {keys[0]}" if keys and keys[0] else None


class TrustedProxies:
    def __init__(self, networks: Sequence[str]) -> None:
        self._nets: tuple[Network, ...] = tuple(ipaddress.ip_network(n) for n in networks)

    def trusts(self, address: str) -> bool:
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return False
        return any(ip in net for net in self._nets)

    def client(self, request: web.BaseRequest) -> str:
        peer = request.remote or ""
        if not self._nets or not self.trusts(peer):
            return peer
        hops = [
            h.strip() for v in request.headers.getall("X-Forwarded-For", ()) for h in v.split(",")
        ]
        for hop in reversed(hops):
            if not self.trusts(hop):
                try:
                    return str(ipaddress.ip_address(hop))
                except ValueError:
                    return peer  # a forged or broken hop: the proxy itself is the client
        return peer


class AuthGuard:
    """Failed authentications per address; ``throttled`` feeds the metric."""

    def __init__(self, trusted_proxies: Sequence[str] = ()) -> None:
        self.proxies = TrustedProxies(trusted_proxies)
        self._blocked: OrderedDict[str, float] = OrderedDict()  # address -> until (monotonic)
        self.throttled = 0

    async def authenticate(
        self, request: web.BaseRequest, auth: Authenticator, limiter: RateLimiter, config: Config
    ) -> Principal:
        # The gate found the client's address already (one parse of X-Forwarded-For).
        address = request.get(CLIENT_IP) or self.proxies.client(request)
        self.check(address)
        try:
            header = credential(request.headers)
            # A key in the cache (nearly every request) needs no coroutine.
            return auth.cached(header) or await auth.authenticate(header)
        except InvalidApiKey:
            policy = config.ratelimit or RateLimitPolicy()
            await self.failed(limiter, policy.auth_failures, policy.expected_instances, address)
            raise

    def cached(self, request: web.BaseRequest, auth: Authenticator) -> Principal | None:
        """The principal of a key the cache knows, from a client that is not
        throttled, without a coroutine (nearly every request); None for
        anything else, which ``authenticate`` then decides (and counts, if
        it fails) exactly as before."""
        if self._blocked and (request.get(CLIENT_IP) or self.proxies.client(request)) in (
            self._blocked
        ):
            return None
        try:
            return auth.cached(credential(request.headers))
        except (InvalidApiKey, InvalidRequest):
            return None

    def check(self, address: str) -> None:
        until = self._blocked.get(address)
        if until is None:
            return
        left = until - time.monotonic()
        if left <= 0:
            del self._blocked[address]
            return
        self.throttled += 1
        raise _throttled(left)

    async def failed(
        self, limiter: RateLimiter, policy: AuthFailurePolicy, instances: int, address: str
    ) -> None:
        """Count one failure; raise the 429 when it is one too many."""
        window_ms = max(SLOTS, round(policy.window_s * 1000 / SLOTS) * SLOTS)
        limit = Limit(f"tw:af:{{{address}}}", "auth_failures", policy.max_failures, window_ms)
        verdict = await limiter.check([limit], instances)
        if verdict.admitted:
            return
        blocking = verdict.blocking
        wait = blocking.retry_ms / 1000 if blocking is not None and blocking.retry_ms > 0 else 1.0
        self._blocked[address] = time.monotonic() + wait
        self._blocked.move_to_end(address)
        while len(self._blocked) > _MAX_BLOCKED:
            self._blocked.popitem(last=False)
        self.throttled += 1
        raise _throttled(wait)


def _throttled(wait: float) -> AuthThrottled:
    seconds = max(1, math.ceil(wait))
    return AuthThrottled(
        f"Too many failed authentications from your address. Please try again in {seconds}s.",
        headers={"retry-after": str(seconds)},
    )
