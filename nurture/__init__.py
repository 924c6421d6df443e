"""nurture: self-hosted email courses and lead nurture."""

from pathlib import Path

#: The project root: templates/emails/ and migrations/ live beside the package.
ROOT = Path(__file__).resolve().parent.parent
