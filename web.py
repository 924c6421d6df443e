"""WSGI entry point: `gunicorn web:app` or `flask --app web run`."""

from nurture.app import create_app
from nurture.config import startup_settings

app = create_app(startup_settings())
