"""The development mail catcher: an SMTP server that keeps every message as a file.

`nurture dev` runs it on 127.0.0.1:1025; `/admin/outbox` lists what it caught.
"""

from __future__ import annotations

import os
import uuid
from datetime import UTC, datetime
from email import message_from_bytes, policy
from email.message import EmailMessage
from email.utils import getaddresses
from pathlib import Path

from aiosmtpd.controller import Controller


class OutboxHandler:
    def __init__(self, outbox: Path):
        self.outbox = outbox
        outbox.mkdir(parents=True, exist_ok=True)

    async def handle_DATA(self, server, session, envelope) -> str:
        name = f"{datetime.now(UTC):%Y%m%dT%H%M%S%f}-{uuid.uuid4().hex[:8]}.eml"
        temporary = self.outbox / f".{name}.tmp"
        temporary.write_bytes(envelope.original_content or envelope.content)
        os.replace(temporary, self.outbox / name)
        return "250 Message accepted for delivery"


def start_catcher(outbox: Path, host: str, port: int) -> Controller:
    controller = Controller(OutboxHandler(outbox), hostname=host, port=port)
    controller.start()
    return controller


#: The headers the outbox pages show, in order.
SHOWN_HEADERS = (
    "From",
    "To",
    "Subject",
    "Date",
    "Message-ID",
    "X-Nurture-Step",
    "List-Id",
    "List-Unsubscribe",
    "List-Unsubscribe-Post",
)


def list_outbox(outbox: Path, limit: int = 200) -> list[tuple[str, dict[str, str]]]:
    """The newest caught messages first, as (file name, `shown_headers`)."""
    if not outbox.is_dir():
        return []
    names = sorted((p.name for p in outbox.glob("*.eml")), reverse=True)[:limit]
    return [(name, shown_headers(read_message(outbox, name))) for name in names]


def shown_headers(message: EmailMessage) -> dict[str, str]:
    """The message's SHOWN_HEADERS as text ("" when absent), for the outbox pages.

    The catcher keeps whatever it is sent, and the `email` package raises when
    some malformed headers are read (ValueError for an address whose encoded
    words decode to a line break, and others for other damage): such a header
    is shown as the raw text it came as, so one bad message cannot break the
    outbox.
    """
    return {name: _header_text(message, name) for name in SHOWN_HEADERS}


def _header_text(message: EmailMessage, name: str) -> str:
    try:
        value = message.get(name)
    except Exception:
        raw = (value for key, value in message.raw_items() if key.lower() == name.lower())
        return next(raw, "")
    return "" if value is None else str(value)


def forget(outbox: Path, address: str) -> int:
    """Delete every caught message to `address`; how many.

    An erasure reaches the caught mail too: in development and in the compose
    setup, the outbox holds the person's name, address and working links.
    """
    if not outbox.is_dir():
        return 0
    wanted = address.lower()
    forgotten = 0
    for path in outbox.glob("*.eml"):
        message = message_from_bytes(path.read_bytes(), policy=policy.default)
        recipients = getaddresses([_header_text(message, "To")])
        if any(email.lower() == wanted for _, email in recipients):
            path.unlink(missing_ok=True)
            forgotten += 1
    return forgotten


#: The longest file name common file systems (ext4, XFS, APFS) take, in bytes.
NAME_MAX = 255


def read_message(outbox: Path, name: str) -> EmailMessage:
    """A caught message by its file name; FileNotFoundError for any other name.

    Only a plain, visible `.eml` name in the outbox itself passes: no path,
    no control character (a NUL cannot even go to the operating system), no
    name too long for a file.
    """
    if (
        "/" in name
        or "\\" in name
        or not name.endswith(".eml")
        or name.startswith(".")
        or not name.isprintable()
        or len(name.encode()) > NAME_MAX
    ):
        raise FileNotFoundError(name)
    return message_from_bytes((outbox / name).read_bytes(), policy=policy.default)
