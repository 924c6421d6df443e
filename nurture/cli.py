"""The `nurture` command."""

from __future__ import annotations

import sys
from datetime import UTC, datetime, timedelta

import click

from nurture.config import Settings, startup_settings


def _settings() -> Settings:
    return startup_settings()


def _one_line(error: Exception) -> str:
    """An operator's one line for an error of the database, a migration or the system."""
    from sqlalchemy.exc import DBAPIError

    if isinstance(error, DBAPIError):
        first = str(error.orig or error).strip().splitlines()[0]
        return f"the database cannot be used: {first}"
    return str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__


class _Commands(click.Group):
    """Every command's database, migration and system errors as one line, not a traceback."""

    def invoke(self, ctx: click.Context):
        from alembic.util import CommandError
        from sqlalchemy.exc import DBAPIError

        try:
            return super().invoke(ctx)
        except (DBAPIError, CommandError, OSError) as error:
            raise click.ClickException(_one_line(error)) from None


@click.group(cls=_Commands)
def main() -> None:
    """nurture: email courses and lead nurture."""


@main.group()
def db() -> None:
    """Database schema migrations."""


@db.command("upgrade")
@click.argument("revision", default="head")
def db_upgrade(revision: str) -> None:
    """Migrate the database to the newest schema (or REVISION)."""
    from nurture import migrate

    database_url = _settings().database_url
    migrate.upgrade(database_url, revision)
    click.echo(f"database at revision {migrate.current(database_url)}")


@db.command("downgrade")
@click.argument("revision")
@click.option("--yes", is_flag=True, help="Do not ask before dropping data.")
def db_downgrade(revision: str, yes: bool) -> None:
    """Migrate the database back to REVISION ("base" for an empty one).

    Says what each revision undone drops for good, and asks first (unless --yes).
    """
    from nurture import migrate

    database_url = _settings().database_url
    lost = migrate.data_lost(database_url, revision)
    for undone, what in lost:
        click.echo(f"undoing {undone} drops {what}", err=True)
    if lost and not yes:
        click.confirm(
            "Downgrade and lose that data? Upgrading again does not bring it back", abort=True
        )
    migrate.downgrade(database_url, revision)
    click.echo(f"database at revision {migrate.current(database_url)}")


@db.command("revision")
@click.option("-m", "--message", required=True)
def db_revision(message: str) -> None:
    """Write a new migration from the models (for developers)."""
    from nurture import migrate

    migrate.revision(_settings().database_url, message)


@main.command()
def dev() -> None:
    """Run web, worker, beat and a mail catcher together (Ctrl-C stops all)."""
    from nurture.dev import run

    sys.exit(run(_settings()))


@main.command()
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=1025, show_default=True, type=click.IntRange(1, 65535))
def catcher(host: str, port: int) -> None:
    """Run only the mail catcher (its messages show at /admin/outbox)."""
    import signal

    from nurture.catcher import start_catcher

    settings = _settings()
    stopping = {signal.SIGINT, signal.SIGTERM}
    # Blocked before the server's thread starts, so that it inherits the mask and only
    # `sigwait` takes them: as PID 1 in a container a signal without a handler would be
    # dropped, and `docker compose stop` would wait for its kill.
    signal.pthread_sigmask(signal.SIG_BLOCK, stopping)
    controller = start_catcher(settings.outbox_path, host, port)
    click.echo(f"catching mail on {host}:{port} into {settings.outbox_path}")
    try:
        signal.sigwait(stopping)
    finally:
        controller.stop()


@main.group()
def users() -> None:
    """Admin accounts."""


@users.command("add")
@click.argument("email")
@click.option("--password-stdin", is_flag=True, help="Read the password from standard input.")
@click.option(
    "--role",
    type=click.Choice(["admin", "editor", "viewer"]),
    default="admin",
    show_default=True,
    help="admin manages users and data; editor previews and sends tests; viewer reads.",
)
def users_add(email: str, password_stdin: bool, role: str) -> None:
    """Create an admin account (or set its password and role)."""
    from nurture.db import session_scope
    from nurture.users import UserError, add_user

    if password_stdin:
        password = sys.stdin.readline().rstrip("\r\n")
    else:
        password = click.prompt("Password", hide_input=True, confirmation_prompt=True)
    try:
        with session_scope(_settings().database_url) as session:
            add_user(session, email, password, role)
    except UserError as error:
        raise click.ClickException(str(error)) from None
    click.echo(f"{role} account {email} is ready; sign in at /admin")


