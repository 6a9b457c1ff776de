"""Command-line output rules in one place: human text on stderr, exactly one JSON document on stdout."""
from __future__ import annotations

import json
import sys


def say(message: str) -> None:
    """Human-facing text goes to stderr so stdout stays a clean JSON document."""
    print(message, file=sys.stderr)


def emit_json(document: object) -> None:
    """The one JSON document a `--json` command prints."""
    print(json.dumps(document, indent=2))
