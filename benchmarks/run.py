"""Run every benchmark and gather their results into benchmarks/results.json.

Each bench_*.py measures one figure as a ratio against a baseline run in the
same script, and writes benchmarks/results/<name>.json; this collects them and
rewrites the README's table (`table.py`) from them. A script's old result is
removed before it runs, so a script that fails shows as "not run" rather than
as figures from an earlier run.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

import table  # noqa: E402

ORDER = ["bench_render", "bench_signup", "bench_delivery", "bench_dispatch"]


def main() -> int:
    failed = []
    for name in ORDER:
        print(f"== {name}", flush=True)
        (HERE / "results" / f"{name}.json").unlink(missing_ok=True)
        if subprocess.run([sys.executable, str(HERE / f"{name}.py")], cwd=HERE.parent).returncode:
            failed.append(name)
    results = {}
    for path in sorted((HERE / "results").glob("*.json")):
        results[path.stem] = json.loads(path.read_text())
    (HERE / "results.json").write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")
    print(f"wrote {HERE / 'results.json'}")
    table.update_readme(HERE.parent / "README.md", results)
    print(f"wrote the table in {HERE.parent / 'README.md'}")
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
