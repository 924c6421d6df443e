"""Hands new confirmation emails to the workers from a thread beside the web requests.

A signup stores its confirmation delivery and answers; it never waits on the
publish. The delivery row is written already marked as handed over; the web
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
import queue
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
#: one broker message instead of one each (at a fifth of this, publishing cost
#: a signup 5% more CPU: docs/decisions.md).
LINGER = 0.25
#: Notes held at most while the broker is slow; beyond this the due-scan
#: catches up.
MAX_PENDING = 10_000

Note = tuple[int, datetime]  # a delivery id, and when its row was marked


class Handover:
    """Publishes the confirmations this process wrote, in batches, from one thread."""

    def __init__(self, settings: Settings, celery: Celery, linger: float = LINGER):
        self.settings = settings
        self.celery = celery
        self.linger = linger
        self._fresh()
        _handovers.add(self)

    def _fresh(self) -> None:
        """No notes and no thread: at start, and in a forked child (threads do not fork)."""
        self._notes: queue.Queue[Note | None] = queue.Queue(MAX_PENDING)
        self._dropped = 0
        self._publish: scheduler.Publish | None = None
        self._starting = threading.Lock()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    def add(self, delivery_id: int, marked_at: datetime) -> None:
        """Note a committed confirmation, marked as handed over at `marked_at`.

        It is published about `linger` later.
        """
        if self._thread is None:
            with self._starting:
                if self._thread is None:
                    self._thread = threading.Thread(
                        target=self._run, name="nurture-handover", daemon=True
                    )
                    self._thread.start()
        try:
            self._notes.put_nowait((delivery_id, marked_at))
        except queue.Full:  # the broker hangs: these wait for the due-scan's requeue
            self._dropped += 1
            if self._dropped % 1000 == 1:
                log.warning(
                    "%d confirmations wait to be published; %d more left to the due-scan",
                    MAX_PENDING,
                    self._dropped,
                )

    def close(self) -> None:
        """Stop the thread and publish what is waiting (at exit, and between tests)."""
        with self._starting:
            thread, self._thread = self._thread, None
            if thread is not None:
                self._stopping.set()
                self._notes.put(None)  # wakes a thread waiting for its first note
                thread.join()
                self._stopping.clear()
        self._hand_over(self._waiting())

    def _run(self) -> None:
        while not self._stopping.is_set():
            first = self._notes.get()
            self._stopping.wait(self.linger)  # let a batch gather; `close` cuts it short
            self._hand_over([first, *self._waiting()])

    def _waiting(self) -> list[Note | None]:
        notes = []
        while True:
            try:
                notes.append(self._notes.get_nowait())
            except queue.Empty:
                return notes

    def _hand_over(self, notes: list[Note | None]) -> None:
        notes = [note for note in notes if note is not None]  # None only wakes the thread
        if not notes:
            return
        ids = [delivery_id for delivery_id, _ in notes]
        marked_at = max(at for _, at in notes)
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


def _after_fork() -> None:
    for handover in list(_handovers):
        handover._fresh()


os.register_at_fork(after_in_child=_after_fork)
