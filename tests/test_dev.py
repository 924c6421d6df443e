"""`nurture dev` (what `make run` starts), black-box: no PostgreSQL, Redis or SMTP server.

With NURTURE_DAY_SECONDS=2 and DISPATCH_INTERVAL_SECONDS=1, a confirmed
subscriber receives the whole course in well under a minute, in order.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from email import message_from_bytes, policy
from pathlib import Path

import pytest
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


def _wait(predicate, timeout: float, what: str, interval: float = 0.2):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out waiting for {what}")


def _outbox(path: Path):
    return [
        message_from_bytes(p.read_bytes(), policy=policy.default)
        for p in sorted(path.glob("*.eml"))
    ]


def _dev_env(instance: Path, base: str, smtp_port: int) -> dict[str, str]:
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
    return env


def _start_dev(env: dict[str, str], log) -> subprocess.Popen:
    """`nurture dev` in a session of its own, as a terminal would start it."""
    return subprocess.Popen(
        [sys.executable, "-m", "nurture", "dev"],
        cwd=ROOT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def test_dev_runs_the_whole_course_in_seconds(tmp_path):
    web_port, smtp_port = free_port(), free_port()
    base = f"http://127.0.0.1:{web_port}"
    instance = tmp_path / "instance"
    env = _dev_env(instance, base, smtp_port)
    log = (tmp_path / "dev.log").open("wb")
    dev = _start_dev(env, log)
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
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return False
    except OSError:
        return True


needs_proc = pytest.mark.skipif(
    not Path("/proc/self/environ").exists(), reason="finds processes through /proc"
)


def _started_by(instance: Path) -> dict[int, str]:
    """Every live process whose environment names `instance`, with its command line.

    That is `nurture dev` and everything it started, found by environment rather
    than by parent, since a child whose parent died is adopted by another. A process
    that has exited but is not yet reaped shows an empty environment, so is not counted.
    """
    marker = f"NURTURE_INSTANCE={instance}".encode()
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if marker in (entry / "environ").read_bytes().split(b"\0"):
                command = (entry / "cmdline").read_bytes().replace(b"\0", b" ")
                found[int(entry.name)] = command.decode(errors="replace").strip()
        except OSError:  # gone meanwhile, or another user's
            continue
    return found


def _children_of(dev: subprocess.Popen, instance: Path) -> dict[int, str]:
    return {pid: command for pid, command in _started_by(instance).items() if pid != dev.pid}


def _assert_none_left(instance: Path) -> None:
    """Wait a while for what `nurture dev` started to exit; fail naming what did not."""
    deadline = time.monotonic() + 15
    while (left := _started_by(instance)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not left, f"still running: {left}"


@contextlib.contextmanager
def _dev(tmp_path: Path, web_port: int | None = None):
    """A running `nurture dev` of its own instance: (process, instance, log path).

    Whatever it started that is still running afterwards is killed, so a failing
    test leaves nothing behind.
    """
    instance, output = tmp_path / "instance", tmp_path / "dev.log"
    base = f"http://127.0.0.1:{web_port or free_port()}"
    with output.open("wb") as log:
        dev = _start_dev(_dev_env(instance, base, free_port()), log)
        try:
            yield dev, instance, output
        finally:
            for pid in _started_by(instance):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            dev.wait()


def _wait_until_started(dev: subprocess.Popen, instance: Path, output: Path) -> None:
    _wait(lambda: "nurture is running at" in output.read_text(), 60, "nurture dev to start")
    children = _children_of(dev, instance)
    assert len(children) == 3, children


@needs_proc
def test_a_closed_terminal_stops_every_child(tmp_path):
    with _dev(tmp_path) as (dev, instance, output):
        _wait_until_started(dev, instance, output)
        os.killpg(dev.pid, signal.SIGHUP)  # the terminal closed, or the SSH session dropped
        dev.wait(timeout=20)
        _assert_none_left(instance)


@pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="children outlive a killed parent elsewhere"
)
def test_children_die_with_a_killed_parent(tmp_path):
    with _dev(tmp_path) as (dev, instance, output):
        _wait_until_started(dev, instance, output)
        dev.kill()  # kill -9 of nurture dev alone: no handler runs
        dev.wait(timeout=20)
        _assert_none_left(instance)


@needs_proc
def test_a_signal_while_starting_leaves_no_child(tmp_path):
    with _dev(tmp_path) as (dev, instance, _output):
        _wait(lambda: _children_of(dev, instance), 60, "the first child", interval=0.001)
        dev.send_signal(signal.SIGTERM)
        code = dev.wait(timeout=20)
        _assert_none_left(instance)
        assert code == 0, "stopped as asked"


@needs_proc
def test_a_taken_web_port_is_named(tmp_path):
    with socket.create_server(("127.0.0.1", 0)) as leftover:
        port = leftover.getsockname()[1]
        with _dev(tmp_path, port) as (dev, instance, output):
            assert dev.wait(timeout=60) == 1
            printed = output.read_text()
            line = f"nurture dev: port {port} is in use (another nurture dev still running?)"
            assert line in printed.splitlines(), printed[-3000:]
            _assert_none_left(instance)