@main.command()
@click.argument("sequence")
@click.argument("step")
@click.option("--format", "fmt", type=click.Choice(["html", "text", "eml"]), default="text")
@click.option("--first-name", default="Alex", help="Sample first name ('' for none).")
def preview(sequence: str, step: str, fmt: str, first_name: str) -> None:
    """Print an email as it would go out (STEP "confirmation" for the opt-in email)."""
    from nurture.preview import parts, preview_message
    from nurture.render import RenderError

    try:
        message = preview_message(_settings(), sequence, step, first_name=first_name)
    except RenderError as error:
        raise click.ClickException(str(error)) from None
    text, html = parts(message)
    if fmt == "eml":
        sys.stdout.write(message.as_string())
    else:
        click.echo(html if fmt == "html" else text)


@main.command("send-test")
@click.argument("sequence")
@click.argument("step")
@click.option("--to", "to", required=True, help="Where to send the test.")
@click.option("--first-name", default="Alex", help="Sample first name ('' for none).")
def send_test(sequence: str, step: str, to: str, first_name: str) -> None:
    """Send one email now to ADDRESS, marked [Test], as it would go out."""
    from email_validator import EmailNotValidError, validate_email

    from nurture.mailer import PermanentFailure, TemporaryFailure
    from nurture.preview import send_test as send
    from nurture.render import RenderError

    try:
        address = validate_email(to, check_deliverability=False, allow_smtputf8=False)
        send(_settings(), sequence, step, address.ascii_email, first_name=first_name)
    except (EmailNotValidError, RenderError, TemporaryFailure, PermanentFailure) as error:
        raise click.ClickException(str(error)) from None
    click.echo(f"sent {sequence}/{step} to {to}")


def _now(now_text: str | None) -> datetime | None:
    """`--now` as an aware time (UTC unless it says otherwise); None for the real now."""
    if not now_text:
        return None
    try:
        now = datetime.fromisoformat(now_text)
    except ValueError:
        raise click.BadParameter("use ISO-8601, e.g. 2026-03-01T09:00:00+00:00") from None
    return now if now.tzinfo else now.replace(tzinfo=UTC)


@main.command()
@click.option("--now", "now_text", help="Scan as of this ISO-8601 time (default: now).")
def dispatch(now_text: str | None) -> None:
    """Run one due-scan: write due deliveries and hand them to the workers."""
    from nurture.tasks import make_celery, run_dispatch

    result = run_dispatch(make_celery(_settings()), _now(now_text))
    click.echo(
        f"created {result.created}, handed to workers {result.enqueued}, "
        f"released {result.released}, broker failures {result.publish_failed}"
    )
    if result.publish_failed:
        sys.exit(1)


@main.command()
@click.option("--now", "now_text", help="Prune as of this ISO-8601 time (default: now).")
@click.option("--yes", is_flag=True, help="Do not ask before pruning as of a future time.")
def prune(now_text: str | None, yes: bool) -> None:
    """Erase signups never confirmed within UNCONFIRMED_RETENTION_DAYS (beat does it hourly)."""
    from nurture.models import utcnow
    from nurture.tasks import make_celery, run_prune

    settings = _settings()
    if not settings.unconfirmed_retention:
        click.echo("UNCONFIRMED_RETENTION_DAYS is 0: unconfirmed signups are kept")
        return
    now = _now(now_text)
    if now is not None and now > utcnow() + timedelta(minutes=1) and not yes:
        # Erasure cannot be undone: a mistyped year would erase today's signups.
        at = now.astimezone(UTC)
        cutoff = at - timedelta(seconds=settings.unconfirmed_retention)
        click.confirm(
            f"--now {at:%Y-%m-%d %H:%M} UTC is in the future: every signup still "
            f"unconfirmed whose last confirmation email went out before {cutoff:%Y-%m-%d %H:%M} "
            "UTC would be erased for good. Go on?",
            abort=True,
        )
    pruned = run_prune(make_celery(settings), now)
    click.echo(f"erased {pruned} signups never confirmed")


