"""Celery entry point: `celery -A worker worker` and `celery -A worker beat`."""

from nurture.config import startup_settings
from nurture.tasks import make_celery

app = make_celery(startup_settings())
