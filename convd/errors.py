"""The error hierarchy: each leaf carries the record's stable ``error.code``.

Stages raise these; the runner turns them into ``failed/`` records without
mapping strings.  Anything else that escapes a stage is a bug in convd and
never costs the source its bytes.
"""

from __future__ import annotations

__all__ = [
    "Cancelled",
    "ConfigError",
    "ConvdError",
    "ConvertFailed",
    "CorruptImage",
    "FormatMismatch",
    "ItemError",
    "NameConflict",
    "NotRegularFile",
    "StartupError",
    "Stopped",
    "Timeout",
    "TooLarge",
    "TransientError",
    "UnsafeImage",
    "UnsupportedFormat",
]


class ConvdError(Exception):
    """Base of every error convd raises on purpose."""


class StartupError(ConvdError):
    """The daemon cannot start (exit 1)."""


class ConfigError(StartupError):
    """The configuration is invalid; the message names the key."""


class ItemError(ConvdError):
    """An input is rejected: it goes to ``failed/`` with this code."""

    code = "internal_error"

    def __init__(self, message: str, *, detected: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.detected = detected  # the format found before the rejection, for the record


class UnsafeImage(ItemError):
    code = "unsafe_image"


class UnsupportedFormat(ItemError):
    code = "unsupported_format"


class CorruptImage(ItemError):
    code = "corrupt_image"


class FormatMismatch(ItemError):
    code = "format_mismatch"


class TooLarge(ItemError):
    code = "too_large"


class NotRegularFile(ItemError):
    code = "not_regular_file"


class NameConflict(ItemError):
    code = "name_conflict"


class ConvertFailed(ItemError):
    code = "convert_failed"


class Timeout(ItemError):
    code = "timeout"


class Cancelled(ItemError):
    """A producer or operator withdrew the item (``convd cancel``, or a request in the spool)."""

    code = "cancelled"


class TransientError(ConvdError):
    """A failure worth retrying (ENOSPC, EIO, a killed qemu-img)."""


class Stopped(ConvdError):
    """Blocking work gave up because the daemon is shutting down."""
