"""Course emails rendered per second per core, as a ratio against a bare Jinja render.

Run: `.venv/bin/python benchmarks/bench_render.py` (about a minute on 2 cores).

Full path: what a worker does for one course email in `send_batch`, i.e.
`composer_for(settings, sequences).course_step(..., delivery_id=...)` (subject
and preheader, Jinja for the HTML and text parts, Markdown, the layout,
css-inline, tracked links, open pixel, MIME) plus `wire_bytes` (the
serialisation `SMTPConnection.send` does; no DKIM key is configured here). It
cycles over all 7 steps of "product-vs-project" with varying first names.

Baseline: `jinja2.Environment().from_string(body)` of the same step's body (front
matter removed, compiled once), rendered with the same first name: no sandbox,
layout, Markdown, inlining or MIME.

Figures are emails per CPU-second of this one single-threaded process, i.e.
per core; the headline is the ratio full / bare, measured in alternating rounds
in this process so machine speed and load cancel out. Also measured: a cold
`Composer` per batch of `batch_size` (what `send_batch` did before it kept one
per process: every template compiled again per batch), and `preview_message`
(a new `Composer` per email). A stage breakdown (wall time,
unprofiled, by wrapping the stages' callables in this process only) and a
cProfile top-10 say where the time goes.

Results: a table on stdout and benchmarks/results/bench_render.json.
"""

from __future__ import annotations

import cProfile
import io
import json
import os
import platform
import pstats
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import css_inline
import jinja2
import markdown

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import nurture.delivery as delivery_module  # noqa: E402
import nurture.render as render_module  # noqa: E402
from nurture.config import load_settings  # noqa: E402
from nurture.delivery import Composer  # noqa: E402
from nurture.mailer import wire_bytes  # noqa: E402
from nurture.models import Subscriber  # noqa: E402
from nurture.preview import preview_message  # noqa: E402
from nurture.render import split_front_matter  # noqa: E402
from nurture.sequences import current_sequences  # noqa: E402

SEQUENCE = "product-vs-project"
ROUNDS = 5  # alternating bare/full rounds; medians are reported
FULL_PER_ROUND = 140  # 20 passes over the 7 steps
BARE_PER_ROUND = 7000
BATCH_PER_ROUND = 200  # a cold Composer per settings.batch_size emails
PREVIEW_PER_ROUND = 70
PROFILE_EMAILS = 210
FIRST_NAMES = [
    "Alex",
    "María José",
    "O'Brien",
    "Zoë",
    "Anne-Marie",
    "",
    "李",
    "Sam_the *star*",
    "Jean-Luc",
    "Fatima",
    "Bob <b>",
    "Ngozi",
    "Chris & Pat",
]  # 13 names, coprime with 7 steps: every step meets every name


def machine() -> dict:
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        nproc = int(subprocess.run(["nproc"], capture_output=True, text=True).stdout.strip())
    except (OSError, ValueError):
        nproc = os.cpu_count()
    return {
        "nproc": nproc,
        "cpu_model": model,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "loadavg_start": os.getloadavg(),
        "_cpu_ticks_start": cpu_ticks(),
    }


