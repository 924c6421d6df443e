"""Course emails rendered per second per core, as a ratio against a bare Jinja render.

Run: `.venv/bin/python benchmarks/bench_render.py` (about a minute on 2 cores).

Full path: what a worker does for one course email in `send_batch`, i.e.
`Composer.course_step(..., delivery_id=...)` (front matter, Jinja for the HTML
and text parts, Markdown, the layout, css-inline, tracked links, open pixel,
MIME) plus `wire_bytes` (the serialisation `SMTPConnection.send` does; no DKIM
key is configured here). It cycles over all 7 steps of "product-vs-project"
with varying first names.

Baseline: `jinja2.Environment().from_string(body)` of the same step's body (front
matter removed, compiled once), rendered with the same first name: no sandbox,
layout, Markdown, inlining or MIME.

Figures are emails per CPU-second of this one single-threaded process, i.e.
per core; the headline is the ratio full / bare, measured in alternating rounds
in this process so machine speed and load cancel out. Also measured: the
worker as it really runs (a new `Composer` per batch of `batch_size`), and
`preview_message` (a new `Composer` per email). A stage breakdown (wall time,
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
import types
from datetime import UTC, datetime
from pathlib import Path

import jinja2

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
BATCH_PER_ROUND = 200  # worker as run: a new Composer per settings.batch_size emails
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
    }


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


def main() -> None:
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

    composer = Composer(settings, sequences)

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

    stages, stage_emails = stage_breakdown(settings, sequences, jobs, now)
    profile_top, compiles_per_email, profile_text = profile(full, PROFILE_EMAILS)

    info["loadavg_end"] = os.getloadavg()
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
            "full": "Composer.course_step(delivery_id=...) + mailer.wire_bytes, one Composer",
            "per_batch": f"as full, but a new Composer per {settings.batch_size} emails "
            "(what delivery.send_batch does per task)",
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
        f"load {info['loadavg_start'][0]:.2f} -> {info['loadavg_end'][0]:.2f}"
    )
    print(f"\n{'path':<44}{'emails/s/core':>14}{'ms/email':>10}{'vs bare':>10}")
    labels = {
        "bare": "bare Jinja body (baseline)",
        "full": "worker path: course_step + wire_bytes",
        "per_batch": f"  same, new Composer per {settings.batch_size} (send_batch)",
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
    print(f"\ntemplate compilations per email: {compiles_per_email:.2f}")
    print("\ncProfile top 10 (cumulative), full path:")
    print(profile_text)
    print(f"written: {out.relative_to(ROOT)}")


class _StageClock:
    def __init__(self):
        self.totals: dict[str, float] = {}

    def wrap(self, name: str, func):
        totals = self.totals
        totals.setdefault(name, 0.0)

        def timed(*args, **kwargs):
            started = time.perf_counter()
            try:
                return func(*args, **kwargs)
            finally:
                totals[name] += time.perf_counter() - started

        return timed


def stage_breakdown(settings, sequences, jobs, now, emails: int = 140):
    """Wall time per stage, by wrapping the callables the full path looks up.

    The wrappers live in this process only (module attributes are restored).
    """
    clock = _StageClock()
    composer = Composer(settings, sequences)
    renderer = composer.renderer
    renderer.render = clock.wrap("Renderer.render (all of it)", renderer.render)
    renderer.front_matter = clock.wrap("  front matter: read + parse file", renderer.front_matter)
    text_env = renderer._text_env
    text_env.from_string = clock.wrap(
        "  subject/preheader: Jinja from_string compile", text_env.from_string
    )
    saved = {
        (render_module, "markdown"): render_module.markdown,
        (render_module, "css_inline"): render_module.css_inline,
        (render_module, "markdown_to_text"): render_module.markdown_to_text,
        (delivery_module, "rewrite_links"): delivery_module.rewrite_links,
        (delivery_module, "add_open_pixel"): delivery_module.add_open_pixel,
        (delivery_module, "build_message"): delivery_module.build_message,
    }
    render_module.markdown = types.SimpleNamespace(
        markdown=clock.wrap("  markdown.markdown", saved[(render_module, "markdown")].markdown)
    )
    render_module.css_inline = types.SimpleNamespace(
        inline=clock.wrap("  css_inline.inline", saved[(render_module, "css_inline")].inline)
    )
    render_module.markdown_to_text = clock.wrap(
        "  markdown_to_text (text part)", saved[(render_module, "markdown_to_text")]
    )
    delivery_module.rewrite_links = clock.wrap(
        "rewrite_links (click tracking)", saved[(delivery_module, "rewrite_links")]
    )
    delivery_module.add_open_pixel = clock.wrap(
        "add_open_pixel", saved[(delivery_module, "add_open_pixel")]
    )
    delivery_module.build_message = clock.wrap(
        "build_message (MIME)", saved[(delivery_module, "build_message")]
    )
    for method in ("unsubscribe_url", "click_url", "open_url"):
        setattr(
            composer,
            method,
            clock.wrap("tokens (unsubscribe/click/open)", getattr(composer, method)),
        )
    step_clock = clock.wrap("course_step (all of it)", composer.course_step)
    wire = clock.wrap("wire_bytes (serialise MIME)", wire_bytes)
    try:
        for i in range(emails + 14):
            if i == 14:  # the first two passes over the steps are warm-up
                for name in clock.totals:
                    clock.totals[name] = 0.0
            key, subscriber, message_id, delivery_id = jobs[i % len(jobs)]
            wire(step_clock(SEQUENCE, key, subscriber, message_id, now, delivery_id=delivery_id))
    finally:
        for (module, attr), value in saved.items():
            setattr(module, attr, value)
    ms = {name: 1000 * total / emails for name, total in clock.totals.items()}
    known = sum(
        ms[n]
        for n in (
            "  front matter: read + parse file",
            "  subject/preheader: Jinja from_string compile",
            "  markdown.markdown",
            "  css_inline.inline",
            "  markdown_to_text (text part)",
        )
    )
    ms["  rest: Jinja renders of body x2, layout x2, subject"] = (
        ms["Renderer.render (all of it)"] - known
    )
    order = [
        "course_step (all of it)",
        "Renderer.render (all of it)",
        "  front matter: read + parse file",
        "  subject/preheader: Jinja from_string compile",
        "  markdown.markdown",
        "  css_inline.inline",
        "  markdown_to_text (text part)",
        "  rest: Jinja renders of body x2, layout x2, subject",
        "tokens (unsubscribe/click/open)",
        "rewrite_links (click tracking)",
        "add_open_pixel",
        "build_message (MIME)",
        "wire_bytes (serialise MIME)",
    ]
    return {name: ms[name] for name in order}, emails


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
    "note": "Parts of the full path that do not change per subscriber, so could be cached "
    "per (template file, mtime) or per process; see stages_ms_per_email for what each costs.",
    "items": [
        "Composer/Renderer: delivery.send_batch builds a new Composer (4 SandboxedEnvironments, "
        "their template caches, the DKIM signer) for every batch, so each batch compiles every "
        "template it touches again; one per process (auto_reload already catches edits) "
        "would avoid it (compare rate_per_core.per_batch with full).",
        "Front matter: Renderer.front_matter reads and parses the email file on every render; "
        "it could be cached per (path, mtime) like the compiled body is.",
        "Subject and preheader: compiled with from_string on every render (2 Jinja compiles "
        "per email); compile once per (file, mtime).",
        "Layout: _layout.html/_layout.txt are compiled once per Renderer, but the <style> block "
        "and the footer (postal address, list title) are the same for every subscriber.",
        "CSS inlining: the CSS is the layout's and the markup is the step's; only first_name, "
        "the unsubscribe URL and tracked links vary. Inlining could run once per step with "
        "placeholders, then placeholders replaced by escaped per-subscriber values.",
        "Markdown: the body varies only by first_name (and course_url, a setting); Markdown "
        "could run once per step with an escaped placeholder for the name.",
        "Link rewriting: the set of URLs in a step is fixed; the regex scans and the "
        "sort could be done once per step (the tokens themselves are per delivery).",
        "MIME: From address parsing and the List-Id string are per sequence, not per "
        "subscriber (small).",
    ],
}


if __name__ == "__main__":
    main()
