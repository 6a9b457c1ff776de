"""What a person's name (or a note) may be: data shown to people, never a path, markup or a control sequence.

One rule for every surface (CLI, store, kiosk, web, fleet): `clean_name` NFC-normalises, turns every kind of space
into one plain space, strips, bounds the length and refuses characters that are invisible or change how the text
around them is shown (control, format such as zero-width and bidi overrides, surrogates, private use, unassigned,
line and paragraph separators), so two names that look alike on a screen are the same name. `name_key` is the
case-insensitive identity used for uniqueness. Files are never named after a person: use the person id.
"""
from __future__ import annotations

import re
import unicodedata

from edge.errors import StoreError

MAX_NAME_CHARS = 64
MAX_NOTE_CHARS = 256
ID_HEX_DIGITS = 12
ID_PATTERN = re.compile(r"[0-9a-f]{%d}" % ID_HEX_DIGITS)
# Cc control, Cf format (zero-width, bidi overrides, soft hyphen), Cs lone surrogates (undecodable bytes in a
# command-line argument or a folder name), Co private use, Cn unassigned, Zl/Zp line and paragraph separators.
FORBIDDEN_CHAR_CATEGORIES = frozenset({"Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp"})
SPACES = re.compile(r"\s+")
SHOWN_CHARS = 40  # how much of a refused text an error message repeats (escaped, so it stays one line)


def shown(text: str) -> str:
    """`text` for a one-line message: escaped by repr (no control or bidi character reaches a terminal), shortened."""
    return repr(text[:SHOWN_CHARS]) + ("…" if len(text) > SHOWN_CHARS else "")


def clean_text(text: object, what: str, max_chars: int) -> str:
    """`text` NFC-normalised with its spaces collapsed and stripped; StoreError (one line) if it is empty, longer
    than `max_chars` or holds an invisible or layout-changing character."""
    if not isinstance(text, str):
        raise StoreError(f"{what} must be text, got {type(text).__name__}")
    bad = next((char for char in text if unicodedata.category(char) in FORBIDDEN_CHAR_CATEGORIES), None)
    if bad is not None:
        raise StoreError(f"{what} {shown(text)} contains U+{ord(bad):04X} ({unicodedata.category(bad)}: control, "
                         "format, line-break or unassigned character): use visible characters only")
    cleaned = SPACES.sub(" ", unicodedata.normalize("NFC", text)).strip()
    if not cleaned or len(cleaned) > max_chars:
        raise StoreError(f"{what} must be 1 to {max_chars} characters, got {len(cleaned)}: {shown(text)}")
    return cleaned


def clean_name(name: object) -> str:
    """A valid display name, or StoreError; names shaped like person ids are refused so a reference is never
    ambiguous."""
    cleaned = clean_text(name, "person name", MAX_NAME_CHARS)
    if ID_PATTERN.fullmatch(cleaned.lower()):
        raise StoreError(f"person name {shown(cleaned)} looks like a person id ({ID_HEX_DIGITS} hex digits): add a word")
    return cleaned


def name_key(name: str) -> str:
    """Names are unique ignoring case, runs of spaces and compatibility forms (full-width 'Ａ' is 'A')."""
    return unicodedata.normalize("NFKC", unicodedata.normalize("NFKC", SPACES.sub(" ", name).strip()).casefold())
