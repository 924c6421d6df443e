#!/usr/bin/env python
"""End-to-end sends per second, against the floor of the same SMTP sink.

FLOOR: one smtplib connection sends M copies of a ready-made course email (the
wire bytes of `preview_email(settings, "product-vs-project", "overlap")`) to
Postfix's smtp-sink. PRODUCT: M due enrollments (welcome step) in a fresh
PostgreSQL database, Redis as the broker, W Celery worker processes (one per
core), each with T threads (`--pool threads --concurrency 4` by default, as
docker-compose runs them; sending waits on the network and on each commit) and
one dispatch (`run_dispatch`, called here); timed from the dispatch until every
delivery is `sent` in the database. The figure is product/floor (goal >= 0.5):
floor and product runs are taken in turns, and the figure is the median of
each product run over the floor run just before it, so that both sides of a
ratio see the machine at the same speed. The same is measured with one
prefork process per core sending one email at a time, for comparison (against
the floor's median).

CLAIMS: after each product run, one due-scan tick (bench_dispatch.py's, with
the beat's publisher onto Redis) claims and queues 10,000 due steps among
1,000,000 enrollments, seeded before the first round and settled (a
checkpoint and one untimed tick: bench_dispatch.settle). Each tick's claims per
second over the product run just before it; the figure is their median (goal:
claiming >= 10x faster than delivering).

MEMORY: one worker process sends 5,000 then, in chunks, up to 50,000 emails;
the prefork child's VmRSS is sampled after each chunk; RSS(50k) - RSS(5k) is
the figure (goal < 30 MB).

PROFILE: `nurture.delivery.send_batch` in this process against the same sink,
batches of Settings.batch_size each in its own session like the Celery task, first timed plain
and then under cProfile; the top costs go in the JSON.

    .venv/bin/python benchmarks/bench_delivery.py                      # M = 5,000
    .venv/bin/python benchmarks/bench_delivery.py --sends 20000        # larger
    .venv/bin/python benchmarks/bench_delivery.py --memory-total 20000 # shorter memory run
    .venv/bin/python benchmarks/bench_delivery.py --skip-memory --skip-profile
    .venv/bin/python benchmarks/bench_delivery.py --claims-list 0  # no claiming figure

Needs PostgreSQL at 127.0.0.1:5432 (BENCH_POSTGRES_URL), Redis at
127.0.0.1:6379 (database 12 is flushed; BENCH_REDIS_URL) and /usr/sbin/smtp-sink
(Debian: apt-get install postfix). Writes benchmarks/results/bench_delivery.json.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import pstats
import shutil
import signal
import smtplib
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import harness  # noqa: E402
import redis  # noqa: E402
from bench_dispatch import Size, prepare_size, settle, summarize_size, time_tick  # noqa: E402
from harness import (  # noqa: E402
    POSTGRES_URL,
    REDIS_URL,
    delete_queue,
    finish_machine,
    free_port,
    machine,
    wait_for_quiet,
)
from sqlalchemy import create_engine, text  # noqa: E402

from nurture import migrate, scheduler  # noqa: E402
from nurture.config import Settings, load_settings  # noqa: E402
from nurture.db import normalize_url, session_scope  # noqa: E402
from nurture.delivery import Composer, send_batch  # noqa: E402
from nurture.models import Subscriber, utcnow  # noqa: E402
from nurture.preview import preview_email  # noqa: E402
from nurture.sequences import current_sequences  # noqa: E402
from nurture.tasks import make_celery, prepare_broker, run_dispatch  # noqa: E402

SMTP_SINK = "/usr/sbin/smtp-sink"
PYTHON = str(ROOT / ".venv" / "bin" / "python")
RESULTS = ROOT / "benchmarks" / "results"
SEQUENCE = "product-vs-project"


# --- services ----------------------------------------------------------------------


class Sink:
    """Postfix's smtp-sink: accepts and discards mail, as fast as it can."""

    def __init__(self):
        if not Path(SMTP_SINK).exists():
            raise SystemExit(
                f"{SMTP_SINK} is missing: DEBIAN_FRONTEND=noninteractive apt-get install -y postfix"
            )
        self.port = free_port()
        self.log = tempfile.NamedTemporaryFile(prefix="smtp-sink-", suffix=".log", delete=False)
        self.process = subprocess.Popen(
            [SMTP_SINK, "-u", "nobody", "-c", f"127.0.0.1:{self.port}", "1000"],
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                break
            except OSError:
                if time.monotonic() > deadline or self.process.poll() is not None:
                    raise SystemExit(f"smtp-sink did not start; see {self.log.name}") from None
                time.sleep(0.05)

    @property
    def url(self) -> str:
        return f"smtp://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(5)
        except subprocess.TimeoutExpired:
            self.process.kill()


def fresh_database() -> tuple[str, callable]:
    url, drop = harness.fresh_database(POSTGRES_URL)
    migrate.upgrade(url)
    return url, drop


def environ_for(database_url: str, sink: Sink, instance: Path) -> dict[str, str]:
    return {
        "NURTURE_INSTANCE": str(instance),
        "DATABASE_URL": database_url,
        "BROKER_URL": REDIS_URL,
        "SMTP_URL": sink.url,
        "NURTURE_QUEUE": f"nurture-bench-{uuid.uuid4().hex[:8]}",
        "SECRET_KEY": "bench-secret-key",
        "BASE_URL": "http://nurture.bench",
        "POSTAL_ADDRESS": "Course Team, 12 Bench Street, Benchville",
        "MAIL_FROM": "Course Team <course@nurture.bench>",
        "DISPATCH_INTERVAL_SECONDS": "1",
    }


SEED = [
    """INSERT INTO subscribers (id, email, first_name, timezone, status, created_at, confirmed_at)
       SELECT i, 'reader' || i || '@example.com', 'Reader' || i, 'UTC', 'active', :now, :now
       FROM generate_series(CAST(:first AS integer), CAST(:last AS integer)) AS i""",
    """INSERT INTO enrollments (id, subscriber_id, sequence, timezone, status, next_step,
                                next_due_at, started_at, created_at)
       SELECT i, i, :sequence, 'UTC', 'active', 'welcome',
              CAST(:now AS timestamptz) - interval '1 minute', :now, :now
       FROM generate_series(CAST(:first AS integer), CAST(:last AS integer)) AS i""",
    "SELECT setval(pg_get_serial_sequence('subscribers', 'id'), :last)",
    "SELECT setval(pg_get_serial_sequence('enrollments', 'id'), :last)",
]


def seed(url: str, first: int, last: int) -> None:
    """Subscribers first..last, confirmed, whose welcome email is due (as test_chaos.py)."""
    engine = create_engine(normalize_url(url))
    with engine.begin() as connection:
        for statement in SEED:
            connection.execute(
                text(statement),
                {"first": first, "last": last, "now": utcnow(), "sequence": SEQUENCE},
            )
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as connection:
        connection.execute(text("ANALYZE"))
    engine.dispose()


def delivery_counts(engine) -> dict[str, int]:
    with engine.connect() as connection:
        return dict(
            connection.execute(
                text("SELECT status, count(*) FROM deliveries GROUP BY status")
            ).all()
        )


def wait_all_sent(engine, total: int, timeout: float) -> dict[str, int]:
    deadline = time.monotonic() + timeout
    while True:
        with engine.connect() as connection:
            sent = connection.execute(
                text("SELECT count(*) FROM deliveries WHERE status = 'sent'")
            ).scalar()
        if sent >= total:
            return delivery_counts(engine)
        if time.monotonic() > deadline:
            raise SystemExit(
                f"only {sent} of {total} sent after {timeout}s: {delivery_counts(engine)}"
            )
        time.sleep(0.05)


# --- workers -----------------------------------------------------------------------


class Worker:
    """One Celery worker process: prefork with one child, or `threads` threads of its own."""

    def __init__(self, environ: dict[str, str], name: str, logdir: Path, threads: int = 1):
        keep = {k: v for k, v in os.environ.items() if not k.startswith(("NURTURE_", "SMTP_"))}
        for variable in ("DATABASE_URL", "BROKER_URL"):
            keep.pop(variable, None)
        env = {**keep, **environ, "PYTHONUNBUFFERED": "1"}
        self.name = f"{name}@bench"
        self.log_path = logdir / f"{name}.log"
        self.log = open(self.log_path, "w")  # noqa: SIM115
        self.threads = threads
        pool = ["threads", str(threads)] if threads > 1 else ["prefork", "1"]
        self.process = subprocess.Popen(
            [
                PYTHON,
                "-m",
                "celery",
                "-A",
                "worker",
                "worker",
                "--hostname",
                self.name,
                "--pool",
                pool[0],
                "--concurrency",
                pool[1],
                "--without-gossip",
                "--without-mingle",
                "--loglevel",
                "WARNING",
            ],
            cwd=ROOT,
            env=env,
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )

    def sender(self) -> int | None:
        """The process that sends: the prefork child, or the worker itself with threads."""
        if self.threads > 1:
            return self.process.pid
        out = subprocess.run(
            ["ps", "--ppid", str(self.process.pid), "-o", "pid="],
            capture_output=True,
            text=True,
            check=False,
        ).stdout.split()
        return int(out[0]) if out else None

    def child_rss_kb(self) -> tuple[int | None, int | None]:
        pid = self.sender()
        if pid is None:
            return None, None
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return pid, int(line.split()[1])
        return pid, None

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.log.close()


def wait_ready(app, workers: list[Worker], timeout: float = 60) -> None:
    names = {worker.name for worker in workers}
    deadline = time.monotonic() + timeout
    while True:
        for worker in workers:
            if worker.process.poll() is not None:
                raise SystemExit(f"worker {worker.name} exited; see {worker.log_path}")
        replies = app.control.ping(destination=sorted(names), timeout=1.0)
        if names <= {name for reply in replies for name in reply}:
            if all(worker.sender() for worker in workers):
                return
        if time.monotonic() > deadline:
            raise SystemExit(f"workers not ready after {timeout}s; see {workers[0].log_path}")
        time.sleep(0.2)


#: Databases to drop when the script ends. DROP DATABASE forces a checkpoint,
#: after which every page the next due-scan tick touches goes into the WAL in
#: full: dropped between runs, it would slow the claiming figure for a reason
#: that is the benchmark's, not the product's.
DROP_AT_EXIT: list = []


def drop_databases() -> None:
    """Drop them all, each even if another's drop fails."""
    while DROP_AT_EXIT:
        try:
            DROP_AT_EXIT.pop()()
        except Exception as error:  # noqa: BLE001 - say so, and go on with the rest
            print(f"could not drop a benchmark database: {error}", file=sys.stderr)


class Service:
    """A fresh database and broker queue, and the settings every process shares."""

    def __init__(self, sink: Sink):
        self.url, self.drop = fresh_database()
        self.tmp = Path(tempfile.mkdtemp(prefix="nurture-bench-"))
        self.environ = environ_for(self.url, sink, self.tmp / "instance")
        self.settings = load_settings(self.environ)
        redis.Redis.from_url(REDIS_URL).flushdb()
        self.app = make_celery(self.settings)
        prepare_broker(self.app)
        self.engine = create_engine(normalize_url(self.url))
        self.workers: list[Worker] = []

    def start_workers(self, count: int, threads: int = 1) -> list[Worker]:
        tag = uuid.uuid4().hex[:6]
        self.workers = [
            Worker(self.environ, f"bench{i + 1}-{tag}", self.tmp, threads) for i in range(count)
        ]
        wait_ready(self.app, self.workers)
        return self.workers

    def close(self) -> None:
        for worker in self.workers:
            worker.stop()
        self.engine.dispose()
        self.app.close()
        delete_queue(self.settings.queue)
        DROP_AT_EXIT.append(self.drop)
        shutil.rmtree(self.tmp, ignore_errors=True)


# --- the measurements --------------------------------------------------------------


def floor(sink: Sink, data: bytes, sends: int, repeat: int, max_load: float) -> dict:
    runs = []
    for _ in range(repeat):
        load = wait_for_quiet(max_load)
        with smtplib.SMTP("127.0.0.1", sink.port, timeout=30) as smtp:
            started = time.perf_counter()
            for i in range(sends):
                smtp.sendmail("course@nurture.bench", [f"reader{i}@example.com"], data)
            seconds = time.perf_counter() - started
        runs.append({"seconds": seconds, "sends_per_s": sends / seconds, "load": load})
        print(
            f"  floor: {sends:,} in {seconds:.2f}s = {sends / seconds:,.0f}/s "
            f"(load {load['load_1min']})",
            flush=True,
        )
    return {
        "sends": sends,
        "message_bytes": len(data),
        "runs": runs,
        "sends_per_s": statistics.median(r["sends_per_s"] for r in runs),
    }


def product(
    sink: Sink, sends: int, workers: int, threads: int, repeat: int, max_load: float
) -> dict:
    runs = []
    for _ in range(repeat):
        service = Service(sink)
        try:
            seed(service.url, 1, sends)
            service.start_workers(workers, threads)
            load = wait_for_quiet(max_load)
            started = time.perf_counter()
            dispatched = run_dispatch(service.app)
            dispatch_s = time.perf_counter() - started
            counts = wait_all_sent(service.engine, sends, timeout=max(120, sends / 5))
            seconds = time.perf_counter() - started
        finally:
            service.close()
        run = {
            "seconds": seconds,
            "dispatch_s": dispatch_s,
            "sends_per_s": sends / seconds,
            # The dispatch hands out each batch as soon as it is written, so the
            # workers send while it runs: this overstates their own rate.
            "after_dispatch_sends_per_s": sends / (seconds - dispatch_s),
            "dispatch": vars(dispatched),
            "statuses": counts,
            "load": load,
        }
        runs.append(run)
        print(
            f"  product: {sends:,} in {seconds:.2f}s = {sends / seconds:,.0f}/s "
            f"(dispatch {dispatch_s:.2f}s, {workers} workers x {threads}, "
            f"load {load['load_1min']})",
            flush=True,
        )
    return {
        "sends": sends,
        "workers": workers,
        "threads_per_worker": threads,
        "pool": "threads" if threads > 1 else "prefork",
        "runs": runs,
        "sends_per_s": statistics.median(r["sends_per_s"] for r in runs),
    }


def in_turns(sink: Sink, data: bytes, args, claims: Size | None) -> tuple[dict, dict]:
    """The floor, the product and a due-scan tick in turns, each paired with the floor before.

    The machine's speed drifts by a fifth over minutes; measured in turns, the
    two sides of each ratio see the same machine. The delivery figure is the
    median of the product runs' ratios to the floor run just before them (the
    floor's extra runs, if any, come first); the claiming figure is the median
    of each tick's claims per second over the product run just before it.
    """
    floors, products = [], []
    extra = max(0, args.floor_repeat - args.repeat)
    rounds = max(args.repeat, args.floor_repeat)
    for index in range(rounds):
        floors.append(floor(sink, data, args.sends, 1, args.max_load))
        if index < extra:
            continue
        products.append(product(sink, args.sends, args.workers, args.threads, 1, args.max_load))
        if claims is not None:
            tick = time_tick(claims, index - extra, args.max_load, last=index + 1 == rounds)
            (run,) = products[-1]["runs"]
            run["claims_per_s"] = claims.due / tick["total_s"]
            run["claims_vs_delivery"] = run["claims_per_s"] / run["sends_per_s"]
    floor_runs = [run for f in floors for run in f["runs"]]
    product_runs = [run for p in products for run in p["runs"]]
    paired = floor_runs[extra:]
    for run, base in zip(product_runs, paired, strict=True):
        run["floor_sends_per_s"] = base["sends_per_s"]
        run["ratio_to_floor"] = run["sends_per_s"] / base["sends_per_s"]
    floor_result = {**floors[0], "runs": floor_runs}
    floor_result["sends_per_s"] = statistics.median(r["sends_per_s"] for r in floor_runs)
    product_result = {**products[0], "runs": product_runs}
    product_result["sends_per_s"] = statistics.median(r["sends_per_s"] for r in product_runs)
    product_result["ratio_to_floor"] = statistics.median(r["ratio_to_floor"] for r in product_runs)
    if claims is not None:
        product_result["claims_vs_delivery"] = statistics.median(
            r["claims_vs_delivery"] for r in product_runs
        )
    return floor_result, product_result


def memory(sink: Sink, first: int, total: int, chunk: int) -> dict:
    """One worker process; its prefork child's RSS after `first` sends, then each chunk."""
    service = Service(sink)
    samples = []
    try:
        (worker,) = service.start_workers(1)
        pid, rss = worker.child_rss_kb()
        samples.append({"sent": 0, "pid": pid, "rss_kb": rss, "seconds": 0.0})
        print(f"  memory: child {pid} RSS {rss / 1024:.1f} MB when ready", flush=True)
        done = 0
        started = time.perf_counter()
        while done < total:
            size = first if done == 0 else min(chunk, total - done)
            seed(service.url, done + 1, done + size)
            chunk_started = time.perf_counter()
            run_dispatch(service.app)
            wait_all_sent(service.engine, done + size, timeout=max(300, size / 2))
            chunk_s = time.perf_counter() - chunk_started
            done += size
            time.sleep(1)  # let the child finish its last task's bookkeeping
            pid, rss = worker.child_rss_kb()
            samples.append(
                {
                    "sent": done,
                    "pid": pid,
                    "rss_kb": rss,
                    "chunk_s": chunk_s,
                    "chunk_sends_per_s": size / chunk_s,
                    "seconds": time.perf_counter() - started,
                }
            )
            print(
                f"  memory: {done:,} sent, child {pid} RSS {rss / 1024:.1f} MB "
                f"({size / chunk_s:,.0f}/s this chunk)",
                flush=True,
            )
    finally:
        service.close()
    at_first = next(s for s in samples if s["sent"] == first)
    last = samples[-1]
    return {
        "first": first,
        "total": total,
        "chunk": chunk,
        "samples": samples,
        "same_child": len({s["pid"] for s in samples}) == 1,
        "rss_first_mb": at_first["rss_kb"] / 1024,
        "rss_last_mb": last["rss_kb"] / 1024,
        "growth_mb": (last["rss_kb"] - at_first["rss_kb"]) / 1024,
    }


PROFILE_GROUPS = {
    # label: (file suffix, function name) whose cumulative time is reported
    "claim_many (UPDATE ... RETURNING + COMMIT)": ("nurture/delivery.py", "claim_many"),
    "_may_send (1 query)": ("nurture/delivery.py", "_may_send"),
    "compose (render + bytes)": ("nurture/delivery.py", "compose"),
    "  Renderer.render": ("nurture/render.py", "render"),
    "    _Shape.fill": ("nurture/render.py", "fill"),
    "    _render_fully (a new shape, or not fillable)": ("nurture/render.py", "_render_fully"),
    "      css_inline.inline": ("~", "inline>"),
    "      Markdown.convert": ("markdown/core.py", "convert"),
    "    jinja compile (from_string/get_template)": ("jinja2/environment.py", "compile"),
    "  rewrite_links + tokens": ("nurture/render.py", "rewrite_links"),
    "  build_message": ("nurture/mailer.py", "build_message"),
    "SMTPConnection.send": ("nurture/mailer.py", "send"),
    "  smtplib sendmail": ("smtplib.py", "sendmail"),
    "_finish (UPDATE + complete_if_done + COMMIT)": ("nurture/delivery.py", "_finish"),
    "  complete_if_done": ("nurture/subscribers.py", "complete_if_done"),
    "Session.commit (claim and outcomes)": ("sqlalchemy/orm/session.py", "commit"),
    "psycopg wait (DB round trips)": ("psycopg/connection.py", "wait"),
}


def wall_clock_parts(settings, sequences, count: int) -> dict:
    """Compose `count` welcome emails, bytes included, without a profiler (ms per email)."""
    composer = Composer(settings, sequences)
    now = utcnow()
    subscribers = [
        Subscriber(id=i, email=f"reader{i}@example.com", first_name=f"Reader{i}")
        for i in range(1, count + 1)
    ]
    composer.course_step(SEQUENCE, "welcome", subscribers[0], "<warm@bench>", now, delivery_id=1)
    started = time.perf_counter()
    for s in subscribers:
        composer.course_step(SEQUENCE, "welcome", s, f"<{s.id}@bench>", now, delivery_id=s.id)
    return {"compose_ms": 1000 * (time.perf_counter() - started) / count}


def profile(sink: Sink, sends: int, batch: int) -> dict:
    """send_batch in this process: `sends` timed plainly, then `sends` under cProfile."""
    service = Service(sink)
    try:
        seed(service.url, 1, 2 * sends)
        settings, url = service.settings, service.url
        sequences = current_sequences(settings.templates_path)
        ids: list[int] = []
        with session_scope(url) as session:
            scheduler.create_due_deliveries(session, settings, sequences, utcnow())
            scheduler.enqueue_ready(session, settings, utcnow(), ids.extend)
        ids.sort()
        plain_ids, profiled_ids = ids[:sends], ids[sends:]

        def run(chunk_ids):
            for i in range(0, len(chunk_ids), batch):
                with session_scope(url) as session:
                    send_batch(
                        session,
                        settings,
                        current_sequences(settings.templates_path),
                        chunk_ids[i : i + batch],
                    )

        started = time.perf_counter()
        run(plain_ids)
        plain_s = time.perf_counter() - started
        wall = wall_clock_parts(settings, sequences, 200)
        profiler = cProfile.Profile()
        started = time.perf_counter()
        profiler.runcall(run, profiled_ids)
        profiled_s = time.perf_counter() - started
        counts = delivery_counts(service.engine)
    finally:
        service.close()
    stats = pstats.Stats(profiler)
    groups = {}
    for label, (suffix, function) in PROFILE_GROUPS.items():
        calls = cumulative = 0.0
        for (filename, _line, name), (_cc, nc, _tt, ct, _callers) in stats.stats.items():
            builtin = suffix == "~" and filename == "~" and function in name
            if builtin or (name == function and filename.endswith(suffix)):
                calls += nc
                cumulative += ct
        groups[label] = {
            "calls": int(calls),
            "ms_per_send": 1000 * cumulative / sends,
            "share": cumulative / profiled_s,
        }
    text_out = io.StringIO()
    pstats.Stats(profiler, stream=text_out).sort_stats("tottime").print_stats(25)
    top_tottime = [line for line in text_out.getvalue().splitlines() if line.strip()][:40]
    text_out = io.StringIO()
    pstats.Stats(profiler, stream=text_out).sort_stats("cumulative").print_stats(40)
    top_cumulative = [line for line in text_out.getvalue().splitlines() if line.strip()][:55]
    per_send = 1000 * plain_s / sends
    wall["send_batch_ms_per_send"] = per_send
    wall["rest_ms_per_send (DB, ORM, SMTP)"] = per_send - wall["compose_ms"]
    return {
        "sends": sends,
        "batch": batch,
        "statuses": counts,
        "in_process_sends_per_s": sends / plain_s,
        "wall_clock_ms_per_send": wall,
        "profiled_seconds": profiled_s,
        "groups": groups,
        "top_tottime": top_tottime,
        "top_cumulative": top_cumulative,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sends", type=int, default=5000, help="M, for floor and product")
    parser.add_argument(
        "--workers",
        type=int,
        default=os.cpu_count() or 2,
        help="worker processes for the throughput run (one per core)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=4,
        help="threads per worker process (the goal figure; docker-compose's workers run 4)",
    )
    parser.add_argument(
        "--skip-one-at-a-time",
        action="store_true",
        help="skip the comparison run with one prefork process per core, one email at a time",
    )
    parser.add_argument("--repeat", type=int, default=5, help="throughput runs (median)")
    parser.add_argument(
        "--claims-list",
        type=int,
        default=1_000_000,
        help="enrollments in the due-scan's list for the claiming figure (0: skip it)",
    )
    parser.add_argument("--claims-due", type=int, default=10_000)
    parser.add_argument("--floor-repeat", type=int, default=5)
    parser.add_argument("--memory-first", type=int, default=5000)
    parser.add_argument("--memory-total", type=int, default=50000)
    parser.add_argument("--memory-chunk", type=int, default=5000)
    parser.add_argument("--profile-sends", type=int, default=1000)
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--skip-profile", action="store_true")
    parser.add_argument(
        "--max-load",
        type=float,
        default=1.0,
        help="wait (up to 5 min per run) for the 1-min load to drop below this",
    )
    parser.add_argument("--output", type=Path, default=RESULTS / "bench_delivery.json")
    args = parser.parse_args()
    # A SIGTERM runs the clean-up too (sink, workers, databases).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    info = machine()
    sink = Sink()
    claims: Size | None = None
    result: dict = {"benchmark": "bench_delivery", "machine": info}
    try:
        instance = Path(tempfile.mkdtemp(prefix="nurture-bench-"))
        preview_settings = load_settings(
            environ_for("sqlite:///" + str(instance / "unused.db"), sink, instance)
        )
        data = preview_email(preview_settings, SEQUENCE, "overlap").data
        welcome = preview_email(preview_settings, SEQUENCE, "welcome").data
        shutil.rmtree(instance, ignore_errors=True)
        result["message"] = {"overlap_bytes": len(data), "welcome_bytes": len(welcome)}

        print(
            f"FLOOR (smtplib, one connection, {args.sends:,} x {len(data):,} bytes) and "
            f"PRODUCT ({args.workers} workers x {args.threads} threads, one dispatch, "
            f"{args.sends:,} due), taken in turns",
            flush=True,
        )
        if args.claims_list:
            print(
                f"CLAIMS: one due-scan tick, {args.claims_due:,} due among "
                f"{args.claims_list:,}, after each product run",
                flush=True,
            )
            claims = prepare_size(args.claims_list, args.claims_due)
            settle([claims])
        try:
            result["floor"], result["product"] = in_turns(sink, data, args, claims)
        finally:
            if claims is not None:
                claims.close()
        if claims is not None:
            result["claims"] = summarize_size(claims)
            result["claims_vs_delivery"] = result["product"]["claims_vs_delivery"]
            result["claims_vs_delivery_goal"] = 10.0
            result["claims_vs_delivery_goal_met"] = result["claims_vs_delivery"] >= 10
        if not args.skip_one_at_a_time and args.threads > 1:
            print(f"PRODUCT, one at a time: {args.workers} prefork workers", flush=True)
            result["product_one_at_a_time"] = product(
                sink, args.sends, args.workers, 1, args.repeat, args.max_load
            )
        result["ratio"] = result["product"]["ratio_to_floor"]
        result["ratio_goal"] = 0.5
        result["ratio_goal_met"] = result["ratio"] >= 0.5
        if not args.skip_memory:
            print(
                f"MEMORY: one worker, {args.memory_first:,} then up to {args.memory_total:,} sends",
                flush=True,
            )
            wait_for_quiet(args.max_load)
            mem = memory(sink, args.memory_first, args.memory_total, args.memory_chunk)
            mem["goal_mb"] = 30
            mem["goal_met"] = mem["growth_mb"] < 30
            result["memory"] = mem
        if not args.skip_profile:
            print(f"PROFILE: send_batch in-process, {args.profile_sends:,} sends", flush=True)
            wait_for_quiet(args.max_load)
            result["profile"] = profile(sink, args.profile_sends, Settings.batch_size)
    finally:
        try:
            sink.stop()
        finally:
            drop_databases()
    result["finished_at"] = utcnow().isoformat(timespec="seconds")
    finish_machine(info)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2, default=str))

    print()
    print(f"{'path':<34} {'sends':>7} {'sends/s':>9} {'ratio':>6}")
    floor_rate = result["floor"]["sends_per_s"]
    print(f"{'floor (smtplib, 1 connection)':<34} {args.sends:>7,} {floor_rate:>9,.0f} {1:>6.2f}")
    for key in ("product", "product_one_at_a_time"):
        if key in result:
            prod = result[key]
            label = f"product ({prod['workers']} x {prod['threads_per_worker']} {prod['pool']})"
            rate = prod["sends_per_s"]
            print(f"{label:<34} {args.sends:>7,} {rate:>9,.0f} {rate / floor_rate:>6.3f}")
    if "profile" in result:
        rate = result["profile"]["in_process_sends_per_s"]
        print(
            f"{'send_batch in-process (1 proc)':<34} {args.profile_sends:>7,} "
            f"{rate:>9,.0f} {rate / floor_rate:>6.3f}"
        )
    if "profile" in result:
        wall = result["profile"]["wall_clock_ms_per_send"]
        print(
            "send_batch wall clock per send (no profiler): "
            + ", ".join(f"{k} {v:.1f} ms" for k, v in wall.items())
        )
    pairs = ", ".join(f"{run['ratio_to_floor']:.3f}" for run in result["product"]["runs"])
    print(f"product over the floor run just before it: {pairs}")
    print(
        f"product/floor = {result['ratio']:.3f}, the median of those "
        f"(goal >= 0.5: {'met' if result['ratio_goal_met'] else 'MISSED'})"
    )
    if "claims" in result:
        pairs = ", ".join(f"{run['claims_vs_delivery']:.1f}x" for run in result["product"]["runs"])
        ok = "met" if result["claims_vs_delivery_goal_met"] else "MISSED"
        print(
            f"due-scan tick, {args.claims_due:,} due among {args.claims_list:,}: "
            f"{result['claims']['claims_per_s']:,.0f} claims/s (median); "
            f"each over the product run just before it: {pairs}"
        )
        print(
            f"claims/s vs sends/s = {result['claims_vs_delivery']:.1f}x, the median of those "
            f"(goal >= 10x: {ok})"
        )
    if "memory" in result:
        mem = result["memory"]
        print(
            f"worker child RSS: {mem['rss_first_mb']:.1f} MB after {mem['first']:,}, "
            f"{mem['rss_last_mb']:.1f} MB after {mem['total']:,}: growth "
            f"{mem['growth_mb']:+.1f} MB (goal < 30 MB: {'met' if mem['goal_met'] else 'MISSED'})"
        )
    if "profile" in result:
        print("send_batch profile (ms per send, cumulative):")
        for label, group in result["profile"]["groups"].items():
            print(f"  {label:<52} {group['ms_per_send']:>7.2f}  {group['share']:>5.0%}")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
