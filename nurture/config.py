"""Settings from the environment (and `.env`), exactly the table in the README.

Everything that varies between a laptop and production is read here once, into a
frozen `Settings`; the rest of the code takes a `Settings` and never reads
`os.environ` itself.
"""

from __future__ import annotations

import functools
import os
import re
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from email.headerregistry import Address
from email.utils import parseaddr
from pathlib import Path
from urllib.parse import urlsplit

from dotenv import dotenv_values

from nurture import ROOT


class ConfigError(Exception):
    """A setting is missing or malformed; the message names the variable."""


DEV_POSTAL_ADDRESS = "Course Team, 1 Example Street, Springfield (set POSTAL_ADDRESS)"


@dataclass(frozen=True)
class Settings:
    env: str
    instance_path: Path
    database_url: str
    broker_url: str
    smtp_url: str
    base_url: str
    secret_key: str
    mail_from: str
    postal_address: str
    course_url: str
    double_opt_in: bool
    day_seconds: int
    dispatch_interval: int
    templates_path: Path
    default_timezone: str = "UTC"
    min_gap_hours: float = 20.0
    confirm_max_age: int = 7 * 86400
    #: Seconds a signup that was never confirmed is kept; 0 keeps it for good.
    unconfirmed_retention: int = 30 * 86400
    #: Deliveries per task: one claim, one SMTP connection (docs/decisions.md).
    batch_size: int = 100
    outbox_path: Path = field(default=Path("instance/outbox"))
    lease_seconds: int = 600
    requeue_seconds: int | None = None
    retry_base_seconds: int = 60
    retry_horizon_hours: float = 72.0
    webhook_secret: str = ""
    unsubscribe_mailto: str = ""
    signup_rate_limit: str = "10 per minute;200 per day"
    trusted_proxies: int = 0
    queue: str = "nurture"
    track_opens: bool = True
    metrics_token: str = ""
    send_rate: int = 0
    send_rate_per_domain: dict = field(default_factory=dict)
    dkim_private_key: Path | None = None
    dkim_selector: str = ""

    @property
    def is_dev(self) -> bool:
        return self.env != "production"

    @property
    def embedded_broker(self) -> bool:
        return self.broker_url.startswith("sqla+")

    @property
    def day_scale(self) -> float:
        """How much one sequence day is shrunk (1.0 in real time)."""
        return self.day_seconds / 86400

    @functools.cached_property
    def min_gap(self) -> timedelta:
        """Smallest allowed time between two course emails to one subscriber.

        Kept once worked out: the due-scan asks for it twice per due enrollment.
        """
        return timedelta(seconds=self.min_gap_hours * 3600 * self.day_scale)

    @property
    def requeue_after(self) -> int:
        """Seconds after which a queued delivery is handed to the broker again.

        A message the broker lost (Redis flushed, a worker killed before it
        acknowledged) is found again by the dispatcher after this long.
        """
        return self.requeue_seconds or max(60, 5 * self.dispatch_interval)

    @property
    def rate_limit_storage(self) -> str:
        """Rate-limit counters live in Redis when there is one, so every web process shares them."""
        return self.broker_url if self.broker_url.startswith("redis") else "memory://"

    @functools.cached_property
    def mail_from_address(self) -> str:
        return parseaddr(self.mail_from)[1]

    @functools.cached_property
    def mail_domain(self) -> str:
        return self.mail_from_address.rpartition("@")[2] or "localhost"


def _flag(value: str, name: str) -> bool:
    if value.strip().lower() in ("1", "true", "yes", "on"):
        return True
    if value.strip().lower() in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"{name} must be 1 or 0, not {value!r}")


def _positive_int(value: str, name: str) -> int:
    try:
        number = int(value)
    except ValueError:
        raise ConfigError(f"{name} must be a whole number, not {value!r}") from None
    if number < 1:
        raise ConfigError(f"{name} must be at least 1, not {number}")
    return number


def _hours(value: str, name: str) -> float:
    try:
        hours = float(value)
    except ValueError:
        raise ConfigError(f"{name} must be a number of hours, not {value!r}") from None
    if hours < 0:
        raise ConfigError(f"{name} cannot be negative")
    return hours


def _count(value: str, name: str) -> int:
    if not value.isdigit():
        raise ConfigError(f"{name} must be a whole number, not {value!r}")
    return int(value)


#: A bare address that goes into <mailto:...?subject=unsubscribe> without escaping.
_MAILTO_ADDRESS = re.compile(r"[A-Za-z0-9._+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*")


