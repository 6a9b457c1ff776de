"""Exceptions whose messages say what went wrong and what to do; the CLI prints them as one line, exit 2."""
from __future__ import annotations


def first_line(message: object, default: str = "no details") -> str:
    """The first line of a message (an exception's, a parser's) for a one-line error; `default` when empty."""
    return (str(message).strip().splitlines() or [default])[0]


class EdgeError(Exception):
    """Base class: a problem the user can fix; str(err) is the one line shown to them."""

    exit_code = 2


class ConfigError(EdgeError):
    """The config file or a command-line option is invalid."""


class ModelError(EdgeError):
    """A model file is missing, tampered with, or of the wrong kind."""


class InputError(EdgeError):
    """An input image or video cannot be used (missing, corrupt, no face)."""


class StoreError(EdgeError):
    """The embedding store cannot be read or written."""


class CameraError(EdgeError):
    """A camera source cannot be opened or has gone away."""


class FleetError(EdgeError):
    """The fleet database cannot be used by this door (unreachable, refused, newer schema, other model)."""
