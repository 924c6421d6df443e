"""`web:app` with parts of the signup switched off, for bench_signup's cost breakdown.

Never served to users. `BENCH_SIGNUP_WITHOUT` names the parts, comma-separated:

* `limiter`: no rate limiting (the limiter's Redis round trip);
* `publish`: the confirmation is written but never handed to the broker (the
  hand-over thread is not told of it).

With both off, `POST /api/v1/subscribers` still validates the body and writes the
signup to PostgreSQL before answering: what any durable signup must do.
"""

from __future__ import annotations

import os

from nurture.handover import Handover
from nurture.ratelimit import RateLimiter
from web import app

WITHOUT = frozenset(filter(None, os.environ.get("BENCH_SIGNUP_WITHOUT", "").split(",")))
unknown = WITHOUT - {"limiter", "publish"}
if unknown:
    raise SystemExit(f"BENCH_SIGNUP_WITHOUT: unknown parts {sorted(unknown)}")
if "limiter" in WITHOUT:
    RateLimiter.hit = lambda self, scope, client, limit: None
if "publish" in WITHOUT:
    Handover.add = lambda self, delivery_id, marked_at: None

__all__ = ["app"]
