"""`GET /metrics` in Prometheus' text format, read from the database at each scrape.

Counting from the tables (rather than in each process's memory) keeps the
numbers right with any number of web and worker processes.
"""

from __future__ import annotations

import hmac

from flask import Blueprint, Response, abort, request
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from nurture.app import state
from nurture.db import session_scope
from nurture.models import utcnow
from nurture.stats import service_counts

bp = Blueprint("metrics", __name__)


class _Snapshot:
    """A collector over one reading of the counts."""

    def __init__(self, counts: dict[str, float]):
        self.counts = counts

    def collect(self):
        c = self.counts
        for name, key, text in (
            ("nurture_signups", "signups", "Subscribers who signed up"),
            ("nurture_confirmations", "confirmations", "Subscribers who confirmed"),
            ("nurture_emails_sent", "sent", "Emails sent"),
            ("nurture_emails_failed", "failed", "Emails that failed for good"),
        ):
            yield CounterMetricFamily(name, text, value=c[key])
        yield GaugeMetricFamily("nurture_emails_queued", "Emails waiting or sending", c["queued"])
        yield GaugeMetricFamily(
            "nurture_due_lag_seconds", "Now minus the oldest due step", c["lag_seconds"]
        )
        yield GaugeMetricFamily(
            "nurture_emails_waiting_for_smtp",
            "Emails put back because the SMTP server is down or refuses our session",
            c["smtp_waiting"],
        )
        yield GaugeMetricFamily(
            "nurture_smtp_wait_seconds",
            "Age of the oldest email put back because the SMTP server is down (0: none)",
            c["smtp_wait_seconds"],
        )
        yield GaugeMetricFamily(
            "nurture_dispatch_duration_seconds", "Last due-scan's duration", c["dispatch_seconds"]
        )
        yield GaugeMetricFamily(
            "nurture_dispatch_age_seconds",
            "Seconds since the last due-scan (-1: never ran)",
            c["dispatch_age_seconds"],
        )


@bp.get("/metrics")
def metrics():
    token = state().settings.metrics_token
    if token:
        given = request.headers.get("Authorization", "").removeprefix("Bearer ")
        # As bytes: compare_digest raises TypeError for a str that is not ASCII (a 500).
        if not hmac.compare_digest(given.encode(), token.encode()):
            abort(401)
    with session_scope(state().settings.database_url) as session:
        counts = service_counts(session, utcnow())
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Snapshot(counts))
    return Response(generate_latest(registry), mimetype="text/plain; version=0.0.4")
