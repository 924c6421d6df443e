"""Sequences as marketers write them: a folder with `sequence.toml` and one file per email.

A manifest lists the steps in order; each has a key (what enrollments point at,
so steps can be inserted or reordered safely), a day offset, an optional local
send time and a file. Loading checks the manifest and says `file:line: message`
for anything wrong, the same words `nurture lint` prints.
"""

from __future__ import annotations

import logging
import re
import tomllib
from dataclasses import dataclass
from datetime import time
from pathlib import Path

log = logging.getLogger(__name__)

MANIFEST = "sequence.toml"
KEY_PATTERN = re.compile(r"^[a-z0-9][a-z0-9-]{0,99}$")


class SequenceError(Exception):
    """A manifest problem, worded `file:line: message`."""


@dataclass(frozen=True)
class Step:
    key: str
    day: int
    file: str
    send_at: time | None = None
    sales: bool = False
    #: Added to a live sequence: also send it to people already past its place.
    backfill: bool = False


@dataclass(frozen=True)
class Sequence:
    name: str
    title: str
    description: str
    path: Path
    steps: tuple[Step, ...]
    #: Steps that would land on a Saturday or Sunday (local time) move to Monday.
    skip_weekends: bool = False

    def step(self, key: str) -> Step | None:
        return next((s for s in self.steps if s.key == key), None)

    def after(self, key: str) -> Step | None:
        """The step that follows `key`, or None when `key` is the last."""
        keys = [s.key for s in self.steps]
        index = keys.index(key)
        return self.steps[index + 1] if index + 1 < len(self.steps) else None

    @property
    def first(self) -> Step:
        return self.steps[0]


def _line_of(text: str, needle: str, occurrence: int = 1) -> int:
    """The line of the `occurrence`-th line containing `needle` (1 if none)."""
    for number, line in enumerate(text.splitlines(), start=1):
        if needle in line:
            occurrence -= 1
            if occurrence == 0:
                return number
    return 1


def _parse_step(raw: dict, index: int, text: str, where: Path) -> Step:
    if not isinstance(raw, dict):
        raise SequenceError(f"{where}:1: step {index + 1}: each step is a [[steps]] table")
    key = raw.get("key")
    line = _line_of(text, f'"{key}"') if isinstance(key, str) else 1

    def fail(message: str) -> SequenceError:
        return SequenceError(f"{where}:{line}: step {index + 1}: {message}")

    if not isinstance(key, str) or not KEY_PATTERN.match(key):
        raise fail('`key` must be lowercase letters, digits and dashes, e.g. key = "welcome"')
    day = raw.get("day")
    if not isinstance(day, int) or isinstance(day, bool) or day < 0:
        raise fail("`day` must be a whole number of days from the start, 0 or more")
    file = raw.get("file")
    if not isinstance(file, str) or "/" in file or "\\" in file or not file:
        raise fail("`file` must name an email file in this folder")
    if not (where.parent / file).is_file():
        raise fail(f"file {file!r} does not exist")
    send_at = raw.get("send_at")
    if send_at is not None:
        if not isinstance(send_at, str) or not re.fullmatch(r"\d{2}:\d{2}", send_at):
            raise fail('`send_at` must be a local time like "09:00"')
        try:
            send_at = time.fromisoformat(send_at)
        except ValueError:
            raise fail(f"`send_at` {raw['send_at']!r} is not a time of day") from None
    unknown = set(raw) - {"key", "day", "file", "send_at", "sales", "backfill"}
    if unknown:
        raise fail(f"unknown setting(s): {', '.join(sorted(unknown))}")
    for flag in ("sales", "backfill"):
        if not isinstance(raw.get(flag, False), bool):
            raise fail(f"`{flag}` must be true or false")
    return Step(
        key=key,
        day=day,
        file=file,
        send_at=send_at,
        sales=raw.get("sales", False),
        backfill=raw.get("backfill", False),
    )


def load_sequence(folder: Path) -> Sequence:
    """Read and check one sequence folder."""
    where = folder / MANIFEST
    try:
        text = where.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        line = where.read_bytes()[: error.start].count(b"\n") + 1
        raise SequenceError(f"{where}:{line}: the file is not UTF-8; save it as UTF-8") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        match = re.search(r"line (\d+)", str(error))
        raise SequenceError(f"{where}:{match.group(1) if match else 1}: {error}") from None
    name = data.get("name", folder.name)
    if name != folder.name:
        raise SequenceError(f"{where}:{_line_of(text, 'name')}: name must match the folder")
    raw_steps = data.get("steps")
    if not isinstance(raw_steps, list) or not raw_steps:
        raise SequenceError(f"{where}:1: a sequence needs at least one [[steps]] table")
    steps = tuple(_parse_step(raw, i, text, where) for i, raw in enumerate(raw_steps))
    seen: set[str] = set()
    for i, step in enumerate(steps):
        if step.key in seen:
            line = _line_of(text, f'"{step.key}"', occurrence=2)
            raise SequenceError(f"{where}:{line}: step key {step.key!r} is used twice")
        seen.add(step.key)
        if i and step.day < steps[i - 1].day:
            line = _line_of(text, f'"{step.key}"')
            raise SequenceError(
                f"{where}:{line}: step {step.key!r} has a day before the step above"
            )
    skip_weekends = data.get("skip_weekends", False)
    if not isinstance(skip_weekends, bool):
        line = _line_of(text, "skip_weekends")
        raise SequenceError(f"{where}:{line}: skip_weekends must be true or false")
    return Sequence(
        name=name,
        title=str(data.get("title", name)),
        description=str(data.get("description", "")),
        path=folder,
        steps=steps,
        skip_weekends=skip_weekends,
    )


