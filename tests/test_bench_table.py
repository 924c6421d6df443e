"""The README's benchmark table is written from benchmarks/results.json, never by hand."""

import copy
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RESULTS = json.loads((ROOT / "benchmarks" / "results.json").read_text())


def _load_table():
    spec = importlib.util.spec_from_file_location("bench_table", ROOT / "benchmarks" / "table.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


table = _load_table()


def test_the_readme_shows_the_table_of_the_committed_results():
    readme = (ROOT / "README.md").read_text()
    assert readme.count(table.START) == 1 and readme.count(table.END) == 1
    between = readme.split(table.START)[1].split(table.END)[0]
    assert between.strip() == table.render(RESULTS)


def test_every_figure_of_a_full_run_has_its_row():
    rendered = table.render(RESULTS)
    for figure in (
        "delivery end to end",
        "due-scan: one tick claims and queues",
        "claiming: the same tick",
        "`POST /api/v1/subscribers`",
        "`GET /healthz`",
        "rendering a course email",
        "worker memory",
    ):
        assert figure in rendered
    assert "not run" not in rendered
    commit = RESULTS["bench_delivery"]["machine"]["code"]["commit"][:7]
    assert f"commit {commit}" in rendered.splitlines()[0]


def test_a_goal_missed_is_marked_and_a_script_that_failed_shows_as_not_run():
    results = copy.deepcopy(RESULTS)
    results["bench_delivery"]["ratio_goal_met"] = False
    del results["bench_signup"]
    rendered = table.render(results)
    delivery_row = next(line for line in rendered.splitlines() if "delivery end to end" in line)
    assert delivery_row.endswith("**missed** |")
    assert "| `benchmarks/bench_signup.py` | | not run | |" in rendered
    assert "`GET /healthz`" not in rendered


def test_a_result_missing_a_figure_is_named_and_the_other_rows_stay():
    results = copy.deepcopy(RESULTS)
    del results["bench_signup"]["results"]["healthz"]
    rendered = table.render(results)
    assert "| `benchmarks/bench_signup.py` | | result incomplete (KeyError('healthz')) | |" in (
        rendered
    )
    assert "`POST /api/v1/subscribers`" not in rendered
    assert "delivery end to end" in rendered and "rendering a course email" in rendered


def test_update_replaces_only_the_marked_block_and_twice_is_once(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(f"# Title\n\nBefore.\n\n{table.START}\nold table\n{table.END}\n\nAfter.\n")
    table.update_readme(readme, RESULTS)
    once = readme.read_text()
    assert "old table" not in once
    assert once.startswith("# Title\n\nBefore.\n\n") and once.endswith("\n\nAfter.\n")
    assert table.render(RESULTS) in once
    table.update_readme(readme, RESULTS)
    assert readme.read_text() == once


def test_a_readme_without_markers_is_an_error_and_is_left_as_it_was(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("# Title\n")
    with pytest.raises(SystemExit, match="markers"):
        table.update_readme(readme, RESULTS)
    assert readme.read_text() == "# Title\n"


def test_the_render_benchmark_runs_on_the_course_as_it_is(tmp_path):
    """The render benchmark reads the course's own files, which marketers change
    (a body that calls `button()` once broke its bare-Jinja baseline): its quick
    mode must still run through every step and write its figures."""
    output = tmp_path / "bench_render.json"
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench_render.py"), "--quick"]
        + ["--output", str(output)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    figures = json.loads(output.read_text())
    assert figures["benchmark"] == "bench_render"
