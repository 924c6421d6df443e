"""Admin accounts: marketers and operators who sign in to /admin."""

from __future__ import annotations

import functools
import hashlib
import hmac

from email_validator import EmailNotValidError, validate_email
from sqlalchemy import select, update
from sqlalchemy.orm import Session
from werkzeug.security import check_password_hash, generate_password_hash

from nurture.models import User

MIN_PASSWORD = 10
#: Each role can do what the ones before it can.
ROLES = ("viewer", "editor", "admin")


class UserError(ValueError):
    pass


@functools.cache
def _dummy_hash() -> str:
    """A hash to check a password against when no account has the address.

    Made once: hashing a new one on every such login cost a second key
    derivation, so an unknown address took about twice as long to refuse as a
    known one with a wrong password, and timing told which accounts exist.
    """
    return generate_password_hash("not any account's password")


def add_user(session: Session, email: str, password: str, role: str = "admin") -> User:
    """Create an account, or set a new password and role on an existing one."""
    if role not in ROLES:
        raise UserError(f"the role must be one of {', '.join(ROLES)}, not {role!r}")
    try:
        email = validate_email(email, check_deliverability=False).normalized.lower()
    except EmailNotValidError as error:
        raise UserError(str(error)) from None
    if len(password) < MIN_PASSWORD:
        raise UserError(f"the password must have at least {MIN_PASSWORD} characters")
    user = session.scalar(select(User).where(User.email == email))
    if user is None:
        user = User(email=email, password_hash="")
        session.add(user)
    user.password_hash = generate_password_hash(password)
    user.role = role
    session.flush()
    return user


def authenticate(session: Session, email: str, password: str) -> User | None:
    email = email.strip().lower()
    # No account's address has control characters (PostgreSQL cannot even compare a NUL).
    user = session.scalar(select(User).where(User.email == email)) if email.isprintable() else None
    if user is None:
        # Spend the same time as a real check, so timing does not reveal accounts.
        check_password_hash(_dummy_hash(), password)
        return None
    return user if check_password_hash(user.password_hash, password) else None


def session_key(secret: str, user: User) -> str:
    """What a signed-in session holds to stay valid: a MAC of the account's password hash.

    Setting a new password changes it, and so does signing out (which raises
    the account's `session_epoch`), so every session made before (a stolen
    cookie, a shared computer) stops working at once: a session is a signed
    cookie, which the server cannot delete. The cookie is signed but readable,
    hence a MAC under the secret key, not the hash.
    """
    held = f"{user.session_epoch}:{user.password_hash}".encode()
    return hmac.new(secret.encode(), held, hashlib.sha256).hexdigest()


def end_sessions(session: Session, user_id: int) -> None:
    """Make every session of the account stop working (signing out)."""
    session.execute(
        update(User).where(User.id == user_id).values(session_epoch=User.session_epoch + 1)
    )


def can(role: str | None, needed: str) -> bool:
    """Whether `role` may do what `needed` allows."""
    return role in ROLES and ROLES.index(role) >= ROLES.index(needed)