def load_sequences(templates_path: Path) -> dict[str, Sequence]:
    """Every sequence folder under `templates_path`, by name; the first manifest that
    does not load raises its SequenceError (for lint and the CLI, which report it)."""
    sequences, errors = _load_each(templates_path, {})
    if errors:
        raise SequenceError(next(iter(errors.values())))
    return sequences


@dataclass(frozen=True)
class _Loaded:
    stamp: tuple
    sequences: dict[str, Sequence]
    errors: dict[str, str]  # sequence folder: what stops its manifest from loading


_loaded: dict[Path, _Loaded] = {}


def current_sequences(templates_path: Path) -> dict[str, Sequence]:
    """The sequences to serve, read again only when a manifest has changed.

    Long-running processes (web, worker) pick up a marketer's edit on the next
    request or tick without a restart. A manifest that does not load (a typo,
    a file name that does not exist) stops nothing else: its sequence goes on
    as this process last loaded it, or, if it never loaded here, is left out
    (its enrollments wait, its form says the course is closed) until the file
    is fixed. `manifest_errors` says what is wrong, for /healthz and the admin.
    """
    return _current(templates_path).sequences


def manifest_errors(templates_path: Path) -> dict[str, str]:
    """What stops a manifest on disk from loading, by sequence: `file:line: message`."""
    return _current(templates_path).errors


def _stamp(templates_path: Path) -> tuple:
    """What a reload depends on: each manifest's time, and its folder's, which changes
    when an email file is added, renamed or removed (a manifest may name one that
    is only created after it is saved)."""
    stamp = []
    for manifest in sorted(templates_path.glob(f"*/{MANIFEST}")):
        try:
            stamp.append((str(manifest), manifest.stat().st_mtime_ns))
            stamp.append((str(manifest.parent), manifest.parent.stat().st_mtime_ns))
        except FileNotFoundError:  # removed since the glob: the next call sees it gone
            continue
    return tuple(stamp)


def _current(templates_path: Path) -> _Loaded:
    stamp = _stamp(templates_path)
    cached = _loaded.get(templates_path)
    if cached is None or cached.stamp != stamp:
        last = cached.sequences if cached else {}
        sequences, errors = _load_each(templates_path, last)
        for name, error in errors.items():
            log.error(
                "%s; sequence %s %s until the file is fixed (nurture lint checks it)",
                error,
                name,
                "goes on as last loaded" if name in sequences else "is not served",
            )
        cached = _Loaded(stamp, sequences, errors)
        _loaded[templates_path] = cached
    return cached


def _load_each(
    templates_path: Path, last: dict[str, Sequence]
) -> tuple[dict[str, Sequence], dict[str, str]]:
    """Every sequence folder, each on its own, and what stops any from loading; a
    broken one keeps its version in `last`, if it has one."""
    sequences: dict[str, Sequence] = {}
    errors: dict[str, str] = {}
    for folder in sorted(templates_path.iterdir()):
        if not (folder / MANIFEST).is_file():
            continue
        try:
            sequences[folder.name] = load_sequence(folder)
        except (SequenceError, OSError) as error:  # OSError: unreadable, or removed meanwhile
            errors[folder.name] = str(error)
            if folder.name in last:
                sequences[folder.name] = last[folder.name]
    return sequences, errors


def within_templates(templates_path: Path, text: str) -> str:
    """`text` with the templates folder's path taken out of the file names in it:
    pages name files as the marketer knows them, and a public one must not show
    the server's layout."""
    for folder in {templates_path, templates_path.resolve()}:
        text = text.replace(f"{folder}/", "")
    return text


def first_steps(sequences: dict[str, Sequence]) -> dict[str, str]:
    """Each sequence's first step key, which is where an enrollment starts."""
    return {name: sequence.first.key for name, sequence in sequences.items()}


def sales_steps(sequences: dict[str, Sequence]) -> dict[str, frozenset[str]]:
    """Each sequence's steps marked `sales = true`: they stop once someone converts."""
    return {
        name: frozenset(step.key for step in sequence.steps if step.sales)
        for name, sequence in sequences.items()
    }
