"""Run every benchmark and gather their results into benchmarks/results.json.

Each bench_*.py measures one figure as a ratio against a baseline run in the
same script, and writes benchmarks/results/<name>.json; this collects them.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ORDER = ["bench_render", "bench_signup", "bench_delivery", "bench_dispatch"]


def main() -> int:
    failed = []
    for name in ORDER:
        print(f"== {name}", flush=True)
        if subprocess.run([sys.executable, str(HERE / f"{name}.py")], cwd=HERE.parent).returncode:
            failed.append(name)
    results = {}
    for path in sorted((HERE / "results").glob("*.json")):
        results[path.stem] = json.loads(path.read_text())
    (HERE / "results.json").write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")
    print(f"wrote {HERE / 'results.json'}")
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
