"""Per-client request limits (signups, admin logins), every window in one round trip.

Limits are written in the `limits` library's notation (`10 per minute;200 per
day`) and counted the way its fixed windows are: a client's first request opens
a window, and the window's counter expires with it. The windows of one limit
are counted shortest first, and counting stops at the first one that is full,
so a request refused by the minute does not also use up the day.

With Redis (the broker, when it is Redis) every web process shares the
counters, and one Lua call counts all of a route's windows: `limits` itself
makes one round trip per window, which was a fifth of a signup's cost.
Without Redis the counters live in the process, in `limits`' own memory
storage: right for the one process of a development setup.

A limiter that cannot reach Redis lets the request through and logs why: a
broken Redis must not stop signups. Its client gives up after `TIMEOUT`, so a
Redis that accepts connections but never answers delays a request by at most that.
After a failure it lets requests through unchecked for `PAUSE` seconds before it
asks Redis again, so an outage costs a process about one wait per pause rather
than one per request (requests already waiting on Redis each finish their wait),
and each process logs it once when it starts and once when it ends.
"""

from __future__ import annotations

import functools
import logging
import math
import threading
import time
from collections.abc import Callable

import redis
from limits import RateLimitItem, parse_many
from limits.storage import MemoryStorage
from limits.strategies import FixedWindowRateLimiter

log = logging.getLogger(__name__)

TIMEOUT = 1.0  # seconds; for connecting to Redis and for each reply
PAUSE = 5.0  # seconds without asking Redis after it failed
PREFIX = "nurture"  # the first part of every counter's key

# KEYS: one counter per window, shortest window first.
# ARGV: each window's length in seconds, then each window's limit.
# Returns {0, 0} when the request fits every window, else {the 1-based index of
# the first full window, the seconds until that window ends}.
_COUNT = """
local windows = #KEYS
for i, key in ipairs(KEYS) do
  local count = redis.call('INCR', key)
  if count == 1 or redis.call('TTL', key) == -1 then  -- a counter must never outlive its window
    redis.call('EXPIRE', key, ARGV[i])
  end
  if count > tonumber(ARGV[windows + i]) then
    return {i, redis.call('TTL', key)}
  end
end
return {0, 0}
"""


@functools.lru_cache(maxsize=32)
def parse(value: str) -> tuple[RateLimitItem, ...]:
    """`10 per minute;200 per day` as `limits` items, shortest window first.

    Raises ValueError for anything `limits` cannot read, for no limit at all,
    and for a window given twice (its one counter would count each request twice).
    """
    items = parse_many(value)
    if not items:
        raise ValueError(f"no rate limit in {value!r}")
    if len({item.key_for() for item in items}) < len(items):
        raise ValueError(f"a window is given twice in {value!r}")
    return tuple(sorted(items, key=lambda item: item.get_expiry()))


class Outage:
    """A Redis that failed, as a client of it keeps track: not asked again for `PAUSE`
    seconds after each failure, and how many requests went on without it meanwhile.

    Shared by a threaded process's threads, so it changes under a lock only. The
    rate limiter lets requests through while Redis is out; the send-rate throttle
    defers emails. Both log only when an outage starts and when it ends.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self._clock = clock
        self._lock = threading.Lock()
        self._retry_at: float | None = None
        self._skipped = 0

    def waiting(self) -> bool:
        """True within a pause: the caller goes on without Redis (counted as skipped)."""
        with self._lock:
            if self._retry_at is None or self._clock() >= self._retry_at:
                return False
            self._skipped += 1
            return True

    def failed(self) -> bool:
        """Redis failed this request (counted as skipped): start or extend the pause.
        True when an outage starts, for the caller to log."""
        with self._lock:
            starts = self._retry_at is None
            self._retry_at = self._clock() + PAUSE
            self._skipped += 1
            return starts

    def answered(self) -> int | None:
        """Redis answered: how many requests went without it if that ends an outage
        (for the caller to log, once), else None."""
        if self._retry_at is None:  # nearly every call: no lock needed to see it
            return None
        with self._lock:
            if self._retry_at is None:  # another thread saw it first
                return None
            skipped, self._retry_at, self._skipped = self._skipped, None, 0
            return skipped


class RateLimiter:
    """Counts requests per (scope, client) against limits in `limits` notation."""

    def __init__(self, storage_url: str, clock: Callable[[], float] = time.monotonic):
        self._memory: FixedWindowRateLimiter | None = None
        self._outage = Outage(clock)
        if storage_url.startswith("redis"):
            client = redis.Redis.from_url(
                storage_url, socket_timeout=TIMEOUT, socket_connect_timeout=TIMEOUT
            )
            self._count = client.register_script(_COUNT)
        else:
            self._memory = FixedWindowRateLimiter(MemoryStorage())

    def hit(self, scope: str, client: str, limit: str) -> int | None:
        """Count one request; None if it is allowed, else the seconds to wait (at least 1)."""
        items = parse(limit)
        if self._memory is not None:
            return self._hit_memory(scope, client, items)
        if self._outage.waiting():
            return None
        keys = [item.key_for(PREFIX, scope, client) for item in items]
        seconds = [item.get_expiry() for item in items]
        amounts = [item.amount for item in items]
        try:
            full, ttl = self._count(keys=keys, args=[*seconds, *amounts])
        except redis.RedisError as error:
            if self._outage.failed():
                log.warning(
                    "%s rate limit not checked: Redis is unavailable (%s); requests go "
                    "unchecked until it answers, asked again every %g s",
                    scope,
                    error,
                    PAUSE,
                )
            return None
        unchecked = self._outage.answered()
        if unchecked is not None:
            log.warning(
                "rate limits counted again: Redis answers; %d requests went unchecked", unchecked
            )
        return max(1, int(ttl)) if full else None

    def _hit_memory(self, scope: str, client: str, items: tuple[RateLimitItem, ...]) -> int | None:
        for item in items:
            if not self._memory.hit(item, PREFIX, scope, client):
                reset = self._memory.get_window_stats(item, PREFIX, scope, client).reset_time
                return max(1, math.ceil(reset - time.time()))
        return None