def cpu_ticks() -> list[int]:
    """The machine's aggregate CPU ticks from /proc/stat (user ... steal)."""
    try:
        return [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    except (OSError, ValueError):
        return []


def finish_machine(info: dict) -> None:
    """Load and CPU steal over the run: a busy or stolen-from VM explains odd absolutes."""
    info["loadavg_end"] = os.getloadavg()
    start, end = info.pop("_cpu_ticks_start"), cpu_ticks()
    if start and end:
        delta = [b - a for a, b in zip(start, end, strict=True)]
        total = sum(delta) or 1
        info["cpu_busy_share"] = round(1 - (delta[3] + delta[4]) / total, 3)  # not idle/iowait
        info["cpu_steal_share"] = round(delta[7] / total, 3)


class Timed:
    """One measurement: emails over wall and CPU seconds."""

    def __init__(self):
        self.wall = time.perf_counter()
        self.cpu = time.process_time()

    def stop(self, emails: int) -> dict:
        wall = time.perf_counter() - self.wall
        cpu = time.process_time() - self.cpu
        return {
            "emails": emails,
            "wall_s": wall,
            "cpu_s": cpu,
            "per_cpu_s": emails / cpu if cpu > 0 else None,
            "per_wall_s": emails / wall,
        }


def worker_composer(settings, sequences) -> Composer:
    """The Composer send_batch uses: one per process where the code keeps one."""
    keep = getattr(delivery_module, "composer_for", None)
    return keep(settings, sequences) if keep else Composer(settings, sequences)


def main() -> None:
    info = machine()
    composer_kind = (
        "delivery.composer_for(...)" if hasattr(delivery_module, "composer_for") else "Composer"
    )
    instance = tempfile.mkdtemp(prefix="bench-render-")
    settings = load_settings(
        {"NURTURE_INSTANCE": instance, "SECRET_KEY": "bench", "BASE_URL": "https://www.example.com"}
    )
    sequences = current_sequences(settings.templates_path)
    sequence = sequences[SEQUENCE]
    steps = list(sequence.steps)
    now = datetime(2025, 1, 6, 9, 0, tzinfo=UTC)

    # Subscribers are built up front: in the worker they come from the database.
    count = max(FULL_PER_ROUND, BATCH_PER_ROUND, PROFILE_EMAILS)
    subscribers = [
        Subscriber(
            id=1000 + i,
            email=f"reader{i}@example.com",
            first_name=FIRST_NAMES[i % len(FIRST_NAMES)],
        )
        for i in range(count)
    ]
    jobs = [
        (steps[i % len(steps)].key, subscribers[i], f"<d{i}@localhost>", i) for i in range(count)
    ]

    # Baseline: the same bodies, compiled once with a plain Environment.
    bare_templates = {}
    for step in steps:
        source = (settings.templates_path / sequence.name / step.file).read_text(encoding="utf-8")
        _, body = split_front_matter(source)
        bare_templates[step.key] = jinja2.Environment().from_string(body)
    bare_jobs = [
        (bare_templates[steps[i % len(steps)].key], FIRST_NAMES[i % len(FIRST_NAMES)])
        for i in range(len(steps) * len(FIRST_NAMES))
    ]

    def bare(n: int) -> int:
        size = 0
        for i in range(n):
            template, name = bare_jobs[i % len(bare_jobs)]
            size += len(template.render(first_name=name, course_url=settings.course_url))
        return size

    composer = worker_composer(settings, sequences)

    def full(n: int, comp: Composer | None = None) -> int:
        comp = comp or composer
        size = 0
        for i in range(n):
            key, subscriber, message_id, delivery_id = jobs[i % len(jobs)]
            message = comp.course_step(
                SEQUENCE, key, subscriber, message_id, now, delivery_id=delivery_id
            )
            size += len(wire_bytes(message))
        return size

    def per_batch(n: int) -> int:
        size = 0
        batch = settings.batch_size
        for start in range(0, n, batch):
            comp = Composer(settings, current_sequences(settings.templates_path))
            size += full(min(batch, n - start), comp)
        return size

    def preview(n: int) -> int:
        size = 0
        for i in range(n):
            key, subscriber, _, _ = jobs[i % len(jobs)]
            message = preview_message(settings, SEQUENCE, key, first_name=subscriber.first_name)
            size += len(wire_bytes(message))
        return size

    # Warm-up: every step compiled once, imports and caches settled.
    sample_full = full(len(steps) * 2)
    bare(len(bare_jobs) * 4)
    preview(len(steps))
    bytes_per_email = sample_full / (len(steps) * 2)

    runs: dict[str, list[dict]] = {"bare": [], "full": [], "per_batch": [], "preview": []}
    for _ in range(ROUNDS):
        for name, func, n in (
            ("bare", bare, BARE_PER_ROUND),
            ("full", full, FULL_PER_ROUND),
            ("per_batch", per_batch, BATCH_PER_ROUND),
            ("preview", preview, PREVIEW_PER_ROUND),
        ):
            timer = Timed()
            func(n)
            runs[name].append(timer.stop(n))

    def median(name: str, key: str) -> float:
        return statistics.median(r[key] for r in runs[name])

    rates = {name: median(name, "per_cpu_s") for name in runs}
    wall_rates = {name: median(name, "per_wall_s") for name in runs}
    # Ratio per round (each round's full against the same round's bare), then the median.
    round_ratios = [
        f["per_cpu_s"] / b["per_cpu_s"] for f, b in zip(runs["full"], runs["bare"], strict=True)
    ]
    ratio = statistics.median(round_ratios)

    stages, stage_calls, stage_emails = stage_breakdown(settings, sequences, jobs, now)
    profile_top, compiles_per_email, profile_text = profile(full, PROFILE_EMAILS)

    finish_machine(info)
    result = {
        "benchmark": "bench_render",
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": info,
        "method": {
            "sequence": SEQUENCE,
            "steps": [s.key for s in steps],
            "first_names": FIRST_NAMES,
            "rounds": ROUNDS,
            "rate_unit": "emails per CPU-second of one single-threaded process (= per core)",
            "full": f"{composer_kind}.course_step(delivery_id=...) + mailer.wire_bytes",
            "per_batch": f"as full, but a new Composer per {settings.batch_size} emails "
            "(send_batch before composer_for: templates compiled again per batch)",
            "preview": "preview.preview_message (a new Composer per email, no tracking) "
            "+ wire_bytes",
            "bare": "jinja2.Environment().from_string(body) compiled once per step, "
            "render(first_name, course_url)",
            "track_opens": settings.track_opens,
            "dkim": bool(settings.dkim_private_key),
        },
        "results": {
            "rate_per_core": rates,
            "rate_per_wall_second": wall_rates,
            "ratio_full_over_bare": ratio,
            "slowdown_full_vs_bare": 1 / ratio,
            "ratio_per_batch_over_full": rates["per_batch"] / rates["full"],
            "ratio_preview_over_full": rates["preview"] / rates["full"],
            "ms_per_email_full_cpu": 1000 / rates["full"],
            "wire_bytes_per_email": bytes_per_email,
            "round_ratios_full_over_bare": round_ratios,
        },
        "raw_runs": runs,
        "stages_ms_per_email": stages,
        "stages_calls_per_email": stage_calls,
        "stages_emails": stage_emails,
        "template_compilations_per_email": compiles_per_email,
        "cprofile_top10_cumulative": profile_top,
        "cacheable": CACHEABLE,
    }
    out = ROOT / "benchmarks" / "results" / "bench_render.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n")

    print(
        f"machine: {info['nproc']} x {info['cpu_model']}, Python {info['python']}, "
        f"load {info['loadavg_start'][0]:.2f} -> {info['loadavg_end'][0]:.2f}, "
        f"CPU busy {info.get('cpu_busy_share', float('nan')):.0%}, "
        f"steal {info.get('cpu_steal_share', float('nan')):.1%}"
    )
    print(f"\n{'path':<44}{'emails/s/core':>14}{'ms/email':>10}{'vs bare':>10}")
    labels = {
        "bare": "bare Jinja body (baseline)",
        "full": "worker path: course_step + wire_bytes",
        "per_batch": f"  same, cold Composer per {settings.batch_size} emails",
        "preview": "  preview_message (new Composer per email)",
    }
    for name, label in labels.items():
        rate = rates[name]
        print(f"{label:<44}{rate:>14,.0f}{1000 / rate:>10.3f}{rate / rates['bare']:>10.4f}")
    print(
        f"\nratio full/bare = {ratio:.4f} (full path is {1 / ratio:,.0f}x slower than bare Jinja)"
    )
    print(f"\nwhere the time goes (wall ms per email, unprofiled, {stage_emails} emails):")
    for name, ms in stages.items():
        print(f"  {name:<52}{ms:>8.3f}")
    print(f"\nJinja template compilations per email (cProfile): {compiles_per_email:.2f}")
    print("\ncProfile top 10 (cumulative), full path:")
    print(profile_text)
    print(f"written: {out.relative_to(ROOT)}")


