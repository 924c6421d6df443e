"""Celery: the app, its settings, and two thin tasks that call plain functions.

`nurture.dispatch` runs the due-scan (beat sends it every
DISPATCH_INTERVAL_SECONDS); `nurture.send_batch` sends a list of delivery ids
over one SMTP connection. Tasks carry ids only, never a countdown or ETA: the
database says when mail is due, so a restarted or flushed broker loses nothing
that the next due-scan cannot find again.
"""

from __future__ import annotations

import logging
import time
from contextlib import contextmanager, suppress
from datetime import datetime, timedelta

from celery import Celery, shared_task
from celery.signals import worker_process_init
from kombu import Exchange, Queue
from kombu.transport import redis as kombu_redis

from nurture import delivery, scheduler
from nurture.config import Settings
from nurture.db import dispose_all, insert_for, session_scope
from nurture.models import Heartbeat, utcnow
from nurture.privacy import prune_unconfirmed
from nurture.publishing import record_published
from nurture.sequences import current_sequences

log = logging.getLogger(__name__)

#: Seconds between runs of `prune_unconfirmed`: a signup outlives its retention by at
#: most this.
PRUNE_INTERVAL = 3600


#: Seconds a command to a Redis broker may wait for its reply. Without it, a
#: Redis that stops answering without closing the connection (a failover behind
#: a virtual address, a NAT or firewall that forgets it) holds a publish
#: forever: a due-scan, the web's hand-over thread or an admin's resend would
#: never return. With it the publish fails, its deliveries' marks are taken
#: back and the next due-scan hands them out. Well above a reply's normal
#: milliseconds, and above the 1 s a worker's BRPOP waits on an empty queue.
BROKER_REPLY_TIMEOUT = 5.0


def _queue(name: str) -> Queue:
    return Queue(name, Exchange(name), routing_key=name)


class KeptClientChannel(kombu_redis.Channel):
    """kombu's Redis channel, keeping one `redis.Redis` client for its publishes.

    kombu builds a new client object for every message it puts (`conn_or_acquire`
    without a client calls `_create_client`), and building one costs more CPU than
    the LPUSH itself. A client holds no connection of its own (each command borrows
    one from the channel's pool), so one kept per pool does the same work. When
    the channel replaces its pool (after a fork, or on close) a new client is made.
    """

    _kept_client = None

    @contextmanager
    def conn_or_acquire(self, client=None):
        if client:
            yield client
            return
        kept = self._kept_client
        if kept is None or kept.connection_pool is not self.pool:
            kept = self._kept_client = self._create_client()
        yield kept


class KeptClientTransport(kombu_redis.Transport):
    """The Redis transport with `KeptClientChannel` (set as Celery's `broker_transport`)."""

    Channel = KeptClientChannel


def make_celery(settings: Settings) -> Celery:
    """The Celery app for these settings (the web app uses it to publish only)."""
    app = Celery("nurture", set_as_current=True)
    transport_options: dict = {}
    transport = None  # from the URL's scheme
    if settings.broker_url.startswith("redis://"):
        transport = f"{__name__}:KeptClientTransport"  # a cheaper publish, see there
    if settings.broker_url.startswith("redis"):
        transport_options = {
            # Unacknowledged messages come back after this long; the due-scan's
            # own requeue and the delivery lease recover far sooner.
            "visibility_timeout": 3600,
            "socket_connect_timeout": 3,
            "socket_timeout": BROKER_REPLY_TIMEOUT,
        }
    app.conf.update(
        broker_url=settings.broker_url,
        broker_transport=transport,
        broker_transport_options=transport_options,
        broker_connection_retry_on_startup=True,
        # A worker or beat whose broker is gone keeps trying (every 30 s at most,
        # with a log line each time) rather than exit after Celery's 100 tries, about
        # 47 minutes: a broker down for an hour at night must not need a restart.
        broker_connection_max_retries=None,
        broker_connection_timeout=3,
        task_default_queue=settings.queue,
        task_queues=[_queue(settings.queue)],
        task_ignore_result=True,
        # A task is acknowledged after it ran, so a worker killed mid-batch
        # leaves its message to be redelivered; each delivery is claimed in the
        # database, so a redelivered batch cannot send anything twice.
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_publish_retry_policy={
            "max_retries": 2,
            "interval_start": 0,
            "interval_step": 0.5,
            "interval_max": 1,
        },
        beat_schedule={
            "dispatch": {
                "task": "nurture.dispatch",
                "schedule": float(settings.dispatch_interval),
                # A tick nobody ran in time is worthless; the next one does its work.
                "options": {"expires": settings.dispatch_interval},
            },
            "prune": {
                "task": "nurture.prune",
                "schedule": float(PRUNE_INTERVAL),
                "options": {"expires": PRUNE_INTERVAL},
            },
        },
        beat_schedule_filename=str(settings.instance_path / "celerybeat-schedule"),
        timezone="UTC",
        worker_hijack_root_logger=False,
    )
    app.nurture_settings = settings
    # Beat keeps its schedule in the instance folder, which nothing else makes when
    # SECRET_KEY is set (production); without it beat stopped, calling the file corrupt.
    with suppress(OSError):  # read-only: beat then says so itself
        settings.instance_path.mkdir(parents=True, exist_ok=True)
    return app


