"""`nurture dev`: the whole service on one laptop, in one command.

Migrates, makes an admin account the first time, starts the mail catcher in
this process and web, worker and beat as child processes, prints where to
look, and stops everything together on Ctrl-C, when its terminal closes or
when any part dies. On Linux the children also end if this process is killed
outright (see docs/decisions.md).
"""

from __future__ import annotations

import ctypes
import errno
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from urllib.parse import urlsplit

from sqlalchemy import func, select

from nurture import ROOT, migrate
from nurture.catcher import start_catcher
from nurture.config import Settings
from nurture.db import session_scope
from nurture.mailer import parse_smtp_url
from nurture.models import User
from nurture.tasks import make_celery, prepare_broker
from nurture.users import add_user

DEV_ADMIN = "admin@example.com"

#: What stops `nurture dev`: Ctrl-C, a plain `kill`, and a closed terminal or
#: dropped SSH session (SIGHUP, which would otherwise end this process alone).
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)

#: prctl's option to have a signal sent when the parent dies (linux/prctl.h).
PR_SET_PDEATHSIG = 1


def ensure_dev_admin(settings: Settings) -> str | None:
    """Create the dev admin on first run; return its login line if we know it."""
    password_file = settings.instance_path / "dev-admin-password"
    with session_scope(settings.database_url) as session:
        has_users = session.scalar(select(func.count()).select_from(User)) > 0
        if not has_users:
            password = secrets.token_urlsafe(12)
            add_user(session, DEV_ADMIN, password)
            password_file.write_text(password)
            password_file.chmod(0o600)
    if password_file.exists():
        return f"{DEV_ADMIN} / {password_file.read_text().strip()}"
    return None


def _web_address(settings: Settings) -> tuple[str, int]:
    address = urlsplit(settings.base_url)
    return address.hostname or "127.0.0.1", address.port or 5000


def _children(settings: Settings) -> dict[str, list[str]]:
    host, port = _web_address(settings)
    python = sys.executable
    return {
        "web": [
            python, "-m", "flask", "--app", "web", "run", "--host", host, "--port", str(port),
        ],
        "worker": [
            python, "-m", "celery", "-A", "worker", "worker",
            "--pool", "threads", "--concurrency", "2", "--loglevel", "INFO",
        ],
        "beat": [python, "-m", "celery", "-A", "worker", "beat", "--loglevel", "INFO"],
    }  # fmt: skip


def _port_in_use(host: str, port: int) -> bool:
    """Whether something already listens on host:port.

    Asked before anything starts, so that a server left behind (most often by
    another `nurture dev`) is named in one line rather than by the web child's
    own complaint among the worker's banner. The trial bind picks the address
    family and reuses addresses as Flask's server does, so it meets the same
    listener, and connections still closing do not count.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        with socket.create_server((host, port), family=family):
            return False
    except OSError as error:  # any other failure is left for the server to report
        return error.errno == errno.EADDRINUSE


def _die_with_this_process() -> Callable[[], None] | None:
    """A `preexec_fn` after which the child gets SIGTERM when this process dies, even by kill -9.

    No handler runs on kill -9 or an out-of-memory kill, and the children, in
    sessions of their own, would go on sending email with nobody to stop them.
    Linux's prctl(PR_SET_PDEATHSIG) outlasts exec. It fires when the thread
    that forked the child ends, so children are started from the main thread.
    prctl is looked up here, before any fork: the child then only calls it and
    reads its parent's id, needing no lock the catcher's thread might hold.
    Elsewhere (macOS) there is no such call: None, and only the signal handlers
    stop the children.
    """
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl = ctypes.CDLL(None).prctl
    except (OSError, AttributeError):  # no C library to call into
        return None
    prctl.argtypes = (ctypes.c_int,) + (ctypes.c_ulong,) * 4
    parent = os.getpid()

    def die_with_parent() -> None:
        prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
        if os.getppid() != parent:  # it died before the call: no signal would come
            raise ChildProcessError("nurture dev exited while starting this process")

    return die_with_parent


def _stop_all(processes: dict[str, subprocess.Popen]) -> None:
    """Ask every child's process group to stop; kill what has not after 10 seconds."""
    for process in processes.values():
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
    deadline = time.monotonic() + 10
    for process in processes.values():
        try:
            process.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)


def _busy_port(addresses: list[tuple[str, int]]) -> int | None:
    """The first of the ports `nurture dev` is to listen on that something else holds."""
    return next((port for host, port in addresses if _port_in_use(host, port)), None)


def _banner(settings: Settings, login: str | None, catching: bool) -> str:
    return (
        f"\n  nurture is running at {settings.base_url}\n"
        f"  admin:  {settings.base_url}/admin  ({login or 'use `nurture users add EMAIL`'})\n"
        f"  outbox: {settings.base_url}/admin/outbox"
        + ("" if catching else f"  (mail goes to {settings.smtp_url})")
        + "\n  Ctrl-C stops everything.\n"
    )


def run(settings: Settings) -> int:
    smtp = parse_smtp_url(settings.smtp_url)
    catch_mail = smtp.host in ("127.0.0.1", "localhost") and not smtp.username
    listens = [_web_address(settings)] + ([(smtp.host, smtp.port)] if catch_mail else [])
    if (port := _busy_port(listens)) is not None:
        print(
            f"nurture dev: port {port} is in use (another nurture dev still running?)",
            file=sys.stderr,
            flush=True,
        )
        return 1
    migrate.upgrade(settings.database_url)
    login = ensure_dev_admin(settings)
    if settings.embedded_broker:
        prepare_broker(make_celery(settings))

    stopping = False

    def stop(_signum, _frame):
        nonlocal stopping
        stopping = True

    # From here a stop signal only sets the flag, so none can land between starting
    # a child and noting it, and the finally below stops whatever was started.
    # Installed no earlier, so that Ctrl-C still cuts short a migration that hangs.
    for signum in STOP_SIGNALS:
        signal.signal(signum, stop)
    catcher = None
    processes: dict[str, subprocess.Popen] = {}
    exit_code = 0
    try:
        if catch_mail:
            catcher = start_catcher(settings.outbox_path, smtp.host, smtp.port)
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        die_with_parent = _die_with_this_process()
        for name, command in _children(settings).items():
            if stopping:
                break
            processes[name] = subprocess.Popen(
                command, cwd=ROOT, env=env, start_new_session=True, preexec_fn=die_with_parent
            )
        if not stopping:
            print(_banner(settings, login, catcher is not None), flush=True)
        while not stopping:
            for name, process in processes.items():
                if process.poll() is not None:
                    print(f"nurture dev: {name} exited with {process.returncode}", flush=True)
                    exit_code = 1
                    stopping = True
            time.sleep(0.3)
    finally:
        _stop_all(processes)
        if catcher:
            catcher.stop()
    return exit_code
