"""Course emails rendered per second per core, as a ratio against a bare Jinja render.

Run: `.venv/bin/python benchmarks/bench_render.py` (under a minute on 2 cores);
`--quick` runs one short round of each, to check the script works (its figures
mean little); `--output` writes the JSON elsewhere.

Filled in (the worker path): what a worker does for one course email in
`send_batch`, i.e. `composer_for(settings, sequences).course_step(...,
delivery_id=...)`, which returns the wire bytes: subject and preheader, the
email's shape (rendered once per file version with slots, then filled in with
the subscriber's values), tracked links, open pixel, `build_message` (no DKIM
key is configured here). It cycles over all 7 steps of "product-vs-project"
with varying first names.

Full pipeline: the same, through a Composer whose renderer's `render` is
`Renderer._render_fully`, so every email goes through Jinja twice, Markdown,
the layouts and css-inline, as an email whose values cannot be filled in does.

Baseline: `jinja2.Environment().from_string(body)` of the same step's body (front
matter removed, compiled once; the environment loads the same snippets and has the
same helpers, such as `button()`), rendered with the same first name: no sandbox,
layout, Markdown, inlining or MIME.

Figures are emails per CPU-second of this one single-threaded process, i.e.
per core; the headline is the ratio filled in / bare, measured in alternating
rounds with the others in this process so machine speed and load cancel out.
Also measured: a cold `Composer` per batch of `batch_size` (every template
compiled and every shape made again per batch, as before `composer_for` kept
one per process), and `preview_email` (a new `Composer` per email). A stage
breakdown of both course_step paths (wall time, unprofiled, by wrapping the
stages' callables in this process only) and a cProfile top-10 of the worker
path say where the time goes.

Results: a table on stdout and benchmarks/results/bench_render.json.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import pstats
import statistics
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

from harness import finish_machine, machine  # noqa: E402

import nurture.delivery as delivery_module  # noqa: E402
import nurture.render as render_module  # noqa: E402
from nurture.config import load_settings  # noqa: E402
from nurture.delivery import Composer  # noqa: E402
from nurture.models import Subscriber  # noqa: E402
from nurture.preview import preview_email  # noqa: E402
from nurture.render import SNIPPET_FUNCTIONS, split_front_matter  # noqa: E402
from nurture.sequences import current_sequences  # noqa: E402

SEQUENCE = "product-vs-project"
RESULTS = ROOT / "benchmarks" / "results"
ROUNDS = 5  # alternating rounds of every path; medians are reported
PER_ROUND = {  # emails per path per round: each takes a few tenths of a second
    "bare": 20000,
    "filled_in": 1400,  # 200 passes over the 7 steps
    "full_pipeline": 280,
    "per_batch": 200,  # a cold Composer per settings.batch_size emails
    "preview": 70,
}
PROFILE_EMAILS = 910
STAGE_EMAILS = 910
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


def full_pipeline_composer(settings, sequences) -> Composer:
    """A Composer that renders every email in full: no shape is made or filled in."""
    composer = Composer(settings, sequences)
    composer.renderer.render = composer.renderer._render_fully
    return composer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--quick", action="store_true", help="one short round of each: checks the script runs"
    )
    parser.add_argument("--output", type=Path, default=RESULTS / "bench_render.json")
    args = parser.parse_args()
    rounds = 1 if args.quick else ROUNDS
    per_round = {name: n // 10 if args.quick else n for name, n in PER_ROUND.items()}
    profile_emails = PROFILE_EMAILS // 10 if args.quick else PROFILE_EMAILS

    info = machine()
    instance = tempfile.mkdtemp(prefix="bench-render-")
    settings = load_settings(
        {"NURTURE_INSTANCE": instance, "SECRET_KEY": "bench", "BASE_URL": "https://www.example.com"}
    )
    sequences = current_sequences(settings.templates_path)
    sequence = sequences[SEQUENCE]
    steps = list(sequence.steps)
    now = datetime(2025, 1, 6, 9, 0, tzinfo=UTC)

    # Subscribers are built up front: in the worker they come from the database.
    count = len(steps) * len(FIRST_NAMES)  # every step with every name
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
    bare_environment = jinja2.Environment(loader=jinja2.FileSystemLoader(settings.templates_path))
    bare_environment.globals.update(SNIPPET_FUNCTIONS)  # what a body may call, e.g. button()
    bare_templates = {}
    for step in steps:
        source = (settings.templates_path / sequence.name / step.file).read_text(encoding="utf-8")
        _, body = split_front_matter(source)
        bare_templates[step.key] = bare_environment.from_string(body)
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

    worker = delivery_module.composer_for(settings, sequences)
    in_full = full_pipeline_composer(settings, sequences)

    def course(n: int, comp: Composer) -> int:
        size = 0
        for i in range(n):
            key, subscriber, message_id, delivery_id = jobs[i % len(jobs)]
            email = comp.course_step(
                SEQUENCE, key, subscriber, message_id, now, delivery_id=delivery_id
            )
            size += len(email.data)
        return size

    def filled_in(n: int) -> int:
        return course(n, worker)

    def full_pipeline(n: int) -> int:
        return course(n, in_full)

    def per_batch(n: int) -> int:
        size = 0
        batch = settings.batch_size
        for start in range(0, n, batch):
            comp = Composer(settings, current_sequences(settings.templates_path))
            size += course(min(batch, n - start), comp)
        return size

    def preview(n: int) -> int:
        size = 0
        for i in range(n):
            key, subscriber, _, _ = jobs[i % len(jobs)]
            email = preview_email(settings, SEQUENCE, key, first_name=subscriber.first_name)
            size += len(email.data)
        return size

    # Warm-up: every step with every name once (templates compiled, shapes made).
    bytes_per_email = filled_in(len(jobs)) / len(jobs)
    full_pipeline(len(jobs))
    bare(len(bare_jobs) * 4)
    preview(len(steps))

    paths = {
        "bare": bare,
        "filled_in": filled_in,
        "full_pipeline": full_pipeline,
        "per_batch": per_batch,
        "preview": preview,
    }
    runs: dict[str, list[dict]] = {name: [] for name in paths}
    for _ in range(rounds):
        for name, func in paths.items():
            timer = Timed()
            func(per_round[name])
            runs[name].append(timer.stop(per_round[name]))

    def median(name: str, key: str) -> float:
        return statistics.median(r[key] for r in runs[name])

    def round_ratios(name: str, base: str) -> list[float]:
        """Each round's rate against the same round's `base`: load and speed cancel out."""
        return [
            r["per_cpu_s"] / b["per_cpu_s"] for r, b in zip(runs[name], runs[base], strict=True)
        ]

    rates = {name: median(name, "per_cpu_s") for name in runs}
    wall_rates = {name: median(name, "per_wall_s") for name in runs}
    ratio = statistics.median(round_ratios("filled_in", "bare"))
    ratio_full = statistics.median(round_ratios("full_pipeline", "bare"))
    speedup = statistics.median(round_ratios("filled_in", "full_pipeline"))

    stage_emails = STAGE_EMAILS // 10 if args.quick else STAGE_EMAILS
    stages, stage_calls = {}, {}
    for name, whole in (("filled_in", False), ("full_pipeline", True)):
        stages[name], stage_calls[name] = stage_breakdown(
            settings, sequences, jobs, now, stage_emails, full_pipeline=whole
        )
    profile_top, compiles_per_email, profile_text = profile(filled_in, profile_emails)

    finish_machine(info)
    result = {
        "benchmark": "bench_render",
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": info,
        "method": {
            "sequence": SEQUENCE,
            "steps": [s.key for s in steps],
            "first_names": FIRST_NAMES,
            "rounds": rounds,
            "emails_per_round": per_round,
            "quick": args.quick,
            "rate_unit": "emails per CPU-second of one single-threaded process (= per core)",
            "filled_in": "delivery.composer_for(...).course_step(delivery_id=...) -> "
            "OutgoingEmail.data (shapes rendered once per file version, filled in per email)",
            "full_pipeline": "as filled_in, through a Composer whose renderer.render is "
            "Renderer._render_fully (Jinja twice, Markdown, layouts, css-inline per email)",
            "per_batch": f"as filled_in, but a new Composer per {settings.batch_size} emails "
            "(templates compiled and shapes made again per batch)",
            "preview": "preview.preview_email(...).data (a new Composer per email, no tracking)",
            "bare": "jinja2.Environment().from_string(body) compiled once per step, "
            "render(first_name, course_url)",
            "track_opens": settings.track_opens,
            "dkim": bool(settings.dkim_private_key),
        },
        "results": {
            "rate_per_core": rates,
            "rate_per_wall_second": wall_rates,
            "ratio_filled_in_over_bare": ratio,
            "slowdown_filled_in_vs_bare": 1 / ratio,
            "ratio_full_pipeline_over_bare": ratio_full,
            "slowdown_full_pipeline_vs_bare": 1 / ratio_full,
            "speedup_filled_in_over_full_pipeline": speedup,
            "ratio_per_batch_over_filled_in": rates["per_batch"] / rates["filled_in"],
            "ratio_preview_over_filled_in": rates["preview"] / rates["filled_in"],
            "ms_per_email_filled_in_cpu": 1000 / rates["filled_in"],
            "ms_per_email_full_pipeline_cpu": 1000 / rates["full_pipeline"],
            "bytes_per_email": bytes_per_email,
            "round_ratios_filled_in_over_bare": round_ratios("filled_in", "bare"),
            "round_ratios_full_pipeline_over_bare": round_ratios("full_pipeline", "bare"),
        },
        "raw_runs": runs,
        "stages_ms_per_email": stages,
        "stages_calls_per_email": stage_calls,
        "stages_emails": stage_emails,
        "template_compilations_per_email": compiles_per_email,
        "cprofile_top10_cumulative": profile_top,
        "cacheable": CACHEABLE,
    }
    out = args.output
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n")

    print(
        f"machine: {info['nproc']} x {info['cpu_model']}, Python {info['python']}, "
        f"load {info['loadavg_start'][0]:.2f} -> {info['loadavg_end'][0]:.2f}, "
        f"CPU busy {info.get('cpu_busy_share', float('nan')):.0%}, "
        f"steal {info.get('cpu_steal_share', float('nan')):.1%}"
    )
    if args.quick:
        print("--quick: one short round of each; the figures mean little")
    print(f"\n{'path':<48}{'emails/s/core':>14}{'ms/email':>10}{'vs bare':>10}")
    labels = {
        "bare": "bare Jinja body (baseline)",
        "full_pipeline": "full pipeline: course_step, rendered in full",
        "filled_in": "filled in: course_step (the worker path)",
        "per_batch": f"  same, cold Composer per {settings.batch_size} emails",
        "preview": "  preview_email (new Composer per email)",
    }
    for name, label in labels.items():
        rate = rates[name]
        print(f"{label:<48}{rate:>14,.0f}{1000 / rate:>10.3f}{rate / rates['bare']:>10.4f}")
    print(
        f"\nratio filled in/bare = {ratio:.4f} ({1 / ratio:,.0f}x slower than bare Jinja); "
        f"full pipeline/bare = {ratio_full:.4f} ({1 / ratio_full:,.0f}x); "
        f"filled in is {speedup:.1f}x the full pipeline"
    )
    print(f"\nwhere the time goes (wall ms per email, unprofiled, {stage_emails} emails):")
    print(f"  {'stage':<52}{'filled in':>10}{'full':>10}")
    for name in STAGES:
        if any(name in by_stage for by_stage in stages.values()):
            row = "".join(f"{by_stage.get(name, 0.0):>10.3f}" for by_stage in stages.values())
            print(f"  {name:<52}{row}")
    print(f"\nJinja template compilations per email (cProfile): {compiles_per_email:.2f}")
    print("\ncProfile top 10 (cumulative), filled in (the worker path):")
    print(profile_text)
    print(f"written: {out}")


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


# Stages of course_step; an indented one runs inside the one above it.
COURSE_STEP = "course_step (all of it)"
RENDER = "Renderer.render (all of it)"
SHAPE = "  _shape: the email's shape (a stat per file)"
FILL = "  _Shape.fill: values into the slots"
RENDER_FULLY = "  _render_fully: the whole pipeline"
HEADERS = "    headers_for: subject and preheader"
MARKDOWN = "    Markdown convert"
CSS_INLINE = "    css_inline.inline"
TEXT_PART = "    markdown_to_text (text part)"
TOKENS = "tokens (unsubscribe/click/open)"
LINKS = "rewrite_links (click tracking)"
PIXEL = "add_open_pixel"
BUILD = "build_message (bytes)"
STAGES = (
    COURSE_STEP,
    RENDER,
    SHAPE,
    FILL,
    RENDER_FULLY,
    HEADERS,
    MARKDOWN,
    CSS_INLINE,
    TEXT_PART,
    TOKENS,
    LINKS,
    PIXEL,
    BUILD,
)


def stage_breakdown(settings, sequences, jobs, now, emails: int, *, full_pipeline: bool):
    """Wall time per stage of course_step, by wrapping the callables it looks up.

    With `full_pipeline` every email is rendered by `_render_fully`, as in the
    full-pipeline figure. The wrappers live in this process only and are removed
    afterwards; a stage the code no longer has is left out. headers_for runs
    inside _Shape.fill or _render_fully.
    """
    clock = _StageClock()
    composer = Composer(settings, sequences)  # its own, so the wrappers stay private
    renderer = composer.renderer
    renderer._render_fully = clock.wrap(RENDER_FULLY, renderer._render_fully)
    renderer.headers_for = clock.wrap(HEADERS, renderer.headers_for)
    renderer._shape = clock.wrap(SHAPE, renderer._shape)
    render = renderer._render_fully if full_pipeline else renderer.render
    renderer.render = clock.wrap(RENDER, render)
    for method in ("unsubscribe_url", "click_url", "open_url"):
        setattr(composer, method, clock.wrap(TOKENS, getattr(composer, method)))
    restore: list[tuple[object, str, object]] = []

    def patch(owner, attr: str, name: str) -> None:
        if hasattr(owner, attr):
            original = getattr(owner, attr)
            restore.append((owner, attr, original))
            setattr(owner, attr, clock.wrap(name, original))

    patch(render_module._Shape, "fill", FILL)
    # Markdown: the converter class (render() keeps one per thread).
    convert = markdown.Markdown.convert
    restore.append((markdown.Markdown, "convert", convert))
    timed_convert = clock.wrap(MARKDOWN, convert)
    markdown.Markdown.convert = lambda self, source: timed_convert(self, source)
    restore.append((render_module, "css_inline", render_module.css_inline))
    render_module.css_inline = _ModuleProxy(
        css_inline, inline=clock.wrap(CSS_INLINE, css_inline.inline)
    )
    patch(render_module, "markdown_to_text", TEXT_PART)
    patch(delivery_module, "rewrite_links", LINKS)
    patch(delivery_module, "add_open_pixel", PIXEL)
    patch(delivery_module, "build_message", BUILD)
    course_step = clock.wrap(COURSE_STEP, composer.course_step)
    warmup = len(jobs)  # every step with every name: templates compiled, shapes made
    try:
        for i in range(emails + warmup):
            if i == warmup:
                clock.reset()
            key, subscriber, message_id, delivery_id = jobs[i % len(jobs)]
            course_step(SEQUENCE, key, subscriber, message_id, now, delivery_id=delivery_id)
    finally:
        for owner, attr, original in reversed(restore):
            setattr(owner, attr, original)
    ms = {name: 1000 * clock.totals[name] / emails for name in STAGES if name in clock.totals}
    calls = {name: clock.calls[name] / emails for name in STAGES if name in clock.calls}
    return ms, calls


def profile(path, emails: int):
    profiler = cProfile.Profile()
    profiler.enable()
    path(emails)
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
    "note": "What in the worker path does not change per subscriber, so is or could be "
    "computed once per (template file, mtime) or per process. stages_ms_per_email says what "
    "each costs now.",
    "already_cached": [
        "Composer/Renderer and its compiled templates: one per process (delivery.composer_for); "
        "rate_per_core.per_batch shows the cost of a cold one per batch.",
        "The email's shape: Jinja, Markdown, the layouts and css-inline run once per file "
        "version and per which values are empty; each email is filled in by string "
        "replacement (rate_per_core.full_pipeline shows the cost without it).",
        "Subject and preheader templates: compiled once per file version.",
        "MIME: build_message writes the bytes directly; no email package objects or generator.",
    ],
    "could_be_cached": [
        "Finding the shape stats every file the email is made from (the email, the layouts, "
        "its includes) for every email; a check per batch would do.",
        "Subject and preheader: rendered with Jinja per email; they could be slotted like "
        "the body.",
        "MAIL_FROM is parsed twice per email (build_message, and Settings.mail_domain for "
        "List-Id); it is the same for the process.",
        "Link rewriting: the set of URLs in a shape is fixed; the regex scan and the sort could "
        "be done once per shape (the click tokens themselves are per delivery).",
        "preview_email builds a new Composer per call, so each preview makes and checks a shape "
        "(two full renders: slotted and a check) to fill it in once.",
    ],
}


if __name__ == "__main__":
    main()
