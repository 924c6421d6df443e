"""DKIM signing of outgoing email, with dkimpy.

When DKIM_PRIVATE_KEY (a PEM file) and DKIM_SELECTOR are set, every email is
signed for the domain of MAIL_FROM, so receivers can check it really comes from
us and DMARC can pass. `DKIMSigner.load` reads and checks the key once, at
start-up: a missing, unreadable, encrypted, short or corrupted key stops the
service there, instead of every email going out with a signature that fails.

The signature covers bytes, so it must be made over exactly the bytes the
receiver gets. The mailer therefore serialises each message once
(`mailer.wire_bytes`), signs those bytes, and sends the signature followed by
them with `smtplib.SMTP.sendmail`, which changes nothing but the dot-stuffing
the receiving server undoes.

Header canonicalisation is "relaxed", for which folding and whitespace do not count,
so a relay that folds it again does not break it. The body is "simple": relays
pass bodies through unchanged (one that re-encodes an 8bit body as 7bit breaks
every DKIM body hash, relaxed or simple, so "relaxed" would buy nothing there).
"""

from __future__ import annotations

import base64
import os
import re
import shutil
import subprocess
from dataclasses import dataclass, field
from email.parser import BytesHeaderParser
from email.policy import compat32
from email.utils import parseaddr
from pathlib import Path

import dkim
from dkim.crypto import UnparsableKeyError, parse_pem_private_key

#: The headers we sign, in the order they appear in h=. Only
#: those present are signed: the confirmation email has no List-Unsubscribe.
SIGNED_HEADERS = (
    "From",
    "To",
    "Subject",
    "Date",
    "Message-ID",
    "List-Unsubscribe",
    "List-Unsubscribe-Post",
)

#: Receivers (and dkimpy's verify) reject RSA keys below 1024 bits.
MIN_KEY_BITS = 1024

#: One character-string in a DNS TXT record holds at most 255 bytes.
TXT_STRING_MAX = 255

CANONICALIZE = (b"relaxed", b"simple")

_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_DOMAIN_NAME = re.compile(rf"{_LABEL}(?:\.{_LABEL})*")

# DER of the rsaEncryption AlgorithmIdentifier: SEQUENCE { OID 1.2.840.113549.1.1.1, NULL }.
_RSA_ALGORITHM = bytes.fromhex("300d06092a864886f70d0101010500")


class DKIMError(Exception):
    """DKIM cannot be used as configured; the message says what to fix."""


def domain_of(mail_from: str) -> str:
    """The signing domain for MAIL_FROM: `Course Team <course@example.com>` → example.com.

    DKIM's d= must match the From domain for DMARC to pass, so it is taken from
    MAIL_FROM rather than configured separately. An internationalised domain is
    given in its ASCII (IDNA) form, as DNS and d= need.
    """
    address = parseaddr(mail_from)[1]
    domain = address.rpartition("@")[2].strip().rstrip(".")
    if "@" not in address or not domain:
        raise DKIMError(f"MAIL_FROM {mail_from!r} has no address with a domain to sign for")
    try:
        domain = domain.encode("idna").decode("ascii")
    except UnicodeError as error:
        raise DKIMError(f"MAIL_FROM's domain {domain!r} is not a valid domain name") from error
    return domain.lower()


def generate_key(path: Path, bits: int = 2048) -> Path:
    """Write a new unencrypted RSA private key (PEM, mode 0600) to `path`.

    For operators setting DKIM up and for tests. It never overwrites a file: a
    replaced key breaks every signature until DNS is updated. `cryptography` is
    not among dkimpy's dependencies, so the key comes from `openssl genrsa`.
    """
    path = Path(path)
    if bits < MIN_KEY_BITS:
        raise DKIMError(f"a DKIM key needs at least {MIN_KEY_BITS} bits, not {bits}")
    openssl = shutil.which("openssl")
    if openssl is None:
        raise DKIMError("generating a DKIM key needs the openssl command, which is not installed")
    result = subprocess.run(
        [openssl, "genrsa", str(bits)], capture_output=True, check=False, timeout=120
    )
    if result.returncode != 0 or b"PRIVATE KEY-----" not in result.stdout:
        detail = result.stderr.decode(errors="replace").strip()
        raise DKIMError(f"openssl genrsa failed: {detail}")
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise DKIMError(f"{path} already exists; not replacing a DKIM key") from None
    except OSError as error:
        raise DKIMError(f"cannot write {path}: {error.strerror}") from error
    with os.fdopen(fd, "wb") as file:
        file.write(result.stdout)
    return path