class _StageClock:
    def __init__(self):
        self.totals: dict[str, float] = {}
        self.calls: dict[str, int] = {}

    def reset(self) -> None:
        for name in self.totals:
            self.totals[name] = 0.0
            self.calls[name] = 0

    def wrap(self, name: str, func):
        totals, calls = self.totals, self.calls
        totals.setdefault(name, 0.0)
        calls.setdefault(name, 0)

        def timed(*args, **kwargs):
            started = time.perf_counter()
            try:
                return func(*args, **kwargs)
            finally:
                totals[name] += time.perf_counter() - started
                calls[name] += 1

        return timed


class _ModuleProxy:
    """A module with one function swapped for a timed one (everything else passes through)."""

    def __init__(self, module, **overrides):
        self._module = module
        self.__dict__.update(overrides)

    def __getattr__(self, name):
        return getattr(self._module, name)


RENDER_TOTAL = "Renderer.render (all of it)"
RENDER_PARTS = (
    "  subject/preheader lookup (stat; parse on change)",
    "  Jinja from_string compiles",
    "  Markdown convert",
    "  css_inline.inline",
    "  markdown_to_text (text part)",
)
RENDER_REST = "  rest: Jinja renders (body x2, layouts, headers)"


def stage_breakdown(settings, sequences, jobs, now, emails: int = 140):
    """Wall time per stage, by wrapping the callables the full path looks up.

    The wrappers live in this process only and are removed afterwards; a stage
    the code no longer has is left out.
    """
    clock = _StageClock()
    composer = Composer(settings, sequences)  # its own, so the wrappers stay private
    renderer = composer.renderer
    renderer.render = clock.wrap(RENDER_TOTAL, renderer.render)
    for method in ("_headers", "front_matter"):  # whichever render() calls for the headers
        if hasattr(renderer, method):
            setattr(renderer, method, clock.wrap(RENDER_PARTS[0], getattr(renderer, method)))
            break
    text_env = renderer._text_env
    text_env.from_string = clock.wrap(RENDER_PARTS[1], text_env.from_string)
    restore: list[tuple[object, str, object]] = []

    def patch(owner, attr: str, name: str) -> None:
        if hasattr(owner, attr):
            original = getattr(owner, attr)
            restore.append((owner, attr, original))
            setattr(owner, attr, clock.wrap(name, original))

    # Markdown: the converter class (render() may build one per call or keep one per thread).
    convert = markdown.Markdown.convert
    restore.append((markdown.Markdown, "convert", convert))
    timed_convert = clock.wrap(RENDER_PARTS[2], convert)
    markdown.Markdown.convert = lambda self, source: timed_convert(self, source)
    restore.append((render_module, "css_inline", render_module.css_inline))
    render_module.css_inline = _ModuleProxy(
        css_inline, inline=clock.wrap(RENDER_PARTS[3], css_inline.inline)
    )
    patch(render_module, "markdown_to_text", RENDER_PARTS[4])
    patch(delivery_module, "rewrite_links", "rewrite_links (click tracking)")
    patch(delivery_module, "add_open_pixel", "add_open_pixel")
    patch(delivery_module, "build_message", "build_message (MIME)")
    for method in ("unsubscribe_url", "click_url", "open_url"):
        setattr(
            composer,
            method,
            clock.wrap("tokens (unsubscribe/click/open)", getattr(composer, method)),
        )
    step_clock = clock.wrap("course_step (all of it)", composer.course_step)
    wire = clock.wrap("wire_bytes (serialise MIME)", wire_bytes)
    warmup = 14  # two passes over the steps: compiles, converters
    try:
        for i in range(emails + warmup):
            if i == warmup:
                clock.reset()
            key, subscriber, message_id, delivery_id = jobs[i % len(jobs)]
            wire(step_clock(SEQUENCE, key, subscriber, message_id, now, delivery_id=delivery_id))
    finally:
        for owner, attr, original in reversed(restore):
            setattr(owner, attr, original)
    ms = {name: 1000 * total / emails for name, total in clock.totals.items()}
    calls = {name: count / emails for name, count in clock.calls.items()}
    ms[RENDER_REST] = ms[RENDER_TOTAL] - sum(ms.get(n, 0.0) for n in RENDER_PARTS)
    order = [
        "course_step (all of it)",
        RENDER_TOTAL,
        *RENDER_PARTS,
        RENDER_REST,
        "tokens (unsubscribe/click/open)",
        "rewrite_links (click tracking)",
        "add_open_pixel",
        "build_message (MIME)",
        "wire_bytes (serialise MIME)",
    ]
    stages = {name: ms[name] for name in order if name in ms}
    return stages, {name: calls[name] for name in order if name in calls}, emails