def _mailto(value: str) -> str:
    if value and not _MAILTO_ADDRESS.fullmatch(value):
        raise ConfigError(
            f"UNSUBSCRIBE_MAILTO must be a bare address like unsubscribe@example.com, not {value!r}"
        )
    return value


def _rate_limit(value: str, name: str) -> str:
    from nurture.ratelimit import parse

    try:
        parse(value)
    except ValueError:
        raise ConfigError(
            f"{name} must be like '10 per minute;200 per day', not {value!r}"
        ) from None
    return value


def _timezone(value: str, name: str) -> str:
    """An IANA zone name; a mistyped one would otherwise be stored on every signup."""
    from nurture.subscribers import known_timezones

    if value not in known_timezones():
        raise ConfigError(f"{name} must be an IANA time zone like Europe/Paris, not {value!r}")
    return value


def _smtp_url(value: str) -> str:
    """SMTP_URL, checked now: a malformed one would fail every batch, not start-up."""
    from nurture.mailer import SMTPURLError, parse_smtp_url

    try:
        parse_smtp_url(value)
    except SMTPURLError as error:
        raise ConfigError(str(error)) from None
    return value


def _base_url(value: str) -> str:
    """BASE_URL, which every link in every email starts with: it needs its scheme."""
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ConfigError(
            f"BASE_URL must be the site's address with its scheme, like "
            f"https://courses.example.com, not {value!r}"
        )
    return value.rstrip("/")


def _templates(value: str) -> Path:
    path = Path(value)
    if not path.is_dir():
        raise ConfigError(f"NURTURE_TEMPLATES: there is no folder at {path}")
    return path


def _domain_rates(value: str) -> dict:
    from nurture.throttle import parse_domain_rates

    return parse_domain_rates(value)


def _dkim(key_path: str, selector: str) -> dict:
    """DKIM settings, checked now: a bad key stops start-up instead of every send."""
    if not key_path and not selector:
        return {}
    if not (key_path and selector):
        missing = "DKIM_SELECTOR" if key_path else "DKIM_PRIVATE_KEY"
        raise ConfigError(f"{missing} is required when the other DKIM setting is set")
    return {"dkim_private_key": Path(key_path), "dkim_selector": selector}


def _dev_secret_key(instance: Path) -> str:
    """A secret generated once per checkout, so dev sessions survive restarts."""
    path = instance / "secret_key"
    if not path.exists():
        instance.mkdir(parents=True, exist_ok=True)
        path.write_text(secrets.token_urlsafe(32))
        path.chmod(0o600)
    return path.read_text().strip()


def _check_mail_from(value: str) -> str:
    name, address = parseaddr(value)
    if "@" not in address or any(c in value for c in "\r\n"):
        raise ConfigError(f"MAIL_FROM must look like 'Name <address>', not {value!r}")
    Address(display_name=name, addr_spec=address)  # raises on a malformed address
    return value


#: Settings with a development default that production must set itself.
PRODUCTION_REQUIRED = (
    "SECRET_KEY",
    "POSTAL_ADDRESS",
    "BASE_URL",
    "DATABASE_URL",
    "BROKER_URL",
    "SMTP_URL",
)


