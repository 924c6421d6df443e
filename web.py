"""WSGI entry point: `gunicorn web:app` or `flask --app web run`."""

from nurture.app import create_app
from nurture.config import startup_settings

#: gunicorn's exit code for a worker that cannot boot: the whole server stops on it.
WORKER_BOOT_ERROR = 3

app = create_app(startup_settings(exit_code=WORKER_BOOT_ERROR))
