"""Command-line rules in one place: human text on stderr, exactly one JSON document on stdout, argument types."""
from __future__ import annotations

import argparse
import json
import sys

from edge.errors import first_line
from edge.redact import redact


def say(message: str) -> None:
    """Human-facing text goes to stderr so stdout stays a clean JSON document; passwords in URIs are masked."""
    print(redact(message), file=sys.stderr)


def emit_json(document: object) -> None:
    """The one JSON document a `--json` command prints (passwords in URIs masked)."""
    print(redact(json.dumps(document, indent=2)))


def positive_int(text: str) -> int:
    """argparse type for counts (workers, sizes, frames): a whole number ≥ 1, else argparse's one-line usage error."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


class OneLineUsageParser(argparse.ArgumentParser):
    """argparse whose usage errors are one line, like every other error: what is wrong and where to read more
    (sub-commands inherit it)."""

    def error(self, message: str):
        self.exit(2, redact(f"error: {self.prog}: {first_line(message)} (see `{self.prog} --help`)") + "\n")