def publisher(app: Celery) -> scheduler.Publish:
    """A function that hands a list of delivery ids to the workers.

    Tasks go to the queue by name, which needs no declaration on the Redis or
    embedded broker: the workers declare their queue, and `prepare_broker`
    creates the embedded one. So a publish skips Celery's per-message
    declaration check, which is a third of its cost. Safe to call from
    several threads: each publish takes a producer of its own from the pool.
    """

    # Celery makes its producer pool on first use, without a lock; made here, the
    # due-scan's claim loops cannot each make one at once.
    app.amqp.producer_pool  # noqa: B018

    limit = app.amqp.argsrepr_maxsize

    def publish(ids: list[int]) -> None:
        # The arguments as events and monitors show them: what Celery's own
        # `saferepr` writes for a list of ids (cut at the same length), at a
        # hundredth of its cost.
        shown = repr([ids])
        if len(shown) > limit:
            shown = shown[: limit - 3] + "..."
        app.send_task("nurture.send_batch", args=[ids], declare=[], argsrepr=shown)

    return publish


def prepare_broker(app: Celery) -> None:
    """Create the queue once, before worker and beat race to create it."""
    with app.connection_for_write() as connection:
        _queue(app.conf.task_default_queue)(connection.default_channel).declare()


def run_dispatch(app: Celery, now: datetime | None = None) -> scheduler.DispatchResult:
    settings: Settings = app.nurture_settings
    now = now or utcnow()
    started = time.perf_counter()
    sequences = current_sequences(settings.templates_path)
    with session_scope(settings.database_url) as session:
        _record_published(session, sequences, now)
        result = scheduler.dispatch(session, settings, sequences, now=now, publish=publisher(app))
        beat(session, "dispatch", now, time.perf_counter() - started)
    return result


def _record_published(session, sequences, now: datetime) -> None:
    """Note the live versions for `nurture plan`; a failure there must not stop the sending."""
    try:
        record_published(session, sequences, now)
    except Exception:
        session.rollback()
        log.exception("recording the sequences' versions failed; the due-scan goes on")


def beat(session, name: str, now: datetime, seconds: float) -> None:
    """Record that a periodic job ran, and how long it took (read by /metrics)."""
    statement = insert_for(session)(Heartbeat).values(name=name, at=now, seconds=seconds)
    session.execute(
        statement.on_conflict_do_update(
            index_elements=["name"],
            set_={"at": statement.excluded.at, "seconds": statement.excluded.seconds},
        )
    )


@shared_task(name="nurture.dispatch", bind=True)
def dispatch_task(self) -> None:
    result = run_dispatch(self.app)
    if result.created or result.enqueued or result.released or result.publish_failed:
        log.info("dispatch: %s", result)


def run_prune(app: Celery, now: datetime | None = None) -> int:
    """Erase signups never confirmed within UNCONFIRMED_RETENTION_DAYS; how many."""
    settings: Settings = app.nurture_settings
    if not settings.unconfirmed_retention:
        return 0
    now = now or utcnow()
    started = time.perf_counter()
    with session_scope(settings.database_url) as session:
        keep = timedelta(seconds=settings.unconfirmed_retention)
        pruned = prune_unconfirmed(session, now=now, keep=keep)
        beat(session, "prune", now, time.perf_counter() - started)
    return pruned


@shared_task(name="nurture.prune", bind=True)
def prune_task(self) -> None:
    pruned = run_prune(self.app)
    if pruned:
        log.info("prune: erased %d signups never confirmed", pruned)


@shared_task(name="nurture.send_batch", bind=True)
def send_batch_task(self, delivery_ids: list[int]) -> None:
    settings: Settings = self.app.nurture_settings
    with session_scope(settings.database_url) as session:
        result = delivery.send_batch(
            session, settings, current_sequences(settings.templates_path), delivery_ids
        )
    log.info("send_batch %s: %s", delivery_ids[:3], result)


@worker_process_init.connect
def _fresh_connections(**_kwargs) -> None:
    """A forked worker child must not share its parent's database connections."""
    dispose_all()