def txt_strings(value: str) -> str:
    """A TXT value as quoted strings of at most 255 characters: `"…" "…"`.

    A 2048-bit key makes the value about 410 characters, longer than one DNS
    character-string; resolvers join the strings back into the value.
    """
    chunks = [value[i : i + TXT_STRING_MAX] for i in range(0, len(value), TXT_STRING_MAX)]
    return " ".join(
        '"' + chunk.replace("\\", "\\\\").replace('"', '\\"') + '"' for chunk in chunks or [""]
    )


@dataclass(frozen=True)
class DKIMSigner:
    """Signs outgoing email for one domain with one selector and key.

    Constructing one checks everything (selector, domain, key, and a test
    signature), so a signer that exists can sign. The key is left out of repr,
    so it never ends up in a log or a traceback.
    """

    selector: str
    domain: str
    private_key: bytes = field(repr=False)

    def __post_init__(self) -> None:
        _check_names(self.selector, self.domain)
        if b"ENCRYPTED" in self.private_key:
            raise DKIMError(
                "the private key is encrypted; DKIM needs it unencrypted "
                "(openssl rsa -in encrypted.pem -out key.pem)"
            )
        try:
            key = parse_pem_private_key(self.private_key)
        except (UnparsableKeyError, ValueError, IndexError, KeyError, TypeError) as error:
            raise DKIMError(
                "not an RSA private key in PEM format "
                "('-----BEGIN PRIVATE KEY-----' or '-----BEGIN RSA PRIVATE KEY-----')"
            ) from error
        bits = key["modulus"].bit_length()
        if bits < MIN_KEY_BITS:
            raise DKIMError(
                f"the private key has {bits} bits; receivers need at least {MIN_KEY_BITS}"
            )
        self._self_test()

    @classmethod
    def load(cls, key_path: Path, selector: str, domain: str) -> DKIMSigner:
        """Read DKIM_PRIVATE_KEY and check it, once, when the service starts."""
        _check_names(selector, domain)
        key_path = Path(key_path)
        try:
            data = key_path.read_bytes()
        except FileNotFoundError:
            raise DKIMError(f"DKIM_PRIVATE_KEY {key_path} does not exist") from None
        except OSError as error:
            raise DKIMError(
                f"DKIM_PRIVATE_KEY {key_path} cannot be read: {error.strerror}"
            ) from error
        # dkimpy's PEM reader expects LF line ends; a key saved on Windows has CRLF.
        data = data.replace(b"\r\n", b"\n")
        try:
            return cls(selector=selector, domain=domain, private_key=data)
        except DKIMError as error:  # the names are fine, so it is the key
            raise DKIMError(f"DKIM_PRIVATE_KEY {key_path}: {error}") from error.__cause__

    # --- Signing ---------------------------------------------------------------------

    def sign(self, message: bytes) -> bytes:
        """The `DKIM-Signature: …\\r\\n` header (folded) to put before `message`.

        Signs those of SIGNED_HEADERS that the message has, and its body. The
        bytes must be the ones the receiver will get (`mailer.wire_bytes`).
        """
        present = {name.lower() for name in BytesHeaderParser(policy=compat32).parsebytes(message)}
        include = [name.lower().encode() for name in SIGNED_HEADERS if name.lower() in present]
        if b"from" not in include:
            raise DKIMError("cannot DKIM-sign a message without a From header")
        try:
            return dkim.sign(
                message,
                self.selector.encode("ascii"),
                self.domain.encode("ascii"),
                self.private_key,
                canonicalize=CANONICALIZE,
                include_headers=include,
            )
        except dkim.DKIMException as error:
            raise DKIMError(f"DKIM signing failed: {error}") from error

    # --- DNS ---------------------------------------------------------------------------

    def public_key_b64(self) -> str:
        """The public key as DKIM's p= wants it: base64 DER SubjectPublicKeyInfo."""
        key = parse_pem_private_key(self.private_key)
        rsa_public_key = _der(0x30, _der_int(key["modulus"]) + _der_int(key["publicExponent"]))
        spki = _der(0x30, _RSA_ALGORITHM + _der(0x03, b"\x00" + rsa_public_key))
        return base64.b64encode(spki).decode("ascii")

    def dns_record(self) -> tuple[str, str]:
        """The TXT record to publish: (name, value), the value not yet split."""
        name = f"{self.selector}._domainkey.{self.domain}"
        return name, f"v=DKIM1; k=rsa; p={self.public_key_b64()}"

    def dns_record_text(self) -> str:
        """The record as a zone-file line, value split into 255-character strings.

        What `nurture dkim` prints: it pastes into a BIND zone file, and most
        DNS providers' forms accept the quoted strings too.
        """
        name, value = self.dns_record()
        return f"{name}. IN TXT {txt_strings(value)}"

    def _self_test(self) -> None:
        """Sign a tiny message and verify it with our own public key.

        dkimpy's PEM reader accepts a key whose numbers do not fit together (a
        corrupted file); such a key makes signatures that never verify.
        """
        message = b"From: test@" + self.domain.encode() + b"\r\nSubject: test\r\n\r\ntest\r\n"
        record = self.dns_record()[1].encode()
        try:
            signature = self.sign(message)
            ok = dkim.verify(signature + message, dnsfunc=lambda name, timeout=5: record)
        except (DKIMError, dkim.DKIMException, ValueError, ArithmeticError):
            ok = False
        if not ok:
            raise DKIMError(
                "the private key is damaged: its signatures do not verify with its own public key"
            )


