"""Hands new confirmation emails to the workers from a thread beside the web requests.

A signup stores its confirmation delivery and answers; it never waits on the
broker. The delivery row is written already marked as handed over; the web
process notes its id here, and a thread of its own publishes it a moment
later, many to a broker message, through the same `scheduler.hand_over` as the
due-scan. If the broker refuses them, the marks are taken back and the next
due-scan hands them over.

Nothing depends on this thread for correctness. A confirmation whose note is
lost (the process is killed, too many are waiting) keeps its marked row, which
the due-scan hands over again after `REQUEUE_AFTER_SECONDS`, as it does for a
message the broker lost.
"""

from __future__ import annotations

import atexit
import logging
import os
import threading
import weakref
from datetime import datetime

from celery import Celery

from nurture import scheduler
from nurture.config import Settings
from nurture.db import session_scope
from nurture.tasks import publisher

log = logging.getLogger(__name__)

#: Seconds a batch gathers before it is published. A person waits longer than
#: this for their mail provider; under load it puts dozens of confirmations in
#: one broker message instead of one each.
LINGER = 0.05
#: Notes held at most while the broker is slow; beyond this the due-scan
#: catches up.
MAX_PENDING = 10_000
#: Seconds without a signup after which the thread ends; the next signup starts
#: another.
IDLE = 30.0


class Handover:
    """Publishes the confirmations this process wrote, in batches, from one thread."""

    def __init__(self, settings: Settings, celery: Celery, linger: float = LINGER):
        self.settings = settings
        self.celery = celery
        self.linger = linger
        self._publish: scheduler.Publish | None = None
        self._reset()
        _handovers.add(self)

    def _reset(self) -> None:
        """Fresh state for this process (a forked child inherits its parent's, not its thread)."""
        self._pid = os.getpid()
        self._wake = threading.Condition()
        self._pending: list[int] = []
        self._marked_at: datetime | None = None  # the latest mark among them
        self._thread: threading.Thread | None = None
        self._closing = False

    def add(self, delivery_id: int, marked_at: datetime) -> None:
        """Note a committed confirmation, marked as handed over at `marked_at`.

        It is published within about `linger`.
        """
        if self._pid != os.getpid():
            self._reset()
        with self._wake:
            if len(self._pending) < MAX_PENDING:
                self._pending.append(delivery_id)
                self._marked_at = max(marked_at, self._marked_at or marked_at)
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name="nurture-handover", daemon=True
                )
                self._thread.start()
            self._wake.notify()

    def flush(self) -> int:
        """Publish what is waiting now, in the caller's thread; how many were waiting."""
        if self._pid != os.getpid():
            return 0
        with self._wake:
            ids, self._pending = self._pending, []
            marked_at, self._marked_at = self._marked_at, None
        if ids:
            self._hand_over(ids, marked_at)
        return len(ids)

    def close(self) -> None:
        """Stop the thread and publish what is waiting (at exit, and between tests)."""
        if self._pid != os.getpid():
            return
        with self._wake:
            thread, self._closing = self._thread, True
            self._wake.notify()
        if thread is not None:
            thread.join()
        self.flush()
        self._closing = False

    def _run(self) -> None:
        while True:
            with self._wake:
                self._wake.wait_for(lambda: self._pending or self._closing, timeout=IDLE)
                if self._closing or not self._pending:
                    self._thread = None  # under the lock: the next `add` starts another
                    return
                # Let the batch gather; `close` cuts this short and publishes itself.
                if self._wake.wait_for(lambda: self._closing, timeout=self.linger):
                    self._thread = None
                    return
            self.flush()

    def _hand_over(self, ids: list[int], marked_at: datetime) -> None:
        try:
            if self._publish is None:
                self._publish = publisher(self.celery)
            with session_scope(self.settings.database_url) as session:
                scheduler.hand_over(
                    session, ids, marked_at, self._publish, self.settings.batch_size, marked=True
                )
        except Exception as error:  # the database is down too: the due-scan requeues them
            log.error("handing over %d confirmations failed: %s", len(ids), error)


_handovers: weakref.WeakSet[Handover] = weakref.WeakSet()


@atexit.register
def close_all() -> None:
    """Close every hand-over of this process: a graceful shutdown publishes what waits."""
    for handover in list(_handovers):
        handover.close()
