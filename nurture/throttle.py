"""Provider rate limits: messages per second, overall and per recipient domain.

Mail providers throttle senders that go too fast (Gmail and Outlook answer 421
or 451 and slow everyone down). Limits here are shared by every worker through
Redis when the broker is Redis (the `limits` library's fixed windows), and
apply per process otherwise. A worker waits for a free slot for a short while;
past that it defers the email to a later tick instead of holding its batch.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import redis
from limits import RateLimitItemPerSecond
from limits.storage import storage_from_string
from limits.strategies import FixedWindowRateLimiter

from nurture.config import ConfigError, Settings
from nurture.ratelimit import Outage

log = logging.getLogger(__name__)

MAX_WAIT = 5.0  # seconds a worker waits for a slot before deferring the email


def parse_domain_rates(value: str) -> dict[str, int]:
    """`gmail.com=20,outlook.com=10` into {domain: messages per second}."""
    rates: dict[str, int] = {}
    for part in filter(None, (p.strip() for p in value.split(","))):
        domain, sep, number = part.partition("=")
        if not sep or not number.strip().isdigit() or int(number) < 1 or not domain.strip():
            raise ConfigError(
                f"SEND_RATE_PER_DOMAIN wants domain=messages_per_second, not {part!r}"
            )
        rates[domain.strip().lower()] = int(number)
    return rates


@dataclass
class Throttle:
    """Waits until sending one more email to a domain keeps within the limits."""

    limiter: FixedWindowRateLimiter | None
    overall: int  # messages per second; 0 is no limit
    per_domain: dict[str, int]
    sleep: Callable[[float], None] = time.sleep
    max_wait: float = MAX_WAIT
    #: The counters' Redis, when it fails: asked again only after a pause, logged once.
    outage: Outage = field(default_factory=Outage)

    @classmethod
    def from_settings(cls, settings: Settings) -> Throttle:
        if not settings.send_rate and not settings.send_rate_per_domain:
            return cls(None, 0, {})
        storage = storage_from_string(settings.rate_limit_storage)
        return cls(
            FixedWindowRateLimiter(storage), settings.send_rate, settings.send_rate_per_domain
        )

    def _limits(self, domain: str):
        if self.overall:
            yield RateLimitItemPerSecond(self.overall), "*"
        if domain in self.per_domain:
            yield RateLimitItemPerSecond(self.per_domain[domain]), domain

    def acquire(self, address: str) -> bool:
        """True once a slot is taken for `address`; False after MAX_WAIT (defer it).

        False too while the counters' Redis cannot be reached: the email waits for
        a later tick like one over the limit, rather than go out unchecked or
        leave its batch stuck under its lease.
        """
        if self.limiter is None:
            return True
        if self.outage.waiting():
            return False  # not every email waits on a Redis that just failed
        domain = address.rpartition("@")[2].lower()
        deadline = time.monotonic() + self.max_wait
        try:
            for item, key in self._limits(domain):
                while not self.limiter.hit(item, "nurture-send", key):
                    if time.monotonic() >= deadline:
                        return False
                    self.sleep(0.02)
        except redis.RedisError as error:
            if self.outage.failed():
                log.warning(
                    "the send rate cannot be counted: Redis is unavailable (%s); emails wait "
                    "for a later tick until it answers",
                    error,
                )
            return False
        deferred = self.outage.answered()
        if deferred is not None:
            log.warning("the send rate is counted again: Redis answers; %d emails waited", deferred)
        return True
