"""`nurture dev`: the whole service on one laptop, in one command.

Migrates, makes an admin account the first time, starts the mail catcher in
this process and web, worker and beat as child processes, prints where to
look, and stops everything together on Ctrl-C or when any part dies.
"""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import time
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


def _children(settings: Settings) -> dict[str, list[str]]:
    address = urlsplit(settings.base_url)
    python = sys.executable
    return {
        "web": [
            python, "-m", "flask", "--app", "web", "run",
            "--host", address.hostname or "127.0.0.1", "--port", str(address.port or 5000),
        ],
        "worker": [
            python, "-m", "celery", "-A", "worker", "worker",
            "--pool", "threads", "--concurrency", "2", "--loglevel", "INFO",
        ],
        "beat": [python, "-m", "celery", "-A", "worker", "beat", "--loglevel", "INFO"],
    }  # fmt: skip


def run(settings: Settings) -> int:
    migrate.upgrade(settings.database_url)
    login = ensure_dev_admin(settings)
    if settings.embedded_broker:
        prepare_broker(make_celery(settings))

    catcher = None
    smtp = parse_smtp_url(settings.smtp_url)
    if smtp.host in ("127.0.0.1", "localhost") and not smtp.username:
        catcher = start_catcher(settings.outbox_path, smtp.host, smtp.port)

    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    processes = {
        name: subprocess.Popen(command, cwd=ROOT, env=env, start_new_session=True)
        for name, command in _children(settings).items()
    }
    print(
        f"\n  nurture is running at {settings.base_url}\n"
        f"  admin:  {settings.base_url}/admin  ({login or 'use `nurture users add EMAIL`'})\n"
        f"  outbox: {settings.base_url}/admin/outbox"
        + ("" if catcher else f"  (mail goes to {settings.smtp_url})")
        + "\n  Ctrl-C stops everything.\n",
        flush=True,
    )

    stopping = False

    def stop(_signum, _frame):
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    exit_code = 0
    try:
        while not stopping:
            for name, process in processes.items():
                if process.poll() is not None:
                    print(f"nurture dev: {name} exited with {process.returncode}", flush=True)
                    exit_code = 1
                    stopping = True
            time.sleep(0.3)
    finally:
        for process in processes.values():
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
        deadline = time.monotonic() + 10
        for process in processes.values():
            try:
                process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
        if catcher:
            catcher.stop()
    return exit_code
