#!/usr/bin/env python
"""Due-scan cost grows with what is due, not with the size of the list.

For each list size N (default 100,000 and 1,000,000) a fresh PostgreSQL
database is made and seeded server-side with N active enrollments, of which
DUE (default 10,000) are due now, spread evenly over the table, and the rest
due in the next week. The timed part is one dispatch tick,
`scheduler.dispatch`, publishing to Redis with the beat's own publisher (a
queue of its own, emptied after each tick, no workers): release lapsed claims,
claim the due steps in batches of SCAN_BATCH (write their deliveries already
marked as handed over, move each enrollment on, commit, queue the batch as
tasks of Settings.batch_size), then hand out anything else that is ready.
Each tick also records the WAL it wrote and the buffers PostgreSQL's backends
had to write out themselves (cluster-wide). After seeding, a checkpoint and
one untimed tick per size keep the seed's WAL out of the timed ticks
(`settle`). Between repetitions the same DUE
enrollments are made due again and the table is vacuumed. All sizes are seeded
first and their ticks are taken in turns (REPEAT each, default 5), so a drift
in the machine's speed falls on every size alike.

Figures are ratios against the smallest N, measured in the same run:
t(N)/t(N0), goal <= 1.5. Claiming against delivering (goal >= 10x) is measured
by bench_delivery.py, which takes this tick in turns with its delivery runs,
so that the two rates come from the same script. An idle tick (nothing due) is
timed too, and EXPLAIN (ANALYZE, BUFFERS) of the due-batch query, captured from the
real `_due_batch` call, goes into the JSON.

    .venv/bin/python benchmarks/bench_dispatch.py                 # 100k and 1M
    .venv/bin/python benchmarks/bench_dispatch.py --sizes 100000 300000 --repeat 5
    .venv/bin/python benchmarks/bench_dispatch.py --history       # + one sent delivery
                                                                  #   per future enrollment

Writes benchmarks/results/bench_dispatch.json. Needs PostgreSQL at
127.0.0.1:5432 (BENCH_POSTGRES_URL) and Redis at 127.0.0.1:6379 (database 12;
BENCH_REDIS_URL); each database and queue it creates is dropped at the end.
"""

from __future__ import annotations

import argparse
import functools
import json
import shutil
import signal
import statistics
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import redis  # noqa: E402
from harness import (  # noqa: E402
    POSTGRES_URL,
    REDIS_URL,
    delete_queue,
    finish_machine,
    fresh_database,
    machine,
    wait_for_quiet,
)
from sqlalchemy import create_engine, event, text  # noqa: E402

from nurture import migrate, scheduler  # noqa: E402
from nurture.config import Settings, load_settings  # noqa: E402
from nurture.db import (  # noqa: E402
    dispose_all,
    for_psycopg,
    get_engine,
    normalize_url,
    session_scope,
)
from nurture.models import utcnow  # noqa: E402
from nurture.sequences import current_sequences  # noqa: E402
from nurture.tasks import make_celery, prepare_broker, publisher  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
SEQUENCE = "product-vs-project"


# --- databases ---------------------------------------------------------------------


def outside_transaction(url: str, statement: str) -> None:
    """Run a statement that cannot run in a transaction (VACUUM, CHECKPOINT)."""
    engine = create_engine(normalize_url(url), isolation_level="AUTOCOMMIT")
    with engine.connect() as connection:
        connection.exec_driver_sql(statement)
    engine.dispose()


def vacuum_analyze(url: str) -> None:
    outside_transaction(url, "VACUUM ANALYZE")


SEED_SUBSCRIBERS = """
INSERT INTO subscribers (id, email, first_name, timezone, status, created_at, confirmed_at)
SELECT i, 'reader' || i || '@example.com', 'Reader' || i, 'UTC', 'active', :now, :now
FROM generate_series(1, :n) AS i
"""

# Every `stride`-th enrollment is due (up to a minute ago); the rest are due over
# the coming week, so the due ones are spread through the heap and the index.
SEED_ENROLLMENTS = """
INSERT INTO enrollments (id, subscriber_id, sequence, timezone, status, next_step,
                         next_due_at, started_at, created_at)
SELECT i, i, :sequence, 'UTC', 'active',
       CASE WHEN i % :stride = 0 THEN 'welcome' ELSE 'product-manager' END,
       CASE WHEN i % :stride = 0 THEN CAST(:now AS timestamptz) - (i % 60) * interval '1 second'
            ELSE CAST(:now AS timestamptz) + interval '1 hour' + (i % 604800) * interval '1 second'
       END,
       :now, :now
FROM generate_series(1, :n) AS i
"""