@main.command("plan")
@click.option("--days", default=7, show_default=True, help="How far ahead to look.")
def plan_command(days: int) -> None:
    """Dry run: who gets what in the next days, published version vs the files on disk."""
    from nurture.db import session_scope
    from nurture.models import utcnow
    from nurture.publishing import compare, format_diff, published_sequences
    from nurture.sequences import SequenceError, load_sequences

    settings = _settings()
    try:
        proposed = load_sequences(settings.templates_path)
    except SequenceError as error:
        raise click.ClickException(str(error)) from None
    with session_scope(settings.database_url) as session:
        published = published_sequences(session)
        for name, (_, since) in sorted(published.items()):
            click.echo(f"{name}: published {since:%Y-%m-%d %H:%M} UTC")
        if not published:
            click.echo("nothing published yet: every sequence is new to the service")
        live = {name: sequence for name, (sequence, _) in published.items()}
        click.echo(format_diff(compare(session, settings, live, proposed, utcnow(), days)))


@main.command()
@click.argument("email")
def timeline(email: str) -> None:
    """Print a subscriber's past and planned sends, in local time and UTC."""
    from nurture.db import session_scope
    from nurture.models import utcnow
    from nurture.sequences import current_sequences
    from nurture.timeline import format_timeline
    from nurture.timeline import timeline as build

    settings = _settings()
    with session_scope(settings.database_url) as session:
        line = build(session, settings, current_sequences(settings.templates_path), email, utcnow())
        if line is None:
            raise click.ClickException(f"no subscriber has the address {email}")
        click.echo(format_timeline(line))


@main.command()
@click.option("--generate", "generate_path", type=click.Path(), help="Write a new key here first.")
def dkim(generate_path: str | None) -> None:
    """Print the DNS TXT record that publishes the DKIM key."""
    from pathlib import Path

    from nurture.dkim import DKIMError, DKIMSigner, domain_of, generate_key

    settings = _settings()
    try:
        if generate_path:
            generate_key(Path(generate_path))
            click.echo(f"wrote {generate_path}; set DKIM_PRIVATE_KEY to it and DKIM_SELECTOR")
            if not settings.dkim_selector:
                return
        path = Path(generate_path) if generate_path else settings.dkim_private_key
        if path is None:
            raise click.ClickException(
                "DKIM is off: set DKIM_PRIVATE_KEY and DKIM_SELECTOR "
                "(or run `nurture dkim --generate dkim.pem`)"
            )
        signer = DKIMSigner.load(path, settings.dkim_selector, domain_of(settings.mail_from))
    except DKIMError as error:
        raise click.ClickException(str(error)) from None
    click.echo(signer.dns_record_text())


@main.group()
def subscribers() -> None:
    """Subscribers: import and export, each one's data (export-data, erase), suppress."""


def _subscriber_id(session, email: str) -> int:
    from sqlalchemy import select

    from nurture.models import Subscriber
    from nurture.subscribers import lookup_address

    address = lookup_address(email)
    subscriber_id = session.scalar(select(Subscriber.id).where(Subscriber.email == address))
    if subscriber_id is None:
        raise click.ClickException(f"no subscriber has the address {email}")
    return subscriber_id