def _check_names(selector: str, domain: str) -> None:
    """The selector and domain become a DNS name, so they must be DNS labels."""
    if not isinstance(selector, str) or not _DOMAIN_NAME.fullmatch(selector):
        raise DKIMError(
            f"DKIM_SELECTOR {selector!r} is not a valid DNS label "
            "(letters, digits and inner hyphens, dot-separated; e.g. 'nurture2024')"
        )
    if not isinstance(domain, str) or not _DOMAIN_NAME.fullmatch(domain) or len(domain) > 253:
        raise DKIMError(f"signing domain {domain!r} is not a valid domain name")


def _der(tag: int, content: bytes) -> bytes:
    length = len(content)
    if length < 0x80:
        return bytes([tag, length]) + content
    size = length.to_bytes((length.bit_length() + 7) // 8, "big")
    return bytes([tag, 0x80 | len(size)]) + size + content


def _der_int(value: int) -> bytes:
    # A leading zero byte keeps a positive integer whose top bit is set positive.
    return _der(0x02, value.to_bytes(value.bit_length() // 8 + 1, "big"))


_signers: dict[tuple, DKIMSigner] = {}


def dkim_signer(settings) -> DKIMSigner | None:
    """The signer for these settings (None without DKIM), loaded once per key file version."""
    if settings.dkim_private_key is None:
        return None
    path = Path(settings.dkim_private_key)
    try:
        version = path.stat().st_mtime_ns
    except OSError:
        version = None
    key = (str(path), version, settings.dkim_selector, settings.mail_from)
    if key not in _signers:
        _signers[key] = DKIMSigner.load(path, settings.dkim_selector, domain_of(settings.mail_from))
    return _signers[key]