def load_settings(environ: Mapping[str, str] | None = None, root: Path = ROOT) -> Settings:
    """Read settings from `environ`, or from the process environment over `.env`.

    Outside development (`NURTURE_ENV=production`) each of `PRODUCTION_REQUIRED`
    missing is a `ConfigError` naming the variable: a production server must
    never sign tokens with a guessable key, mail without a postal address, put
    links to 127.0.0.1 in emails, or fall back to a SQLite file, broker and
    mail catcher of its own machine (with one web and one worker host, each
    would have its own database).
    """
    values: dict[str, str] = {}
    if environ is None:  # an explicit mapping (tests) is the whole truth
        values = {k: v for k, v in dotenv_values(root / ".env").items() if v is not None}
    values.update(os.environ if environ is None else environ)

    def get(name: str, default: str = "") -> str:
        return values.get(name, "").strip() or default

    env = get("NURTURE_ENV", "development")
    if env not in ("development", "production"):
        raise ConfigError(f"NURTURE_ENV must be 'development' or 'production', not {env!r}")
    instance = Path(get("NURTURE_INSTANCE", str(root / "instance")))
    production = env == "production"

    for required in PRODUCTION_REQUIRED:
        if production and not get(required):
            raise ConfigError(f"{required} is required when NURTURE_ENV=production")

    day_seconds = _positive_int(get("NURTURE_DAY_SECONDS", "86400"), "NURTURE_DAY_SECONDS")
    requeue = get("REQUEUE_AFTER_SECONDS")

    settings = Settings(
        env=env,
        instance_path=instance,
        database_url=get("DATABASE_URL", f"sqlite:///{instance / 'nurture.db'}"),
        broker_url=get("BROKER_URL", f"sqla+sqlite:///{instance / 'broker.db'}"),
        smtp_url=_smtp_url(get("SMTP_URL", "smtp://127.0.0.1:1025")),
        base_url=_base_url(get("BASE_URL", "http://127.0.0.1:5000")),
        secret_key=get("SECRET_KEY") or _dev_secret_key(instance),
        mail_from=_check_mail_from(get("MAIL_FROM", "Course Team <course@localhost>")),
        postal_address=get("POSTAL_ADDRESS", DEV_POSTAL_ADDRESS),
        course_url=get("COURSE_URL", "https://example.com/six-month-course"),
        double_opt_in=_flag(get("DOUBLE_OPT_IN", "1"), "DOUBLE_OPT_IN"),
        day_seconds=day_seconds,
        dispatch_interval=_positive_int(
            get("DISPATCH_INTERVAL_SECONDS", "60"), "DISPATCH_INTERVAL_SECONDS"
        ),
        templates_path=_templates(get("NURTURE_TEMPLATES", str(root / "templates" / "emails"))),
        default_timezone=_timezone(get("DEFAULT_TIMEZONE", "UTC"), "DEFAULT_TIMEZONE"),
        min_gap_hours=_hours(get("MIN_GAP_HOURS", "20"), "MIN_GAP_HOURS"),
        outbox_path=instance / "outbox",
        lease_seconds=_positive_int(get("DELIVERY_LEASE_SECONDS", "600"), "DELIVERY_LEASE_SECONDS"),
        requeue_seconds=_positive_int(requeue, "REQUEUE_AFTER_SECONDS") if requeue else None,
        retry_base_seconds=_positive_int(get("RETRY_BASE_SECONDS", "60"), "RETRY_BASE_SECONDS"),
        retry_horizon_hours=_hours(get("RETRY_HORIZON_HOURS", "72"), "RETRY_HORIZON_HOURS"),
        webhook_secret=get("WEBHOOK_SECRET"),
        confirm_max_age=_positive_int(get("CONFIRM_MAX_AGE_DAYS", "7"), "CONFIRM_MAX_AGE_DAYS")
        * 86400,
        unconfirmed_retention=_count(
            get("UNCONFIRMED_RETENTION_DAYS", "30"), "UNCONFIRMED_RETENTION_DAYS"
        )
        * 86400,
        unsubscribe_mailto=_mailto(get("UNSUBSCRIBE_MAILTO")),
        signup_rate_limit=_rate_limit(
            get("SIGNUP_RATE_LIMIT", "10 per minute;200 per day"), "SIGNUP_RATE_LIMIT"
        ),
        trusted_proxies=_count(get("TRUSTED_PROXIES", "0"), "TRUSTED_PROXIES"),
        queue=get("NURTURE_QUEUE", "nurture"),
        track_opens=_flag(get("TRACK_OPENS", "1"), "TRACK_OPENS"),
        metrics_token=get("METRICS_TOKEN"),
        send_rate=_count(get("SEND_RATE_PER_SECOND", "0"), "SEND_RATE_PER_SECOND"),
        send_rate_per_domain=_domain_rates(get("SEND_RATE_PER_DOMAIN")),
        **_dkim(get("DKIM_PRIVATE_KEY"), get("DKIM_SELECTOR")),
    )
    if 0 < settings.unconfirmed_retention < settings.confirm_max_age:
        raise ConfigError(
            "UNCONFIRMED_RETENTION_DAYS must be 0 (keep them) or at least CONFIRM_MAX_AGE_DAYS: "
            "a confirmation link must not outlive the signup it confirms"
        )
    if settings.dkim_private_key:
        from nurture.dkim import DKIMError, dkim_signer

        try:
            dkim_signer(settings)
        except DKIMError as error:
            raise ConfigError(str(error)) from None
    return settings


def startup_settings(exit_code: int = 1) -> Settings:
    """Settings for a process that is starting; a bad setting stops it with one line.

    It exits with `exit_code`: `web.py` gives gunicorn's "worker failed to
    boot" (3), on which gunicorn stops, rather than restarting the worker with
    the same setting for ever while it keeps the port open and answers nothing.
    """
    try:
        return load_settings()
    except ConfigError as error:
        import sys

        print(f"nurture: configuration error: {error}", file=sys.stderr)
        raise SystemExit(exit_code) from None