# Optional history: the not-yet-due enrollments already had their welcome email,
# so the deliveries table is as large as the list (closer to a list in production).
SEED_HISTORY = """
INSERT INTO deliveries (subscriber_id, enrollment_id, sequence, step, status, message_id,
                        attempts, not_before, enqueued_at, created_at, sent_at)
SELECT i, i, :sequence, 'welcome', 'sent', 'h' || i || '@bench', 1,
       CAST(:now AS timestamptz) - interval '1 day', CAST(:now AS timestamptz) - interval '1 day',
       CAST(:now AS timestamptz) - interval '1 day', CAST(:now AS timestamptz) - interval '1 day'
FROM generate_series(1, :n) AS i WHERE i % :stride <> 0
"""

RESET = [
    "DELETE FROM deliveries WHERE enrollment_id % :stride = 0",
    """UPDATE enrollments SET next_step = 'welcome',
              next_due_at = CAST(:now AS timestamptz) - (id % 60) * interval '1 second'
       WHERE id % :stride = 0""",
]


def seed(url: str, n: int, due: int, now, history: bool) -> dict:
    stride = n // due
    params = {"n": n, "stride": stride, "now": now, "sequence": SEQUENCE}
    started = time.perf_counter()
    engine = create_engine(normalize_url(url))
    with engine.begin() as connection:
        connection.execute(text(SEED_SUBSCRIBERS), params)
        connection.execute(text(SEED_ENROLLMENTS), params)
        if history:
            connection.execute(text(SEED_HISTORY), params)
        for table in ("subscribers", "enrollments", "deliveries"):
            connection.execute(
                text(
                    f"SELECT setval(pg_get_serial_sequence('{table}', 'id'), "
                    f"(SELECT coalesce(max(id), 0) + 1 FROM {table}))"
                )
            )
        counted = connection.execute(
            text("SELECT count(*) FILTER (WHERE next_due_at <= :now), count(*) FROM enrollments"),
            params,
        ).one()
        sizes = dict(
            connection.execute(
                text(
                    "SELECT relname, pg_total_relation_size(oid) FROM pg_class "
                    "WHERE relname IN ('subscribers', 'enrollments', 'deliveries')"
                )
            ).all()
        )
    engine.dispose()
    vacuum_analyze(url)
    return {
        "seconds": round(time.perf_counter() - started, 2),
        "due": counted[0],
        "enrollments": counted[1],
        "stride": stride,
        "table_mb": {k: round(v / 2**20, 1) for k, v in sizes.items()},
    }