def profile(full, emails: int):
    profiler = cProfile.Profile()
    profiler.enable()
    full(emails)
    profiler.disable()
    stats = pstats.Stats(profiler)
    entries = []
    compiles = 0
    for (filename, line, func), (_cc, ncalls, tottime, cumtime, _callers) in stats.stats.items():
        if filename == __file__ or func.startswith("<method 'disable'"):
            continue  # the benchmark's own loop
        entries.append((cumtime, tottime, ncalls, f"{_short(filename)}:{line}({func})"))
        if func == "compile" and filename.endswith(os.path.join("jinja2", "environment.py")):
            compiles += ncalls
    entries.sort(reverse=True)
    top = [
        {
            "function": name,
            "ncalls": n,
            "cumtime_s": round(cum, 4),
            "tottime_s": round(tot, 4),
            "cum_ms_per_email": round(1000 * cum / emails, 3),
        }
        for cum, tot, n, name in entries[:10]
    ]
    buffer = io.StringIO()
    buffer.write(f"  {'ms/email':>9} {'calls/email':>11}  function\n")
    for row in top:
        per_email = row["ncalls"] / emails
        buffer.write(f"  {row['cum_ms_per_email']:>9.3f} {per_email:>11.1f}  {row['function']}\n")
    return top, compiles / emails, buffer.getvalue()


