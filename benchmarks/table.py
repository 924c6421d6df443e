"""The README's short table of the last `make bench`, written from benchmarks/results.json.

`benchmarks/run.py` calls `update_readme` after every full run, so the table
always shows one run of one commit on one machine, never figures copied by
hand from several. A benchmark that did not run shows as "not run".
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

START = "<!-- bench-table:start -->"
END = "<!-- bench-table:end -->"
HEADER = "| figure | baseline, same script | result | goal |\n| --- | --- | --- | --- |"


def _met(ok: bool) -> str:
    return "met" if ok else "**missed**"


def _goal(text: str) -> str:
    """A goal as a script stores it ('>= 0.5', '< 50.0'), as the table prints it."""
    text = text.replace(">=", "≥").replace("<=", "≤")
    return text[:-2] if text.endswith(".0") else text


def _delivery(r: dict) -> list[tuple[str, str, str, str]]:
    product, floor = r["product"], r["floor"]
    rows = [
        (
            f"delivery end to end ({product['workers']} worker processes × "
            f"{product['threads_per_worker']} threads, {product['sends']:,} emails)",
            f"one smtplib connection to the same smtp-sink: {floor['sends_per_s']:,.0f}/s",
            f"{product['sends_per_s']:,.0f}/s; each run over the floor run before it: "
            f"{r['ratio']:.2f} (median)",
            f"≥ {r['ratio_goal']}: {_met(r['ratio_goal_met'])}",
        )
    ]
    if "product_one_at_a_time" in r:
        one = r["product_one_at_a_time"]
        rows.append(
            (
                f"the same, {one['workers']} prefork processes, one email at a time",
                "the floor",
                f"{one['sends_per_s']:,.0f}/s = {one['sends_per_s'] / floor['sends_per_s']:.2f}",
                "comparison",
            )
        )
    return rows


def _dispatch(r: dict) -> list[tuple[str, str, str, str]]:
    small, large = r["sizes"][0], r["sizes"][-1]
    return [
        (
            f"due-scan: one tick claims and queues {large['due']:,} due steps among "
            f"{large['n']:,} enrollments",
            f"the same among {small['n']:,}: {small['median_s']:.2f} s",
            f"{large['median_s']:.2f} s = {r['ratio_largest_vs_smallest']:.2f}",
            f"≤ {r['ratio_goal']}: {_met(r['ratio_goal_met'])}",
        )
    ]


def _claims(r: dict) -> list[tuple[str, str, str, str]]:
    if "claims" not in r:
        return []
    claims, product = r["claims"], r["product"]
    return [
        (
            f"claiming: the same tick among {claims['n']:,}, after each delivery run",
            f"the delivery run before each tick: {product['sends_per_s']:,.0f}/s",
            f"{claims['claims_per_s']:,.0f}/s; each tick over its run: "
            f"{r['claims_vs_delivery']:.1f}× (median)",
            f"≥ {r['claims_vs_delivery_goal']:.0f}×: {_met(r['claims_vs_delivery_goal_met'])}",
        )
    ]


def _memory(r: dict) -> list[tuple[str, str, str, str]]:
    if "memory" not in r:
        return []
    memory = r["memory"]
    return [
        (
            f"worker memory: RSS after {memory['total']:,} sends minus after {memory['first']:,}",
            "",
            f"{memory['growth_mb']:+.1f} MB",
            f"< {memory['goal_mb']} MB: {_met(memory['goal_met'])}",
        )
    ]


def _signup(r: dict) -> list[tuple[str, str, str, str]]:
    results, goals = r["results"], r["goals"]
    post, get = results["post"], results["get_index"]
    ratio, p99 = goals["ratio_post_over_get"], goals["p99_post_ms"]
    rows = [
        (
            "`POST /api/v1/subscribers` under gunicorn, 16 clients",
            f"`GET /` on the same server and client: {get['rps']:,.0f} rps",
            f"{post['rps']:,.0f} rps = {ratio['value']:.2f}; p99 {post['p99_ms']:.0f} ms",
            f"{_goal(ratio['goal'])}: {_met(ratio['met'])}; "
            f"p99 {_goal(p99['goal'])} ms: {_met(p99['met'])}",
        )
    ]
    if "post_database_write_only" in results:
        alone = results["post_database_write_only"]
        rows.append(
            (
                "the same POST, its database write alone (no rate limit, no publish)",
                "`GET /`, as above",
                f"{alone['rps']:,.0f} rps = "
                f"{results['ratio_rps_post_database_write_only_over_get_index']:.2f}",
                "what the goal leaves for the rest",
            )
        )
    healthz, solo = results["healthz"], results.get("healthz_solo_client")
    rows.append(
        (
            "`GET /healthz`",
            "",
            f"{healthz['rps']:,.0f} rps"
            + (f"; one client p99 {solo['p99_ms']:.1f} ms" if solo else ""),
            "cheap enough to poll every second",
        )
    )
    return rows


def _render(r: dict) -> list[tuple[str, str, str, str]]:
    rates, results = r["results"]["rate_per_core"], r["results"]
    return [
        (
            "rendering a course email per core (layout, inlining, text part)",
            f"a bare Jinja render of its body: {rates['bare']:,.0f}/s",
            f"{rates['filled_in']:,.0f}/s = {results['ratio_filled_in_over_bare']:.3f} "
            f"(rendered in full: {results['ratio_full_pipeline_over_bare']:.4f})",
            "report",
        )
    ]


#: The rows in the README's order, each with the script whose results it reads.
ROWS: list[tuple[str, Callable[[dict], list[tuple[str, str, str, str]]]]] = [
    ("bench_delivery", _delivery),
    ("bench_dispatch", _dispatch),
    ("bench_delivery", _claims),
    ("bench_signup", _signup),
    ("bench_render", _render),
    ("bench_delivery", _memory),
]


def _machine_line(results: dict) -> str:
    """Where and on what the run happened, from the first script's record."""
    first = next(iter(results.values()), None)
    if first is None:
        return "No benchmark has run yet."
    info = first.get("machine", {})
    code = info.get("code", {})
    commit = (code.get("commit") or "unknown")[:7]
    changed = " with uncommitted changes" if code.get("modified") else ""
    postgres = next(
        (
            r["machine"]["postgres"]
            for r in results.values()
            if r.get("machine", {}).get("postgres")
        ),
        None,
    )
    parts = [
        f"{info.get('nproc', '?')}-core {info.get('cpu_model') or 'machine'}",
        f"Python {info.get('python', '?')}",
    ]
    if postgres:
        parts.append(f"PostgreSQL {postgres.split()[0]}")
    when = max(str(r.get("finished_at") or r.get("when") or "") for r in results.values())
    return f"Last `make bench`: {when[:10]}, commit {commit}{changed}, on a {', '.join(parts)}."


def render(results: dict) -> str:
    """The table's Markdown: the machine line, then one row per figure."""
    lines = [_machine_line(results), "", HEADER]
    missing = set()
    for name, rows in ROWS:
        if name not in results:
            if name not in missing:
                lines.append(f"| `benchmarks/{name}.py` | | not run | |")
            missing.add(name)
            continue
        try:
            made = rows(results[name])
        except (KeyError, IndexError, TypeError, ValueError) as error:
            # A result written by another version of its script: say so, keep the rest.
            lines.append(f"| `benchmarks/{name}.py` | | result incomplete ({error!r}) | |")
            continue
        for row in made:
            lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def update_readme(readme: Path, results: dict) -> None:
    """Replace what lies between the README's table markers with the table of `results`."""
    text = readme.read_text()
    pattern = re.compile(re.escape(START) + r".*?" + re.escape(END), re.DOTALL)
    if not pattern.search(text):
        raise SystemExit(f"{readme}: no {START} ... {END} markers for the benchmark table")
    block = f"{START}\n{render(results)}\n{END}"
    readme.write_text(pattern.sub(lambda _: block, text, count=1))