def reset(url: str, n: int, due: int, now) -> None:
    engine = create_engine(normalize_url(url))
    with engine.begin() as connection:
        for statement in RESET:
            connection.execute(text(statement), {"stride": n // due, "now": now})
    engine.dispose()
    vacuum_analyze(url)


# --- the timed tick ----------------------------------------------------------------


class Recorder:
    """Counts the statements a tick sends."""

    def __init__(self, url: str):
        self.url = url
        self.count = 0
        self.watch()

    def watch(self) -> None:
        """Listen on the process's engine for the url, which a `dispose_all` replaces."""
        engine = get_engine(self.url)
        if not event.contains(engine, "before_cursor_execute", self._seen):
            event.listen(engine, "before_cursor_execute", self._seen)

    def _seen(self, _conn, _cursor, statement, _parameters, _context, _executemany):
        # The due batch itself runs on psycopg's cursor, unseen here, right
        # after the plan setting of its transaction: that counts for both.
        self.count += 2 if "plan_cache_mode" in statement else 1


def due_batch_query(now) -> tuple[str, dict]:
    """The due batch as a tick's first claim loop sends it, with its values."""
    statement, constants = for_psycopg(scheduler._DUE[True])
    shares = scheduler.CLAIM_LOOPS
    values = {"now": now, "limit": scheduler.SCAN_BATCH, "share": 0, "shares": shares}
    return statement, {**constants, **values}


def on_server(statement: str, parameters: dict | None = None) -> tuple:
    """One row of `statement`, run on the server's own database (not a size's)."""
    engine = create_engine(normalize_url(POSTGRES_URL))
    with engine.connect() as connection:
        row = connection.exec_driver_sql(statement, parameters or {}).one()
    engine.dispose()
    return tuple(row)


@functools.cache
def backend_writes() -> str:
    """SQL for the buffers the server's backends wrote out themselves, cluster-wide.

    Other databases' writes count too, so ticks run with the machine quiet.
    PostgreSQL 17 moved the count from pg_stat_bgwriter to pg_stat_io.
    """
    if int(on_server("SHOW server_version_num")[0]) >= 170000:
        return (
            "SELECT coalesce(sum(writes), 0)::bigint FROM pg_stat_io "
            "WHERE backend_type = 'client backend'"
        )
    return "SELECT buffers_backend FROM pg_stat_bgwriter"


def server_marks() -> tuple[str, int]:
    """The server's WAL position and how many buffers its backends have written out."""
    lsn, written = on_server(f"SELECT pg_current_wal_lsn()::text, ({backend_writes()})")
    return lsn, written


def server_work_since(marks: tuple[str, int]) -> dict:
    """WAL written since `marks`, and buffers the backends themselves had to write out.

    A backend writes a buffer when it needs one and every clean one is taken:
    when shared_buffers is smaller than the pages a tick touches, the tick pays
    for those writes itself.
    """
    lsn, written = marks
    since = "pg_wal_lsn_diff(pg_current_wal_lsn(), %(lsn)s::pg_lsn)"
    wal, now_written = on_server(f"SELECT {since}, ({backend_writes()})", {"lsn": lsn})
    return {"wal_mb": round(float(wal) / 2**20, 1), "backend_writes": now_written - written}


def shared_buffers() -> str:
    """The server's shared_buffers, as SHOW gives it (the figures depend on it)."""
    return on_server("SHOW shared_buffers")[0]


def tick(size: Size) -> dict:
    """One dispatch tick over `size`, handing its batches to the broker like the beat does."""
    published: list[int] = []
    messages = 0
    counting = threading.Lock()  # the tick's claim loops publish from threads of their own

    def publish(ids: list[int]) -> None:
        nonlocal messages
        size.publish(ids)
        with counting:
            published.extend(ids)
            messages += 1

    size.recorder.watch()
    size.recorder.count = 0
    marks = server_marks()
    with session_scope(size.url) as session:
        started = time.perf_counter()
        result = scheduler.dispatch(
            session, size.settings, size.sequences, now=size.now, publish=publish
        )
        done = time.perf_counter()
    queued = size.broker.llen(size.settings.queue)
    size.broker.delete(size.settings.queue)
    if queued != messages:
        raise SystemExit(f"published {messages} messages but the queue holds {queued}")
    return {
        "created": result.created,
        "enqueued": result.enqueued,
        "published": len(published),
        "messages": messages,
        "publish_failed": result.publish_failed,
        "total_s": done - started,
        "statements": size.recorder.count,
        **server_work_since(marks),
    }


def explain(url: str, now) -> list[str]:
    """EXPLAIN (ANALYZE, BUFFERS) of the due-batch query, in a transaction rolled back."""
    statement, parameters = due_batch_query(now)
    engine = create_engine(normalize_url(url))
    with engine.connect() as connection:
        connection.exec_driver_sql(scheduler._CLAIM_PLANNING)  # as the claim's transaction is
        rows = connection.exec_driver_sql(
            "EXPLAIN (ANALYZE, BUFFERS, VERBOSE OFF) " + statement, parameters
        ).all()
        connection.rollback()
    engine.dispose()
    return [row[0] for row in rows]


def indexes_used(plan: list[str]) -> list[str]:
    used = []
    for line in plan:
        if (" using " in line and "Index" in line) or "Bitmap Index Scan on " in line:
            used.append(line.strip().lstrip("-> ").split("  (")[0])
    return used


@dataclass
class Size:
    """One list size's seeded database, its broker queue, and what its runs need."""

    n: int
    due: int
    url: str
    drop: Callable[[], None]
    settings: object
    sequences: dict
    now: object
    recorder: Recorder
    seeded: dict
    plan_due: list[str]
    app: object
    publish: Callable[[list[int]], None]
    broker: redis.Redis
    plan_idle: list[str] = field(default_factory=list)
    runs: list[dict] = field(default_factory=list)

    def close(self) -> None:
        """Drop the database, the queue and the instance folder, whatever befalls the others."""
        try:
            delete_queue(self.settings.queue)
            self.app.close()
        finally:
            try:
                self.drop()
            finally:
                shutil.rmtree(self.settings.instance_path, ignore_errors=True)


def prepare_size(n: int, due: int, history: bool = False) -> Size:
    """A fresh database with `n` enrollments, `due` of them due now, and a queue on Redis."""
    url, drop = fresh_database(POSTGRES_URL)
    app = None
    instance = Path(tempfile.mkdtemp(prefix="nurture-bench-"))
    try:
        migrate.upgrade(url)
        settings = load_settings(
            {
                "NURTURE_INSTANCE": str(instance),
                "DATABASE_URL": url,
                "BROKER_URL": REDIS_URL,
                "NURTURE_QUEUE": f"nurture-bench-{uuid.uuid4().hex[:8]}",
                "SECRET_KEY": "bench",
                "POSTAL_ADDRESS": "Course Team, 1 Bench Street, Benchville",
                "BASE_URL": "http://nurture.bench",
            }
        )
        app = make_celery(settings)
        prepare_broker(app)
        sequences = current_sequences(settings.templates_path)
        now = utcnow().replace(microsecond=0)
        print(f"N={n:,}: seeding…", flush=True)
        seeded = seed(url, n, due, now - timedelta(seconds=1), history)
        print(f"  seeded in {seeded['seconds']}s ({seeded['due']:,} due); {seeded['table_mb']}")
        recorder = Recorder(url)
        # The plan of the first due batch, on the same data the timed runs see.
        plan_due = explain(url, now)
    except BaseException:
        if app is not None:
            app.close()
        drop()
        shutil.rmtree(instance, ignore_errors=True)
        raise
    return Size(
        n,
        due,
        url,
        drop,
        settings,
        sequences,
        now,
        recorder,
        seeded,
        plan_due,
        app=app,
        publish=publisher(app),
        broker=redis.Redis.from_url(REDIS_URL),
    )


def time_tick(size: Size, attempt: int, max_load: float, last: bool) -> dict:
    """One timed tick over `size`, then an idle one; the due steps are made due again."""
    load = wait_for_quiet(max_load, timeout=300)
    result = tick(size)
    result["load"] = load
    size.runs.append(result)
    print(
        f"  N={size.n:,} run {attempt + 1}: {result['total_s']:.2f}s "
        f"({result['created']:,} created, {result['messages']} messages queued, "
        f"{result['statements']:,} statements, {result['wal_mb']} MB WAL, "
        f"{result['backend_writes']:,} buffers written by backends, "
        f"load {load['load_1min']})",
        flush=True,
    )
    if result["created"] != size.due or result["published"] != size.due:
        raise SystemExit(f"expected {size.due} due steps, got {result}")
    idle = tick(size)
    result["idle_tick_s"] = idle["total_s"]
    result["idle_statements"] = idle["statements"]
    size.plan_idle = explain(size.url, size.now)
    if not last:
        reset(size.url, size.n, size.due, size.now - timedelta(seconds=1))
    return result


def summarize_size(size: Size) -> dict:
    totals = [r["total_s"] for r in size.runs]
    median = statistics.median(totals)
    return {
        "n": size.n,
        "due": size.due,
        "shared_buffers": shared_buffers(),
        "seed": size.seeded,
        "runs": size.runs,
        "median_s": median,
        "min_s": min(totals),
        "claims_per_s": size.due / median,
        "statements_per_claim": size.runs[-1]["statements"] / size.due,
        "idle_tick_median_s": statistics.median(r["idle_tick_s"] for r in size.runs),
        "due_batch_sql": due_batch_query(size.now)[0],
        "explain_first_batch": size.plan_due,
        "explain_nothing_due": size.plan_idle,
        "indexes_used": indexes_used(size.plan_due),
    }


def settle(sizes: list[Size]) -> None:
    """A checkpoint, then one untimed tick on each size (its steps then made due again).

    Seeding a million enrollments writes more WAL than `max_wal_size` allows
    between checkpoints, so left alone it sets off checkpoints during the first
    timed rounds, and the first change to each page after a checkpoint goes to
    the WAL whole: those ticks would pay for the seeding. A checkpoint here
    closes the seed's share, and the untimed tick takes the first touch of the
    pages every tick touches. Checkpoints during the timed rounds then come
    from the rounds' own WAL and the server's timer, as they do in service
    (each tick's WAL shows which ones followed one).
    """
    outside_transaction(POSTGRES_URL, "CHECKPOINT")
    for size in sizes:
        tick(size)
        reset(size.url, size.n, size.due, size.now - timedelta(seconds=1))


def run_sizes(ns: list[int], due: int, repeat: int, history: bool, max_load: float) -> list[dict]:
    """Every size seeded first, then their ticks taken in turns.

    The machine's speed drifts within minutes; timed in turns, each size's
    runs see the same stretches of it, so the ratio between sizes is not a
    ratio between two moments.
    """
    sizes: list[Size] = []
    try:
        for n in ns:
            sizes.append(prepare_size(n, due, history))
        settle(sizes)
        for attempt in range(repeat):
            for size in sizes:
                time_tick(size, attempt, max_load, last=attempt + 1 == repeat)
        dispose_all()
        return [summarize_size(size) for size in sizes]
    finally:
        for size in sizes:
            size.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--due", type=int, default=10_000)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument(
        "--history",
        action="store_true",
        help="also seed one sent delivery per not-yet-due enrollment",
    )
    parser.add_argument(
        "--max-load",
        type=float,
        default=1.0,
        help="wait (up to 5 min per run) for the 1-min load to drop below this",
    )
    parser.add_argument("--output", type=Path, default=RESULTS / "bench_dispatch.json")
    args = parser.parse_args()
    # A SIGTERM runs the clean-up too (sink, workers, databases).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    info = machine()
    info["postgres"] = None
    engine = create_engine(normalize_url(POSTGRES_URL))
    with engine.connect() as connection:
        info["postgres"] = connection.exec_driver_sql("SHOW server_version").scalar()
        info["postgres_settings"] = dict(
            connection.exec_driver_sql(
                "SELECT name, setting FROM pg_settings WHERE name IN "
                "('shared_buffers', 'synchronous_commit', 'jit', 'work_mem', 'random_page_cost')"
            ).all()
        )
    engine.dispose()

    sizes = run_sizes(args.sizes, args.due, args.repeat, args.history, args.max_load)
    base = sizes[0]
    for size in sizes:
        size["ratio_vs_smallest"] = size["median_s"] / base["median_s"]
        size["idle_ratio_vs_smallest"] = size["idle_tick_median_s"] / base["idle_tick_median_s"]
    largest = sizes[-1]
    finish_machine(info)
    result = {
        "benchmark": "bench_dispatch",
        "finished_at": utcnow().isoformat(timespec="seconds"),
        "machine": info,
        "parameters": {
            "due": args.due,
            "repeat": args.repeat,
            "history": args.history,
            "scan_batch": scheduler.SCAN_BATCH,
            "batch_size": Settings.batch_size,
        },
        "sizes": sizes,
        "ratio_largest_vs_smallest": largest["ratio_vs_smallest"],
        "ratio_goal": 1.5,
        "ratio_goal_met": largest["ratio_vs_smallest"] <= 1.5,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2, default=str))

    print()
    print(
        f"{'N':>10} {'due':>7} {'median s':>9} {'min s':>7} {'claims/s':>9} "
        f"{'stmts/claim':>11} {'idle tick s':>11} {'ratio':>6}"
    )
    for size in sizes:
        print(
            f"{size['n']:>10,} {size['due']:>7,} {size['median_s']:>9.2f} {size['min_s']:>7.2f} "
            f"{size['claims_per_s']:>9,.0f} {size['statements_per_claim']:>11.2f} "
            f"{size['idle_tick_median_s']:>11.4f} {size['ratio_vs_smallest']:>6.2f}"
        )
    met = "met" if result["ratio_goal_met"] else "MISSED"
    print(
        f"t({largest['n']:,}) / t({base['n']:,}) = {largest['ratio_vs_smallest']:.2f} "
        f"(goal <= 1.5: {met})"
    )
    print(f"due-batch indexes: {', '.join(largest['indexes_used']) or 'none (seq scan?)'}")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