def _short(filename: str) -> str:
    for marker in ("site-packages" + os.sep, str(ROOT) + os.sep):
        if marker in filename:
            return filename.split(marker, 1)[1]
    return filename


CACHEABLE = {
    "note": "What in the full path does not change per subscriber, so could be computed once "
    "per (template file, mtime) or per process. stages_ms_per_email says what each costs now.",
    "already_cached": [
        "Composer/Renderer and its compiled templates: one per process (delivery.composer_for) "
        "where send_batch used to build one per batch (rate_per_core.per_batch shows the old "
        "cost).",
        "Subject and preheader templates: compiled once per file version (a stat per render "
        "checks the version).",
        "The Markdown converter: one per thread, reset per email.",
    ],
    "could_be_cached": [
        "Markdown: the body's Markdown differs between subscribers only in the escaped first "
        "name, so the HTML could be converted once per step with a placeholder and the escaped "
        "name substituted after (the largest render stage left).",
        "CSS inlining: the <style> block is the layout's and the markup is the step's; only the "
        "name, the unsubscribe URL and tracked links vary, so inlining could run once per step "
        "and per-subscriber values be substituted (HTML-escaped) afterwards.",
        "MIME headers: build_message parses every header through email.headerregistry "
        "(From, List-Id and List-Unsubscribe-Post are the same for a whole sequence; only To, "
        "Message-ID, Date and the unsubscribe URL vary); From could be parsed once, and the "
        "constant headers pre-folded.",
        "wire_bytes: the serialised HTML and text parts are mostly constant per step; the "
        "generator re-encodes them per email.",
        "Link rewriting: the set of URLs in a step is fixed; the regex scan and the sort could "
        "be done once per step (the click tokens themselves are per delivery).",
        "Jinja auto_reload: every get_template (4 per email) stats its file; a check per batch "
        "would do.",
    ],
}


if __name__ == "__main__":
    main()
