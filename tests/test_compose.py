"""docker-compose.yml is for users (no Docker engine here): parse it and hold it to the README."""

from __future__ import annotations

import re

import yaml

from nurture import ROOT
from nurture.config import PRODUCTION_REQUIRED


def compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def readme_processes() -> dict[str, str]:
    """The process table in the README: name → documented command."""
    readme = (ROOT / "README.md").read_text()
    table = readme.split("## Processes", 1)[1].split("\n\n", 2)[1]
    rows = re.findall(r"^\| (\w[\w -]*?) \| `([^`]+)`", table, re.MULTILINE)
    return dict(rows)


def test_compose_has_every_service():
    services = compose()["services"]
    for name in ("postgres", "redis", "web", "worker", "beat", "mailcatcher"):
        assert name in services, f"{name} missing from docker-compose.yml"


def test_service_commands_match_the_readme():
    documented = readme_processes()
    assert documented == {
        "web": "gunicorn web:app",
        "worker": "celery -A worker worker",
        "beat": "celery -A worker beat",
        "all-in-one for development": "nurture dev",
    }
    services = compose()["services"]
    for name in ("web", "worker", "beat"):
        assert services[name]["command"].startswith(documented[name])


def test_app_services_share_the_production_settings():
    services = compose()["services"]
    for name in ("web", "worker", "beat", "migrate"):
        environment = services[name]["environment"]
        assert environment["NURTURE_ENV"] == "production"
        assert environment["DATABASE_URL"].startswith("postgresql://")
        assert environment["BROKER_URL"].startswith("redis://redis:")
        assert set(PRODUCTION_REQUIRED) <= set(environment)
    assert services["migrate"]["command"] == "nurture db upgrade"
    assert services["web"]["depends_on"]["migrate"]["condition"] == (
        "service_completed_successfully"
    )


def test_the_image_leaves_out_local_secrets_and_state():
    """A developer's `.env` (passwords, demo settings such as 2-second days) never goes
    into the image, where the service would read it for any setting compose leaves out."""
    ignored = set((ROOT / ".dockerignore").read_text(encoding="utf-8").split())
    assert {".env", "instance", ".venv", ".git"} <= ignored


def test_postgres_counts_as_healthy_only_once_it_takes_tcp_connections():
    test = compose()["services"]["postgres"]["healthcheck"]["test"]
    assert test[:2] == ["CMD", "pg_isready"]
    assert test[test.index("-h") + 1] == "127.0.0.1"
