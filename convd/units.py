"""Sizes for people, shared by the configuration, the image checks and the stages."""

from __future__ import annotations

__all__ = ["format_size"]


def format_size(n: float) -> str:
    """Bytes for people: ``1.5 GiB`` (the inverse of :func:`convd.config.parse_size`, rounded)."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"  # pragma: no cover - the loop always returns
