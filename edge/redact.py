"""Secrets never leave the process: a password in a URI (`rtsp://user:password@host`) or in a password-like query
parameter (`?password=…`, `&token=…`) becomes *** in every line the CLI prints, every log line, every event and
every JSON document."""
from __future__ import annotations

import logging
import re

MASK = "***"
# Up to the last '@' before whitespace, so a password holding '@', ':' or '/' is still masked whole.
URI_PASSWORD = re.compile(r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.\-]*://)(?P<user>[^\s:/@?#]*):\S*@")
QUERY_SECRET = re.compile(
    r"(?i)(?P<key>[?&;](?:password|passwd|pass|pwd|secret|token|access_token|auth|key|api_?key)=)[^&;#\s'\"]*")


def redact(text: str) -> str:
    """`text` with every URI password and secret query value replaced by ***."""
    text = QUERY_SECRET.sub(rf"\g<key>{MASK}", text)  # first: an '@' in a query value is no user:password@
    return URI_PASSWORD.sub(rf"\g<scheme>\g<user>:{MASK}@", text)


class RedactingFormatter(logging.Formatter):
    """A log formatter whose output (message, arguments and any traceback) has passed through `redact`."""

    def format(self, record: logging.LogRecord) -> str:
        return redact(super().format(record))