@subscribers.command("import")
@click.argument("path", type=click.Path(exists=True, dir_okay=False))
@click.option("--sequence", default="product-vs-project", show_default=True)
@click.option("--confirmed", is_flag=True, help="They already agreed: skip the confirmation email.")
@click.option("--consent-note", default="", help="How they agreed (required with --confirmed).")
def subscribers_import(path: str, sequence: str, confirmed: bool, consent_note: str) -> None:
    """Import FILE.csv (columns email, first_name, timezone, consent_source)."""
    from pathlib import Path

    from nurture.db import session_scope
    from nurture.importer import CSVError, import_subscribers, read_rows
    from nurture.models import utcnow
    from nurture.sequences import current_sequences

    settings = _settings()
    data = Path(path).read_bytes()
    try:
        total = len(read_rows(data)[1])
        with (
            session_scope(settings.database_url) as session,
            click.progressbar(length=total, label="importing", file=sys.stderr) as bar,
        ):
            report = import_subscribers(
                session,
                settings,
                current_sequences(settings.templates_path),
                data,
                now=utcnow(),
                sequence=sequence,
                confirmed=confirmed,
                consent_note=consent_note,
                progress=bar.update,
            )
    except CSVError as error:
        raise click.ClickException(f"{path}: {error} (nothing was imported)") from None
    for line in report.lines():
        click.echo(line)


@subscribers.command("export")
@click.argument("path", type=click.Path(dir_okay=False, allow_dash=True))
def subscribers_export(path: str) -> None:
    """Write every subscriber to FILE.csv ("-" for standard output)."""
    import csv

    from nurture.db import session_scope
    from nurture.importer import export_rows

    with session_scope(_settings().database_url) as session:
        if path == "-":
            csv.writer(sys.stdout).writerows(export_rows(session))
            return
        with open(path, "w", encoding="utf-8", newline="") as out:
            csv.writer(out).writerows(export_rows(session))


@subscribers.command("export-data")
@click.argument("email")
def subscribers_export_data(email: str) -> None:
    """Print everything held about EMAIL as JSON (a data-access request)."""
    import json

    from nurture.db import session_scope
    from nurture.privacy import export_data

    with session_scope(_settings().database_url) as session:
        data = export_data(session, _subscriber_id(session, email))
    click.echo(json.dumps(data, indent=2, ensure_ascii=False))


@subscribers.command("suppress")
@click.argument("email")
@click.option(
    "--reason",
    type=click.Choice(["complained", "bounced"]),
    default="complained",
    show_default=True,
    help="What the mail provider reported.",
)
def subscribers_suppress(email: str, reason: str) -> None:
    """Never mail EMAIL again: a complaint or a late bounce reported after the send."""
    from email_validator import EmailNotValidError

    from nurture.db import session_scope
    from nurture.models import utcnow
    from nurture.subscribers import normalize_email, suppress_reported

    try:
        address = normalize_email(email)
    except EmailNotValidError as error:
        raise click.ClickException(f"{email} is not an email address: {error}") from None

    with session_scope(_settings().database_url) as session:
        known = suppress_reported(session, address, reason, now=utcnow(), source="cli")
    if known:
        click.echo(f"{email} is suppressed ({reason}); nothing more is sent to it")
    else:
        click.echo(f"no subscriber has {email}; its hash is kept, so it is never mailed")


@subscribers.command("erase")
@click.argument("email")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
def subscribers_erase(email: str, yes: bool) -> None:
    """Remove EMAIL's personal data; keep only a hash that stops mail to it."""
    from nurture.db import session_scope
    from nurture.models import utcnow
    from nurture.privacy import erase_on_request

    if not yes:
        click.confirm(f"Erase all personal data of {email}? This cannot be undone", abort=True)
    settings = _settings()
    with session_scope(settings.database_url) as session:
        subscriber_id = _subscriber_id(session, email)
        erase_on_request(session, subscriber_id, now=utcnow(), outbox=settings.outbox_path)
    click.echo(f"erased {email}; the address stays suppressed as a hash")


@main.command()
def lint() -> None:
    """Check every sequence and email: `file:line: message`; exit 1 on errors, 0 on warnings."""
    from nurture.lint import lint_templates

    problems = lint_templates(_settings())
    for problem in problems:
        click.echo(str(problem))
    errors = [p for p in problems if not p.warning]
    if errors:
        sys.exit(1)
    click.echo("all emails render" + (f" ({len(problems)} warnings)" if problems else ""))
