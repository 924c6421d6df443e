"""`nurture dev` (what `make run` starts), black-box: no PostgreSQL, Redis or SMTP server.

With NURTURE_DAY_SECONDS=2 and DISPATCH_INTERVAL_SECONDS=1, a confirmed
subscriber receives the whole course in well under a minute, in order.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from email import message_from_bytes, policy
from pathlib import Path

from conftest import free_port

from nurture import ROOT


def _get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()
    except OSError:  # not listening yet
        return 0, b""


def _wait(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def _outbox(path: Path):
    return [
        message_from_bytes(p.read_bytes(), policy=policy.default)
        for p in sorted(path.glob("*.eml"))
    ]


def test_dev_runs_the_whole_course_in_seconds(tmp_path):
    web_port, smtp_port = free_port(), free_port()
    base = f"http://127.0.0.1:{web_port}"
    instance = tmp_path / "instance"
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("DATABASE_URL", "BROKER_URL", "SMTP_URL") and not k.startswith("NURTURE_")
    }
    env.update(
        NURTURE_INSTANCE=str(instance),
        BASE_URL=base,
        SMTP_URL=f"smtp://127.0.0.1:{smtp_port}",
        NURTURE_DAY_SECONDS="2",
        DISPATCH_INTERVAL_SECONDS="1",
        PYTHONUNBUFFERED="1",
    )
    log = (tmp_path / "dev.log").open("wb")
    dev = subprocess.Popen(
        [sys.executable, "-m", "nurture", "dev"],
        cwd=ROOT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    output = tmp_path / "dev.log"
    try:
        _wait(lambda: _get(f"{base}/healthz")[0] == 200, 60, "/healthz")
        status, body = _get(f"{base}/healthz")
        assert json.loads(body) == {
            "status": "ok",
            "database": "ok",
            "broker": "ok",
            "templates": "ok",
        }
        printed = output.read_text()
        assert f"nurture is running at {base}" in printed
        assert re.search(r"admin@example\.com / \S+", printed), "the admin login is printed"

        request = urllib.request.Request(
            f"{base}/api/v1/subscribers",
            data=json.dumps({"email": "sam@example.com", "first_name": "Sam"}).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=5) as response:
            assert response.status == 202

        outbox = instance / "outbox"
        (confirmation,) = _wait(lambda: _outbox(outbox), 20, "the confirmation email")
        assert confirmation["X-Nurture-Step"] == "confirmation"
        text = confirmation.get_body(preferencelist=("plain",)).get_content()
        confirm_url = re.search(rf"{re.escape(base)}/confirm/\S+", text).group(0)
        started = time.monotonic()
        status, page = _get(confirm_url)
        assert status == 200, page.decode()[:2000]

        messages = _wait(lambda: (m := _outbox(outbox)) and len(m) >= 8 and m, 60, "the course")
        elapsed = time.monotonic() - started
        assert elapsed < 60
        steps = [m["X-Nurture-Step"] for m in messages[1:]]
        assert steps == [
            "product-vs-project/welcome",
            "product-vs-project/product-manager",
            "product-vs-project/project-manager",
            "product-vs-project/overlap",
            "product-vs-project/which-fits",
            "product-vs-project/six-month-course",
            "product-vs-project/last-reminder",
        ]
        time.sleep(3)  # a few more ticks: nothing is sent twice
        assert len(_outbox(outbox)) == 8
    finally:
        dev.send_signal(signal.SIGINT)
        try:
            code = dev.wait(timeout=20)
        finally:
            if dev.poll() is None:
                os.killpg(dev.pid, signal.SIGKILL)
            log.close()
    assert code == 0, output.read_text()[-3000:]
    assert _port_closed(web_port) and _port_closed(smtp_port), "Ctrl-C stops every part"


def _port_closed(port: int) -> bool:
    import socket

    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return False
    except OSError:
        return True
