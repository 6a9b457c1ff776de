"""Exceptions whose messages say what went wrong and what to do; the CLI prints them as one line, exit 2."""
from __future__ import annotations


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
