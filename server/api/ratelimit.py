"""Per-tenant token buckets: requests per second, and generated+prompt tokens per minute.

Tokens are charged after a request finishes (its size is unknown before), so a tenant may overdraw
its token bucket once; it is then refused until the bucket refills above zero.

With several API processes (`api_server_count` N), each holds its own buckets and enforces `share` = 1/N
of every limit (in-flight caps rounded up): the listening socket spreads connections over the processes,
so a tenant's whole traffic meets the configured limits approximately, never more than N times over
(a tenant whose connections all land on one process is held to 1/N). Exact global limits would need a
round trip to one owner of the buckets on every request; they were not worth it (bench/NOTES.md).
"""

from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass, field

from server.api.auth import Principal
from server.api.errors import APIError, retry_after


@dataclass
class TokenBucket:
    """`capacity` tokens refilled at `rate` per second; `level` may go negative (debt)."""

    capacity: float
    rate: float
    level: float = field(init=False)
    updated: float = field(default_factory=time.monotonic)

    def __post_init__(self) -> None:
        self.level = self.capacity

    def refill(self, now: float) -> None:
        self.level = min(self.capacity, self.level + (now - self.updated) * self.rate)
        self.updated = now

    def seconds_until(self, amount: float) -> float:
        """How long until `amount` tokens are available (0 if they are now)."""
        return max(0.0, (amount - self.level) / self.rate)


class RateLimiter:
    """Buckets keyed by tenant; raises APIError(429) with Retry-After when a limit is hit."""

    def __init__(self, clock=time.monotonic, share: float = 1.0):
        self._clock = clock
        self._share = share
        self._requests: dict[str, TokenBucket] = {}
        self._tokens: dict[str, TokenBucket] = {}
        self._in_flight: dict[str, int] = {}  # tenant -> requests accepted and not yet closed
        self._lock = threading.Lock()

    def check_request(self, principal: Principal) -> None:
        """Take one request from the tenant's request bucket; 429 if it is empty."""
        limit = principal.rate_limit
        if limit is None or limit.requests_per_second is None:
            return
        rps = limit.requests_per_second
        with self._lock:
            bucket = self._bucket(self._requests, principal.tenant, max(1.0, rps * self._share), rps * self._share)
            wait = bucket.seconds_until(1.0)
            if wait > 0:
                raise _limited(principal, f"{rps:g} requests per second", wait)
            bucket.level -= 1.0

    def check_tokens(self, principal: Principal) -> None:
        """Refuse (429) while the tenant's token bucket is empty or overdrawn."""
        limit = principal.rate_limit
        if limit is None or limit.tokens_per_minute is None:
            return
        with self._lock:
            bucket = self._token_bucket(principal)
            if bucket.level <= 0:
                wait = bucket.seconds_until(1.0)
                raise _limited(principal, f"{limit.tokens_per_minute} tokens per minute", wait)

    def charge_tokens(self, principal: Principal, num_tokens: int) -> None:
        """Debit prompt + completion tokens of a finished request."""
        limit = principal.rate_limit
        if limit is None or limit.tokens_per_minute is None or num_tokens <= 0:
            return
        with self._lock:
            self._token_bucket(principal).level -= num_tokens

    def enter(self, principal: Principal, default_limit: int | None = None) -> None:
        """Count one more request of the tenant in flight; 429 if it already has its
        `max_queued_requests` (the key's scheduling, else `default_limit`). Pair with `leave`."""
        scheduling = principal.scheduling
        limit = scheduling.max_queued_requests if scheduling and scheduling.max_queued_requests else default_limit
        if limit is not None:
            limit = math.ceil(limit * self._share)
        with self._lock:
            num = self._in_flight.get(principal.tenant, 0)
            if limit is not None and num >= limit:
                where = "" if self._share == 1.0 else " on this API process"
                raise _limited(principal, f"{limit} requests in flight{where}", 1.0)
            self._in_flight[principal.tenant] = num + 1

    def leave(self, principal: Principal) -> None:
        with self._lock:
            num = self._in_flight.get(principal.tenant, 0) - 1
            if num > 0:
                self._in_flight[principal.tenant] = num
            else:
                self._in_flight.pop(principal.tenant, None)

    def _token_bucket(self, principal: Principal) -> TokenBucket:
        tpm = principal.rate_limit.tokens_per_minute * self._share
        return self._bucket(self._tokens, principal.tenant, float(tpm), tpm / 60.0)

    def _bucket(self, buckets: dict[str, TokenBucket], tenant: str, capacity: float, rate: float):
        now = self._clock()
        bucket = buckets.get(tenant)
        if bucket is None:
            bucket = buckets[tenant] = TokenBucket(capacity, rate, updated=now)
        bucket.refill(now)
        return bucket


def _limited(principal: Principal, what: str, wait_s: float) -> APIError:
    return APIError(
        429, f"rate limit exceeded for tenant {principal.tenant!r} ({what}); retry later",
        headers=retry_after(wait_s),
    )
